"""A small sweep used by the checkpoint tests, importable and runnable as a subprocess:
`python sweep_job.py CHECKPOINT` runs it with a checkpoint (slowly, so it can be killed midway)."""

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import CharTokenizer, build  # noqa: E402

import splice  # noqa: E402
from splice import metrics  # noqa: E402

DATA = [
    {"prompt": p, "correct": "a", "wrong": "b"}
    for p in ["abcde", "bcdefg", "cdefgh", "ghijk", "hijklmn", "opqrs"]
]


def slow_logit(logits, clean, batch):
    time.sleep(0.03)  # make the sweep long enough to be interrupted
    return logits[:, -1, 1] - clean[:, -1, 1]


def kill_after_lines(process, path: Path, lines: int, timeout: float = 240) -> None:
    """SIGKILL `process` once the file at `path` has more than `lines` lines (some, not all, of a
    run's checkpoint records); fails the test if the process ends first."""
    import os
    import signal

    import pytest

    deadline = time.time() + timeout
    while time.time() < deadline:
        if path.exists() and len(path.read_text().splitlines()) > lines:
            break
        if process.poll() is not None:
            pytest.fail(
                f"the process finished or died before it could be killed: {process.stderr.read().decode()[-2000:]}"
            )
        time.sleep(0.05)
    os.kill(process.pid, signal.SIGKILL)
    process.wait()


def job():
    torch.manual_seed(0)
    model = splice.Model(build("gpt2"), CharTokenizer())
    sweep = splice.Sweep(
        sites="blocks.*.attn.z",
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff(), metrics.custom(slow_logit, tail=1)],
        name="job",
    )
    return model, sweep


def run(checkpoint, **kwargs):
    model, sweep = job()
    return sweep.run(model, DATA, batch_size=3, max_rows=6, checkpoint=checkpoint, progress=False, **kwargs)


if __name__ == "__main__":
    torch.set_num_threads(1)
    run(sys.argv[1])
    print("finished")
