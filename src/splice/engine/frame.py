"""Frame: what one top-level forward pass knows about its tokens.

Positions are *absolute* token positions in the full sequence, also during cached decoding, and
count from each row's first real token when an attention mask marks padding. Everything is
computed lazily: a forward whose edits select no positions pays nothing for it.
"""

from __future__ import annotations

from typing import Any

import torch
from transformers.cache_utils import Cache

from ..errors import SpliceError


class Frame:
    """One forward pass, as every hook of it sees it.

    Holds the forward's token positions, the plan it runs (fixed when it began), the sites that
    fired, and the layer inputs saved for views that need them. Owned by the execution context
    that runs the forward; never shared between threads. Positions are computed lazily, on the
    first edit that selects some.

    Args:
        batch: Rows in this forward.
        seq: Tokens in this forward (during cached decoding, the new ones only).
        past: Tokens before this forward's first one (the KV cache's length).
        attention_mask: The forward's `[batch, past + seq]` mask, if any: with padding,
            positions count from each row's first real token.
        position_ids: The forward's position ids, if any (read when there is no mask).
        cached: Part of a generation (a KV cache, or `generate`'s `logits_to_keep`): later
            forwards reach further positions, so a position beyond this one is not an error.
        plan: The `Plan` it runs; set by the engine when the forward begins if None.

    Example:
        >>> import torch
        >>> frame = Frame(2, 3, attention_mask=torch.tensor([[0, 1, 1], [1, 1, 1]]))
        >>> frame.uniform, frame.total
        (False, 3)
        >>> frame.positions()[0]  # row 0 starts with padding
        tensor([[-1,  0,  1],
                [ 0,  1,  2]])
    """

    def __init__(
        self,
        batch: int,
        seq: int,
        past: int = 0,
        attention_mask: torch.Tensor | None = None,
        position_ids: torch.Tensor | None = None,
        cached: bool = False,
        plan: Any = None,  # a splice.engine.plan.Plan (which imports this module)
    ):
        self.batch, self.seq, self.past = batch, seq, past
        self.cached = cached  # part of a generation (KV cache or generate's logits_to_keep): later forwards reach further positions
        self._mask = attention_mask
        self._position_ids = position_ids
        self._uniform: bool | None = None
        self._positions: tuple[torch.Tensor, torch.Tensor, torch.Tensor] | None = None
        self.plan = plan
        self.outer: Frame | None = None  # the forward this one runs inside of, if any
        self.from_root = False  # begun by the root module's hook (so ended by it)
        self.fired: set[str] = set()
        self.layer_inputs: dict[int, torch.Tensor] = {}

    def resized(self, batch: int, attention_mask: torch.Tensor | None = None) -> Frame:
        """The same forward (plan, fired sites, outer forward) over a different number of rows.

        Used when a sweep's replay lets more variants join the batch mid-forward.

        Args:
            batch: The new number of rows.
            attention_mask: Their mask, if any.

        Returns:
            A new frame sharing this one's plan, `fired` set and outer forward.

        Example:
            >>> Frame(2, 4).resized(6).batch
            6
        """
        frame = Frame(batch, self.seq, self.past, attention_mask, None, self.cached, self.plan)
        frame.outer, frame.fired = self.outer, self.fired
        return frame

    @classmethod
    def from_call(cls, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Frame:
        """Build a frame from the arguments of a Hugging Face causal-LM forward.

        Works whatever their keywords: transformers renames them (the KV cache came as
        `past_key_values` up to 5.23 and as `cache` from 5.24), so the cache's length is read
        from what the call carries (see `past_length`).

        Args:
            args: The forward's positional arguments (`input_ids` may be the first).
            kwargs: Its keyword arguments.

        Returns:
            The frame of that forward (no plan yet).

        Raises:
            SpliceError: If the call carries a KV cache but nothing tells its length.

        Example:
            >>> import torch
            >>> frame = Frame.from_call((torch.zeros(2, 4, dtype=torch.long),), {})
            >>> frame.batch, frame.seq, frame.past, frame.cached
            (2, 4, 0, False)
        """
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
        """True when every row holds real tokens at positions past..past+seq-1 (no padding, no
        unusual position ids): selections can then be plain slices shared by all rows."""
        if self._uniform is None:
            mask = self._mask
            self._uniform = mask is None or mask.dim() != 2 or bool(mask.all())
            if self._uniform and mask is None and self._position_ids is not None:
                expected = torch.arange(self.past, self.past + self.seq, device=self._position_ids.device)
                self._uniform = bool((self._position_ids == expected).all())
        return self._uniform

    def positions(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        """Per-row token positions, computed once per forward.

        Returns:
            `(positions [batch, seq], valid [batch, seq], lengths [batch])`: each token's
            absolute position counted from its row's first real token (padding gets negative
            or meaningless positions), whether it is a real token, and each row's real length
            so far (past included).
        """
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
        """The frame of only the last `n` positions, for a site computed for the last tokens
        only (logits under `logits_to_keep`).

        Example:
            >>> Frame(1, 4, past=5).tail(1).past
            8
        """
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


def past_length(
    args: tuple[Any, ...],
    kwargs: dict[str, Any],
    seq: int,
    mask: torch.Tensor | None,
    position_ids: torch.Tensor | None,
) -> tuple[bool, int]:
    """Whether a forward is a cached decoding step, and how many tokens came before it.

    Sources, most direct first: any `transformers` `Cache` object among the arguments, under any
    keyword or position (`get_seq_length()`, which counts every token seen, also for sliding
    windows); `cache_position`; `position_ids` (then `positions()` reads them row by row); an
    attention mask wider than the input. A call that carries a cache but none of these is refused:
    assuming 0 would silently move every position-selected edit to the wrong token.

    Args:
        args: The forward's positional arguments.
        kwargs: Its keyword arguments.
        seq: Tokens in this forward.
        mask: Its attention mask, if any.
        position_ids: Its position ids, if any.

    Returns:
        `(carries a cache, tokens before this forward's first one)`.

    Raises:
        SpliceError: If the call carries a cache whose length cannot be established.

    Example:
        >>> import torch
        >>> past_length((), {"cache_position": torch.tensor([5])}, 1, None, None)
        (False, 5)
        >>> past_length((), {"past_key_values": object()}, 1, None, None)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: this forward carries a KV cache (past_key_values) but splice cannot tell ...
    """
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
