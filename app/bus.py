"""The bus process: two XSUB/XPUB forwarders.

The main bus carries control and data messages with queues of ``bus.hwm`` messages per
subscriber (never dropped while the subscriber keeps up; a subscriber that stops reading loses
what comes beyond them instead of the bus growing without bound); the media bus carries frames
with queues of ``frame_hwm`` messages, so a slow subscriber loses old frames instead of buffering
them. Every message is at most ``bus.max_message_bytes``.
"""

from __future__ import annotations

import argparse
import os
import signal
import threading
from pathlib import Path

import zmq

from omnistream.protocol.config import read_config
from omnistream.protocol.messages import Ready
from omnistream.protocol.sockets import Addresses, make_socket, send


def _bind_pair(
    ctx: zmq.Context, bind_in: str, bind_out: str, hwm: int, max_bytes: int
) -> tuple[zmq.Socket, zmq.Socket]:
    xsub = make_socket(ctx, zmq.XSUB, hwm=hwm, max_message_bytes=max_bytes)
    xsub.bind(bind_in)
    xpub = make_socket(ctx, zmq.XPUB, hwm=hwm, max_message_bytes=max_bytes)
    xpub.bind(bind_out)
    return xsub, xpub


def _forward(xsub: zmq.Socket, xpub: zmq.Socket) -> None:
    """Runs in its own thread, which owns both sockets from here on."""
    try:
        zmq.proxy(xsub, xpub)
    except zmq.ContextTerminated:
        pass
    finally:
        xsub.close(linger=0)
        xpub.close(linger=0)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="omnistream-bus")
    parser.add_argument("--run-dir", type=Path, required=True)
    args = parser.parse_args(argv)
    config = read_config(args.run_dir / "config.json")
    addresses = Addresses.load(args.run_dir)
    ctx = zmq.Context()
    limit = config.bus.max_message_bytes
    pairs = [
        _bind_pair(ctx, addresses.bus_in, addresses.bus_out, config.bus.hwm, limit),
        _bind_pair(ctx, addresses.media_in, addresses.media_out, config.bus.frame_hwm, limit),
    ]
    threads = [threading.Thread(target=_forward, args=pair, daemon=True) for pair in pairs]
    for thread in threads:
        thread.start()
    stop = threading.Event()
    signal.signal(signal.SIGTERM, lambda *_: stop.set())
    signal.signal(signal.SIGINT, lambda *_: stop.set())
    control = make_socket(ctx, zmq.PUSH)
    control.connect(addresses.control)
    send(control, Ready(stage="bus", pid=os.getpid()))
    stop.wait()
    control.close(linger=0)
    ctx.term()


if __name__ == "__main__":
    main()
