"""Declarative interventions: frozen, serialisable descriptions of an edit to one site.

An intervention never sees the whole model. The dispatcher hands it the selected *region* of the
site tensor (`pos`/`heads`/`dims`/`rows`) and writes what it returns into a clone of the site
tensor, so the tensor the model produced is never mutated and autograd stays valid. The selection
rules are documented once, on `Intervention`; `Zero`, `Scale`, `Replace` and `Add` live here,
`Project`, `ProjectOut`, `Clamp` and `Apply` in `splice.engine.directional`, and `Patch`, `Mean`
and `Resample` in `splice.engine.sources`.

**Precision.** An edit computes in the dtype of the activation it edits (bfloat16 in a bfloat16
model): every declared value (numbers too) is first cast to that dtype and moved to its device
by `as_value`, then combined with the region in that dtype, so `Add(v)` in a bfloat16 model is
exactly `t + v.to(torch.bfloat16)`. A finite value that the cast would turn into +/-inf (1e5 into
float16) is refused. What an edit returns must already have the region's dtype; the dispatcher
casts nothing, so an `Apply` function returning another dtype is an error.
"""

from __future__ import annotations

import dataclasses
import math
import numbers
import weakref
from dataclasses import dataclass, field
from typing import Any, ClassVar, NamedTuple, TypeAlias

import torch

from ..errors import SpliceError
from .codec import decode, encode
from .selection import Index, Positions, normalize_index, normalize_pos

Value: TypeAlias = float | torch.Tensor
"""A value an intervention writes with: a number, or a tensor that broadcasts to the selection."""


class At(NamedTuple):
    """Where a region sits in its site tensor: what `Intervention.compute` gets besides the region.

    Enough for an intervention to align a value as wide as the site (or a recorded activation)
    with the selected region.

    Attributes:
        site: The canonical site name, for messages.
        index: The index that cut the region out of the site tensor (`site[index]`).
        full_shape: The site tensor's shape in this forward.
        masked: True when the region's first axis enumerates (row, position) pairs (padding or
            a bool `pos` mask) instead of being `[batch, pos, ...]`.
        trailing: The selectors (slice or LongTensor) of the axes after `pos` (heads, dims).
        axes: The site's axis names, e.g. `("batch", "pos", "head", "d_head")`.

    Example:
        >>> import torch
        >>> at = At("blocks.0.resid_post", (slice(None), slice(1, 2), slice(0, 2)), (1, 3, 4), False,
        ...         (slice(0, 2),), ("batch", "pos", "d_model"))
        >>> region = torch.ones(1, 3, 4)[at.index]  # token 1, dims 0-1
        >>> Add(torch.arange(4.0)).compute(region, at)  # a d_model vector is cut to dims 0-1
        tensor([[[1., 2.]]])
    """

    site: str
    # A field named `index` hides tuple.index on purpose: an At is read by name, never searched.
    index: tuple  # type: ignore[assignment]
    full_shape: tuple[int, ...]
    masked: bool
    trailing: tuple = ()  # selectors of the axes after pos (heads, dims)
    axes: tuple[str, ...] = ()  # the site's axis names, e.g. ("batch", "pos", "head", "d_head")


_REGISTRY: dict[str, type[Intervention]] = {}
SELECTION = ("pos", "heads", "dims", "rows")
"""The selection fields every intervention has (keyword-only)."""


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
    """How an intervention's value field is checked when it is built (see `Intervention`).

    A subclass lists its value fields in `value_fields` (field name -> ValueField); each is then
    checked and owned by `owned_value` when the intervention is built.

    Attributes:
        label: How messages name the field, e.g. `"Add vector"`.
        infinite_ok: +/-inf is meaningful here (Replace: -inf masks a score; Clamp: no bound).
        optional: None is allowed (Clamp's unset bounds).

    Example:
        >>> ValueField("Scale factor")
        ValueField(label='Scale factor', infinite_ok=False, optional=False)
    """

    label: str  # how messages name it, e.g. "Add vector"
    infinite_ok: bool = False  # +/-inf is meaningful here (Replace: -inf masks a score; Clamp: no bound)
    optional: bool = False  # None is allowed (Clamp's unset bounds)


