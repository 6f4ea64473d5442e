"""Sweep data: rows of prompts and fields, normalised once, and cut into the prompt batches one
forward runs. Used by sweeps and by patching alike."""

from __future__ import annotations

import torch

from ..engine import tokens as tok
from ..errors import SpliceError


def as_items(data) -> list[dict]:
    """Data rows as dicts: a DataFrame, strings (prompts) or dicts with "prompt" or "input_ids"."""
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas DataFrame
        data = data.to_dict("records")
    items = [{"prompt": d} if isinstance(d, str) else dict(d) for d in data]
    if not items:
        raise SpliceError("a sweep needs at least one prompt")
    missing = [i for i, item in enumerate(items) if "prompt" not in item and "input_ids" not in item]
    if missing:
        raise SpliceError(f"data rows {missing[:5]} have neither a 'prompt' nor an 'input_ids' field")
    for item in items:
        if isinstance(item.get("input_ids"), torch.Tensor):
            item["input_ids"] = item["input_ids"].tolist()
    return items


class PromptBatch:
    """The prompts of one forward, as metrics see them: `len(batch)`, `batch.items` (the data
    rows), `batch.input_ids`, and `batch.token_ids(field)` for single-token answer fields."""

    def __init__(self, model, items: list[dict]):
        self.items = items
        self.fields = sorted({k for item in items for k in item})
        if all("input_ids" in item for item in items):  # pre-tokenized data
            pad = tok.pad_token_id(model.tokenizer) if model.tokenizer is not None else 0
            self.kwargs = tok.left_pad([list(item["input_ids"]) for item in items], pad, model.device)
        else:
            self.kwargs = tok.encode(model.tokenizer, [item["prompt"] for item in items], model.device)
        self.input_ids = self.kwargs["input_ids"]
        self._model = model
        self._tokens: dict[str, torch.Tensor] = {}

    def __len__(self):
        return len(self.items)

    def token_ids(self, field: str) -> torch.Tensor:
        if field not in self._tokens:
            ids = []
            for item in self.items:
                value = item[field]
                ids.append(value if isinstance(value, int) else self._model.to_single_token(value))
            self._tokens[field] = torch.tensor(ids, device=self.input_ids.device)
        return self._tokens[field]


def source_batch(model, batch: PromptBatch, field: str) -> PromptBatch:
    """The prompts of data field `field` (text or token ids) as a batch with the other fields."""
    items = []
    for item in batch.items:
        if field not in item:
            raise SpliceError(
                f"Patch({field!r}) reads the data field {field!r}, which the data does not have (fields: {batch.fields})"
            )
        value = item[field]
        items.append(
            {**item, **({"prompt": value} if isinstance(value, str) else {"input_ids": list(value)})}
        )
    return PromptBatch(model, items)


def batches_of(model, items: list[dict], batch_size: int) -> list[PromptBatch]:
    """Consecutive prompt batches of at most `batch_size` rows."""
    return [PromptBatch(model, items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def shortest_length(batches: list[PromptBatch]) -> int:
    """Real (unpadded) tokens of the shortest prompt: positions every prompt has."""
    return min(
        int(b.kwargs["attention_mask"].sum(-1).min())
        if "attention_mask" in b.kwargs
        else b.input_ids.shape[1]
        for b in batches
    )
