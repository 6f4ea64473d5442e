"""Activation patching: exact patching sweeps, attribution patching, and reference means.

Data rows hold the corrupted prompt in "prompt" (or "input_ids"), the clean prompt in another
field ("clean" by default) and the metric's fields (e.g. answer tokens). `patch_sweep` patches
every selected site / position / head from the clean run into the corrupted one, as a batched
`Sweep`; `attribution` estimates the same table from one clean forward and one corrupted forward
and backward (the first-order approximation (clean - corrupt) . d metric / d activation).
Both return splice's one table vocabulary (see `splice.sweeps.tables`): `baseline` is the
unpatched run of "prompt", `source` the unedited run of the source field, and `normalised` =
(value - baseline) / (source - baseline): 0 = no effect, 1 = the patch restores the source run.
"""

from __future__ import annotations

import torch

from .engine.autoencoders import d_sae_of
from .engine.frame import Frame
from .engine.interventions import Add, Replace
from .engine.selection import locate
from .engine.sources import Patch
from .errors import SpliceError
from .path_patching import path_patch, path_patch_sweep
from .sweeps.data import PromptBatch, as_items, batches_of, source_batch, tiled
from .sweeps.metrics import Metric
from .sweeps.sweep import Sweep
from .sweeps.tables import patching_table, tidy_table

__all__ = [
    "attribution",
    "cache",
    "mean_reference",
    "patch_sweep",
    "path_patch",
    "path_patch_sweep",
    "rank_correlation",
]


def _axes(model, name: str) -> tuple[str, ...]:
    return model.layout.axes(model.layout.sites_of(name)[0])


def cache(model, inputs, sites="*"):
    """One forward (no gradients) of `inputs`, recording `sites`: a source for `Patch`/`Resample`.

    Args:
        model: a `splice.Model`.
        inputs: a prompt, a list of prompts, token ids or a tokenizer batch (as `Model.run`).
        sites: names, aliases or globs to record (default: every site).

    Returns:
        The `Recording`. The forward stops after the last recorded site (nothing later runs).
    """
    with torch.no_grad():
        return model.run(inputs, record=sites, stop_after_record=True)[1]


def mean_reference(model, prompts, sites, per_position: bool = False, batch_size: int = 16) -> dict:
    """`{site: mean activation}` over `prompts`, for `Mean(reference=...)`.

    Args:
        model: a `splice.Model` with a tokenizer.
        prompts: a prompt or a list of prompts.
        sites: a name, alias or glob, or a list of them.
        per_position: False averages over prompts and positions (real tokens only; padding is
            left out); True keeps positions (every prompt must then have one length).
        batch_size: prompts per forward.

    Returns:
        One tensor per site, shaped like the site with batch (and, unless `per_position`,
        position) of size 1, in the site's dtype (summed in float64).
    """
    names = (
        model.resolve(sites)
        if isinstance(sites, (str, tuple))
        else [n for key in sites for n in model.resolve(key)]
    )
    prompts = [prompts] if isinstance(prompts, str) else list(prompts)
    sums: dict[str, torch.Tensor] = {}
    count = 0
    for i in range(0, len(prompts), batch_size):
        batch = PromptBatch(model, as_items(prompts[i : i + batch_size]))
        mask = batch.kwargs.get("attention_mask")
        if per_position and mask is not None:
            raise SpliceError(
                "mean_reference(per_position=True) needs prompts of one length (these are padded)"
            )
        with torch.no_grad(), model.record(names) as recording:
            model.hf(**batch.kwargs, use_cache=False)
        for name in names:
            x = recording[name].double()
            p = _axes(model, name).index("pos")
            if per_position:
                total = x.sum(0, keepdim=True)
            else:
                if mask is not None:
                    shape = [1] * x.dim()
                    shape[0], shape[p] = mask.shape
                    x = x * mask.view(shape).to(x)
                total = x.sum((0, p), keepdim=True)
            sums[name] = sums[name] + total if name in sums else total
        real = (
            len(batch) if per_position else int(mask.sum()) if mask is not None else batch.input_ids.numel()
        )
        count += real
    return {name: (total / count).to(recording[name].dtype) for name, total in sums.items()}


