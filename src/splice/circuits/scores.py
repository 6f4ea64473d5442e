"""Edge attribution patching (EAP) and its integrated-gradients variant (EAP-IG, Hanna et al.
2024): a first-order score for every edge of the graph from a few forwards and backwards.

The score of edge (u -> r) is (clean output of u - corrupted output of u) . d metric / d x_r,
summed over positions and averaged over prompts, where x_r is r's own residual-stream input
before its norm. EAP takes the gradient at the clean run; EAP-IG averages it over `steps`
points alpha = k/steps (k = 1..steps) of the embedding moved from the corrupted prompt's to the
clean prompt's, so steps=1 is EAP. Positive: the edge supports the metric (cutting it lowers the
metric by about the score).

Gradients come from probes (`Add` of zeros that require grad) at `attn.q/k/v`, `mlp.in` and the
last `resid_post`, one forward and backward for a block of alpha rows; a head's gradient is then
pulled back to its own pre-norm input by a vector-Jacobian product through the norm and the
projection restricted to that head (all heads of a layer at once), an MLP's through its norm.
`torch.autograd.grad` is used throughout, so no parameter's `.grad` is touched.
"""

from __future__ import annotations

import numpy as np
import torch

from ..engine.interventions import Add, Replace
from ..errors import SpliceError
from ..sweeps.data import tiled
from .graph import Graph, Group, graph_of
from .inputs import Feeds, feeds_of, mlp_reads
from .runs import output_sites, pairs, stacked_outputs

__all__ = ["edge_scores"]

METHODS = ("eap", "eap-ig")


def _probe_shape(model, group: Group, rows: int, seq: int) -> tuple[int, ...]:
    d = model.dims
    if group.input in ("mlp", "logits"):
        return (rows, seq, d.d_model)
    return (rows, seq, d.n_heads if group.input == "q" else d.n_kv_heads, d.d_head)


def _pre_norm(feeds: Feeds, model, group: Group, recording, g: torch.Tensor) -> torch.Tensor:
    """The metric's gradient at each receiver's own pre-norm input `[R, rows, pos, d_model]`,
    from the gradient `g` at the group's site."""
    if group.input == "logits":
        return g.unsqueeze(0)
    layer = group.layer
    if group.input == "mlp":
        x = recording[mlp_reads(model, layer)].unsqueeze(0).requires_grad_(True)
        y = feeds.mlp(layer, x)
        return torch.autograd.grad(y, x, g.unsqueeze(0).to(y.dtype))[0]
    heads = group.heads
    x = recording[f"blocks.{layer}.resid_pre"].unsqueeze(0).expand(len(heads), -1, -1, -1).clone()
    x.requires_grad_(True)
    own = feeds.own(layer, group.input, x, heads)
    return torch.autograd.grad(own, x, g[:, :, heads].movedim(2, 0).to(own.dtype))[0]


def _block(model, graph, feeds, clean, ends, alphas, metric, clean_logits, deltas, totals) -> None:
    """One forward and backward of `len(alphas)` row blocks; adds each block's scores."""
    n, seq = clean.input_ids.shape
    k = len(alphas)
    start, end = ends
    alpha = torch.tensor(alphas, dtype=end.dtype, device=end.device).repeat_interleave(n).view(-1, 1, 1)
    point = tiled(end, k) - (1 - alpha) * tiled(end - start, k)  # alpha = 1: the clean embedding, exactly
    groups = graph.groups()
    probes = [
        torch.zeros(
            _probe_shape(model, g, k * n, seq), device=model.device, dtype=end.dtype, requires_grad=True
        )
        for g in groups
    ]
    edits: dict = {"embed": Replace(point)}
    edits.update({g.site: Add(p) for g, p in zip(groups, probes)})
    reads = [f"blocks.{layer}.resid_pre" for layer in range(graph.n_layers)]
    reads += [mlp_reads(model, layer) for layer in range(graph.n_layers)]
    kwargs = {key: tiled(value, k) for key, value in clean.kwargs.items()}
    with torch.enable_grad(), model.edit(edits), model.record(sorted(set(reads))) as recording:
        logits = model.hf(**kwargs, use_cache=False).logits
        values = torch.cat([metric(logits[j * n : (j + 1) * n], clean_logits, clean) for j in range(k)])
        grads = torch.autograd.grad(values.sum(), probes, allow_unused=True)
    with torch.enable_grad():
        for i, (group, g) in enumerate(zip(groups, grads)):
            if g is None:
                continue
            pulled = _pre_norm(feeds, model, group, recording, g).detach().float().to(deltas.device)
            summed = pulled.unflatten(1, (k, n)).sum(1)
            totals[i] += torch.einsum("rnpd,snpd->rs", summed, deltas[: group.upstream]).double().cpu()


