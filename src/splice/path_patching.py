"""Path patching (Wang et al. 2022, "Interpretability in the Wild", the IOI paper): how much of a
behaviour flows from some *sender* nodes to some *receiver* nodes directly, through the residual
stream, and not through any other node in between.

Nodes are named like sites, one spelling each:

- senders: an attention head `"blocks.L.attn.hH"` (head H of layer L) or an MLP `"blocks.L.mlp"`;
- receivers: the query, key or value input of a head, `"blocks.L.attn.q.hH"` (`k`, `v`), or of
  every head of a layer, `"blocks.L.attn.q"`; an MLP's input `"blocks.L.mlp.in"`; or `"logits"`,
  the direct path to the output (the final residual stream).

Globs (`"blocks.*.attn.h*"`, `"blocks.[0-3].mlp"`) expand over the model's nodes in layer order
(heads before the MLP); `nodes(model, pattern)` lists what one matches. A negative layer counts
from the end. Under grouped-query attention `H` in `attn.k.hH` / `attn.v.hH` is a key/value head
(the `attn.k` / `attn.v` sites have those heads); it feeds every query head of its group.

Data rows are those of `splice.patching.patch_sweep`: `"prompt"` is the run being patched (the
base run, usually the corrupted prompt), the `source` field (default `"clean"`) the prompt whose
sender outputs are patched in, one to one in tokens, plus the metrics' fields.

The two passes, for one set of senders:

1. The base prompts run with each sender's output taken from the source run and every *other*
   node's output (every other head, every MLP, in the layers up to the last receiver's)
   frozen at its value in the base run. The residual stream then differs from the base run's
   only by the senders' direct contributions. The receivers' inputs are recorded.
2. The base prompts run with only the receivers' inputs replaced by those recorded values,
   everything else computed normally. The metrics of this run are the result (`value`).

A head's output is its `attn.z` slice (the value-weighted sum that the output projection maps
into the residual stream), so freezing `z` freezes the head's contribution, and an MLP's output
is its `mlp.out` site. A receiver head's query input is patched at its `attn.q` slice: in every
family splice supports, `attn.q` (likewise `attn.k`, `attn.v`) is the output of the projection,
before rotary embeddings, a function of the (normalised) residual stream at the same position
only, so writing the projected query of the head is the same as feeding the head the recorded
residual stream for its query alone. (Rotary embeddings and per-head norms that come after the
projection depend only on that value and the position, which both passes share, so the same
would hold after them.) `mlp.in` is the MLP's own (normalised) input, likewise a per-position
function of the residual stream. For `"logits"` pass 2 would run the final residual stream of
pass 1 through the final norm and unembedding again, so pass 1's logits are used directly.

Exactness notes: a set of senders none of which lies in a layer at or before the last
receiver's has no path to it; such a variant (and the empty sender set) is the base run itself
and gets the baseline's values without a forward. In families whose attention output is
normalised after the projection (Gemma 2), a head's change reaches the residual stream through
that norm, which mixes the heads of the layer; the frozen heads are still frozen, so the path is
still the sender's alone.
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
import re
import types
from dataclasses import dataclass

import torch

from .engine.sites import is_pattern
from .engine.sources import Patch
from .errors import SpliceError
from .sweeps.checkpoint import Checkpoint
from .sweeps.data import as_items, batches_of, check_aligned, source_batch, tiled
from .sweeps.fingerprint import model_fingerprint
from .sweeps.metrics import Metric
from .sweeps.sweep import default_rows
from .sweeps.tables import patching_table, tidy_table

__all__ = ["nodes", "path_patch", "path_patch_sweep"]

SENDERS = '"blocks.L.attn.hH" (head H of layer L) or "blocks.L.mlp"'
"""How messages describe a sender's spelling."""
RECEIVERS = (
    '"blocks.L.attn.q.hH" (the query input of head H of layer L; likewise k, v with key/value heads), '
    '"blocks.L.attn.q" (every head\'s), "blocks.L.mlp.in" or "logits"'
)
"""How messages describe a receiver's spelling."""

_SENDER_RE = re.compile(r"^blocks\.(-?\d+)\.(?:attn\.h(\d+)|mlp)$")
_RECEIVER_RE = re.compile(r"^blocks\.(-?\d+)\.(?:attn\.([qkv])(?:\.h(\d+))?|mlp\.in)$")
_NO_SOURCE = -2  # checkpoint id of the source run's metrics (-1 is the baseline, as in sweeps)