def _source_metrics(model, items, metrics: list[Metric], source: str, batch_size: int) -> dict[str, float]:
    """Mean metric values of the source field's prompts, unedited."""
    per_metric: dict[str, list[float]] = {m.name: [] for m in metrics}
    for batch in batches_of(model, items, batch_size):
        source_run = source_batch(model, batch, source)
        with torch.no_grad():
            logits = model.hf(**source_run.kwargs, use_cache=False).logits
        for m in metrics:
            per_metric[m.name] += m(logits, logits, source_run).tolist()
    return {name: sum(v) / len(v) for name, v in per_metric.items()}


def _sweep(sites, over, metrics, source, features=None) -> Sweep:
    return Sweep(
        sites=sites,
        interventions=Patch(source),
        over=over,
        metrics=metrics,
        name="patching",
        features=features,
    )


def patch_sweep(
    model,
    data,
    sites="blocks.*.resid_pre",
    over="pos",
    metrics=(),
    source: str = "clean",
    batch_size: int = 16,
    features=None,
    **run_kwargs,
):
    """Exact activation patching from the `source` field's run into the corrupted prompts, one
    variant per site x `over` (e.g. every (layer, pos) of resid_pre, or every head of attn.z),
    run as a batched, resumable Sweep (`run_kwargs` go to `Sweep.run`, e.g. checkpoint=).

    Args:
        model: a `splice.Model` with a tokenizer.
        data: dicts with the corrupted `"prompt"`, the `source` field's prompt (same length in
            tokens) and the metrics' fields.
        sites: the sites to patch (name, alias, glob or list).
        over: `"pos"`, `"heads"`, both as a tuple, `"features"` (the latents of an SAE attached
            with `Model.attach`, at an `<site>.sae.acts` sub-site), or None (whole sites).
        metrics: one `Metric` or a list.
        source: the data field whose run the activations come from.
        batch_size: prompts per forward.
        features: with `over="features"`: a list of latents, `"top:N"` or None (every latent).

    Returns:
        The sweep's table plus `source` and `normalised` (see `splice.sweeps.tables`).

    For the other direction (corrupt -> clean, "noising"), put the clean prompt in "prompt" and
    name the corrupted field as `source`: the columns keep their meaning (`baseline` = the
    unpatched run of "prompt", `source` = the run patched from), so nothing is relabelled."""
    sweep = _sweep(sites, over, metrics, source, features)
    items = as_items(data)
    raw = sweep.run(model, items, batch_size=batch_size, **run_kwargs)
    return patching_table(raw, _source_metrics(model, items, sweep.metrics, source, batch_size))


def _probe_shape(model, name: str, batch: int, seq: int) -> list[int]:
    sizes: dict[str, int | None] = {"batch": batch, "pos": seq, "k_pos": seq}
    if name.endswith(".sae.acts"):
        sizes["d_sae"] = d_sae_of(model.attached(name))
    shape = [
        sizes.get(a, s)
        for a, s in zip(_axes(model, name), model.layout.shape(model.layout.sites_of(name)[0]))
    ]
    if any(size is None for size in shape):
        raise SpliceError(
            f"attribution at {name}: the attached SAE does not say how many latents it has (d_sae)"
        )
    return [int(size) for size in shape if size is not None]


def _region_sums(delta: torch.Tensor, intervention, axes, frame: Frame, name: str) -> torch.Tensor:
    """Per-row sums of `delta` over the region `intervention` selects (rows with nothing: 0)."""
    region = locate(
        intervention.pos, intervention.heads, intervention.dims, None, tuple(delta.shape), axes, frame, name
    )
    out = torch.zeros(delta.shape[0], dtype=delta.dtype)
    if region is None:
        return out
    selected = delta[region.index]
    if region.masked:
        return out.index_add(0, region.index[0].reshape(-1), selected.reshape(selected.shape[0], -1).sum(-1))
    rows = (
        torch.arange(delta.shape[0])[region.index[0]]
        if isinstance(region.index[0], slice)
        else region.index[0].reshape(-1)
    )
    return out.index_copy(0, rows, selected.reshape(selected.shape[0], -1).sum(-1))


