"""`splice.Model`: a thin handle on an unmodified Hugging Face model.

It owns no weights and patches nothing: editing and recording are contexts that add plain hooks
and remove them on the way out, whatever happens inside."""

from __future__ import annotations

from contextlib import contextmanager

import torch
import torch.nn as nn

from ..errors import SpliceError
from . import tokens as tok
from .edits import as_edits
from .hooks import Opened, engine_for
from .plan import EditScope, RecordScope, StopForward
from .recording import Recording
from .selection import positions_needed


class Model:
    """Wrap `hf_model` (any supported `*ForCausalLM` or its bare decoder) and an optional tokenizer."""

    def __init__(self, hf_model: nn.Module, tokenizer=None):
        if not isinstance(hf_model, nn.Module):
            raise SpliceError(f"splice.Model wraps a torch/Hugging Face model; got {type(hf_model).__name__}")
        self.hf = hf_model
        self.tokenizer = tokenizer
        self.engine = engine_for(hf_model)
        self.layout = self.engine.layout
        self.dims = self.layout.dims

    def __repr__(self):
        d = self.dims
        return (
            f"splice.Model({type(self.hf).__name__}: {d.n_layers} layers, d_model {d.d_model}, "
            f"{d.n_heads} heads ({d.n_kv_heads} KV) x {d.d_head}, d_mlp {d.d_mlp}, vocab {d.vocab})"
        )

    @property
    def device(self) -> torch.device:
        return next(self.hf.parameters()).device

    @property
    def sites(self) -> dict[str, tuple]:
        """Every valid site with its shape ('batch' and 'pos' vary per forward)."""
        out = {}
        for name in self.layout.site_names():
            site = self.layout.sites_of(name)[0]
            out[name] = tuple(
                a if s is None else s for a, s in zip(self.layout.axes(site), self.layout.shape(site))
            )
        return out

    def resolve(self, key) -> list[str]:
        """Canonical site names for a name, alias, tuple or glob (raises on unknown ones)."""
        return [site.name for site in self.layout.sites_of(key)]

    @property
    def hook_count(self) -> int:
        """Hooks splice currently has on the model (0 outside every context, in every thread)."""
        return self.engine.hook_count

    # -- contexts ------------------------------------------------------------------------------
    @contextmanager
    def edit(self, edits=None):
        """Apply `edits` (an `Edits` or a dict) to every forward inside, `generate` included, in
        this thread (or asyncio task) only. Yields the live registry: assigning to it changes the
        next forward."""
        scope = EditScope(as_edits(edits))
        with Opened(self.engine, (scope,)):
            yield scope.edits

    @contextmanager
    def record(self, sites="*", mode: str = "overwrite"):
        """Record `sites` (a key, glob, or list of them; default every site) into a Recording."""
        scope = self._record_scope(sites, mode)
        with Opened(self.engine, (scope,)):
            yield scope.recording

    def _record_scope(self, sites, mode: str, stop_when_complete: bool = False) -> RecordScope:
        keys = [sites] if isinstance(sites, (str, tuple)) else list(sites)
        if keys == ["*"]:
            keys = self.layout.site_names()
        resolved = {}
        for key in keys:
            for site in self.layout.sites_of(key):
                resolved.setdefault(site.name, site)
        recording = Recording(self.layout.sites_of, list(resolved), mode)
        return RecordScope(recording, tuple(resolved.values()), stop_when_complete)

    # -- running -------------------------------------------------------------------------------
    def forward(self, inputs, **kwargs) -> torch.Tensor:
        """Logits for a string, list of strings (left-padded), token ids or tokenizer output."""
        batch = tok.encode(self.tokenizer, inputs, self.device)
        return self._logits(self.hf(**batch, **kwargs))

    @staticmethod
    def _logits(out) -> torch.Tensor:
        return out.logits if hasattr(out, "logits") else out[0]

    __call__ = forward

    def run(
        self,
        inputs,
        edits=None,
        record=None,
        mode: str = "overwrite",
        stop_after_record: bool = False,
        **kwargs,
    ):
        """One forward with optional edits and recording: returns (logits, Recording or None).

        stop_after_record=True ends the forward once every recorded site is stored, skipping the
        later layers and the unembedding (logits come back as None): caching layer 4 of a
        12-layer model for a Patch costs a third of a forward."""
        if stop_after_record and not record:
            raise SpliceError("stop_after_record=True needs record=...: there is nothing to stop after")
        scopes = [EditScope(as_edits(edits))] if edits else []
        recording = None
        if record:
            scopes.append(self._record_scope(record, mode, stop_when_complete=stop_after_record))
            recording = scopes[-1].recording
        batch = tok.encode(self.tokenizer, inputs, self.device)
        with Opened(self.engine, tuple(scopes)):  # one plan build for edits and recording together
            try:
                logits = self._logits(self.hf(**batch, **kwargs))
            except StopForward:
                logits = None
        return logits, recording

    def generate(self, inputs, edits=None, max_new_tokens: int = 20, return_tokens: bool = False, **kwargs):
        """Greedy (by default) generation under `edits`; returns the new text (a list for a batch),
        or with return_tokens=True the full token ids (prompt + generated, left-padded)."""
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
            ids = self.hf.generate(**batch, max_new_tokens=max_new_tokens, **kwargs)
        if return_tokens:
            return ids
        new = ids[:, batch["input_ids"].shape[1] :]
        if self.tokenizer is None:
            return new
        texts = self.tokenizer.batch_decode(new, skip_special_tokens=True)
        return texts[0] if isinstance(inputs, str) else texts

    # -- tokens --------------------------------------------------------------------------------
    def to_tokens(self, text) -> torch.Tensor:
        return tok.to_tokens(self.tokenizer, text, self.device)

    def to_str_tokens(self, text) -> list[str]:
        return tok.to_str_tokens(self.tokenizer, text)

    def to_single_token(self, text: str) -> int:
        return tok.to_single_token(self.tokenizer, text)

    def to_string(self, ids):
        return tok.to_string(self.tokenizer, ids)

    def test_prompt(self, prompt: str, answer: str, top_k: int = 10, edits=None, print_results: bool = True):
        """The top-k next tokens after `prompt`, and the rank, logit and probability of each token
        of `answer` given the ones before it: printed (returns None, as TransformerLens does), or
        with print_results=False returned as a DataFrame (one row per (answer token, top-k
        token), `is_answer` marking the answer's own row, added after the top k if it is not
        among them)."""
        from .prompt_report import prompt_report

        return prompt_report(self, prompt, answer, top_k, edits, print_results)
