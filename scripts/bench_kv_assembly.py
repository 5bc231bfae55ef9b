"""`python scripts/bench_kv_assembly.py`: the streamed KV memory's eviction and assembly time
on the default 1.5B's shapes (28 layers, 2 kv heads, head_dim 128, float32 as on a CPU, one
thread): a live window of 2000 tokens after 60 32-token entries; evict those 60 (mean per block)
and assemble 24 of them with the window (median of 7). Runs on this tree or, with PYTHONPATH
pointing at a checkout from before reasoning/llm/, on that one."""

import statistics
import time

import torch

from omnistream.reasoning import kvcache

try:
    from omnistream.reasoning.llm.cache import BufferedCache
except ImportError:
    from omnistream.reasoning.cache import BufferedCache

torch.set_num_threads(1)
L, KV, D, SINK, BT = 28, 2, 128, 40, 32
torch.manual_seed(0)


def make():
    kv = kvcache.StreamingKV.__new__(kvcache.StreamingKV)
    if hasattr(kvcache, "inv_freq_for"):
        from omnistream.kernels.rope import Rope

        kv.inv_freq = Rope(D, 1e6).inv_freq()
    else:
        kv.rotary = kvcache.RotaryTable(D, 1e6)
    kv.window_tokens = 10**9
    kv.cache = BufferedCache()
    n = SINK + 2000 + 60 * BT
    for i in range(L):
        kv.cache.update(torch.randn(1, KV, n, D), torch.randn(1, KV, n, D), i)
    kv.n_sink = SINK
    kv.window = [kvcache.Block(i, 0, 0, "", BT) for i in range(60 + 2000 // 40)]
    for b in kv.window[60:]:
        b.n_tokens = 40
    kv.evicted = kvcache.BlockStore()
    kv._next_id = 10**6
    return kv


kv = make()
t0 = time.perf_counter()
for _ in range(60):
    kv._evict_oldest()
evict_ms = (time.perf_counter() - t0) * 1000 / 60
blocks = [kv.evicted.blocks[i] for i in range(0, 60, 60 // 24)][:24]
times = []
for _ in range(7):
    t0 = time.perf_counter()
    cache = kv.assemble(blocks)
    times.append((time.perf_counter() - t0) * 1000)
print(
    f"evict one 32-token block (window 2000+): {evict_ms:.1f} ms; assemble 24 blocks (768 tok) + 2000 window: "
    f"{statistics.median(times):.1f} ms (min {min(times):.1f}); cache length {cache.get_seq_length()}"
)
