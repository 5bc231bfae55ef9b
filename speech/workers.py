"""A background thread that runs jobs by priority and hands results back to the stage loop.

The stage's loop owns the sockets and must keep running VAD every few milliseconds, so ASR and
TTS (tens to hundreds of milliseconds each) run here. Results are collected with ``results()``
from the loop's thread; nothing here publishes.
"""

from __future__ import annotations

import itertools
import logging
import queue
import threading
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("omnistream.speech")


@dataclass(order=True)
class Job:
    priority: int
    order: int
    tag: Any = field(compare=False)
    run: Callable[[], Any] = field(compare=False)
    skip: Callable[[], bool] = field(compare=False)


class Worker:
    """One daemon thread; lower ``priority`` runs first, equal priorities in submission order."""

    def __init__(self, name: str):
        self._jobs: queue.PriorityQueue[Job] = queue.PriorityQueue()
        self._results: queue.SimpleQueue[tuple[Any, Any, BaseException | None]] = queue.SimpleQueue()
        self._order = itertools.count()
        self._stopping = False
        self._thread = threading.Thread(target=self._loop, name=name, daemon=True)
        self._thread.start()

    def submit(
        self,
        tag: Any,
        run: Callable[[], Any],
        priority: int = 0,
        skip: Callable[[], bool] = lambda: False,
    ) -> None:
        """Queue ``run()``; it is dropped unrun if ``skip()`` is true when its turn comes."""
        self._jobs.put(Job(priority, next(self._order), tag, run, skip))

    def results(self) -> list[tuple[Any, Any, BaseException | None]]:
        """(tag, result, error) of the jobs finished since the last call, in finishing order."""
        done = []
        while True:
            try:
                done.append(self._results.get_nowait())
            except queue.Empty:
                return done

    @property
    def idle(self) -> bool:
        return self._jobs.unfinished_tasks == 0

    def _loop(self) -> None:
        while True:
            job = self._jobs.get()
            try:
                if job.run is None:
                    return
                if not (self._stopping or job.skip()):
                    try:
                        self._results.put((job.tag, job.run(), None))
                    except Exception as exc:  # reported to the loop, which publishes an Error
                        log.exception("speech job failed")
                        self._results.put((job.tag, None, exc))
            finally:
                self._jobs.task_done()

    def stop(self, timeout_s: float = 2.0) -> None:
        """Drop the queued jobs, let the running one finish (up to ``timeout_s``), end the thread."""
        self._stopping = True
        self._jobs.put(Job(1 << 30, next(self._order), None, None, lambda: False))  # type: ignore[arg-type]
        self._thread.join(timeout_s)
