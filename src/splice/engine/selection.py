"""Selections: which positions, heads and dims of a site an intervention touches.

`normalize_*` turn user input into frozen, JSON-friendly values at construction time, refusing
what would otherwise edit something other than what was written (a repeated index, which would be
edited once; float or bool indices; slices that step backwards or select nothing on any axis);
`locate` turns a selection into an index into the site tensor of one forward pass. The index is
plain slicing when it can be (cheap, a view) and broadcast index tensors otherwise, so that the
selected region always keeps the axis order of the site: [batch, pos, (head), last] for outer
selections, [n_selected_tokens, (head), last] for per-row (masked) ones.
"""

from __future__ import annotations

import numbers
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Literal, TypeAlias, TypeGuard, cast, overload

import torch

from ..errors import SpliceError, valid_range
from .frame import Frame

Index: TypeAlias = int | slice | Sequence[int]
"""What `heads=`, `dims=` and `rows=` accept: an int (negative counts from the end), a slice
(int bounds, stepping forward) or a list of ints (each once). An int tensor of at most one axis is
accepted too and read as a list."""

Positions: TypeAlias = int | slice | Sequence[int] | torch.Tensor
"""What `pos=` accepts: what `Index` accepts, or a `[batch, pos]` bool mask."""

Selector: TypeAlias = slice | torch.Tensor
"""One axis of a located region: a slice, or a 1-D LongTensor of indices."""


def _integer(value: object) -> TypeGuard[numbers.Integral]:
    """An index: a Python or NumPy integer, never a bool (True would silently mean 1)."""
    return isinstance(value, numbers.Integral) and not isinstance(value, bool)


def _checked_slice(value: slice, what: str) -> slice:
    """A slice of int bounds stepping forward that selects something on an axis of some size.

    Float bounds and step 0 would fail deep inside torch; a negative step would reverse the
    pairing of per-element values with the selection; stop <= start (same sign) selects nothing
    on any axis, which would make the edit a silent no-op."""
    for name in ("start", "stop", "step"):
        bound = getattr(value, name)
        if bound is not None and not _integer(bound):
            raise SpliceError(f"{what} {value}: the slice {name} must be an int or None; got {bound!r}")
    start, stop, step = (None if b is None else int(b) for b in (value.start, value.stop, value.step))
    if step is not None and step < 1:
        raise SpliceError(f"{what} {value}: slices must step forward (step >= 1); got step {step}")
    first = 0 if start is None else start
    if stop is not None and (first >= 0) == (stop >= 0) and stop <= first:
        raise SpliceError(
            f"{what} {value} selects nothing on any axis (stop <= start); a selection must name at least one index"
        )
    return slice(start, stop, step)


def _first_repeat(values):
    """The first value that occurs twice in `values`, or None."""
    seen = set()
    for v in values:
        if v in seen:
            return v
        seen.add(v)
    return None


def normalize_index(
    value: Index | torch.Tensor | None, what: str, unique: bool = True
) -> int | slice | tuple[int, ...] | None:
    """Check a `heads=`/`dims=`/`rows=` (or `source_pos=`) selection and freeze it.

    Called when an intervention is built, so a bad selection fails at its own line. What needs
    the site's size (range checks) is checked later, by `axis_selector`.

    Args:
        value: None (everything), an int, a slice with int bounds stepping forward that selects
            something on some axis, a non-empty list/tuple/range of ints, or an int tensor of at
            most one axis (read as a list). Python and NumPy integers count; bools and floats
            do not.
        what: The argument's name, for messages (`"heads"`, `"dims"`, ...).
        unique: Refuse an index listed twice (default). The edit would touch it once however
            often it is listed (an `Add` listed twice is applied once); `source_pos` passes
            False, since one source position may feed several targets.

    Returns:
        None, an int, a slice or a tuple of ints (JSON-friendly and hashable).

    Raises:
        SpliceError: For a bool or float index or tensor, a bool mask (only `pos=` takes
            one), an empty list, a repeated index, a slice stepping backwards or by 0, with
            non-int bounds, or selecting nothing on any axis.

    Example:
        >>> normalize_index([2, 0], "heads")
        (2, 0)
        >>> normalize_index(slice(4, 2), "dims")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: dims slice(4, 2, None) selects nothing on any axis ...
    """
    if value is None:
        return None
    if isinstance(value, slice):
        return _checked_slice(value, what)
    if isinstance(value, torch.Tensor):
        if value.dtype == torch.bool:
            raise SpliceError(
                f"{what} got a bool tensor {list(value.shape)}: {what} takes indices; a [batch, pos] bool mask is only for pos="
            )
        if value.is_floating_point() or value.is_complex() or value.dim() > 1:
            raise SpliceError(
                f"{what} must be an int, slice or list of ints; got a {value.dtype} tensor of shape {list(value.shape)}"
            )
        return normalize_index(value.tolist(), what, unique)
    if _integer(value):
        return int(value)
    if isinstance(value, (list, tuple, range)):
        if len(value) == 0:
            raise SpliceError(f"{what} is an empty list: it would select nothing")
        bad = [v for v in value if not _integer(v)]
        if bad:
            raise SpliceError(
                f"{what} must be an int, slice or list of ints; {list(value)!r} holds {bad[0]!r} ({type(bad[0]).__name__})"
            )
        value = tuple(int(v) for v in value)
        repeat = _first_repeat(value) if unique else None
        if repeat is not None:
            raise SpliceError(
                f"{what} {list(value)} lists {repeat} twice: a selected element is edited once however often it "
                "is listed (an Add would be applied once, not twice); list each index once"
            )
        return value
    raise SpliceError(f"{what} must be an int, slice or list of ints; got {value!r} ({type(value).__name__})")


