"""The one exception type users see: the CLI prints its message as one line and exits with status 2."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class CriticalityError(Exception):
    """A problem with the user's input (names, files, options), explained in one line."""


def unknown_name(kind: str, name: str, known: Iterable[str]) -> CriticalityError:
    """An error for an unknown ``kind`` called ``name``, suggesting close matches among ``known``."""
    known = list(known)
    close = difflib.get_close_matches(name, known, n=3, cutoff=0.5)
    hint = f"; did you mean {' or '.join(repr(c) for c in close)}?" if close else ""
    return CriticalityError(f"unknown {kind} {name!r}{hint} (known: {', '.join(known)})")
