"""Frame: what one top-level forward pass knows about its tokens.

Positions are *absolute* token positions in the full sequence, also during cached decoding, and
count from each row's first real token when an attention mask marks padding. Everything is
computed lazily: a forward whose edits select no positions pays nothing for it.
"""

from __future__ import annotations

import torch
from transformers.cache_utils import Cache

from ..errors import SpliceError


class Frame:
    """One forward pass, as every hook of it sees it: positions, the plan it runs (fixed when it
    began), the sites that fired, and the layer inputs saved for views that need them. Owned by
    the execution context that runs the forward; never shared between threads."""

    def __init__(
        self,
        batch: int,
        seq: int,
        past: int = 0,
        attention_mask=None,
        position_ids=None,
        cached: bool = False,
        plan=None,
    ):
        self.batch, self.seq, self.past = batch, seq, past
        self.cached = cached  # part of a generation (KV cache or generate's logits_to_keep): later forwards reach further positions
        self._mask = attention_mask
        self._position_ids = position_ids
        self._uniform = None
        self._positions = None
        self.plan = plan
        self.outer: Frame | None = None  # the forward this one runs inside of, if any
        self.from_root = False  # begun by the root module's hook (so ended by it)
        self.fired: set[str] = set()
        self.layer_inputs: dict[int, torch.Tensor] = {}

    def resized(self, batch: int, attention_mask=None) -> Frame:
        """The same forward (plan, fired sites, outer forward) over a different number of rows, as
        when a sweep's replay lets more variants join."""
        frame = Frame(batch, self.seq, self.past, attention_mask, None, self.cached, self.plan)
        frame.outer, frame.fired = self.outer, self.fired
        return frame

    @classmethod
    def from_call(cls, args, kwargs) -> Frame:
        """Build a frame from the arguments of a Hugging Face causal-LM forward, whatever their
        keywords (transformers renames them: the KV cache came as `past_key_values` up to 5.23
        and as `cache` from 5.24)."""
        ids = kwargs.get("input_ids", args[0] if args else None)
        embeds = kwargs.get("inputs_embeds")
        ref = ids if ids is not None else embeds
        batch, seq = (ref.shape[0], ref.shape[1]) if ref is not None and ref.dim() >= 2 else (1, 1)
        mask, position_ids = kwargs.get("attention_mask"), kwargs.get("position_ids")
        has_cache, past = past_length(args, kwargs, seq, mask, position_ids)
        # generate() passes logits_to_keep to every step, cached or not; a plain forward does not.
        cached = has_cache or "logits_to_keep" in kwargs or past > 0
        return cls(batch, seq, past, mask, position_ids, cached)

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

    def tail(self, n: int) -> Frame:
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


def _looks_like_cache(name: str) -> bool:
    return name != "use_cache" and ("cache" in name or "past" in name)


def past_length(args, kwargs, seq: int, mask, position_ids) -> tuple[bool, int]:
    """(is this a cached step?, tokens before this call's first one), from what the call carries.

    Sources, most direct first: any `transformers` `Cache` object among the arguments, under any
    keyword or position (`get_seq_length()`, which counts every token seen, also for sliding
    windows); `cache_position`; `position_ids` (then `positions()` reads them row by row); an
    attention mask wider than the input. A call that carries a cache but none of these is refused:
    assuming 0 would silently move every position-selected edit to the wrong token."""
    values = list(kwargs.items()) + [(f"argument {i}", v) for i, v in enumerate(args)]
    caches = [(name, v) for name, v in values if isinstance(v, Cache)]
    for _name, cache in caches:
        try:
            return True, int(cache.get_seq_length())
        except Exception:  # noqa: BLE001 - an unreadable cache falls through to the other sources
            continue
    cache_position = kwargs.get("cache_position")
    carried = [
        name for name, v in values if v is not None and _looks_like_cache(name) and name != "cache_position"
    ]
    has_cache = bool(caches or carried)
    if isinstance(cache_position, torch.Tensor) and cache_position.numel():
        return has_cache, int(cache_position.reshape(-1)[0])
    if isinstance(position_ids, torch.Tensor) and position_ids.numel():
        # positions() reads them row by row; a cached step's first one is the uniform case's past
        return has_cache, int(position_ids.reshape(-1)[0]) if has_cache else 0
    if isinstance(mask, torch.Tensor) and mask.dim() == 2 and mask.shape[1] > seq:
        return has_cache, mask.shape[1] - seq
    if has_cache:
        what = ", ".join(name for name, _ in caches) or ", ".join(carried)
        raise SpliceError(
            f"this forward carries a KV cache ({what}) but splice cannot tell how many tokens came before "
            "it: expected a transformers Cache object (get_seq_length), cache_position, position_ids or an "
            "attention mask covering the past tokens; edits selected by position would land on the wrong "
            "tokens, so nothing ran"
        )
    return False, 0
