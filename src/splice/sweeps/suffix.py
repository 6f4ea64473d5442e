"""Suffix replay: variants whose edits start at token p compute only the tokens from p on.

In a causal model an edit at p changes nothing before p, so those tokens' keys and values are the
baseline's. This is the model's own KV-cache path: the baseline forward is run once more with a
`DynamicCache`, and for each start p the model is asked, with its layers stubbed out, what it
passes each layer for a cached forward of tokens p.. (masks, rotary tables, position ids: its
own, for any family). A replay then calls the layers on the later tokens with those arguments
and a cache holding the baseline's first p keys and values; the logits of earlier positions
the metrics read are the baseline's. A self-check against the model's own logits decides
whether a family's cache path reproduces it; if not, sweeps replay every position, saying why.
"""

from __future__ import annotations

import contextlib
import contextvars
import inspect
import threading
from typing import Any

import torch
from transformers.cache_utils import Cache, DynamicCache

from ..engine.hooks import isolated
from ..errors import SpliceError
from .data import tiled
from .replay import PrefixReplay, call_recorder, map_tensors, tile_rows

# The call arguments a probe knows how to cut to the later tokens (what a PromptBatch holds).
CUT = {"input_ids": True, "position_ids": True, "attention_mask": False}


class SuffixFallbackWarning(UserWarning):
    """A sweep replays every position instead of only the later ones: the model's cache path
    did not reproduce its logits, or could not be used (the message says why)."""


def cache_keyword(hf) -> str | None:
    """The keyword a causal LM takes its KV cache under (`cache` from transformers 5.24,
    `past_key_values` before), or None if it takes neither."""
    names = inspect.signature(hf.forward).parameters
    return next((k for k in ("cache", "past_key_values") if k in names), None)


# Which layers the current context has stubbed out, and how an identity layer answers: set only
# inside `stubbed`, so every other thread and context calls the real layers.
_STUB: contextvars.ContextVar[tuple[str, int | None] | None] = contextvars.ContextVar(
    "splice_stub", default=None
)
_STUB_LOCK = threading.Lock()
_STUB_USERS: dict[int, tuple[int, Any]] = {}  # id(layer) -> (contexts using it, its own forward)


def _dispatching(layer):
    """A `forward` for `layer` that is the identity inside `stubbed` (in that context only) and
    the layer's own forward everywhere else."""
    own = layer.forward

    def forward(*args, **kwargs):
        stub = _STUB.get()
        if stub is None:
            return own(*args, **kwargs)
        layer_arg, arity = stub
        hidden = args[0] if args else kwargs[layer_arg]
        return hidden if arity is None else (hidden,) + (None,) * (arity - 1)

    return forward


@contextlib.contextmanager
def stubbed(layers, layer_arg: str, arity: int | None):
    """Inside this context (this thread only) every layer returns its input unchanged (as a
    tuple of `arity` items when the real layer returns a tuple), so a forward costs nothing but
    what the model computes around its layers. Other threads keep calling the real layers while
    it is open; the last context to close restores whatever `forward` each layer had
    (accelerate's wrapper included)."""
    with _STUB_LOCK:
        for layer in layers:
            users, saved = _STUB_USERS.get(id(layer), (0, None))
            if users == 0:
                saved = layer.__dict__.get("forward")
                setattr(layer, "forward", _dispatching(layer))  # noqa: B010 - an instance attribute shadowing the method
            _STUB_USERS[id(layer)] = (users + 1, saved)
    token = _STUB.set((layer_arg, arity))
    try:
        yield
    finally:
        _STUB.reset(token)
        with _STUB_LOCK:
            for layer in layers:
                users, saved = _STUB_USERS[id(layer)]
                if users > 1:
                    _STUB_USERS[id(layer)] = (users - 1, saved)
                    continue
                del _STUB_USERS[id(layer)]
                if saved is None:
                    delattr(layer, "forward")
                else:
                    setattr(layer, "forward", saved)  # noqa: B010


class Suffix:
    """A replay window over tokens `start..` of one prompt batch (see `PrefixReplay.replay`)."""

    def __init__(self, owner: SuffixReplays, start: int, calls: list):
        self.owner, self.start, self.calls = owner, start, calls
        self.keys = [k[..., :start, :] for k in owner.keys]
        self.values = [v[..., :start, :] for v in owner.values]

    def layer_input(self, i: int) -> torch.Tensor:
        """Layer i's clean input at the later tokens."""
        return self.owner.prefix.inputs[i][:, self.start :]

    def layer_call(self, i: int, copies: int) -> tuple[tuple[Any, ...], dict[str, Any]]:
        """The model's own arguments for layer i of a cached forward of the later tokens, tiled
        to `copies` copies, with a cache holding the baseline's earlier keys and values."""
        cache = DynamicCache()
        cache.update(tiled(self.keys[i], copies), tiled(self.values[i], copies), i)
        call = tile_rows(self.calls[i], self.owner.prefix.rows, copies)
        return map_tensors(call, lambda v: cache if isinstance(v, Cache) else v)

    def assemble(self, logits: torch.Tensor, baseline: torch.Tensor, copies: int) -> torch.Tensor:
        """The logits of the positions the metrics read: the baseline's before `start`."""
        missing = baseline.shape[1] - logits.shape[1]
        if missing <= 0:
            return logits
        head = tiled(baseline[:, :missing], copies)
        return torch.cat([head.to(logits.device), logits], dim=1)


