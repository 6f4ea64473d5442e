"""Selections: which positions, heads and dims of a site an intervention touches.

`normalize_*` turn user input into frozen, JSON-friendly values at construction time;
`locate` turns a selection into an index into the site tensor of one forward pass. The index is
plain slicing when it can be (cheap, a view) and broadcast index tensors otherwise, so that the
selected region always keeps the axis order of the site: [batch, pos, (head), last] for outer
selections, [n_selected_tokens, (head), last] for per-row (masked) ones.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import SpliceError, valid_range
from .frame import Frame


def normalize_index(value, what: str):
    """heads/dims: None, int, slice, or a tuple of ints."""
    if value is None or isinstance(value, slice):
        return value
    if isinstance(value, bool):
        raise SpliceError(f"{what} must be an int, slice or list of ints, not a bool")
    if isinstance(value, int):
        return value
    if isinstance(value, torch.Tensor) and value.dim() <= 1 and not value.is_floating_point():
        value = value.tolist()
    if isinstance(value, (list, tuple, range)) and all(isinstance(v, int) and not isinstance(v, bool) for v in value):
        if len(value) == 0:
            raise SpliceError(f"{what} is an empty list: it would select nothing")
        return tuple(value)
    raise SpliceError(f"{what} must be an int, slice or list of ints; got {value!r}")


def normalize_pos(value):
    """pos: what normalize_index takes, or a [batch, pos] bool mask."""
    if isinstance(value, torch.Tensor) and value.dtype == torch.bool:
        if value.dim() != 2:
            raise SpliceError(f"a pos mask must be a [batch, pos] bool tensor; got shape {list(value.shape)}")
        return value.detach().clone()
    return normalize_index(value, "pos")


def _axis_selector(sel, size: int, what: str, site: str, growing: bool = False):
    """A slice or a LongTensor selecting along one axis of known size, with range checks.

    `growing`: the axis grows as generation goes on (key positions); indices beyond it select
    nothing yet (None is returned when nothing is left) instead of raising."""
    if sel is None:
        return slice(None)
    if growing and _negative(sel):
        raise SpliceError(f"{what} {sel} at {site}: negative key positions are ambiguous while generating; use absolute ones")
    if isinstance(sel, int):
        if not -size <= sel < size:
            if growing:
                return None
            raise SpliceError(f"{what} {sel} is out of range at {site}: valid {valid_range(size)}")
        sel %= size
        return slice(sel, sel + 1)
    if isinstance(sel, slice):
        if len(range(size)[sel]) == 0:
            if growing:
                return None
            raise SpliceError(f"{what} {sel} selects nothing at {site} (axis of size {size}, valid {valid_range(size)})")
        return sel
    if growing:
        sel = [i for i in sel if i < size]
        if not sel:
            return None
    bad = [i for i in sel if not -size <= i < size]
    if bad:
        raise SpliceError(f"{what} {bad} out of range at {site}: valid {valid_range(size)}")
    return torch.tensor([i % size for i in sel])


@dataclass
class Region:
    """Where an edit lands in one site tensor: `index` selects `shape` elements."""

    index: tuple
    masked: bool  # True: first axis of the region enumerates (row, position) pairs
    trailing: tuple = ()  # per-axis selectors (slice or 1-D LongTensor) of the axes after pos


def _pos_outer(pos, frame: Frame, site: str):
    """Uniform rows: absolute positions -> slice/LongTensor of local positions, or None if none here."""
    past, seq, total = frame.past, frame.seq, frame.past + frame.seq

    def check(p):
        if not frame.cached and not -total <= p < total:
            raise SpliceError(f"pos {p} is out of range at {site}: the sequence has {total} tokens, valid {valid_range(total)}")
        return p + total if p < 0 else p

    if pos is None:
        return slice(None)
    if isinstance(pos, int):
        p = check(pos) - past
        return slice(p, p + 1) if 0 <= p < seq else None
    if isinstance(pos, slice):
        absolute = range(total if not frame.cached or pos.stop is None or pos.stop < 0 else max(total, pos.stop))[pos]
        if not frame.cached and len(absolute) == 0:
            raise SpliceError(f"pos {pos} selects nothing at {site}: the sequence has {total} tokens")
        if absolute.step == 1:
            lo, hi = max(absolute.start, past), min(absolute.stop, total)
            return slice(lo - past, hi - past) if lo < hi else None
        local = [p - past for p in absolute if past <= p < total]
    else:
        local = sorted({check(p) - past for p in pos})
        local = [p for p in local if 0 <= p < seq]
    return torch.tensor(local) if local else None


def _pos_mask(pos, frame: Frame, site: str):
    """Per-row positions (padding, or a user mask) -> [batch, seq] bool mask of tokens to edit."""
    positions, valid, lengths = frame.positions()
    if isinstance(pos, torch.Tensor):
        if pos.shape[0] not in (1, frame.batch):
            raise SpliceError(f"pos mask at {site} has {pos.shape[0]} rows; the batch has {frame.batch}")
        width = pos.shape[1]
        inside = positions < width
        gathered = pos.to(positions.device).expand(frame.batch, width).gather(1, positions.clamp(max=width - 1))
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
        mask = (positions >= start_t[..., None]) & (positions < stop_t[..., None]) & ((positions - start_t[..., None]) % step == 0)
        return mask & valid
    wanted = [pos] if isinstance(pos, int) else list(pos)
    mask = torch.zeros_like(valid)
    for p in wanted:
        if not frame.cached and not -longest <= p < longest:
            raise SpliceError(f"pos {p} is out of range at {site}: the longest row has {longest} tokens, valid {valid_range(longest)}")
        target = lengths + p if p < 0 else torch.full_like(lengths, p)
        mask |= positions == target[:, None]
    return mask & valid


def _negative(pos) -> bool:
    if isinstance(pos, int):
        return pos < 0
    if isinstance(pos, slice):
        return any(b is not None and b < 0 for b in (pos.start, pos.stop))
    return isinstance(pos, tuple) and any(p < 0 for p in pos)


def locate(pos, heads, dims, rows, shape, axes, frame: Frame, site: str) -> Region | None:
    """The index of the selected region in a site tensor, or None if nothing is selected in this forward."""
    if frame.cached and _negative(pos):
        raise SpliceError(
            f"pos {pos} at {site}: negative positions are ambiguous while generating (the sequence grows "
            "each step, so -1 would mean a different token in cached and uncached decoding); use absolute "
            "positions, e.g. pos=slice(prompt_length, None) for every generated token"
        )
    if heads is not None and not any(a in ("head", "kv_head") for a in axes):
        raise SpliceError(f"heads= was given but {site} has no head axis (its axes are {', '.join(axes)})")
    selectors = []
    for axis, size in zip(axes, shape):
        if axis == "batch":
            selectors.append(_axis_selector(rows, size, "row", site))
        elif axis in ("head", "kv_head"):
            selectors.append(_axis_selector(heads, size, "head", site))
        elif axis == axes[-1]:
            selectors.append(_axis_selector(dims, size, "dim", site, growing=axis == "k_pos" and frame.cached))
        else:
            selectors.append(slice(None))
    if any(s is None for s in selectors):
        return None
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
        return Region(tuple(r.view([-1 if i == k else 1 for k in range(n)]) for i, r in enumerate(ranges)), False, trailing)
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
