"""Exact circuit runs: the clean prompt, with every edge outside the circuit carrying the
corrupted run's value of its source.

Each receiver's input is its actual input minus, over its upstream edges outside the circuit,
(the source's output in this run - its output in the corrupted run); heads are then fed that
input through their own norm and projection (`Feeds`), MLPs through their norm, and the logits
read the corrected final residual stream. All of it happens in one forward per batch, with
`Apply` edits at `attn.q/k/v`, `mlp.in` and the last `resid_post` that read what the same forward
recorded earlier; receivers whose edges are all in the circuit are left untouched, so the full
circuit is the clean run bit for bit. The empty circuit feeds every receiver the corrupted run's
input (output biases cancel: they are the same in both runs), i.e. it is the corrupted run.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable

import torch

from ..engine.directional import Apply
from .circuit import Circuit, as_circuit
from .graph import Graph, Group, graph_of
from .inputs import Feeds, feeds_of, mlp_reads
from .runs import layer_outputs, output_sites, pairs, stacked_outputs

__all__ = ["ablate", "evaluate"]


def _missing(graph: Graph, circuit: Circuit) -> dict[str, torch.Tensor]:
    """For each receiver with an upstream edge outside the circuit: a 0/1 vector over its
    upstream sources, 1 where the edge is missing. Checks every circuit edge against the graph."""
    kept: dict[str, set[int]] = {}
    for source, target in circuit.edges:
        s, r = graph.check_edge(source, target)
        kept.setdefault(r.name, set()).add(s)
    out = {}
    for r in graph.receivers:
        mask = torch.ones(r.upstream)
        mask[sorted(kept.get(r.name, ()))] = 0.0
        if mask.any():
            out[r.name] = mask
    return out


class _Run:
    """The corrections of one circuit run: this run's source outputs (read from its recording as
    the forward reaches them) minus the corrupted run's."""

    def __init__(self, recording, corrupt: torch.Tensor, n_heads: int):
        self.recording, self.corrupt, self.n_heads = recording, corrupt, n_heads
        self._layers: dict[int, torch.Tensor] = {}
        self._last: tuple[int, torch.Tensor] | None = None  # a layer's q, k and v share their deltas

    def _layer(self, layer: int) -> torch.Tensor:
        if layer not in self._layers:
            self._layers[layer] = layer_outputs(self.recording, layer)
        return self._layers[layer]

    def deltas(self, upstream: int) -> torch.Tensor:
        """`[upstream, n, pos, d_model]`: output here - output corrupted, of the first sources."""
        if self._last is not None and self._last[0] == upstream:
            return self._last[1]
        full, heads_only = divmod(upstream - 1, self.n_heads + 1)
        parts = [self.recording["embed"].unsqueeze(0)] + [self._layer(layer) for layer in range(full)]
        if heads_only:
            parts.append(self.recording[f"blocks.{full}.attn.result"].movedim(2, 0).to(parts[0].device))
        deltas = torch.cat(parts).float() - self.corrupt[:upstream].float()
        self._last = (upstream, deltas)
        return deltas

    def correction(self, masks: torch.Tensor, device: torch.device) -> torch.Tensor:
        """`[R, n, pos, d_model]` on `device`: minus the summed deltas of each row's missing edges."""
        deltas = self.deltas(masks.shape[1])
        return -torch.einsum("rs,s...->r...", masks.to(deltas.device), deltas).to(device)


def _edit(group: Group, rows: list[int], masks: torch.Tensor, run: _Run, feeds: Feeds, model, real) -> Apply:
    """The `Apply` that feeds the receivers `rows` of `group` their circuit inputs. `real` is the
    batch's attention mask (or None): in a padded batch an edit sees only the real tokens, as
    (row, position) pairs in row-major order, which is what `tensor[real]` gives."""
    layer = group.layer

    def fit(full: torch.Tensor, region: torch.Tensor) -> torch.Tensor:
        return (full if real is None or full.dim() == region.dim() else full[real.bool()]).to(region.dtype)

    def corrected(site: str) -> torch.Tensor:
        x = run.recording[site]
        return (x.float().unsqueeze(0) + run.correction(masks, x.device)).to(x.dtype)

    fn: Callable[[torch.Tensor], torch.Tensor]
    if group.input == "logits":

        def fn(region):  # the final residual stream is the region itself
            return region + fit(run.correction(masks, region.device)[0], region)

    elif group.input == "mlp":

        def fn(region):
            return fit(feeds.mlp(layer, corrected(mlp_reads(model, layer))[0]), region)

    else:
        heads = [group.heads[i] for i in rows]

        def fn(region):
            own = feeds.own(layer, group.input, corrected(f"blocks.{layer}.resid_pre"), heads)
            out = region.clone()
            out[..., heads, :] = fit(own.movedim(0, 2), region[..., heads, :])
            return out

    return Apply(fn)


