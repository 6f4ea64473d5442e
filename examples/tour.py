"""A tour of the basics: run the recording, reconstruction, injection-board and steering examples in
turn. Each asserts its own claims, so a failure stops the tour with the assertion that broke.
(`make demo` runs the main job, examples/ioi_head_sweep.py.)

The first run converts the embedded model to a safetensors cache (~25 s); later runs load it in
a few seconds per example."""

import runpy
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
EXAMPLES = [
    ("Recording Q/K/V and MLP activations (overwrite vs accumulate)", "record_qkv_mlp.py"),
    ("Reconstructing hidden states from splice sites", "reconstruct_hidden_states.py"),
    ("The injection board: a live Edits registry", "injection_board.py"),
    ("A steering vector changing generate", "steering_generate.py"),
]


def main() -> None:
    timings = []
    for i, (title, script) in enumerate(EXAMPLES, 1):
        print(f"\n{'=' * 100}\n[{i}/{len(EXAMPLES)}] {title}  (examples/{script})\n{'=' * 100}", flush=True)
        start = time.perf_counter()
        runpy.run_path(str(HERE / script), run_name="__main__")
        timings.append((script, time.perf_counter() - start))
    print(f"\n{'=' * 100}\nAll {len(EXAMPLES)} examples passed:")
    for script, seconds in timings:
        print(f"  {script:32s} {seconds:6.1f} s")
    print(f"  {'total':32s} {sum(s for _, s in timings):6.1f} s")


if __name__ == "__main__":
    sys.exit(main())
