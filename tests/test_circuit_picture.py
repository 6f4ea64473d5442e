"""`splice.plot.circuit_graph`: the picture of a circuit's edge table is written, places each
node where its name says, and refuses tables it cannot draw."""

from __future__ import annotations

import pandas as pd
import pytest

from splice import SpliceError
from splice.plot import circuit_graph

EDGES = pd.DataFrame(
    {
        "source": ["embed", "blocks.0.attn.h1", "blocks.0.mlp", "blocks.1.attn.h3", "blocks.0.attn.h2"],
        "target": [
            "blocks.0.attn.q.h1",
            "blocks.1.attn.k.h1",
            "blocks.1.attn.v.h0",
            "logits",
            "blocks.0.mlp.in",
        ],
        "input": ["q", "k", "v", "logits", "mlp"],
        "score": [0.5, -0.2, 0.1, 1.0, 0.3],
    }
)


def test_circuit_graph_writes_a_png_that_depends_on_the_edges(tmp_path):
    import matplotlib.image

    path = circuit_graph(EDGES, tmp_path / "deep" / "circuit.png", n_heads=4, n_kv_heads=2)
    image = matplotlib.image.imread(path)
    assert image.shape[0] > 200 and image.shape[1] > 300
    # The picture depends on the edges: dropping one changes it.
    other = circuit_graph(EDGES.iloc[:-1], tmp_path / "fewer.png", n_heads=4, n_kv_heads=2)
    assert path.read_bytes() != other.read_bytes()


@pytest.mark.parametrize(
    ("table", "message"),
    [
        (EDGES.drop(columns="score"), "lacks ['score']"),
        (EDGES.iloc[:0], "no rows"),
        (EDGES.assign(target=["blocks.0.attn.o"] * 5), "is not a circuit node"),
    ],
)
def test_circuit_graph_refuses_tables_it_cannot_draw(tmp_path, table, message):
    with pytest.raises(SpliceError, match=message.replace("[", r"\[").replace("]", r"\]")):
        circuit_graph(table, tmp_path / "x.png")
