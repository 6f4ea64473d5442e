"""The hook engine: one per Hugging Face model, shared by every `splice.Model` wrapping it.

What is *installed* is shared: at most one dispatcher hook per touched (module, input|output),
the root hooks that frame each forward, and the attention routing, kept to the union of what
every open scope, in any thread, needs, and removed when the last scope closes. What is *active*
belongs to the execution context (`contextvars`): each thread and each asyncio task sees only the
scopes it opened, and each forward reads the plan fixed when it began. So two threads editing one
model never see each other's edits, and a thread with nothing open pays one lookup per hooked
module. A forward started from inside an intervention (an `Apply` calling the model) runs with a
context of its own: only what it opens itself, and its own positions.
"""

from __future__ import annotations

import threading
import weakref
from collections.abc import Callable
from contextvars import ContextVar, Token
from typing import Any, NamedTuple

import torch
import torch.nn as nn

from ..architectures.table import Point
from ..architectures.views import Call
from ..errors import SpliceError
from . import devices
from .attention import AttentionRouting
from .frame import Frame
from .layout import Layout
from .plan import EMPTY, Action, EditScope, Plan, Scope, apply_action, build_plan, check_same


class ScopeStack:
    """The scopes one context has open, in opening order, and the plan they make (rebuilt when a
    live registry in it changes). Created anew on every open/close, never shared across opens."""

    __slots__ = ("scopes", "_versions", "_plan")

    def __init__(self, scopes: tuple[Scope, ...] = ()):
        self.scopes = scopes
        self._versions: tuple[tuple[int, bool], ...] | None = None
        self._plan = EMPTY

    def plan(self, layout: Layout) -> Plan:
        """The plan of these scopes, rebuilt only when one of them changed.

        Raises:
            SpliceError: For a key or value that does not fit the model.
        """
        versions = tuple(scope.version for scope in self.scopes)
        if versions != self._versions:
            self._plan = build_plan(self.scopes, layout)
            self._versions = versions
        return self._plan


class State(NamedTuple):
    """One engine's state in one execution context: the scopes it has open, and the forward it
    is running (None between forwards)."""

    stack: ScopeStack
    frame: Frame | None = None


# Engine -> State, per execution context. Replaced, never mutated, so a copied context (a new
# asyncio task) cannot change its parent's.
_STATE: ContextVar[dict] = ContextVar("splice_state", default={})  # noqa: B039 - never mutated (above)
_ENGINES: weakref.WeakKeyDictionary[nn.Module, Engine] = weakref.WeakKeyDictionary()
_ENGINES_LOCK = threading.Lock()


def engine_for(model: nn.Module) -> Engine:
    """The engine of an HF model, created on first use: two wrappers of one model share it.

    Engines are kept per model weakly: a model that is garbage-collected takes its engine
    along.

    Raises:
        SpliceError: For an unsupported model (see `Layout`).
    """
    with _ENGINES_LOCK:
        engine = _ENGINES.get(model)
        if engine is None:
            engine = _ENGINES[model] = Engine(Layout(model))
        return engine


def _set_state(engine: Engine, state: State | None) -> Token[dict]:
    states = dict(_STATE.get())
    if state is None:
        states.pop(engine, None)
    else:
        states[engine] = state
    return _STATE.set(states)


class isolated:
    """Run user code (an intervention's compute) in a context with nothing open, so a forward it
    starts is a forward of its own: no outer edits (no recursion into the same `Apply`), its own
    positions. Restored however the code ends."""

    __slots__ = ("token",)

    def __enter__(self) -> None:
        self.token = _STATE.set({})

    def __exit__(self, *exc: object) -> None:
        _STATE.reset(self.token)


class Opened:
    """Scopes open for one `with` block (a class, not @contextmanager: `Model.run` opens one per
    call). Closing removes them from this context and uninstalls what nobody needs any more."""

    __slots__ = ("engine", "scopes")

    def __init__(self, engine: Engine, scopes: tuple[Scope, ...]):
        self.engine, self.scopes = engine, scopes

    def __enter__(self) -> Opened:
        self.engine.open(self.scopes)
        return self

    def __exit__(self, *exc: object) -> None:
        self.engine.close(self.scopes)