# Copies made by `own`, by id (weakly: an entry goes when its tensor does).
_OWNED: weakref.WeakValueDictionary[int, torch.Tensor] = weakref.WeakValueDictionary()
# Values already found to fit a narrower dtype, by (id, version, dtype) (weakly, as _OWNED), so
# that the range check of `as_value` runs once per value and dtype, not at every forward.
_FITS: weakref.WeakValueDictionary[tuple[int, int, torch.dtype], torch.Tensor] = weakref.WeakValueDictionary()


def own(tensor: torch.Tensor) -> torch.Tensor:
    """The intervention's own copy of a user tensor.

    Changing the user's tensor in place later then cannot change the edit. `clone` keeps
    autograd: gradients still reach the user's tensor through the copy. A tensor that already
    is such a copy (an intervention rebuilt with `dataclasses.replace`, as sweeps do per
    variant) is kept, not copied again.

    Args:
        tensor: Any tensor.

    Returns:
        A copy owned by splice (or `tensor` itself if it already is one).

    Example:
        >>> import torch
        >>> mine = torch.ones(3, requires_grad=True)
        >>> copy = own(mine)
        >>> copy is mine, copy.requires_grad, own(copy) is copy
        (False, True, True)
    """
    if _OWNED.get(id(tensor)) is tensor:
        return tensor
    copy = tensor.clone()
    _OWNED[id(copy)] = copy
    return copy


def refuse_non_finite(value: torch.Tensor, what: str, infinite_ok: bool = False) -> None:
    """The one non-finite policy, applied when an intervention is built.

    NaN is refused in every value (it would spread through every later activation); +/-inf
    too, except where `infinite_ok` (Replace values, Clamp bounds). Integer and bool tensors
    pass.

    Args:
        value: The value to check.
        what: How messages name it, e.g. `"Add vector"`.
        infinite_ok: Accept +/-inf (never NaN).

    Raises:
        SpliceError: Naming the value, how many entries are bad and the first one's index.

    Example:
        >>> import torch
        >>> refuse_non_finite(torch.tensor([0.0, float("-inf")]), "Replace value", infinite_ok=True)
        >>> refuse_non_finite(torch.tensor([1.0, float("nan")]), "Add vector")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Add vector contains NaN (1 of 2 values, first at index (1,)): ...
    """
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


def owned_value(value: Value | None, spec: ValueField) -> Value | None:
    """A value field as the intervention keeps it, checked when the intervention is built.

    Args:
        value: A real number (NumPy scalars become floats; bools are refused), a tensor, or
            None where `spec.optional`.
        spec: How the field is checked and named.

    Returns:
        The number, the intervention's own copy of the tensor (see `own`), or None.

    Raises:
        SpliceError: For a non-finite value the policy refuses (see `refuse_non_finite`) or
            any other type, here rather than in the middle of a forward.

    Example:
        >>> owned_value(2, ValueField("Scale factor"))
        2
        >>> owned_value("2", ValueField("Scale factor"))
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Scale factor must be a number or a tensor; got str '2'
    """
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