@dataclass(frozen=True)
class _Sender:
    """A sender node: head `head` of layer `layer`, or (head None) the layer's MLP."""

    layer: int
    head: int | None  # None: the MLP

    @property
    def name(self) -> str:
        return f"blocks.{self.layer}.mlp" if self.head is None else f"blocks.{self.layer}.attn.h{self.head}"

    @property
    def site(self) -> str:
        return f"blocks.{self.layer}.mlp.out" if self.head is None else f"blocks.{self.layer}.attn.z"


@dataclass(frozen=True)
class _Receiver:
    """A receiver node: the input of a head (or of every head) at an `attn.q/k/v` site, an MLP's
    input, or the logits."""

    point: str  # "attn.q", "attn.k", "attn.v", "mlp.in" or "logits"
    layer: int | None = None
    head: int | None = None  # None: every head of a head site

    @property
    def name(self) -> str:
        if self.point == "logits":
            return "logits"
        head = "" if self.head is None else f".h{self.head}"
        return f"blocks.{self.layer}.{self.point}{head}"

    @property
    def site(self) -> str:
        return "logits" if self.point == "logits" else f"blocks.{self.layer}.{self.point}"


def _layer(model, text: str, name: str, expected: str) -> int:
    n = model.dims.n_layers
    layer = int(text)
    if not -n <= layer < n:
        raise SpliceError(
            f"{name!r}: layer {layer} is out of range; the model has {n} layers (0..{n - 1}); expected {expected}"
        )
    return layer % n


def _head(name: str, text: str, count: int, what: str) -> int:
    head = int(text)
    if not 0 <= head < count:
        raise SpliceError(
            f"{name!r}: head {head} is out of range; the model has {count} {what} (0..{count - 1})"
        )
    return head


def _all_senders(model) -> list[_Sender]:
    d = model.dims
    return [
        node
        for layer in range(d.n_layers)
        for node in [_Sender(layer, h) for h in range(d.n_heads)] + [_Sender(layer, None)]
    ]


def _all_receivers(model) -> list[_Receiver]:
    d = model.dims
    out: list[_Receiver] = []
    for layer in range(d.n_layers):
        for point, count in (("attn.q", d.n_heads), ("attn.k", d.n_kv_heads), ("attn.v", d.n_kv_heads)):
            out += [_Receiver(point, layer, None)] + [_Receiver(point, layer, h) for h in range(count)]
        out.append(_Receiver("mlp.in", layer))
    return out + [_Receiver("logits")]


def _names(value, what: str) -> list[str]:
    if isinstance(value, str):
        return [value]
    if value is None or not hasattr(value, "__iter__"):
        raise SpliceError(f"{what} takes a node name or a list of them; got {value!r}")
    names = list(value)
    bad = [v for v in names if not isinstance(v, str)]
    if bad:
        raise SpliceError(f"{what} takes node names (strings); got {bad[0]!r}")
    return names


def _glob(model, pattern: str, everything: list, what: str, expected: str) -> list:
    negative = re.match(r"^blocks\.(-\d+)\.(.*)$", pattern)  # a negative layer counts from the end
    if negative is not None:
        layer = _layer(model, negative.group(1), pattern, expected)
        pattern = f"blocks.{layer}.{negative.group(2)}"
    found = [node for node in everything if fnmatch.fnmatchcase(node.name, pattern)]
    if not found:
        raise SpliceError(f"{what} pattern {pattern!r} matches no node of this model; expected {expected}")
    return found


def _sender(model, name: str) -> _Sender:
    match = _SENDER_RE.match(name)
    if match is None:
        raise SpliceError(f"unknown sender {name!r}; a sender is {SENDERS}")
    layer = _layer(model, match.group(1), name, SENDERS)
    if match.group(2) is None:
        return _Sender(layer, None)
    return _Sender(layer, _head(name, match.group(2), model.dims.n_heads, "attention heads"))


def _receiver(model, name: str) -> _Receiver:
    if name == "logits":
        return _Receiver("logits")
    match = _RECEIVER_RE.match(name)
    if match is None:
        raise SpliceError(f"unknown receiver {name!r}; a receiver is {RECEIVERS}")
    layer = _layer(model, match.group(1), name, RECEIVERS)
    which, head = match.group(2), match.group(3)
    if which is None:
        return _Receiver("mlp.in", layer)
    if head is None:
        return _Receiver(f"attn.{which}", layer)
    d = model.dims
    count, what = (d.n_heads, "query heads") if which == "q" else (d.n_kv_heads, "key/value heads")
    return _Receiver(f"attn.{which}", layer, _head(name, head, count, what))