class Dispatcher:
    """The single hook on one (module, io): every site living there, in forward order.

    It reads each site out of the module tensor through the site's view, runs the plan's action
    for it, and writes the result back (a new tensor), so several sites of one fused projection
    cost one hook. A view that needs the call (`needs_call`: the module and its input, e.g.
    `attn.result`'s) is given it; on an output hook the input is the one the module was called
    with, after the edits of the input hook.
    """

    __slots__ = ("engine", "entries", "arg", "field", "io", "layer_input_of", "offloaded", "placed", "handle")

    def __init__(self, engine: Engine, module: nn.Module, io: str, entries: list):
        self.engine, self.entries, self.io = engine, entries, io
        point = entries[0][1]
        self.arg, self.field = point.arg, point.field
        self.layer_input_of: int | None = None  # layer whose residual input this hook saves, if any
        # Under accelerate (a model split across devices): the module's weights may rest on "meta"
        # between calls, and its inputs may arrive from another device.
        self.offloaded = devices.offloaded(module)
        self.placed = hasattr(module, "_hf_hook")
        if io == "input":
            self.handle = module.register_forward_pre_hook(self._pre, with_kwargs=True, prepend=True)
        else:
            self.handle = module.register_forward_hook(self._post, with_kwargs=True, prepend=True)

    def _pre(self, module, args, kwargs):
        positional = bool(args)
        new = self._edited(args[0] if positional else kwargs.get(self.arg), module, args, kwargs)
        if new is None:
            return None
        if positional:
            return (new,) + tuple(args[1:]), kwargs
        return args, {**kwargs, self.arg: new}

    def _post(self, module, args, kwargs, output):
        if isinstance(output, torch.Tensor):
            return self._edited(output, module, args, kwargs)
        new = self._edited(output[self.field], module, args, kwargs)
        if new is None:
            return None
        if isinstance(output, tuple):
            return output[: self.field] + (new,) + output[self.field + 1 :]
        return type(output)(**{**output, self.field: new})  # a ModelOutput, e.g. Gemma2's soft-capped logits

    def _edited(
        self, full: torch.Tensor, module: nn.Module, args: tuple, kwargs: dict
    ) -> torch.Tensor | None:
        """The module tensor as this context's plan leaves it, or None if it changes nothing."""
        frame = self.engine.frame(full)
        if frame is None:
            return None
        new = self._run(full, frame, module, args, kwargs)
        return None if new is full else new

    def _run(
        self, full: torch.Tensor, frame: Frame, module: nn.Module, args: tuple, kwargs: dict
    ) -> torch.Tensor:
        plan = frame.plan
        assert plan is not None  # a current frame always has its plan (see Engine.begin and frame)
        for site, point in self.entries:
            action = plan.get(site.name)
            if action is None:
                continue
            layer_input = self._layer_input(frame, site.layer, full) if point.needs_layer_input else None
            call = self._call(module, full, args, kwargs, point.arg) if point.needs_call else None
            if call is not None and self.offloaded:
                # The view reads the module's weights, which rest on "meta" outside its forward.
                with devices.loaded(module):
                    full = self._site(site.name, point, action, full, frame, layer_input, call)
            else:
                full = self._site(site.name, point, action, full, frame, layer_input, call)
        if self.layer_input_of is not None:
            frame.layer_inputs[self.layer_input_of] = full
        return full

    def _site(
        self,
        name: str,
        point: Point,
        action: Action,
        full: torch.Tensor,
        frame: Frame,
        layer_input: torch.Tensor | None,
        call: Call | None,
    ) -> torch.Tensor:
        """The module tensor after one site's action: read through the view, edit, write back."""
        x = point.view.read(full, layer_input, call)
        edited = self.engine.process(action, x, frame)
        if edited is x:
            return full
        new_full = point.view.write(full, edited, layer_input, call)
        check_same(name, full, new_full, "edited tensor")
        return new_full

    def _call(self, module: nn.Module, full: torch.Tensor, args: tuple, kwargs: dict, arg: str) -> Call:
        """The call a view sees: on an input hook the input is `full` as edited so far; on an
        output hook the first positional argument, or the `arg=` keyword."""
        if self.io == "input":
            return Call(module, full)
        if args:
            given = args[0]
        elif arg in kwargs:
            given = kwargs[arg]
        else:
            raise SpliceError(
                f"{type(module).__name__} was called with neither a positional input nor {arg}=: "
                f"the sites read from its input cannot be computed (keywords: {', '.join(kwargs) or 'none'})"
            )
        # As the module saw it: accelerate moves a split model's inputs to the module's device.
        return Call(module, devices.to_module(given, module) if self.placed else given)

    @staticmethod
    def _layer_input(frame: Frame, layer: int | None, full: torch.Tensor) -> torch.Tensor | None:
        """The layer's saved residual input, on `full`'s device: a layer of a split model is
        given its input on the previous layer's device (accelerate moves it inside the call)."""
        if layer is None:
            return None
        saved = frame.layer_inputs.get(layer)
        if saved is not None and saved.device != full.device:
            saved = frame.layer_inputs[layer] = saved.to(full.device)
        return saved


