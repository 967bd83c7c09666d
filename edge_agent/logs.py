"""Log output of the agent: plain text lines for people, or one JSON object per line for collectors."""
from __future__ import annotations

import datetime as dt
import json
import logging
import sys


class JsonLinesFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": dt.datetime.fromtimestamp(record.created, dt.timezone.utc).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "pid": record.process,
        }
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry, ensure_ascii=False)


def setup_logging(log_format: str = "plain", level: str = "INFO", stream=None) -> None:
    """Route the ``edge_agent`` loggers to ``stream`` (stderr, which systemd's journal collects)."""
    handler = logging.StreamHandler(stream or sys.stderr)
    if log_format == "json":
        handler.setFormatter(JsonLinesFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s"))
    logger = logging.getLogger("edge_agent")
    logger.handlers[:] = [handler]
    logger.setLevel(level.upper())
    logger.propagate = False
