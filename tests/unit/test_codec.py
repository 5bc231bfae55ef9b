"""Codec: zero-copy round trips and rejection of malformed, unknown, mistyped and oversized input."""

from __future__ import annotations

import msgspec
import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from omnistream.protocol.codec import ProtocolError, decode, encode
from omnistream.protocol.messages import (
    MESSAGE_TYPES,
    Ask,
    AudioChunk,
    AudioOut,
    Clip,
    KVBlock,
    Label,
    Percept,
    VideoFrame,
)

DTYPES = [
    "bool",
    "int8",
    "uint8",
    "int16",
    "uint16",
    "int32",
    "uint32",
    "int64",
    "uint64",
    "float16",
    "float32",
    "float64",
]


def wire(message) -> list[bytes]:
    """What a socket delivers: every frame as bytes."""
    return [bytes(frame) for frame in encode(message)]


@pytest.mark.parametrize("dtype", DTYPES)
def test_array_round_trip_every_dtype(dtype: str) -> None:
    values = (np.arange(60) % 7).astype(dtype).reshape(3, 4, 5)
    message = KVBlock(block_id=1, t0=0.0, keys=values, values=values[::-1])
    back = decode(wire(message))
    assert back.keys.dtype == np.dtype(dtype)
    np.testing.assert_array_equal(back.keys, values)
    np.testing.assert_array_equal(back.values, values[::-1])


def test_non_contiguous_and_empty_arrays_round_trip() -> None:
    image = np.arange(5 * 8 * 3, dtype=np.uint8).reshape(5, 8, 3)[:, ::2]  # strided view
    assert not image.flags.c_contiguous
    back = decode(wire(VideoFrame(ts=2.5, image=image, index=7)))
    np.testing.assert_array_equal(back.image, image)
    assert (back.ts, back.index) == (2.5, 7)
    empty = decode(wire(AudioChunk(pcm=np.zeros(0, np.float32), sample_rate=16000)))
    assert empty.pcm.shape == (0,) and empty.pcm.dtype == np.float32
    zero_dim = decode(
        wire(KVBlock(block_id=0, t0=0, keys=np.array(3.5, np.float32), values=np.zeros((0, 4))))
    )
    assert zero_dim.keys.shape == () and float(zero_dim.keys) == 3.5
    assert zero_dim.values.shape == (0, 4)


def test_arrays_travel_as_separate_frames_without_copy() -> None:
    features = np.random.default_rng(0).standard_normal(1280).astype(np.float32)
    frames = encode(
        Clip(clip_id=3, t0=1.0, ts=4.0, features=features, labels=[Label("monarch (butterfly)", 0.5)])
    )
    assert frames[0] == b"Clip"
    assert len(frames) == 3
    assert isinstance(frames[2], memoryview) and np.shares_memory(
        np.frombuffer(frames[2], np.float32), features
    )
    back = decode(frames)
    assert back.labels[0].name == "monarch (butterfly)"
    np.testing.assert_array_equal(back.features, features)


def test_optional_array_and_nested_structs() -> None:
    assert decode(wire(AudioOut(turn="t", flush=True))).pcm is None
    percept = Percept(
        ts=1.0, features=np.ones(4, np.float32), labels=[Label("cab", 0.3, "car")], text_seen=["SUDOKU"]
    )
    back = decode(wire(percept))
    assert back.labels == [Label("cab", 0.3, "car")] and back.text_seen == ["SUDOKU"]


@settings(max_examples=200, deadline=None)
@given(
    question=st.text(max_size=300),
    choices=st.lists(st.text(max_size=20), max_size=4),
    ts=st.floats(allow_nan=False),
)
def test_ask_round_trips_any_text(question: str, choices: list[str], ts: float) -> None:
    ask = Ask(ts=ts, turn="t1", question=question, choices=choices)
    assert decode(wire(ask)) == ask


def header(**fields) -> bytes:
    return msgspec.msgpack.encode(fields)


@pytest.mark.parametrize(
    ("frames", "code", "mentions"),
    [
        ([b"Ask"], "malformed", "expected [topic, header"),
        ([b"Ask", b"\xc1\xff"], "malformed", "msgpack"),
        ([b"Nope", header(type="Nope")], "invalid", "Nope"),
        ([b"Ask", header(type="Ask", turn=1, question="q")], "invalid", "$.turn"),
        ([b"Ask", header(type="Ask", turn="1", question="q", bogus=1)], "invalid", "bogus"),
        ([b"Ask", header(type="Ask", turn="1")], "invalid", "question"),
        ([b"Ask", header(type="Interrupt")], "topic_mismatch", "Interrupt"),
    ],
)
def test_malformed_messages_are_rejected_naming_the_problem(frames, code, mentions) -> None:
    with pytest.raises(ProtocolError) as info:
        decode(frames)
    assert info.value.code == code
    assert mentions in str(info.value)
    error = info.value.to_error(request_id="r1")
    assert error.code == code and mentions in error.message and error.request_id == "r1"


def array_header(**array) -> bytes:
    return header(type="AudioChunk", pcm=array, sample_rate=16000)


@pytest.mark.parametrize(
    ("array", "buffers", "mentions"),
    [
        ({"nd": 0, "dtype": "<f4", "shape": [3]}, [b"\x00" * 8], "needs 12 bytes"),
        ({"nd": 1, "dtype": "<f4", "shape": [1]}, [b"\x00" * 4], "out of range"),
        ({"nd": 0, "dtype": "|O", "shape": [1]}, [b"\x00" * 8], "not allowed"),
        ({"nd": 0, "dtype": "<f4", "shape": [-1]}, [b""], "non-negative"),
        ({"nd": 0, "dtype": "<f4"}, [b""], "{nd, dtype, shape}"),
    ],
)
def test_bad_array_references_are_rejected(array, buffers, mentions) -> None:
    with pytest.raises(ProtocolError) as info:
        decode([b"AudioChunk", array_header(**array), *buffers])
    assert info.value.code == "invalid"
    assert mentions in str(info.value) and "$.pcm" in str(info.value)


def test_oversized_messages_are_rejected_before_decoding() -> None:
    frames = wire(VideoFrame(image=np.zeros((100, 100, 3), np.uint8)))
    with pytest.raises(ProtocolError) as info:
        decode(frames, max_message_bytes=10_000)
    assert info.value.code == "too_large" and "30" in str(info.value)
    with pytest.raises(ProtocolError) as info:
        decode(wire(Ask(turn="t", question="x" * 5000)), max_header_bytes=1000)
    assert info.value.code == "too_large" and "header" in str(info.value)


def test_object_arrays_cannot_be_sent() -> None:
    with pytest.raises(ProtocolError, match="cannot be sent"):
        encode(AudioChunk(pcm=np.array([object()], dtype=object)))


def test_every_message_type_is_registered_by_its_name() -> None:
    assert {"VideoFrame", "Percept", "Transcript", "Ask", "AnswerDelta", "Interrupt", "Shutdown"} <= set(
        MESSAGE_TYPES
    )
    for name, message_type in MESSAGE_TYPES.items():
        assert message_type.__name__ == name