def attribution(
    model,
    data,
    sites="blocks.*.resid_pre",
    over="pos",
    metrics=(),
    source: str = "clean",
    batch_size: int = 16,
    features=None,
    steps: int = 1,
    max_rows: int | None = None,
    path: str = "inputs",
):
    """Attribution patching: the first-order estimate of `patch_sweep`'s table (same variants,
    same columns) from one source forward and one corrupted forward + backward per prompt batch
    and metric: `value` = baseline + (source - corrupted activation) . d metric / d activation,
    summed over the variant's region. Arguments as `patch_sweep`. Gradients are taken with
    `torch.autograd.grad`, so no parameter's `.grad` is touched. Over SAE latents
    (`sites="<site>.sae.acts", over="features"`, inside `Model.attach`), the gradient of a latent
    is the site's gradient through the SAE's decoder.

    `steps > 1` is integrated gradients: the gradient is averaged over `steps` points (alpha = 0,
    1/steps, ...) of a straight path from the corrupted run to the source run, as row blocks of
    one forward and backward (`max_rows` rows each, default 256). `path="inputs"` moves the
    embedding (`embed`) and with it every site at once (EAP-IG's path; one pass for all sites);
    `path="sites"` moves each site's own activation, one site at a time (its estimate of patching
    the whole site is exact as steps grow; one pass per site). `steps=1` is the gradient at the
    corrupted run, exactly the plain estimate."""
    if not isinstance(steps, int) or isinstance(steps, bool) or steps < 1:
        raise SpliceError(f"steps must be a positive int (1: plain attribution patching); got {steps!r}")
    if path not in ("inputs", "sites"):
        raise SpliceError(
            f"path= takes 'inputs' (the embedding moves) or 'sites' (each site moves); got {path!r}"
        )
    sweep = _sweep(sites, over, metrics, source, features)
    items = as_items(data)
    batches = batches_of(model, items, batch_size)
    shortest = min(
        int(b.kwargs["attention_mask"].sum(-1).min())
        if "attention_mask" in b.kwargs
        else b.input_ids.shape[1]
        for b in batches
    )
    variants = sweep.variants(
        model, shortest, sweep.latents_for(model, batches) if "features" in sweep.over else None
    )
    names = sorted({v.site for v in variants})
    per_variant: dict[tuple[int, str], list[float]] = {
        (v.id, m.name): [] for v in variants for m in sweep.metrics
    }
    baseline: dict[str, list[float]] = {m.name: [] for m in sweep.metrics}
    for batch in batches:
        clean = source_batch(model, batch, source)
        recorded = names + (["embed"] if steps > 1 and "embed" not in names else [])
        with torch.no_grad(), model.record(recorded) as clean_acts:
            model.hf(**clean.kwargs, use_cache=False)
        n, seq = batch.input_ids.shape
        frame = Frame(n, seq, 0, batch.kwargs.get("attention_mask"), batch.kwargs.get("position_ids"))
        for metric in sweep.metrics:
            if steps == 1:
                values, corrupt_acts, grads = _corrupt_gradients(model, batch, names, metric, n, seq)
            else:
                values, corrupt_acts, grads = _path_gradients(
                    model, batch, names, metric, clean_acts, steps, max_rows, path, n, seq
                )
            baseline[metric.name] += values.tolist()
            deltas = {
                name: ((clean_acts[name] - corrupt_acts[name]) * (0 if g is None else g)).detach().float()
                for name, g in zip(names, grads)
            }
            for v in variants:
                estimate = _region_sums(deltas[v.site], v.intervention, _axes(model, v.site), frame, v.site)
                per_variant[(v.id, metric.name)] += (values.detach() + estimate).tolist()

    def mean(variant_id, metric):
        values = baseline[metric] if variant_id == -1 else per_variant[(variant_id, metric)]
        return sum(values) / len(values)

    how = "attribution" if steps == 1 else f"attribution, integrated gradients in {steps} steps along {path}"
    raw = tidy_table(sweep.metrics, variants, mean, label=lambda iv: f"{iv!r} ({how})")
    return patching_table(raw, _source_metrics(model, items, sweep.metrics, source, batch_size))


def _corrupt_gradients(model, batch, names, metric, n: int, seq: int):
    """The metric of the corrupted prompts, their activations at `names`, and the metric's
    gradient at each (one forward and backward, probes of zeros added at every site)."""
    probes = {
        name: torch.zeros(_probe_shape(model, name, n, seq), device=model.device, requires_grad=True)
        for name in names
    }
    with (
        torch.enable_grad(),
        model.edit({name: Add(probe) for name, probe in probes.items()}),
        model.record(names) as corrupt_acts,
    ):
        logits = model.hf(**batch.kwargs, use_cache=False).logits
        values = metric(logits, logits.detach(), batch)
        grads = torch.autograd.grad(values.sum(), [probes[name] for name in names], allow_unused=True)
    return values, {name: corrupt_acts[name] for name in names}, grads


