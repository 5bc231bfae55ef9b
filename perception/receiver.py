"""Frames from the media bus, drained continuously in a thread of their own.

The runtime's main loop only reads its sockets between two encodes; while an encode runs (or the
process is starved of CPU) frames wait in ZeroMQ's queues: the SUB's, the bus's and the
publisher's, each ``frame_hwm`` deep, so the newest frame read after a slow encode could be
half a second old. This thread keeps those queues empty and hands every frame to ``on_frame``
(the stage's latest-wins ``FrameSlot``), so the encoder always gets the newest frame. Decoding a
frame is cheap (its pixels stay in the received buffer) and torch releases the GIL while it
encodes, so the thread runs alongside.
"""

from __future__ import annotations

import threading
from collections.abc import Callable

import zmq

from omnistream.protocol.codec import ProtocolError
from omnistream.protocol.messages import Error, VideoFrame
from omnistream.protocol.sockets import make_socket, recv


class MediaReceiver:
    """SUB on ``address`` for ``VideoFrame``; ``on_frame`` raising ``ValueError`` (a bad frame)
    or an undecodable message becomes an ``Error`` passed to ``on_error``; the thread goes on."""

    def __init__(
        self,
        ctx: zmq.Context,
        address: str,
        on_frame: Callable[[VideoFrame], None],
        on_error: Callable[[Error], None],
        hwm: int = 4,
        max_message_bytes: int = 64 << 20,
    ):
        self.ctx, self.address, self.hwm, self.max_message_bytes = ctx, address, hwm, max_message_bytes
        self.on_frame = on_frame
        self.on_error = on_error
        self.received = 0
        self._stop = threading.Event()
        self._connected = threading.Event()
        self._thread = threading.Thread(target=self._run, name="media receiver", daemon=True)

    def start(self) -> MediaReceiver:
        self._thread.start()
        self._connected.wait(5.0)
        return self

    def _run(self) -> None:
        # The socket is made, used and closed by this thread only (ZeroMQ sockets are not thread-safe).
        sock = make_socket(self.ctx, zmq.SUB, hwm=self.hwm, max_message_bytes=self.max_message_bytes)
        sock.connect(self.address)
        sock.setsockopt(zmq.SUBSCRIBE, VideoFrame.__name__.encode())
        self._connected.set()
        try:
            while not self._stop.is_set():
                if not sock.poll(100):
                    continue
                while True:
                    try:
                        _, message = recv(sock, flags=zmq.NOBLOCK)
                    except zmq.Again:
                        break
                    except ProtocolError as exc:
                        self.on_error(exc.to_error())
                        continue
                    if not isinstance(message, VideoFrame):
                        continue
                    self.received += 1
                    try:
                        self.on_frame(message)
                    except ValueError as exc:
                        self.on_error(
                            Error(code="invalid", message=f"perception: {exc}", session=message.session)
                        )
        finally:
            sock.close(linger=0)

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=5.0)
