"""Sweeps: many interventions, one metric table. Variants run as rows of one batch (row block v
gets variant v's edit), the layers before a variant's first edited layer are computed once per
prompt batch and shared (see `splice.sweeps.replay`), and so are the tokens before its first
edited token when its edit allows (`splice.sweeps.suffix`), only the positions the metrics read are
unembedded, and every finished (variant, prompt batch) is written to a checkpoint so that an
interrupted sweep resumes where it stopped."""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
from itertools import product

from ..engine.interventions import Intervention
from ..engine.spliced import SAE
from ..errors import SpliceError
from . import features as latents
from .checkpoint import Checkpoint
from .data import as_items, batches_of, shortest_length
from .fingerprint import model_fingerprint
from .metrics import Metric
from .shards import Job, ShardRunner, Variant, plan_shards
from .suffix_edits import variant_starts
from .tables import tidy_table

OVER = ("heads", "pos", "features")
PREFIX_REUSE = (True, "layers", False)
# The intervention field each `over` varies.
_FIELD = {"heads": "heads", "pos": "pos", "features": "dims"}


class Sweep:
    """A grid of interventions x sites (x heads / positions) and the metrics to read from each.

    Every variant is one edit; `run` puts many variants in one batch, runs the layers before a
    variant's first edited layer once per prompt batch, and unembeds only the positions the
    metrics read, so a 270-head sweep costs close to its FLOP bound instead of 270 forwards.

    Args:
        sites: a site name, alias, tuple or glob, or a list of them (`"blocks.*.attn.z"`).
        interventions: one intervention or a list (`[Scale(s) for s in (0, .5, 2)]`); each is
            applied at each site. It must leave unset the field that `over` varies, and `rows=`.
        over: None (one variant per site x intervention), `"heads"` (one per head of a head
            site), `"pos"` (one per position every prompt has), `"features"` (one per SAE latent,
            at an `<site>.sae.acts` sub-site: `dims=k`), or a tuple of them (`("heads", "pos")`).
        metrics: one `Metric` or a list (`splice.metrics`); at least one.
        variants: instead of sites/interventions, an explicit list of `(site, intervention)`.
        name: a label for progress bars and checkpoints.
        features: with `over="features"`: a list of latents, `"top:N"` (the N with the largest
            summed activation over the sweep's data, most active first), or None (every latent).
        sae: with `over="features"`: the SAE to attach (a module, or `splice.SAE(module,
            error_term=...)`) at the site whose latents are swept; None: the one the calling
            context attached (`Model.attach`). It goes to Ray workers with the sweep.

    Raises:
        SpliceError: at construction for a missing grid, an unknown `over`, no metric, or a bad
            `features=`; at `variants`/`run` for a site that does not exist, an `over` its axes
            lack, or latents with no SAE attached.

    Example:
        >>> from splice import Sweep, Zero, metrics
        >>> sweep = Sweep(sites="blocks.*.attn.z", interventions=Zero(), over="heads",
        ...               metrics=[metrics.logit_diff("correct", "wrong")])
        >>> sweep.over, [m.name for m in sweep.metrics]
        (('heads',), ['logit_diff'])
    """

    def __init__(
        self,
        sites=None,
        interventions=None,
        over=None,
        metrics=(),
        variants=None,
        name: str = "sweep",
        features=None,
        sae=None,
    ):
        if variants is None and (sites is None or interventions is None):
            raise SpliceError("a Sweep needs sites= and interventions= (or an explicit variants= list)")
        self.sites = [sites] if isinstance(sites, (str, tuple)) else list(sites or [])
        self.interventions = (
            [interventions] if isinstance(interventions, Intervention) else list(interventions or [])
        )
        self.over = () if over is None else (over,) if isinstance(over, str) else tuple(over)
        bad = [o for o in self.over if o not in OVER]
        if bad:
            raise SpliceError(f"over= takes {OVER}; got {bad}")
        self.metrics = [metrics] if isinstance(metrics, Metric) else list(metrics)
        if not self.metrics:
            raise SpliceError("a Sweep needs at least one metric (see splice.sweeps.metrics)")
        self.explicit = list(variants) if variants is not None else None
        self.name = name
        self.features = latents.parse_features(features)
        if (features is not None or sae is not None) and "features" not in self.over:
            raise SpliceError("features= and sae= go with over='features'")
        # Wrapped once, so every attachment of this sweep is the same edit (one SAE per site).
        self.sae = sae if sae is None or isinstance(sae, SAE) else SAE(sae)

    # -- the grid ------------------------------------------------------------------------------
    def variants(self, model, seq: int, features: list[int] | None = None) -> list[Variant]:
        """Every variant for `model` on inputs of at least `seq` tokens, numbered in order (the
        table's `variant` column); positions range over 0..seq-1, latents over `features` (as
        `run` resolves them; default: this sweep's list, or every latent of the attached SAE).
        Useful to count a sweep's cost before running it."""
        if "features" in self.over and features is None:
            features = self.latents_for(model, [])
        pairs: list[tuple] = []
        if self.explicit is not None:
            for key, intervention in self.explicit:
                pairs += [(site, intervention, {}) for site in model.layout.sites_of(key)]
        else:
            for key in self.sites:
                for site in model.layout.sites_of(key):
                    for intervention in self.interventions:
                        pairs += self._expand(model, site, intervention, seq, features)
        out = []
        for i, (site, intervention, chosen) in enumerate(pairs):
            if intervention.rows is not None:
                raise SpliceError(f"{intervention!r}: a sweep assigns batch rows itself; leave rows= unset")
            head, pos, feature = chosen.get("heads"), chosen.get("pos"), chosen.get("features")
            if head is None and isinstance(intervention.heads, int):
                head = intervention.heads
            if pos is None and isinstance(intervention.pos, int):
                pos = intervention.pos
            out.append(Variant(i, site.name, intervention, site.layer, head, pos, feature))
        return out

    def _expand(self, model, site, intervention, seq, features):
        axes = dict(zip(model.layout.axes(site), model.layout.shape(site)))
        ranges = []
        for over in self.over:
            field_name = _FIELD[over]
            if getattr(intervention, field_name) is not None:
                raise SpliceError(
                    f"{intervention!r} already sets {field_name}=; the sweep varies it (over={over!r})"
                )
            if over == "heads":
                size = axes.get("head", axes.get("kv_head"))
                if size is None:
                    raise SpliceError(f"over='heads' but {site.name} has no head axis")
                ranges.append(range(size))
            elif over == "features":
                if site.part != "sae.acts":
                    raise SpliceError(
                        f"over='features' varies SAE latents: sweep a '<site>.sae.acts' sub-site, not {site.name}"
                    )
                ranges.append(features)
            else:
                ranges.append(range(seq))
        out = []
        for values in product(*ranges):
            chosen = dict(zip(self.over, values))
            replaced = dataclasses.replace(intervention, **{_FIELD[k]: v for k, v in chosen.items()})
            out.append((site, replaced, chosen))
        return out

    def _bases(self, model) -> list[str]:
        """The sites whose SAE latents this sweep edits, in order."""
        keys = self.sites if self.explicit is None else [key for key, _ in self.explicit]
        found = [
            site.base.name for key in keys for site in model.layout.sites_of(key) if site.part is not None
        ]
        return list(dict.fromkeys(found))

    def latents_for(self, model, batches) -> list[int]:
        """The latents `over="features"` ranges over on these prompt batches (see
        `splice.sweeps.features.resolve`); "top:N" needs the batches, the other forms do not."""
        bases = self._bases(model)
        if not bases:
            raise SpliceError(
                f"over='features' varies SAE latents: sweep a '<site>.sae.acts' sub-site; got {self.sites}"
            )
        attach = latents.attachments(model, bases, self.sae)
        if isinstance(self.features, int) and not batches:
            raise SpliceError(f"features='top:{self.features}' is found from the data: Sweep.run resolves it")
        chosen = [
            latents.resolve(model, f"{base}.sae.acts", self.features, attach[base], batches) for base in bases
        ]
        if len(chosen) > 1 and any(c != chosen[0] for c in chosen):
            raise SpliceError(
                "over='features' across several SAEs would pair unrelated latents; sweep one SAE's latents at a time"
            )
        return chosen[0]

    def spec_hash(self, model, items, variants, batch_size, max_rows, mode, attach=None) -> str:
        """What a checkpoint must match to be resumed: the model's weights, the variants, the
        data, the metrics and how they are batched, and the weights of the SAEs it goes through."""
        spec = {
            "model": model_fingerprint(model),
            "saes": latents.digest(attach or {}),
            "variants": [[v.site, v.intervention.to_dict()] for v in variants],
            "data": items,
            "metrics": [list(m.spec) for m in self.metrics],
            "batch_size": batch_size,
            "max_rows": max_rows,
            "mode": mode,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()

    # -- running -------------------------------------------------------------------------------
    def run(
        self,
        model,
        data,
        *,
        batch_size: int = 16,
        max_rows: int | None = None,
        checkpoint=None,
        prefix_reuse: bool | str = True,
        progress: bool = True,
        executor=None,
    ):
        """Run every variant on `data` and return the tidy table.

        Args:
            model: a `splice.Model`.
            data: prompt strings, or dicts with `"prompt"` (or `"input_ids"`) plus the fields the
                metrics read (e.g. `"correct"`, `"wrong"`) and the fields `Patch("field")` reads.
            batch_size: prompts per forward (they are left-padded together).
            max_rows: rows of one variant forward (default: about 2048 tokens on a CPU, a ~2 GiB
                activation budget elsewhere).
            checkpoint: a JSONL path; every finished (variant, prompt batch) is appended and
                fsynced, a rerun resumes from it, and a file from a different sweep is refused.
                Local and Ray runs of one sweep share it: either resumes the other.
            prefix_reuse: True (default): each variant is replayed from its first edited layer
                on, and, when its edit touches only tokens from some p on (`pos=p` of a
                Zero, Scale, Patch, ...), from token p on, attending to the baseline's earlier
                keys and values (`splice.sweeps.suffix`; used where a self-check shows the
                model's cache path reproduces its logits, else a `SuffixFallbackWarning`
                says why). `"layers"`: every token (the sweep before suffix replays). False:
                each variant as its own full forward (the reference path; all three agree to
                1e-5 in the tests).
            progress: a tqdm bar over variants.
            executor: None or `"local"` runs here; `"ray"` or a `splice.sweeps.ray_executor.RayExecutor`
                runs the same shards on Ray workers that load the model from `model.spec` (see
                `splice.sweeps.ray_executor`); the table is the same.

        Returns:
            A pandas DataFrame, one row per (variant, metric) after one baseline row per metric
            (variant -1): `variant, site, layer, head, pos, intervention, metric, value, baseline,
            effect, relative` (see `splice.sweeps.tables`).

        Raises:
            SpliceError: As `variants`; for an unknown executor or `prefix_reuse`; for Ray, a
                model without a spec.
        """
        from tqdm.auto import tqdm

        if prefix_reuse not in PREFIX_REUSE or not isinstance(prefix_reuse, (bool, str)):
            raise SpliceError(f"prefix_reuse= takes True, 'layers' or False; got {prefix_reuse!r}")

        remote = _remote_executor(executor)
        items = as_items(data)
        batches = batches_of(model, items, batch_size)
        seq = max(b.input_ids.shape[1] for b in batches)
        bases = self._bases(model)
        attach = latents.attachments(model, bases, self.sae) if bases else {}
        with model.edit(attach) if attach else contextlib.nullcontext():
            features = self.latents_for(model, batches) if "features" in self.over else None
        # over="pos": positions every prompt has
        variants = self.variants(model, shortest_length(batches), features)
        tails = [m.tail for m in self.metrics]
        tail = max(t for t in tails if t is not None) if None not in tails else None
        max_rows = max_rows or default_rows(model, seq, tail)
        mode = "batched" if prefix_reuse else "sequential"
        store = (
            Checkpoint(checkpoint, self.spec_hash(model, items, variants, batch_size, max_rows, mode, attach))
            if checkpoint
            else Checkpoint(None, "")
        )
        shards = [
            plan_shards(
                [v for v in variants if not store.has(v.id, b)],
                len(batch),
                max(1, max_rows // len(batch)) if prefix_reuse else 1,
                b,
                baseline=not store.has(-1, b),
                starts=variant_starts(model, variants, batch.kwargs) if prefix_reuse is True else None,
                seq=batch.input_ids.shape[1],
            )
            for b, batch in enumerate(batches)
        ]
        done = sum(1 for variant, _ in store.done if variant >= 0)

        def bar():
            return tqdm(
                total=len(variants) * len(batches),
                initial=done,
                desc=self.name,
                unit="variant",
                disable=not progress,
            )

        job = Job(self.metrics, variants, items, batch_size, tail, prefix_reuse, attach)
        if remote is not None:
            remote.run(model, job, [s for per_batch in shards for s in per_batch], store, bar)
        else:
            self._run_here(model, job, batches, shards, store, bar)
        return self._table(variants, store, len(batches))

    @staticmethod
    def _run_here(model, job, batches, shards, store, make_bar) -> None:
        """The local executor: shards in order, one prompt batch's trace at a time."""
        runner = ShardRunner(
            model, job.metrics, job.variants, batches, job.tail, job.prefix_reuse, job.attach
        )
        bar = None
        try:
            for b, per_batch in enumerate(shards):
                if not per_batch:
                    continue
                # The bar counts variant results only and starts after the first unedited trace
                # (and its replay check), so its estimate is not the trace's time multiplied by
                # every variant.
                runner.enter(b)
                bar = bar or make_bar()
                for shard in per_batch:
                    store.add(runner.run(shard))
                    bar.update(len(shard.variants))
        finally:
            if bar is not None:
                bar.close()

    def _table(self, variants, store, n_batches):
        def mean(variant_id, metric):
            values = [x for b in range(n_batches) for x in store.done[(variant_id, b)]["values"][metric]]
            return sum(values) / len(values)

        return tidy_table(self.metrics, variants, mean)


def _remote_executor(executor):
    """None for the local executor, else the Ray executor asked for (checked before any work)."""
    if executor is None or executor == "local":
        return None
    if executor == "ray":
        from .ray_executor import RayExecutor

        return RayExecutor()
    if hasattr(executor, "run") and hasattr(executor, "num_workers"):
        return executor
    raise SpliceError(
        f"executor= takes None, 'local', 'ray' or a splice.sweeps.ray_executor.RayExecutor; got {executor!r}"
    )


def default_rows(model, seq: int, tail, budget_bytes: float = 2 * 2**30, cpu_tokens: int = 2048) -> int:
    """Rows of one variant forward: what fits a rough activation budget, and on a CPU no more
    than about `cpu_tokens` tokens, because there a forward whose activations stay in cache runs
    faster per row (measured: 64 rows x 32 tokens of GPT-2 small ran ~10% faster per row than
    192). Accelerators take the whole budget."""
    d = model.dims
    per_row = seq * (16 * d.d_model + 4 * d.d_mlp + 2 * d.n_heads * seq) * 4 + (tail or seq) * d.vocab * 4 * 2
    rows = max(1, int(budget_bytes // per_row))
    if model.device.type == "cpu":
        rows = min(rows, max(1, cpu_tokens // seq))
    return rows
