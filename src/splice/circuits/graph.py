"""The computational graph of edge attribution: nodes that write into the residual stream, the
inputs that read from it, and the edges between them.

Sources (nodes with an output) are `"embed"` (layer 0's input), every head `"blocks.L.attn.hH"`
and every MLP `"blocks.L.mlp"`, in forward order (each layer's heads, then its MLP). Receivers
(inputs) are named like path patching's: the query of a head `"blocks.L.attn.q.hH"`, the key and
value of a key/value head `"blocks.L.attn.k.hG"` / `"blocks.L.attn.v.hG"` (under grouped-query
attention one key/value input feeds every query head of its group, so k/v edges end at KV heads),
an MLP's input `"blocks.L.mlp.in"` and `"logits"` (the final residual stream).

An edge runs from a source into a receiver when the source's output is part of the residual
stream the receiver reads: a head of layer L reads embed and every node of the layers before L;
an MLP reads also its own layer's heads, unless the family has a parallel residual (attention and
MLP both read the layer's input); logits read everything. In forward order the sources a receiver
reads are always a prefix of the source list, which `Receiver.upstream` counts.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass, field

from ..errors import SpliceError

__all__ = ["Graph", "Group", "Receiver", "graph_of"]

INPUTS = ("q", "k", "v", "mlp", "logits")
"""The kinds of receiver input, as in the `input` column of `edge_scores`."""


@dataclass(frozen=True)
class Receiver:
    """One input that reads the residual stream.

    Attributes:
        name: Its name (`"blocks.L.attn.q.hH"`, `"blocks.L.attn.k.hG"`, `"blocks.L.mlp.in"`,
            `"logits"`).
        input: `"q"`, `"k"`, `"v"`, `"mlp"` or `"logits"`.
        layer: Its layer (`n_layers` for logits).
        head: The query head (q) or key/value head (k, v); None otherwise.
        upstream: How many sources (a prefix of `Graph.sources`) it reads.
    """

    name: str
    input: str
    layer: int
    head: int | None
    upstream: int


@dataclass(frozen=True)
class Group:
    """Receivers fed at one site, which read the same sources: the q (k, v) inputs of a layer's
    heads, an MLP's input, or the logits.

    Attributes:
        input: `"q"`, `"k"`, `"v"`, `"mlp"` or `"logits"`.
        layer: The layer (`n_layers` for logits).
        site: The splice site where their inputs arrive (`blocks.L.attn.q`, `blocks.L.mlp.in`,
            the last layer's `resid_post` for logits).
        receivers: The receivers, in head order.
    """

    input: str
    layer: int
    site: str
    receivers: tuple[Receiver, ...]

    @property
    def upstream(self) -> int:
        """How many sources (a prefix of `Graph.sources`) they read."""
        return self.receivers[0].upstream

    @property
    def heads(self) -> list[int]:
        """The head of each receiver (head groups only)."""
        return [r.head for r in self.receivers if r.head is not None]


@dataclass(frozen=True)
class Graph:
    """Every source and receiver of one model, in forward order.

    Attributes:
        sources: Source node names.
        source_layers: The layer of each source (-1 for embed).
        receivers: Every receiver.
        n_layers: Decoder layers.
        n_heads: Query heads per layer.
        n_kv_heads: Key/value heads per layer.
    """

    sources: tuple[str, ...]
    source_layers: tuple[int, ...]
    receivers: tuple[Receiver, ...]
    n_layers: int
    n_heads: int
    n_kv_heads: int
    _receivers_by_name: dict[str, Receiver] = field(init=False, repr=False, compare=False)
    _sources_by_name: dict[str, int] = field(init=False, repr=False, compare=False)

    def __post_init__(self) -> None:
        object.__setattr__(self, "_receivers_by_name", {r.name: r for r in self.receivers})
        object.__setattr__(self, "_sources_by_name", {s: i for i, s in enumerate(self.sources)})

    def receiver(self, name: str) -> Receiver:
        """The receiver called `name`.

        Raises:
            SpliceError: If there is none.
        """
        found = self._receivers_by_name.get(name)
        if found is None:
            raise SpliceError(
                f"unknown receiver {name!r}; a receiver is 'blocks.L.attn.q.hH', 'blocks.L.attn.k.hG', "
                "'blocks.L.attn.v.hG' (G a key/value head), 'blocks.L.mlp.in' or 'logits', within this "
                f"model's {len(self.receivers)} receivers"
            )
        return found

    def source_index(self, name: str) -> int:
        """The position of source `name` in `sources`.

        Raises:
            SpliceError: If there is none.
        """
        found = self._sources_by_name.get(name)
        if found is None:
            raise SpliceError(
                f"unknown source node {name!r}; a source is 'embed', 'blocks.L.attn.hH' or 'blocks.L.mlp' "
                f"within this model's {len(self.sources)} sources"
            )
        return found

    def edges(self) -> Iterator[tuple[str, Receiver]]:
        """Every edge (source name, receiver), receiver by receiver."""
        for r in self.receivers:
            for s in self.sources[: r.upstream]:
                yield s, r

    def check_edge(self, source: str, target: str) -> tuple[int, Receiver]:
        """The source index and receiver of an edge of this graph.

        Raises:
            SpliceError: For an unknown node or a source that the receiver does not read.
        """
        s, r = self.source_index(source), self.receiver(target)
        if s >= r.upstream:
            raise SpliceError(
                f"({source!r}, {target!r}) is not an edge of this model's graph: {target} reads only the "
                "residual stream written before it (embed and the nodes of earlier layers; an MLP also its "
                "own layer's heads unless the residual is parallel)"
            )
        return s, r

    def groups(self) -> list[Group]:
        """The receivers grouped by the site their inputs arrive at, in forward order."""
        out: dict[tuple[str, int], list[Receiver]] = {}
        for r in self.receivers:
            out.setdefault((r.input, r.layer), []).append(r)
        last = self.n_layers - 1
        return [
            Group(which, layer, _site(which, layer, last), tuple(rs)) for (which, layer), rs in out.items()
        ]

    def nodes_of(self, receiver: Receiver) -> tuple[str, ...]:
        """The node(s) whose input `receiver` is: a head, the heads of a key/value group, an MLP,
        or `"logits"`."""
        if receiver.input == "logits":
            return ("logits",)
        if receiver.input == "mlp":
            return (f"blocks.{receiver.layer}.mlp",)
        assert receiver.head is not None
        group = self.n_heads // self.n_kv_heads if receiver.input in ("k", "v") else 1
        first = receiver.head * group
        return tuple(f"blocks.{receiver.layer}.attn.h{h}" for h in range(first, first + group))


def _site(which: str, layer: int, last: int) -> str:
    if which == "logits":
        return f"blocks.{last}.resid_post"
    return f"blocks.{layer}.mlp.in" if which == "mlp" else f"blocks.{layer}.attn.{which}"


def layer_start(n_heads: int, layer: int) -> int:
    """Index of layer `layer`'s first head in the source list (embed is source 0)."""
    return 1 + layer * (n_heads + 1)


def graph_of(model) -> Graph:
    """The graph of a `splice.Model` (see the module docstring).

    Args:
        model: A `splice.Model`.

    Returns:
        Its `Graph`.

    Example:
        >>> import splice, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> g = graph_of(splice.Model(transformers.GPT2LMHeadModel(config).eval()))
        >>> g.sources
        ('embed', 'blocks.0.attn.h0', 'blocks.0.attn.h1', 'blocks.0.mlp', 'blocks.1.attn.h0', 'blocks.1.attn.h1', 'blocks.1.mlp')
        >>> g.receiver("blocks.0.mlp.in").upstream, g.receiver("logits").upstream
        (3, 7)
    """
    d = model.dims
    parallel = bool(model.layout.parallel_residual)
    sources, layers = ["embed"], [-1]
    receivers: list[Receiver] = []
    for layer in range(d.n_layers):
        start = layer_start(d.n_heads, layer)
        for which, count in (("q", d.n_heads), ("k", d.n_kv_heads), ("v", d.n_kv_heads)):
            receivers += [
                Receiver(f"blocks.{layer}.attn.{which}.h{h}", which, layer, h, start) for h in range(count)
            ]
        mlp_reads = start if parallel else start + d.n_heads
        receivers.append(Receiver(f"blocks.{layer}.mlp.in", "mlp", layer, None, mlp_reads))
        sources += [f"blocks.{layer}.attn.h{h}" for h in range(d.n_heads)] + [f"blocks.{layer}.mlp"]
        layers += [layer] * (d.n_heads + 1)
    receivers.append(Receiver("logits", "logits", d.n_layers, None, len(sources)))
    return Graph(tuple(sources), tuple(layers), tuple(receivers), d.n_layers, d.n_heads, d.n_kv_heads)
