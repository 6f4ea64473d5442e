"""Integrated-gradient attribution patching vs exact patching on the embedded SmolLM2 IOI pairs.

For the residual stream (`blocks.*.resid_pre` x position) and the head outputs (`blocks.*.attn.z`
x head) of `examples/ioi_patching.py`, the exact table comes from `patching.patch_sweep` and the
estimates from `patching.attribution(..., steps=s)` for s = 1 (the plain first-order estimate),
5 and 20. Reported: Spearman rank correlation of `effect` with the exact table, and seconds.

    .venv/bin/python benchmarks/attribution_ig.py [OUT_DIR]
"""

import sys
import time
from pathlib import Path

import pandas as pd

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples"))
from ioi_patching import pairs  # noqa: E402

import splice  # noqa: E402
from splice import metrics, patching  # noqa: E402

PROMPTS = 6  # the IOI pairs of examples/ioi_patching.py's default run
STEPS = (1, 5, 20)
PATHS = ("inputs", "sites")
STUDIES = [("resid_pre x pos", "blocks.*.resid_pre", "pos"), ("attn.z x head", "blocks.*.attn.z", "heads")]


def main() -> None:
    out = Path(sys.argv[1] if len(sys.argv) > 1 else "out")
    out.mkdir(parents=True, exist_ok=True)
    model = splice.load()
    data = pairs(model, PROMPTS)
    metric = [metrics.logit_diff("correct", "wrong")]
    rows = []
    for title, sites, over in STUDIES:
        t0 = time.perf_counter()
        exact = patching.patch_sweep(model, data, sites, over, metric, batch_size=len(data), progress=False)
        rows.append(
            {
                "study": title,
                "method": "exact patch_sweep",
                "steps": None,
                "spearman": 1.0,
                "seconds": time.perf_counter() - t0,
            }
        )
        for path in PATHS:
            for steps in STEPS if path == "inputs" else STEPS[1:]:  # steps=1 is one estimate on both paths
                t0 = time.perf_counter()
                approx = patching.attribution(
                    model, data, sites, over, metric, batch_size=len(data), steps=steps, path=path
                )
                seconds = time.perf_counter() - t0
                rho = patching.rank_correlation(exact, approx)
                method = "attribution" if steps == 1 else f"IG along {path}"
                row = {"study": title, "method": method, "steps": steps, "spearman": rho, "seconds": seconds}
                rows.append(row)
                print(
                    f"{title}: {method}, steps {steps:>2}: Spearman {rho:.3f} in {seconds:.1f} s", flush=True
                )
    table = pd.DataFrame(rows)
    table["steps"] = table["steps"].astype("Int64")
    print(f"\n{len(data)} IOI pairs, SmolLM2-135M (embedded), metric logit_diff")
    print(table.round(3).to_string(index=False))
    table.to_csv(out / "attribution_ig.csv", index=False)


if __name__ == "__main__":
    main()