def as_value(value: Value, like: torch.Tensor, what: str, site: str) -> torch.Tensor:
    """A value as a tensor on the region's device and dtype, ready to combine with it.

    This is the precision rule of every declared value: a float32 steering vector added in a
    bfloat16 model is cast to bfloat16 first, and a number becomes a tensor of the region's dtype
    (`Scale(0.3)` in bfloat16 multiplies by 0.30078125, the nearest bfloat16), so the edit
    computes entirely in the activation's dtype.

    Args:
        value: A number or a tensor. Integer tensors with more than one element are refused
            (a one-element one is converted like a number).
        like: The region the value will be combined with.
        what: How messages name the value.
        site: The site, for messages.

    Returns:
        `value` converted to `like.dtype` on `like.device` (a differentiable conversion).

    Raises:
        SpliceError: For a non-float tensor, a value that is not a number or a tensor, or a
            finite value outside the range of `like.dtype` (it would become +/-inf).

    Example:
        >>> import torch
        >>> as_value(2, torch.zeros(3, dtype=torch.float16), "Scale factor", "embed")
        tensor(2., dtype=torch.float16)
        >>> as_value(1e5, torch.zeros(3, dtype=torch.float16), "Add vector", "embed")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Add vector at embed is 1e+05, outside the range of torch.float16 ...
    """
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.is_complex()) and value.numel() > 1:
            raise SpliceError(
                f"{what} at {site} has dtype {value.dtype}; activations are {like.dtype}: pass a floating-point tensor"
            )
        if _narrows(value.dtype, like.dtype):
            _refuse_overflow(value, like.dtype, what, site)
        return value.to(device=like.device, dtype=like.dtype)
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        if (
            like.is_floating_point()
            and math.isfinite(value)
            and abs(value) > torch.finfo(like.dtype).max
            and torch.tensor(value, dtype=like.dtype).isinf()  # just beyond the max rounds down to it
        ):
            raise SpliceError(
                f"{what} at {site} is {value:.4g}, outside the range of {like.dtype} (largest finite value "
                f"{torch.finfo(like.dtype).max:.4g}): cast to the activations' dtype it would be +/-inf"
            )
        return torch.tensor(value, device=like.device, dtype=like.dtype)
    raise SpliceError(f"{what} at {site} must be a number or a tensor; got {type(value).__name__}")


def _narrows(source: torch.dtype, target: torch.dtype) -> bool:
    """Casting from `source` to `target` can turn a finite value into +/-inf."""
    return (
        source.is_floating_point
        and target.is_floating_point
        and torch.finfo(target).max < torch.finfo(source).max
    )


def _refuse_overflow(value: torch.Tensor, dtype: torch.dtype, what: str, site: str) -> None:
    """Refuse a tensor with finite entries beyond `dtype`'s range, once per (tensor, version, dtype)."""
    # Inference tensors keep no version counter: they are checked at every use instead.
    key = None if value.is_inference() else (id(value), value._version, dtype)
    if key is not None and _FITS.get(key) is value:
        return
    v = value.detach()
    limit = torch.finfo(dtype).max
    # Rounding to `dtype` keeps values up to a little beyond its max finite (they round down to
    # it): cast to see which become infinite, rather than comparing with the max.
    bad = torch.isfinite(v) & ~torch.isfinite(v.to(dtype))
    if bool(bad.any()):
        first = tuple(bad.nonzero()[0].tolist())
        raise SpliceError(
            f"{what} at {site} has {int(bad.sum())} of {v.numel()} value(s) outside the range of {dtype} "
            f"(largest finite value {limit:.4g}; first at index {first}: {float(v[first]):.4g}): cast to the "
            "activations' dtype they would be +/-inf. Scale the value down, or run the model in a wider dtype"
        )
    if key is not None:
        _FITS[key] = value


