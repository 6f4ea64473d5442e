"""Attention scores and pattern sites, through transformers' own `AttentionInterface`.

While a scope touches `blocks.l.attn.scores` or `.attn.pattern`, the model's attention
implementation is switched from "sdpa" (or "eager") to "splice_sdpa" ("splice_eager"), and
switched back when the last such scope closes. Those functions look the calling attention module
up in `_ROUTES`: layers with no scores/pattern site in the plan run the original implementation
unchanged (same kernel, same mask), the others run an eager computation that exposes the masked
scores and the softmax pattern to the plan. No module or forward is replaced. The functions are
registered with transformers the first time a model needs them, not when splice is imported.
"""

from __future__ import annotations

import sys
import threading
import weakref
from typing import TYPE_CHECKING, Any, Protocol

import torch

from ..errors import SpliceError
from .sites import Site

if TYPE_CHECKING:
    from .layout import Layout


class Engine(Protocol):
    """What the attention functions need of the hook engine (`splice.engine.hooks.Engine`, which
    imports this module; naming it here by its shape keeps the import one way)."""

    layout: Layout

    def frame(self, full: torch.Tensor) -> Any:
        """The current forward's frame (see `Engine.frame`)."""

    def process(self, *args: Any, **kwargs: Any) -> torch.Tensor:
        """Run a site's edits and recorders on a tensor (see `Engine.process`)."""


_ROUTES: weakref.WeakKeyDictionary[torch.nn.Module, tuple[Engine, int]] = weakref.WeakKeyDictionary()
SUPPORTED = ("sdpa", "eager")
"""Attention implementations splice can route (others, e.g. flash attention, never expose the pattern)."""


def _original(kind: str, module):
    if kind == "sdpa":
        from transformers.integrations.sdpa_attention import (
            sdpa_attention_forward,  # at first use: it imports modeling_utils (~1.7 s)
        )

        return sdpa_attention_forward
    return sys.modules[type(module).__module__].eager_attention_forward  # the family's own eager


def _repeat_kv(x: torch.Tensor, groups: int) -> torch.Tensor:
    """[b, kv, s, d] -> [b, kv*groups, s, d]: query head h reads KV head h // groups."""
    return x if groups == 1 else x.repeat_interleave(groups, dim=1)


def _blocked(module, q_len: int, k_len: int, attention_mask, device):
    """Bool [.., q, k] of the query/key pairs the mask forbids, or None if none are."""
    if attention_mask is None:
        if q_len > 1 and getattr(module, "is_causal", True):
            return ~torch.ones(q_len, k_len, dtype=torch.bool, device=device).tril(k_len - q_len)
        return None
    mask = attention_mask[..., :k_len]
    return ~mask if mask.dtype == torch.bool else mask < 0  # additive masks hold 0 or the dtype minimum


def _attention_with_sites(
    engine, frame, layer, module, query, key, value, attention_mask, scaling, dropout, kwargs
):
    groups = query.shape[1] // key.shape[1]
    key, value = _repeat_kv(key, groups), _repeat_kv(value, groups)
    scores = torch.matmul(query, key.transpose(-1, -2)) * (
        scaling if scaling is not None else query.shape[-1] ** -0.5
    )
    if kwargs.get("softcap") is not None:
        scores = torch.tanh(scores / kwargs["softcap"]) * kwargs["softcap"]
    blocked = _blocked(module, scores.shape[-2], scores.shape[-1], attention_mask, scores.device)
    lowest = torch.finfo(scores.dtype).min
    if blocked is not None:
        scores = scores.masked_fill(blocked, lowest)
    action = frame.plan.get(f"blocks.{layer}.attn.scores")
    if action is not None:
        # Masked pairs stay masked whatever the edit did (a scaled minimum would overflow).
        scores = engine.process(
            action,
            scores,
            frame,
            settle=None if blocked is None else lambda t: t.masked_fill(blocked, lowest),
        )
    pattern = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    action = frame.plan.get(f"blocks.{layer}.attn.pattern")
    if action is not None:
        # Pairs the mask forbids stay at 0: an edit must not let a token attend to a future (or
        # padding) key, which cached decoding could not reproduce.
        pattern = engine.process(
            action, pattern, frame, settle=None if blocked is None else lambda t: t.masked_fill(blocked, 0.0)
        )
    weights = torch.nn.functional.dropout(pattern, p=dropout, training=module.training)
    output = torch.matmul(weights, value).transpose(1, 2).contiguous()
    return output, pattern


def _make(kind: str):
    def attention(module, query, key, value, attention_mask, scaling=None, dropout=0.0, **kwargs):
        route = _ROUTES.get(module)
        if route is not None:
            engine, layer = route
            frame = engine.frame(query.transpose(1, 2))
            plan = frame.plan if frame is not None else None  # a current frame always has its plan
            if plan is not None and (
                f"blocks.{layer}.attn.scores" in plan.actions
                or f"blocks.{layer}.attn.pattern" in plan.actions
            ):
                return _attention_with_sites(
                    engine, frame, layer, module, query, key, value, attention_mask, scaling, dropout, kwargs
                )
        return _original(kind, module)(
            module, query, key, value, attention_mask, scaling=scaling, dropout=dropout, **kwargs
        )

    return attention


_REGISTERED: set[str] = set()
_REGISTER_LOCK = threading.Lock()


def _register(kind: str) -> str:
    """Register splice's attention function for `kind` with transformers (once per process)."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface, eager_mask, sdpa_mask

    with _REGISTER_LOCK:
        if kind not in _REGISTERED:
            AttentionInterface.register(f"splice_{kind}", _make(kind))
            AttentionMaskInterface.register(f"splice_{kind}", sdpa_mask if kind == "sdpa" else eager_mask)
            _REGISTERED.add(kind)
    return f"splice_{kind}"


class AttentionRouting:
    """Switches one model to the splice attention functions and back; owns its routes.

    Args:
        engine: The model's hook engine.
    """

    def __init__(self, engine: Engine):
        self.engine = engine
        self.original: str | None = None

    @property
    def active(self) -> bool:
        """Whether the model currently runs splice's attention functions."""
        return self.original is not None

    def activate(self) -> None:
        """Switch the model to `splice_<implementation>` and route every layer (idempotent).

        Raises:
            SpliceError: If the model's attention implementation is not one of `SUPPORTED`.
        """
        if self.active:
            return
        # Any: an HF PreTrainedModel. torch types nn.Module attributes it does not declare as
        # Tensor | Module, so `config` and `set_attn_implementation` would not type-check.
        model: Any = self.engine.layout.model
        layout = self.engine.layout
        current = model.config._attn_implementation
        if current not in SUPPORTED:
            raise SpliceError(
                f"attention scores/pattern sites need 'sdpa' or 'eager' attention; this model uses {current!r} "
                "(call model.set_attn_implementation('sdpa') first)"
            )
        for layer in range(layout.n_layers):
            _ROUTES[layout.module(Site("attn.pattern", layer))] = (self.engine, layer)
        model.set_attn_implementation(_register(current))
        self.original = current

    def deactivate(self) -> None:
        """Restore the original attention implementation and drop the routes (idempotent)."""
        if not self.active:
            return
        layout = self.engine.layout
        try:
            model: Any = layout.model  # an HF PreTrainedModel (see activate)
            model.set_attn_implementation(self.original)
        finally:
            self.original = None
            for layer in range(layout.n_layers):
                _ROUTES.pop(layout.module(Site("attn.pattern", layer)), None)
