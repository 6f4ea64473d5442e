"""Circuits: sets of edges, picked from an edge-score table by rank or by threshold.

Pruning drops edges that cannot change what `evaluate` computes: an edge into a node with no
path to `logits` (that node's output only reaches receivers through edges outside the circuit),
and an edge out of a node that no circuit path from `embed` reaches (all its inputs carry the
corrupted run's values, so its output equals its corrupted output and its edges carry nothing).
`evaluate` gives the same value with or without them, so `top` and `threshold` prune by default:
the circuit then lists only edges that matter and its size is honest.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator
from dataclasses import dataclass

from ..errors import SpliceError

__all__ = ["Circuit", "threshold", "top"]

_KV_GROUP = re.compile(r"^blocks\.(\d+)\.attn\.[kv]\.h(\d+)$")
_HEAD_INPUT = re.compile(r"^blocks\.(\d+)\.attn\.q\.h(\d+)$")
_MLP_INPUT = re.compile(r"^blocks\.(\d+)\.mlp\.in$")
_COLUMNS = ("source", "target", "score")


@dataclass(frozen=True)
class Circuit:
    """A frozen set of edges `(source, target)`: source a node (`"embed"`, `"blocks.L.attn.hH"`,
    `"blocks.L.mlp"`), target a receiver (`"blocks.L.attn.q.hH"`, `...k.hG`, `...v.hG`,
    `"blocks.L.mlp.in"`, `"logits"`). `group` is the query heads per key/value head, which says
    which heads a k/v receiver feeds (1 without grouped-query attention).

    Example:
        >>> c = Circuit(frozenset({("embed", "blocks.0.attn.q.h1"), ("blocks.0.attn.h1", "logits")}))
        >>> len(c), ("embed", "blocks.0.attn.q.h1") in c, sorted(c.nodes)
        (2, True, ['blocks.0.attn.h1', 'embed', 'logits'])
    """

    edges: frozenset[tuple[str, str]]
    group: int = 1

    def __len__(self) -> int:
        return len(self.edges)

    def __contains__(self, edge: object) -> bool:
        return edge in self.edges

    def __iter__(self) -> Iterator[tuple[str, str]]:
        return iter(sorted(self.edges))

    @property
    def nodes(self) -> frozenset[str]:
        """Every node an edge touches (receivers counted as the nodes they feed)."""
        return frozenset(n for s, t in self.edges for n in (s, *self.fed_by(t)))

    def fed_by(self, target: str) -> tuple[str, ...]:
        """The node(s) whose input the receiver `target` is."""
        if target == "logits":
            return ("logits",)
        if (m := _MLP_INPUT.match(target)) is not None:
            return (f"blocks.{m.group(1)}.mlp",)
        if (m := _HEAD_INPUT.match(target)) is not None:
            return (f"blocks.{m.group(1)}.attn.h{m.group(2)}",)
        if (m := _KV_GROUP.match(target)) is not None:
            first = int(m.group(2)) * self.group
            return tuple(f"blocks.{m.group(1)}.attn.h{h}" for h in range(first, first + self.group))
        raise SpliceError(f"unknown receiver {target!r} in a circuit edge")

    def pruned(self) -> Circuit:
        """This circuit without the edges that cannot change its evaluation (module docstring)."""
        feeds = {(s, t): self.fed_by(t) for s, t in self.edges}
        alive = {"logits"}
        changed = True
        while changed:  # nodes with a path to logits
            before = len(alive)
            alive |= {s for (s, t), fed in feeds.items() if alive.intersection(fed)}
            changed = len(alive) != before
        kept = {e for e, fed in feeds.items() if alive.intersection(fed)}
        reached = {"embed"}
        changed = True
        while changed:  # nodes a path from embed reaches
            before = len(reached)
            reached |= {n for edge in kept if edge[0] in reached for n in feeds[edge]}
            changed = len(reached) != before
        return Circuit(frozenset(e for e in kept if e[0] in reached), self.group)

    def to_frame(self, scores=None):
        """The edges as a pandas table (`source`, `target`), with their scores when `scores` (an
        `edge_scores` table) is given."""
        import pandas as pd

        frame = pd.DataFrame(sorted(self.edges), columns=["source", "target"])
        if scores is None:
            return frame
        return frame.merge(scores, on=["source", "target"], how="left")


def _checked(scores) -> None:
    missing = [c for c in _COLUMNS if c not in getattr(scores, "columns", ())]
    if missing:
        raise SpliceError(f"expected an edge_scores table with columns {list(_COLUMNS)}; missing {missing}")


def _group(scores) -> int:
    return int(scores.attrs.get("group", 1))


def _circuit(scores, rows, prune: bool) -> Circuit:
    circuit = Circuit(frozenset(zip(rows.source, rows.target)), _group(scores))
    return circuit.pruned() if prune else circuit


def top(scores, k: int, prune: bool = True) -> Circuit:
    """The `k` edges of largest absolute score.

    Args:
        scores: An `edge_scores` table.
        k: How many edges (a positive int).
        prune: Drop the edges that cannot change the circuit's evaluation (see the module
            docstring), so the result may have fewer than `k` edges.

    Returns:
        The `Circuit`.

    Raises:
        SpliceError: For k <= 0 or a table without `source`, `target` and `score`.
    """
    _checked(scores)
    if not isinstance(k, int) or isinstance(k, bool) or k <= 0:
        raise SpliceError(f"top takes a positive number of edges k; got {k!r}")
    rows = scores.loc[scores.score.abs().sort_values(ascending=False, kind="stable").index[:k]]
    return _circuit(scores, rows, prune)


def threshold(scores, value: float, prune: bool = True) -> Circuit:
    """The edges whose absolute score is at least `value`.

    Args:
        scores: An `edge_scores` table.
        value: The threshold (>= 0).
        prune: As `top`.

    Returns:
        The `Circuit`.

    Raises:
        SpliceError: For a negative or non-numeric value or a table without the columns.
    """
    _checked(scores)
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise SpliceError(f"threshold takes a number >= 0 (compared with |score|); got {value!r}")
    return _circuit(scores, scores[scores.score.abs() >= value], prune)


def as_circuit(edges: Circuit | Iterable[tuple[str, str]], group: int) -> Circuit:
    """A `Circuit` from a circuit or any iterable of (source, target) pairs."""
    if isinstance(edges, Circuit):
        return edges
    if isinstance(edges, (str, bytes)):
        raise SpliceError(f"expected a Circuit or (source, target) pairs; got the string {edges!r}")
    pairs = list(edges)
    bad = [
        e for e in pairs if not (isinstance(e, tuple) and len(e) == 2 and all(isinstance(x, str) for x in e))
    ]
    if bad:
        raise SpliceError(f"a circuit edge is a (source, target) pair of node names; got {bad[0]!r}")
    return Circuit(frozenset(pairs), group)
