"""Interventions whose values come from other runs: `Patch`, `Mean` and `Resample`.

Each holds activations recorded elsewhere (a `Recording`, a `{site: tensor}` dict, or one tensor
for whatever site it is placed at) and, at every forward, picks out the part that lines up with
the selected region. Lining up is done in one place, `aligned`, with these rules:

- rows: a source with as many rows as the batch is used row for row; one row is broadcast; a
  source of n rows in a batch of k*n rows is tiled (row r reads source row r mod n), which is how
  a sweep stacks k variants of the same n prompts;
- positions: the source must have as many positions as the forward, unless `source_pos=` names
  the source positions that feed the selected `pos` (same count), e.g. to patch between prompts
  of different lengths; a `Mean` over all positions has one position and is broadcast;
- every other axis (heads, d_head, d_model, ...) must match the site's.

In a sweep, `Patch("clean_prompt")` names a data field instead: the sweep records that field's
prompts once per prompt batch and patches from them (see `splice.patching`).

What an intervention holds, and why (the "values are owned" rule of `Intervention`): a source
given as one tensor is copied, like any other value. A Recording or a {site: tensor} dict is
*not* copied: it can hold every site of a model, and a sweep builds one Patch per variant from
the same recording, so copies would multiply its memory by the number of variants. Instead the
intervention notes each tensor's version counter when it is built and refuses to run if a source
tensor was changed in place since (`rec[site][:, 3] = 0`, an optimizer step, ...): never a silent
change, at the cost of an integer comparison per use. (Writes that bypass autograd's version
counter, through `.data` or a NumPy view, are not seen: do not do that.) `Mean` keeps only the
means it computed, which are its own.

Empty sources are refused when the intervention is built (or, for a sweep's data field, when the
sweep binds it): no sites, no recorded forwards, or a tensor with no rows or no positions, whose
mean would be NaN and which has nothing to patch from. Sources are activations: they are written
as recorded, +/-inf and NaN included (masked `attn.scores` hold -inf); the non-finite policy of
`Intervention` is for the values you write by hand.

Precision: a source is cast to the dtype (and device) of the activation it is written into, like
every declared value, so a float32 recording patches into a bfloat16 model as
`source.to(torch.bfloat16)`. `Mean` sums in float64 and keeps its means in the reference's dtype
(cast at the site in turn). A float32 source with values beyond float16's range becomes +/-inf in
a float16 model: sources are written as recorded, so this is not refused.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any, ClassVar, TypeAlias, cast

import torch

from ..errors import SpliceError
from .interventions import At, Intervention, own
from .recording import Recording
from .selection import Index, axis_selector, normalize_index
from .sites import POINT_AXES, canonical_name

# Mapping[Any, ...]: keys are site keys (SiteKey), but Mapping is invariant in its key type, so
# Mapping[SiteKey, ...] would refuse a plain dict[str, Tensor].
Source: TypeAlias = Recording | Mapping[Any, torch.Tensor | Sequence[torch.Tensor]] | torch.Tensor
"""Where recorded activations come from: a `Recording`, a `{site: tensor (or list of tensors)}`
mapping (any site key: canonical names, aliases, tuples), or one tensor for whatever site the
intervention is placed at."""


def _site_axes(name: str) -> tuple[str, ...]:
    point = name.split(".", 2)[2] if name.startswith("blocks.") else name
    return POINT_AXES.get(point, ("batch", "pos"))


def _refuse_empty(entries, kind: str, site: str) -> None:
    """A source with nothing in it: its mean would be NaN, and it has nothing to patch from."""
    if not entries:
        raise SpliceError(
            f"{kind} source for {site} holds no forwards (an accumulate-mode recording that never ran?): record at least one"
        )
    empty = [list(e.shape) for e in entries if e.numel() == 0]
    if empty:
        raise SpliceError(
            f"{kind} source for {site} is empty (shape {empty[0]}): with no rows or no positions there is nothing to take values from (its mean would be NaN)"
        )


def _as_source(value, kind: str, allow_field: bool = False):
    """A user source as a detached tensor, a {canonical site: tensor or [tensors]} dict of the
    given tensors (detached, not copied: see the module docstring), or (in sweeps) the name of a
    data field."""
    if isinstance(value, str):
        if allow_field:
            return value
        raise SpliceError(
            f"{kind} takes a Recording, a {{site: tensor}} dict or a tensor; got the string {value!r}"
        )
    if isinstance(value, torch.Tensor):
        _refuse_empty([value], kind, "this site")
        return value.detach() if value.requires_grad else value  # no new object: `own` knows its own copies
    if not isinstance(value, Mapping):
        raise SpliceError(
            f"{kind} takes a Recording, a {{site: tensor}} dict or a tensor; got {type(value).__name__}"
        )
    if not value:
        raise SpliceError(
            f"{kind} source holds no sites (an empty Recording or dict): record the reference prompts first"
        )
    out = {}
    for key, v in value.items():
        entries = list(v) if isinstance(v, (list, tuple)) else [v]
        if not all(isinstance(e, torch.Tensor) for e in entries):
            raise SpliceError(
                f"{kind} source for {key!r} must be a tensor (or a list of them); got {type(v).__name__}"
            )
        name = key if isinstance(value, Recording) else canonical_name(key)
        _refuse_empty(entries, kind, name)
        out[name] = v.detach() if isinstance(v, torch.Tensor) else [e.detach() for e in entries]
    return out


def _versions(source) -> dict | None:
    """Version counters of a shared (dict) source's tensors, to detect in-place changes later."""
    if not isinstance(source, dict):
        return None
    return {name: _version_of(v) for name, v in source.items()}


