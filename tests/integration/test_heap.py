"""The reasoner's heap setting: freed activation-sized buffers go back to the OS at once."""

import subprocess
import sys

import pytest

PROBE = """
import sys, torch
from omnistream.reasoning.llm.engine import map_large_buffers
if sys.argv[1] == "mapped":
    map_large_buffers()

def rss_mb():
    return int(open("/proc/self/statm").read().split()[1]) * 4096 / 2**20

big = torch.ones(48 << 18)  # 48 MB, freed: glibc raises its mmap threshold past it by default
del big
base = rss_mb()
kept = []
for i in range(40):  # prefill-like passes: buffers of changing sizes, one small survivor each
    a = torch.ones((2 + i % 7) << 18)
    b = torch.ones((3 + i % 5) << 18)
    kept.append(torch.ones(64))
    del a, b
print(round(rss_mb() - base, 1))
"""


def _growth(mode: str) -> float:
    done = subprocess.run([sys.executable, "-c", PROBE, mode], capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return float(done.stdout.strip())


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="glibc's mallopt")
def test_large_buffers_are_returned_to_the_os_when_freed() -> None:
    assert _growth("mapped") < 4.0  # MB left resident after 80 freed buffers of 8-32 MB
