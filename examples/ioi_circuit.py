"""Circuit discovery on SmolLM2-135M: which edges between heads and MLPs carry the indirect object?

Clean:   "When Mary and John went to the store, John gave a drink to"  -> " Mary"
Corrupt: "When Mary and John went to the store, Mary gave a drink to"  -> " John"
Metric: logit(" Mary") - logit(" John") at the last token.

1. Score every edge of the model's graph (the embedding, 270 heads, 30 MLPs and the logits; a
   head's query, key and value inputs apart) with EAP-IG: the corrupted-minus-clean change of the
   edge's source, dotted with the metric's gradient at the edge's target input, averaged along
   the embedding's path from the corrupted prompts to the clean ones.
2. Keep the top-k edges for several k and evaluate each circuit exactly: the clean prompts run
   with every edge outside the circuit carrying its source's corrupted value. Faithfulness =
   (circuit - corrupt) / (clean - corrupt); a random circuit of the same size is the control.
3. Put the heads of the chosen circuit next to the demo's ranking (zero-ablating each head on the
   clean prompts, `ioi_head_sweep.py`) and draw the circuit.

    .venv/bin/python examples/ioi_circuit.py [OUT_DIR] [--prompts N] [--steps M] [--quick]
"""

import argparse
import random
import time
from pathlib import Path

import pandas as pd
from ioi_patching import pairs

import splice
from splice import circuits, metrics
from splice.plot import circuit_graph

SIZES = [25, 50, 100, 200, 400, 800, 1600]


def demo_ranking(model, data) -> pd.DataFrame:
    """The demo's head ranking: each head's output zeroed on the clean prompts, in one sweep."""
    rows = [{"prompt": r["clean"], "correct": r["correct"], "wrong": r["wrong"]} for r in data]
    sweep = splice.Sweep(
        sites="blocks.*.attn.z",
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff("correct", "wrong")],
    )
    table = sweep.run(model, rows, batch_size=len(rows), progress=False)
    heads = table[table.variant >= 0].assign(importance=lambda t: -t.effect)
    heads = heads.sort_values("importance", ascending=False).reset_index(drop=True)
    heads["rank"] = heads.index + 1
    heads["node"] = [f"blocks.{int(r.layer)}.attn.h{int(r.head)}" for r in heads.itertuples()]
    return heads[["node", "rank", "importance"]]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="out")
    parser.add_argument("--prompts", type=int, default=8)
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="fewer circuit sizes (for the test suite)")
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model = splice.load()
    print(f"model: {splice.loading.EMBEDDED_NAME}")
    data = pairs(model, args.prompts)
    print(f"{len(data)} clean/corrupt pairs, e.g. {data[0]['clean']!r} / {data[0]['prompt']!r}")
    metric = metrics.logit_diff("correct", "wrong")

    t0 = time.perf_counter()
    scores = circuits.edge_scores(
        model, data, metric, method="eap-ig", steps=args.steps, batch_size=len(data)
    )
    print(f"\n{len(scores)} edges scored by EAP-IG ({args.steps} steps) in {time.perf_counter() - t0:.1f} s")
    scores.to_csv(out / "ioi_edges.csv", index=False)
    print(
        scores.reindex(scores.score.abs().sort_values(ascending=False).index).head(10).to_string(index=False)
    )

    sizes = SIZES[1::2] if args.quick else SIZES
    rng = random.Random(0)
    every_edge = sorted(zip(scores.source, scores.target))
    rows = []
    t0 = time.perf_counter()
    for k in sizes:
        chosen = circuits.top(scores, k)
        control = rng.sample(every_edge, len(chosen))
        found, random_ = (
            circuits.evaluate(model, data, c, metric, batch_size=len(data)) for c in (chosen, control)
        )
        rows.append(
            {
                "k": k,
                "edges (pruned)": len(chosen),
                "faithfulness": found["faithfulness"],
                "random circuit": random_["faithfulness"],
                "circuit metric": found["circuit"],
            }
        )
    whole = circuits.evaluate(model, data, every_edge, metric, batch_size=len(data))
    empty = circuits.evaluate(model, data, [], metric, batch_size=len(data))
    table = pd.DataFrame(rows)
    print(f"\n{2 * len(sizes) + 2} circuits evaluated exactly in {time.perf_counter() - t0:.1f} s")
    print(f"\nclean logit diff {whole['clean']:.3f}, corrupt {whole['corrupt']:.3f}")
    print(table.round(3).to_string(index=False))
    print(f"every edge: faithfulness {whole['faithfulness']:.4f}; no edge: {empty['faithfulness']:.4f}")
    table.to_csv(out / "ioi_faithfulness.csv", index=False)

    k = sizes[len(sizes) // 2]
    circuit = circuits.top(scores, k)
    t0 = time.perf_counter()
    ranking = demo_ranking(model, data)
    print(f"\nthe demo's head ablation sweep (270 heads) took {time.perf_counter() - t0:.1f} s")
    heads = sorted({n for n in circuit.nodes if ".attn.h" in n})
    listed = ranking[ranking.node.isin(heads)].sort_values("rank")
    print(
        f"\nthe {len(heads)} heads of the top-{k} circuit, with their rank among 270 in the demo's ablation sweep:"
    )
    print(listed.round(3).to_string(index=False))
    top10 = set(ranking.node[:10])
    print(f"{len(top10 & set(heads))} of the demo's 10 most important heads are in the circuit")
    picture = circuit_graph(
        circuit.to_frame(scores),
        out / "ioi_circuit.png",
        n_heads=model.dims.n_heads,
        n_kv_heads=model.dims.n_kv_heads,
        title=f"IOI circuit in SmolLM2-135M: top {k} edges by EAP-IG",
    )
    print(
        f"\nedges: {out / 'ioi_edges.csv'}\npicture: {picture}\ntotal {time.perf_counter() - started:.0f} s"
    )

    assert whole["clean"] > 0 > whole["corrupt"], "the corruption should flip the model's answer"
    assert abs(whole["faithfulness"] - 1) < 1e-3 and abs(empty["faithfulness"]) < 1e-3, "exact edge ablation"
    best = table.faithfulness.max()
    assert best > table["random circuit"].max(), "EAP-IG's circuits should beat random ones of the same size"


if __name__ == "__main__":
    main()