def _version_of(value) -> tuple:
    """Each tensor's version counter; None for inference-mode tensors, which keep none (they
    cannot be changed in place outside `torch.inference_mode`, where such a change goes unseen)."""
    return tuple(
        None if e.is_inference() else e._version for e in (value if isinstance(value, list) else [value])
    )


def _required(value, kind: str, allow_field: bool = False):
    if value is None:
        field_hint = ", or (in a sweep) a data field name" if allow_field else ""
        raise SpliceError(
            f"{kind} needs a source: a Recording, a {{site: tensor}} dict or a tensor{field_hint}"
        )
    return _as_source(value, kind, allow_field)


def _hold(intervention: Intervention, name: str, kind: str, allow_field: bool = False) -> None:
    """Check and store the source in field `name`: a tensor as the intervention's own copy, a
    dict shared, with the versions of its tensors noted (see the module docstring)."""
    source = _required(getattr(intervention, name), kind, allow_field)
    object.__setattr__(intervention, name, own(source) if isinstance(source, torch.Tensor) else source)
    object.__setattr__(intervention, "_versions", _versions(source))


def _for_site(source, at: At, kind: str, versions: dict | None = None):
    if isinstance(source, str):
        raise SpliceError(
            f"{kind}({source!r}) names a data field; it only has values inside a sweep (which records that "
            "field's prompts). Outside a sweep pass a Recording, e.g. from `model.run(prompts, record=...)`"
        )
    if isinstance(source, torch.Tensor):
        return source
    if at.site not in source:
        raise SpliceError(
            f"{kind} has no activations for {at.site}; its source holds {', '.join(list(source)[:8]) or 'nothing'}"
        )
    value = source[at.site]
    if versions is not None and _version_of(value) != versions[at.site]:
        raise SpliceError(
            f"{kind} source for {at.site} was changed in place after the {kind} was built; the edit would no "
            f"longer write what it was built with. Build a new {kind} from the changed source (or record again)"
        )
    return value


def _single(value, site: str, kind: str) -> torch.Tensor:
    if isinstance(value, list):
        if len(value) != 1:
            raise SpliceError(
                f"{kind} source for {site} holds {len(value)} accumulated forwards; pass one (e.g. recording.cat(site))"
            )
        return value[0]
    return value


def _count(selector, size: int) -> int:
    return len(range(size)[selector]) if isinstance(selector, slice) else selector.numel()


