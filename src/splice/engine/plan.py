"""The plan of a forward: what happens at each site (edits in order, then recorders), built from
the scopes the calling context has open, and applied to one site tensor.

Pure: nothing here holds state between forwards, installs a hook or knows about threads. The
hook engine (`splice.engine.hooks`) and the attention routing (`splice.engine.attention`) import this module;
it imports neither.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, TypeAlias

import torch

from ..errors import SpliceError
from .autoencoders import fit
from .edits import Edits
from .frame import Frame
from .interventions import At, Intervention
from .recording import Recording
from .selection import axis_selector, locate
from .sites import Site, site_axes
from .spliced import SAE, through

if TYPE_CHECKING:
    from .layout import Layout

HookPoints: TypeAlias = dict[tuple[str, str], int | None]
"""{(module path, "input" | "output"): layer whose residual input that hook saves, or None}."""


class StopForward(Exception):
    """Raised once a stopping recording holds every site it records: the rest of the forward
    (later layers, the unembedding) is not needed. `Model.run(stop_after_record=True)` catches it.

    Not an error: it is how a forward ends early, so it does not derive from `SpliceError`.
    """


# -- scopes: what one `with` block adds ----------------------------------------------------------
class Scope:
    """What one `with` block adds to the plan. Its entries and the hooks they need are computed
    once per model and content (a live registry's version) and reused: entering a context per call
    must not resolve and check the same keys again."""

    closed = (
        False  # set once when the block ends; a context copied from inside it (an asyncio task) then drops it
    )
    _memo: tuple[Any, list[tuple[Site, Any]], tuple[HookPoints, bool]] | None = None

    @property
    def version(self) -> tuple[int, bool]:
        """(content version, closed): a stack of scopes rebuilds its plan when any changes."""
        return (self._content_version(), self.closed)

    def _content_version(self) -> int:
        return 0

    def _compute_entries(self, layout: Layout) -> list[tuple[Site, Any]]:
        raise NotImplementedError

    def _memoised(self, layout: Layout) -> tuple[Any, list[tuple[Site, Any]], tuple[HookPoints, bool]]:
        key = (id(layout), self._content_version())
        if self._memo is None or self._memo[0] != key:
            entries = self._compute_entries(layout)
            self._memo = (key, entries, hook_points([site for site, _ in entries], layout))
        return self._memo

    def entries(self, layout: Layout) -> list[tuple[Site, Any]]:
        """(site, item) in application order: item is an Intervention or this RecordScope.

        Raises:
            SpliceError: For a key or value that does not fit the model (see `check_static`).
        """
        return self._memoised(layout)[1]

    def hooks(self, layout: Layout) -> tuple[HookPoints, bool]:
        """What the engine must install for this scope (see `hook_points`)."""
        return self._memoised(layout)[2]


@dataclass(eq=False)
class EditScope(Scope):
    """The interventions of one live `Edits` registry, for as long as its block is open."""

    edits: Edits

    def _content_version(self) -> int:
        return self.edits.version

    def _compute_entries(self, layout: Layout) -> list[tuple[Site, Any]]:
        """Every intervention checked against its site's static shape, and every SAE against its
        site's width: a mistake surfaces at the `with` line (or the assignment), not mid-forward.
        (Latent indices at `.sae.acts` are checked by `build_plan`, which sees the attached SAE.)"""
        out = []
        for key, edit in self.edits.items_flat():
            for site in layout.sites_of(key):
                if isinstance(edit, SAE):
                    if site.part is not None:
                        raise SpliceError(f"an SAE is attached at a site, not at the sub-site {site.name}")
                    fit(edit.sae, site.name, layout.axes(site), layout.shape(site))
                else:
                    check_static(edit, site.name, layout.axes(site), layout.shape(site))
                out.append((site, edit))
        return out


@dataclass(eq=False)
class RecordScope(Scope):
    """Sites stored into one Recording; `stop_when_complete` ends the forward once all are stored."""

    recording: Recording
    sites: tuple[Site, ...]
    stop_when_complete: bool = False

    def _compute_entries(self, layout: Layout) -> list[tuple[Site, Any]]:
        return [(site, self) for site in self.sites]


# -- the plan ------------------------------------------------------------------------------------
@dataclass(frozen=True)
class Action:
    """What happens at one site during a forward: edits in order, then recorders.

    Attributes:
        site: The site.
        edits: Its interventions, in the order the contexts were opened and listed them.
        recorders: The recordings storing it (after the edits).
    """

    site: Site
    edits: tuple[Intervention, ...] = ()
    recorders: tuple[RecordScope, ...] = ()
    attached: Attached | None = None


@dataclass(frozen=True)
class Attached:
    """An SAE attached at a site, with what happens at its sub-sites (None: nothing there).

    Attributes:
        sae: The `SAE` edit.
        head: The head a one-head SAE reads, else None.
        acts, recon, error: The actions at `<site>.sae.acts`, `.sae.recon`, `.sae.error`.
    """

    sae: SAE
    head: int | None
    acts: Action | None = None
    recon: Action | None = None
    error: Action | None = None


@dataclass(frozen=True)
class Plan:
    """What one forward does: site name -> `Action`. An empty plan is falsy.

    Example:
        >>> from splice import Scale
        >>> from splice.engine.sites import Site
        >>> plan = Plan({"embed": Action(Site("embed"), (Scale(2.0),))})
        >>> bool(plan), bool(EMPTY), plan.unfired(set())
        (True, False, ['embed'])
    """

    actions: dict[str, Action] = field(default_factory=dict)
    orphans: tuple[str, ...] = ()  # SAE sub-sites with edits or recorders but no SAE attached

    def __bool__(self) -> bool:
        return bool(self.actions) or bool(self.orphans)

    def get(self, name: str) -> Action | None:
        """The action at a canonical site name, or None."""
        return self.actions.get(name)

    def unfired(self, fired: set[str]) -> list[str]:
        """Sites whose edits never ran (their module was not called) in a forward that fired `fired`."""
        edited = [
            sub
            for action in self.actions.values()
            for sub in (action, *_subactions(action))
            if sub.edits and sub.site.name not in fired
        ]
        return [action.site.name for action in edited]

    def check_attached(self) -> None:
        """Refuse a forward whose edits or recordings name sub-sites of an SAE nobody attached.

        Raises:
            SpliceError: Naming them and how to attach one.
        """
        if self.orphans:
            base = self.orphans[0].rsplit(".sae.", 1)[0]
            raise SpliceError(
                f"{', '.join(self.orphans)}: no SAE is attached at {base} in this forward; attach one with "
                f"`with model.attach(sae, site={base!r})` or Edits({{{base!r}: splice.SAE(sae)}})"
            )


def _subactions(action: Action) -> tuple[Action, ...]:
    attached = action.attached
    if attached is None:
        return ()
    return tuple(a for a in (attached.acts, attached.recon, attached.error) if a is not None)


EMPTY = Plan()
"""The plan of a forward with nothing open."""


def build_plan(scopes: Iterable[Scope], layout: Layout) -> Plan:
    """The plan of the open scopes, in the order they were opened (closed ones are skipped).

    An SAE's sub-sites are gathered under the site it is attached at; a sub-site with no SAE
    attached is kept aside (`Plan.orphans`) and refused when a forward begins, so a context may
    be opened before the one that attaches the SAE.

    Raises:
        SpliceError: On a key or value that does not fit the model, a latent index beyond the
            attached SAE's `d_sae`, or two SAEs attached at one site, before anything is
            installed.
    """
    edits: dict[str, list] = {}
    recorders: dict[str, list] = {}
    saes: dict[str, SAE] = {}
    sites: dict[str, Site] = {}
    for scope in scopes:
        if scope.closed:
            continue
        for site, item in scope.entries(layout):
            sites.setdefault(site.name, site)
            if isinstance(item, SAE):
                if site.name in saes and saes[site.name] is not item:
                    raise SpliceError(
                        f"two SAEs are attached at {site.name}; its sub-sites would be ambiguous (attach one per site)"
                    )
                saes[site.name] = item
            else:
                (edits if isinstance(scope, EditScope) else recorders).setdefault(site.name, []).append(item)

    def action(name: str) -> Action:
        return Action(sites[name], tuple(edits.get(name, ())), tuple(recorders.get(name, ())))

    subs = {name for name, site in sites.items() if site.part is not None}
    actions = {name: action(name) for name in sites if name not in subs}
    for name, item in saes.items():
        site = sites[name]
        parts = {}
        for part in ("sae.acts", "sae.recon", "sae.error"):
            sub = f"{name}.{part}"
            if sub in subs:
                parts[part.split(".")[1]] = action(sub)
                subs.discard(sub)
        if "acts" in parts and item.d_sae is not None:
            for edit in parts["acts"].edits:
                check_static(
                    edit,
                    f"{name}.sae.acts",
                    site_axes(Site(site.point, site.layer, "sae.acts")),
                    (None, None, item.d_sae),
                )
        head = fit(item.sae, name, layout.axes(site), layout.shape(site))
        actions[name] = dataclasses.replace(actions[name], attached=Attached(item, head, **parts))
    return Plan(actions, tuple(sorted(subs)))


def hook_points(sites: Iterable[Site], layout: Layout) -> tuple[HookPoints, bool]:
    """What the engine must install for these sites: {(module path, io): layer whose residual input
    that hook saves, or None}, in first-use order, and whether attention must be routed."""
    wanted: dict[tuple[str, str], int | None] = {}
    attention = False
    for site in sites:
        hook, layer_input = layout.hooks_of(site)
        if hook is None:
            attention = True
            continue
        wanted.setdefault(hook, None)
        if layer_input is not None:
            wanted[layer_input] = site.layer
    return wanted, attention


# -- applying it ---------------------------------------------------------------------------------
def check_same(site: str, before: torch.Tensor, after: object, what: str) -> None:
    """An edit's result must be a tensor exactly like the one it replaces.

    Args:
        site: The site, for messages.
        before: The tensor being replaced.
        after: What the edit returned.
        what: How messages name it (`"Apply result"`).

    Raises:
        SpliceError: For a non-tensor, or another shape, dtype or device.

    Example:
        >>> import torch
        >>> check_same("embed", torch.ones(2, 3), torch.ones(3), "Apply result")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Apply result at embed has shape [3], expected [2, 3] (the shape it replaces)
    """
    if not isinstance(after, torch.Tensor):
        raise SpliceError(
            f"{what} at {site} returned {type(after).__name__}, expected a tensor of shape {list(before.shape)}"
        )
    if after.shape != before.shape:
        raise SpliceError(
            f"{what} at {site} has shape {list(after.shape)}, expected {list(before.shape)} (the shape it replaces)"
        )
    if after.dtype != before.dtype or after.device != before.device:
        raise SpliceError(
            f"{what} at {site} is {after.dtype} on {after.device}, expected {before.dtype} on {before.device}"
        )


def apply_edit(
    edit: Intervention, x: torch.Tensor, name: str, axes: tuple[str, ...], frame: Frame
) -> torch.Tensor:
    """Apply one intervention to a site tensor, clone-then-assign (`x` itself is never changed).

    Args:
        edit: The intervention.
        x: The site tensor.
        name: The site's name, for messages.
        axes: The site's axis names.
        frame: The forward's positions.

    Returns:
        A new tensor with the selected region replaced, or `x` itself if nothing is selected.

    Raises:
        SpliceError: For a selection out of range or a result of the wrong shape or dtype.

    Example:
        >>> import torch
        >>> from splice import Zero
        >>> apply_edit(Zero(pos=1), torch.ones(1, 3, 2), "embed", ("batch", "pos", "d_model"), Frame(1, 3))
        tensor([[[1., 1.],
                 [0., 0.],
                 [1., 1.]]])
    """
    seq = x.shape[axes.index("pos")]
    if seq != frame.seq:
        frame = frame.tail(seq)  # e.g. logits computed for the last positions only
    region = locate(edit.pos, edit.heads, edit.dims, edit.rows, tuple(x.shape), axes, frame, name)
    if region is None:
        return x
    # Per-row positions come from the forward's mask, on the input device; a model split across
    # devices (accelerate) computes this site elsewhere. CPU indices index any tensor.
    index = tuple(
        i.to(x.device)
        if isinstance(i, torch.Tensor) and i.device.type != "cpu" and i.device != x.device
        else i
        for i in region.index
    )
    selected = x[index]
    values = edit.compute(selected, At(name, index, tuple(x.shape), region.masked, region.trailing, axes))
    check_same(name, selected, values, f"{type(edit).__name__} result")
    out = x.clone()
    out[index] = values
    return out


def apply_action(
    action: Action,
    x: torch.Tensor,
    frame: Frame,
    axes: tuple[str, ...],
    settle: Callable[[torch.Tensor], torch.Tensor] | None = None,
) -> torch.Tensor:
    """A site's edits in order, then its recorders, on one tensor. `settle(x)` restores invariants
    the edits may not break (masked attention pairs) before recorders see the tensor the model
    will use. Marks the site fired; raises StopForward when a stopping recording is complete.

    Returns:
        The tensor the model goes on with (`x` itself if no edit selected anything).
    """
    name = action.site.name
    if action.edits:
        produced = x
        for edit in action.edits:
            x = apply_edit(edit, x, name, axes, frame)
        if settle is not None and x is not produced:
            x = settle(x)
    if action.attached is not None:
        x = _through_sae(action.attached, x, frame)
    for scope in action.recorders:
        scope.recording.store(name, x)
    frame.fired.add(name)
    if any(scope.stop_when_complete and scope.recording.complete() for scope in action.recorders):
        raise StopForward(name)
    return x


def _through_sae(attached: Attached, x: torch.Tensor, frame: Frame) -> torch.Tensor:
    """The site tensor after its attached SAE, each sub-site's action applied where the SAE
    computes that tensor (see `splice.engine.spliced.through`)."""

    def step(sub: Action | None):
        if sub is None:
            return None
        axes = site_axes(sub.site)
        return lambda t: apply_action(sub, t, frame, axes)

    return through(
        attached.sae, attached.head, x, step(attached.acts), step(attached.recon), step(attached.error)
    )


def _selected_size(sel, size: int | None, what: str, site: str) -> int | None:
    if size is None:  # varies per forward (key positions): checked when the forward runs
        return None
    chosen = axis_selector(sel, size, what, site)
    return len(range(size)[chosen]) if isinstance(chosen, slice) else len(chosen)


def check_static(
    edit: Intervention, site_name: str, axes: tuple[str, ...], shape: tuple[int | None, ...]
) -> None:
    """Check an intervention against a site before any forward: heads/dims ranges and value shapes.

    Only the axes known statically are checked (not batch and pos), so a mistake surfaces at
    the `with` line or the assignment rather than mid-forward.

    Args:
        edit: The intervention.
        site_name: The site, for messages.
        axes: The site's axis names.
        shape: Its shape, None for the axes that vary per forward.

    Raises:
        SpliceError: For `heads=` at a site without heads, a head or dim out of range, or a
            value that cannot broadcast to the selection.

    Example:
        >>> import torch
        >>> from splice import Add
        >>> check_static(Add(torch.ones(5)), "blocks.0.resid_post", ("batch", "pos", "d_model"), (None, None, 8))
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: Add vector of shape [5] cannot broadcast to the selection at blocks.0.resid_post: site is [batch, pos, d_model=8], selection keeps trailing shape [8] (heads=None, dims=None)
    """
    has_heads = any(a in ("head", "kv_head") for a in axes)
    if edit.heads is not None and not has_heads:
        raise SpliceError(
            f"{edit!r}: heads= was given but {site_name} has no head axis (axes: {', '.join(axes)})"
        )
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
        tail = (
            tuple(value.shape[-len(trailing_full) :])
            if value.dim() >= len(trailing_full)
            else tuple(value.shape)
        )

        def fits(target, tail=tail):
            return all(t is None or v in (1, t) for v, t in zip(reversed(tail), reversed(target)))

        if value.dim() > len(axes) or not (fits(tuple(trailing_sel)) or fits(trailing_full)):
            named = ", ".join(f"{a}={s}" if s is not None else a for a, s in zip(axes, shape))
            raise SpliceError(
                f"{what} of shape {list(value.shape)} cannot broadcast to the selection at {site_name}: "
                f"site is [{named}], selection keeps trailing shape {trailing_sel} "
                f"(heads={edit.heads!r}, dims={edit.dims!r})"
            )
