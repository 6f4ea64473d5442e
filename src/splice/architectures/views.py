"""Views: how a site's tensor is cut out of the tensor a module actually sees or produces.

Each view has `read(full, layer_input, call)` (a view of the module tensor, never a copy that could
drift) and `write(full, new, layer_input, call)`, which builds a *new* module tensor with the site
part replaced (clone-then-cat), so the tensor the model produced is never mutated. The other two
arguments carry what a few views need besides the module tensor: `layer_input` is the layer's
residual input (views that set `needs_layer_input`), `call` the module and the input it was called
with (views that set `needs_call`, e.g. `HeadResults`, which reads its module's weights).
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, Protocol

import torch
import torch.nn as nn
from einops import rearrange
from transformers.pytorch_utils import Conv1D

from ..errors import SpliceError


class Call(NamedTuple):
    """One call of a hooked module, as a view that sets `needs_call` is given it.

    Attributes:
        module: The module.
        input: Its input tensor (for a hook on its output: the tensor it was called with, after
            every edit made to that input).
    """

    module: nn.Module
    input: torch.Tensor


class View(Protocol):
    """What a view does (`Point.view`): cut a site out of a module tensor, and put it back.

    A view may also set a class attribute `needs_layer_input = True`: then the engine saves the
    layer's residual input and passes it as `layer_input`; and `needs_call = True`: then the
    engine passes the hooked module and its input as `call` (a `Call`).
    """

    def read(
        self, full: torch.Tensor, layer_input: torch.Tensor | None = None, call: Call | None = None
    ) -> torch.Tensor:
        """The site tensor, as a view of `full` (never a copy that could drift)."""
        ...

    def write(
        self,
        full: torch.Tensor,
        new: torch.Tensor,
        layer_input: torch.Tensor | None = None,
        call: Call | None = None,
    ) -> torch.Tensor:
        """A new module tensor with the site part replaced by `new`; `full` is not modified."""
        ...


@dataclass(frozen=True)
class Whole:
    """The module tensor is the site tensor (the default view; `WHOLE` is its instance).

    Example:
        >>> import torch
        >>> full = torch.ones(1, 2, 4)
        >>> WHOLE.read(full) is full
        True
    """

    def read(
        self, full: torch.Tensor, layer_input: torch.Tensor | None = None, call: Call | None = None
    ) -> torch.Tensor:
        """`full` itself."""
        return full

    def write(
        self,
        full: torch.Tensor,
        new: torch.Tensor,
        layer_input: torch.Tensor | None = None,
        call: Call | None = None,
    ) -> torch.Tensor:
        """`new` itself."""
        return new


@dataclass(frozen=True)
class Heads:
    """`[..., heads*d_head]` seen as `[..., heads, d_head]`, optionally a slice of a fused
    projection such as GPT-2's `c_attn` = `[Q|K|V]` (start/stop on the last axis).

    Args:
        heads: Number of heads in the (sliced) last axis.
        start: First index of the slice on the last axis (None: the whole axis).
        stop: End of the slice (exclusive).

    Example:
        >>> import torch
        >>> fused = torch.arange(12.0).reshape(1, 12)  # [Q | K | V], 2 heads of 2 dims each
        >>> Heads(2, 0, 4).read(fused)  # Q
        tensor([[[0., 1.],
                 [2., 3.]]])
        >>> Heads(2, 0, 4).write(fused, torch.zeros(1, 2, 2))
        tensor([[ 0.,  0.,  0.,  0.,  4.,  5.,  6.,  7.,  8.,  9., 10., 11.]])
    """

    heads: int
    start: int | None = None
    stop: int | None = None

    # unflatten/flatten rather than einops here: this runs on every hooked forward, and
    # `rearrange` costs ~10 us per call against ~4 us (the tiny-model per-call budget is 300 us).
    def read(
        self, full: torch.Tensor, layer_input: torch.Tensor | None = None, call: Call | None = None
    ) -> torch.Tensor:
        """The (sliced) last axis split into `[heads, d_head]` (a view)."""
        part = full if self.start is None else full[..., self.start : self.stop]
        return part.unflatten(-1, (self.heads, -1))  # "... (h d) -> ... h d"

    def write(
        self,
        full: torch.Tensor,
        new: torch.Tensor,
        layer_input: torch.Tensor | None = None,
        call: Call | None = None,
    ) -> torch.Tensor:
        """`new` flattened back, joined with the rest of a fused projection."""
        flat = new.flatten(-2)  # "... h d -> ... (h d)"
        if self.start is None:
            return flat
        return torch.cat([full[..., : self.start], flat, full[..., self.stop :]], dim=-1)


@dataclass(frozen=True)
class InterleavedHeads:
    """A fused projection laid out per head as `[h0: q k v | h1: q k v | ...]` (GPT-NeoX):
    `[..., heads*parts*d_head]` seen as `[..., heads, d_head]` for part `index`.

    Args:
        heads: Number of heads.
        parts: Parts per head (3 for q, k, v).
        index: Which part this view is (0 for q, 1 for k, 2 for v).

    Example:
        >>> import torch
        >>> fused = torch.arange(12.0).reshape(1, 12)  # 2 heads x [q k v] x 2 dims
        >>> InterleavedHeads(2, 3, 1).read(fused)  # k of each head
        tensor([[[2., 3.],
                 [8., 9.]]])
    """

    heads: int
    parts: int
    index: int

    def read(
        self, full: torch.Tensor, layer_input: torch.Tensor | None = None, call: Call | None = None
    ) -> torch.Tensor:
        """Part `index` of every head, `[..., heads, d_head]`."""
        grouped = rearrange(full, "... (h s d) -> ... h s d", h=self.heads, s=self.parts)
        return grouped[..., self.index, :]

    def write(
        self,
        full: torch.Tensor,
        new: torch.Tensor,
        layer_input: torch.Tensor | None = None,
        call: Call | None = None,
    ) -> torch.Tensor:
        """A new fused tensor with part `index` of every head replaced by `new`."""
        grouped = rearrange(full, "... (h s d) -> ... h s d", h=self.heads, s=self.parts)
        pieces = [new if s == self.index else grouped[..., s, :] for s in range(self.parts)]
        return rearrange(torch.stack(pieces, dim=-2), "... h s d -> ... (h s d)")


@dataclass(frozen=True)
class Tokens:
    """A module that runs on tokens flattened to `[batch*pos, width]` (OPT's MLP), seen as
    `[batch, pos, width]`; batch and pos are those of the layer's residual input.

    Example:
        >>> import torch
        >>> flat, layer_input = torch.zeros(6, 5), torch.zeros(2, 3, 4)
        >>> Tokens().read(flat, layer_input).shape
        torch.Size([2, 3, 5])
    """

    needs_layer_input = True

    def read(
        self, full: torch.Tensor, layer_input: torch.Tensor | None = None, call: Call | None = None
    ) -> torch.Tensor:
        """`full` unflattened to the layer input's `[batch, pos]` (a view)."""
        assert layer_input is not None  # needs_layer_input: the engine passes it
        return full.view(*layer_input.shape[:-1], full.shape[-1])

    def write(
        self,
        full: torch.Tensor,
        new: torch.Tensor,
        layer_input: torch.Tensor | None = None,
        call: Call | None = None,
    ) -> torch.Tensor:
        """`new` flattened back to `full`'s shape."""
        return new.reshape(full.shape)


@dataclass(frozen=True)
class ResidualSum:
    """The residual stream after a sublayer, seen from that sublayer's output: the model computes
    `layer_input + full`, so the site is that sum, and writing `new` makes the sublayer contribute
    `new - layer_input` (exact for zeroing; within one rounding otherwise).

    Example:
        >>> import torch
        >>> attn_out, resid_pre = torch.ones(2), torch.full((2,), 3.0)
        >>> ResidualSum().read(attn_out, resid_pre)  # resid_mid
        tensor([4., 4.])
        >>> ResidualSum().write(attn_out, torch.full((2,), 5.0), resid_pre)  # what attn.out becomes
        tensor([2., 2.])
    """

    needs_layer_input = True

    def read(
        self, full: torch.Tensor, layer_input: torch.Tensor | None = None, call: Call | None = None
    ) -> torch.Tensor:
        """`layer_input + full` (a new tensor)."""
        assert layer_input is not None  # needs_layer_input: the engine passes it
        return layer_input + full

    def write(
        self,
        full: torch.Tensor,
        new: torch.Tensor,
        layer_input: torch.Tensor | None = None,
        call: Call | None = None,
    ) -> torch.Tensor:
        """The sublayer output that makes the residual `new`: `new - layer_input`."""
        assert layer_input is not None  # needs_layer_input: the engine passes it
        return new - layer_input


def projection_rows(module: nn.Module) -> torch.Tensor:
    """A projection's weight as `[d_out, d_in]` (a view of the parameter): `nn.Linear` stores it
    so, transformers' `Conv1D` (GPT-2) stores `[d_in, d_out]`.

    Raises:
        SpliceError: For any other module (the projection's per-head weights cannot be read).

    Example:
        >>> projection_rows(torch.nn.Linear(4, 3)).shape
        torch.Size([3, 4])
    """
    if isinstance(module, Conv1D):
        return module.weight.T
    if isinstance(module, nn.Linear):
        return module.weight
    raise SpliceError(
        f"{type(module).__name__} is not a projection whose weights splice can read per head "
        "(nn.Linear or transformers' Conv1D)"
    )


@dataclass(frozen=True)
class HeadResults:
    """Each head's contribution to an output projection's output (`attn.result`): the site is
    `[..., heads, d_out]`, head h's part being `z[..., h, :] @ W_O[h]`, where `z` is the
    projection's input cut into heads by `heads` (the table's `attn.z` view) and `W_O[h]` the
    rows of the weight that head reads (the same view applied to the weight's input axis). Hooked
    on the projection's *output* (so any edit of its input, `attn.z`, is applied first); it needs
    the module and its input (`needs_call`), and is computed only when a forward touches it.

    The bias is no head's: `sum over heads + bias` is the projection's output. `write` makes the
    output `sum over heads of new + bias`: heads (per row and position) that `new` leaves exactly
    as they were keep their part as the module computes it, i.e. the projection of the input with
    the changed heads zeroed, plus the changed heads' new parts. So an edit that changes nothing is
    bit-identical, and zeroing a head here equals zeroing it in `attn.z` bit for bit.

    Args:
        heads: The view that cuts the projection's input into `[..., heads, d_head]`.

    Example:
        >>> import torch
        >>> proj = torch.nn.Linear(4, 3)  # 2 heads of width 2 -> d_out 3
        >>> z = torch.randn(1, 5, 4)
        >>> view, call = HeadResults(Heads(2)), Call(proj, z)
        >>> result = view.read(proj(z), call=call)
        >>> result.shape
        torch.Size([1, 5, 2, 3])
        >>> torch.allclose(result.sum(-2) + proj.bias, proj(z), atol=1e-6)
        True
        >>> no_head_1, z_without_1 = result.clone(), z.clone()
        >>> no_head_1[..., 1, :], z_without_1[..., 2:] = 0, 0
        >>> torch.equal(view.write(proj(z), no_head_1, call=call), proj(z_without_1))
        True
    """

    heads: View
    needs_call = True

    def read(
        self, full: torch.Tensor, layer_input: torch.Tensor | None = None, call: Call | None = None
    ) -> torch.Tensor:
        """Every head's part, `[..., heads, d_out]` (a new tensor, computed from the call)."""
        assert call is not None  # needs_call: the engine passes it
        z = self.heads.read(call.input)
        rows = self.heads.read(projection_rows(call.module))  # [d_out, heads, d_head]
        if rows.shape[1:] != z.shape[-2:]:
            raise SpliceError(
                f"the weight of {type(call.module).__name__} cut into heads is {list(rows.shape)} "
                f"([d_out, heads, d_head]), which does not fit its input's heads {list(z.shape[-2:])}"
            )
        return torch.einsum("...hd,ohd->...ho", z, rows).contiguous()

    def write(
        self,
        full: torch.Tensor,
        new: torch.Tensor,
        layer_input: torch.Tensor | None = None,
        call: Call | None = None,
    ) -> torch.Tensor:
        """The projection output `sum over heads of new + bias` (see the class docstring)."""
        assert call is not None  # needs_call: the engine passes it
        old = self.read(full, call=call)
        changed = (new != old).any(-1, keepdim=True)  # [..., heads, 1]
        anything = bool(changed.any())
        if not anything and not (torch.is_grad_enabled() and new.requires_grad):
            return full
        # Unchanged heads add `new - old`: exactly 0, but it carries the gradient of what the edit
        # injected (an `Add` of a vector being optimised from 0 changes nothing at first).
        extra = torch.where(changed, new, new - old).sum(-2)
        if not anything:
            return full + extra
        z = self.heads.read(call.input)
        kept = self.heads.write(call.input, torch.where(changed, z.new_zeros(()), z))
        return call.module.forward(kept) + extra  # forward: the module's own computation, no hooks


WHOLE = Whole()
"""The `Whole` view (the default of `Point.view`)."""