def _table(graph: Graph, groups: list[Group], totals: list[torch.Tensor], method: str, steps: int):
    import pandas as pd

    columns: dict[str, list] = {k: [] for k in ("source", "target", "input", "source_layer", "target_layer")}
    scores = []
    for group, total in zip(groups, totals):
        for r, row in zip(group.receivers, total):
            count = r.upstream
            columns["source"] += graph.sources[:count]
            columns["source_layer"] += graph.source_layers[:count]
            columns["target"] += [r.name] * count
            columns["input"] += [r.input] * count
            columns["target_layer"] += [r.layer] * count
            scores.append(row.numpy())
    frame = pd.DataFrame(columns)
    frame.insert(3, "score", np.concatenate(scores))
    frame.attrs.update(method=method, steps=steps, group=graph.n_heads // graph.n_kv_heads)
    return frame


def edge_scores(
    model,
    data,
    metric,
    method: str = "eap",
    steps: int = 5,
    source: str = "clean",
    batch_size: int = 16,
    max_rows: int = 256,
):
    """EAP or EAP-IG scores of every edge of the model's graph (see the module docstring and
    `splice.circuits.graph` for the nodes and receivers).

    Cost per prompt batch: a clean and a corrupted forward (recording the nodes' outputs), then
    one forward and backward per `max_rows` rows of (alpha step x prompt), plus a small
    vector-Jacobian product through each layer's norm and projections (one copy per head).

    Args:
        model: A `splice.Model`.
        data: Rows with the corrupted `"prompt"` (or `"input_ids"`), the clean prompt in the
            `source` field (as many tokens) and the metric's fields.
        metric: One `Metric` (`splice.metrics`); called as `metric(logits, clean_logits, clean
            batch)`.
        method: `"eap"` (gradient at the clean run) or `"eap-ig"` (averaged over `steps`
            points of the embedding path from corrupted to clean).
        steps: EAP-IG's number of points (ignored by EAP; steps=1 equals EAP).
        source: The data field holding the clean prompts.
        batch_size: Prompts per batch.
        max_rows: Rows (alpha steps x prompts) of one forward and backward.

    Returns:
        A tidy pandas table, one row per edge: `source`, `target`, `input` ("q", "k", "v",
        "mlp", "logits"), `score`, `source_layer` (-1 for embed), `target_layer` (n_layers
        for logits); `attrs` hold method, steps and group (query heads per key/value head).

    Raises:
        SpliceError: Before any forward, for an unknown method, steps < 1, no metric, no data,
            a missing source field or unequal prompt lengths; for a family whose residual stream
            is not a sum of node outputs (Gemma 2).

    Example:
        >>> import splice, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> data = [{"input_ids": [5, 6, 7, 8], "clean": [5, 9, 7, 8], "correct": 3, "wrong": 4}]
        >>> scores = edge_scores(m, data, splice.metrics.logit_diff())
        >>> len(scores), list(scores.columns)
        (46, ['source', 'target', 'input', 'score', 'source_layer', 'target_layer'])
    """
    if method not in METHODS:
        raise SpliceError(f"method must be one of {METHODS}; got {method!r}")
    if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
        raise SpliceError(f"steps must be a positive int (EAP-IG's points on the path); got {steps!r}")
    if isinstance(max_rows, bool) or not isinstance(max_rows, int) or max_rows < 1:
        raise SpliceError(f"max_rows must be a positive int; got {max_rows!r}")
    steps = 1 if method == "eap" else steps
    graph = graph_of(model)
    batches = pairs(model, data, metric, source, batch_size)
    feeds = feeds_of(model)
    groups = graph.groups()
    totals = [torch.zeros(len(g.receivers), g.upstream, dtype=torch.float64) for g in groups]
    prompts = 0
    sites = output_sites(graph.n_layers)
    for batch, clean in batches:
        with torch.no_grad():
            clean_logits, clean_rec = model.run(clean.kwargs, record=sites, use_cache=False)
            _, corrupt_rec = model.run(batch.kwargs, record=sites, use_cache=False)
        deltas = (
            stacked_outputs(clean_rec, graph.n_layers) - stacked_outputs(corrupt_rec, graph.n_layers)
        ).float()
        ends = (corrupt_rec["embed"], clean_rec["embed"])
        per_forward = max(1, max_rows // len(batch))
        alphas = [k / steps for k in range(1, steps + 1)]
        for first in range(0, steps, per_forward):
            chunk = alphas[first : first + per_forward]
            _block(model, graph, feeds, clean, ends, chunk, metric, clean_logits, deltas, totals)
        prompts += len(batch)
    return _table(graph, groups, [t / (steps * prompts) for t in totals], method, steps)
