"""One error type for everything a user can get wrong, with messages that say what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpliceError(Exception):
    """Raised for any invalid site, selection, value or lifecycle misuse in splice."""


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """Nearest valid names to a misspelt one, for error messages."""
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:
        # Fall back to names sharing the last component ("resid_post", "q", ...).
        tail = name.rsplit(".", 1)[-1]
        found = [c for c in candidates if c.endswith("." + tail) or c == tail][:n]
    return found


def valid_range(size: int) -> str:
    """'0..n-1 (or -n..-1)' for an axis of the given size."""
    return f"0..{size - 1} (or -{size}..-1)" if size > 0 else "none (the axis is empty)"