def normalize_pos(value: Positions | None) -> int | slice | tuple[int, ...] | torch.Tensor | None:
    """Check a `pos=` selection and freeze it: what `normalize_index` takes, or a bool mask.

    Args:
        value: None (every position), an int (negative counts from the end of each row), a
            slice, a list of ints, or a `[batch, pos]` bool tensor marking the tokens to edit
            per row (its batch axis may be 1, standing for every row).

    Returns:
        What `normalize_index` returns, or a detached copy of the mask (the edit owns it:
        changing yours later does not change the edit).

    Raises:
        SpliceError: For a mask that is not 2-D, or anything `normalize_index` refuses.

    Example:
        >>> import torch
        >>> normalize_pos(-1)
        -1
        >>> normalize_pos(torch.tensor([[False, True, True]]))
        tensor([[False,  True,  True]])
    """
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        if value.dim() != 2:
            raise SpliceError(f"a pos mask must be a [batch, pos] bool tensor; got shape {list(value.shape)}")
        return value.detach().clone()
    return normalize_index(value, "pos")


def _refuse_repeat(what: str, given, resolved, site: str, axis: str) -> None:
    """Indices that differ as written but name one element (1 and -8 of 9): refused like a literal repeat."""
    seen: dict[int, int] = {}
    for g, r in zip(given, resolved):
        if r in seen:
            raise SpliceError(
                f"{what} {list(given)} at {site} names one element twice: {seen[r]} and {g} both mean index {r} "
                f"of {axis}, which would be edited once, not twice. List each index once"
            )
        seen[r] = g


