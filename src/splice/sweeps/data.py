"""Sweep data: rows of prompts and fields, normalised once, and cut into the prompt batches one
forward runs. Used by sweeps and by patching alike."""

from __future__ import annotations

from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import torch

from ..engine import tokens as tok
from ..errors import SpliceError

if TYPE_CHECKING:
    from ..engine.model import Model


def as_items(data: Iterable[Any]) -> list[dict[str, Any]]:
    """Normalise sweep data to a list of row dicts, each with a prompt.

    Args:
        data: A pandas DataFrame (one row per prompt), or an iterable of prompt strings and/or
            mappings with `"prompt"` (text) or `"input_ids"` (token ids: a list or a tensor)
            plus any fields the metrics read (e.g. `"correct"`, `"wrong"`).

    Returns:
        One dict per row (copies; a string becomes `{"prompt": string}`; tensor `input_ids`
        become lists).

    Raises:
        SpliceError: For no rows, or rows with neither `"prompt"` nor `"input_ids"`.

    Example:
        >>> as_items(["When Mary and John went", {"prompt": "The capital of France is", "answer": " Paris"}])
        [{'prompt': 'When Mary and John went'}, {'prompt': 'The capital of France is', 'answer': ' Paris'}]
        >>> as_items([{"text": "no prompt"}])
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: data rows [0] have neither a 'prompt' nor an 'input_ids' field
    """
    if hasattr(data, "to_dict") and hasattr(data, "columns"):  # pandas DataFrame
        data = data.to_dict("records")
    items: list[dict[str, Any]] = [{"prompt": d} if isinstance(d, str) else dict(d) for d in data]
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
    rows), `batch.input_ids`, and `batch.token_ids(field)` for single-token answer fields.

    Prompts are tokenized (or, when every row has `input_ids`, taken as they are) and
    left-padded, so position -1 is every prompt's last token.

    Args:
        model: The `splice.Model` (its tokenizer and device are used).
        items: Data rows, as `as_items` returns them.

    Attributes:
        items: The data rows.
        fields: Every field name the rows have, sorted.
        kwargs: The model's keyword arguments (`input_ids`, and with padding `attention_mask`
            and `position_ids`).
        input_ids: `[rows, tokens]` token ids, left-padded.

    Example:
        >>> import types, torch
        >>> model = types.SimpleNamespace(tokenizer=None, device=torch.device("cpu"))  # a stand-in
        >>> batch = PromptBatch(model, [{"input_ids": [5, 6, 7], "answer": 3}, {"input_ids": [8, 9], "answer": 4}])
        >>> batch.input_ids
        tensor([[5, 6, 7],
                [0, 8, 9]])
        >>> len(batch), batch.token_ids("answer")
        (2, tensor([3, 4]))
    """

    def __init__(self, model: Model, items: list[dict[str, Any]]):
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

    def __len__(self) -> int:
        return len(self.items)

    def token_ids(self, field: str) -> torch.Tensor:
        """One token id per row from a data field (computed once per field).

        Args:
            field: A field holding an int token id or a string that is a single token (e.g.
                `" Mary"`; see `Model.to_single_token`).

        Returns:
            A `[rows]` LongTensor on the batch's device.

        Raises:
            KeyError: If a row lacks the field.
            SpliceError: If a string is not exactly one token.
        """
        if field not in self._tokens:
            ids = []
            for item in self.items:
                value = item[field]
                ids.append(value if isinstance(value, int) else self._model.to_single_token(value))
            self._tokens[field] = torch.tensor(ids, device=self.input_ids.device)
        return self._tokens[field]


def source_batch(model: Model, batch: PromptBatch, field: str) -> PromptBatch:
    """The prompts of data field `field` (text or token ids) as a batch with the other fields.

    What `Patch("clean")` reads inside a sweep: the other run's prompts, row for row.

    Raises:
        SpliceError: If the data has no such field.

    Example:
        >>> import types, torch
        >>> model = types.SimpleNamespace(tokenizer=None, device=torch.device("cpu"))  # a stand-in
        >>> batch = PromptBatch(model, [{"input_ids": [1, 2], "clean": [3, 4]}])
        >>> source_batch(model, batch, "clean").input_ids
        tensor([[3, 4]])
    """
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


def batches_of(model: Model, items: list[dict[str, Any]], batch_size: int) -> list[PromptBatch]:
    """Consecutive prompt batches of at most `batch_size` rows (a positive int).

    Example:
        >>> import types, torch
        >>> model = types.SimpleNamespace(tokenizer=None, device=torch.device("cpu"))  # a stand-in
        >>> [len(b) for b in batches_of(model, [{"input_ids": [1, 2]}] * 5, 2)]
        [2, 2, 1]
    """
    return [PromptBatch(model, items[i : i + batch_size]) for i in range(0, len(items), batch_size)]


def shortest_length(batches: list[PromptBatch]) -> int:
    """Real (unpadded) tokens of the shortest prompt: positions every prompt has.

    Example:
        >>> import types, torch
        >>> model = types.SimpleNamespace(tokenizer=None, device=torch.device("cpu"))  # a stand-in
        >>> shortest_length([PromptBatch(model, [{"input_ids": [1, 2, 3]}, {"input_ids": [4, 5]}])])
        2
    """
    return min(
        int(b.kwargs["attention_mask"].sum(-1).min())
        if "attention_mask" in b.kwargs
        else b.input_ids.shape[1]
        for b in batches
    )


def tiled(value: Any, k: int) -> Any:
    """`k` copies of a batch tensor stacked along its first axis (copy-major: rows j*n..(j+1)*n
    are copy j), for running k variants of one prompt batch as one forward; anything that is
    not a tensor is returned as it is.

    Example:
        >>> tiled(torch.tensor([[1, 2], [3, 4]]), 2).tolist()
        [[1, 2], [3, 4], [1, 2], [3, 4]]
    """
    if not isinstance(value, torch.Tensor) or k == 1:
        return value
    return value.repeat(k, *([1] * (value.dim() - 1)))


def real_lengths(batch: PromptBatch) -> list[int]:
    """Each row's real (unpadded) token count."""
    mask = batch.kwargs.get("attention_mask")
    return mask.sum(-1).tolist() if mask is not None else [batch.input_ids.shape[1]] * len(batch)


def check_aligned(batch: PromptBatch, other: PromptBatch, source: str, why: str) -> None:
    """Refuse a `source` batch that does not line up with the base prompts token for token, row
    by row (what patching one run's values into another position by position needs); `why`
    begins the message ("path patching writes ...").

    Raises:
        SpliceError: Naming the first row whose lengths differ, and both lengths.
    """
    mine, theirs = real_lengths(batch), real_lengths(other)
    if batch.input_ids.shape != other.input_ids.shape or mine != theirs:
        row = next((i for i, (a, b) in enumerate(zip(mine, theirs)) if a != b), 0)
        raise SpliceError(
            f"{why} position by position, so each {source!r} prompt needs as many tokens as its 'prompt'; "
            f"row {row} of a batch has {mine[row]} and {theirs[row]}"
        )