def broadcast_to_region(value: torch.Tensor, region: torch.Tensor, at: At, what: str) -> torch.Tensor:
    """Fit a value to the selected region, following the rules on `Intervention`.

    A value shaped like the whole site tensor is indexed like the site; a value whose trailing
    axes are as wide as the site's (a `d_model` vector, a `[heads, d_head]` tensor) is cut to
    the selected heads/dims; anything else must broadcast to the region.

    Args:
        value: The value, as a tensor (see `as_value`).
        region: The selected region.
        at: Where the region sits.
        what: How messages name the value.

    Returns:
        A tensor of the region's shape (an expanded view: do not write into it).

    Raises:
        SpliceError: With the value's, the region's and the site's shapes, if it does not fit.

    Example:
        >>> import torch
        >>> at = At("embed", (slice(None), slice(None), slice(0, 2)), (1, 3, 4), False,
        ...         (slice(0, 2),), ("batch", "pos", "d_model"))
        >>> broadcast_to_region(torch.arange(4.0), torch.zeros(1, 3, 2), at, "Add vector")
        tensor([[[0., 1.],
                 [0., 1.],
                 [0., 1.]]])
    """
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
    """Base class of every edit: what to write into the selected part of one site.

    Interventions are frozen dataclasses with a readable repr, value equality and
    `to_dict`/`from_dict`. They say *what* to change; the site they are placed at (a key of
    `Edits`, or `edits=` of `Model.run`) says *where*. The model is never modified: the
    selected region is computed anew and written into a clone of the site tensor.

    **Selection.** Every intervention takes the same four keyword-only selection arguments;
    None (the default) selects the whole axis, and they combine (a token's heads, a row's
    dims):

    - `pos`: token positions. An int, a negative int (counted from the end of each row), a
      slice (int bounds, stepping forward), a list of ints (each once; values pair with them
      in the order given), or a `[batch, pos]` bool mask marking the tokens of each row (one
      row stands for every row; at least as wide as the sequence: pad it with False).
      Positions are absolute token positions, also during cached generation
      (`pos=slice(k, None)` edits every generated token; negative positions are refused while
      generating). In a padded batch they count from each row's first real token, and padding
      is never edited. At `attn.scores`/`attn.pattern`, `pos` selects query positions.
    - `heads`: an int or a list of ints (a slice also works); only at head sites (`attn.q`,
      `attn.k`, `attn.v`, `attn.z`, `attn.scores`, `attn.pattern`; under GQA `k`/`v` count
      KV heads). Anywhere else it is refused.
    - `dims`: an int, a slice or a list of ints over the site's last axis (`d_model`,
      `d_head`, `d_mlp`, `vocab`; key positions at `attn.scores`/`attn.pattern`).
    - `rows`: an int, a slice or a list of ints selecting batch rows, so one forward can carry
      different edits per row.

    **Values** (a number or a tensor, e.g. `Add`'s vector) broadcast to the selected region,
    whose axes keep the site's order (`[batch, pos, head, d_head]` at `attn.z`). A value as
    wide as the site is cut to the selection: a `d_model` vector with `dims=slice(0, 10)`, a
    `[heads, d_head]` tensor with `heads=[1, 2]`, or the whole `[batch, pos, ...]` site tensor.
    Gradients flow through edits and into the values (pass a tensor with `requires_grad`).
    Values are cast to the site tensor's dtype and device where they are used, and the edit
    computes in that dtype: a float32 vector added in a bfloat16 model is rounded to bfloat16
    first (see `as_value`).

    **Checks.** Everything is checked when the intervention is built, so a bad value fails at
    its own line:

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

    **Subclassing.** Implement `compute(region, at)` (return new values, never modify
    `region`) and declare value fields in `value_fields`; every subclass is registered by
    name for `from_dict` (pass `registered=False` for a shared base).

    Args:
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For a selection or value refused by the checks above.

    Example:
        >>> from splice import Intervention, Zero
        >>> edit = Zero(pos=slice(2, None), heads=[0, 3])
        >>> edit
        Zero(pos=slice(2, None, None), heads=(0, 3))
        >>> edit.to_dict()
        {'type': 'Zero', 'pos': {'slice': [2, None, None]}, 'heads': [0, 3]}
        >>> Intervention.from_dict(edit.to_dict()) == edit
        True
        >>> Zero(pos=1.5)
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: pos must be an int, slice or list of ints; got 1.5 (float)
    """

    pos: Positions | None = field(default=None, kw_only=True)
    heads: Index | None = field(default=None, kw_only=True)
    dims: Index | None = field(default=None, kw_only=True)
    rows: Index | None = field(default=None, kw_only=True)  # batch rows (per-row variants in one batch)

    serialisable: ClassVar[bool] = True
    # What `to_dict` says after the intervention's repr when it is not serialisable.
    refusal: ClassVar[str] = (
        "holds a Python function and cannot be serialised (to_dict, Edits.save): rebuild it in code, "
        "or express the edit with serialisable interventions"
    )
    value_fields: ClassVar[dict[str, ValueField]] = {}  # field name -> how it is checked and named

    def __init_subclass__(cls, registered: bool = True, **kwargs: Any) -> None:
        """Every subclass can be loaded by name from a file; a shared base (`registered=False`) is not one."""
        super().__init_subclass__(**kwargs)
        if registered:
            _REGISTRY[cls.__name__] = cls

    def __post_init__(self) -> None:
        object.__setattr__(self, "pos", normalize_pos(self.pos))
        object.__setattr__(self, "heads", normalize_index(self.heads, "heads"))
        object.__setattr__(self, "dims", normalize_index(self.dims, "dims"))
        object.__setattr__(self, "rows", normalize_index(self.rows, "rows"))
        for name, spec in self.value_fields.items():
            object.__setattr__(self, name, owned_value(getattr(self, name), spec))

    # -- behaviour ---------------------------------------------------------------------------
    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """New values for the selected region; what a subclass implements.

        Args:
            region: The selected part of the site tensor (see `At` for its layout). Do not
                modify it in place: it may be a view of the tensor the model produced.
            at: Where the region sits.

        Returns:
            A tensor of the region's shape, dtype and device (checked by the dispatcher).

        Example:
            >>> import torch
            >>> at = At("embed", (slice(None),) * 3, (1, 2, 3), False, (slice(None),), ("batch", "pos", "d_model"))
            >>> Scale(2.0).compute(torch.ones(1, 2, 3), at)
            tensor([[[2., 2., 2.],
                     [2., 2., 2.]]])
        """
        raise NotImplementedError

    def values(self) -> dict[str, Any]:
        """The fields holding user values (not selections), by label, for static shape checks.

        Returns:
            `{label: value}`, e.g. `{"Add vector": tensor, "Add scale": 4.0}`.

        Example:
            >>> Scale(2.0).values()
            {'Scale factor': 2.0}
        """
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

    def __eq__(self, other: object) -> bool:
        if type(self) is not type(other):
            return NotImplemented
        return all(_same(v, getattr(other, n)) for n, v, _ in self._fields())

    __hash__ = object.__hash__

    def to_dict(self) -> dict[str, Any]:
        """The intervention as JSON-safe data: `{"type": class name, field: encoded value}`.

        Fields left at None are left out; tensors, slices and dicts are encoded as
        `splice.engine.codec.encode` describes. `Edits.save` writes these records.

        Returns:
            A record `Intervention.from_dict` rebuilds an equal intervention from.

        Raises:
            SpliceError: For an intervention holding a Python function (`Apply`) or a module (`SAE`).

        Example:
            >>> Scale(0.5, pos=-1).to_dict()
            {'type': 'Scale', 'pos': -1, 'factor': 0.5}
        """
        if not self.serialisable:
            raise SpliceError(f"{self!r} {self.refusal}")
        record = {"type": type(self).__name__}
        for name, value, default in self._fields():
            if value is not None or default is dataclasses.MISSING:
                record[name] = encode(value)
        return record

    @staticmethod
    def from_dict(record: dict[str, Any]) -> Intervention:
        """Rebuild an intervention from a `to_dict` record (checked like any construction).

        Args:
            record: `{"type": name, field: encoded value, ...}`; the type is any registered
                intervention class (see `registered_types`).

        Returns:
            A new intervention of that type.

        Raises:
            SpliceError: For an unknown type or field (naming the known ones), or a value the
                intervention refuses.

        Example:
            >>> Intervention.from_dict({"type": "Zero", "heads": [1, 2]})
            Zero(heads=(1, 2))
            >>> Intervention.from_dict({"type": "Zero", "head": 1})
            Traceback (most recent call last):
            ...
            splice.errors.SpliceError: Zero has no field(s) ['head']; its fields are ['dims', 'heads', 'pos', 'rows']
        """
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
    """Set the selection to zero (zero ablation).

    `Zero(heads=h)` at `blocks.l.attn.z` removes query head h's contribution; at `attn.v` under
    GQA it silences every query head sharing KV head h. The selection rules (positions in padded
    batches and while generating, what is refused) are those of `Intervention`.

    Args:
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Example:
        >>> from splice import Zero
        >>> Zero(heads=5)
        Zero(heads=5)
        >>> Zero(pos=[-1], dims=slice(0, 10)).to_dict()
        {'type': 'Zero', 'pos': [-1], 'dims': {'slice': [0, 10, None]}}
    """

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """Zeros of the region's shape, dtype and device."""
        return torch.zeros_like(region)


