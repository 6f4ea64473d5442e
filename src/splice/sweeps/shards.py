"""Shards: the unit of sweep work, the same in this process and on a Ray worker.

A shard is one prompt batch and a block of variants that run as rows of one replayed forward. The
plan (`plan_shards`) depends only on the variants still to do and the row budget, so every executor
cuts a sweep into the same shards and computes the same numbers. `ShardRunner` computes shards on
one model: it keeps the clean trace of the prompt batch it last saw, so consecutive shards of one
batch share a single unedited forward.
"""

from __future__ import annotations

import contextlib
import dataclasses
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.edits import Edits
from ..engine.interventions import Intervention
from .data import PromptBatch, source_batch
from .metrics import Metric
from .replay import PrefixReplay


@dataclass(frozen=True)
class Variant:
    """One cell of a sweep: an intervention at a site, with labels for the table."""

    id: int
    site: str
    intervention: Intervention
    layer: int | None
    head: int | None
    pos: int | None
    feature: int | None = None

    @property
    def start_layer(self) -> int:
        """First layer whose computation the variant changes (its replay starts there)."""
        return (
            0 if self.layer is None and self.site == "embed" else self.layer if self.layer is not None else -1
        )


@dataclass(frozen=True)
class Job:
    """What a worker needs, besides the model, to compute any shard of one sweep run: the
    metrics, the variants, the data rows and how they are batched."""

    metrics: list[Metric]
    variants: list[Variant]
    items: list[dict]
    batch_size: int
    tail: int | None
    prefix_reuse: bool
    attach: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # site -> splice.SAE the sweep goes through


@dataclass(frozen=True)
class Shard:
    """One unit of sweep work: `variants` (ids, in replay order) on prompt batch `batch`;
    `baseline` asks for the batch's unedited record too."""

    batch: int
    variants: tuple[int, ...]
    baseline: bool = False


def plan_shards(
    todo: Sequence[Variant], n_rows: int, per_shard: int, batch: int, baseline: bool
) -> list[Shard]:
    """The shards of one prompt batch: the variants not yet done, sorted by the first layer they
    edit (so a block joins the replay at consecutive layers), cut into blocks of `per_shard`.

    Args:
        todo: The variants of this batch still to compute.
        n_rows: Prompts in the batch (one block of rows per variant).
        per_shard: Variants per shard.
        batch: The prompt batch's index.
        baseline: Whether the batch's unedited record is still missing (asked of its first shard).

    Example:
        >>> import types
        >>> v = [types.SimpleNamespace(id=i, start_layer=layer) for i, layer in enumerate([1, 0, 1, 0, 2])]
        >>> [s.variants for s in plan_shards(v, n_rows=3, per_shard=2, batch=0, baseline=True)]
        [(1, 3), (0, 2), (4,)]
    """
    ordered = sorted(todo, key=lambda v: v.start_layer)
    blocks = [tuple(v.id for v in ordered[i : i + per_shard]) for i in range(0, len(ordered), per_shard)]
    if not blocks and baseline:
        blocks = [()]
    return [Shard(batch, block, baseline and k == 0) for k, block in enumerate(blocks)]


def bind_sources(model, batch: PromptBatch, variants: list[Variant]) -> list[Variant]:
    """Variants whose Patch names a data field, given that field's activations for this batch
    (one unedited forward per field, recording only the sites those variants patch)."""
    from ..engine.sources import Patch

    def field_of(v: Variant) -> str | None:
        source = v.intervention.source if isinstance(v.intervention, Patch) else None
        return source if isinstance(source, str) else None

    by_field: dict[str, set[str]] = {}
    for v in variants:
        if (field_name := field_of(v)) is not None:
            by_field.setdefault(field_name, set()).add(v.site)
    recorded = {}
    for field_name, sites in by_field.items():
        with torch.no_grad():
            _, recording = model.run(
                source_batch(model, batch, field_name).kwargs,
                record=sorted(sites),
                stop_after_record=True,
                use_cache=False,
            )
        recorded[field_name] = dict(recording)
    out = []
    for v in variants:
        field_name, patch = field_of(v), v.intervention
        if field_name is not None and isinstance(patch, Patch):
            v = dataclasses.replace(v, intervention=dataclasses.replace(patch, source=recorded[field_name]))
        out.append(v)
    return out


