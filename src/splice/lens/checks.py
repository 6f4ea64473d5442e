"""Argument checks shared by the lens functions."""

from __future__ import annotations

from typing import Any

from ..errors import SpliceError


def check_int(value: Any, name: str, low: int, high: int | None = None) -> int:
    """`value` if it is an integer (not a bool) from `low` to `high`; else a SpliceError naming `name`."""
    if (
        isinstance(value, bool)
        or not isinstance(value, int)
        or value < low
        or (high is not None and value > high)
    ):
        upper = f" and at most {high}" if high is not None else ""
        raise SpliceError(f"{name} must be an integer of at least {low}{upper}; got {value!r}")
    return value
