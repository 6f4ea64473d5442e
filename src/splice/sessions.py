"""Sessions: what one `model.edit(...)` or `model.record(...)` context adds to the hook plan.

Keys are resolved and every intervention is checked against the site's static shape here, before
any forward runs, so most mistakes surface at the `with` line rather than mid-forward.
"""

from __future__ import annotations

import torch

from .architectures import Layout
from .dispatch import Action
from .edits import Edits
from .errors import SpliceError
from .interventions import Intervention
from .recording import Recording
from .selection import _axis_selector


def _selected_size(sel, size: int | None, what: str, site: str) -> int | None:
    if size is None:  # varies per forward (key positions): checked when the forward runs
        return None
    chosen = _axis_selector(sel, size, what, site)
    return len(range(size)[chosen]) if isinstance(chosen, slice) else len(chosen)


def check_static(edit: Intervention, site_name: str, axes, shape) -> None:
    """Validate heads/dims ranges and value shapes against the site's known (non-batch, non-pos) axes."""
    has_heads = any(a in ("head", "kv_head") for a in axes)
    if edit.heads is not None and not has_heads:
        raise SpliceError(f"{edit!r}: heads= was given but {site_name} has no head axis (axes: {', '.join(axes)})")
    # Axes after pos are known statically; the rest (batch, pos, and heads before pos) at run time.
    after = axes.index("pos") + 1
    trailing_full = tuple(shape[after:])
    trailing_sel = []
    for axis, size in zip(axes, shape):
        if axis in ("head", "kv_head"):
            chosen = _selected_size(edit.heads, size, "head", site_name)
            if axes.index(axis) >= after:
                trailing_sel.append(chosen)
        elif axis == axes[-1]:
            trailing_sel.append(_selected_size(edit.dims, size, "dim", site_name))
    for what, value in edit.values().items():
        if not isinstance(value, torch.Tensor) or value.dim() == 0:
            continue
        tail = tuple(value.shape[-len(trailing_full):]) if value.dim() >= len(trailing_full) else tuple(value.shape)
        fits = lambda target: all(t is None or v in (1, t) for v, t in zip(reversed(tail), reversed(target)))  # noqa: E731
        if value.dim() > len(axes) or not (fits(tuple(trailing_sel)) or fits(trailing_full)):
            named = ", ".join(f"{a}={s}" if s is not None else a for a, s in zip(axes, shape))
            raise SpliceError(
                f"{what} of shape {list(value.shape)} cannot broadcast to the selection at {site_name}: "
                f"site is [{named}], selection keeps trailing shape {trailing_sel} "
                f"(heads={edit.heads!r}, dims={edit.dims!r})"
            )


class EditSession:
    """The interventions of one live `Edits` registry."""

    def __init__(self, edits: Edits):
        self.edits = edits

    def attach(self, refresh) -> None:
        """Rebuild the plan whenever the live registry changes."""
        self.edits._listen(refresh)

    def detach(self, refresh) -> None:
        self.edits._unlisten(refresh)

    def contribute(self, plan: dict[str, Action], layout: Layout) -> None:
        for key, edit in self.edits.items_flat():
            for site in layout.resolve(key):
                check_static(edit, site.name, layout.axes(site), layout.shape(site))
                plan.setdefault(site.name, Action(site)).edits.append(edit)


class RecordSession:
    """Sites stored into one Recording."""

    def __init__(self, recording: Recording, sites):
        self.recording = recording
        self.sites = sites

    def attach(self, refresh) -> None:
        """A recording's sites are fixed for its lifetime: nothing to listen to."""

    def detach(self, refresh) -> None:
        pass

    def contribute(self, plan: dict[str, Action], layout: Layout) -> None:
        for site in self.sites:
            plan.setdefault(site.name, Action(site)).recorders.append(self.recording)
