"""The hook engine: at most one hook per touched (module, input|output), reading a plan that is
rebuilt whenever a session starts or ends or a live `Edits` changes.

Nothing here patches the model: hooks are plain `register_forward(_pre)_hook` handles, created
when the first session needs them and removed when the last one ends (also on exceptions).
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.nn as nn
from transformers.utils import ModelOutput

from .architectures import Layout
from .attention import AttentionRouting
from .errors import SpliceError
from .frame import Frame
from .interventions import At, Intervention
from .selection import locate
from .sites import Site


class StopForward(Exception):
    """Raised from a hook once a `stop_when_complete` recording has every site: the rest of the
    forward (later layers, the unembedding) is not needed. `Model.run` catches it."""


@dataclass
class Action:
    """What happens at one site during a forward: edits in order, then recorders."""

    site: Site
    edits: list[Intervention] = field(default_factory=list)
    recorders: list = field(default_factory=list)


def _check_same(site: str, before: torch.Tensor, after, what: str) -> None:
    if not isinstance(after, torch.Tensor):
        raise SpliceError(f"{what} at {site} returned {type(after).__name__}, expected a tensor of shape {list(before.shape)}")
    if after.shape != before.shape:
        raise SpliceError(f"{what} at {site} has shape {list(after.shape)}, expected {list(before.shape)} (the shape it replaces)")
    if after.dtype != before.dtype or after.device != before.device:
        raise SpliceError(f"{what} at {site} is {after.dtype} on {after.device}, expected {before.dtype} on {before.device}")


def apply_edit(edit: Intervention, x: torch.Tensor, name: str, axes, frame: Frame) -> torch.Tensor:
    """Clone-then-assign one intervention on a site tensor; returns x itself if nothing is selected."""
    seq = x.shape[axes.index("pos")]
    if seq != frame.seq:
        frame = frame.tail(seq)  # e.g. logits computed for the last positions only
    region = locate(edit.pos, edit.heads, edit.dims, edit.rows, tuple(x.shape), axes, frame, name)
    if region is None:
        return x
    selected = x[region.index]
    values = edit.compute(selected, At(name, region.index, tuple(x.shape), region.masked, region.trailing, axes))
    _check_same(name, selected, values, f"{type(edit).__name__} result")
    out = x.clone()
    out[region.index] = values
    return out


class Dispatcher:
    """The single hook on one (module, io). Handles every site that lives there, in forward order."""

    def __init__(self, manager: "HookManager", module: nn.Module, io: str, entries: list[tuple[Site, object]]):
        self.manager, self.io, self.entries = manager, io, entries
        self.layer_input_of = None  # layer index whose residual input this hook saves, if any
        if io == "input":
            self.arg = entries[0][1].arg
            self.handle = module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        else:
            self.handle = module.register_forward_hook(self._post, prepend=True)

    def _pre(self, module, args, kwargs):
        positional = bool(args)
        full = args[0] if positional else kwargs.get(self.arg)
        new = self._run(full)
        if new is full:
            return None
        if positional:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, self.arg: new}

    def _post(self, module, args, output):
        if isinstance(output, ModelOutput):  # the whole model's output: its logits (Gemma2 soft-caps them outside any module)
            full = output.logits
            new = self._run(full)
            return None if new is full else type(output)(**{**output, "logits": new})
        full = output[0] if isinstance(output, tuple) else output
        new = self._run(full)
        if new is full:
            return None
        return (new,) + tuple(output[1:]) if isinstance(output, tuple) else new

    def _run(self, full: torch.Tensor) -> torch.Tensor:
        manager = self.manager
        frame = manager.frame_for(full)
        plan = manager.plan
        for site, point in self.entries:
            action = plan.get(site.name)
            if action is None:
                continue
            base = frame.base.get(site.layer) if point.needs_base else None
            x = point.view.read(full, base)
            edited = manager.process(action, x, frame)
            if edited is not x:
                new_full = point.view.write(full, edited, base)
                _check_same(site.name, full, new_full, "edited tensor")
                full = new_full
        if self.layer_input_of is not None:
            frame.base[self.layer_input_of] = full
        return full

    def remove(self):
        self.handle.remove()


class HookManager:
    """Owns every hook splice puts on one model, and the plan they read."""

    def __init__(self, layout: Layout):
        self.layout = layout
        self.sessions: list = []
        self.plan: dict[str, Action] = {}
        self.dispatchers: dict[tuple[str, str], Dispatcher] = {}
        self.root_handles: list = []
        self.frame: Frame | None = None
        self.bracketing = False  # True while Model.run begins/ends the forward itself (no root hooks)
        self.attention = AttentionRouting(self)

    # -- frames --------------------------------------------------------------------------------
    def _root_pre(self, module, args, kwargs):
        self.begin(Frame.from_call(args, kwargs))

    def _root_post(self, module, args, kwargs, output):
        self.end()

    def begin(self, frame: Frame) -> None:
        """Start a forward pass (the model's own, or a sweep replaying its layers)."""
        self.frame = frame

    def end(self) -> None:
        """Finish a forward pass: every edit in the plan must have run."""
        frame, self.frame = self.frame, None
        if frame is None:
            return
        missing = [name for name, action in self.plan.items() if action.edits and name not in frame.fired]
        if missing:
            raise SpliceError(
                f"edit(s) at {', '.join(missing)} never ran during this forward pass (the module was not "
                "called): the result would silently ignore them"
            )

    def abort(self) -> None:
        """Forget a forward that was stopped on purpose (its edits need not all have run)."""
        self.frame = None

    def frame_for(self, full: torch.Tensor) -> Frame:
        """The current forward's frame; a bare one if a submodule was called directly."""
        if self.frame is None:
            return Frame(full.shape[0], full.shape[1] if full.dim() >= 2 else 1)
        return self.frame

    def process(self, action: Action, x: torch.Tensor, frame: Frame, settle=None) -> torch.Tensor:
        """Apply a site's edits in order, then hand the result to its recorders. `settle(x)`
        restores invariants the edits may not break (e.g. masked attention pairs) before
        recorders see the tensor the model will use."""
        name = action.site.name
        if action.edits:
            axes = self.layout.axes(action.site)
            produced = x
            for edit in action.edits:
                x = apply_edit(edit, x, name, axes, frame)
            if settle is not None and x is not produced:
                x = settle(x)
        for recording in action.recorders:
            recording._store(name, x)
        frame.fired.add(name)
        if action.recorders and any(r.stop_when_complete and r.complete() for r in action.recorders):
            raise StopForward(name)
        return x

    # -- sessions ------------------------------------------------------------------------------
    def push(self, *sessions) -> None:
        """Start sessions together (one plan rebuild); on a bad key none of them starts."""
        self.sessions.extend(sessions)
        try:
            self.refresh()
        except BaseException:
            for session in sessions:
                self.sessions.remove(session)
            self.refresh()
            raise

    def pop(self, *sessions) -> None:
        for session in sessions:
            if session in self.sessions:
                self.sessions.remove(session)
        self.refresh()

    def refresh(self) -> None:
        """Rebuild the plan from the active sessions and make the installed hooks match it.
        Building the plan validates every key first, so a bad one changes nothing."""
        plan: dict[str, Action] = {}
        for session in self.sessions:
            session.contribute(plan, self.layout)
        self._install(plan)
        self.plan = plan

    def _install(self, plan: dict[str, Action]) -> None:
        layout = self.layout
        wanted: dict[tuple[str, str], None] = {}  # (module path, io) in plan order
        save_base: dict[tuple[str, str], int] = {}
        needs_attention = False
        for action in plan.values():
            hook, base = layout.hooks_of(action.site)
            if hook is None:
                needs_attention = True
                continue
            wanted[hook] = None
            if base is not None:
                wanted[base] = None
                save_base[base] = action.site.layer
        for key in [k for k in self.dispatchers if k not in wanted]:
            self.dispatchers.pop(key).remove()
        for key in wanted:
            if key not in self.dispatchers:
                self.dispatchers[key] = Dispatcher(self, layout.module_at(key[0]), key[1], layout.sites_at(key))
            self.dispatchers[key].layer_input_of = save_base.get(key)
        if needs_attention:
            self.attention.activate()
        else:
            self.attention.deactivate()
        if plan and not self.root_handles and not self.bracketing:
            root = layout.model
            self.root_handles = [
                root.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True),
                root.register_forward_hook(self._root_post, with_kwargs=True),
            ]
        elif not plan:
            self._remove_root()

    def _remove_root(self) -> None:
        for handle in self.root_handles:
            handle.remove()
        self.root_handles = []
        self.frame = None

    @property
    def hook_count(self) -> int:
        """Hooks installed, counting a switched attention implementation as one."""
        return len(self.dispatchers) + len(self.root_handles) + int(self.attention.active)