def _path_gradients(
    model, batch, names, metric, clean_acts, steps: int, max_rows, path: str, n: int, seq: int
):
    """Integrated gradients: the metric's gradient at each site of `names`, averaged over `steps`
    points (alpha = 0, 1/steps, ..., (steps-1)/steps) of a straight path from the corrupted run
    to the source run: of the embedding, all sites moving along together (`path="inputs"`), or
    of each site's own activation, one site at a time (`path="sites"`). Also the metric and the
    activations of the corrupted run itself."""
    recorded = list(dict.fromkeys([*names, "embed"]))
    with torch.no_grad(), model.record(recorded) as corrupt:
        logits = model.hf(**batch.kwargs, use_cache=False).logits
    values = metric(logits, logits, batch)
    corrupt_acts = {name: corrupt[name] for name in names}
    run = dict(steps=steps, max_rows=max_rows, n=n, seq=seq)
    if path == "inputs":
        grads = _average_gradient(
            model, batch, metric, "embed", corrupt["embed"], clean_acts["embed"], names, **run
        )
    else:
        grads = [
            _average_gradient(model, batch, metric, name, corrupt[name], clean_acts[name], [name], **run)[0]
            for name in names
        ]
    return values, corrupt_acts, grads


def _average_gradient(model, batch, metric, at, start, end, names, *, steps, max_rows, n, seq):
    """The metric's gradient at `names` averaged over `steps` points of the straight path from
    `start` to `end` at site `at`, as row blocks of one forward and backward (at most `max_rows`
    rows each, default 256)."""
    per_forward = max(1, (max_rows or 256) // n)
    alphas = [i / steps for i in range(steps)]
    totals: list[torch.Tensor | None] = [None] * len(names)
    for first in range(0, steps, per_forward):
        chunk = alphas[first : first + per_forward]
        k = len(chunk)
        alpha = torch.tensor(chunk, dtype=start.dtype, device=start.device).repeat_interleave(n)
        point = tiled(start, k) + alpha.view(-1, *([1] * (start.dim() - 1))) * tiled(
            end.to(start.device) - start, k
        )
        probes = [
            torch.zeros(_probe_shape(model, name, k * n, seq), device=model.device, requires_grad=True)
            for name in names
        ]
        edits: dict = {at: [Replace(point)]}
        for name, probe in zip(names, probes):
            edits.setdefault(name, []).append(Add(probe))
        kwargs = {key: tiled(value, k) for key, value in batch.kwargs.items()}
        with torch.enable_grad(), model.edit(edits):
            logits = model.hf(**kwargs, use_cache=False).logits
            copies = [
                metric(logits[j * n : (j + 1) * n], logits[j * n : (j + 1) * n].detach(), batch)
                for j in range(k)
            ]
            grads = torch.autograd.grad(torch.cat(copies).sum(), probes, allow_unused=True)
        for i, g in enumerate(grads):
            if g is not None:
                summed = g.view(k, n, *g.shape[1:]).sum(0)
                previous = totals[i]
                totals[i] = summed if previous is None else previous + summed
    return [None if t is None else t / steps for t in totals]


def rank_correlation(a, b, column: str = "effect") -> float:
    """Spearman rank correlation of `column` between two tables, e.g. `rank_correlation(exact,
    approx)` for attribution vs exact patching.

    Rows are paired by what they edit (site, head, pos, metric), not by variant number, so two
    tables whose variants are numbered differently cannot be silently correlated row by row;
    baseline rows are left out. Tables that share no edited cell, or in which one cell appears
    twice (several interventions per cell: filter first), are refused."""
    key = ["site", "head", "pos", "metric"] + (["feature"] if "feature" in a and "feature" in b else [])

    def cells(table, which):
        rows = table[table.variant >= 0]
        if rows.duplicated(key).any():
            raise SpliceError(
                f"rank_correlation: table {which} has several rows per (site, head, pos, metric); "
                "filter it to one intervention per cell first"
            )
        filled = {c: rows[c].fillna(-1) for c in ("head", "pos", "feature") if c in key}
        return rows.assign(**filled).set_index(key)[column]

    left, right = cells(a, "a").align(cells(b, "b"), join="inner")
    if len(left) < 2:
        raise SpliceError(
            f"rank_correlation: the tables share {len(left)} edited cell(s) (site, head, pos, metric); "
            "they must cover the same sites to be compared"
        )
    return float(left.rank().corr(right.rank()))
