"""What `Model.generate` does around Hugging Face's `generate`: the inputs and edits checked and
prepared before it, the new tokens decoded after it.

Why apart from the hooks: generation needs no hook machinery of its own. The edits stay on for
every step through an ordinary `Model.edit` context; what generation adds is that positions are
absolute and grow step by step, so an edit that selects a position beyond the last generated
token would silently never run, and is refused up front instead.
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SpliceError
from . import tokens as tok
from .edits import Edits, as_edits
from .selection import positions_needed


def prepare(
    tokenizer: Any, inputs: Any, device: torch.device, edits: Any, max_new_tokens: int, kwargs: dict[str, Any]
) -> tuple[dict[str, torch.Tensor], Edits, dict[str, Any]]:
    """The batch, edits and `generate` keyword arguments for a generation of `max_new_tokens`.

    Greedy unless `kwargs` says otherwise; padding with the tokenizer's pad id (0 without one).

    Raises:
        SpliceError: If an edit selects a position the generation never reaches.
    """
    batch = tok.encode(tokenizer, inputs, device)
    batch.pop("position_ids", None)  # generate derives positions from the attention mask
    edits = as_edits(edits)
    n_prompt = batch["input_ids"].shape[1]
    total = n_prompt + max_new_tokens
    for key, edit in edits.items_flat():
        needed = positions_needed(edit.pos)
        if needed is not None and needed > total:
            raise SpliceError(
                f"edits[{key!r}] = {edit!r} selects position {needed - 1}, but this generation ends at "
                f"position {total - 1} ({n_prompt} prompt tokens + max_new_tokens={max_new_tokens}): "
                "it would never run"
            )
    if "attention_mask" not in batch:
        batch["attention_mask"] = torch.ones_like(batch["input_ids"])
    kwargs = {
        "do_sample": False,
        "pad_token_id": tok.pad_token_id(tokenizer) if tokenizer is not None else 0,
        **kwargs,
    }
    return batch, edits, kwargs


def result(tokenizer: Any, ids: torch.Tensor, n_prompt: int, return_tokens: bool, one_text: bool) -> Any:
    """What `generate` returns: every id with `return_tokens`, else the new ids, decoded when
    there is a tokenizer (one string for a single text input, else a list)."""
    if return_tokens:
        return ids
    new = ids[:, n_prompt:]
    if tokenizer is None:
        return new
    texts = tokenizer.batch_decode(new, skip_special_tokens=True)
    return texts[0] if one_text else texts