class ShardRunner:
    """Computes shards of one sweep on one model and returns their checkpoint records.

    Args:
        model: The `splice.Model` (in a Ray worker: the one loaded from the spec).
        metrics: The sweep's metrics.
        variants: Every variant of the sweep, by id.
        batches: The sweep's prompt batches, by index.
        tail: Unembed only the last `tail` positions (what the metrics read); None: all.
        prefix_reuse: False runs each variant as its own full forward (the reference path).
        attach: {site: `splice.SAE`} attached around every forward (baseline included), for
            sweeps over SAE latents.
    """

    def __init__(
        self,
        model,
        metrics: Sequence[Metric],
        variants: Sequence[Variant],
        batches: Sequence[PromptBatch],
        tail: int | None,
        prefix_reuse: bool = True,
        attach: dict[str, Any] | None = None,
    ):
        self.model, self.metrics, self.tail, self.prefix_reuse = model, list(metrics), tail, prefix_reuse
        self.attach = dict(attach or {})
        self.variants = {v.id: v for v in variants}
        self.batches = list(batches)
        self.batch: int | None = None  # the batch whose trace is kept
        self.prefix: PrefixReplay | None = None
        self.bound: dict[int, Variant] = {}
        self.checked = False

    def enter(self, b: int) -> None:
        """Trace prompt batch `b` unedited (once, kept until another batch is asked for) and bind
        its Patch sources (one unedited forward per source field); the first trace of a
        prefix-reusing sweep checks the replay."""
        if self.batch == b:
            return
        with self._attached():
            self.prefix = PrefixReplay(self.model, self.batches[b].kwargs, self.tail)
            if self.prefix_reuse and not self.checked:
                self.prefix.check()
                self.checked = True
            bound = bind_sources(self.model, self.batches[b], list(self.variants.values()))
        self.batch, self.bound = b, {v.id: v for v in bound}

    def _attached(self):
        """The sweep's SAEs attached (nothing opened when it has none: an open context would
        change how the baseline is computed)."""
        return self.model.edit(self.attach) if self.attach else contextlib.nullcontext()

    def run(self, shard: Shard) -> list[dict[str, Any]]:
        """The records of one shard: the baseline's first if asked, then one per variant."""
        self.enter(shard.batch)
        assert self.prefix is not None
        batch, baseline = self.batches[shard.batch], self.prefix.logits
        records = [self.record(-1, shard.batch, baseline)] if shard.baseline else []
        chunk = [self.bound[i] for i in shard.variants]
        if not chunk:
            return records
        with self._attached():
            logits = (self._batched if self.prefix_reuse else self._sequential)(batch, chunk)
        n = len(batch)
        return records + [
            self.record(v.id, shard.batch, logits[j * n : (j + 1) * n]) for j, v in enumerate(chunk)
        ]

    def record(self, variant: int, b: int, logits: torch.Tensor) -> dict[str, Any]:
        """A checkpoint record: every metric of `logits` against the batch's baseline."""
        assert self.prefix is not None
        batch, baseline = self.batches[b], self.prefix.logits
        values = {m.name: m(logits, baseline, batch).tolist() for m in self.metrics}
        return {"variant": variant, "batch": b, "values": values}

    def _batched(self, batch: PromptBatch, chunk: list[Variant]) -> torch.Tensor:
        n = len(batch)
        edits = Edits()
        for j, variant in enumerate(chunk):
            placed = dataclasses.replace(variant.intervention, rows=slice(j * n, (j + 1) * n))
            existing = edits.get(variant.site)
            edits[variant.site] = (
                [existing] if isinstance(existing, Intervention) else list(existing or [])
            ) + [placed]
        assert self.prefix is not None
        with torch.no_grad(), self.model.edit(edits):
            return self.prefix.replay([max(v.start_layer, 0) for v in chunk], self.tail)

    def _sequential(self, batch: PromptBatch, chunk: list[Variant]) -> torch.Tensor:
        outs = []
        for variant in chunk:
            with torch.no_grad(), self.model.edit({variant.site: variant.intervention}):
                logits = self.model.hf(**batch.kwargs, use_cache=False).logits
            outs.append(logits if self.tail is None else logits[:, -self.tail :])
        return torch.cat(outs)
