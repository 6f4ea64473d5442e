"""Activation patching on SmolLM2-135M: where does the indirect object's identity live?

Clean:   "When Mary and John went to the store, John gave a drink to"  -> " Mary"
Corrupt: "When Mary and John went to the store, Mary gave a drink to"  -> " John"
Metric: logit(" Mary") - logit(" John") at the last token (positive on clean, negative on
corrupt). Patch every (layer, position) of the residual stream and every head's output from
the clean run into the corrupted one, as batched sweeps, and report the normalised effect
(patched - corrupt) / (clean - corrupt). Then estimate both tables by attribution patching (one
forward and backward) and print how well its ranking agrees with the exact sweeps.

    .venv/bin/python examples/ioi_patching.py [OUT_DIR] [--prompts N]
"""

import argparse
import time
from collections import Counter
from pathlib import Path

from ioi_head_sweep import NAMES, PLACES, THINGS

import splice
from splice import metrics, patching
from splice.plot import heatmap

TEMPLATE = "When{A} and{B} went to the {place},{S} gave a {thing} to"


def pairs(model, n: int) -> list[dict]:
    """n clean/corrupt pairs of one token length (so positions mean the same thing in every prompt)."""
    rows = []
    for i, a in enumerate(NAMES):
        for j, b in enumerate(NAMES):
            if a != b:
                fill = dict(
                    A=a, B=b, place=PLACES[(i + j) % len(PLACES)], thing=THINGS[(i * j) % len(THINGS)]
                )
                rows.append(
                    {
                        "clean": TEMPLATE.format(S=b, **fill),
                        "prompt": TEMPLATE.format(S=a, **fill),
                        "correct": a,
                        "wrong": b,
                    }
                )
    lengths = [len(model.to_tokens(r["clean"])[0]) for r in rows]
    common = Counter(lengths).most_common(1)[0][0]
    same = [
        r
        for r, n_tokens in zip(rows, lengths)
        if n_tokens == common and len(model.to_tokens(r["prompt"])[0]) == common
    ]
    return same[:: max(1, len(same) // n)][:n]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="out")
    parser.add_argument("--prompts", type=int, default=6)
    args = parser.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    started = time.perf_counter()

    model = splice.load()
    print(f"model: {splice.loading.EMBEDDED_NAME}")  # numbers differ from the bf16 release
    data = pairs(model, args.prompts)
    tokens = model.to_str_tokens(data[0]["clean"])
    print(
        f"{len(data)} pairs of {len(tokens)} tokens, e.g.\n  clean:   {data[0]['clean']!r}\n  corrupt: {data[0]['prompt']!r}"
    )
    metric = [metrics.logit_diff("correct", "wrong")]

    # (title, sites, over, the least a single patch must restore: the whole residual stream at
    # the right position carries the answer; a single head carries a part of it)
    studies = [
        ("residual stream", "blocks.*.resid_pre", "pos", 0.9),
        ("head outputs", "blocks.*.attn.z", "heads", 0.2),
    ]
    for title, sites, over, restores in studies:
        t0 = time.perf_counter()
        exact = patching.patch_sweep(model, data, sites, over, metric, batch_size=len(data))
        t1 = time.perf_counter()
        approx = patching.attribution(model, data, sites, over, metric, batch_size=len(data))
        t2 = time.perf_counter()
        rho = patching.rank_correlation(exact, approx)
        baseline = exact[exact.variant == -1].iloc[0]
        cells = exact[exact.variant >= 0]
        column = "pos" if over == "pos" else "head"
        print(f"\n== {title}: {len(cells)} patches, exact {t1 - t0:.0f} s, attribution {t2 - t1:.1f} s ==")
        print(f"clean (source) logit diff {baseline.source:.2f}, corrupt (baseline) {baseline.value:.2f}")
        top = cells.sort_values("normalised", ascending=False).head(8)
        print(top[["layer", column, "value", "normalised"]].round(3).to_string(index=False))
        print(f"attribution vs exact: Spearman rank correlation {rho:.3f}")
        stem = sites.split("*.")[1].replace(".", "_")
        exact.to_csv(out / f"patching_{stem}.csv", index=False)
        approx.to_csv(out / f"attribution_{stem}.csv", index=False)
        grid = cells.pivot(index="layer", columns=column, values="normalised")
        labels = tokens if over == "pos" else None
        picture = heatmap(
            grid,
            out / f"patching_{stem}.png",
            title=f"IOI patching ({title}): normalised effect",
            xlabel="position" if over == "pos" else "head",
            colorbar="normalised effect",
            xticklabels=labels,
        )
        print(f"heatmap: {picture}")
        assert baseline.source > 0 > baseline.value, "the corruption should flip the model's answer"
        assert cells.normalised.max() > restores, (
            f"some single patch should restore at least {restores:.0%} of the clean answer"
        )
        assert rho > 0.5, "attribution patching should rank the cells roughly like exact patching"
    print(f"\ntotal {time.perf_counter() - started:.0f} s")


if __name__ == "__main__":
    main()