def _senders(model, value, what: str = "senders") -> list[_Sender]:
    out: list[_Sender] = []
    for name in _names(value, what):
        out += (
            _glob(model, name, _all_senders(model), what, SENDERS)
            if is_pattern(name)
            else [_sender(model, name)]
        )
    return list(dict.fromkeys(out))


def _receivers(model, value) -> list[_Receiver]:
    out: list[_Receiver] = []
    for name in _names(value, "receivers"):
        if is_pattern(name):
            out += [r for r in _glob(model, name, _all_receivers(model), "receivers", RECEIVERS)]
        else:
            out.append(_receiver(model, name))
    out = list(dict.fromkeys(out))
    if not out:
        raise SpliceError(f"path patching needs at least one receiver: {RECEIVERS}")
    if any(r.point == "logits" for r in out) and len(out) > 1:
        raise SpliceError(
            "'logits' (the direct path to the output) cannot be combined with other receivers: its pass-2 "
            "run is pass 1's final residual stream, which would overwrite whatever the others changed. "
            "Path patch to 'logits' and to the other receivers in separate calls"
        )
    return out


def nodes(model, pattern: str = "*") -> list[str]:
    """The sender nodes of `model` that a name or glob matches, in layer order (each layer's heads,
    then its MLP): the variants `path_patch_sweep` runs for that pattern.

    Args:
        model: a `splice.Model`.
        pattern: a sender name or glob, e.g. `"blocks.*.attn.h*"` (every head), `"blocks.[2-3].*"`
            (every node of layers 2 and 3), `"blocks.*.mlp"`; default every node.

    Returns:
        Canonical sender names (`"blocks.L.attn.hH"`, `"blocks.L.mlp"`).

    Raises:
        SpliceError: For a name that is not a sender, or a glob that matches none.

    Example:
        >>> import splice, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> nodes(m, "blocks.1.*")
        ['blocks.1.attn.h0', 'blocks.1.attn.h1', 'blocks.1.mlp']
        >>> nodes(m, "blocks.0.attn.h7")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: 'blocks.0.attn.h7': head 7 is out of range; the model has 2 attention heads (0..1)
    """
    return [s.name for s in _senders(model, pattern, "nodes")]


def path_patch(model, data, senders, receivers, metrics, source: str = "clean", batch_size: int = 16):
    """Path patching of one set of senders (all patched together) into a set of receivers.

    See the module docstring for the node names and the two passes.

    Args:
        model: a `splice.Model` (with a tokenizer, unless the data holds `input_ids`).
        data: dicts with the base `"prompt"` (or `"input_ids"`), the `source` field's prompt
            (the same number of tokens, row by row) and the metrics' fields.
        senders: a sender name or glob, or a list of them: `"blocks.L.attn.hH"`, `"blocks.L.mlp"`.
            An empty list patches nothing (the value is the baseline).
        receivers: a receiver name or glob, or a list of them: `"blocks.L.attn.q.hH"` (also `k`,
            `v`), `"blocks.L.attn.q"` (every head), `"blocks.L.mlp.in"`, or `"logits"` (alone).
        metrics: one `Metric` or a list (`splice.metrics`).
        source: the data field holding the prompts the senders' outputs come from.
        batch_size: prompts per forward.

    Returns:
        A tidy pandas table, one baseline row (variant -1) and one row (variant 0) per metric:
        `variant, sender, layer, head, pos, receiver, metric, value, baseline, effect, relative,
        source, normalised`. `value` is the metric of pass 2, `baseline` that of the unpatched
        base prompts, `source` that of the source prompts run unedited, `effect = value -
        baseline`, `normalised = effect / (source - baseline)`. `sender` joins the senders'
        names with "+"; `layer` and `head` are the sender's when there is one.

    Raises:
        SpliceError: For an unknown or out-of-range node name, "logits" with other receivers,
            no metric, a missing source field, or source prompts whose lengths differ from the
            base prompts'.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> data = [{"input_ids": [5, 6, 7, 8], "clean": [5, 9, 7, 8], "correct": 3, "wrong": 4}]
        >>> table = path_patch(m, data, "blocks.0.attn.h1", "blocks.1.attn.q.h0", splice.metrics.logit_diff())
        >>> print(table[["variant", "sender", "receiver", "metric"]].to_string(index=False))
         variant           sender           receiver     metric
              -1         baseline               none logit_diff
               0 blocks.0.attn.h1 blocks.1.attn.q.h0 logit_diff
        >>> float(path_patch(m, data, [], "logits", splice.metrics.logit_diff()).effect[1])  # no sender
        0.0
    """
    group = _senders(model, senders)
    return _path_patching(
        model, data, [group], _receivers(model, receivers), metrics, source, batch_size, None, None, False
    )


