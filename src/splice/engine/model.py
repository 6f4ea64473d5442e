"""`splice.Model`: a thin handle on an unmodified Hugging Face model.

It owns no weights and patches nothing: editing and recording are contexts that add plain hooks
and remove them on the way out, whatever happens inside. TransformerLens users also find here the
names they know (`W_Q`, `unembed`, `run_with_cache`, `run_with_hooks`, `to_tokens`). The work is
done elsewhere: hooks in `hooks`, TL arguments in `tl_hooks`, weights in `weights`, the final norm
and unembedding in `readout`, text in `tokens`."""

from __future__ import annotations

from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from typing import Any, cast

import torch
import torch.nn as nn

from ..errors import SpliceError
from . import generation, readout, tl_hooks, weights
from . import tokens as tok
from .autoencoders import hook_name_of, site_of_hook
from .edits import Edits, as_edits
from .hooks import Opened, engine_for
from .plan import EditScope, RecordScope, Scope, StopForward
from .prompt_report import prompt_report
from .recording import Recording
from .sites import Site, SiteKey
from .spliced import SAE
from .tl_hooks import HookFn, NameFilter

# What a forward accepts: text, a batch of texts, token ids, or a tokenizer's output.
Inputs = str | list[str] | torch.Tensor | Mapping[str, Any]


