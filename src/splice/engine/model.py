"""`splice.Model`: a thin handle on an unmodified Hugging Face model.

It owns no weights and patches nothing: editing and recording are contexts that add plain hooks
and remove them on the way out, whatever happens inside. TransformerLens users also find here the
names they know (`W_Q`, `unembed`, `run_with_cache`, `run_with_hooks`, `to_tokens`), read through
the architecture table, so no HF module path is ever needed."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Any, cast

import torch
import torch.nn as nn

from ..errors import SpliceError
from . import tokens as tok
from . import weights
from .directional import Apply
from .edits import Edits, as_edits
from .hooks import Opened, engine_for
from .interventions import At, Intervention
from .plan import EditScope, RecordScope, Scope, StopForward
from .recording import Recording
from .selection import positions_needed
from .sites import _TL_LAYER, Site, SiteKey

# What a forward accepts: text, a batch of texts, token ids, or a tokenizer's output.
Inputs = str | list[str] | torch.Tensor | Mapping[str, Any]
NameFilter = SiteKey | Sequence[SiteKey] | Callable[[str], bool] | None
HookFn = Callable[[torch.Tensor, "Hook"], torch.Tensor | None]

_TL_ALIAS = {point: tl for tl, point in _TL_LAYER.items()}

# TransformerLens arguments with no splice meaning, and what to use instead.
_REFUSED = {
    "bwd_hooks": "splice has no backward hooks. Edits are differentiable: to read a gradient at a site, "
    "use m.run(input, edits={site: splice.Apply(fn)}) where fn calls region.register_hook(...) and "
    "returns region.clone(); for attribution patching use splice.patching.attribution",
    "incl_bwd": "splice records forward activations only: see bwd_hooks for gradients at a site",
    "stop_at_layer": "to stop early, record what you need and stop there: "
    "m.run(input, record='blocks.<layer>.resid_pre', stop_after_record=True)",
    "start_at_layer": "splice runs whole forwards: patch the residual stream instead, "
    "m.run(input, edits={'blocks.<layer>.resid_pre': splice.Replace(resid)})",
    "tokens": "pass the ids as the input itself",
    "shortformer_pos_embed": "splice does not split positional embeddings out of the residual stream",
    "past_kv_cache": "pass the Hugging Face cache as past_key_values (or use m.generate)",
    "loss_per_token": "compute the loss from the logits: torch.nn.functional.cross_entropy(...)",
    "remove_batch_dim": "index the batch yourself: cache['<site>'][0]",
    "device": "move what you need: {k: v.to(device) for k, v in cache.items()}",
    "pos_slice": "slice the recorded tensors: cache['<site>'][:, positions]",
}


@dataclass(frozen=True)
class Hook:
    """What a TransformerLens-style hook function receives as `hook`: `hook.name` is the site's
    canonical name (`blocks.3.attn.z`), `hook.layer()` its layer."""

    name: str

    def layer(self) -> int:
        """The site's layer (an error for `embed`, `final_norm` and `logits`, which have none)."""
        prefix, _, rest = self.name.partition(".")
        if prefix != "blocks":
            raise SpliceError(f"{self.name} is not a layer's site: it has no layer")
        return int(rest.split(".", 1)[0])


def _fn_name(fn: Any) -> str:
    inner = getattr(fn, "func", fn)  # functools.partial
    return getattr(inner, "__qualname__", None) or type(inner).__name__


@dataclass(frozen=True, eq=False, repr=False)
class _HookFn(Apply, registered=False):
    """`fn(activation, hook)` at one site, as an `Apply`: it gets the whole site tensor (a copy,
    so in-place changes are safe) and returns the new tensor or None (keep the copy it was given,
    with whatever it changed in place). In a left-padded batch whose rows differ in length,
    padding positions read as zeros and what the function writes there is dropped (splice never
    edits padding; no real token attends to it)."""

    hook: Hook = Hook("")

    def compute(self, region: torch.Tensor, at: At) -> torch.Tensor:
        if at.masked:
            full = region.new_zeros(at.full_shape)
            full[at.index] = region
        else:
            full = region.clone()
        fn = self.fn
        assert fn is not None  # Apply refuses a non-callable fn when it is built
        out = fn(full, self.hook)
        if out is None:
            out = full
        if not isinstance(out, torch.Tensor) or out.shape != full.shape or out.dtype != full.dtype:
            got = (
                f"a {out.dtype} tensor of shape {list(out.shape)}"
                if isinstance(out, torch.Tensor)
                else type(out).__name__
            )
            raise SpliceError(
                f"fwd_hooks function {_fn_name(self.fn)} at {at.site} returned {got}; expected a {full.dtype} "
                f"tensor of shape {list(full.shape)} (the activation it was given), or None to keep it"
            )
        return out[at.index] if at.masked else out


