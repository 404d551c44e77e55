"""Logging for the worker processes: stdlib ``logging``, %-style, configured in one place."""

from __future__ import annotations

import logging
import sys
from enum import StrEnum

LOG_FORMAT = "%(asctime)s %(levelname)-7s {tag}%(name)s: %(message)s"
QUIET_LOGGERS = ("asyncio",)


class LogLevel(StrEnum):
    DEBUG = "debug"
    INFO = "info"
    WARNING = "warning"
    ERROR = "error"


def configure_logging(level: LogLevel = LogLevel.INFO, *, tag: str = "") -> None:
    """Send every record to stderr, one line each, tagged with the pool when given.

    The tag tells the pools apart when ``runslot dev`` runs them side by side in one terminal.
    """
    handler = logging.StreamHandler(sys.stderr)
    prefix = f"[{tag}] " if tag else ""
    handler.setFormatter(logging.Formatter(LOG_FORMAT.format(tag=prefix.replace("%", "%%"))))
    root = logging.getLogger()
    for old in root.handlers[:]:
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(level.value.upper())
    for name in QUIET_LOGGERS:
        logging.getLogger(name).setLevel(max(root.level, logging.WARNING))
