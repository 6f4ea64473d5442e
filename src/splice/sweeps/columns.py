"""Unembedding only the vocabulary columns a sweep's metrics read.

A logit difference reads two logits per prompt, yet a replay's unembedding computes the whole
vocabulary for every variant's rows (for GPT-2 small, a matrix product as large as five decoder
layers per token). When every metric names the data fields holding the only token ids it reads
(`Metric.vocab`), a replay computes those columns alone, and each metric sees them as its logits,
with `token_ids` renumbered to match: the values are the same, the unembedding's cost goes.
"""

from __future__ import annotations

from collections.abc import Sequence

import torch

from .data import PromptBatch
from .metrics import Metric


def read_columns(metrics: Sequence[Metric], batch: PromptBatch) -> torch.Tensor | None:
    """The sorted token ids every metric reads on this batch, or None if some metric may read
    any column.

    Example:
        >>> import types, torch
        >>> from splice import metrics
        >>> model = types.SimpleNamespace(tokenizer=None, device=torch.device("cpu"))  # a stand-in
        >>> batch = PromptBatch(model, [{"input_ids": [5, 6], "a": 9, "b": 3}, {"input_ids": [7], "a": 3, "b": 1}])
        >>> read_columns([metrics.logit_diff("a", "b")], batch)
        tensor([1, 3, 9])
        >>> read_columns([metrics.logit_diff("a", "b"), metrics.answer_logprob("a")], batch) is None
        True
    """
    if not metrics or any(m.vocab is None for m in metrics):
        return None
    fields = sorted({field for m in metrics for field in (m.vocab or ())})
    try:
        return torch.cat([batch.token_ids(field) for field in fields]).unique()
    except KeyError:
        return None  # a missing field: the metric itself says so, with the fields there are


class NarrowBatch:
    """A prompt batch as a metric sees it when its logits hold only `columns`: `token_ids(field)`
    gives each id's place among the columns; everything else is the batch's own.

    Args:
        batch: The prompt batch.
        columns: The sorted token ids the logits hold (`read_columns`).

    Example:
        >>> import types, torch
        >>> model = types.SimpleNamespace(tokenizer=None, device=torch.device("cpu"))  # a stand-in
        >>> batch = PromptBatch(model, [{"input_ids": [5], "a": 9}, {"input_ids": [7], "a": 3}])
        >>> NarrowBatch(batch, torch.tensor([1, 3, 9])).token_ids("a")
        tensor([2, 1])
    """

    def __init__(self, batch: PromptBatch, columns: torch.Tensor):
        self.batch, self.columns = batch, columns
        self.items, self.fields, self.kwargs = batch.items, batch.fields, batch.kwargs
        self.input_ids = batch.input_ids

    def __len__(self) -> int:
        return len(self.batch)

    def token_ids(self, field: str) -> torch.Tensor:
        """The field's token ids as places among the columns (`PromptBatch.token_ids`)."""
        return torch.searchsorted(self.columns, self.batch.token_ids(field))