@overload
def axis_selector(
    sel: int | slice | Sequence[int] | None,
    size: int,
    what: str,
    site: str,
    growing: Literal[False] = False,
    unique: bool = True,
    clamp: bool = False,
) -> Selector: ...
@overload
def axis_selector(
    sel: int | slice | Sequence[int] | None,
    size: int,
    what: str,
    site: str,
    growing: bool,
    unique: bool = True,
    clamp: bool = False,
) -> Selector | None: ...
def axis_selector(
    sel: int | slice | Sequence[int] | None,
    size: int,
    what: str,
    site: str,
    growing: bool = False,
    unique: bool = True,
    clamp: bool = False,
) -> Selector | None:
    """Turn a normalised selection into a selector along one axis of known size, range-checked.

    Args:
        sel: A normalised selection (see `normalize_index`); None selects the whole axis.
        size: Length of the axis in this forward.
        what: The axis, for messages (`"head"`, `"dim"`, `"row"`).
        site: The site name, for messages.
        growing: The axis grows as generation goes on (key positions): indices beyond it
            select nothing yet (None is returned when nothing is left) instead of raising, and
            negative indices are refused (they would name different keys at every step).
        unique: Refuse two indices naming one element (`1` and `-3` of 4; default). False
            allows repeats (`source_pos` pairs with `pos`).
        clamp: A token axis: slice bounds beyond the current length are clipped like Python's.
            On a fixed axis (heads, dims) they are refused: `dims=slice(0, 128)` on 64 dims
            would edit half of what was meant.

    Returns:
        A slice (cheap: indexing with it gives a view) or a 1-D LongTensor of non-negative
        indices in the order given; None only for a `growing` axis with nothing selected yet.

    Raises:
        SpliceError: For an index out of range, a slice reaching beyond a fixed axis or
            selecting nothing, or a repeat (with `unique`).

    Example:
        >>> axis_selector(-1, 4, "head", "blocks.0.attn.z")
        slice(3, 4, None)
        >>> axis_selector([3, 0], 4, "head", "blocks.0.attn.z")
        tensor([3, 0])
        >>> axis_selector(slice(0, 8), 4, "dim", "blocks.0.attn.z")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: dim slice(0, 8, None) reaches beyond the axis at blocks.0.attn.z: ...
    """
    if sel is None:
        return slice(None)
    if growing and _negative(sel):
        raise SpliceError(
            f"{what} {sel} at {site}: negative key positions are ambiguous while generating; use absolute ones"
        )
    if isinstance(sel, int):
        if not -size <= sel < size:
            if growing:
                return None
            raise SpliceError(f"{what} {sel} is out of range at {site}: valid {valid_range(size)}")
        sel %= size
        return slice(sel, sel + 1)
    if isinstance(sel, slice):
        beyond = [b for b in (sel.start, sel.stop) if b is not None and not -size <= b <= size]
        if beyond and not (growing or clamp):
            raise SpliceError(
                f"{what} {sel} reaches beyond the axis at {site}: it has size {size}, so slice bounds must lie "
                f"in -{size}..{size} (indices {valid_range(size)})"
            )
        if len(range(size)[sel]) == 0:
            if growing:
                return None
            raise SpliceError(
                f"{what} {sel} selects nothing at {site} (axis of size {size}, valid {valid_range(size)})"
            )
        return sel
    if growing:
        sel = [i for i in sel if i < size]
        if not sel:
            return None
    bad = [i for i in sel if not -size <= i < size]
    if bad:
        raise SpliceError(f"{what} {bad} out of range at {site}: valid {valid_range(size)}")
    resolved = [i % size for i in sel]
    if unique:
        _refuse_repeat(what, sel, resolved, site, f"an axis of size {size}")
    return torch.tensor(resolved)


@dataclass
class Region:
    """Where an edit lands in one site tensor, as `locate` finds it for one forward.

    Attributes:
        index: A tuple indexing the site tensor: `site[index]` is the selected region, in the
            site's axis order (slices where possible, broadcast LongTensors otherwise).
        masked: True when positions differ per row (padding or a bool mask): then the region's
            first axis enumerates the selected (row, position) pairs.
        trailing: The selectors of the axes after `pos` (heads, dims), used to cut a value as
            wide as the site down to the selection.

    Example:
        >>> Region((slice(None), slice(2, 3)), False).masked
        False
    """

    index: tuple
    masked: bool  # True: first axis of the region enumerates (row, position) pairs
    trailing: tuple = ()  # per-axis selectors (slice or 1-D LongTensor) of the axes after pos


def _pos_outer(pos, frame: Frame, site: str):
    """Uniform rows: absolute positions -> slice/LongTensor of local positions, or None if none here."""
    past, seq, total = frame.past, frame.seq, frame.past + frame.seq

    def check(p):
        if not frame.cached and not -total <= p < total:
            raise SpliceError(
                f"pos {p} is out of range at {site}: the sequence has {total} tokens, valid {valid_range(total)}"
            )
        return p + total if p < 0 else p

    if pos is None:
        return slice(None)
    if isinstance(pos, int):
        p = check(pos) - past
        return slice(p, p + 1) if 0 <= p < seq else None
    if isinstance(pos, slice):
        span = range(total if not frame.cached or pos.stop is None or pos.stop < 0 else max(total, pos.stop))[
            pos
        ]
        if not frame.cached and len(span) == 0:
            raise SpliceError(f"pos {pos} selects nothing at {site}: the sequence has {total} tokens")
        if span.step == 1:
            lo, hi = max(span.start, past), min(span.stop, total)
            return slice(lo - past, hi - past) if lo < hi else None
        local = [p - past for p in span if past <= p < total]
    else:
        # In the order given, so that per-position values and source_pos pair up as written.
        absolute = [check(p) for p in pos]
        _refuse_repeat("pos", pos, absolute, site, f"a {total}-token sequence")
        local = [p - past for p in absolute if past <= p < total]
    return torch.tensor(local) if local else None