def _circuit_logits(model, graph: Graph, feeds: Feeds, missing, clean, corrupt: torch.Tensor) -> torch.Tensor:
    n = graph.n_layers
    reads = [f"blocks.{layer}.resid_pre" for layer in range(n)]
    if not model.layout.parallel_residual:
        reads += [f"blocks.{layer}.resid_mid" for layer in range(n)]
    with model.record(output_sites(n) + reads) as recording:
        run = _Run(recording, corrupt, graph.n_heads)
        real = clean.kwargs.get("attention_mask")
        edits = {}
        for group in graph.groups():
            rows = [i for i, r in enumerate(group.receivers) if r.name in missing]
            if rows:
                masks = torch.stack([missing[group.receivers[i].name] for i in rows])
                edits[group.site] = _edit(group, rows, masks, run, feeds, model, real)
        logits, _ = model.run(clean.kwargs, edits=edits, use_cache=False)
    assert logits is not None
    return logits


def evaluate(model, data, circuit, metric, source: str = "clean", batch_size: int = 16) -> dict:
    """The metric of a circuit run: the clean prompt with every edge outside `circuit` carrying
    the corrupted prompt's value of its source (see the module docstring). Three forwards per
    batch: corrupted (recording the nodes' outputs), clean, and the circuit run.

    Every value is the metric of a run of the clean prompt's batch (baseline logits: the clean
    run's), so the corrupted run is scored as the circuit run with no edge would be.

    Args:
        model: A `splice.Model`.
        data: Rows with the corrupted `"prompt"` (or `"input_ids"`), the clean prompt in the
            `source` field (as many tokens) and the metric's fields.
        circuit: A `Circuit` (from `top` / `threshold`) or (source, target) pairs.
        metric: One `Metric` (`splice.metrics`).
        source: The data field holding the clean prompts.
        batch_size: Prompts per forward.

    Returns:
        `{"circuit", "clean", "corrupt", "faithfulness", "edges"}`: mean metric values,
        faithfulness = (circuit - corrupt) / (clean - corrupt) (NaN when clean == corrupt), and
        the number of edges.

    Raises:
        SpliceError: Before any forward, for an edge that is not in the model's graph, no
            metric, no data, a missing source field or unequal prompt lengths; for a family
            whose residual stream is not a sum of node outputs (Gemma 2).

    Example:
        >>> import splice, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> data = [{"input_ids": [5, 6, 7, 8], "clean": [5, 9, 7, 8], "correct": 3, "wrong": 4}]
        >>> out = evaluate(m, data, [], splice.metrics.logit_diff())  # no edge: the corrupted run
        >>> abs(out["circuit"] - out["corrupt"]) < 1e-5
        True
    """
    graph = graph_of(model)
    missing = _missing(graph, as_circuit(circuit, graph.n_heads // graph.n_kv_heads))
    batches = pairs(model, data, metric, source, batch_size)
    feeds = feeds_of(model)
    values: dict[str, list[float]] = {"circuit": [], "clean": [], "corrupt": []}
    for batch, clean in batches:
        with torch.no_grad():
            corrupt_logits, recording = model.run(
                batch.kwargs, record=output_sites(graph.n_layers), use_cache=False
            )
            corrupt = stacked_outputs(recording, graph.n_layers)
            clean_logits, _ = model.run(clean.kwargs, use_cache=False)
            circuit_logits = _circuit_logits(model, graph, feeds, missing, clean, corrupt)
        for key, logits in (
            ("circuit", circuit_logits),
            ("clean", clean_logits),
            ("corrupt", corrupt_logits),
        ):
            values[key] += metric(logits, clean_logits, clean).tolist()
    out: dict = {key: sum(v) / len(v) for key, v in values.items()}
    gap = out["clean"] - out["corrupt"]
    out["faithfulness"] = (out["circuit"] - out["corrupt"]) / gap if gap != 0 else float("nan")
    out["edges"] = sum(r.upstream for r in graph.receivers) - int(sum(m.sum() for m in missing.values()))
    return out


def ablate(
    model, data, edges: Iterable[tuple[str, str]], metric, source: str = "clean", batch_size: int = 16
) -> dict:
    """The exact effect of cutting `edges` alone: `evaluate` of every edge of the graph but
    these (each cut edge carries its source's corrupted value into its receiver).

    Args:
        model: A `splice.Model`.
        data: As `evaluate`.
        edges: (source, target) pairs to cut.
        metric: One `Metric`.
        source: The data field holding the clean prompts.
        batch_size: Prompts per forward.

    Returns:
        As `evaluate`, plus `"effect"` = circuit - clean (about minus the edges' summed
        `edge_scores`).

    Raises:
        SpliceError: As `evaluate`.
    """
    graph = graph_of(model)
    cut = as_circuit(edges, graph.n_heads // graph.n_kv_heads)
    for s, t in cut.edges:
        graph.check_edge(s, t)
    rest = Circuit(frozenset((s, r.name) for s, r in graph.edges()) - cut.edges)
    out = evaluate(model, data, rest, metric, source, batch_size)
    out["effect"] = out["circuit"] - out["clean"]
    return out
