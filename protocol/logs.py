"""Structured logging: one JSON object per line, quiet by default.

``OMNISTREAM_LOG_LEVEL`` sets the level (default WARNING on a terminal, INFO in stage processes,
whose stderr goes to a log file in the run directory). Extra fields given with ``extra=`` appear
as keys.
"""

from __future__ import annotations

import json
import logging
import os
import sys
import time

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


def setup_logging(default_level: str = "WARNING") -> None:
    level = os.environ.get("OMNISTREAM_LOG_LEVEL", default_level).upper()
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter())
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
    for noisy in ("httpx", "urllib3", "faster_whisper", "transformers"):
        logging.getLogger(noisy).setLevel(max(logging.WARNING, root.level))