@dataclass(frozen=True, eq=False, repr=False)
class Scale(Intervention):
    """Multiply the selection by `factor`.

    `Scale(1.0)` leaves the logits bit-identical. Values broadcast to the selection, and a
    factor as wide as the site is cut to it (see `Intervention` for the selection rules).

    Args:
        factor: A finite number, or a finite tensor that broadcasts to the selection (e.g. one
            factor per dim); default 1.0. Tensors are copied (gradients still flow).
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For a NaN/inf or non-numeric factor, or a bad selection.

    Example:
        >>> from splice import Scale
        >>> Scale(0.5, pos=-1)
        Scale(pos=-1, factor=0.5)
        >>> Scale(float("nan"))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Scale factor is NaN: NaN is refused in every intervention value, ...
    """

    factor: Value = 1.0

    value_fields: ClassVar = {"factor": ValueField("Scale factor")}

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """The region times the factor."""
        factor = broadcast_to_region(
            as_value(self.factor, region, "Scale factor", at.site), region, at, "Scale factor"
        )
        return region * factor


@dataclass(frozen=True, eq=False, repr=False)
class Replace(Intervention):
    """Overwrite the selection with `value`.

    The value broadcasts to the selection; a value as wide as the site (a `d_model` vector, a
    `[heads, d_head]` tensor, the whole `[batch, pos, ...]` site) is cut to it (see
    `Intervention` for the selection rules).

    Args:
        value: A number or a tensor (copied; gradients flow); default 0.0. Unlike other values
            it may be +/-inf: `Replace(float('-inf'), dims=k)` at `attn.scores` masks key k.
            NaN is refused.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For a NaN or non-numeric value, or a bad selection.

    Example:
        >>> from splice import Replace
        >>> Replace(float("-inf"), dims=3)
        Replace(dims=3, value=-inf)
        >>> Replace(float("-inf"), dims=3).to_dict()
        {'type': 'Replace', 'dims': 3, 'value': -inf}
    """

    value: Value = 0.0

    value_fields: ClassVar = {"value": ValueField("Replace value", infinite_ok=True)}

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """The value, fitted to the region (a new tensor)."""
        return broadcast_to_region(
            as_value(self.value, region, "Replace value", at.site), region, at, "Replace value"
        ).clone()


