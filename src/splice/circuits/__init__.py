"""Edge attribution (EAP, EAP-IG) and exact circuit evaluation over the graph of heads, MLPs,
the embedding and the logits (`splice.circuits.graph`).

`edge_scores` scores every edge, `top` / `threshold` pick a `Circuit`, `evaluate` runs it
exactly (every edge outside it carries the corrupted value of its source), `ablate` cuts a few
edges alone.
"""

from .circuit import Circuit, threshold, top
from .evaluate import ablate, evaluate
from .graph import Graph, Receiver, graph_of
from .scores import edge_scores

__all__ = [
    "Circuit",
    "Graph",
    "Receiver",
    "ablate",
    "edge_scores",
    "evaluate",
    "graph_of",
    "threshold",
    "top",
]
