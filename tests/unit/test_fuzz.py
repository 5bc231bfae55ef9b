"""Hostile and broken input: 100k+ fuzzed protocol messages, corrupt media files, absurd sizes and
rates. Every case must end in a decoded message or a clear ``ProtocolError``/``MediaError`` (never
another exception, never a hang); a live gateway keeps serving through all of it in
tests/integration/test_fuzz_gateway.py.

The protocol fuzz is a seeded mutation loop over valid encoded messages of every type (byte
flips, truncation, junk, frame drops/duplicates/swaps, wrong topics, fields replaced by values of
other msgpack types, huge and negative numbers, odd strings, forged array references), plus
hypothesis for structure (random msgpack maps tagged with real message types). Set
``OMNISTREAM_FUZZ_CASES`` to run more.
"""

from __future__ import annotations

import os
import random
import time
from pathlib import Path

import msgspec
import numpy as np
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from omnistream.app.replay import DEFAULT_SAMPLE
from omnistream.perception.sources import MediaError, MediaReader
from omnistream.protocol.codec import ProtocolError, decode, encode
from omnistream.protocol.messages import (
    MESSAGE_TYPES,
    Ask,
    AudioChunk,
    AudioOut,
    Clip,
    Error,
    History,
    HistoryRequest,
    Interrupt,
    KVBlock,
    Label,
    MemoryRecord,
    Percept,
    Stats,
    Status,
    StatusRequest,
    Transcript,
    VideoFrame,
    Watch,
)

CASES = int(os.environ.get("OMNISTREAM_FUZZ_CASES", "100000"))
SEED = 20261126


def corpus() -> list[list[bytes]]:
    rng = np.random.default_rng(0)
    messages = [
        VideoFrame(ts=1.5, image=rng.integers(0, 255, (6, 8, 3), dtype=np.uint8), index=3),
        AudioChunk(ts=2.0, pcm=rng.standard_normal(320).astype(np.float32), channel="user"),
        AudioChunk(ts=2.0, pcm=np.arange(100, dtype=np.int16), sample_rate=8000),
        AudioOut(turn="t", pcm=np.zeros(48, np.float32), seq=2, final=True),
        AudioOut(turn="t", flush=True),
        Percept(
            features=np.ones(16, np.float32), labels=[Label("monarch", 0.9, "butterfly")], text_seen=["LINUX"]
        ),
        Clip(
            clip_id=4, t0=1.0, ts=3.0, features=np.ones(8, np.float32), description="a butterfly", n_frames=7
        ),
        Transcript(t0=0.5, ts=1.5, text="hello there", speaker="user"),
        Ask(turn="a1", question="What is on screen?", choices=["A a cat", "B a dog"], speak=False),
        Interrupt(turn="a1", reason="barge-in"),
        Watch(watch_id="w1", condition="tell me when a person enters"),
        HistoryRequest(request_id="h1", t0=0.0, t1=30.0, kinds=["clip"], limit=10),
        History(request_id="h1", items=[MemoryRecord(kind="clip", t0=0.0, t1=1.0, text="x", item_id=3)]),
        KVBlock(
            block_id=1,
            t0=0.0,
            keys=np.zeros((2, 1, 3, 4), np.float16),
            values=np.ones((2, 1, 3, 4), np.float16),
        ),
        Stats(stage="gateway", pid=5, counters={"a": 1.0}, rates={"a": 0.5}),
        Status(request_id="s", stages={"gateway": Stats(stage="gateway")}),
        StatusRequest(request_id="s1"),
        Error(code="invalid", message="bad", request_id="r"),
    ]
    return [[bytes(f) for f in encode(m)] for m in messages]


ODD_VALUES = [
    None,
    True,
    -1,
    0,
    2**63 - 1,
    -(2**63),
    2**64 - 1,
    1e308,
    float("nan"),
    float("inf"),
    -0.0,
    "",
    "x" * 5000,
    "\x00\x01\x7f",
    "\ud7ff\ue000\U0010ffff",
    "e\u0301\u202e\u200b",
    b"\xff\xfe",
    [],
    [1, "a", None],
    {},
    {"nd": 0, "dtype": "<f4", "shape": [2**40]},
    {"nd": 99, "dtype": "|u1", "shape": [1]},
    {"nd": 0, "dtype": "|O", "shape": [1]},
    {"nd": 0, "dtype": "<f4", "shape": [-1]},
    {"nd": -1, "dtype": "<f4", "shape": []},
    {"nd": 0, "dtype": "<f4", "shape": "3"},
    {"a": {"b": {"c": [[[]]]}}},
]