class Model:
    """Wrap `hf_model` (any supported `*ForCausalLM` or its bare decoder) and an optional tokenizer.

    Args:
        hf_model: The Hugging Face model; it is never modified (no weight, submodule or forward).
        tokenizer: Its tokenizer, needed only for text inputs and token helpers.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> m
        splice.Model(GPT2LMHeadModel: 2 layers, d_model 16, 2 heads (2 KV) x 8, d_mlp 64, vocab 32)
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None):
        if not isinstance(hf_model, nn.Module):
            raise SpliceError(f"splice.Model wraps a torch/Hugging Face model; got {type(hf_model).__name__}")
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.engine = engine_for(hf_model)
        self.layout = self.engine.layout
        self.dims = self.layout.dims

    def __repr__(self) -> str:
        d = self.dims
        return (
            f"splice.Model({type(self.hf).__name__}: {d.n_layers} layers, d_model {d.d_model}, "
            f"{d.n_heads} heads ({d.n_kv_heads} KV) x {d.d_head}, d_mlp {d.d_mlp}, vocab {d.vocab})"
        )

    @property
    def device(self) -> torch.device:
        """The device of the model's first parameter (where inputs are sent)."""
        return next(self.hf.parameters()).device

    @property
    def sites(self) -> dict[str, tuple]:
        """Every valid site with its shape ('batch' and 'pos' vary per forward).

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> m.sites["blocks.1.attn.q"]
            ('batch', 'pos', 2, 8)
        """
        out = {}
        for name in self.layout.site_names():
            site = self.layout.sites_of(name)[0]
            out[name] = tuple(
                a if s is None else s for a, s in zip(self.layout.axes(site), self.layout.shape(site))
            )
        return out

    def resolve(self, key: SiteKey) -> list[str]:
        """Canonical site names for a name, alias, tuple or glob (raises on unknown ones).

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> m.resolve(("z", -1)), m.resolve("blocks.*.resid_post")
            (['blocks.1.attn.z'], ['blocks.0.resid_post', 'blocks.1.resid_post'])
        """
        return [site.name for site in self.layout.sites_of(key)]

    @property
    def hook_count(self) -> int:
        """Hooks splice currently has on the model (0 outside every context, in every thread)."""
        return self.engine.hook_count

    # -- contexts ------------------------------------------------------------------------------
    @contextmanager
    def edit(self, edits: Edits | Mapping[Any, Any] | None = None) -> Iterator[Edits]:
        """Apply `edits` to every forward inside, `generate` included, in this thread (or asyncio
        task) only.

        Args:
            edits: An `Edits` registry or a dict {site key: intervention or list of them}.

        Yields:
            The live registry: assigning to it changes the next forward.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> ids = torch.tensor([[1, 2, 3]])
            >>> with m.edit({"blocks.1.attn.z": splice.Zero(heads=1)}) as live:
            ...     ablated = m(ids)
            ...     live["blocks.0.mlp.out"] = splice.Scale(0.5)  # the next forward has both
            ...     both = m(ids)
            >>> m.hook_count
            0
        """
        scope = EditScope(as_edits(edits))
        with Opened(self.engine, (scope,)):
            yield scope.edits

    @contextmanager
    def record(self, sites: Any = "*", mode: str = "overwrite") -> Iterator[Recording]:
        """Record sites of every forward inside into a `Recording`.

        Args:
            sites: A site key or glob, or a list of them (default: every site).
            mode: "overwrite" (the last forward's value) or "accumulate" (one entry per forward).

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> with m.record("blocks.1.resid_post", mode="accumulate") as rec:
            ...     _ = m(torch.tensor([[1, 2, 3]]))
            ...     _ = m(torch.tensor([[4, 5, 6]]))
            >>> rec.cat("blocks.1.resid_post").shape
            torch.Size([2, 3, 16])
        """
        scope = self._record_scope(sites, mode)
        with Opened(self.engine, (scope,)):
            yield scope.recording

    def _record_scope(self, sites: Any, mode: str, stop_when_complete: bool = False) -> RecordScope:
        keys: list[Any] = [sites] if isinstance(sites, (str, tuple)) else list(sites)
        if keys == ["*"]:
            keys = self.layout.site_names()
        resolved: dict[str, Site] = {}
        for key in keys:
            for site in self.layout.sites_of(key):
                resolved.setdefault(site.name, site)
        recording = Recording(self.layout.sites_of, list(resolved), mode)
        return RecordScope(recording, tuple(resolved.values()), stop_when_complete)

    # -- running -------------------------------------------------------------------------------
    def forward(self, inputs: Inputs, **kwargs: Any) -> torch.Tensor:
        """Logits of one forward (also `m(inputs)`).

        Args:
            inputs: A string, a list of strings (left-padded), token ids or tokenizer output.
            **kwargs: Passed to the Hugging Face model's forward.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> m(torch.tensor([[1, 2, 3]])).shape  # [batch, pos, vocab]
            torch.Size([1, 3, 32])
        """
        batch = tok.encode(self.tokenizer, inputs, self.device)
        return self._logits(self.hf(**batch, **kwargs))

    @staticmethod
    def _logits(out: Any) -> torch.Tensor:
        return out.logits if hasattr(out, "logits") else out[0]

    __call__ = forward

    def run(
        self,
        inputs: Inputs,
        edits: Edits | Mapping[Any, Any] | None = None,
        record: Any = None,
        mode: str = "overwrite",
        stop_after_record: bool = False,
        **kwargs: Any,
    ) -> tuple[torch.Tensor | None, Recording | None]:
        """One forward with optional edits and recording.

        Args:
            inputs: A string, a list of strings (left-padded), token ids or tokenizer output.
            edits: An `Edits` or a dict {site key: intervention(s)}, applied to this forward only.
            record: A site key or glob, or a list of them, to record.
            mode: Recording mode ("overwrite" or "accumulate").
            stop_after_record: End the forward once every recorded site is stored, skipping the
                later layers and the unembedding (logits come back as None): caching layer 4 of a
                12-layer model for a Patch costs a third of a forward.
            **kwargs: Passed to the Hugging Face model's forward.

        Returns:
            (logits, Recording or None).

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> logits, cache = m.run(
            ...     torch.tensor([[1, 2, 3]]), edits={"blocks.1.attn.z": splice.Zero(heads=1)}, record="blocks.*.resid_post"
            ... )
            >>> logits.shape, list(cache)
            (torch.Size([1, 3, 32]), ['blocks.0.resid_post', 'blocks.1.resid_post'])
        """
        if stop_after_record and not record:
            raise SpliceError("stop_after_record=True needs record=...: there is nothing to stop after")
        scopes: list[Scope] = [EditScope(as_edits(edits))] if edits else []
        recording = None
        if record:
            scope = self._record_scope(record, mode, stop_when_complete=stop_after_record)
            scopes.append(scope)
            recording = scope.recording
        batch = tok.encode(self.tokenizer, inputs, self.device)
        logits: torch.Tensor | None
        with Opened(self.engine, tuple(scopes)):  # one plan build for edits and recording together
            try:
                logits = self._logits(self.hf(**batch, **kwargs))
            except StopForward:
                logits = None
        return logits, recording

    def generate(
        self,
        inputs: Inputs,
        edits: Edits | Mapping[Any, Any] | None = None,
        max_new_tokens: int = 20,
        return_tokens: bool = False,
        **kwargs: Any,
    ) -> Any:
        """Greedy (by default) generation under `edits`.

        Args:
            inputs: A string, a list of strings (left-padded), token ids or tokenizer output.
            edits: Applied to every step; positions are absolute, so `pos=slice(n_prompt, None)`
                edits only generated tokens. Negative positions are refused.
            max_new_tokens: How many tokens to generate.
            return_tokens: Return the full token ids (prompt + generated, left-padded) instead of text.
            **kwargs: Passed to the Hugging Face `generate` (e.g. do_sample=True).

        Returns:
            The new text (a list for a batch), or the token ids with return_tokens=True.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> v = torch.ones(16)
            >>> ids = m.generate(torch.tensor([[1, 2, 3]]), edits={"blocks.1.resid_post": splice.Add(v, pos=slice(3, None))}, max_new_tokens=2)
            >>> ids.shape  # without a tokenizer: the new token ids
            torch.Size([1, 2])
        """
        batch = tok.encode(self.tokenizer, inputs, self.device)
        batch.pop("position_ids", None)  # generate derives positions from the attention mask
        edits = as_edits(edits)
        total = batch["input_ids"].shape[1] + max_new_tokens
        for key, edit in edits.items_flat():
            needed = positions_needed(edit.pos)
            if needed is not None and needed > total:
                raise SpliceError(
                    f"edits[{key!r}] = {edit!r} selects position {needed - 1}, but this generation ends at "
                    f"position {total - 1} ({batch['input_ids'].shape[1]} prompt tokens + max_new_tokens="
                    f"{max_new_tokens}): it would never run"
                )
        if "attention_mask" not in batch:
            batch["attention_mask"] = torch.ones_like(batch["input_ids"])
        kwargs.setdefault("do_sample", False)
        kwargs.setdefault("pad_token_id", tok.pad_token_id(self.tokenizer) if self.tokenizer else 0)
        with self.edit(edits):
            ids = cast(Any, self.hf).generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
        if return_tokens:
            return ids
        new = ids[:, batch["input_ids"].shape[1] :]
        if self.tokenizer is None:
            return new
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return texts[0] if isinstance(inputs, str) else texts

    # -- TransformerLens-style running ---------------------------------------------------------
    def run_with_cache(
        self,
        input: Inputs,
        names_filter: NameFilter = None,
        *,
        prepend_bos: bool | None = None,
        return_type: str | None = "logits",
        return_cache_object: bool = True,
        **kwargs: Any,
    ) -> tuple[torch.Tensor | None, Recording | dict[str, torch.Tensor]]:
        """TransformerLens' `run_with_cache`: one forward recording sites; `m.run(input,
        record=...)` under TL's argument names.

        Why: TL code ports by changing the model object only. Recording every site (the default)
        includes the attention patterns, so those layers compute attention eagerly (about 1e-7
        from the fused kernel, as README explains); filter to avoid it.

        Args:
            input: A string, a list of strings (left-padded), token ids or tokenizer output.
            names_filter: None (every site), a site name (canonical or TL, e.g.
                `blocks.3.hook_resid_post`), a glob, a list of names, or a function
                `name -> bool`, called with each site's canonical name and, where one exists, its
                TL name (a site is kept if either is accepted).
            prepend_bos: The BOS rule for text (see `splice.tokens`): None follows the tokenizer.
            return_type: "logits" or None (no logits returned); TL's "loss"/"both" are refused.
            return_cache_object: True: a `Recording`; False: a plain {name: tensor} dict.
            **kwargs: Passed to the Hugging Face forward. TL arguments with no splice meaning
                (`incl_bwd`, `stop_at_layer`, `remove_batch_dim`, `device`, ...) are refused with
                what to use instead.

        Returns:
            (logits, cache).

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> logits, cache = m.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter=lambda n: n.endswith("hook_resid_post"))
            >>> cache.stack("blocks.*.resid_post").shape  # [layer, batch, pos, d_model]
            torch.Size([2, 1, 3, 16])
        """
        batch, kwargs = self._tl_call("run_with_cache", input, prepend_bos, return_type, kwargs)
        if not isinstance(return_cache_object, bool):
            raise SpliceError(f"return_cache_object must be True or False; got {return_cache_object!r}")
        logits, cache = self.run(batch, record=self._filtered(names_filter), **kwargs)
        assert cache is not None
        out: Recording | dict[str, torch.Tensor] = cache if return_cache_object else dict(cache)
        return (logits if return_type else None), out

    def run_with_hooks(
        self,
        input: Inputs,
        fwd_hooks: Sequence[tuple[SiteKey | Callable[[str], bool], HookFn]] = (),
        *,
        prepend_bos: bool | None = None,
        return_type: str | None = "logits",
        **kwargs: Any,
    ) -> torch.Tensor | None:
        """TransformerLens' `run_with_hooks`: one forward with hook functions at sites, applied
        as `splice.Apply` edits of this forward only (removed afterwards, also on errors).

        Why: TL hook code ports unchanged. `fn(activation, hook)` gets the whole site tensor in
        TL's layout (`attn.z` is `[batch, pos, head, d_head]`) as a copy, and returns the new
        tensor (same shape and dtype) or None to keep it (in-place changes to it count);
        `hook.name` is the canonical site name, `hook.layer()` its layer. Several hooks on one
        site run in the order given. In a left-padded batch of different lengths, padding
        positions read as zeros and writes there are dropped.

        Args:
            input: A string, a list of strings (left-padded), token ids or tokenizer output.
            fwd_hooks: `[(site, fn), ...]`; site is a name (canonical or TL), a glob, a
                `("z", 3)` tuple (negative layers count from the end) or a function `name -> bool`
                (see `run_with_cache`'s names_filter). Empty: a plain forward.
            prepend_bos: The BOS rule for text (see `splice.tokens`): None follows the tokenizer.
            return_type: "logits" or None.
            **kwargs: Passed to the Hugging Face forward; `bwd_hooks` and other TL arguments
                with no splice meaning are refused with what to use instead.

        Returns:
            The logits (or None with return_type=None).

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> def ablate_head(z, hook):
            ...     z[:, :, 1] = 0.0  # [batch, pos, head, d_head]
            ...     return z
            >>> ids = torch.tensor([[1, 2, 3]])
            >>> hooked = m.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", ablate_head)])
            >>> torch.equal(hooked, m.run(ids, edits={"blocks.1.attn.z": splice.Zero(heads=1)})[0])
            True
        """
        batch, kwargs = self._tl_call("run_with_hooks", input, prepend_bos, return_type, kwargs)
        logits, _ = self.run(batch, edits=self._hook_edits(fwd_hooks), **kwargs)
        return logits if return_type else None

    def _tl_call(
        self, method: str, input: Inputs, prepend_bos: bool | None, return_type: Any, kwargs: dict
    ) -> tuple[Any, dict]:
        """Check TL arguments, map the ones that map, and tokenize `input`."""
        for name, hint in _REFUSED.items():
            value = kwargs.get(name)
            if name in kwargs and not (
                value is None or value is False or (name == "bwd_hooks" and not value)
            ):
                raise SpliceError(f"{method}: TransformerLens' {name}= has no splice equivalent; {hint}")
            kwargs.pop(name, None)
        reset = kwargs.pop("reset_hooks_end", True)
        if reset is not True:
            raise SpliceError(
                f"{method}: reset_hooks_end={reset!r}: splice always removes its hooks when the call ends; "
                "to keep edits over several forwards, open `with m.edit({...}):`"
            )
        kwargs.pop("clear_contexts", None)  # TL hook contexts: splice has none to clear
        side = kwargs.pop("padding_side", None)
        if side not in (None, "left"):
            raise SpliceError(
                f"{method}: padding_side={side!r}: splice pads batches of text on the left (so pos=-1 is every "
                "row's last token, and positions count from each row's first real token); pass token ids "
                "with an attention_mask for another layout"
            )
        if return_type not in ("logits", None):
            raise SpliceError(
                f"{method}: return_type={return_type!r} is not supported; use 'logits' (or None) and compute "
                "the loss from the logits, e.g. torch.nn.functional.cross_entropy(logits[:, :-1].flatten(0, 1), "
                "ids[:, 1:].flatten())"
            )
        return tok.encode(self.tokenizer, input, self.device, prepend_bos), kwargs

    def _filtered(self, names_filter: NameFilter) -> list[str]:
        """Canonical names selected by a TL-style names filter (see `run_with_cache`)."""
        if names_filter is None:
            return self.layout.site_names()
        if callable(names_filter):
            names = self._names_accepted(names_filter, "names_filter")
        elif isinstance(names_filter, (str, tuple)):
            names = self.resolve(names_filter)
        elif isinstance(names_filter, Sequence):
            names = [n for key in names_filter for n in self.resolve(cast(SiteKey, key))]
        else:
            raise SpliceError(
                "names_filter must be None, a site name or glob, a list of them, or a function name -> bool; "
                f"got {type(names_filter).__name__}"
            )
        if not names:
            raise SpliceError("names_filter selects no site: there would be nothing to cache")
        return list(dict.fromkeys(names))

    def _names_accepted(self, accept: Callable[[str], bool], what: str) -> list[str]:
        names = []
        for name in self.layout.site_names():
            site = self.layout.sites_of(name)[0]
            alias = _TL_ALIAS.get(site.point) if site.layer is not None else None
            if accept(name) or (alias is not None and accept(f"blocks.{site.layer}.{alias}")):
                names.append(name)
        if not names:
            raise SpliceError(
                f"{what}: the function accepts no site name (it is called with canonical names such as "
                f"{self.layout.site_names()[1]!r} and TransformerLens names such as 'blocks.0.hook_resid_post')"
            )
        return names

    def _hook_edits(self, fwd_hooks: Any) -> Edits | None:
        if isinstance(fwd_hooks, (str, bytes)) or not isinstance(fwd_hooks, Sequence):
            raise SpliceError(f"fwd_hooks must be a list of (site, fn) pairs; got {type(fwd_hooks).__name__}")
        per_site: dict[str, list[Intervention]] = {}
        for i, entry in enumerate(fwd_hooks):
            if not (isinstance(entry, (tuple, list)) and len(entry) == 2):
                raise SpliceError(f"fwd_hooks[{i}] must be a (site, fn) pair; got {entry!r}")
            key, fn = entry
            if not callable(fn):
                raise SpliceError(
                    f"fwd_hooks[{i}]: the hook must be a function (activation, hook) -> tensor or None; "
                    f"got {type(fn).__name__}"
                )
            if callable(key):
                names = self._names_accepted(key, f"fwd_hooks[{i}]")
            else:
                names = self.resolve(key)
            for name in names:
                per_site.setdefault(name, []).append(_HookFn(fn, hook=Hook(name)))
        return Edits(per_site) if per_site else None

    # -- weights -------------------------------------------------------------------------------
    # Raw Hugging Face weights in TransformerLens' layout (no LayerNorm folding, no centring,
    # rotary not applied), read through the architecture table, each a detached copy made on
    # every access (changing it never changes the model), in the parameters' dtype and device.
    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding `[vocab, d_model]`: `W_E[ids]` is exactly what the input embedding module
        gives (Gemma/Gemma2's sqrt(d_model) scale included, as TransformerLens folds it in; no
        positional embedding). A detached copy, in the model's dtype and device.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> m.W_E.shape, torch.equal(m.W_E[5], m.hf.transformer.wte.weight[5])
            (torch.Size([32, 16]), True)
        """
        return weights.embedding(self.hf)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding `[d_model, vocab]`: the lm_head weight, transposed (raw: no centring). A
        detached copy. With a soft-capping family (Gemma2) the logits are not `resid @ W_U`: use
        `unembed`.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> direction = m.W_U[:, 3] - m.W_U[:, 4]  # logit difference of tokens 3 and 4
            >>> direction.shape
            torch.Size([16])
        """
        _, weight, _ = weights.unembedding(self.hf)
        with torch.no_grad():
            return weight.detach().clone(memory_format=torch.contiguous_format)

    @property
    def b_U(self) -> torch.Tensor:
        """Unembedding bias `[vocab]`: lm_head's bias where the model has one (GPT-J), else zeros
        (never None, so `resid @ W_U + b_U` always works). A detached copy."""
        _, weight, bias = weights.unembedding(self.hf)
        with torch.no_grad():
            return weight.new_zeros(weight.shape[1]) if bias is None else bias.detach().clone()

    def head_weights(self, name: str, layer: int | None = None, repeat_kv: bool = True) -> torch.Tensor:
        """One attention weight in TransformerLens' layout, for every layer or one.

        Why: the properties `W_Q` ... `b_O` stack every layer; this reads one layer (less memory on
        a big model) and gives the un-repeated K/V weights of GQA/MQA models.

        Args:
            name: "W_Q", "W_K", "W_V" (`[head, d_model, d_head]` per layer), "W_O"
                (`[head, d_head, d_model]`), "b_Q", "b_K", "b_V" (`[head, d_head]`) or "b_O"
                (`[d_model]`). Biases a model does not have are zeros.
            layer: One layer (negative counts from the end), or None for all, stacked on a new
                first axis.
            repeat_kv: For W_K/W_V/b_K/b_V under GQA/MQA: True gives one entry per query head
                (head h reads KV head h // (n_heads / n_kv_heads), as TransformerLens' W_K does);
                False gives one per KV head (`[.., kv_head, ..]`). Other names ignore it.

        Returns:
            A detached copy in the parameters' dtype and device (raw weights: no folding, no
            centring, rotary not applied).

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> m.head_weights("W_K", layer=-1, repeat_kv=False).shape  # [kv_head, d_model, d_head]
            torch.Size([2, 16, 8])
        """
        return weights.head_weights(self.layout, name, layer, repeat_kv)

    @property
    def W_Q(self) -> torch.Tensor:
        """Query weights `[layer, head, d_model, d_head]`: `attn.in @ W_Q[l, h] + b_Q[l, h]` is
        `attn.q[..., h, :]` (before rotary). Raw, a detached copy (see `head_weights`)."""
        return self.head_weights("W_Q")

    @property
    def W_K(self) -> torch.Tensor:
        """Key weights `[layer, head, d_model, d_head]`, one per *query* head (repeated under
        GQA/MQA, as TransformerLens does); `head_weights("W_K", repeat_kv=False)` gives
        `[layer, kv_head, d_model, d_head]`. Raw, a detached copy."""
        return self.head_weights("W_K")

    @property
    def W_V(self) -> torch.Tensor:
        """Value weights `[layer, head, d_model, d_head]`, repeated per query head like `W_K`;
        `head_weights("W_V", repeat_kv=False)` gives the KV heads. Raw, a detached copy."""
        return self.head_weights("W_V")

    @property
    def W_O(self) -> torch.Tensor:
        """Output weights `[layer, head, d_head, d_model]`: the sum over heads of
        `attn.z[..., h, :] @ W_O[l, h]`, plus `b_O[l]`, is the output projection's output.
        Raw, a detached copy."""
        return self.head_weights("W_O")

    @property
    def b_Q(self) -> torch.Tensor:
        """Query bias `[layer, head, d_head]` (zeros where the projection has none)."""
        return self.head_weights("b_Q")

    @property
    def b_K(self) -> torch.Tensor:
        """Key bias `[layer, head, d_head]`, repeated per query head (zeros where none)."""
        return self.head_weights("b_K")

    @property
    def b_V(self) -> torch.Tensor:
        """Value bias `[layer, head, d_head]`, repeated per query head (zeros where none)."""
        return self.head_weights("b_V")

    @property
    def b_O(self) -> torch.Tensor:
        """Output projection bias `[layer, d_model]` (zeros where none)."""
        return self.head_weights("b_O")

    def _check_resid(self, resid: Any, module: nn.Module, what: str) -> None:
        d_model = self.dims.d_model
        if not isinstance(resid, torch.Tensor) or not resid.is_floating_point():
            got = f"a {resid.dtype} tensor" if isinstance(resid, torch.Tensor) else type(resid).__name__
            raise SpliceError(f"{what} takes a floating-point [..., d_model={d_model}] tensor; got {got}")
        if resid.dim() == 0 or resid.shape[-1] != d_model:
            raise SpliceError(
                f"{what}: resid has shape {list(resid.shape)}; expected [..., d_model={d_model}] "
                "(a residual-stream tensor such as cache['final_norm'])"
            )
        param = next(module.parameters(), None)
        if param is not None and (resid.dtype != param.dtype or resid.device != param.device):
            raise SpliceError(
                f"{what}: resid is {resid.dtype} on {resid.device}, the model is {param.dtype} on "
                f"{param.device}: pass resid.to(m.device, {param.dtype})"
            )

    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's own unembedding of a residual-stream tensor: lm_head, then whatever the
        model applies after it (Gemma2's logit soft-cap), so `unembed(cache['final_norm'])`
        equals the model's logits. No final norm is applied (see `ln_final`); no hooks run.

        Args:
            resid: `[..., d_model]`, in the model's dtype and on its device. Gradients flow.

        Returns:
            Logits `[..., vocab]`.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> logits, cache = m.run(torch.tensor([[1, 2, 3]]), record=["blocks.0.resid_post", "final_norm"])
            >>> torch.equal(m.unembed(cache["final_norm"]), logits)
            True
            >>> lens = m.unembed(m.ln_final(cache["blocks.0.resid_post"]))  # logit lens at layer 0
        """
        module, _, _ = weights.unembedding(self.hf)
        self._check_resid(resid, module, "unembed")
        logits = module.forward(resid)
        transform = self.layout.logits_transform
        return transform(logits) if transform is not None else logits

    def ln_final(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's final norm (the module of the `final_norm` site) applied to a
        residual-stream tensor, with the module's own forward (no hooks run). Gradients flow.

        Args:
            resid: `[..., d_model]`, in the model's dtype and on its device.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> _, cache = m.run(torch.tensor([[1, 2, 3]]), record=["blocks.-1.resid_post", "final_norm"])
            >>> torch.equal(m.ln_final(cache["blocks.-1.resid_post"]), cache["final_norm"])
            True
        """
        point = self.layout.points.get("final_norm")
        if point is None:
            raise SpliceError(f"this {self.layout.arch.name} model has no final norm site")
        module = self.layout.module_at(point.module)
        self._check_resid(resid, module, "ln_final")
        return module.forward(resid)

    def tokens_to_residual_directions(
        self, tokens: str | int | list[str] | list[int] | torch.Tensor
    ) -> torch.Tensor:
        """The unembedding direction(s) of tokens: the columns of `W_U`, as rows.

        Args:
            tokens: A string that is one token (" Mary"), a list of such strings, a token id, a
                list of ids, or an integer tensor of ids of any shape.

        Returns:
            `[d_model]` for one token, `[n, d_model]` for a list, `[*tokens.shape, d_model]` for a
            tensor; a detached copy.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> d = m.tokens_to_residual_directions([3, 4])  # or strings: [" Mary", " John"]
            >>> d.shape, torch.equal(d[0], m.W_U[:, 3])
            (torch.Size([2, 16]), True)
        """
        ids = self._token_ids(tokens)
        _, weight, _ = weights.unembedding(self.hf)
        vocab = weight.shape[1]
        if ids.numel() and (int(ids.min()) < 0 or int(ids.max()) >= vocab):
            bad = int(ids.min()) if int(ids.min()) < 0 else int(ids.max())
            raise SpliceError(
                f"tokens_to_residual_directions: token id {bad} is out of range; the unembedding has "
                f"{vocab} columns (valid 0..{vocab - 1})"
            )
        with torch.no_grad():
            return weight[:, ids.to(weight.device)].movedim(0, -1).contiguous()

    def _token_ids(self, tokens: Any) -> torch.Tensor:
        if isinstance(tokens, str):
            return torch.tensor(self.to_single_token(tokens))
        if isinstance(tokens, list) and tokens and all(isinstance(t, str) for t in tokens):
            return torch.tensor([self.to_single_token(t) for t in tokens])
        if isinstance(tokens, int) and not isinstance(tokens, bool):
            return torch.tensor(tokens)
        if (
            isinstance(tokens, list)
            and tokens
            and all(isinstance(t, int) and not isinstance(t, bool) for t in tokens)
        ):
            return torch.tensor(tokens)
        if isinstance(tokens, torch.Tensor) and not tokens.is_floating_point() and tokens.dtype != torch.bool:
            return tokens.long()
        got = f"a {tokens.dtype} tensor" if isinstance(tokens, torch.Tensor) else repr(tokens)[:80]
        raise SpliceError(
            "tokens_to_residual_directions takes a single-token string, a token id, a non-empty list of "
            f"either, or an integer tensor of ids; got {got}"
        )

    # -- tokens --------------------------------------------------------------------------------
    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None) -> torch.Tensor:
        """Token ids `[batch, pos]` on the model's device; a list of strings is left-padded.

        Args:
            text: A string or a list of strings.
            prepend_bos: None: the tokenizer's own rule (GPT-2's and SmolLM2's tokenizers add no
                BOS; Llama's and Gemma's add theirs). True: exactly one BOS first (added unless the
                text already starts with one; TransformerLens' default). False: none added (a
                BOS written in the text stays). Never a double BOS. See `splice.tokens`.

        Example:
            ```python
            m = splice.load()  # SmolLM2: its tokenizer adds no BOS; its BOS is <|im_start|> (id 1)
            m.to_tokens("Hello")  # tensor([[19556]])
            m.to_tokens("Hello", prepend_bos=True)  # tensor([[1, 19556]])
            m.to_tokens(["Hi", "Hello there"])  # [2, longest], left-padded
            ```
        """
        return tok.to_tokens(self.tokenizer, text, self.device, prepend_bos)

    def to_str_tokens(self, text: Any, prepend_bos: bool | None = None) -> list:
        """Each token as a string, for a string, a list of strings (one list each) or token ids.

        Args:
            text: A string, a list of strings, or token ids (1-D, or `[1, pos]`).
            prepend_bos: The BOS rule for text (see `to_tokens`); refused for ids.

        Example:
            ```python
            m = splice.load()  # SmolLM2: its tokenizer adds no BOS; its BOS is <|im_start|> (id 1)
            m.to_str_tokens("When Mary")  # ['When', ' Mary']
            m.to_str_tokens("When Mary", prepend_bos=True)  # ['<|im_start|>', 'When', ' Mary']
            ```
        """
        return tok.to_str_tokens(self.tokenizer, text, prepend_bos)

    def to_single_token(self, text: str) -> int:
        """The id of a string that is exactly one token (raises naming the pieces otherwise).

        Example:
            ```python
            m = splice.load()  # SmolLM2: its tokenizer adds no BOS; its BOS is <|im_start|> (id 1)
            m.to_single_token(" Mary")  # 5099; "Mary Jane" raises, naming its two tokens
            ```
        """
        return tok.to_single_token(self.tokenizer, text)

    def to_string(self, ids: Any) -> str | list[str]:
        """Decode token ids: one row gives a string, a `[batch, pos]` tensor a list of strings.

        Example:
            ```python
            m = splice.load()  # SmolLM2: its tokenizer adds no BOS; its BOS is <|im_start|> (id 1)
            m.to_string(m.to_tokens("Hello")[0])  # 'Hello'
            ```
        """
        return tok.to_string(self.tokenizer, ids)

    def test_prompt(
        self,
        prompt: str,
        answer: str,
        top_k: int = 10,
        edits: Edits | Mapping[Any, Any] | None = None,
        print_results: bool = True,
    ) -> Any:
        """The top-k next tokens after `prompt`, and the rank, logit and probability of each token
        of `answer` given the ones before it.

        Args:
            prompt: The prompt text.
            answer: The expected continuation (each of its tokens is scored).
            top_k: How many top tokens to show per step.
            edits: Optional edits for the forward.
            print_results: True prints (returns None, as TransformerLens does); False returns a
                DataFrame (one row per (answer token, top-k token), `is_answer` marking the
                answer's own row, added after the top k if it is not among them).

        Example:
            ```python
            m = splice.load()
            m.test_prompt("The capital of France is", " Paris")  # prints the top 10 and the rank of " Paris"
            ```
        """
        from .prompt_report import prompt_report

        return prompt_report(self, prompt, answer, top_k, edits, print_results)