def aligned(
    source: torch.Tensor,
    region: torch.Tensor,
    at: At,
    kind: str,
    source_pos: int | slice | Sequence[int] | None = None,
    row_start: int | None = None,
    broadcast_pos: bool = False,
) -> torch.Tensor:
    """The part of a recorded activation that lines up with the selected region.

    Follows the row, position and axis rules in this module's docstring.

    Args:
        source: A tensor with the site's axes (rows and positions may differ, see the rules).
        region: The selected region.
        at: Where the region sits.
        kind: The intervention's name, for messages.
        source_pos: Normalised source positions feeding the selected positions one to one
            (repeats allowed); None: the source has the forward's positions.
        row_start: Source row 0 feeds the first selected row (instead of the tiling rule).
        broadcast_pos: A one-position source stands for every position (a Mean over
            positions); otherwise it is a run of another length, refused like any other
            length mismatch.

    Returns:
        Values of the region's shape, on its device and in its dtype.

    Raises:
        SpliceError: For a source whose axes, rows or positions do not line up, naming both
            shapes.

    Example:
        >>> import torch
        >>> at = At("embed", (slice(None), slice(1, 2), slice(None)), (2, 3, 4), False,
        ...         (slice(None),), ("batch", "pos", "d_model"))
        >>> source = torch.arange(12.0).reshape(1, 3, 4)  # one row: broadcast to both
        >>> aligned(source, torch.zeros(2, 1, 4), at, "Patch")
        tensor([[[4., 5., 6., 7.]],
        <BLANKLINE>
                [[4., 5., 6., 7.]]])
    """
    axes, full = at.axes, at.full_shape
    p = axes.index("pos")
    source = source.to(device=region.device, dtype=region.dtype)
    named = ", ".join(f"{a}={s}" for a, s in zip(axes, full))
    if source.dim() != len(full) or any(
        s not in (f, 1) for i, (s, f) in enumerate(zip(source.shape, full)) if i not in (0, p)
    ):
        raise SpliceError(
            f"{kind} source for {at.site} has shape {list(source.shape)}; the site is [{named}]"
        )
    index = list(at.index)
    if source_pos is not None:
        if at.masked:
            raise SpliceError(
                f"{kind} at {at.site}: source_pos= cannot re-align per-row (padded) positions; pass prompts of one length"
            )
        chosen = axis_selector(source_pos, source.shape[p], "source_pos", at.site, unique=False)
        chosen = torch.arange(source.shape[p])[chosen] if isinstance(chosen, slice) else chosen
        target = index[p]
        if chosen.numel() != _count(target, full[p]):
            raise SpliceError(
                f"{kind} at {at.site}: pos= selects {_count(target, full[p])} position(s) but source_pos= selects "
                f"{chosen.numel()}; they must pair up one to one"
            )
        source = source.index_select(p, chosen.to(source.device))
        index[p] = (
            slice(None) if isinstance(target, slice) else torch.arange(chosen.numel()).view(target.shape)
        )
    elif source.shape[p] != full[p] and not (broadcast_pos and source.shape[p] == 1):
        raise SpliceError(
            f"{kind} source for {at.site} has {source.shape[p]} positions but this forward has {full[p]} "
            f"(source shape {list(source.shape)}, site [{named}]); pass source_pos= to say which source "
            "positions feed the selected ones"
        )
    rows, batch = source.shape[0], full[0]
    if row_start is not None:
        b = index[0]
        index[0] = (
            slice(
                b.start - row_start if b.start is not None else None,
                b.stop - row_start if b.stop is not None else None,
                b.step,
            )
            if isinstance(b, slice)
            else b - row_start
        )
    elif rows not in (1, batch):
        if batch % rows:
            raise SpliceError(
                f"{kind} source for {at.site} has {rows} rows but the batch has {batch}: use as many rows, one, or a divisor (tiled prompts)"
            )
        b = index[0]
        if isinstance(b, slice):
            wanted = torch.arange(batch)[b] % rows
            start = int(wanted[0])
            if torch.equal(wanted, torch.arange(start, start + wanted.numel())):
                index[0] = slice(start, start + wanted.numel())
            else:
                source, index[0] = source.index_select(0, wanted.to(source.device)), slice(None)
        else:
            index[0] = b % rows
    shape = [s if i in (0, p) else f for i, (s, f) in enumerate(zip(source.shape, full))]
    if rows == 1 and row_start is None:
        shape[0] = batch
    if source.shape[p] == 1 and source_pos is None:
        shape[p] = full[p]
    values = source.expand(shape)[tuple(index)]
    if values.shape != region.shape:
        raise SpliceError(
            f"{kind} at {at.site}: source values have shape {list(values.shape)}, the selection {list(region.shape)}"
        )
    return values