def mutate(frames: list[bytes], rng: random.Random) -> list[bytes]:
    frames = list(frames)
    for _ in range(rng.randint(1, 3)):
        op = rng.randrange(12)
        if op == 0 and len(frames) > 1 and frames[1]:  # flip bytes in the header
            header = bytearray(frames[1])
            for _ in range(rng.randint(1, 4)):
                header[rng.randrange(len(header))] = rng.randrange(256)
            frames[1] = bytes(header)
        elif op == 1 and len(frames) > 1:  # truncate the header
            frames[1] = frames[1][: rng.randrange(len(frames[1]) + 1)]
        elif op == 2 and len(frames) > 1:  # junk appended or prepended
            junk = rng.randbytes(rng.randint(1, 16))
            frames[1] = frames[1] + junk if rng.random() < 0.5 else junk + frames[1]
        elif op == 3:  # drop, duplicate or swap frames
            if frames and rng.random() < 0.4:
                del frames[rng.randrange(len(frames))]
            elif frames and rng.random() < 0.5:
                frames.insert(rng.randrange(len(frames) + 1), rng.choice(frames))
            elif len(frames) > 1:
                i, j = rng.randrange(len(frames)), rng.randrange(len(frames))
                frames[i], frames[j] = frames[j], frames[i]
        elif op == 4 and frames:  # another topic
            frames[0] = rng.choice([*MESSAGE_TYPES, "Nope", "", "\xff"]).encode("utf-8", "replace")
        elif op == 5 and len(frames) > 2:  # buffer truncated or extended
            k = rng.randrange(2, len(frames))
            frames[k] = frames[k][: rng.randrange(len(frames[k]) + 1)] + rng.randbytes(rng.randrange(3))
        elif op == 6:  # random bytes as a header
            frames = [frames[0] if frames else b"Ask", rng.randbytes(rng.randint(0, 64)), *frames[2:]]
        elif op in (7, 8, 9, 10) and len(frames) > 1:  # structural: a field of the wrong kind
            try:
                header = msgspec.msgpack.decode(frames[1])
            except (msgspec.DecodeError, UnicodeDecodeError, RecursionError):
                continue
            if not isinstance(header, dict) or not header:
                continue
            key = rng.choice(list(header))
            if op == 7:
                header[key] = rng.choice(ODD_VALUES)
            elif op == 8:
                header[rng.choice(["x", "nd", "type", "__class__", key + "_"])] = rng.choice(ODD_VALUES)
            elif op == 9:
                header.pop(key)
            else:
                header["type"] = rng.choice([*MESSAGE_TYPES, 7, None, ""])
            try:
                frames[1] = msgspec.msgpack.encode(header)
            except (TypeError, OverflowError, ValueError):
                continue
        elif op == 11:  # deep nesting / huge containers declared in msgpack
            frames = [frames[0] if frames else b"Ask", b"\x91" * rng.randint(1, 2000) + b"\xc0", *frames[2:]]
    return frames


def check(frames: list[bytes]) -> str | None:
    """None if the decoder behaved (a message or a ProtocolError), else what went wrong."""
    try:
        message = decode(frames)
    except ProtocolError as exc:
        if not exc.code or not str(exc):
            return f"ProtocolError without code or text for {frames!r:.200}"
        return None
    except Exception as exc:  # noqa: BLE001 - exactly what the fuzz looks for
        return f"{type(exc).__name__}: {exc} for {frames!r:.300}"
    try:  # anything accepted must encode again (no half-valid objects)
        again = decode([bytes(f) for f in encode(message)])
    except Exception as exc:  # noqa: BLE001
        return f"accepted but does not round-trip: {type(exc).__name__}: {exc} for {frames!r:.300}"
    if type(again) is not type(message):
        return f"round trip changed the type for {frames!r:.200}"
    return None


def test_decoder_survives_100k_mutated_messages() -> None:
    rng = random.Random(SEED)
    base = corpus()
    outcomes = {"decoded": 0, "rejected": 0}
    failures: list[str] = []
    start = time.monotonic()
    for _ in range(CASES):
        frames = mutate(rng.choice(base), rng)
        problem = check(frames)
        if problem:
            failures.append(problem)
            if len(failures) >= 5:
                break
        else:
            try:
                decode(frames)
                outcomes["decoded"] += 1
            except ProtocolError:
                outcomes["rejected"] += 1
    elapsed = time.monotonic() - start
    assert not failures, failures
    assert sum(outcomes.values()) == CASES
    # Both outcomes occur: the mutations are neither all harmless nor all fatal.
    assert outcomes["rejected"] > CASES // 4 and outcomes["decoded"] > CASES // 50, outcomes
    print(f"fuzz: {CASES} cases in {elapsed:.1f} s: {outcomes}")


