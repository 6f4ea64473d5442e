"""The main job: which attention heads of SmolLM2-135M carry the indirect-object task?

"When Mary and John went to the store, John gave a drink to" -> " Mary" (not " John").
Zero-ablate every head's output (`attn.z`, all 30 layers x 9 heads = 270 variants) on a set of
name/place/object templates, measure the logit difference " Mary" - " John" at the last token,
and rank the heads by how much their ablation changes it. Runs as one batched sweep with prefix
reuse; prints the top heads and writes the table and a layer x head heatmap.

    .venv/bin/python examples/ioi_head_sweep.py [OUT_DIR] [--prompts N]
"""

import argparse
import itertools
import random
import time
from pathlib import Path

import splice
from splice import metrics
from splice.plot import sweep_heatmap

TEMPLATES = [
    "When{A} and{B} went to the {place},{B} gave a {thing} to",
    "After{A} and{B} arrived at the {place},{B} handed a {thing} to",
    "While{A} and{B} were at the {place},{B} passed a {thing} to",
    "Then{A} and{B} walked into the {place}, and{B} offered a {thing} to",
]
NAMES = [
    " Mary",
    " John",
    " Tom",
    " Anna",
    " James",
    " Sarah",
    " David",
    " Emma",
    " Alice",
    " Paul",
    " Kate",
    " Mark",
]
PLACES = ["store", "park", "school", "office", "garden", "station"]
THINGS = ["drink", "book", "ball", "letter", "gift", "key"]


def ioi_prompts(n: int, seed: int = 0) -> list[dict]:
    rng = random.Random(seed)
    pairs = list(itertools.permutations(NAMES, 2))
    rng.shuffle(pairs)
    data = []
    for i, (a, b) in enumerate(pairs[:n]):
        template = TEMPLATES[i % len(TEMPLATES)]
        prompt = template.format(A=a, B=b, place=rng.choice(PLACES), thing=rng.choice(THINGS)).replace(
            "{", ""
        )
        data.append({"prompt": prompt, "correct": a, "wrong": b})
    return data


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("out", nargs="?", default="out")
    parser.add_argument("--prompts", type=int, default=12)
    parser.add_argument("--top", type=int, default=10)
    args = parser.parse_args()
    out = Path(args.out)
    started = time.perf_counter()

    model = splice.load()
    print(f"model: {splice.loading.EMBEDDED_NAME}")  # numbers differ from the bf16 release
    data = ioi_prompts(args.prompts)
    print(
        f"{len(data)} prompts, e.g. {data[0]['prompt']!r} -> {data[0]['correct']!r} vs {data[0]['wrong']!r}"
    )
    sweep = splice.Sweep(
        sites="blocks.*.attn.z",
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff("correct", "wrong")],
        name="IOI head ablation",
    )
    table = sweep.run(model, data, batch_size=len(data), checkpoint=out / "ioi_heads.jsonl")

    clean = float(table[table.variant == -1].value.iloc[0])
    heads = table[table.variant >= 0].copy()
    heads["importance"] = -heads["effect"]  # ablating an important head lowers the logit difference
    ranked = heads.sort_values("importance", ascending=False)
    print(f"\nunablated (baseline) logit difference (correct - wrong name): {clean:.3f}")
    print(f"The {args.top} heads whose ablation hurts the task most:")
    print(
        ranked.head(args.top)[["layer", "head", "value", "effect", "relative"]]
        .round(3)
        .to_string(index=False)
    )
    table.to_csv(out / "ioi_heads.csv", index=False)
    picture = sweep_heatmap(
        table, out / "ioi_heads.png", title="IOI: change in logit difference when a head is zeroed"
    )
    print(
        f"\ntable: {out / 'ioi_heads.csv'}\nheatmap: {picture}\ntotal {time.perf_counter() - started:.0f} s"
    )

    assert clean > 0, "the model should prefer the indirect object"
    assert ranked.importance.iloc[0] > 0.1 * clean, "some head should matter for the task"


if __name__ == "__main__":
    main()