class Model:
    """Wrap `hf_model` (any supported `*ForCausalLM` or its bare decoder) and an optional tokenizer.

    Args:
        hf_model: The Hugging Face model; it is never modified (no weight, submodule or forward).
        tokenizer: Its tokenizer, needed only for text inputs and token helpers.
        spec: How another process loads the same model (a `splice.spec.ModelSpec`, set by
            `splice.load`); None for a model wrapped by hand. Needed only to run sweeps on Ray.

    Attributes:
        spec: The spec given (or None).

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> m
        splice.Model(GPT2LMHeadModel: 2 layers, d_model 16, 2 heads (2 KV) x 8, d_mlp 64, vocab 32)
    """

    def __init__(self, hf_model: nn.Module, tokenizer: Any = None, *, spec: Any = None):
        if not isinstance(hf_model, nn.Module):
            raise SpliceError(f"splice.Model wraps a torch/Hugging Face model; got {type(hf_model).__name__}")
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.spec = spec
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
        """Where inputs are sent: the device the input embedding computes on. For a model split
        across devices by accelerate (`device_map=...`) that is the first block's device, never
        "meta" (where offloaded weights rest); otherwise the model's device."""
        from .devices import input_device  # here: only this property of the module is devices-aware

        return input_device(self.hf)

    @property
    def sites(self) -> dict[str, tuple]:
        """Every valid site with its shape ('batch' and 'pos' vary per forward), e.g.
        `'blocks.1.attn.q': ('batch', 'pos', n_heads, d_head)`."""
        out = {}
        for name in self.layout.site_names():
            site = self.layout.sites_of(name)[0]
            out[name] = tuple(
                a if s is None else s for a, s in zip(self.layout.axes(site), self.layout.shape(site))
            )
        return out

    def resolve(self, key: SiteKey) -> list[str]:
        """Canonical site names for a name, alias, tuple or glob (raises on unknown ones): on a
        2-layer model `("z", -1)` gives `['blocks.1.attn.z']`, `"blocks.*.resid_post"` both layers'."""
        return [site.name for site in self.layout.sites_of(key)]

    @property
    def hook_count(self) -> int:
        """Hooks splice currently has on the model (0 outside every context, in every thread)."""
        return self.engine.hook_count

    # -- contexts ------------------------------------------------------------------------------
    @contextmanager
    def edit(self, edits: Edits | Mapping[Any, Any] | None = None) -> Iterator[Edits]:
        """Apply `edits` (an `Edits` or a dict {site key: intervention(s)}) to every forward
        inside, `generate` included, in this thread (or asyncio task) only. Yields the live
        registry: assigning to it changes the next forward.

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
    def attach(self, sae: Any, site: SiteKey | None = None, *, error_term: bool = True) -> Iterator[Edits]:
        """Run `site` through a sparse autoencoder in every forward inside (this context only),
        adding the sub-sites `<site>.sae.acts` (`[batch, pos, d_sae]`), `.sae.recon` and
        `.sae.error`, which take edits and recordings like any site. The same as
        `edit({site: splice.SAE(sae, error_term=error_term)})`; nest blocks to attach several.

        Args:
            sae: Any module with `encode` and `decode` (see `splice.sae`).
            site: Where (one site); None: the SAE's own `hook_name` (`cfg.hook_name` or SAELens 6's
                `cfg.metadata.hook_name`), through the TransformerLens aliases.
            error_term: True (default): the model goes on with `recon + error`, so with no latent
                edited it computes exactly what it did. False: with the reconstruction alone.

        Raises:
            SpliceError: For a site that is not one site, an SAE without a hook name when no site
                is given, or an SAE whose width does not fit the site.

        Example:
            >>> import splice, torch, transformers
            >>> from splice.sae import SAEConfig, SparseAutoencoder
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> sae = SparseAutoencoder(SAEConfig("topk", 16, 64, k=4, hook_name="blocks.1.hook_resid_post"))
            >>> ids = torch.tensor([[1, 2, 3]])
            >>> with m.attach(sae), m.record("blocks.1.resid_post.sae.acts") as rec:
            ...     same = m(ids)
            >>> torch.equal(same, m(ids)), rec["blocks.1.resid_post.sae.acts"].shape
            (True, torch.Size([1, 3, 64]))
        """
        item = SAE(sae, error_term=error_term)  # checks the SAE before the site, as a user reads the call
        if site is None:
            hook = hook_name_of(sae)
            if hook is None:
                raise SpliceError(
                    f"{type(sae).__name__} has no hook_name (cfg.hook_name or cfg.metadata.hook_name): "
                    "pass site= to attach it"
                )
            name = site_of_hook(hook, self.layout.n_layers, set(self.layout.points)).name
        else:
            names = self.resolve(site)
            if len(names) != 1:
                raise SpliceError(f"an SAE is attached at one site; {site!r} names {len(names)}")
            name = names[0]
        with self.edit({name: item}) as edits:
            yield edits

    def attached(self, site: SiteKey) -> Any:
        """The SAE module attached at `site` in this context's open blocks, or None.

        Example:
            >>> import splice, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())
            >>> m.attached("blocks.1.resid_post") is None
            True
        """
        sites = self.layout.sites_of(site)
        if len(sites) != 1:
            raise SpliceError(f"attached() takes one site; {site!r} names {len(sites)}")
        action = self.engine.plan_here().get(sites[0].base.name)
        return None if action is None or action.attached is None else action.attached.sae.sae

    @contextmanager
    def record(self, sites: Any = "*", mode: str = "overwrite") -> Iterator[Recording]:
        """Record `sites` (a site key or glob, or a list of them; default every site) of every
        forward inside into a `Recording`, in `mode` "overwrite" (the last forward's value) or
        "accumulate" (one entry per forward).

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
        """Logits `[batch, pos, vocab]` of one forward (also `m(inputs)`): `inputs` is a string, a
        list of strings (left-padded), token ids or tokenizer output; `kwargs` go to the HF forward."""
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
            record: A site key or glob, or a list of them, to record (`mode` as for `record`).
            stop_after_record: End the forward once every recorded site is stored, skipping the
                later layers (logits come back as None): caching layer 4 of 12 costs a third.
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
        """Greedy (by default) generation under `edits` (the preparation: `generation`).

        Args:
            inputs: A string, a list of strings (left-padded), token ids or tokenizer output.
            edits: Applied to every step; positions are absolute, so `pos=slice(n_prompt, None)`
                edits only generated tokens. Negative positions are refused.
            return_tokens: Return every token id (prompt + new, left-padded) instead of the new text.
            **kwargs: Passed to the Hugging Face `generate` (e.g. do_sample=True).

        Returns:
            The new text (a list for a batch; new ids without a tokenizer), or the ids.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> v = torch.ones(16)
            >>> ids = m.generate(torch.tensor([[1, 2, 3]]), edits={"blocks.1.resid_post": splice.Add(v, pos=slice(3, None))}, max_new_tokens=2)
            >>> ids.shape  # without a tokenizer: the new token ids
            torch.Size([1, 2])
        """
        batch, live, kwargs = generation.prepare(
            self.tokenizer, inputs, self.device, edits, max_new_tokens, kwargs
        )
        with self.edit(live):
            ids = cast(Any, self.hf).generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
        n_prompt = batch["input_ids"].shape[1]
        return generation.result(self.tokenizer, ids, n_prompt, return_tokens, isinstance(inputs, str))

    # -- TransformerLens-style running (the translation: `tl_hooks`) -----------------------------
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
        """TransformerLens' `run_with_cache`, giving (logits, cache): `m.run(input, record=...)`
        under TL's argument names, so TL code ports by changing the model object only (the
        translation: `tl_hooks`).

        Recording every site (the default) includes the attention patterns, so those layers
        compute attention eagerly (about 1e-7 from the fused kernel, see README); filter to avoid it.

        Args:
            input: A string, a list of strings (left-padded), token ids or tokenizer output.
            names_filter: None (every site), a site name (canonical or TL, e.g.
                `blocks.3.hook_resid_post`), a glob, a list of them, or a function `name -> bool`
                (a site is kept if it accepts the canonical name or, where there is one, the TL name).
            prepend_bos: The BOS rule for text (see `splice.tokens`): None follows the tokenizer.
            return_type: "logits" or None (no logits returned); TL's "loss"/"both" are refused.
            return_cache_object: True: a `Recording`; False: a plain {name: tensor} dict.
            **kwargs: Passed to the HF forward; TL arguments with no splice meaning (`incl_bwd`,
                `stop_at_layer`, `device`, ...) are refused, saying what to use instead.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> logits, cache = m.run_with_cache(torch.tensor([[1, 2, 3]]), names_filter=lambda n: n.endswith("hook_resid_post"))
            >>> cache.stack("blocks.*.resid_post").shape  # [layer, batch, pos, d_model]
            torch.Size([2, 1, 3, 16])
        """
        kwargs = tl_hooks.tl_kwargs("run_with_cache", return_type, kwargs)
        batch = tok.encode(self.tokenizer, input, self.device, prepend_bos)
        if not isinstance(return_cache_object, bool):
            raise SpliceError(f"return_cache_object must be True or False; got {return_cache_object!r}")
        logits, cache = self.run(batch, record=tl_hooks.sites_to_cache(self.layout, names_filter), **kwargs)
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
        """TransformerLens' `run_with_hooks`: one forward with hook functions at sites, as
        `splice.Apply` edits of this forward only (removed afterwards, also on errors), so TL hook
        code ports unchanged (the translation: `tl_hooks`).

        `fn(activation, hook)` gets a copy of the whole site tensor in TL's layout (`attn.z` is
        `[batch, pos, head, d_head]`) and returns the new tensor (same shape and dtype) or None to
        keep it (in-place changes count); `hook.name` is the canonical site name, `hook.layer()`
        its layer. Several hooks on one site run in the order given.

        Args:
            input: A string, a list of strings (left-padded), token ids or tokenizer output.
            fwd_hooks: `[(site, fn), ...]`; site is a name (canonical or TL), a glob, a `("z", 3)`
                tuple or a function `name -> bool` (as `run_with_cache`'s names_filter).
            prepend_bos: The BOS rule for text (see `splice.tokens`): None follows the tokenizer.
            return_type: "logits" or None (then None is returned).
            **kwargs: Passed to the HF forward; `bwd_hooks` and other TL arguments with no
                splice meaning are refused, saying what to use instead.

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
        kwargs = tl_hooks.tl_kwargs("run_with_hooks", return_type, kwargs)
        batch = tok.encode(self.tokenizer, input, self.device, prepend_bos)
        logits, _ = self.run(batch, edits=tl_hooks.hook_edits(self.layout, fwd_hooks), **kwargs)
        return logits if return_type else None

    # -- weights (the reading: `weights`) --------------------------------------------------------
    # Raw Hugging Face weights in TransformerLens' layout (no LayerNorm folding, no centring,
    # rotary not applied), each a detached copy made on every access (changing it never changes
    # the model), in the parameters' dtype and device.
    @property
    def W_E(self) -> torch.Tensor:
        """Token embedding `[vocab, d_model]`: `W_E[ids]` is exactly what the input embedding module
        gives (Gemma/Gemma2's sqrt(d_model) scale included, as TransformerLens folds it in; no
        positional embedding). A detached copy, in the model's dtype and device."""
        return weights.embedding(self.hf)

    @property
    def W_U(self) -> torch.Tensor:
        """Unembedding `[d_model, vocab]`: the lm_head weight, transposed (raw: no centring). A
        detached copy; `W_U[:, 3] - W_U[:, 4]` is the logit-difference direction of tokens 3 and 4.
        With a soft-capping family (Gemma2) the logits are not `resid @ W_U`: use `unembed`."""
        return weights.unembedding_weight(self.hf)

    @property
    def b_U(self) -> torch.Tensor:
        """Unembedding bias `[vocab]`: lm_head's bias where the model has one (GPT-J), else zeros
        (never None, so `resid @ W_U + b_U` always works). A detached copy."""
        return weights.unembedding_bias(self.hf)

    def head_weights(self, name: str, layer: int | None = None, repeat_kv: bool = True) -> torch.Tensor:
        """One attention weight in TransformerLens' layout, for every layer or one (the reading:
        `weights`). Unlike `W_Q` ... `b_O` it can read one layer (less memory on a big model) and
        the un-repeated K/V weights of GQA/MQA models.

        Args:
            name: "W_Q", "W_K", "W_V" (`[head, d_model, d_head]` per layer), "W_O"
                (`[head, d_head, d_model]`), "b_Q", "b_K", "b_V" (`[head, d_head]`) or "b_O"
                (`[d_model]`). Biases a model does not have are zeros. Raw, a detached copy.
            layer: One layer (negative counts from the end), or None for all, stacked first.
            repeat_kv: For K/V weights under GQA/MQA: True gives one per query head (head h reads
                KV head h // (n_heads / n_kv_heads), as TransformerLens' W_K does), False one per
                KV head (`[.., kv_head, ..]`).

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

    # -- readout (the work: `readout`) -------------------------------------------------------------
    def unembed(self, resid: torch.Tensor) -> torch.Tensor:
        """Logits `[..., vocab]` of `resid [..., d_model]` (model dtype and device) by the model's
        own unembedding: lm_head, then what the model applies after it (Gemma2's logit soft-cap),
        so `unembed(cache['final_norm'])` equals the logits. No final norm (see `ln_final`), no
        hooks; gradients flow.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> logits, cache = m.run(torch.tensor([[1, 2, 3]]), record=["blocks.0.resid_post", "final_norm"])
            >>> torch.equal(m.unembed(cache["final_norm"]), logits)
            True
            >>> lens = m.unembed(m.ln_final(cache["blocks.0.resid_post"]))  # logit lens at layer 0
        """
        return readout.unembed(self.layout, resid)

    def ln_final(self, resid: torch.Tensor) -> torch.Tensor:
        """The model's final norm (the module of the `final_norm` site) applied to `resid
        [..., d_model]` (model dtype and device) with the module's own forward: no hooks run,
        gradients flow, and `ln_final(cache['blocks.-1.resid_post'])` equals `cache['final_norm']`."""
        return readout.ln_final(self.layout, resid)

    def tokens_to_residual_directions(
        self, tokens: str | int | list[str] | list[int] | torch.Tensor
    ) -> torch.Tensor:
        """The unembedding direction(s) of tokens, the columns of `W_U` as rows (a detached copy):
        `[d_model]` for a single-token string (" Mary") or an id, `[n, d_model]` for a list of
        either, `[*tokens.shape, d_model]` for an integer tensor of ids."""
        return readout.token_directions(self.hf, self.tokenizer, tokens)

    # -- tokens --------------------------------------------------------------------------------
    def to_tokens(self, text: str | list[str], prepend_bos: bool | None = None) -> torch.Tensor:
        """Token ids `[batch, pos]` of a string or list of strings (left-padded), on the model's device.

        `prepend_bos`: None follows the tokenizer (GPT-2's and SmolLM2's add no BOS, Llama's and
        Gemma's do); True gives exactly one BOS first (TransformerLens' default); False adds none.
        Never a double BOS (see `splice.tokens`). With `m = splice.load()` (SmolLM2, BOS id 1),
        `m.to_tokens("Hello")` is `tensor([[19556]])`, with prepend_bos=True `tensor([[1, 19556]])`.
        """
        return tok.to_tokens(self.tokenizer, text, self.device, prepend_bos)

    def to_str_tokens(self, text: Any, prepend_bos: bool | None = None) -> list:
        """Each token as a string, for a string, a list of strings (one list each) or token ids
        (1-D or `[1, pos]`): SmolLM2's `m.to_str_tokens("When Mary")` is `['When', ' Mary']`.
        `prepend_bos` is the BOS rule of `to_tokens`, refused for ids."""
        return tok.to_str_tokens(self.tokenizer, text, prepend_bos)

    def to_single_token(self, text: str) -> int:
        """The id of a string that is exactly one token (SmolLM2's `" Mary"` is 5099); otherwise
        raises, naming the pieces ("Mary Jane" has two)."""
        return tok.to_single_token(self.tokenizer, text)

    def to_string(self, ids: Any) -> str | list[str]:
        """Decode token ids: one row gives a string (`m.to_string(m.to_tokens("Hello")[0])` is
        `'Hello'`), a `[batch, pos]` tensor a list of strings."""
        return tok.to_string(self.tokenizer, ids)

    def test_prompt(
        self,
        prompt: str,
        answer: str,
        top_k: int = 10,
        edits: Edits | Mapping[Any, Any] | None = None,
        print_results: bool = True,
    ) -> Any:
        """The `top_k` next tokens after `prompt`, and the rank, logit and probability of each token
        of `answer` given the ones before it, under optional `edits` (the work: `prompt_report`).

        `print_results=True` prints (returns None, as TransformerLens does); False returns a
        DataFrame: one row per (answer token, top-k token), `is_answer` marking the answer's own
        row (added after the top k if it is not among them). E.g.
        `m.test_prompt("The capital of France is", " Paris")`.
        """
        return prompt_report(self, prompt, answer, top_k, edits, print_results)
