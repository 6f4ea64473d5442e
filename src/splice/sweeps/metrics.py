"""Metrics for sweeps: functions of (logits, baseline_logits, batch) giving one value per prompt.

`baseline_logits` are the same prompts' logits without the variant's edit (the table's
`baseline` run).

Each metric says how many final positions it reads (`tail`), so a sweep unembeds only those
(the unembedding is a large share of a small model's forward). Logits arrive as
[prompts, tail, vocab] (left-padded, so position -1 is every prompt's last token).

Precision: metrics compute in float32 whatever the model's dtype. A metric is handed its logits
upcast to float32 (float64 logits stay float64), so in a bfloat16 model a logit difference is
the exact difference of two bfloat16 logits and a log-softmax is not rounded to bfloat16 on the
way; custom metrics get the same float32 logits. The values are returned as float32."""

from __future__ import annotations

import warnings
from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch

from ..errors import SpliceError
from .fingerprint import fingerprint


@dataclass(frozen=True)
class Metric:
    """A named function `(logits, baseline_logits, batch) -> [prompts]`, one value per prompt.

    Build one with the functions of this module rather than directly. `tail` is how many final
    positions it reads (None: all), so a sweep unembeds only those; `spec` identifies it in a
    checkpoint, so a resumed sweep knows it still computes the same thing; `vocab` names the data
    fields whose token ids are the only vocabulary columns it reads (through `batch.token_ids`),
    so a sweep whose metrics all say so unembeds only those columns (None: it may read any).

    Example:
        >>> from splice import metrics
        >>> m = metrics.logit_diff("correct", "wrong")
        >>> m.name, m.tail
        ('logit_diff', 1)
    """

    name: str
    fn: Callable
    tail: int | None = 1  # final positions needed; None = all
    spec: Iterable = ()  # what identifies the metric in a checkpoint's spec hash (iterated when it is made)
    vocab: tuple[str, ...] | None = None  # fields naming the only logit columns it reads; None = any

    def __call__(self, logits, baseline_logits, batch) -> torch.Tensor:
        """One float32 value per prompt, computed from float32 (or wider) logits.

        Args:
            logits: `[prompts, tail, vocab]` logits under the variant's edit, in any float
                dtype (upcast to float32 before the metric sees them).
            baseline_logits: The same prompts' unedited logits, likewise.
            batch: The prompt batch (a `PromptBatch`).

        Returns:
            A float32 tensor `[prompts]` (gradients flow to the logits).

        Raises:
            SpliceError: If the metric returns neither a scalar nor one value per prompt.

        Example:
            >>> import torch
            >>> m = custom(lambda logits, baseline, batch: logits[:, -1, 0] - logits[:, -1, 1])
            >>> half = torch.tensor([[[3.0, -0.01171875]]], dtype=torch.bfloat16)
            >>> m(half, half, [0])  # exact in float32; bfloat16 would round it to 3.0156
            tensor([3.0117])
        """
        value = self.fn(_at_least_float32(logits), _at_least_float32(baseline_logits), batch)
        value = torch.as_tensor(value, dtype=torch.float32)
        if value.dim() == 0:
            value = value.expand(len(batch))
        if value.shape != (len(batch),):
            raise SpliceError(
                f"metric {self.name!r} returned shape {list(value.shape)}; expected one value per prompt, [{len(batch)}]"
            )
        return value


def _at_least_float32(logits):
    """Half-precision logits upcast to float32 (differentiably); anything else as it is."""
    if isinstance(logits, torch.Tensor) and logits.is_floating_point() and logits.dtype != torch.float64:
        return logits.float()
    return logits


def _token_column(batch, field: str) -> torch.Tensor:
    try:
        return batch.token_ids(field)
    except KeyError:
        raise SpliceError(
            f"this metric reads the data field {field!r}, which the data does not have (fields: {batch.fields})"
        ) from None


def logit_diff(correct: str = "correct", wrong: str = "wrong") -> Metric:
    """logit(correct) - logit(wrong) at the last position, per prompt (e.g. IOI: " Mary" vs " John").

    Args:
        correct: the data field holding the right answer (a string that is one token, or an id).
        wrong: the data field holding the wrong answer.

    Example:
        >>> logit_diff("io", "s").spec
        ('logit_diff', 'io', 's')
    """

    def fn(logits, baseline, batch):
        last = logits[:, -1]
        good, bad = _token_column(batch, correct), _token_column(batch, wrong)
        return last.gather(-1, good[:, None])[:, 0] - last.gather(-1, bad[:, None])[:, 0]

    return Metric("logit_diff", fn, 1, ("logit_diff", correct, wrong), vocab=(correct, wrong))


