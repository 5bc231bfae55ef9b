"""The system runner the commands and benchmarks share: attach to the running system, or start
one (supervised by a thread, as ``omnistream up`` supervises) for the duration of a block."""

from __future__ import annotations

import tempfile
from collections.abc import Iterator
from contextlib import contextmanager, nullcontext
from pathlib import Path

from rich.console import Console

from omnistream.protocol.config import Config

console = Console(stderr=True)


@contextmanager
def running_system(config: Config, run_dir: Path | None, quiet: bool = False) -> Iterator[Path]:
    """Attach to the system running in ``run_dir`` (without one: the system that holds
    ``config``'s data directory, or the one in the default run directory), or start one for the
    duration of the block. A system started here is supervised as ``omnistream up`` supervises
    (restarts, heartbeats) by a thread, and stopped the same ordered way at the end."""
    from omnistream.app.launcher import Launcher, live_run_dir

    attach = live_run_dir(config, run_dir)
    if attach is not None:
        if not quiet:
            console.log(f"attached to the system running in {attach}")
        yield attach
        return
    from omnistream.app.models import prepare_llm_cache

    if "reasoning" in config.stages:
        prepare_llm_cache(config, progress=not quiet)
    owned = run_dir or Path(tempfile.mkdtemp(prefix="omnistream-"))
    launcher = Launcher(config, owned, on_event=None if quiet else lambda text: console.log(text))
    try:
        with (
            console.status("starting stages (loading models)…", spinner="dots")
            if not quiet
            else nullcontext()
        ):
            launcher.start()
    except BaseException:
        launcher.shutdown()
        raise
    supervisor = launcher.supervise_in_thread()
    try:
        yield owned
    finally:
        supervisor.stop()
