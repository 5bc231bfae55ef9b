"""Structured logging: one JSON object per line, quiet by default.

``OMNISTREAM_LOG_LEVEL`` sets the level (default WARNING on a terminal, INFO in stage processes,
whose stderr goes to a log file, see ``Config.log_dir``). Extra fields given with ``extra=`` appear
as keys.

``OMNISTREAM_LOG_FILE`` (the launcher sets it for each stage) sends the log lines to that file
instead, rotated at ``OMNISTREAM_LOG_MAX_BYTES`` (``launcher.log_max_bytes``; 0: never) with
``OMNISTREAM_LOG_BACKUPS`` old files kept (``<file>.1`` the newest). A stage's stdout and stderr
are that same file (tracebacks, native libraries' output): at each rotation they are moved to the
new file too, so nothing keeps growing the old one.
"""

from __future__ import annotations

import contextlib
import json
import logging
import logging.handlers
import os
import sys
import time
from pathlib import Path

_STANDARD = set(vars(logging.LogRecord("", 0, "", 0, "", None, None))) | {"message", "asctime"}


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "ts": round(record.created, 3),
            "time": time.strftime("%H:%M:%S", time.localtime(record.created)),
            "level": record.levelname.lower(),
            "logger": record.name,
            "msg": record.getMessage(),
        }
        entry.update({k: v for k, v in vars(record).items() if k not in _STANDARD})
        if record.exc_info:
            entry["exc"] = self.formatException(record.exc_info)
        return json.dumps(entry, default=str)


def rotate_file(path: Path, backups: int) -> None:
    """``path`` becomes ``path.1`` (``.1`` becomes ``.2``, ...; the oldest beyond ``backups`` goes)."""
    path = Path(path)
    if backups <= 0:
        path.unlink(missing_ok=True)
        return
    for index in range(backups - 1, 0, -1):
        older = path.with_name(f"{path.name}.{index}")
        if older.exists():
            os.replace(older, path.with_name(f"{path.name}.{index + 1}"))
    if path.exists():
        os.replace(path, path.with_name(f"{path.name}.1"))


def rotate_if_full(path: Path, max_bytes: int, backups: int) -> bool:
    """Rotate ``path`` when it holds ``max_bytes`` or more (the launcher, before a stage starts)."""
    try:
        full = max_bytes > 0 and Path(path).stat().st_size >= max_bytes
    except FileNotFoundError:
        return False
    if full:
        rotate_file(path, max(backups, 1))
    return full


class RotatingLog(logging.handlers.RotatingFileHandler):
    """A size-rotated log file that also carries the process's stdout and stderr along when they
    are that file (a stage's, redirected by the launcher): after a rotation they point at the new
    file, so output that bypasses logging (tracebacks, native code) is bounded as well."""

    def _same_file(self, fd: int) -> bool:
        try:
            ours, theirs = os.fstat(self.stream.fileno()), os.fstat(fd)
        except (OSError, AttributeError, ValueError):
            return False
        return (ours.st_dev, ours.st_ino) == (theirs.st_dev, theirs.st_ino)

    def doRollover(self) -> None:
        carried = [fd for fd in (1, 2) if self.stream is not None and self._same_file(fd)]
        for stream in (sys.stdout, sys.stderr):
            with contextlib.suppress(OSError, ValueError, AttributeError):
                stream.flush()
        super().doRollover()
        if self.stream is None:
            self.stream = self._open()
        for fd in carried:
            os.dup2(self.stream.fileno(), fd)


def log_handler() -> logging.Handler:
    """Rotated ``$OMNISTREAM_LOG_FILE`` when set, else stderr."""
    path = os.environ.get("OMNISTREAM_LOG_FILE")
    if not path:
        return logging.StreamHandler(sys.stderr)
    max_bytes = int(os.environ.get("OMNISTREAM_LOG_MAX_BYTES", str(10 << 20)))
    backups = int(os.environ.get("OMNISTREAM_LOG_BACKUPS", "3"))
    Path(path).parent.mkdir(parents=True, exist_ok=True, mode=0o700)
    return RotatingLog(path, maxBytes=max(max_bytes, 0), backupCount=max(backups, 1))


def setup_logging(default_level: str = "WARNING") -> None:
    level = os.environ.get("OMNISTREAM_LOG_LEVEL", default_level).upper()
    handler = log_handler()
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "faster_whisper", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
