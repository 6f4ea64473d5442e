"""Prefix reuse for sweeps: record the calls a clean forward makes to each decoder layer, then
replay the layers from any layer on, on a cached residual stream repeated once per variant.

Nothing architecture-specific is hard-coded: the layers are called with exactly the arguments the
model itself passed them (masks, rotary tables, position ids), with every tensor whose batch axis
is the prompt batch tiled to the variant batch. After the last layer, only the final positions a
metric reads are normalised and unembedded. A self-check compares a replay with the model's own
logits before a sweep trusts it. A `Window` narrows the positions computed (the suffix replays of
`splice.sweeps.suffix`); by default every position is.
"""

from __future__ import annotations

import threading
from typing import TYPE_CHECKING, Any, Protocol, cast

import torch
from torch.nn.modules import module as torch_module

from ..engine import devices
from ..engine.frame import Frame
from ..engine.sites import Site
from ..errors import SpliceError

if TYPE_CHECKING:
    from ..engine.model import Model


def map_tensors(value, fn):
    """`value` with `fn` applied to every leaf of its tuples, lists and dicts (call arguments)."""
    if isinstance(value, tuple):
        return tuple(map_tensors(v, fn) for v in value)
    if isinstance(value, list):
        return [map_tensors(v, fn) for v in value]
    if isinstance(value, dict):
        return {key: map_tensors(v, fn) for key, v in value.items()}
    return fn(value)


def tile_rows(value, rows: set[int], k: int):
    """Repeat k times (variant-major) every tensor whose first axis is batch-major over the prompt
    batch: `rows` holds the sizes that means (n, and n x heads for ALiBi-style biases)."""

    def tile(v):
        if isinstance(v, torch.Tensor) and k > 1 and v.dim() > 0 and v.shape[0] in rows:
            return v.repeat(k, *([1] * (v.dim() - 1)))
        return v

    return map_tensors(value, tile)


def call_recorder(inputs: list, calls: list, layer_arg: str, i: int):
    """A forward pre-hook storing layer i's input in inputs[i] and its other arguments in calls[i]
    (the hidden state comes positionally or as the `layer_arg` keyword). Only calls from the
    thread that made it are recorded: another thread's forward through the same model while a
    sweep records must not overwrite what the sweep replays."""
    owner = threading.get_ident()

    def hook(module, args, kwargs):
        if threading.get_ident() != owner:
            return
        if args:
            inputs[i], calls[i] = args[0], (tuple(args[1:]), dict(kwargs))
        else:
            rest = dict(kwargs)
            inputs[i] = rest.pop(layer_arg)
            calls[i] = ((), rest)

    return hook