@dataclass(frozen=True, eq=False, repr=False)
class Add(Intervention):
    """Add `scale * vector` to the selection (steering, injection).

    `Add(0)` leaves the logits bit-identical. The vector broadcasts to the selection; a vector
    as wide as the site (a `d_model` steering vector with `dims=`) is cut to it (see
    `Intervention` for the selection rules). Gradients reach `vector`.

    Args:
        vector: A finite number or tensor (copied; gradients flow); default 0.0.
        scale: A finite number (or tensor) multiplying `vector`; default 1.0.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For a NaN/inf or non-numeric vector or scale, or a bad selection.

    Example:
        >>> import torch
        >>> from splice import Add, Intervention
        >>> steer = Add(torch.ones(8), scale=4.0, pos=slice(5, None))
        >>> steer
        Add(pos=slice(5, None, None), vector=<tensor float32 [8]>, scale=4.0)
        >>> Intervention.from_dict(steer.to_dict()) == steer
        True
    """

    vector: Value = 0.0
    scale: Value = 1.0

    value_fields: ClassVar = {"vector": ValueField("Add vector"), "scale": ValueField("Add scale")}

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """The region plus `scale * vector`, in the region's dtype (both values cast to it)."""
        vector = broadcast_to_region(
            as_value(self.vector, region, "Add vector", at.site), region, at, "Add vector"
        )
        if not isinstance(self.scale, torch.Tensor) and self.scale == 1:
            return region + vector
        scale = broadcast_to_region(
            as_value(self.scale, region, "Add scale", at.site), region, at, "Add scale"
        )
        return region + vector * scale


def registered_types() -> dict[str, type[Intervention]]:
    """Intervention classes by name: what `Intervention.from_dict` and edits files accept.

    Every subclass of `Intervention` is registered when it is defined (unless declared with
    `registered=False`), so a custom intervention can be loaded from a file too.

    Example:
        >>> import splice
        >>> sorted(registered_types())
        ['Add', 'Apply', 'Clamp', 'Mean', 'Patch', 'Project', 'ProjectOut', 'Replace', 'Resample', 'Scale', 'Zero']
    """
    return dict(_REGISTRY)