msgpack_leaf = st.one_of(
    st.none(),
    st.booleans(),
    st.integers(min_value=-(2**63), max_value=2**64 - 1),
    st.floats(allow_nan=True, allow_infinity=True),
    st.text(max_size=40),
    st.binary(max_size=40),
)
msgpack_value = st.recursive(
    msgpack_leaf,
    lambda inner: st.lists(inner, max_size=5) | st.dictionaries(st.text(max_size=8), inner, max_size=5),
    max_leaves=20,
)
FIELD_NAMES = sorted(
    {f for t in MESSAGE_TYPES.values() for f in t.__struct_fields__} | {"nd", "dtype", "shape"}
)


@settings(max_examples=400, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(
    type_name=st.sampled_from(sorted(MESSAGE_TYPES)),
    fields=st.dictionaries(st.sampled_from(FIELD_NAMES), msgpack_value, max_size=8),
    buffers=st.lists(st.binary(max_size=64), max_size=3),
    topic_matches=st.booleans(),
)
def test_decoder_on_structured_random_messages(type_name, fields, buffers, topic_matches) -> None:
    header = msgspec.msgpack.encode({"type": type_name, **fields})
    topic = type_name if topic_matches else "Ask"
    assert check([topic.encode(), header, *buffers]) is None


def _media_cases(tmp: Path) -> dict[str, Path]:
    data = DEFAULT_SAMPLE.read_bytes()
    rng = random.Random(SEED)
    cases: dict[str, Path] = {}

    def put(name: str, content: bytes) -> None:
        path = tmp / name
        path.write_bytes(content)
        cases[name] = path

    put("empty.mp4", b"")
    put("text.mp4", b"this is not a video\n" * 50)
    put("random.mkv", rng.randbytes(200_000))
    for cut in (100, 4096, len(data) // 3, len(data) - 1000):
        put(f"truncated-{cut}.mkv", data[:cut])
    flipped = bytearray(data)
    for _ in range(300):
        flipped[rng.randrange(2000, len(flipped))] = rng.randrange(256)
    put("bitflipped.mkv", bytes(flipped))
    header_only = bytearray(data[: len(data) // 2])
    header_only[len(header_only) // 2 :] = rng.randbytes(len(header_only) - len(header_only) // 2)
    put("half-garbage.mkv", bytes(header_only))
    # A WAV whose header claims absurd sample rates and sizes.
    import struct

    for rate in (1, 4_000_000_000):
        fmt = struct.pack("<4sIHHIIHH", b"fmt ", 16, 1, 1, rate, rate * 2 % 2**32, 2, 16)
        body = struct.pack("<4sI", b"data", 0xFFFFFFF0) + b"\0" * 1000
        put(f"rate-{rate}.wav", b"RIFF" + struct.pack("<I", 0xFFFFFFF0) + b"WAVE" + fmt + body)
    put("png.mp4", b"\x89PNG\r\n\x1a\n" + rng.randbytes(500))
    (tmp / "a-directory.mp4").mkdir()
    cases["a-directory.mp4"] = tmp / "a-directory.mp4"
    cases["missing.mp4"] = tmp / "missing.mp4"
    return cases


def test_corrupt_media_files_give_clear_errors(tmp_path: Path) -> None:
    outcomes = {}
    for name, path in _media_cases(tmp_path).items():
        start = time.monotonic()
        try:
            events = 0
            for event in MediaReader(path, max_fps=10):
                if event.kind == "video":
                    assert event.data.dtype == np.uint8 and event.data.ndim == 3 and event.data.shape[2] == 3
                else:
                    assert event.data.ndim == 1 and np.isfinite(event.data).all()
                events += 1
            outcomes[name] = f"read {events} events"
        except MediaError as exc:
            assert str(path.name) in str(exc), exc  # names the file
            outcomes[name] = f"MediaError: {exc}"
        assert time.monotonic() - start < 30, f"{name} took too long"
    errors = [n for n, o in outcomes.items() if o.startswith("MediaError")]
    for name in ("empty.mp4", "text.mp4", "random.mkv", "missing.mp4", "a-directory.mp4", "png.mp4"):
        assert name in errors, outcomes
    assert len(errors) >= 8, outcomes