class Forward:
    """A forward the engine frames itself (a sweep replaying layers, which never calls the root
    module): the frame is current inside the block; a normal exit checks every edit ran."""

    __slots__ = ("engine", "frame")

    def __init__(self, engine: Engine, frame: Frame):
        self.engine, self.frame = engine, frame

    def __enter__(self) -> Forward:
        self.engine.begin(self.frame)
        return self

    def retarget(self, batch: int, attention_mask: torch.Tensor | None = None) -> Frame:
        """Rows joined the forward: the same forward (plan, fired sites) over a new batch."""
        self.frame = self.frame.resized(batch, attention_mask)
        self.engine.swap(self.frame)
        return self.frame

    def __exit__(self, kind: type[BaseException] | None, error: BaseException | None, trace: Any) -> None:
        self.engine.end(self.frame, check=kind is None)


class Engine:
    """Every hook splice puts on one model, and the per-context plans they read.

    One per Hugging Face model (see `engine_for`). Installed hooks are shared by every context
    and kept to the union of what the open scopes need; what is active is per execution context.

    Args:
        layout: The model's layout.
    """

    def __init__(self, layout: Layout):
        self.layout = layout
        self._lock = threading.RLock()
        self._open: dict[int, Scope] = {}  # id -> scope, every scope open in any context
        self._dispatchers: dict[tuple[str, str], Dispatcher] = {}
        self._root: list = []
        self.attention = AttentionRouting(self)

    # -- the calling context -------------------------------------------------------------------
    def state(self) -> State | None:
        """This execution context's state on this engine (None if it has nothing open)."""
        return _STATE.get().get(self)

    def active_here(self) -> bool:
        """Whether this execution context has anything open on this model."""
        return self.state() is not None

    def plan_here(self) -> Plan:
        """The plan this context's open scopes make now (EMPTY if it has nothing open)."""
        state = self.state()
        return EMPTY if state is None else state.stack.plan(self.layout)

    def frame(self, full: torch.Tensor) -> Frame | None:
        """The current forward's frame in this context; a bare one (from the tensor's batch and
        sequence length) if a submodule was called directly while scopes are open; None if this
        context has nothing open."""
        state = _STATE.get().get(self)
        if state is None:
            return None
        if state.frame is not None:
            return state.frame
        plan = state.stack.plan(self.layout)
        if not plan:
            return None
        return Frame(full.shape[0], full.shape[1] if full.dim() >= 2 else 1, plan=plan)

    def process(
        self,
        action: Action,
        x: torch.Tensor,
        frame: Frame,
        settle: Callable[[torch.Tensor], torch.Tensor] | None = None,
    ) -> torch.Tensor:
        """Apply one site's action (see `splice.engine.plan.apply_action`), user code isolated."""
        axes = self.layout.axes(action.site)
        if not action.edits and action.attached is None:
            return apply_action(action, x, frame, axes, settle)
        with isolated():
            return apply_action(action, x, frame, axes, settle)

    # -- scopes --------------------------------------------------------------------------------
    def open(self, scopes: tuple[Scope, ...]) -> None:
        """Make `scopes` active in this context. Their plan is built first, so a bad key or value
        leaves everything as it was.

        Raises:
            SpliceError: For a key or value that does not fit the model.
        """
        state = self.state()
        stack = ScopeStack((state.stack.scopes if state else ()) + tuple(scopes))
        stack.plan(self.layout)  # validates
        with self._lock:
            for scope in scopes:
                self._open[id(scope)] = scope
                if isinstance(scope, EditScope):
                    scope.edits.subscribe(self._edits_changed)
            try:
                self._sync()
            except BaseException:
                self._forget(scopes)
                raise
        _set_state(self, State(stack, state.frame if state else None))

    def close(self, scopes: tuple[Scope, ...]) -> None:
        """Undo `open` (in any order relative to other blocks): this context drops the scopes; a
        context copied from it (an asyncio task) drops them too; unneeded hooks are removed."""
        for scope in scopes:
            scope.closed = True
        state = self.state()
        if state is not None:
            kept = tuple(s for s in state.stack.scopes if s not in scopes)
            _set_state(self, State(ScopeStack(kept), state.frame) if kept or state.frame else None)
        with self._lock:
            self._forget(scopes)

    def _forget(self, scopes: tuple[Scope, ...]) -> None:
        for scope in scopes:
            self._open.pop(id(scope), None)
            if isinstance(scope, EditScope):
                scope.edits.unsubscribe(self._edits_changed)
        self._sync()

    def _edits_changed(self, edits: Any) -> None:
        """A live registry changed: check it against this model (raising makes `Edits` undo the
        change) and install what it now needs. Each context's plan follows at its next forward."""
        for scope in list(self._open.values()):
            if isinstance(scope, EditScope) and scope.edits is edits:
                scope.entries(self.layout)
        with self._lock:
            self._sync()

    def _sync(self) -> None:
        """Make the installed hooks match the union of every open scope's sites (under the lock)."""
        layout = self.layout
        wanted: dict[tuple[str, str], int | None] = {}
        attention = False
        for scope in self._open.values():
            hooks, routed = scope.hooks(layout)
            for key, layer in hooks.items():
                if wanted.get(key) is None:
                    wanted[key] = layer
            attention = attention or routed
        for key in [k for k in self._dispatchers if k not in wanted]:
            self._dispatchers.pop(key).handle.remove()
        for key, layer in wanted.items():
            if key not in self._dispatchers:
                self._dispatchers[key] = Dispatcher(
                    self, layout.module_at(key[0]), key[1], layout.sites_at(key)
                )
            self._dispatchers[key].layer_input_of = layer
        if attention:
            self.attention.activate()
        else:
            self.attention.deactivate()
        if self._open and not self._root:
            root = layout.model
            self._root = [
                root.register_forward_pre_hook(self._root_pre, with_kwargs=True, prepend=True),
                root.register_forward_hook(self._root_post, with_kwargs=True, always_call=True),
            ]
        elif not self._open:
            for handle in self._root:
                handle.remove()
            self._root = []

    # -- forwards ------------------------------------------------------------------------------
    def begin(self, frame: Frame) -> None:
        """Make `frame` this context's current forward, reading the plan of what is open now
        (fixed for the whole forward: a registry changed mid-forward applies from the next)."""
        state = self.state()
        stack = state.stack if state else ScopeStack()
        frame.outer = state.frame if state else None
        if frame.plan is None:
            frame.plan = stack.plan(self.layout)
        frame.plan.check_attached()
        _set_state(self, State(stack, frame))

    def swap(self, frame: Frame) -> None:
        """Replace the current frame by another view of the same forward."""
        state = self.state()
        assert state is not None  # only called inside a forward this context began
        _set_state(self, State(state.stack, frame))

    def end(self, frame: Frame, check: bool = True) -> None:
        """Finish a forward: the frame that was current before it is current again; with
        `check`, every edit in its plan must have run.

        Raises:
            SpliceError: With `check`, naming the sites whose edits never ran (their module was
                not called), since the result would silently ignore them.
        """
        state = self.state()
        if state is not None and state.frame is frame:
            outer = frame.outer
            _set_state(self, State(state.stack, outer) if state.stack.scopes or outer else None)
        if check:
            assert frame.plan is not None  # set when the forward began
            missing = frame.plan.unfired(frame.fired)
            if missing:
                raise SpliceError(
                    f"edit(s) at {', '.join(missing)} never ran during this forward pass (the module was not "
                    "called): the result would silently ignore them"
                )

    def forward(self, frame: Frame) -> Forward:
        """Frame a forward that does not go through the root module (see `Forward`)."""
        return Forward(self, frame)

    def _root_pre(self, module, args, kwargs):
        if self.state() is not None:
            frame = Frame.from_call(args, kwargs)
            frame.from_root = True
            self.begin(frame)

    def _root_post(self, module, args, kwargs, output):
        state = self.state()
        if state is not None and state.frame is not None and state.frame.from_root:
            # output is None when the forward raised (always_call): its edits need not all have run.
            self.end(state.frame, check=output is not None)

    @property
    def hook_count(self) -> int:
        """Hooks installed, counting a switched attention implementation as one."""
        return len(self._dispatchers) + len(self._root) + int(self.attention.active)

    def installed(self) -> set[tuple[str, str]]:
        """(module path, io) of every dispatcher hook, for tests and debugging."""
        return set(self._dispatchers)