def answer_logprob(answer: str = "answer") -> Metric:
    """log P(answer) at the last position, per prompt.

    Args:
        answer: the data field holding the answer (a string that is one token, or an id).
    """

    def fn(logits, baseline, batch):
        return logits[:, -1].float().log_softmax(-1).gather(-1, _token_column(batch, answer)[:, None])[:, 0]

    return Metric("answer_logprob", fn, 1, ("answer_logprob", answer))


def loss(positions: int = 1) -> Metric:
    """Mean next-token cross-entropy on the last `positions` tokens of each prompt (put the
    continuation you want scored at the end of the prompt).

    Args:
        positions: how many final tokens are scored (at least 1); the metric reads one more
            position, the one predicting the first of them.

    Example:
        >>> loss(3).name, loss(3).tail
        ('loss_last3', 4)
    """
    if positions < 1:
        raise SpliceError("loss(positions=...) needs at least one position")

    def fn(logits, baseline, batch):
        targets = batch.input_ids[:, -positions:]
        logprobs = logits[:, -positions - 1 : -1].float().log_softmax(-1)
        return -logprobs.gather(-1, targets[..., None])[..., 0].mean(-1)

    return Metric(f"loss_last{positions}", fn, positions + 1, ("loss", positions))


def kl_from_baseline(positions: int = 1) -> Metric:
    """KL(baseline || edited) of the next-token distribution, averaged over the last `positions`:
    how far the edit moves the prediction from the same prompts' unedited run."""

    def fn(logits, baseline, batch):
        p = baseline[:, -positions:].float().log_softmax(-1)
        q = logits[:, -positions:].float().log_softmax(-1)
        return (p.exp() * (p - q)).sum(-1).mean(-1)

    return Metric("kl_from_baseline", fn, positions, ("kl", positions))


def kl_from_clean(positions: int = 1) -> Metric:
    """Deprecated name of `kl_from_baseline` (in a patching sweep the unedited run is the
    corrupted one, so "clean" named the wrong run); warns and returns `kl_from_baseline`."""
    warnings.warn(
        "metrics.kl_from_clean() is now metrics.kl_from_baseline(): the KL is measured from the "
        "unedited run of the same prompts (the table's `baseline`), which is not always a clean prompt",
        DeprecationWarning,
        stacklevel=2,
    )
    return kl_from_baseline(positions)


class CustomIdentity:
    """A custom metric's part of a checkpoint's spec hash. It is worked out when a sweep with a
    checkpoint hashes its spec, so the values the function reads at run time are the ones that
    count, and a function without a fingerprint is refused only when a checkpoint needs one."""

    def __init__(self, name: str, fn: Callable, tail: int | None, identity: str | None):
        self.name, self.fn, self.tail, self.identity = name, fn, tail, identity

    def __iter__(self):
        if self.identity is not None:
            return iter(("custom", self.name, self.tail, "identity", self.identity))
        try:
            digest = fingerprint(self.fn)
        except SpliceError as error:
            raise SpliceError(
                f"custom metric {self.name!r} cannot be checkpointed: {error}, so a resumed sweep could not tell "
                "whether it still computes the same thing. Pass metrics.custom(..., identity='...'), a string "
                "naming everything that determines its result (change it whenever that changes)"
            ) from None
        return iter(("custom", self.name, self.tail, digest))

    def __repr__(self):
        return f"CustomIdentity({self.name!r}, identity={self.identity!r})"


def custom(
    fn: Callable, name: str | None = None, tail: int | None = None, identity: str | None = None
) -> Metric:
    """Any function (logits, baseline_logits, batch) -> [prompts] or scalar. `tail` = final positions
    it reads (None: all). A checkpoint knows it by a fingerprint of its code and of every value it
    reads (defaults, closure, globals); where that is impossible (it reads an arbitrary object),
    pass `identity=`, a string you change whenever what determines the result changes."""
    if not callable(fn):
        raise SpliceError(
            f"metrics.custom needs a function (logits, baseline_logits, batch) -> values; got {type(fn).__name__}"
        )
    if identity is not None and (not isinstance(identity, str) or not identity):
        raise SpliceError(
            f"identity= is a non-empty string naming what determines the metric's result; got {identity!r}"
        )
    name = name or str(getattr(fn, "__name__", "custom"))
    return Metric(name, fn, tail, CustomIdentity(name, fn, tail, identity))
