"""Directional and functional interventions: project onto / out of directions, clamp, apply a function.

`Project(directions)` keeps only the component of each selected vector that lies in the span of
the directions; `ProjectOut(directions)` removes it (directional ablation, e.g. of a "refusal
direction"). Directions act on the site's last axis (d_model, d_head, d_mlp, ...), the same way
for every selected row, position and head. `directions` is one direction (`[d]`), several (`[k, d]`
or a list of `[d]` tensors) that need not be orthogonal, normalised or even independent: an
orthonormal basis of their span is computed once, in float64, when the intervention is built (the
directions you passed are what is stored, shown and serialised). With no directions at all (`[]`
or a `[0, d]` tensor) `ProjectOut` is an exact identity (the region comes back unchanged, bit for
bit) and `Project` gives zeros (the span of nothing is {0}).

`dims=` is refused with `Project`/`ProjectOut`: a projection mixes every coordinate of the last
axis, so restricting it to some of them would quietly change what "the span of the directions"
means. To act on a subspace of coordinates, use directions that are zero outside it.

`Clamp(min=, max=)` bounds the selection elementwise (numbers, or tensors that broadcast to it).
`Apply(fn)` is the escape hatch: `fn(region)` returns a tensor of the region's shape and dtype
(checked by the dispatcher); it holds a Python function, so it cannot be serialised.

Precision: the projections are computed in float32 (float64 for float64 activations) and the
result is rounded once to the activation's dtype, so `ProjectOut` in a bfloat16 model equals
`(x.float() - P x.float()).to(torch.bfloat16)` with P the float32 projector. Clamp bounds are
cast to the activation's dtype like every declared value (see `splice.engine.interventions`).
`Apply` results are not cast: a function returning another dtype than the region's is refused.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, cast

import torch

from ..errors import SpliceError
from .interventions import (
    At,
    Intervention,
    Value,
    ValueField,
    as_value,
    broadcast_to_region,
    own,
    refuse_non_finite,
)

_EMPTY_SHAPE = (0, 0)


def _as_directions(value, kind: str) -> torch.Tensor:
    """User directions as a floating [d] or [k, d] tensor ([0, 0] when there are none); refuses
    anything ambiguous."""
    if isinstance(value, (list, tuple)):
        if len(value) == 0:
            return torch.zeros(_EMPTY_SHAPE)
        if not all(isinstance(v, torch.Tensor) for v in value):
            kinds = sorted({type(v).__name__ for v in value})
            raise SpliceError(
                f"{kind} directions: a list must hold 1-D tensors (one direction each); got {', '.join(kinds)}"
            )
        widths = {tuple(v.shape) for v in value}
        if any(v.dim() != 1 for v in value) or len(widths) > 1:
            raise SpliceError(
                f"{kind} directions: a list must hold 1-D tensors of one width; got shapes {[list(v.shape) for v in value]}"
            )
        value = torch.stack([v.detach() for v in value])
    if not isinstance(value, torch.Tensor):
        raise SpliceError(
            f"{kind} directions must be a [d] or [k, d] tensor or a list of [d] tensors; got {type(value).__name__}"
        )
    value = value.detach()
    if value.dim() not in (1, 2):
        raise SpliceError(f"{kind} directions must be a [d] or [k, d] tensor; got shape {list(value.shape)}")
    if value.numel() == 0 and (value.dim() == 1 or value.shape[0] == 0):
        # One canonical empty form, so that an empty [0, d] survives a to_dict/from_dict round trip.
        return torch.zeros(_EMPTY_SHAPE, dtype=value.dtype if value.is_floating_point() else torch.float32)
    if not value.is_floating_point():
        raise SpliceError(f"{kind} directions have dtype {value.dtype}; pass a floating-point tensor")
    refuse_non_finite(value, f"{kind} directions")
    norms = value.double().reshape(-1, value.shape[-1]).norm(dim=-1)
    zero = [i for i, n in enumerate(norms.tolist()) if n == 0]
    if zero:
        raise SpliceError(f"{kind} direction(s) {zero} are all zeros: a zero vector spans no direction")
    return own(value)


def orthonormal_basis(directions: torch.Tensor) -> torch.Tensor:
    """An orthonormal basis of the span of some directions, computed once per intervention.

    By SVD, which unlike QR also copes with dependent rows; the rank is the numerical rank at
    the precision of the directions' dtype, so dependent directions add nothing.

    Args:
        directions: A non-empty floating `[d]` or `[k, d]` tensor of nonzero rows.

    Returns:
        A float64 `[r, d]` tensor whose rows are orthonormal and span the directions.

    Example:
        >>> import torch
        >>> orthonormal_basis(torch.tensor([[3.0, 0.0], [6.0, 0.0]])).abs()  # dependent rows: rank 1
        tensor([[1., 0.]], dtype=torch.float64)
    """
    a = directions.double().reshape(-1, directions.shape[-1])
    if a.shape[0] == 1:
        return a / a.norm()
    _, s, vh = torch.linalg.svd(a, full_matrices=False)
    # Singular values below the rounding of the dtype the directions came in are not directions.
    tol = s.max() * max(a.shape) * torch.finfo(directions.dtype).eps
    return vh[: int((s > tol).sum())].contiguous()


@dataclass(frozen=True, eq=False, repr=False)
class _Directional(Intervention, registered=False):
    """What `Project` and `ProjectOut` share: directions, their orthonormal basis, and checks."""

    directions: torch.Tensor | Sequence[torch.Tensor]

    # Set per instance in __post_init__ (declared as a class default, not a dataclass field, so
    # that it stays out of repr, equality and to_dict): float64 [rank, d], None with no directions.
    _basis: ClassVar[torch.Tensor | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        kind = type(self).__name__
        if self.dims is not None:
            raise SpliceError(
                f"{kind} does not take dims=: a projection acts on the whole last axis of the site. "
                "To project within some coordinates only, use directions that are zero outside them"
            )
        directions = _as_directions(self.directions, kind)
        object.__setattr__(self, "directions", directions)
        object.__setattr__(self, "_basis", orthonormal_basis(directions) if directions.numel() else None)

    @property
    def width(self) -> int | None:
        """Length of each direction (the site's last axis must match), None when there are none."""
        directions = cast(torch.Tensor, self.directions)  # a tensor once built
        return int(directions.shape[-1]) if directions.numel() else None

    @property
    def rank(self) -> int:
        """Dimension of the span of the directions (0 with none)."""
        return 0 if self._basis is None else int(self._basis.shape[0])

    def values(self) -> dict[str, Any]:
        """One direction, standing for all of them: the static check compares its width with the site."""
        if self.width is None:
            return {}
        directions = cast(torch.Tensor, self.directions)  # a tensor once built
        return {f"{type(self).__name__} direction": directions.reshape(-1, self.width)[0]}

    def _projection(self, region: torch.Tensor, at: At) -> tuple[torch.Tensor, torch.Tensor]:
        """(the region, its projection on the span), both in the working dtype: float32 for
        half-precision regions (at least float32), so that the result is rounded to the region's
        dtype once, by the caller."""
        if region.shape[-1] != self.width:
            raise SpliceError(
                f"{type(self).__name__} directions at {at.site} have width {self.width}, but the site's last "
                f"axis has size {region.shape[-1]} (selected region shape {list(region.shape)})"
            )
        work = torch.promote_types(region.dtype, torch.float32)
        assert self._basis is not None  # callers return early without directions
        basis = self._basis.to(device=region.device, dtype=work)
        x = region.to(work)
        return x, (x @ basis.T) @ basis


@dataclass(frozen=True, eq=False, repr=False)
class Project(_Directional):
    """Keep only the component of the selected vectors in the span of `directions`.

    Acts on the site's last axis (d_model, d_head, d_mlp, ...), the same way for every selected
    row, position and head. The directions need not be orthogonal, normalised or independent:
    an orthonormal basis of their span is computed once, in float64, when the intervention is
    built (what you passed is what is stored, shown and serialised). With no directions the
    selection becomes zeros (the span of nothing is {0}). Half-precision activations are
    projected in float32 and the result rounded once to their dtype.

    Args:
        directions: One direction (`[d]`), several (`[k, d]`, or a list of `[d]` tensors), or
            none (`[]` or a `[0, d]` tensor). Floating point, finite, no all-zero direction;
            `d` must equal the site's last axis. Copied when built.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Refused: a projection acts on the whole last axis.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For `dims=`, directions of the wrong shape or dtype, NaN/inf, an
            all-zero direction, or (at the site) a width that is not the site's last axis.

    Example:
        >>> import torch
        >>> from splice import Project
        >>> keep = Project(torch.tensor([[1.0, 0.0, 0.0, 0.0], [1.0, 1.0, 0.0, 0.0]]), pos=-1)
        >>> keep, keep.rank, keep.width
        (Project(pos=-1, directions=<tensor float32 [2, 4]>), 2, 4)
    """

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """The region's component in the span of the directions (zeros with none)."""
        if self._basis is None:
            return torch.zeros_like(region)  # the span of nothing is {0}
        return self._projection(region, at)[1].to(region.dtype)


@dataclass(frozen=True, eq=False, repr=False)
class ProjectOut(_Directional):
    """Remove the component of the selected vectors in the span of `directions`.

    Directional ablation (e.g. of a "refusal direction"). Acts on the site's last axis, the same
    way for every selected row, position and head; the directions need not be orthogonal,
    normalised or independent (see `Project`). With no directions (`ProjectOut([])`) the
    selection is returned unchanged, bit for bit.

    Args:
        directions: One direction (`[d]`), several (`[k, d]`, or a list of `[d]` tensors), or
            none (`[]` or a `[0, d]` tensor). Floating point, finite, no all-zero direction;
            `d` must equal the site's last axis. Copied when built.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Refused: a projection acts on the whole last axis.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For `dims=`, directions of the wrong shape or dtype, NaN/inf, an
            all-zero direction, or (at the site) a width that is not the site's last axis.

    Example:
        >>> import torch
        >>> from splice import Intervention, ProjectOut
        >>> ablate = ProjectOut(torch.tensor([0.0, 1.0, 0.0, 0.0]), pos=-1)
        >>> ablate.to_dict()
        {'type': 'ProjectOut', 'pos': -1, 'directions': {'tensor': [0.0, 1.0, 0.0, 0.0], 'dtype': 'float32'}}
        >>> Intervention.from_dict(ablate.to_dict()) == ablate
        True
        >>> ProjectOut([]).rank  # the identity
        0
        >>> ProjectOut(torch.ones(4), dims=1)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: ProjectOut does not take dims=: a projection acts on the whole last axis of the site. ...
    """

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """The region minus its component in the span of the directions (the region itself with none)."""
        if self._basis is None:
            return region
        x, projection = self._projection(region, at)
        return (x - projection).to(region.dtype)


def _refuse_crossed_bounds(lo, hi) -> None:
    """min > max anywhere would make torch.clamp return max there, silently: refused, elementwise
    for tensor bounds (bounds that do not broadcast together are left to the shape checks)."""
    if lo is None or hi is None:
        return
    lo_t, hi_t = torch.as_tensor(lo).detach(), torch.as_tensor(hi).detach()
    try:
        crossed = lo_t > hi_t
    except RuntimeError:
        return
    if not bool(crossed.any()):
        return
    if crossed.dim() == 0:
        raise SpliceError(f"Clamp min {lo} is greater than max {hi}")
    at = tuple(crossed.nonzero()[0].tolist())
    lo_at, hi_at = lo_t.expand_as(crossed)[at], hi_t.expand_as(crossed)[at]
    raise SpliceError(
        f"Clamp min is greater than max at {int(crossed.sum())} of {crossed.numel()} element(s), first at index {at} "
        f"(min {float(lo_at):.4g} > max {float(hi_at):.4g}); every min must be <= its max"
    )


@dataclass(frozen=True, eq=False, repr=False)
class Clamp(Intervention):
    """Clamp the selection elementwise to `[min, max]`.

    Bounds broadcast to the selection, and a bound as wide as the site is cut to it (see
    `Intervention` for the selection rules). `Clamp()` changes nothing.

    Args:
        min: Lower bound: None (no bound, the default), a number (stored as a float) or a
            tensor that broadcasts to the selection. `-inf` means no bound; NaN is refused.
        max: Upper bound, likewise. Every min must be <= its max.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For NaN, a non-numeric bound, a min above its max, or a bad selection.

    Example:
        >>> from splice import Clamp
        >>> Clamp(min=-1, max=1)
        Clamp(min=-1.0, max=1.0)
        >>> Clamp(max=0).to_dict()
        {'type': 'Clamp', 'max': 0.0}
        >>> Clamp(min=2, max=1)
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Clamp min 2.0 is greater than max 1.0
    """

    min: Value | None = None
    max: Value | None = None

    value_fields: ClassVar = {
        "min": ValueField("Clamp min", infinite_ok=True, optional=True),
        "max": ValueField("Clamp max", infinite_ok=True, optional=True),
    }

    def __post_init__(self) -> None:
        super().__post_init__()
        for name in ("min", "max"):
            if not isinstance(getattr(self, name), (torch.Tensor, type(None))):
                object.__setattr__(self, name, float(getattr(self, name)))
        _refuse_crossed_bounds(self.min, self.max)

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """The region clamped to the bounds (the region itself without any)."""
        if self.min is None and self.max is None:
            return region
        lo = (
            None
            if self.min is None
            else broadcast_to_region(
                as_value(self.min, region, "Clamp min", at.site), region, at, "Clamp min"
            )
        )
        hi = (
            None
            if self.max is None
            else broadcast_to_region(
                as_value(self.max, region, "Clamp max", at.site), region, at, "Clamp max"
            )
        )
        return torch.clamp(region, min=lo, max=hi)


@dataclass(frozen=True, eq=False, repr=False)
class Apply(Intervention):
    """Any same-shape function of the selection: the escape hatch.

    `fn(region)` gives the new values of the selected region (see `Intervention` for the
    selection rules and the region's layout). A forward `fn` starts (calling the model) is a
    forward of its own, without the outer edits. Gradients flow through `fn`. It holds a Python
    function, so it is not serialisable: `to_dict` (and `Edits.save`) refuse it.

    Args:
        fn: A callable `region -> tensor` returning a tensor of the region's shape, dtype and
            device (checked, naming the site and both shapes or dtypes; a result of another
            dtype is refused, not cast). It must not modify `region` in place.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: If `fn` is not callable, or for a bad selection; at the site, for a result
            of another shape, dtype or device than the region.

    Example:
        >>> import torch
        >>> from splice import Apply
        >>> squash = Apply(torch.tanh, pos=0)
        >>> squash
        Apply(_VariableFunctionsClass.tanh, pos=0)
        >>> squash.to_dict()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Apply(_VariableFunctionsClass.tanh, pos=0) holds a Python function and cannot be serialised ...
    """

    # Callable[..., Any]: subclasses may call it with more (a TransformerLens-style hook gets `hook`).
    fn: Callable[..., Any] | None = None

    serialisable: ClassVar[bool] = False

    def __post_init__(self) -> None:
        super().__post_init__()
        if not callable(self.fn):
            raise SpliceError(f"Apply needs a function region -> tensor; got {type(self.fn).__name__}")

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """`fn(region)`, which must keep the region's dtype (refused otherwise, never cast)."""
        assert self.fn is not None  # checked when built
        out = self.fn(region)
        if isinstance(out, torch.Tensor) and out.dtype != region.dtype:
            name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
            raise SpliceError(
                f"Apply result at {at.site} is {out.dtype}, expected {region.dtype} (the dtype of the activation "
                f"it replaces; function {name}). Apply results are not cast, since a silent cast could hide a "
                "computation done in the wrong precision: return e.g. `result.to(region.dtype)`"
            )
        return out

    def __repr__(self) -> str:
        name = getattr(self.fn, "__qualname__", None) or type(self.fn).__name__
        inner = [name] + [
            f"{n}={v!r}" for n in ("pos", "heads", "dims", "rows") if (v := getattr(self, n)) is not None
        ]
        return f"Apply({', '.join(inner)})"