class Window(Protocol):
    """The positions a replay computes, from `start` on: each layer's input and call arguments
    for them, and how the logits of the positions before are filled in."""

    start: int

    def layer_input(self, i: int) -> torch.Tensor:
        """Layer i's clean input at the window's positions, `[n, positions, d_model]`."""
        ...

    def layer_call(self, i: int, copies: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Layer i's call arguments (besides the input) for `copies` copies of the batch."""
        ...

    def assemble(self, logits: torch.Tensor, baseline: torch.Tensor, copies: int) -> torch.Tensor:
        """The logits of every position the metrics read, from those the window computed and the
        baseline's (`[n, tail, columns]`) for the positions before it."""
        ...


def plain_linear(module) -> bool:
    """Whether `module` computes exactly `F.linear(x, weight, bias)` and nothing watches it (no
    hook of its own or global, no accelerate wrapper), so part of its output may be computed
    directly."""
    return (
        type(module) is torch.nn.Linear
        and "forward" not in module.__dict__
        and not (module._forward_hooks or module._forward_pre_hooks or hasattr(module, "_hf_hook"))
        and not (torch_module._global_forward_hooks or torch_module._global_forward_pre_hooks)
    )


class PrefixReplay:
    """A clean forward of one prompt batch, kept so that its layers can be run again from any
    layer on: each layer's input and call arguments, and the clean logits.

    Built outside the variants' edits (the baseline); `replay` then runs the variants' suffixes
    under whatever the calling context has open. Needs a model (no example here; see
    `tests/test_sweep.py`).

    Args:
        model: The `splice.Model`.
        batch: The model keyword arguments of the prompt batch (`PromptBatch.kwargs`).
        tail: Unembed only the last `tail` positions (what the metrics read); None: all.

    Attributes:
        logits: The baseline logits, `[n, tail, vocab]`.
        n: Rows in the prompt batch.
    """

    def __init__(self, model: Model, batch: dict[str, Any], tail: int | None = None):
        self.model = model
        layout = model.layout
        self.layers = [layout.module(Site("resid_pre", i)) for i in range(layout.n_layers)]
        self.layer_arg = layout.points["resid_pre"].arg
        self.final_norm = layout.module(Site("final_norm"))
        # Any: an HF PreTrainedModel; torch types undeclared nn.Module attributes as Tensor | Module.
        hf: Any = model.hf
        self.unembed = hf.get_output_embeddings()
        self.logits_transform = layout.logits_transform
        # Every entry is filled by the forward below (each layer's pre-hook), before any use.
        self.inputs = cast("list[torch.Tensor]", [None] * len(self.layers))
        self.calls = cast("list[tuple[tuple[Any, ...], dict[str, Any]]]", [None] * len(self.layers))
        self.batch_kwargs = batch
        handles = [
            layer.register_forward_pre_hook(
                call_recorder(self.inputs, self.calls, self.layer_arg, i), with_kwargs=True
            )
            for i, layer in enumerate(self.layers)
        ]
        # Unembed only the positions the metrics read (outside splice contexts, where generate's
        # logits_to_keep argument would otherwise mark the forward as a generation step).
        keep = {"logits_to_keep": tail} if tail and not model.engine.active_here() else {}
        try:
            with torch.no_grad():
                out = model.hf(**batch, use_cache=False, **keep)
        finally:
            for handle in handles:
                handle.remove()
        self.logits = out.logits if tail is None else out.logits[:, -tail:]
        self.tail = tail
        self.n = self.logits.shape[0]
        # First-axis sizes that mean "batch-major over the prompts" in call arguments (see tile_rows).
        self.rows = {self.n, self.n * model.dims.n_heads} - {1}
        self.mask = batch.get("attention_mask")

    # The full window: what `replay` computes when no other window is given (every position).
    start = 0

    def layer_input(self, i: int) -> torch.Tensor:
        """Layer i's clean input, `[n, seq, d_model]`."""
        return self.inputs[i]

    def layer_call(self, i: int, copies: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """Layer i's call arguments, tiled to `copies` copies of the batch."""
        return tile_rows(self.calls[i], self.rows, copies)

    def assemble(self, logits: torch.Tensor, baseline: torch.Tensor, copies: int) -> torch.Tensor:
        """The replay's logits as they are (every position the metrics read was computed)."""
        return logits

    def unembedded(self, hidden: torch.Tensor, columns: torch.Tensor | None) -> torch.Tensor:
        """The logits of `hidden` (final-normed), in `columns` of the vocabulary only when given
        and the unembedding is a plain linear layer nothing watches (else every column, then
        those picked: an edit or hook on the logits sees what the model's forward shows it)."""
        if columns is not None and plain_linear(self.unembed):
            bias = self.unembed.bias
            cols = columns.to(self.unembed.weight.device)
            logits = torch.nn.functional.linear(
                hidden, self.unembed.weight[cols], None if bias is None else bias[cols]
            )
            return logits if self.logits_transform is None else self.logits_transform(logits)
        logits = self.unembed(devices.to_module(hidden, self.unembed))
        if self.logits_transform is not None:
            logits = self.logits_transform(logits)
        return logits if columns is None else logits[..., columns.to(logits.device)]

    def replay(
        self,
        starts: list[int],
        tail: int | None,
        window: Window | None = None,
        columns: torch.Tensor | None = None,
    ) -> torch.Tensor:
        """Logits [k*n, tail, vocab] of k = len(starts) copies of the batch, copy v run from layer
        starts[v] on (non-decreasing), under whatever this context has open (rows
        v*n..(v+1)*n are copy v). Copies join the batch at their own layer, so each computes
        only its own suffix while every layer still runs as one large batch.

        Args:
            starts: Each copy's first layer.
            tail: Unembed only the last `tail` positions; None: all.
            window: Which positions the layers compute (default: this replay, every position;
                `splice.sweeps.suffix.Suffix`: the positions from some p on).
            columns: Unembed only these vocabulary ids (sorted; `splice.sweeps.columns`), the
                last axis of the logits; None: every one.

        Raises:
            SpliceError: If `starts` decreases anywhere, or an edit of the open contexts never
                ran (its layer lies before every start).
        """
        if any(a > b for a, b in zip(starts, starts[1:])):
            raise SpliceError(f"replay start layers must be non-decreasing; got {starts}")
        window = window or self
        n = self.n
        seq = self.inputs[0].shape[1] - window.start
        hidden, active = None, 0
        frame = Frame(n * starts.count(starts[0]), seq, window.start)
        with self.model.engine.forward(frame) as forward:
            for i in range(starts[0], len(self.layers)):
                layer = self.layers[i]
                joining = starts.count(i)
                if joining:
                    new = window.layer_input(i)
                    new = new.repeat(joining, *([1] * (new.dim() - 1)))
                    hidden = new if hidden is None else torch.cat([hidden, new.to(hidden.device)])
                    active += joining
                    # The frame describes the rows present now; which edits fired carries over.
                    forward.retarget(
                        n * active, self.mask.repeat(active, 1) if self.mask is not None else None
                    )
                assert hidden is not None  # starts[0] joins at the first layer replayed
                # In a model split across devices each layer computes on its own device; the
                # call arguments (masks, rotary tables) are moved by accelerate's own hook.
                hidden = devices.to_module(hidden, layer)
                args, kwargs = window.layer_call(i, active)
                out = layer(hidden, *args, **kwargs)
                hidden = out[0] if isinstance(out, tuple) else out
            assert hidden is not None
            hidden = self.final_norm(devices.to_module(hidden, self.final_norm))
            if tail is not None:
                hidden = hidden[:, -tail:]
            logits = self.unembedded(hidden, columns)
        # Where the model's own forward returns them (accelerate returns a split model's
        # outputs to the input's device), so metrics compare them with the baseline directly.
        baseline = self.logits if columns is None else self.logits[..., columns.to(self.logits.device)]
        return window.assemble(logits.to(self.logits.device), baseline, active)

    def check(self, window: Window | None = None) -> None:
        """A replay of two copies, one joining at the second-to-last layer and one at the last,
        must reproduce the model's own logits in both (this catches call arguments that were
        tiled wrongly or not at all, and copies joining mid-replay; two layers cover families
        that alternate layer types).

        Args:
            window: The positions to replay (default: every position).

        Raises:
            SpliceError: If they differ (beyond 1e-4), suggesting `prefix_reuse=False`.
        """
        with torch.no_grad():
            last = len(self.layers) - 1
            again = self.replay([max(0, last - 1), last], self.tail, window)
        expected = self.logits.repeat(2, *([1] * (self.logits.dim() - 1)))
        # Half precision: two ulps of the largest logit, never less than 1e-4.
        atol = max(1e-4, 2 * torch.finfo(expected.dtype).eps * float(expected.abs().max()))
        if again.shape != expected.shape or not torch.allclose(again, expected, rtol=1e-4, atol=atol):
            raise SpliceError(
                f"replaying {type(self.model.hf).__name__}'s layers does not reproduce its logits "
                f"(shapes {list(again.shape)} vs {list(expected.shape)}); run the sweep with prefix_reuse=False"
            )
