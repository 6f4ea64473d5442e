"""Frame: what one top-level forward pass knows about its tokens.

Positions are *absolute* token positions in the full sequence, also during cached decoding, and
count from each row's first real token when an attention mask marks padding. Everything is
computed lazily: a forward whose edits select no positions pays nothing for it.
"""

from __future__ import annotations

import torch


class Frame:
    """Per-forward state shared by all dispatchers: positions, fired sites, saved layer inputs."""

    def __init__(self, batch: int, seq: int, past: int = 0, attention_mask=None, position_ids=None, cached: bool = False):
        self.batch, self.seq, self.past = batch, seq, past
        self.cached = cached  # part of a generation (KV cache or generate's logits_to_keep): later forwards reach further positions
        self._mask = attention_mask
        self._position_ids = position_ids
        self._uniform = None
        self._positions = None
        self.fired: set[str] = set()
        self.base: dict[int, torch.Tensor] = {}

    @classmethod
    def from_call(cls, args, kwargs) -> "Frame":
        """Build a frame from the keyword arguments of a Hugging Face causal-LM forward."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, seq = (ref.shape[0], ref.shape[1]) if ref is not None and ref.dim() >= 2 else (1, 1)
        cache = kwargs.get("past_key_values")
        cache_position = kwargs.get("cache_position")
        if cache_position is not None and cache_position.numel():
            past = int(cache_position[0])
        elif cache is not None and hasattr(cache, "get_seq_length"):
            past = int(cache.get_seq_length())
        else:
            past = 0
        # generate() passes logits_to_keep to every step, cached or not; a plain forward does not.
        cached = cache is not None or "logits_to_keep" in kwargs or past > 0
        return cls(batch, seq, past, kwargs.get("attention_mask"), kwargs.get("position_ids"), cached)

    @property
    def uniform(self) -> bool:
        """True when every row holds real tokens at positions past..past+seq-1."""
        if self._uniform is None:
            mask = self._mask
            self._uniform = mask is None or mask.dim() != 2 or bool(mask.all())
            if self._uniform and mask is None and self._position_ids is not None:
                expected = torch.arange(self.past, self.past + self.seq, device=self._position_ids.device)
                self._uniform = bool((self._position_ids == expected).all())
        return self._uniform

    def positions(self):
        """(positions [batch, seq], valid [batch, seq], lengths [batch]) as tensors."""
        if self._positions is None:
            mask = self._mask
            if mask is not None and mask.dim() == 2 and not self.uniform:
                counts = mask.long().cumsum(-1)
                pos = (counts - 1)[:, -self.seq :]
                valid = mask[:, -self.seq :].bool()
                lengths = counts[:, -1]
            elif self._position_ids is not None:
                pos = self._position_ids.expand(self.batch, self.seq).long()
                valid = torch.ones_like(pos, dtype=torch.bool)
                lengths = pos.max(-1).values + 1
            else:
                pos = torch.arange(self.past, self.past + self.seq).expand(self.batch, self.seq)
                valid = torch.ones_like(pos, dtype=torch.bool)
                lengths = torch.full((self.batch,), self.past + self.seq)
            self._positions = (pos, valid, lengths)
        return self._positions

    def tail(self, n: int) -> "Frame":
        """The frame of only the last n positions (logits computed for the last tokens only)."""
        ids = self._position_ids[..., -n:] if self._position_ids is not None else None
        sub = Frame(self.batch, n, self.past + self.seq - n, self._mask, ids, self.cached)
        sub._uniform = self._uniform
        return sub

    @property
    def total(self) -> int:
        """Tokens in the longest row so far (past + current)."""
        if self.uniform:
            return self.past + self.seq
        return int(self.positions()[2].max())
