"""One error type for everything a user can get wrong, with messages that say what was expected."""

from __future__ import annotations

import difflib
from collections.abc import Iterable


class SpliceError(Exception):
    """Raised for any invalid site, selection, value, file or lifecycle misuse in splice.

    splice checks input at the earliest point it can be known (a bad key or value at the `with`
    line or the assignment, a bad file at its line, an edit whose module never ran at the end of
    that forward) and raises this one type, with a message naming what was wrong and what was
    expected, so a single `except splice.SpliceError` catches every user mistake and nothing else.

    Example:
        >>> import splice
        >>> splice.Zero(heads=[1, 1])  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: heads [1, 1] lists 1 twice: ...
    """


def closest(name: str, candidates: Iterable[str], n: int = 5) -> list[str]:
    """The valid names nearest to a misspelt one, for "did you mean" hints in error messages.

    Args:
        name: The name the user wrote.
        candidates: Every valid name.
        n: At most this many suggestions (default 5).

    Returns:
        Up to `n` candidates, closest first; when none is similar, those sharing the last
        dot-separated component (`resid_post`, `q`, ...); possibly empty.

    Example:
        >>> closest("blocks.1.resid_pots", ["blocks.1.resid_post", "embed"])
        ['blocks.1.resid_post']
    """
    candidates = list(candidates)
    found = difflib.get_close_matches(name, candidates, n=n, cutoff=0.5)
    if not found:
        # Fall back to names sharing the last component ("resid_post", "q", ...).
        tail = name.rsplit(".", 1)[-1]
        found = [c for c in candidates if c.endswith("." + tail) or c == tail][:n]
    return found


def valid_range(size: int) -> str:
    """The valid indices of an axis, as error messages state them.

    Args:
        size: Length of the axis (0 or more).

    Returns:
        `'0..n-1 (or -n..-1)'`, or a note that the axis is empty.

    Example:
        >>> valid_range(4)
        '0..3 (or -4..-1)'
    """
    return f"0..{size - 1} (or -{size}..-1)" if size > 0 else "none (the axis is empty)"
