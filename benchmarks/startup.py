"""What a researcher waits for before the first forward: `import splice` beyond `import torch,
transformers`, and `splice.load()` of the embedded model once its safetensors cache exists.

Each sample is a fresh interpreter (`python -X importtime` is not used: it slows imports down).
Import samples alternate (baseline, splice, baseline, ...) so a slow spell hits both; the
difference is taken per pair. Writes benchmarks/results/startup.csv and prints the table."""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
from pathlib import Path

RESULTS = Path(__file__).parent / "results"

TIMED = """
import json, time
t0 = time.perf_counter()
{setup}
t1 = time.perf_counter()
{timed}
t2 = time.perf_counter()
print(json.dumps({{"setup_s": t1 - t0, "timed_s": t2 - t1}}))
"""


def sample(setup: str, timed: str) -> dict:
    code = TIMED.format(setup=setup, timed=timed)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True)
    return json.loads(out.stdout.strip().splitlines()[-1])


def quartiles(values: list[float]) -> tuple[float, float, float]:
    q = statistics.quantiles(values, n=4)
    return q[0], statistics.median(values), q[2]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--rounds", type=int, default=15)
    args = parser.parse_args()
    import pandas as pd

    sample("import splice", "splice.load(progress=False)")  # builds the cache if missing; warms the disk
    base, extra, load, first = [], [], [], []
    for _ in range(args.rounds):
        b = sample("", "import torch, transformers")["timed_s"]
        s = sample("import torch, transformers", "import splice")
        base.append(b)
        extra.append(s["timed_s"])
        load.append(sample("import splice", "m = splice.load(progress=False)")["timed_s"])
    for _ in range(max(3, args.rounds // 3)):
        first.append(
            sample("import splice; m = splice.load(progress=False)", "m('When Mary and John went')")[
                "timed_s"
            ]
        )
    rows = []
    for what, values in [
        ("import torch, transformers (fresh interpreter)", base),
        ("import splice, beyond torch + transformers", extra),
        ("splice.load() of the embedded model, cache built", load),
        ("first forward alone (8 tokens)", first),
    ]:
        q1, med, q3 = quartiles(values)
        rows.append(
            {
                "what": what,
                "median_s": round(med, 3),
                "q1_s": round(q1, 3),
                "q3_s": round(q3, 3),
                "n": len(values),
            }
        )
    table = pd.DataFrame(rows)
    import torch
    import transformers

    import splice

    table["python"] = sys.version.split()[0]
    table["torch"], table["transformers"], table["splice"] = (
        torch.__version__,
        transformers.__version__,
        splice.__version__,
    )
    RESULTS.mkdir(exist_ok=True)
    table.to_csv(RESULTS / "startup.csv", index=False)
    print(table.to_string(index=False))


if __name__ == "__main__":
    main()
