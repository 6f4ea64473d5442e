"""Sweeps on Ray (issue 16): the Ray executor's table equals the local one; a worker killed
mid-shard costs only that shard; a failing metric stops the sweep with its own error; a killed
driver resumes from the checkpoint with or without Ray. One local cluster (2 CPUs, no
dashboard) serves the module."""

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import ray_job
import sweep_job

import splice
from splice.spec import ModelSpec
from splice.sweeps.ray_executor import RayExecutor

ray = pytest.importorskip(
    "ray", reason="the Ray executor tests need the splice[ray] extra (make install has it)"
)

HERE = Path(__file__).parent
DIMS = ray_job.make_model().dims
TOTAL = (DIMS.n_layers * DIMS.n_heads + 1) * 2  # (every head + baseline) x prompt batches
PER_SHARD = 2 + 1  # max_rows 6 / batch 3 = 2 variants, + the baseline record on a batch's first shard


@pytest.fixture(scope="module")
def cluster():
    if ray.is_initialized():
        ray.shutdown()
    context = ray.init(
        num_cpus=2,
        include_dashboard=False,
        log_to_driver=False,
        runtime_env={"env_vars": {"PYTHONPATH": str(HERE), "OMP_NUM_THREADS": "1"}},
    )
    yield context.address_info["address"]
    ray.shutdown()


@pytest.fixture(scope="module")
def warm(cluster):
    """Two actors kept across the tests that share the model (loading it once)."""
    executor = RayExecutor(num_workers=2, num_cpus=0.5, keep_workers=True)  # leaves a CPU for others
    yield executor
    executor.shutdown()


def records(path):
    return [json.loads(line) for line in Path(path).read_text().splitlines()[1:]]


def test_ray_table_equals_the_local_table_and_every_shard_runs_once(warm, tmp_path):
    model = ray_job.driver_model()
    local = ray_job.sweep(tmp_path / "local.log").run(model, ray_job.DATA, **ray_job.RUN)
    log = tmp_path / "ray.log"
    remote = ray_job.sweep(log).run(
        model, ray_job.DATA, checkpoint=tmp_path / "ck.jsonl", executor=warm, **ray_job.RUN
    )
    assert list(remote.columns) == list(local.columns)
    assert remote[["variant", "site", "head", "metric"]].equals(local[["variant", "site", "head", "metric"]])
    assert (remote["value"] - local["value"]).abs().max() <= 1e-6
    assert ray_job.calls(log) == TOTAL  # one evaluation per (variant, batch): nothing ran twice
    assert len(ray_job.pids(log)) == 2  # both workers took shards
    assert sorted((r["variant"], r["batch"]) for r in records(tmp_path / "ck.jsonl")) == sorted(
        {(r["variant"], r["batch"]) for r in records(tmp_path / "ck.jsonl")}
    )
    # keep_workers: a second run is served by the same two processes, with the model already loaded
    again = tmp_path / "again.log"
    ray_job.sweep(again).run(model, ray_job.DATA, executor=warm, **ray_job.RUN)
    assert ray_job.pids(again) == ray_job.pids(log)


def test_patch_sweep_on_ray_equals_the_local_one(warm):
    """Patch("clean") sources are recorded by the workers, from the data rows they are sent."""
    from splice import metrics, patching

    model = ray_job.driver_model()
    pairs = [
        {"prompt": p, "clean": p[::-1], "correct": "a", "wrong": "b"}
        for p in ["abcdef", "bcdefg", "ghijkl", "hijklm"]
    ]
    run = dict(
        sites="blocks.*.resid_pre", over="pos", metrics=[metrics.logit_diff()], batch_size=2, progress=False
    )
    local = patching.patch_sweep(model, pairs, **run)
    remote = patching.patch_sweep(model, pairs, executor=warm, max_rows=6, **run)
    assert remote[["variant", "site", "pos", "metric"]].equals(local[["variant", "site", "pos", "metric"]])
    for column in ("value", "source", "normalised"):
        assert (remote[column] - local[column]).abs().max() <= 1e-6