def path_patch_sweep(
    model,
    data,
    senders="blocks.*.attn.h*",
    receivers="logits",
    metrics=(),
    source: str = "clean",
    batch_size: int = 16,
    max_rows: int | None = None,
    checkpoint=None,
    progress: bool = True,
):
    """Path patching of every sender, one at a time, into the same receivers.

    Senders run as row blocks of one forward (each block carries its sender's patch), so a
    sweep over every head costs two forwards per `max_rows` rows, plus two per prompt batch for
    the base and source runs. Every finished (sender, prompt batch) is written to `checkpoint`,
    and a rerun resumes from it.

    Args:
        model: a `splice.Model`.
        data: as `path_patch`.
        senders: sender names or globs, each expanding to one variant per node (default: every
            head, `"blocks.*.attn.h*"`; `nodes(model, pattern)` lists a pattern's nodes).
        receivers: as `path_patch` (default `"logits"`, the senders' direct effect on the output).
        metrics: one `Metric` or a list.
        source: the data field the senders' outputs come from.
        batch_size: prompts per forward.
        max_rows: rows of one patched forward (default as `Sweep.run`).
        checkpoint: a JSONL path; a rerun of the same path patching sweep resumes from it and a
            file from another sweep is refused (see `splice.sweeps.checkpoint`).
        progress: a tqdm bar over senders x prompt batches.

    Returns:
        The table of `path_patch` with one row per (sender, metric), numbered in sender order;
        `splice.grid(table)` lays a sweep over heads out as `[layer x head]`.

    Raises:
        SpliceError: As `path_patch`; for a checkpoint of a different sweep.

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> data = [{"input_ids": [5, 6, 7, 8], "clean": [5, 9, 7, 8], "correct": 3, "wrong": 4}]
        >>> table = path_patch_sweep(m, data, "blocks.0.*", "blocks.1.attn.v", splice.metrics.logit_diff(), progress=False)
        >>> list(table.sender)
        ['baseline', 'blocks.0.attn.h0', 'blocks.0.attn.h1', 'blocks.0.mlp']
    """
    groups = [[s] for s in _senders(model, senders)]
    if not groups:
        raise SpliceError(f"path_patch_sweep needs at least one sender: {SENDERS}")
    return _path_patching(
        model,
        data,
        groups,
        _receivers(model, receivers),
        metrics,
        source,
        batch_size,
        max_rows,
        checkpoint,
        progress,
    )


def _spec_hash(model, items, groups, receivers, metrics, source, batch_size, max_rows) -> str:
    spec = {
        "path_patching": 1,
        "model": model_fingerprint(model),
        "senders": [[s.name for s in group] for group in groups],
        "receivers": [r.name for r in receivers],
        "data": items,
        "metrics": [list(m.spec) for m in metrics],
        "source": source,
        "batch_size": batch_size,
        "max_rows": max_rows,
    }
    return hashlib.sha256(json.dumps(spec, sort_keys=True, default=str).encode()).hexdigest()


def _pass_one_edits(groups, chunk, n: int, top: int, n_layers: int, base, src) -> dict:
    """Freeze every head's z and every MLP output in layers 0..top at the base run's values, then
    write each row block's senders from the source run."""
    edits: dict[str, list] = {}
    for layer in range(min(top, n_layers - 1) + 1):
        for site in (f"blocks.{layer}.attn.z", f"blocks.{layer}.mlp.out"):
            edits[site] = [Patch(base)]
    for j, g in enumerate(chunk):
        rows = slice(j * n, (j + 1) * n)
        heads: dict[int, list[int]] = {}
        for s in groups[g]:
            if s.layer > top:
                continue
            if s.head is None:
                edits[s.site].append(Patch(src, rows=rows))
            else:
                heads.setdefault(s.layer, []).append(s.head)
        for layer, hs in heads.items():
            edits[f"blocks.{layer}.attn.z"].append(Patch(src, heads=sorted(hs), rows=rows))
    return edits


def _pass_two_edits(receivers, recorded) -> dict:
    by_site: dict[str, list] = {}
    for r in receivers:
        by_site.setdefault(r.site, []).append(r.head)
    return {
        site: Patch(recorded, heads=None if None in heads else sorted(set(heads)))
        for site, heads in by_site.items()
    }


