"""Text <-> tokens helpers in the shape TransformerLens users expect, on a plain HF tokenizer.

Batches of strings are padded on the left, so position -1 is every row's last real token, and
get explicit `position_ids` counting from each row's first real token (the convention splice
uses for `pos=`, see README)."""

from __future__ import annotations

import torch

from ..errors import SpliceError


def _need(tokenizer):
    if tokenizer is None:
        raise SpliceError(
            "this needs a tokenizer: pass one to splice.Model(model, tokenizer) or use splice.load()"
        )
    return tokenizer


def pad_token_id(tokenizer) -> int:
    for candidate in (tokenizer.pad_token_id, tokenizer.eos_token_id, 0):
        if candidate is not None:
            return candidate
    return 0


def left_pad(rows: list[list[int]], pad: int, device=None) -> dict:
    """Model kwargs for token rows of different lengths: left padding, an attention mask and
    position ids counting from each row's first real token (no mask when all rows are full)."""
    width = max(len(r) for r in rows)
    ids = torch.tensor([[pad] * (width - len(r)) + list(r) for r in rows])
    if all(len(r) == width for r in rows):
        return {"input_ids": ids.to(device)}
    mask = torch.tensor([[0] * (width - len(r)) + [1] * len(r) for r in rows])
    position_ids = (mask.cumsum(-1) - 1).clamp(min=0)
    return {
        "input_ids": ids.to(device),
        "attention_mask": mask.to(device),
        "position_ids": position_ids.to(device),
    }


def encode(tokenizer, inputs, device=None) -> dict:
    """Model keyword arguments for a string, list of strings, token tensor or tokenizer output."""
    if isinstance(inputs, str):
        inputs = [inputs]
    if isinstance(inputs, (list, tuple)) and inputs and all(isinstance(t, str) for t in inputs):
        tokenizer = _need(tokenizer)
        return left_pad([tokenizer(text)["input_ids"] for text in inputs], pad_token_id(tokenizer), device)
    if isinstance(inputs, torch.Tensor):
        if inputs.dtype not in (torch.long, torch.int, torch.int32):
            raise SpliceError(f"token tensors must be integer ids; got dtype {inputs.dtype}")
        ids = inputs if inputs.dim() == 2 else inputs.unsqueeze(0)
        return {"input_ids": ids.to(device)}
    if (
        hasattr(inputs, "keys")
        and "input_ids" in inputs
        or hasattr(inputs, "keys")
        and "inputs_embeds" in inputs
    ):
        return {k: (v.to(device) if isinstance(v, torch.Tensor) else v) for k, v in dict(inputs).items()}
    raise SpliceError(
        f"inputs must be a string, list of strings, token id tensor or tokenizer output; got {type(inputs).__name__}"
    )


def to_tokens(tokenizer, text, device=None) -> torch.Tensor:
    return encode(tokenizer, text, device)["input_ids"]


def to_str_tokens(tokenizer, text) -> list[str]:
    tokenizer = _need(tokenizer)
    ids = to_tokens(tokenizer, text)[0] if isinstance(text, str) else torch.as_tensor(text).reshape(-1)
    return [tokenizer.decode([int(i)]) for i in ids]


def to_single_token(tokenizer, text: str) -> int:
    ids = _need(tokenizer)(text, add_special_tokens=False)["input_ids"]
    if len(ids) != 1:
        pieces = [tokenizer.decode([i]) for i in ids]
        raise SpliceError(f"{text!r} is {len(ids)} tokens {pieces}, not one")
    return ids[0]


def to_string(tokenizer, ids):
    tokenizer = _need(tokenizer)
    ids = torch.as_tensor(ids)
    if ids.dim() <= 1:
        return tokenizer.decode(ids.tolist())
    return [tokenizer.decode(row.tolist()) for row in ids]
