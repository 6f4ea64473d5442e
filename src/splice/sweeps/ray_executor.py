"""Sweeps on a Ray cluster: the same shards as the local executor, computed by Ray actors.

Each actor loads the model once from the driver's `model.spec` and checks that it has the driver's
weights (a spec that loads something else would give a silently different table). The driver plans
the shards, keeps at most two in flight per actor, and alone writes the checkpoint as shards come
back, so the checkpoint format, the resume rules and the table are those of a local run.

Faults: an actor whose process dies is restarted by Ray and its unfinished shards are retried
(`max_retries` times); shards already returned are in the checkpoint and never recomputed. An
exception raised by the computation itself (a metric failing, a bad edit) is not retried: it stops
the sweep and is raised in the driver as the original exception type.
"""

from __future__ import annotations

import threading
from collections import deque
from typing import Any

import torch

from ..errors import SpliceError
from .data import batches_of
from .fingerprint import model_fingerprint
from .shards import Shard, ShardRunner

NO_RAY = "executor='ray' needs Ray: pip install 'splice[ray]' (ray 2.x)"


def _ray():
    try:
        import ray
    except ImportError:
        raise SpliceError(NO_RAY) from None
    return ray


class ShardWorker:
    """The body of one Ray actor: a model loaded once from the spec (and checked to be the
    driver's), and a `ShardRunner` for the sweep run it was last given.

    A failure while loading is kept and raised by `ready()`: Ray reports an exception in an
    actor's constructor only as a dead actor, while a method's exception reaches the driver as
    itself. A run's job travels by reference and is fetched once per run, also by an actor Ray
    restarted after its process died (which has lost everything but its constructor's work)."""

    def __init__(self, spec, fingerprint: str, threads: int):
        torch.set_num_threads(threads)
        self.failure: BaseException | None = None
        self.run_id: str | None = None
        self.runner: ShardRunner | None = None
        try:
            self.model = self._load(spec, fingerprint)
        except Exception as error:  # raised again by ready(), in the driver
            self.failure = error

    @staticmethod
    def _load(spec, fingerprint: str):
        model = spec.load()
        if model_fingerprint(model) != fingerprint:
            raise SpliceError(
                f"the model a Ray worker loaded from the spec ({spec.describe()}) differs from the driver's "
                "model (weights or config): the table would not be the driver's model's. Load the driver's "
                "model from the same spec, or give a factory that builds the same weights"
            )
        return model

    def ready(self) -> int:
        """This worker's process id once its model is loaded and checked; raises what failed."""
        import os

        if self.failure is not None:
            raise self.failure
        return os.getpid()

    def run(self, shard: Shard, run_id: str, job_box: list) -> list[dict[str, Any]]:
        """The records of one shard of run `run_id`; `job_box` holds a reference to the run's
        `(Job, the driver's input ids per prompt batch)`, fetched on the run's first shard."""
        if self.run_id != run_id:
            import ray

            job, input_ids = ray.get(job_box[0])
            self.runner, self.run_id = self._runner(job, input_ids), run_id
        assert self.runner is not None
        return self.runner.run(shard)

    def _runner(self, job, input_ids: list[list[list[int]]]) -> ShardRunner:
        self.ready()
        batches = batches_of(self.model, job.items, job.batch_size)
        for b, batch in enumerate(batches):
            if batch.input_ids.tolist() != input_ids[b]:
                raise SpliceError(
                    f"a Ray worker tokenised prompt batch {b} differently from the driver (is the spec's "
                    "tokenizer the driver's?)"
                )
        return ShardRunner(
            self.model, job.metrics, job.variants, batches, job.tail, job.prefix_reuse, job.attach
        )


