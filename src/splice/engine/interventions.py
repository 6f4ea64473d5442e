"""Declarative interventions: frozen, serialisable descriptions of an edit to one site.

An intervention never sees the whole model. The dispatcher hands it the selected *region* of the
site tensor (`pos`/`heads`/`dims`) and writes what it returns into a clone of the site tensor, so
the tensor the model produced is never mutated and autograd stays valid.
"""

from __future__ import annotations

import dataclasses
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple

import torch

from ..errors import SpliceError
from .codec import decode, encode
from .selection import normalize_index, normalize_pos


class At(NamedTuple):
    """Where a region sits: enough for an intervention to align a full-site value with it."""

    site: str
    index: tuple
    full_shape: tuple
    masked: bool
    trailing: tuple = ()  # selectors of the axes after pos (heads, dims)
    axes: tuple = ()  # the site's axis names, e.g. ("batch", "pos", "head", "d_head")


_REGISTRY: dict[str, type[Intervention]] = {}
SELECTION = ("pos", "heads", "dims", "rows")


def _describe(value) -> str:
    if isinstance(value, torch.Tensor):
        if value.numel() == 1:
            return f"tensor({value.item():.4g})"
        return f"<tensor {str(value.dtype).removeprefix('torch.')} {list(value.shape)}>"
    if isinstance(value, dict):
        return "{" + ", ".join(f"{k!r}: {_describe(v)}" for k, v in value.items()) + "}"
    return repr(value)


def _same(a, b) -> bool:
    if isinstance(a, dict) or isinstance(b, dict):
        return (
            isinstance(a, dict)
            and isinstance(b, dict)
            and a.keys() == b.keys()
            and all(_same(a[k], b[k]) for k in a)
        )
    if isinstance(a, torch.Tensor) or isinstance(b, torch.Tensor):
        return (
            isinstance(a, torch.Tensor)
            and isinstance(b, torch.Tensor)
            and a.shape == b.shape
            and torch.equal(a.detach().cpu(), b.detach().cpu())
        )
    return a == b


class ValueField(NamedTuple):
    """How an intervention's value field is checked when it is built (see `Intervention`)."""

    label: str  # how messages name it, e.g. "Add vector"
    infinite_ok: bool = False  # +/-inf is meaningful here (Replace: -inf masks a score; Clamp: no bound)
    optional: bool = False  # None is allowed (Clamp's unset bounds)


# Copies made by `own`, by id (weakly: an entry goes when its tensor does).
_OWNED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()


def own(tensor: torch.Tensor) -> torch.Tensor:
    """The intervention's own copy of a user tensor, so that changing the user's tensor in place
    later cannot change the edit. `clone` keeps autograd: gradients still reach the user's tensor
    through the copy. A tensor that already is such a copy (an intervention rebuilt with
    `dataclasses.replace`, as sweeps do per variant) is kept, not copied again."""
    if _OWNED.get(id(tensor)) is tensor:
        return tensor
    copy = tensor.clone()
    _OWNED[id(copy)] = copy
    return copy


def refuse_non_finite(value: torch.Tensor, what: str, infinite_ok: bool = False) -> None:
    """The one non-finite policy, applied when an intervention is built: NaN is refused in every
    value; +/-inf only where `infinite_ok` (Replace values, Clamp bounds)."""
    if not (value.is_floating_point() or value.is_complex()):
        return
    v = value.detach()
    nan = torch.isnan(v)
    bad = nan if infinite_ok else ~torch.isfinite(v)
    if not bool(bad.any()):
        return
    kind = "NaN" if bool(nan.any()) else "+/-inf"
    where = (
        f"{what} is {kind}"
        if v.dim() == 0
        else (
            f"{what} contains {kind} ({int(bad.sum())} of {v.numel()} values, first at index {tuple(bad.nonzero()[0].tolist())})"
        )
    )
    if kind == "NaN":
        raise SpliceError(
            f"{where}: NaN is refused in every intervention value, since it would spread through every later activation"
        )
    raise SpliceError(
        f"{where}: infinite values are accepted only by Replace (e.g. Replace(float('-inf'), dims=k) at "
        "attn.scores masks key k) and as Clamp bounds; pass finite values"
    )


