"""Wire format: multipart ``[topic, header, *buffers]``.

``topic`` is the message type name (ASCII), ``header`` the msgpack encoding of the message with
every ndarray replaced by ``{"nd": index, "dtype": str, "shape": [...]}``, and each ndarray's
bytes follow as its own frame, sent without a copy. Decoding validates the type tag, every
field's type, unknown fields, array dtypes/shapes against buffer sizes, and size limits; any
violation raises ``ProtocolError`` naming the problem. No pickle anywhere.

Buffer ownership: after ``encode`` the caller must not mutate the arrays until the send has
completed (zero-copy). Arrays produced by ``decode`` are read-only views of the received frames.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from typing import Any

import msgspec
import numpy as np

from omnistream.protocol.messages import AnyMessage, Error, Message

ALLOWED_DTYPES = frozenset(
    np.dtype(name).str
    for name in (
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
    )
)
DEFAULT_MAX_HEADER_BYTES = 1 << 20
DEFAULT_MAX_MESSAGE_BYTES = 64 << 20


class ProtocolError(ValueError):
    """A message that cannot be accepted. ``code`` is stable; ``str(self)`` explains why."""

    def __init__(self, code: str, message: str):
        super().__init__(message)
        self.code = code

    def to_error(self, request_id: str = "") -> Error:
        return Error(code=self.code, message=str(self), request_id=request_id)


_decode_state = threading.local()


def _enc_hook(obj: Any) -> Any:
    if isinstance(obj, np.ndarray):
        buffers: list = _decode_state.out_buffers
        if obj.dtype.str not in ALLOWED_DTYPES:
            raise ProtocolError("bad_dtype", f"dtype {obj.dtype} cannot be sent")
        contiguous = np.ascontiguousarray(obj)
        buffers.append(contiguous.data if contiguous.size else b"")
        return {"nd": len(buffers) - 1, "dtype": contiguous.dtype.str, "shape": list(obj.shape)}
    if isinstance(obj, np.generic):
        return obj.item()
    raise NotImplementedError(f"cannot encode {type(obj).__name__}")


def _dec_hook(expected_type: type, obj: Any) -> Any:
    if expected_type is np.ndarray:
        return _array_from_frame(obj)
    raise NotImplementedError(f"cannot decode {expected_type}")


def _array_from_frame(obj: Any) -> np.ndarray:
    if not isinstance(obj, dict) or set(obj) != {"nd", "dtype", "shape"}:
        raise ValueError("array reference must be {nd, dtype, shape}")
    frames: Sequence = _decode_state.in_buffers
    index, dtype_str, shape = obj["nd"], obj["dtype"], obj["shape"]
    if not isinstance(index, int) or not 0 <= index < len(frames):
        raise ValueError(f"array buffer index {index!r} out of range ({len(frames)} buffers)")
    if dtype_str not in ALLOWED_DTYPES:
        raise ValueError(f"array dtype {dtype_str!r} not allowed")
    if not isinstance(shape, list) or not all(isinstance(d, int) and d >= 0 for d in shape):
        raise ValueError(f"array shape {shape!r} must be a list of non-negative ints")
    dtype = np.dtype(dtype_str)
    buffer = frames[index]
    expected = int(np.prod(shape, dtype=np.int64)) * dtype.itemsize
    if expected != len(buffer):
        raise ValueError(f"array of shape {shape} {dtype} needs {expected} bytes, buffer has {len(buffer)}")
    return np.frombuffer(buffer, dtype=dtype).reshape(shape)


_encoder = msgspec.msgpack.Encoder(enc_hook=_enc_hook)
_decoder = msgspec.msgpack.Decoder(AnyMessage, dec_hook=_dec_hook)


def topic_of(message: Message) -> bytes:
    return type(message).__name__.encode()


def encode(message: Message) -> list:
    """Encode to frames ``[topic, header, *buffers]`` (buffers are zero-copy memoryviews)."""
    _decode_state.out_buffers = []
    try:
        header = _encoder.encode(message)
        return [topic_of(message), header, *_decode_state.out_buffers]
    finally:
        _decode_state.out_buffers = None


def _byte_view(frame: Any) -> memoryview:
    """zmq.Frame, bytes or any buffer -> a flat memoryview of unsigned bytes (len == nbytes)."""
    buffer = getattr(frame, "buffer", None)
    view = memoryview(buffer if buffer is not None else frame)
    if view.format != "B" or view.ndim != 1:
        view = view.cast("B") if view.nbytes else memoryview(b"")
    return view


def decode(
    frames: Sequence[Any],
    *,
    max_header_bytes: int = DEFAULT_MAX_HEADER_BYTES,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
) -> Message:
    """Decode ``[topic, header, *buffers]``; raises ``ProtocolError`` naming the problem."""
    if len(frames) < 2:
        raise ProtocolError("malformed", f"expected [topic, header, *buffers], got {len(frames)} frame(s)")
    parts = [_byte_view(f) for f in frames]
    total = sum(p.nbytes for p in parts)
    if total > max_message_bytes:
        raise ProtocolError("too_large", f"message of {total} bytes exceeds limit {max_message_bytes}")
    if parts[1].nbytes > max_header_bytes:
        raise ProtocolError(
            "too_large", f"header of {parts[1].nbytes} bytes exceeds limit {max_header_bytes}"
        )
    topic = bytes(parts[0]).decode("ascii", "replace")
    _decode_state.in_buffers = parts[2:]
    try:
        message = _decoder.decode(parts[1])
    except msgspec.ValidationError as exc:
        raise ProtocolError("invalid", f"{topic}: {exc}") from None
    except msgspec.DecodeError as exc:
        raise ProtocolError("malformed", f"{topic}: header is not valid msgpack: {exc}") from None
    except UnicodeDecodeError as exc:  # a msgpack str that is not UTF-8 (found by the fuzz test)
        raise ProtocolError("malformed", f"{topic}: header holds a string that is not UTF-8: {exc}") from None
    except RecursionError:
        raise ProtocolError("malformed", f"{topic}: header nested too deeply") from None
    finally:
        _decode_state.in_buffers = None
    if type(message).__name__ != topic:
        raise ProtocolError(
            "topic_mismatch", f"topic {topic!r} does not match message type {type(message).__name__!r}"
        )
    return message
