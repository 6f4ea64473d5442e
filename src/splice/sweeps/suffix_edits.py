"""Which sweep edits leave every token before some position as the baseline computed it, and how
such an edit is written for a forward that holds only the later tokens.

In a causal model an edit at position p changes nothing before p, so a replay may compute the
positions from p on only (`splice.sweeps.suffix`). Only edits whose effect is known qualify: a
non-negative `pos=` (an int, a forward slice or a list), on an intervention of a kind listed here
whose values hold no position axis, or whose recorded source is cut to the same positions.
Anything else (negative or per-row mask positions, a function, an unknown kind) runs over every
position, as before.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any, Protocol

import torch

from ..engine.directional import Clamp, Project, ProjectOut
from ..engine.frame import Frame
from ..engine.interventions import Add, Intervention, Replace, Scale, Zero
from ..engine.sources import Mean, Patch, Resample

# Kinds whose edit at a token reads only that token and their own values: directions and
# factors, which never have a position axis; values, checked to have none; and kinds whose
# recorded source is lined up position by position (the field holding it).
TOKENWISE = (Zero, Scale, Project, ProjectOut)
VALUED = (Replace, Add, Clamp)
SOURCED = {Patch: "source", Resample: "reference", Mean: "reference"}


def first_position(intervention: Intervention) -> int | None:
    """The first token position an edit can touch, when that is the same in every row: None for
    every position, negative positions (counted per row) or a per-row mask.

    Example:
        >>> from splice import Zero
        >>> first_position(Zero(pos=3)), first_position(Zero(pos=slice(2, 5))), first_position(Zero(pos=[4, 1]))
        (3, 2, 1)
        >>> first_position(Zero(pos=-1)) is None, first_position(Zero()) is None
        (True, True)
    """
    pos = intervention.pos
    if isinstance(pos, int):
        return pos if pos >= 0 else None
    if isinstance(pos, slice):
        start = pos.start or 0
        return start if start >= 0 and (pos.stop is None or pos.stop >= 0) else None
    if isinstance(pos, tuple) and pos and all(p >= 0 for p in pos):
        return min(pos)
    return None


def _local(intervention: Intervention, rank: int) -> bool:
    """A listed kind whose values cannot hold the batch and position axes of a rank-`rank` site."""
    if isinstance(intervention, TOKENWISE):
        return True
    values = intervention.values().values()
    return isinstance(intervention, VALUED) and all(
        not isinstance(v, torch.Tensor) or v.dim() <= rank - 2 for v in values
    )


def qualifies(intervention: Intervention, rank: int) -> bool:
    """Whether an edit at a rank-`rank` site can run on the later tokens only (see the module
    docstring); a Patch naming a data field qualifies (its recording is cut when it is bound)."""
    kind_ok = type(intervention) in SOURCED or _local(intervention, rank)
    return kind_ok and first_position(intervention) is not None


def first_column(kwargs: Mapping[str, Any], position: int) -> int | None:
    """The first column of a prompt batch holding token `position` in some row, counting
    positions as edits do (from each row's first real token; see `Frame`); None if no row has it."""
    ids = kwargs["input_ids"]
    frame = Frame(ids.shape[0], ids.shape[1], 0, kwargs.get("attention_mask"), kwargs.get("position_ids"))
    positions, valid, _ = frame.positions()
    hits = ((positions == position) & valid).any(0).nonzero()
    return int(hits[0]) if hits.numel() else None


class Cell(Protocol):
    """What `variant_starts` reads of a sweep variant (`splice.sweeps.shards.Variant`)."""

    @property
    def id(self) -> int:
        """The variant's number in its sweep."""
        ...

    @property
    def site(self) -> str:
        """The site the variant edits."""
        ...

    @property
    def intervention(self) -> Intervention:
        """The edit the variant makes there."""
        ...


def variant_starts(model, variants: Sequence[Cell], kwargs: Mapping[str, Any]) -> dict[int, int]:
    """Each variant's first column on this prompt batch: every column before it is unchanged by
    the variant's edit (0 for an edit that may change any)."""
    starts = {}
    for v in variants:
        rank = len(model.layout.axes(model.layout.sites_of(v.site)[0]))
        first = first_position(v.intervention) if qualifies(v.intervention, rank) else None
        column = first_column(kwargs, first) if first else None
        starts[v.id] = column or 0
    return starts


def for_suffix(intervention: Intervention, site: str, axes: tuple[str, ...], start: int, seq: int):
    """The same edit for a forward of columns `start..seq-1` only, or None when that cannot be
    said (the caller then runs every position): listed kinds are unchanged, recorded sources
    are cut to those columns (shared views, not copies)."""
    if _local(intervention, len(axes)):
        return intervention
    name = SOURCED.get(type(intervention))
    if name is None:
        return None
    if isinstance(intervention, Mean) and not intervention.per_position:
        return intervention  # one mean for every position
    if isinstance(intervention, Patch) and intervention.source_pos is not None:
        return intervention  # source positions named explicitly: nothing lines up by column
    source = getattr(intervention, name)
    value = source.get(site) if isinstance(source, Mapping) else source
    if isinstance(value, list):
        value = value[0] if len(value) == 1 else None
    p = axes.index("pos")
    if not isinstance(value, torch.Tensor) or value.dim() != len(axes) or value.shape[p] != seq:
        return None
    cut: dict[str, Any] = {name: {site: value.narrow(p, start, seq - start)}}
    return dataclasses.replace(intervention, **cut)
