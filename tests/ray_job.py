"""Sweeps for the Ray executor tests, importable by Ray workers (the tests put this folder on
their PYTHONPATH) and runnable as a driver subprocess: `python ray_job.py ADDRESS CHECKPOINT LOG`."""

import os
import signal
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).parent))

import torch  # noqa: E402
from conftest import CharTokenizer, build  # noqa: E402

import splice  # noqa: E402
from splice import metrics  # noqa: E402
from splice.spec import ModelSpec  # noqa: E402
from splice.sweeps.ray_executor import RayExecutor  # noqa: E402

DATA = [
    {"prompt": p, "correct": "a", "wrong": "b"}
    for p in ["abcde", "bcdefg", "cdefgh", "ghijk", "hijklmn", "opqrs"]
]
RUN = {"batch_size": 3, "max_rows": 6, "progress": False}
"""3 prompts per batch, 2 variants per shard: 2 batches x (12 heads / 2) shards of <= 3 records."""


def make_model(seed: int = 0):
    """The tiny GPT-2 every process builds the same way (the workers' factory)."""
    return splice.Model(build("gpt2", seed=seed), CharTokenizer())


def make_other_model():
    """Different weights: a spec that does not load the driver's model."""
    return make_model(seed=1)


class CallLog:
    """A metric that appends one line per evaluation to `path` (shared by every process), and,
    if `kill_after` is set, SIGKILLs its own process (once, in whichever process gets there
    first) instead of evaluating once `kill_after` evaluations are logged; `fail_on` raises for a
    batch holding that prompt; `sleep` slows every evaluation."""

    def __init__(self, path, kill_after=None, fail_on=None, sleep=0.0):
        self.path, self.kill_after, self.fail_on, self.sleep = str(path), kill_after, fail_on, sleep
        self.__name__ = "logged"

    def __call__(self, logits, baseline, batch):
        if self.fail_on is not None and any(item["prompt"] == self.fail_on for item in batch.items):
            raise ValueError(f"metric cannot score {self.fail_on!r}")
        if self.kill_after is not None and calls(self.path) >= self.kill_after:
            try:
                os.close(os.open(self.path + ".killed", os.O_CREAT | os.O_EXCL))
                os.kill(os.getpid(), signal.SIGKILL)
            except FileExistsError:
                pass
        time.sleep(self.sleep)
        with open(self.path, "a") as log:
            log.write(f"{os.getpid()}\n")
        return logits[:, -1, 1] - baseline[:, -1, 1]


def calls(path) -> int:
    """Evaluations logged so far."""
    return len(Path(path).read_text().splitlines()) if Path(path).exists() else 0


def pids(path) -> set[str]:
    """The processes that logged evaluations."""
    return set(Path(path).read_text().split()) if Path(path).exists() else set()


def sweep(log, **metric_options):
    """Zero every head of every layer, scored by logit_diff and by a `CallLog` metric."""
    logged = metrics.custom(CallLog(log, **metric_options), name="logged", tail=1, identity="calllog")
    return splice.Sweep(
        sites="blocks.*.attn.z",
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff(), logged],
        name="ray_job",
    )


def driver_model():
    """The driver's model, with a factory spec the workers can load."""
    model = make_model()
    model.spec = ModelSpec.from_factory(make_model)
    return model


if __name__ == "__main__":
    import ray

    torch.set_num_threads(1)
    address, checkpoint, log = sys.argv[1:4]
    ray.init(address=address, log_to_driver=False)
    sweep(log, sleep=0.05).run(
        driver_model(), DATA, checkpoint=checkpoint, executor=RayExecutor(num_workers=1), **RUN
    )
    print("finished")