class SuffixReplays:
    """The suffix windows of one traced prompt batch: the baseline's keys and values (one cached
    forward, under whatever the calling context has attached), and one window per start token.

    Build it where the `PrefixReplay` was built. `reason` is None when suffix replays reproduce
    the model's logits here (checked at two starts), else why they cannot be used.

    Args:
        prefix: The prompt batch's `PrefixReplay`.
    """

    def __init__(self, prefix: PrefixReplay):
        self.prefix = prefix
        self.windows: dict[int, Suffix] = {}
        self.keys: list[torch.Tensor] = []
        self.values: list[torch.Tensor] = []
        self.arity: int | None = None
        self.seq = prefix.inputs[0].shape[1]
        self.keyword = cache_keyword(prefix.model.hf)
        # Unembed only the last position in the forwards whose logits are not wanted, where allowed.
        self.keep = "logits_to_keep" in inspect.signature(prefix.model.hf.forward).parameters
        self.reason = self._unsupported() or self._record() or self._check()

    def _unsupported(self) -> str | None:
        extra = sorted(set(self.prefix.batch_kwargs) - set(CUT))
        if extra:
            return f"the prompt batch has inputs a suffix cannot be cut from ({', '.join(extra)})"
        if self.keyword is None:
            return f"{type(self.prefix.model.hf).__name__}.forward takes no KV cache"
        # A padding token's own output may depend on later tokens (a fully masked query attends
        # uniformly to every key under eager attention): none may be among what metrics read.
        mask, tail = self.prefix.mask, self.prefix.tail
        if mask is not None and not bool(mask[:, -tail:].all() if tail else mask.all()):
            return "the metrics read the logits of padding tokens (a prompt shorter than what they read)"
        return None

    def _cached(self, cache: Cache) -> dict[str, Any]:
        """Keyword arguments of a cached forward whose logits are not wanted (only the last
        position's is unembedded, where the model allows)."""
        assert self.keyword is not None
        return {"use_cache": True, self.keyword: cache, **({"logits_to_keep": 1} if self.keep else {})}

    def _record(self) -> str | None:
        """The baseline's keys and values, and what shape a layer returns."""
        assert self.keyword is not None
        prefix, cache = self.prefix, DynamicCache()

        def arity(module, args, output):
            self.arity = len(output) if isinstance(output, tuple) else None

        handle = prefix.layers[0].register_forward_hook(arity)
        try:
            with torch.no_grad():
                prefix.model.hf(**prefix.batch_kwargs, **self._cached(cache))
        except Exception as error:  # noqa: BLE001 - a cache path that fails is one not to use
            return f"the model's cached forward failed ({type(error).__name__}: {error})"
        finally:
            handle.remove()
        layers = list(getattr(cache, "layers", []))
        if len(layers) != len(prefix.layers) or any(
            getattr(layer, "keys", None) is None or layer.keys.shape[-2] != self.seq for layer in layers
        ):
            return "the model's cache does not hold every token of every layer"
        self.keys, self.values = [layer.keys for layer in layers], [layer.values for layer in layers]
        return None

    def _check(self) -> str | None:
        for start in sorted({self.seq // 2, self.seq - 1} - {0}):
            try:
                self.prefix.check(self.window(start))
            except Exception as error:  # noqa: BLE001 - any failure of the cache path means "do not use it"
                return f"a replay of tokens {start}.. does not reproduce the model's logits ({error})"
        return None

    def window(self, start: int) -> Suffix:
        """The window over tokens `start..` (probed once per start).

        Raises:
            SpliceError: If `start` is not inside the sequence (1..seq-1).
        """
        if not 0 < start < self.seq:
            raise SpliceError(f"a suffix starts at token 1..{self.seq - 1} of this batch; got {start}")
        if start not in self.windows:
            self.windows[start] = Suffix(self, start, self._probe(start))
        return self.windows[start]

    def _probe(self, start: int) -> list:
        """What the model passes each layer for a cached forward of tokens `start..`, with its
        layers stubbed out, in a context with nothing open (the arguments do not depend on edits)."""
        prefix = self.prefix
        kwargs = {key: value[:, start:] if CUT[key] else value for key, value in prefix.batch_kwargs.items()}
        cache = DynamicCache()
        for i, (k, v) in enumerate(zip(self.keys, self.values)):
            cache.update(k[..., :start, :], v[..., :start, :], i)
        inputs: list = [None] * len(prefix.layers)
        calls: list = [None] * len(prefix.layers)
        handles = [
            layer.register_forward_pre_hook(
                call_recorder(inputs, calls, prefix.layer_arg, i), with_kwargs=True
            )
            for i, layer in enumerate(prefix.layers)
        ]
        assert self.keyword is not None  # checked before any window is asked for
        try:
            with isolated(), torch.no_grad(), stubbed(prefix.layers, prefix.layer_arg, self.arity):
                prefix.model.hf(**kwargs, **self._cached(cache))
        finally:
            for handle in handles:
                handle.remove()
        return calls
