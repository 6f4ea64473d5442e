"""What the analysis half costs: `analysis.decompose` and `logit_attribution` against one forward
that records every layer's residual stream, on the embedded SmolLM2-135M-Instruct (de-quantised
from Q4_1), a batch of the demo's IOI prompts.

    .venv/bin/python benchmarks/analysis.py [--rounds N] [--prompts N]

The variants run round-robin (a slow spell hits all of them); each ratio is the median over
rounds of (variant / the recorded forward of the same round). Target from issue 15:
`decompose(by="heads")` costs at most 1.5x one recorded forward. Never fails on a timing: it
prints PASS or MISS and writes benchmarks/results/analysis.csv."""

from __future__ import annotations

import argparse
import statistics
import sys
import time
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE.parent / "examples"))

from ioi_head_sweep import ioi_prompts  # noqa: E402

import splice  # noqa: E402
from splice import analysis  # noqa: E402

TARGET = ("decompose(by='heads')", 1.5)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=15)
    parser.add_argument("--prompts", type=int, default=8)
    args = parser.parse_args()
    import pandas as pd

    torch.set_num_threads(2)
    m = splice.load()
    data = ioi_prompts(args.prompts)
    prompts = [d["prompt"] for d in data]
    variants = {
        "bare forward": lambda: m(prompts),
        "recorded forward (blocks.*.resid_post)": lambda: m.run(prompts, record="blocks.*.resid_post"),
        "decompose(by='layers')": lambda: analysis.decompose(m, prompts, by="layers"),
        "decompose(by='heads')": lambda: analysis.decompose(m, prompts, by="heads"),
        "logit_attribution(by='heads')": lambda: analysis.logit_attribution(m, data, by="heads"),
    }
    times: dict[str, list[float]] = {name: [] for name in variants}
    with torch.no_grad():
        for fn in variants.values():  # warm-up
            fn()
        for _ in range(args.rounds):
            for name, fn in variants.items():
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    reference = times["recorded forward (blocks.*.resid_post)"]
    tokens = m.to_tokens(prompts).shape
    rows = []
    for name, values in times.items():
        ratio = statistics.median(v / r for v, r in zip(values, reference))
        row = {
            "variant": name,
            "median_ms": round(1000 * statistics.median(values), 1),
            "ratio_to_recorded_forward": round(ratio, 3),
            "batch": f"{tokens[0]} x {tokens[1]}",
            "rounds": args.rounds,
        }
        if name == TARGET[0]:
            row["target"] = f"<= {TARGET[1]}x: {'PASS' if ratio <= TARGET[1] else 'MISS'}"
        rows.append(row)
    table = pd.DataFrame(rows)
    table["splice"], table["torch"] = splice.__version__, torch.__version__
    (HERE / "results").mkdir(exist_ok=True)
    table.to_csv(HERE / "results" / "analysis.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