def owned_value(value, spec: ValueField):
    """A value field as the intervention keeps it: a number (checked) or its own copy of a tensor
    (checked); anything else is refused here rather than in the middle of a forward."""
    if value is None and spec.optional:
        return None
    if isinstance(value, torch.Tensor):
        refuse_non_finite(value, spec.label, spec.infinite_ok)
        return own(value)
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        value = value if isinstance(value, (int, float)) else float(value)  # NumPy scalars -> float
        refuse_non_finite(torch.tensor(float(value)), spec.label, spec.infinite_ok)
        return value
    expected = "a number, a tensor or None" if spec.optional else "a number or a tensor"
    raise SpliceError(f"{spec.label} must be {expected}; got {type(value).__name__} {value!r}")


def as_value(value, like: torch.Tensor, what: str, site: str) -> torch.Tensor:
    """A user value as a tensor on `like`'s device and dtype; refuses non-float tensors."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) and value.numel() > 1:
            raise SpliceError(
                f"{what} at {site} has dtype {value.dtype}; activations are {like.dtype}: pass a floating-point tensor"
            )
        return value.to(device=like.device, dtype=like.dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return torch.tensor(value, device=like.device, dtype=like.dtype)
    raise SpliceError(f"{what} at {site} must be a number or a tensor; got {type(value).__name__}")


def broadcast_to_region(value: torch.Tensor, region: torch.Tensor, at: At, what: str) -> torch.Tensor:
    """`value` fitted to the region: a full-site-shaped value is indexed like the site, anything
    else must broadcast. Raises with both shapes otherwise."""
    if (
        value.dim() > 0
        and tuple(value.shape) == tuple(at.full_shape)
        and tuple(region.shape) != tuple(at.full_shape)
    ):
        return value[at.index]
    k = min(len(at.trailing), value.dim())
    full_tail = tuple(at.full_shape[len(at.full_shape) - k :])
    if (
        k
        and tuple(value.shape[value.dim() - k :]) == full_tail
        and tuple(region.shape[region.dim() - k :]) != full_tail
    ):
        # A value as wide as the site (e.g. a d_model vector) applied to selected heads/dims only.
        for offset, chosen in enumerate(at.trailing[len(at.trailing) - k :]):
            axis = value.dim() - k + offset
            value = (
                value[(slice(None),) * axis + (chosen,)]
                if isinstance(chosen, slice)
                else value.index_select(axis, chosen.to(value.device))
            )
    try:
        return value.expand_as(region)
    except RuntimeError:
        raise SpliceError(
            f"{what} of shape {list(value.shape)} cannot broadcast to the selection at {at.site}: "
            f"selected region has shape {list(region.shape)} (site shape {list(at.full_shape)})"
        ) from None


@dataclass(frozen=True, eq=False, repr=False)
class Intervention:
    """Base class. Subclasses implement `compute(region, at)`; selection fields are shared.

    Everything is checked when the intervention is built, so a bad value fails at its own line:

    - Selections: `heads`/`dims`/`rows`/`pos` lists may not repeat an index (`heads=[1, 1]`
      would edit head 1 once, not twice); slices have int bounds, step forward and select
      something. What needs the site's shape is checked when it is known: repeats that only
      show then (`pos=[1, -8]` on 9 tokens), slices reaching beyond a head/dim/row axis, and a
      `pos` mask narrower than the sequence (pad it with False).
    - Values are owned: every tensor a subclass declares in `value_fields` is copied (with
      `clone`, which keeps autograd, so gradients still reach your tensor), so changing your
      tensor in place afterwards does not change the edit. Build a new intervention to change it.
    - Non-finite values: NaN is refused in every value. +/-inf is refused too, except where it
      means something: a `Replace` value (`Replace(float('-inf'), dims=k)` at `attn.scores`
      masks key k) and `Clamp` bounds (no bound on that side). `Patch`/`Mean`/`Resample` take
      activations, which are written as recorded (see `splice.engine.sources`).
    """

    pos: Any = field(default=None, kw_only=True)
    heads: Any = field(default=None, kw_only=True)
    dims: Any = field(default=None, kw_only=True)
    rows: Any = field(default=None, kw_only=True)  # batch rows (per-row variants in one batch)

    serialisable: ClassVar[bool] = True
    value_fields: ClassVar[dict[str, ValueField]] = {}  # field name -> how it is checked and named

    def __init_subclass__(cls, registered: bool = True, **kwargs):
        """Every subclass can be loaded by name from a file; a shared base (`registered=False`) is not one."""
        super().__init_subclass__(**kwargs)
        if registered:
            _REGISTRY[cls.__name__] = cls

    def __post_init__(self):
        object.__setattr__(self, "pos", normalize_pos(self.pos))
        object.__setattr__(self, "heads", normalize_index(self.heads, "heads"))
        object.__setattr__(self, "dims", normalize_index(self.dims, "dims"))
        object.__setattr__(self, "rows", normalize_index(self.rows, "rows"))
        for name, spec in self.value_fields.items():
            object.__setattr__(self, name, owned_value(getattr(self, name), spec))

    # -- behaviour ---------------------------------------------------------------------------
    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """New values for the selected region (same shape); must not modify `region`."""
        raise NotImplementedError

    def values(self) -> dict[str, Any]:
        """Non-selection fields that hold user values, by label, for static shape checks."""
        return {spec.label: getattr(self, name) for name, spec in self.value_fields.items()}

    # -- description -------------------------------------------------------------------------
    def _fields(self):
        return [(f.name, getattr(self, f.name), f.default) for f in dataclasses.fields(self)]

    def __repr__(self) -> str:
        parts = [
            f"{n}={_describe(v)}"
            for n, v, d in self._fields()
            if not (v is None and d is None) and not (n in SELECTION and v is None)
        ]
        return f"{type(self).__name__}({', '.join(parts)})"

    def __eq__(self, other) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return all(_same(v, getattr(other, n)) for n, v, _ in self._fields())

    __hash__ = object.__hash__

    def to_dict(self) -> dict:
        if not self.serialisable:
            raise SpliceError(f"{type(self).__name__} holds a Python function and cannot be serialised")
        record = {"type": type(self).__name__}
        for name, value, default in self._fields():
            if value is not None or default is dataclasses.MISSING:
                record[name] = encode(value)
        return record

    @staticmethod
    def from_dict(record: dict) -> Intervention:
        record = dict(record)
        kind = record.pop("type", None)
        if kind not in _REGISTRY:
            raise SpliceError(f"unknown intervention type {kind!r}; known: {', '.join(sorted(_REGISTRY))}")
        cls = _REGISTRY[kind]
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(record) - names
        if unknown:
            raise SpliceError(f"{kind} has no field(s) {sorted(unknown)}; its fields are {sorted(names)}")
        return cls(**{k: decode(v) for k, v in record.items()})


@dataclass(frozen=True, eq=False, repr=False)
class Zero(Intervention):
    """Set the selection to zero (zero ablation)."""

    def compute(self, region, at):
        return torch.zeros_like(region)


@dataclass(frozen=True, eq=False, repr=False)
class Scale(Intervention):
    """Multiply the selection by `factor` (a number or a tensor that broadcasts)."""

    factor: Any = 1.0

    value_fields: ClassVar = {"factor": ValueField("Scale factor")}

    def compute(self, region, at):
        factor = broadcast_to_region(
            as_value(self.factor, region, "Scale factor", at.site), region, at, "Scale factor"
        )
        return region * factor


@dataclass(frozen=True, eq=False, repr=False)
class Replace(Intervention):
    """Overwrite the selection with `value` (broadcast to the selection, or a full-site tensor).
    Unlike other values it may be +/-inf: `Replace(float('-inf'), dims=k)` at `attn.scores` masks key k."""

    value: Any = 0.0

    value_fields: ClassVar = {"value": ValueField("Replace value", infinite_ok=True)}

    def compute(self, region, at):
        return broadcast_to_region(
            as_value(self.value, region, "Replace value", at.site), region, at, "Replace value"
        ).clone()


@dataclass(frozen=True, eq=False, repr=False)
class Add(Intervention):
    """Add `scale * vector` to the selection (steering / injection). Gradients reach `vector`."""

    vector: Any = 0.0
    scale: float = 1.0

    value_fields: ClassVar = {"vector": ValueField("Add vector"), "scale": ValueField("Add scale")}

    def compute(self, region, at):
        vector = broadcast_to_region(
            as_value(self.vector, region, "Add vector", at.site), region, at, "Add vector"
        )
        return (
            region + vector * self.scale
            if isinstance(self.scale, torch.Tensor) or self.scale != 1
            else region + vector
        )


def registered_types() -> dict[str, type[Intervention]]:
    """Intervention classes by name (what `from_dict` accepts)."""
    return dict(_REGISTRY)