@dataclass(frozen=True, eq=False, repr=False)
class Patch(Intervention):
    """Replace the selection with the same site's activation from another run (activation patching).

    The source is lined up with the selected region by the rules in `splice.engine.sources`:
    a source with as many rows as the batch is used row for row, one row is broadcast, n rows
    are tiled over k*n; positions must match unless `source_pos=` pairs them; every other axis
    must match the site. Values are written as recorded (+/-inf and NaN included). See
    `Intervention` for the selection rules.

    Args:
        source: A `Recording` (overwrite mode, e.g. from `model.run(prompts, record=...)` or
            `splice.patching.cache`), a `{site: tensor}` dict, or a tensor (for whatever site
            the Patch is placed at). In a sweep, the name of a data field whose prompts are the
            source (recorded once per prompt batch). A tensor is copied; a Recording or dict is
            shared, and refused at use if a tensor in it was changed in place since. Empty
            sources are refused.
        source_pos: Source positions feeding the selected `pos`, one to one (an int, slice or
            list; repeats allowed), when the two runs differ in length. Not with a bool mask.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For a missing or empty source, `source_pos` with a `pos` mask, or a bad
            selection; at the site, for a source that does not line up.

    Example:
        >>> import torch
        >>> from splice import Patch
        >>> Patch({"blocks.0.resid_pre": torch.zeros(1, 5, 8)}, pos=2)
        Patch(pos=2, source={'blocks.0.resid_pre': <tensor float32 [1, 5, 8]>})
        >>> Patch("clean", pos=[3, 4], source_pos=[0, 0]).to_dict()
        {'type': 'Patch', 'pos': [3, 4], 'source': 'clean', 'source_pos': [0, 0]}
        >>> Patch()  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Patch needs a source: a Recording, a {site: tensor} dict or a tensor, ...
    """

    source: Source | str | None = None
    source_pos: Index | None = None

    # Set per instance when built (a class default, not a dataclass field, so it stays out of
    # repr, equality and to_dict): the version counters of a shared source's tensors.
    _versions: ClassVar[dict[str, tuple] | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _hold(self, "source", "Patch", allow_field=True)
        # A source position may feed several target positions: repeats are allowed here.
        object.__setattr__(self, "source_pos", normalize_index(self.source_pos, "source_pos", unique=False))
        if self.source_pos is not None and isinstance(self.pos, torch.Tensor):
            raise SpliceError(
                "Patch: source_pos= pairs source positions with a list or slice of pos=, not with a bool mask (per-row positions)"
            )

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """The source's values for the region."""
        source = _single(_for_site(self.source, at, "Patch", self._versions), at.site, "Patch")
        return aligned(source, region, at, "Patch", self.source_pos)


def _mean(entries: list[torch.Tensor], axes: tuple[str, ...], per_position: bool, site: str) -> torch.Tensor:
    """Mean over rows (and positions unless per_position) of every entry, kept as size-1 axes."""
    p = axes.index("pos") if "pos" in axes else 1
    reduce = (0,) if per_position else (0, p)
    if per_position and len({e.shape[p] for e in entries}) > 1:
        raise SpliceError(
            f"Mean(per_position=True) at {site}: the reference forwards have different lengths {sorted({e.shape[p] for e in entries})}"
        )
    # sum() of tensors is a tensor; typeshed types sum's int start into the result.
    total = cast(torch.Tensor, sum(e.double().sum(reduce, keepdim=True) for e in entries))
    count = sum(e.shape[0] * (1 if per_position else e.shape[p]) for e in entries)
    return (total / count).to(entries[0].dtype)


@dataclass(frozen=True, eq=False, repr=False)
class Mean(Intervention):
    """Mean ablation: replace the selection with the site's mean over a reference dataset.

    Only the means are kept (and serialised), computed in float64 when the intervention is
    built and stored in the reference's dtype. See `Intervention` for the selection rules.

    Args:
        reference: A `Recording` (accumulate mode joins every recorded forward; see
            `splice.patching.mean_reference` for padding-aware means of prompts), a
            `{site: tensor or [tensors]}` dict, or a tensor (`[batch, pos, ...]`, or a
            ready-made mean of fewer axes, copied). Empty references are refused.
        per_position: Mean over rows only, one mean per position (then the reference and the
            forward must have the same length); default False: over rows and positions.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For a missing or empty reference, per-position means of forwards of
            different lengths, or a bad selection.

    Example:
        >>> import torch
        >>> from splice import Intervention, Mean
        >>> ablate = Mean({"blocks.0.resid_pre": torch.ones(4, 5, 8)})
        >>> ablate
        Mean(reference={'blocks.0.resid_pre': <tensor float32 [1, 1, 8]>}, per_position=False)
        >>> Intervention.from_dict(ablate.to_dict()) == ablate
        True
    """

    reference: Source | None = None
    per_position: bool = False

    def __post_init__(self) -> None:
        super().__post_init__()
        reference = _required(self.reference, "Mean")
        means: torch.Tensor | dict[str, torch.Tensor]
        if isinstance(reference, torch.Tensor):  # means are new tensors; a ready-made mean is copied
            means = (
                _mean([reference], ("batch", "pos"), self.per_position, "this site")
                if reference.dim() >= 2
                else own(reference)
            )
        else:
            means = {
                name: _mean(v if isinstance(v, list) else [v], _site_axes(name), self.per_position, name)
                for name, v in reference.items()
            }
        object.__setattr__(self, "reference", means)

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """The site's mean, broadcast to the region."""
        return aligned(
            _for_site(self.reference, at, "Mean"), region, at, "Mean", broadcast_pos=not self.per_position
        )


@dataclass(frozen=True, eq=False, repr=False)
class Resample(Intervention):
    """Resample ablation: each row gets the activation of a reference prompt drawn at random.

    The same draw holds for all of a row's positions, and draws are reproducible from `seed`:
    they depend only on the seed and a row's place among the selected rows, so a sweep's row
    block v draws exactly what a one-variant run draws. See `Intervention` for the selection
    rules.

    Args:
        reference: A `Recording` (overwrite mode), a `{site: tensor}` dict or a tensor, with
            one row per reference prompt and the forward's number of positions. A tensor is
            copied; a Recording or dict is shared and refused at use if changed in place since.
        seed: Seed of the draws (an int); default 0.
        pos: Token positions to edit (default all): an int, a negative int, a slice, a list of
            ints, or a `[batch, pos]` bool mask.
        heads: Heads to edit (default all): an int or a list of ints; head sites only.
        dims: Indices of the site's last axis to edit (default all): an int, slice or list.
        rows: Batch rows to edit (default all): an int, slice or list.

    Raises:
        SpliceError: For a missing or empty reference or a bad selection; at the site, for a
            reference that does not line up.

    Example:
        >>> import torch
        >>> from splice import Resample
        >>> Resample({"blocks.0.resid_pre": torch.zeros(4, 5, 8)}, seed=1)
        Resample(reference={'blocks.0.resid_pre': <tensor float32 [4, 5, 8]>}, seed=1)
    """

    reference: Source | None = None
    seed: int = 0

    # Set per instance when built (see Patch).
    _versions: ClassVar[dict[str, tuple] | None] = None

    def __post_init__(self) -> None:
        super().__post_init__()
        _hold(self, "reference", "Resample")

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        """Each selected row's drawn reference activation, lined up with the region."""
        reference = _single(_for_site(self.reference, at, "Resample", self._versions), at.site, "Resample")
        b = at.index[0]
        chosen = torch.arange(at.full_shape[0])[b] if isinstance(b, slice) else b.flatten()
        first, last = int(chosen.min()), int(chosen.max())
        generator = torch.Generator().manual_seed(self.seed)
        draws = torch.randint(reference.shape[0], (last - first + 1,), generator=generator)
        return aligned(
            reference.index_select(0, draws.to(reference.device)), region, at, "Resample", row_start=first
        )
