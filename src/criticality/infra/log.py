"""How the library's log messages reach a terminal: the CLI's handler on the ``criticality`` logger.

Library code never prints; it logs to ``logging.getLogger(__name__)`` (a child of ``criticality``). A
notebook or a user's script sees those messages through its own logging setup; the CLI wraps a command
in :func:`to_stderr`, which shows INFO messages as the bare message on stderr and WARNING or worse as
``criticality: warning: <msg>``, from rank 0 only under torchrun (like the CLI's error lines).
"""

from __future__ import annotations

import contextlib
import logging
import os
import sys
from collections.abc import Iterator

__all__ = ["to_stderr"]

ROOT = "criticality"


class _Stderr(logging.Handler):
    """Writes to whatever ``sys.stderr`` is at the time of the message (tests swap it)."""

    def emit(self, record: logging.LogRecord) -> None:
        try:
            sys.stderr.write(self.format(record) + "\n")
            sys.stderr.flush()
        except Exception:  # noqa: BLE001 - logging's own rule: a failing handler reports, never raises
            self.handleError(record)


class _Plain(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        message = record.getMessage()
        if record.levelno >= logging.WARNING:
            return f"{ROOT}: {record.levelname.lower()}: {message}"
        return message


@contextlib.contextmanager
def to_stderr(level: int = logging.INFO) -> Iterator[logging.Handler]:
    """For the ``with`` block: messages of ``level`` and above from the ``criticality`` loggers on stderr
    (rank 0 only); the logger's level, handlers and propagation are restored afterwards."""
    logger = logging.getLogger(ROOT)
    handler = _Stderr(level)
    handler.setFormatter(_Plain())
    handler.addFilter(lambda record: os.environ.get("RANK", "0") == "0")
    saved = logger.level, logger.propagate
    logger.addHandler(handler)
    logger.setLevel(level)
    logger.propagate = False  # shown once, not again by a root handler a caller installed
    try:
        yield handler
    finally:
        logger.removeHandler(handler)
        logger.setLevel(saved[0])
        logger.propagate = saved[1]