def _pos_mask(pos, frame: Frame, site: str):
    """Per-row positions (padding, or a user mask) -> [batch, seq] bool mask of tokens to edit."""
    positions, valid, lengths = frame.positions()
    if isinstance(pos, torch.Tensor):
        if pos.shape[0] not in (1, frame.batch):
            raise SpliceError(f"pos mask at {site} has {pos.shape[0]} rows; the batch has {frame.batch}")
        width, longest = pos.shape[1], int(lengths.max())
        if width < longest:
            raise SpliceError(
                f"pos mask at {site} has {width} columns but the sequence has {longest} tokens: positions "
                f"{width}..{longest - 1} would silently stay unedited. Pad the mask with False to at least "
                f"{longest} columns (when generating, to the prompt length plus the new tokens)"
            )
        inside = positions < width
        gathered = (
            pos.to(positions.device)
            .expand(frame.batch, width)
            .gather(1, positions.clamp(min=0, max=width - 1))
        )
        return gathered & inside & valid
    longest = int(lengths.max())
    if pos is None:
        return valid
    if isinstance(pos, slice):
        start, stop, step = pos.start or 0, pos.stop, pos.step or 1
        if step <= 0:
            raise SpliceError(f"pos slices must step forward; got {pos} at {site}")
        start_t = torch.as_tensor(start) + (lengths if start < 0 else 0)
        stop_t = lengths if stop is None else torch.as_tensor(stop) + (lengths if stop < 0 else 0)
        mask = (
            (positions >= start_t[..., None])
            & (positions < stop_t[..., None])
            & ((positions - start_t[..., None]) % step == 0)
        )
        return mask & valid
    wanted = [pos] if isinstance(pos, int) else list(pos)
    # Only a list mixing signs can name one token twice in some row (literal repeats are refused
    # at construction): check overlaps then, and only then.
    mixed = any(p < 0 for p in wanted) and any(p >= 0 for p in wanted)
    mask = torch.zeros_like(valid)
    for i, p in enumerate(wanted):
        if not frame.cached and not -longest <= p < longest:
            raise SpliceError(
                f"pos {p} is out of range at {site}: the longest row has {longest} tokens, valid {valid_range(longest)}"
            )
        target = lengths + p if p < 0 else torch.full_like(lengths, p)
        hit = (positions == target[:, None]) & valid
        if mixed and bool((hit & mask).any()):
            row = int((hit & mask).any(-1).nonzero()[0])
            n = int(lengths[row])
            _refuse_repeat(
                "pos",
                wanted[: i + 1],
                [q % n if q < 0 else q for q in wanted[: i + 1]],
                site,
                f"row {row} ({n} tokens)",
            )
        mask |= hit
    return mask


def positions_needed(pos: Positions | None) -> int | None:
    """How many tokens a sequence must have for every position a `pos=` selection names to exist.

    `generate` uses it to refuse edits it could never reach (`pos=50` with 20 new tokens after
    a 10-token prompt).

    Args:
        pos: A normalised `pos=` selection (see `normalize_pos`).

    Returns:
        The minimum length, or None when there is no fixed number (every position, a mask,
        negative positions, a slice starting from the end).

    Example:
        >>> positions_needed(3), positions_needed(slice(4, None)), positions_needed((1, 5))
        (4, 5, 6)
        >>> positions_needed(-1) is None
        True
    """
    if isinstance(pos, int):
        return pos + 1 if pos >= 0 else None
    if isinstance(pos, slice):
        return pos.start + 1 if pos.start is not None and pos.start >= 0 else None
    if isinstance(pos, tuple) and pos and all(p >= 0 for p in pos):
        return max(pos) + 1
    return None


def _negative(pos) -> bool:
    if isinstance(pos, int):
        return pos < 0
    if isinstance(pos, slice):
        return any(b is not None and b < 0 for b in (pos.start, pos.stop))
    return isinstance(pos, tuple) and any(p < 0 for p in pos)


