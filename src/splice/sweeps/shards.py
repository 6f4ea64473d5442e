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
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from ..engine.edits import Edits
from ..engine.interventions import Intervention
from .columns import NarrowBatch, read_columns
from .data import PromptBatch, source_batch
from .metrics import Metric
from .replay import PrefixReplay, Window
from .suffix import SuffixFallbackWarning, SuffixReplays
from .suffix_edits import for_suffix, variant_starts


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
    prefix_reuse: bool | str  # True, "layers" or False (see Sweep.run)
    attach: dict[str, Any] = dataclasses.field(
        default_factory=dict
    )  # site -> splice.SAE the sweep goes through


@dataclass(frozen=True)
class Shard:
    """One unit of sweep work: `variants` (ids, in replay order) on prompt batch `batch`;
    `baseline` asks for the batch's unedited record too; `block`: variants per replay when they
    run over every position (the row budget; a shard packed for suffix replays may hold more)."""

    batch: int
    variants: tuple[int, ...]
    baseline: bool = False
    block: int | None = None


def plan_shards(
    todo: Sequence[Variant],
    n_rows: int,
    per_shard: int,
    batch: int,
    baseline: bool,
    starts: Mapping[int, int] | None = None,
    seq: int = 0,
) -> list[Shard]:
    """The shards of one prompt batch: the variants not yet done, sorted by the first layer they
    edit (so a block joins the replay at consecutive layers), cut into blocks of `per_shard`.

    With `starts` (each variant's first changed token, `splice.sweeps.suffix_edits`), the
    variants of one start are cut into as few near-equal shards as `per_shard` full-length rows'
    worth of tokens allows: variants with short suffixes pack many to a shard, so every replayed
    layer is still one large batch, and no variant computes a token before its own start (a shard
    mixing starts would compute the later ones' from the earliest).

    Args:
        todo: The variants of this batch still to compute.
        n_rows: Prompts in the batch (one block of rows per variant).
        per_shard: Variants per shard (of full length).
        batch: The prompt batch's index.
        baseline: Whether the batch's unedited record is still missing (asked of its first shard).
        starts: Variant id -> first token its edit can change (0: any); None: no suffix replays.
        seq: Tokens in the batch (with `starts`).

    Example:
        >>> import types
        >>> v = [types.SimpleNamespace(id=i, start_layer=layer) for i, layer in enumerate([1, 0, 1, 0, 2])]
        >>> [s.variants for s in plan_shards(v, n_rows=3, per_shard=2, batch=0, baseline=True)]
        [(1, 3), (0, 2), (4,)]
        >>> at = {0: 0, 1: 3, 2: 3, 3: 3, 4: 0}  # three variants change only tokens 3..3 of 4
        >>> [s.variants for s in plan_shards(v, 3, 2, 0, False, starts=at, seq=4)]
        [(0, 4), (1, 3, 2)]
    """
    if starts is None or not seq:
        ordered = sorted(todo, key=lambda v: v.start_layer)
        blocks = [ordered[i : i + per_shard] for i in range(0, len(ordered), per_shard)]
    else:
        by_start: dict[int, list] = {}
        for v in todo:
            by_start.setdefault(starts.get(v.id, 0), []).append(v)
        blocks = []
        for start, group in sorted(by_start.items()):
            group.sort(key=lambda v: v.start_layer)
            pieces = -(-len(group) // max(1, per_shard * seq // (seq - start)))
            cuts = [len(group) * k // pieces for k in range(pieces + 1)]
            blocks += [group[a:b] for a, b in zip(cuts, cuts[1:])]
    ids = [tuple(v.id for v in block) for block in blocks]
    if not ids and baseline:
        ids = [()]
    return [Shard(batch, block, baseline and k == 0, per_shard) for k, block in enumerate(ids)]


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
        prefix_reuse: True replays each variant from its first edited layer on, and from its
            first edited token on when its edit allows (`splice.sweeps.suffix`); "layers":
            every token; False runs each variant as its own full forward (the reference path).
        attach: {site: `splice.SAE`} attached around every forward (baseline included), for
            sweeps over SAE latents.

    Attributes:
        fallback: Why suffix replays are not used on some prompt batch (also warned, once, as a
            `SuffixFallbackWarning`); None if they are, or none was asked for.
    """

    def __init__(
        self,
        model,
        metrics: Sequence[Metric],
        variants: Sequence[Variant],
        batches: Sequence[PromptBatch],
        tail: int | None,
        prefix_reuse: bool | str = True,
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
        self.suffixes: SuffixReplays | None = None
        self.columns: torch.Tensor | None = None  # the vocabulary ids the metrics read, if not all
        self.narrowed: tuple[NarrowBatch, torch.Tensor] | None = None
        self.fallback: str | None = None

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
            self.suffixes = self._suffixes(self.batches[b], self.prefix)
            bound = bind_sources(self.model, self.batches[b], list(self.variants.values()))
        self.batch, self.bound = b, {v.id: v for v in bound}
        self.columns = read_columns(self.metrics, self.batches[b]) if self.prefix_reuse else None
        # What the metrics of a replay holding only those columns read (once per prompt batch).
        self.narrowed = (
            None
            if self.columns is None
            else (
                NarrowBatch(self.batches[b], self.columns),
                self.prefix.logits[..., self.columns.to(self.prefix.logits.device)],
            )
        )

    def _suffixes(self, batch: PromptBatch, prefix: PrefixReplay) -> SuffixReplays | None:
        """The batch's suffix windows, when the sweep asks for them and has variants that can use
        them, and they reproduce the model's logits here (else None, saying why once)."""
        variants = list(self.variants.values())
        if self.prefix_reuse is not True or not any(
            variant_starts(self.model, variants, batch.kwargs).values()
        ):
            return None
        replays = SuffixReplays(prefix)
        if replays.reason is None:
            return replays
        if self.fallback is None:
            warnings.warn(
                f"position sweep replays every token, not only those after each edit: {replays.reason}",
                SuffixFallbackWarning,
                stacklevel=2,
            )
        self.fallback = replays.reason
        return None

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
            logits = (
                self._batched(batch, chunk, shard.block)
                if self.prefix_reuse
                else self._sequential(batch, chunk)
            )
        n = len(batch)
        return records + [
            self.record(v.id, shard.batch, logits[j * n : (j + 1) * n], narrowed=self.prefix_reuse)
            for j, v in enumerate(chunk)
        ]

    def record(
        self, variant: int, b: int, logits: torch.Tensor, narrowed: bool | str = False
    ) -> dict[str, Any]:
        """A checkpoint record: every metric of `logits` against the batch's baseline; `narrowed`:
        the logits are a replay's, holding only the batch's `columns` when it has them."""
        assert self.prefix is not None
        batch: PromptBatch | NarrowBatch = self.batches[b]
        baseline = self.prefix.logits
        if narrowed and self.narrowed is not None:
            batch, baseline = self.narrowed
        values = {m.name: m(logits, baseline, batch).tolist() for m in self.metrics}
        return {"variant": variant, "batch": b, "values": values}

    def _batched(self, batch: PromptBatch, chunk: list[Variant], block: int | None) -> torch.Tensor:
        """One replay of the chunk over its common suffix, or replays of `block` variants at a time
        over every token."""
        window, edits = self._window(batch, chunk)
        if window is not None:
            return self._replay(batch, chunk, edits, window)
        size = block or len(chunk)
        return torch.cat(
            [
                self._replay(batch, part, [v.intervention for v in part], None)
                for part in (chunk[i : i + size] for i in range(0, len(chunk), size))
            ]
        )

    def _window(self, batch: PromptBatch, chunk: list[Variant]) -> tuple[Window | None, list]:
        """The suffix window every variant of the chunk fits (from their earliest start) and
        their edits written for it; (None, []) when there is none."""
        if self.suffixes is None:
            return None, []
        start = min(variant_starts(self.model, chunk, batch.kwargs).values())
        if start == 0:
            return None, []
        layout, seq = self.model.layout, batch.input_ids.shape[1]
        edits = [
            for_suffix(v.intervention, v.site, layout.axes(layout.sites_of(v.site)[0]), start, seq)
            for v in chunk
        ]
        if any(e is None for e in edits):
            return None, []
        return self.suffixes.window(start), edits

    def _replay(self, batch: PromptBatch, chunk: list[Variant], interventions: list, window) -> torch.Tensor:
        n = len(batch)
        edits = Edits()
        for j, (variant, intervention) in enumerate(zip(chunk, interventions)):
            placed = dataclasses.replace(intervention, rows=slice(j * n, (j + 1) * n))
            existing = edits.get(variant.site)
            edits[variant.site] = (
                [existing] if isinstance(existing, Intervention) else list(existing or [])
            ) + [placed]
        assert self.prefix is not None
        with torch.no_grad(), self.model.edit(edits):
            return self.prefix.replay([max(v.start_layer, 0) for v in chunk], self.tail, window, self.columns)

    def _sequential(self, batch: PromptBatch, chunk: list[Variant]) -> torch.Tensor:
        outs = []
        for variant in chunk:
            with torch.no_grad(), self.model.edit({variant.site: variant.intervention}):
                logits = self.model.hf(**batch.kwargs, use_cache=False).logits
            outs.append(logits if self.tail is None else logits[:, -self.tail :])
        return torch.cat(outs)
