"""Views: how a site's tensor is cut out of the tensor a module actually sees or produces.

Each view has `read(full, layer_input)` (a view of the module tensor, never a copy that could drift) and
`write(full, new, layer_input)`, which builds a *new* module tensor with the site part replaced
(clone-then-cat), so the tensor the model produced is never mutated. `layer_input` is the
layer's residual input, needed only by the views that set `needs_layer_input`.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from einops import rearrange


@dataclass(frozen=True)
class Whole:
    """The module tensor is the site tensor."""

    def read(self, full, layer_input=None):
        return full

    def write(self, full, new, layer_input=None):
        return new


@dataclass(frozen=True)
class Heads:
    """`[..., heads*d_head]` seen as `[..., heads, d_head]`, optionally a slice of a fused
    projection such as GPT-2's `c_attn` = `[Q|K|V]` (start/stop on the last axis)."""

    heads: int
    start: int | None = None
    stop: int | None = None

    # unflatten/flatten rather than einops here: this runs on every hooked forward, and
    # `rearrange` costs ~10 us per call against ~4 us (the tiny-model per-call budget is 300 us).
    def read(self, full, layer_input=None):
        part = full if self.start is None else full[..., self.start : self.stop]
        return part.unflatten(-1, (self.heads, -1))  # "... (h d) -> ... h d"

    def write(self, full, new, layer_input=None):
        flat = new.flatten(-2)  # "... h d -> ... (h d)"
        if self.start is None:
            return flat
        return torch.cat([full[..., : self.start], flat, full[..., self.stop :]], dim=-1)


@dataclass(frozen=True)
class InterleavedHeads:
    """A fused projection laid out per head as `[h0: q k v | h1: q k v | ...]` (GPT-NeoX):
    `[..., heads*parts*d_head]` seen as `[..., heads, d_head]` for part `index`."""

    heads: int
    parts: int
    index: int

    def read(self, full, layer_input=None):
        grouped = rearrange(full, "... (h s d) -> ... h s d", h=self.heads, s=self.parts)
        return grouped[..., self.index, :]

    def write(self, full, new, layer_input=None):
        grouped = rearrange(full, "... (h s d) -> ... h s d", h=self.heads, s=self.parts)
        pieces = [new if s == self.index else grouped[..., s, :] for s in range(self.parts)]
        return rearrange(torch.stack(pieces, dim=-2), "... h s d -> ... (h s d)")


@dataclass(frozen=True)
class Tokens:
    """A module that runs on tokens flattened to `[batch*pos, width]` (OPT's MLP), seen as
    `[batch, pos, width]`; batch and pos are those of the layer's residual input."""

    needs_layer_input = True

    def read(self, full, layer_input=None):
        return full.view(*layer_input.shape[:-1], full.shape[-1])

    def write(self, full, new, layer_input=None):
        return new.reshape(full.shape)


@dataclass(frozen=True)
class ResidualSum:
    """The residual stream after a sublayer, seen from that sublayer's output: the model computes
    `layer_input + full`, so the site is that sum, and writing `new` makes the sublayer contribute
    `new - layer_input` (exact for zeroing; within one rounding otherwise)."""

    needs_layer_input = True

    def read(self, full, layer_input=None):
        return layer_input + full

    def write(self, full, new, layer_input=None):
        return new - layer_input


WHOLE = Whole()