def locate(
    pos: Positions | None,
    heads: Index | None,
    dims: Index | None,
    rows: Index | None,
    shape: tuple[int, ...],
    axes: tuple[str, ...],
    frame: Frame,
    site: str,
) -> Region | None:
    """Find where an intervention's selection lands in one site tensor of one forward.

    Positions are absolute token positions: during cached decoding a forward holds only the
    newest tokens, and a position before them selects nothing here. In a padded batch (or with
    a bool mask) positions count from each row's first real token and padding is never
    selected; the region then enumerates (row, position) pairs (`Region.masked`).

    Args:
        pos: Normalised `pos=` selection (see `normalize_pos`).
        heads: Normalised `heads=` selection; refused at a site without a head axis.
        dims: Normalised `dims=` selection over the last axis (key positions at
            `attn.scores`/`attn.pattern`, clipped to the keys there are).
        rows: Normalised `rows=` selection over the batch axis.
        shape: The site tensor's shape in this forward.
        axes: The site's axis names, e.g. `("batch", "pos", "head", "d_head")`.
        frame: This forward's positions (see `Frame`).
        site: The site name, for messages.

    Returns:
        The `Region`, or None if nothing is selected in this forward (e.g. a prompt position
        during a later decoding step).

    Raises:
        SpliceError: For an index out of range, `heads=` at a site without heads, negative
            positions while generating, a mask narrower than the sequence or with the wrong
            number of rows, or one position named twice.

    Example:
        >>> from splice.engine.frame import Frame
        >>> axes = ("batch", "pos", "head", "d_head")
        >>> region = locate(-1, 1, None, None, (2, 5, 3, 4), axes, Frame(2, 5), "blocks.0.attn.z")
        >>> region.index
        (slice(None, None, None), slice(4, 5, None), slice(1, 2, None), slice(None, None, None))
        >>> locate(7, None, None, None, (2, 5, 8), ("batch", "pos", "d_model"), Frame(2, 5), "embed")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: pos 7 is out of range at embed: the sequence has 5 tokens, valid 0..4 (or -5..-1)
    """
    if frame.cached and _negative(pos):
        raise SpliceError(
            f"pos {pos} at {site}: negative positions are ambiguous while generating (the sequence grows "
            "each step, so -1 would mean a different token in cached and uncached decoding); use absolute "
            "positions, e.g. pos=slice(prompt_length, None) for every generated token"
        )
    if heads is not None and not any(a in ("head", "kv_head") for a in axes):
        raise SpliceError(f"heads= was given but {site} has no head axis (its axes are {', '.join(axes)})")
    found: list[Selector | None] = []
    for axis, size in zip(axes, shape):
        if axis == "batch":
            found.append(axis_selector(rows, size, "row", site))
        elif axis in ("head", "kv_head"):
            found.append(axis_selector(heads, size, "head", site))
        elif axis == axes[-1]:
            keys = axis == "k_pos"  # a token axis: slices are clipped to the keys there are
            found.append(axis_selector(dims, size, "dim", site, growing=keys and frame.cached, clamp=keys))
        else:
            found.append(slice(None))
    if any(s is None for s in found):
        return None
    selectors = cast("list[Selector]", found)  # none is None (just checked)
    pos_axis = axes.index("pos")
    trailing = tuple(selectors[pos_axis + 1 :])
    n = len(shape)
    if not isinstance(pos, torch.Tensor) and frame.uniform:
        chosen = _pos_outer(pos, frame, site)
        if chosen is None:
            return None
        selectors[pos_axis] = chosen
        if all(isinstance(s, slice) for s in selectors):
            return Region(tuple(selectors), False, trailing)
        ranges = [torch.arange(size)[s] if isinstance(s, slice) else s for s, size in zip(selectors, shape)]
        return Region(
            tuple(r.view([-1 if i == k else 1 for k in range(n)]) for i, r in enumerate(ranges)),
            False,
            trailing,
        )
    # Per-row positions: enumerate selected (row, position) pairs on the region's first axis,
    # followed by the remaining axes in order.
    mask = _pos_mask(pos, frame, site)
    if rows is not None:
        keep = torch.zeros(shape[0], dtype=torch.bool, device=mask.device)
        keep[selectors[0]] = True
        mask = mask & keep[:, None]
    chosen_rows, cols = mask.nonzero(as_tuple=True)
    if chosen_rows.numel() == 0:
        return None
    index, k = [], 1
    for i, (s, size) in enumerate(zip(selectors, shape)):
        if i == 0:
            index.append(chosen_rows.view([-1] + [1] * (n - 2)))
        elif i == pos_axis:
            index.append(cols.view([-1] + [1] * (n - 2)))
        else:
            r = torch.arange(size)[s] if isinstance(s, slice) else s
            index.append(r.view([-1 if j == k else 1 for j in range(n - 1)]))
            k += 1
    return Region(tuple(index), True, trailing)