def _path_patching(
    model, data, groups, receivers, metrics, source, batch_size, max_rows, checkpoint, progress
):
    from tqdm.auto import tqdm

    metrics = [metrics] if isinstance(metrics, Metric) else list(metrics)
    if not metrics or not all(isinstance(m, Metric) for m in metrics):
        raise SpliceError(
            "path patching needs at least one metric (see splice.metrics), e.g. metrics.logit_diff()"
        )
    items = as_items(data)
    batches = batches_of(model, items, batch_size)
    n_layers = model.dims.n_layers
    to_logits = receivers[0].point == "logits"
    top = n_layers - 1 if to_logits else max(r.layer for r in receivers)
    # A group with no sender at or before the last receiver's layer has no path: it is the base run.
    live = [any(s.layer <= top for s in group) for group in groups]
    frozen = [f"blocks.{layer}.{p}" for layer in range(top + 1) for p in ("attn.z", "mlp.out")]
    sender_sites = sorted({s.site for group in groups for s in group if s.layer <= top})
    seq = max(b.input_ids.shape[1] for b in batches)
    max_rows = max_rows or default_rows(model, seq, None)  # every position is unembedded
    store = (
        Checkpoint(
            checkpoint, _spec_hash(model, items, groups, receivers, metrics, source, batch_size, max_rows)
        )
        if checkpoint
        else Checkpoint(None, "")
    )
    done = sum(1 for g, _ in store.done if g >= 0)
    bar = tqdm(
        total=len(groups) * len(batches),
        initial=done,
        desc="path patching",
        unit="sender",
        disable=not progress,
    )
    try:
        for b, batch in enumerate(batches):
            todo = [g for g in range(len(groups)) if not store.has(g, b)]
            if not todo and store.has(-1, b) and store.has(_NO_SOURCE, b):
                continue
            n = len(batch)
            records: list[dict] = []
            with torch.no_grad():
                base_logits, base = model.run(batch.kwargs, record=frozen, use_cache=False)
                baseline = {m.name: m(base_logits, base_logits, batch).tolist() for m in metrics}
                records.append({"variant": -1, "batch": b, "values": baseline})
                other = source_batch(model, batch, source)
                source_logits, src = model.run(other.kwargs, record=sender_sites or None, use_cache=False)
                records.append(
                    {
                        "variant": _NO_SOURCE,
                        "batch": b,
                        "values": {m.name: m(source_logits, source_logits, other).tolist() for m in metrics},
                    }
                )
                del source_logits
                store.add([r for r in records if not store.has(int(r["variant"]), b)])
                idle = [g for g in todo if not live[g]]
                store.add([{"variant": g, "batch": b, "values": baseline} for g in idle])
                bar.update(len(idle))
                busy = [g for g in todo if live[g]]
                if busy:
                    check_aligned(
                        batch,
                        other,
                        source,
                        f"path patching writes the {source!r} run's outputs into the prompt's run",
                    )
                per_forward = max(1, max_rows // n)
                for start in range(0, len(busy), per_forward):
                    chunk = busy[start : start + per_forward]
                    kwargs = {key: tiled(value, len(chunk)) for key, value in batch.kwargs.items()}
                    edits = _pass_one_edits(groups, chunk, n, top, n_layers, base, src)
                    if to_logits:
                        logits, _ = model.run(kwargs, edits=edits, use_cache=False)
                    else:
                        sites = sorted({r.site for r in receivers})
                        _, recorded = model.run(
                            kwargs, edits=edits, record=sites, stop_after_record=True, use_cache=False
                        )
                        logits, _ = model.run(
                            kwargs, edits=_pass_two_edits(receivers, recorded), use_cache=False
                        )
                    store.add(
                        [
                            {
                                "variant": g,
                                "batch": b,
                                "values": {
                                    m.name: m(logits[j * n : (j + 1) * n], base_logits, batch).tolist()
                                    for m in metrics
                                },
                            }
                            for j, g in enumerate(chunk)
                        ]
                    )
                    bar.update(len(chunk))
    finally:
        bar.close()
    return _table(groups, receivers, metrics, store, len(batches))


def _table(groups, receivers, metrics, store, n_batches):
    def mean(variant, metric):
        values = [x for b in range(n_batches) for x in store.done[(variant, b)]["values"][metric]]
        return sum(values) / len(values)

    receiver = ",".join(r.name for r in receivers)
    variants = [
        types.SimpleNamespace(
            id=g,
            site="+".join(s.name for s in group) or "none",
            layer=group[0].layer if len(group) == 1 else None,
            head=group[0].head if len(group) == 1 else None,
            pos=None,
            intervention=receiver,
        )
        for g, group in enumerate(groups)
    ]
    raw = tidy_table(metrics, variants, mean, label=str)
    table = patching_table(raw, {m.name: mean(_NO_SOURCE, m.name) for m in metrics})
    return table.rename(columns={"site": "sender", "intervention": "receiver"})
