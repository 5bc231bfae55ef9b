"""Addresses and socket helpers shared by the launcher, the stages and the clients.

Every internal address is an ``ipc://`` socket inside the run directory (owner-only, like the
directory): tcp ports on loopback would let every local user onto the bus with no
authentication, so ``bus.transport = "tcp"`` is refused. Only the gateway is served over tcp,
beyond loopback, with CURVE keys. The launcher writes ``addresses.json`` into the run directory
so a client only needs the directory.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import zmq

from omnistream.protocol.codec import DEFAULT_MAX_MESSAGE_BYTES, decode, encode
from omnistream.protocol.messages import Message

ENDPOINTS = ("bus_in", "bus_out", "media_in", "media_out", "control", "gateway", "gateway_pub", "memory")


@dataclass(frozen=True)
class Addresses:
    bus_in: str  # XSUB side of the bus: stages' PUB sockets connect here
    bus_out: str  # XPUB side of the bus: stages' SUB sockets connect here
    media_in: str  # XSUB side of the media bus (frames; small queues, newest wins)
    media_out: str  # XPUB side of the media bus
    control: str  # launcher PULL: READY announcements
    gateway: str  # gateway ROUTER: client requests
    gateway_pub: str  # gateway PUB: events for clients
    memory: str  # memory ROUTER: retrieval requests from reasoning
    curve: bool = False  # the gateway's two sockets need CURVE keys (served beyond loopback)

    @classmethod
    def for_run_dir(
        cls,
        run_dir: Path,
        transport: str = "ipc",
        host: str = "127.0.0.1",
        base_port: int = 47100,
        gateway_host: str = "127.0.0.1",
        gateway_port: int = 0,
    ) -> Addresses:
        """Internal endpoints are ``ipc`` paths in ``run_dir`` (``tcp`` is refused); the
        gateway's on ``gateway_host`` over tcp (and CURVE) when that is not loopback."""
        from omnistream.protocol.security import is_loopback

        if not is_loopback(host):
            raise ValueError(
                f"bus.host {host!r} is not loopback: stages talk over loopback only; "
                "serve clients on another interface with gateway.host (CURVE keys required)"
            )
        if transport == "tcp":
            raise ValueError(
                "bus.transport 'tcp' would put the internal sockets (bus, memory, control) on "
                "loopback ports that every local user can reach, with no authentication: use 'ipc' "
                "(owner-only sockets in the run directory); to serve clients on another machine set "
                "gateway.host (CURVE keys)"
            )
        if transport != "ipc":
            raise ValueError(f"unknown transport {transport!r} (expected 'ipc')")
        names = {name: f"ipc://{run_dir / name}" for name in ENDPOINTS}
        if is_loopback(gateway_host):
            return cls(**names)
        port = gateway_port or base_port + ENDPOINTS.index("gateway")
        names["gateway"] = f"tcp://{gateway_host}:{port}"
        names["gateway_pub"] = f"tcp://{gateway_host}:{port + 1}"
        return cls(**names, curve=True)

    @classmethod
    def remote(cls, endpoint: str, curve: bool | None = None) -> Addresses:
        """A client's view of a gateway at ``tcp://HOST:PORT`` (its PUB at PORT + 1); CURVE when
        ``curve``, or (None) when HOST is not loopback."""
        from omnistream.protocol.security import needs_curve

        host, _, port = endpoint.removeprefix("tcp://").rpartition(":")
        if not endpoint.startswith("tcp://") or not host or not port.isdigit():
            raise ValueError(f"gateway endpoint {endpoint!r} must be tcp://HOST:PORT")
        pub = f"tcp://{host}:{int(port) + 1}"
        unused = {name: "" for name in ENDPOINTS}
        curve = needs_curve(endpoint) if curve is None else curve
        return cls(**{**unused, "gateway": endpoint, "gateway_pub": pub}, curve=curve)

    def save(self, run_dir: Path) -> None:
        path = run_dir / "addresses.json"
        fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
        with os.fdopen(fd, "w") as out:
            out.write(json.dumps(asdict(self), indent=1))

    @classmethod
    def load(cls, run_dir: Path) -> Addresses:
        path = Path(run_dir) / "addresses.json"
        if not path.exists():
            raise FileNotFoundError(
                f"no omnistream running in {run_dir} (missing {path.name}); start it with `omnistream up`"
            )
        return cls(**json.loads(path.read_text()))


def make_socket(
    ctx: zmq.Context,
    kind: int,
    *,
    hwm: int = 1000,
    max_message_bytes: int = DEFAULT_MAX_MESSAGE_BYTES,
    **options: Any,
) -> zmq.Socket:
    """A socket with linger 0, high-water marks and a per-frame size cap set."""
    sock = ctx.socket(kind)
    sock.setsockopt(zmq.LINGER, 0)
    sock.setsockopt(zmq.SNDHWM, hwm)
    sock.setsockopt(zmq.RCVHWM, hwm)
    sock.setsockopt(zmq.MAXMSGSIZE, max_message_bytes)
    for name, value in options.items():
        sock.setsockopt(getattr(zmq, name), value)
    return sock


def send(sock: zmq.Socket, message: Message, *, prefix: list[bytes] | None = None, flags: int = 0) -> None:
    """Send zero-copy; the message's arrays must not be mutated afterwards."""
    frames = encode(message)
    sock.send_multipart([*(prefix or []), *frames], flags=flags, copy=False)


def recv(sock: zmq.Socket, *, prefix_frames: int = 0, flags: int = 0) -> tuple[list[bytes], Message]:
    """Receive and decode one message; raises ``ProtocolError`` for a bad one (already consumed)."""
    frames = sock.recv_multipart(flags=flags, copy=False)
    prefix = [f.bytes for f in frames[:prefix_frames]]
    return prefix, decode(frames[prefix_frames:])


def read_bounded(
    sock: zmq.Socket, on_message: Callable[[list[zmq.Frame]], None], max_messages: int, max_bytes: int
) -> bool:
    """Receive (without waiting) at most ``max_messages`` messages and ``max_bytes`` bytes from
    ``sock`` (at least one message, whatever its size), handing each one's frames to
    ``on_message`` as it comes; the rest wait in the socket for the next call (``bus.hwm`` deep).
    True when the byte bound stopped it (``poll_byte_limit``). The one bounded read of every
    loop: the runtime's bus, media and memory sockets, the gateway's and memory's ROUTERs."""
    taken = 0
    for _ in range(max(max_messages, 1)):
        if taken and taken >= max_bytes:
            return True
        try:
            frames = sock.recv_multipart(flags=zmq.NOBLOCK, copy=False)
        except zmq.Again:
            break
        taken += sum(len(frame) for frame in frames)
        on_message(frames)
    return False