def test_a_feature_sweep_on_ray_takes_its_sae_along(warm):
    """The SAE goes to the workers with the sweep's job; the table equals the local one."""
    from test_sae_attach import make_sae

    from splice import Sweep, Zero, metrics

    model = ray_job.driver_model()
    sae = make_sae(model.dims.d_model, "topk", seed=1)
    acts = "blocks.1.resid_post.sae.acts"
    run = dict(batch_size=2, progress=False)
    grid = dict(
        sites=acts, interventions=Zero(), over="features", features="top:5", metrics=[metrics.logit_diff()]
    )
    local = Sweep(**grid, sae=sae).run(model, ray_job.DATA, **run)
    with model.attach(sae, "blocks.1.resid_post"):  # or attached around the run: it travels the same way
        remote = Sweep(**grid).run(model, ray_job.DATA, executor=warm, max_rows=6, **run)
    assert remote[["variant", "feature", "metric"]].equals(local[["variant", "feature", "metric"]])
    assert (remote["value"] - local["value"]).abs().max() <= 1e-6
    assert local["effect"].abs().max() > 0


def test_two_threads_sharing_an_executor_get_their_own_tables(warm, tmp_path):
    """Sweeps from two threads on one executor take turns on its actors."""
    from concurrent.futures import ThreadPoolExecutor

    model = ray_job.driver_model()
    local = ray_job.sweep(tmp_path / "local.log").run(model, ray_job.DATA, **ray_job.RUN)
    other_data = [dict(row, prompt=row["prompt"][1:] + "z") for row in ray_job.DATA]
    other_local = ray_job.sweep(tmp_path / "local2.log").run(model, other_data, **ray_job.RUN)
    with ThreadPoolExecutor(2) as pool:
        first = pool.submit(
            ray_job.sweep(tmp_path / "a.log").run, model, ray_job.DATA, executor=warm, **ray_job.RUN
        )
        second = pool.submit(
            ray_job.sweep(tmp_path / "b.log").run, model, other_data, executor=warm, **ray_job.RUN
        )
        tables = first.result(timeout=300), second.result(timeout=300)
    assert (tables[0]["value"] - local["value"]).abs().max() <= 1e-6
    assert (tables[1]["value"] - other_local["value"]).abs().max() <= 1e-6
    assert not tables[0]["value"].equals(tables[1]["value"])  # the two sweeps differ


def test_a_worker_killed_mid_shard_costs_only_that_shard(warm, tmp_path):
    log = tmp_path / "calls.log"
    model = ray_job.driver_model()
    table = ray_job.sweep(log, kill_after=7, sleep=0.02).run(
        model, ray_job.DATA, checkpoint=tmp_path / "ck.jsonl", executor=warm, **ray_job.RUN
    )
    assert Path(str(log) + ".killed").exists()  # a worker process did die (SIGKILL) mid-shard
    assert len(ray_job.pids(log)) >= 3  # ...and a new process took over its shards
    done = records(tmp_path / "ck.jsonl")
    assert sorted((r["variant"], r["batch"]) for r in done) == sorted(
        {(r["variant"], r["batch"]) for r in done}
    )
    assert len(done) == TOTAL  # none lost
    # Finished shards were not recomputed: at most the evaluations of the one killed shard ran twice.
    assert TOTAL <= ray_job.calls(log) <= TOTAL + PER_SHARD - 1
    local = ray_job.sweep(tmp_path / "local.log").run(model, ray_job.DATA, **ray_job.RUN)
    assert (table["value"] - local["value"]).abs().max() <= 1e-6


