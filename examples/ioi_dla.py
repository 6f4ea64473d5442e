"""Direct logit attribution per head on the demo's IOI prompts, next to the heads' ablation effects.

Direct logit attribution (DLA) reads what each head writes straight into the logit difference
(" Mary" - " John") through the final norm, frozen at the real run's scale, so the heads, MLPs,
embeddings and the norm's bias add up to the model's logit difference. Zero-ablation measures
everything a head causes, including through later layers. Heads that write the answer directly
(name movers) should rank high on both; heads that act through others show up only in ablation.

    python examples/ioi_dla.py [OUT] [--prompts N] [--top K]

Writes OUT/ioi_dla.csv (per-head DLA and ablation effect) and OUT/ioi_dla.png (layer x head DLA).
The model is the embedded SmolLM2-135M-Instruct, de-quantised from Q4_1.
"""

import argparse
from pathlib import Path

from ioi_head_sweep import ioi_prompts  # the demo's prompts (this folder is on sys.path)

import splice
from splice import analysis, metrics


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="out")
    parser.add_argument("--prompts", type=int, default=6)
    parser.add_argument(
        "--top", type=int, default=10, help="ablate every head of the layers of the top-K DLA heads"
    )
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)

    m = splice.load()
    print(f"model: {splice.loading.EMBEDDED_NAME}")
    data = ioi_prompts(args.prompts)
    dla = analysis.logit_attribution(m, data, direction=("correct", "wrong"), by="heads")
    model_diff = float(dla["model"].iloc[0])
    total = float(dla["value"].sum())
    print(f"logit difference {model_diff:.3f}; DLA rows sum to {total:.3f}")
    assert abs(total - model_diff) < 1e-3, "frozen-norm DLA must add up to the model's logit difference"

    heads = dla[dla.kind == "head"][["layer", "head", "value"]].rename(columns={"value": "dla"})
    layers = sorted(set(heads.sort_values("dla", ascending=False).head(args.top)["layer"].astype(int)))
    sweep = splice.Sweep(
        sites=[f"blocks.{l}.attn.z" for l in layers],
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff("correct", "wrong")],
    )
    ablation = sweep.run(m, data, batch_size=len(data), progress=False)
    ablation = ablation[ablation.variant >= 0][["layer", "head", "effect"]]
    both = heads.merge(ablation.astype({"layer": int, "head": int}), on=["layer", "head"], how="left")
    late = both.dropna(subset=["effect"])
    rho = float(late["dla"].rank().corr((-late["effect"]).rank()))
    print(
        f"\nthe {args.top} heads with the largest DLA, and their zero-ablation effect on the logit difference:"
    )
    print(both.sort_values("dla", ascending=False).head(args.top).round(3).to_string(index=False))
    print(
        f"\nSpearman rank correlation, DLA vs -ablation effect, all {len(late)} heads of layers {layers}: {rho:.2f}"
    )
    both.to_csv(out / "ioi_dla.csv", index=False)
    picture = splice.plot.heatmap(
        analysis.pivot(dla[dla.kind == "head"]),
        out / "ioi_dla.png",
        title="IOI: direct logit attribution per head (logit diff)",
        colorbar="DLA",
    )
    print(f"table: {out / 'ioi_dla.csv'}\nheatmap: {picture}")
    top = both.sort_values("dla", ascending=False).iloc[0]
    assert top["dla"] > 0.5, "some head should write the answer directly"


if __name__ == "__main__":
    main()
