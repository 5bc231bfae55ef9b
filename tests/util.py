"""Helpers the tests share (fixtures live in conftest.py)."""

from __future__ import annotations

import socket
import time
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

T = TypeVar("T")


def wait_until(
    predicate: Callable[[], T],
    timeout: float,
    what: str | Callable[[], object],
    *,
    every: Callable[[], object] | None = None,
    interval: float = 0.05,
) -> T:
    """Check ``predicate`` until it returns something true, and return that. Between checks,
    call ``every`` (re-send a probe, tick a stage, feed silence), then sleep ``interval`` s.
    After ``timeout`` s the test fails, saying what it waited for (``what``, or what calling
    it returns: the messages seen so far, say)."""
    deadline = time.monotonic() + timeout
    while True:
        result = predicate()
        if result:
            return result
        if time.monotonic() >= deadline:
            detail = what() if callable(what) else what
            raise AssertionError(f"waited {timeout:g} s for {detail}")
        if every is not None:
            every()
        if interval:
            time.sleep(interval)


def free_port_pair() -> int:
    """A tcp port p with p + 1 also free (the gateway's ROUTER and PUB)."""
    for _ in range(50):
        with socket.socket() as a:
            a.bind(("0.0.0.0", 0))
            port = a.getsockname()[1]
            with socket.socket() as b:
                try:
                    b.bind(("0.0.0.0", port + 1))
                except OSError:
                    continue
            return port
    raise RuntimeError("no free port pair")


def curve_settings(keys_dir: Path, *clients: str) -> dict[str, object]:
    """CURVE keys for the server and each authorised client (``generate_keys``), and the config
    values that serve the gateway beyond loopback with them on a free port pair."""
    from omnistream.protocol.security import generate_keys

    for client in clients:
        generate_keys(keys_dir, client=client)
    return {"gateway.host": "0.0.0.0", "gateway.port": free_port_pair(), "gateway.keys_dir": str(keys_dir)}