def test_a_killed_driver_resumes_from_the_checkpoint_with_or_without_ray(cluster, warm, tmp_path):
    checkpoint, log = tmp_path / "ck.jsonl", tmp_path / "driver.log"
    driver = subprocess.Popen(
        [sys.executable, str(HERE / "ray_job.py"), cluster, str(checkpoint), str(log)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    sweep_job.kill_after_lines(driver, checkpoint, 6)
    done_before = len(records(checkpoint))
    assert 0 < done_before < TOTAL
    copy = tmp_path / "copy.jsonl"
    copy.write_bytes(checkpoint.read_bytes())

    model = ray_job.driver_model()
    again_log = tmp_path / "again.log"
    resumed = ray_job.sweep(again_log, sleep=0.05).run(
        model, ray_job.DATA, checkpoint=checkpoint, executor=warm, **ray_job.RUN
    )
    assert ray_job.calls(again_log) == TOTAL - done_before  # finished work was not recomputed
    local_log = tmp_path / "local.log"
    resumed_here = ray_job.sweep(local_log, sleep=0.05).run(
        model, ray_job.DATA, checkpoint=copy, **ray_job.RUN
    )
    assert ray_job.calls(local_log) == TOTAL - done_before
    fresh = ray_job.sweep(tmp_path / "fresh.log").run(model, ray_job.DATA, **ray_job.RUN)
    assert (resumed["value"] - fresh["value"]).abs().max() <= 1e-6
    assert (resumed_here["value"] - fresh["value"]).abs().max() <= 1e-6


def test_a_failing_metric_stops_the_sweep_with_its_own_error(warm, tmp_path):
    log = tmp_path / "calls.log"
    started = time.time()
    with pytest.raises(ValueError, match="cannot score 'ghijk'"):
        ray_job.sweep(log, fail_on="ghijk").run(
            ray_job.driver_model(), ray_job.DATA, executor=warm, **ray_job.RUN
        )
    assert time.time() - started < 120  # not retried endlessly
    assert ray_job.calls(log) <= TOTAL // 2 + 2 * PER_SHARD  # batch 0, and what was in flight
    assert warm._pool is None  # a failed run releases the kept actors: the next run starts clean


def test_a_model_without_a_spec_is_refused_before_any_work(cluster, tmp_path):
    model = ray_job.make_model()  # splice.Model(hf): no spec
    with pytest.raises(splice.SpliceError, match=r"wrapped by hand.*splice.load\(spec\).*from_factory"):
        ray_job.sweep(tmp_path / "log").run(model, ray_job.DATA, executor="ray", **ray_job.RUN)
    assert not (tmp_path / "log").exists()


def test_a_spec_that_loads_other_weights_is_refused(cluster, tmp_path):
    model = ray_job.make_model()
    model.spec = ModelSpec.from_factory(ray_job.make_other_model)
    with pytest.raises(splice.SpliceError, match="differs from the driver's model"):
        ray_job.sweep(tmp_path / "log").run(
            model, ray_job.DATA, executor=RayExecutor(num_workers=1), **ray_job.RUN
        )


def test_executor_arguments_are_checked_at_construction():
    for bad, message in [
        ({"num_workers": 0}, "num_workers must be a positive number"),
        ({"num_workers": 2.5}, "num_workers is a whole number"),
        ({"num_workers": True}, "num_workers is a whole number"),
        ({"num_cpus": "1"}, "num_cpus must be a positive number"),
        ({"num_gpus": -1}, "num_gpus must be a number >= 0"),
        ({"max_retries": 1.5}, "max_retries is a whole number"),
        ({"address": 6379}, "address is a string"),
    ]:
        with pytest.raises(splice.SpliceError, match=message):
            RayExecutor(**bad)
    with pytest.raises(splice.SpliceError, match="executor= takes None, 'local', 'ray'"):
        ray_job.sweep("unused").run(ray_job.make_model(), ray_job.DATA, executor="dask", **ray_job.RUN)


def test_without_ray_installed_the_error_says_how_to_get_it(monkeypatch, tmp_path):
    monkeypatch.setitem(sys.modules, "ray", None)  # `import ray` now raises ImportError
    with pytest.raises(splice.SpliceError, match=r"pip install 'splice\[ray\]'"):
        ray_job.sweep(tmp_path / "log").run(
            ray_job.driver_model(), ray_job.DATA, executor="ray", **ray_job.RUN
        )


@pytest.mark.real
def test_the_cli_runs_a_config_on_ray_and_matches_the_local_table(
    cluster, tmp_path, smol, capsys, monkeypatch
):
    import pandas as pd

    config = tmp_path / "heads.yaml"
    config.write_text(
        "model: {model: embedded, dtype: float32}\n"
        "data:\n"
        "  - {prompt: 'When Mary and John went to the store, John gave a drink to', correct: ' Mary', wrong: ' John'}\n"
        "  - {prompt: 'When Tom and Anna went to the park, Anna gave a ball to', correct: ' Tom', wrong: ' Anna'}\n"
        "sweep: {sites: blocks.29.attn.z, interventions: [{type: Zero}], over: heads}\n"
        "metrics: [logit_diff]\n"
        "output: {table: out/heads.csv, heatmap: false}\n"
    )
    from splice.cli import main

    monkeypatch.chdir(tmp_path)  # the config's output paths are relative
    assert main(["sweep", str(config), "--executor", "ray", "--address", cluster, "--workers", "1"]) == 0
    table = pd.read_csv(tmp_path / "out" / "heads.csv")
    from splice.config import load_config

    local = load_config(config).sweep.run(smol, load_config(config).data, progress=False)
    assert len(table) == len(local) == 9 + 1
    assert (table["value"] - local["value"]).abs().max() <= 1e-5  # through CSV text: ~7 significant digits
    assert main(["sweep", str(config), "--workers", "2"]) == 2
    assert "--address and --workers are options of --executor ray" in capsys.readouterr().err