class RayExecutor:
    """Run a sweep's shards on Ray actors (`Sweep.run(..., executor=RayExecutor(...))`, or
    `executor="ray"` for the defaults).

    Args:
        address: An existing cluster's address (`"auto"`, `"ray://host:10001"`, ...). Default: the
            cluster this process is already connected to, else a new local one (kept running for
            later sweeps; `ray.shutdown()` stops it).
        num_workers: Actors to start; default: as many as the cluster's CPUs (or GPUs, with
            `num_gpus`) allow.
        num_cpus: CPUs per actor (also its torch thread count).
        num_gpus: GPUs per actor (the spec's `device_map` should then put the model on "cuda").
        max_retries: Restarts of a dead actor and retries of its unfinished shards.
        keep_workers: Keep the actors, with their loaded model, after a run, for the next run of
            this executor on the same model (a 7B model loads once per session, not per sweep);
            `shutdown()` releases them. Default: released after every run.
        runtime_env: Ray's runtime environment for the actors (e.g. `{"env_vars": {...}}`).

    Raises:
        SpliceError: For a non-positive count; at run time, without Ray installed or for a model
            without a spec.

    Example:
        >>> RayExecutor(num_workers=2, num_cpus=1)
        RayExecutor(address=None, num_workers=2, num_cpus=1, num_gpus=0, keep_workers=False)
    """

    def __init__(
        self,
        address: str | None = None,
        num_workers: int | None = None,
        num_cpus: float = 1,
        num_gpus: float = 0,
        max_retries: int = 3,
        keep_workers: bool = False,
        runtime_env: dict[str, Any] | None = None,
    ):
        def number(value) -> bool:
            return isinstance(value, (int, float)) and not isinstance(value, bool)

        if num_workers is not None and (not isinstance(num_workers, int) or isinstance(num_workers, bool)):
            raise SpliceError(f"RayExecutor: num_workers is a whole number of actors; got {num_workers!r}")
        for name, value in (("num_workers", num_workers), ("num_cpus", num_cpus)):
            if value is not None and not (number(value) and value > 0):
                raise SpliceError(f"RayExecutor: {name} must be a positive number; got {value!r}")
        for name, value in (("num_gpus", num_gpus), ("max_retries", max_retries)):
            if not (number(value) and value >= 0):
                raise SpliceError(f"RayExecutor: {name} must be a number >= 0; got {value!r}")
        if not isinstance(max_retries, int):
            raise SpliceError(f"RayExecutor: max_retries is a whole number; got {max_retries!r}")
        if address is not None and not isinstance(address, str):
            raise SpliceError(
                f"RayExecutor: address is a string such as 'auto' or 'ray://host:10001'; got {address!r}"
            )
        self.address, self.num_workers, self.num_cpus, self.num_gpus = (
            address,
            num_workers,
            num_cpus,
            num_gpus,
        )
        self.max_retries, self.keep_workers, self.runtime_env = max_retries, keep_workers, runtime_env
        self._pool: tuple[tuple[str, str], list[Any]] | None = None  # (model key, actors)
        self._runs = 0
        # One sweep at a time per executor: two threads sharing it would share (and, on a
        # failure, release) each other's actors. A second thread's sweep waits for the first.
        self._lock = threading.Lock()

    def __repr__(self) -> str:
        return (
            f"RayExecutor(address={self.address!r}, num_workers={self.num_workers!r}, "
            f"num_cpus={self.num_cpus!r}, num_gpus={self.num_gpus!r}, keep_workers={self.keep_workers!r})"
        )

    def connect(self):
        """The `ray` module, connected to the cluster (starting a local one if asked)."""
        ray = _ray()
        if not ray.is_initialized():
            ray.init(address=self.address, include_dashboard=False, log_to_driver=False)
        return ray

    def workers(self, ray) -> int:
        """How many actors to start on the connected cluster."""
        if self.num_workers is not None:
            return self.num_workers
        resources = ray.cluster_resources()
        if self.num_gpus:
            return max(1, int(resources.get("GPU", 0) // self.num_gpus))
        return max(1, int(resources.get("CPU", 1) // self.num_cpus))

    def shutdown(self) -> None:
        """Release the kept actors (and the memory of their models)."""
        if self._pool is not None:
            ray = _ray()
            for actor in self._pool[1]:
                ray.kill(actor, no_restart=True)
            self._pool = None

    def _actors(self, ray, spec, fingerprint: str) -> list[Any]:
        """The kept actors if they hold this model, else new ones (loaded and checked)."""
        key = (spec.describe(), fingerprint)
        if self._pool is not None and self._pool[0] == key:
            return self._pool[1]
        self.shutdown()
        actor_class = ray.remote(ShardWorker).options(
            num_cpus=self.num_cpus,
            num_gpus=self.num_gpus,
            max_restarts=self.max_retries,
            max_task_retries=self.max_retries,
            runtime_env=self.runtime_env,
        )
        threads = max(1, int(self.num_cpus))
        actors = [actor_class.remote(spec, fingerprint, threads) for _ in range(self.workers(ray))]
        self._pool = (key, actors)
        ray.get([a.ready.remote() for a in actors])
        return actors

    def run(self, model, job, shards: list[Shard], store, make_bar) -> None:
        """Compute `shards` on actors, adding each shard's records to `store` as it returns.

        Raises:
            SpliceError: For a model without a spec (saying how to give one), or a worker whose
                model differs from the driver's. Whatever a shard raised, as its own type.
        """
        spec = getattr(model, "spec", None)
        if spec is None:
            raise SpliceError(
                "executor='ray': this model was wrapped by hand (splice.Model(hf)), so Ray workers cannot "
                "load it. Load it with splice.load(spec) (a name, or a mapping with model, dtype, "
                "device_map, ...), or give splice.Model(hf, tokenizer, spec=ModelSpec.from_factory(make)) "
                "where make() builds the same model (splice.spec.ModelSpec)"
            )
        if not shards:
            return
        with self._lock:
            self._run(model, spec, job, shards, store, make_bar)

    def _run(self, model, spec, job, shards: list[Shard], store, make_bar) -> None:
        """`run` under the executor's lock: the actors, the stream, and the release."""
        ray = self.connect()
        input_ids = [b.input_ids.tolist() for b in batches_of(model, job.items, job.batch_size)]
        self._runs += 1
        run_id = f"{id(self)}-{self._runs}"
        job_box = [ray.put((job, input_ids))]  # in a list: fetched by the actor, once per run
        bar = None
        ok = False
        try:
            actors = self._actors(ray, spec, model_fingerprint(model))  # loaded before the bar starts
            bar = make_bar()
            self._stream(ray, actors, shards, store, bar, run_id, job_box)
            ok = True
        except ray.exceptions.RayTaskError as error:
            cause = error.cause if isinstance(error.cause, SpliceError) else None
            raise (cause or error.as_instanceof_cause()) from None
        finally:
            if bar is not None:
                bar.close()
            if not (ok and self.keep_workers):
                self.shutdown()

    @staticmethod
    def _stream(ray, actors, shards: list[Shard], store, bar, run_id: str, job_box: list) -> None:
        """Keep two shards queued per actor; write each finished shard as it arrives."""
        queue = deque(shards)
        pending: dict[Any, tuple[Shard, Any]] = {}
        load = {id(a): 0 for a in actors}
        while queue or pending:
            for actor in actors:
                while queue and load[id(actor)] < 2:
                    shard = queue.popleft()
                    pending[actor.run.remote(shard, run_id, job_box)] = (shard, actor)
                    load[id(actor)] += 1
            (ready,), _ = ray.wait(list(pending), num_returns=1)
            shard, actor = pending.pop(ready)
            load[id(actor)] -= 1
            store.add(ray.get(ready))
            bar.update(len(shard.variants))
