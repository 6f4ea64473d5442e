"""Sweeps: batched variants with prefix reuse equal one-at-a-time runs; tables; checkpoints survive SIGKILL."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import sweep_job
import torch
from conftest import CharTokenizer, build

import splice
from splice import metrics

DATA = [{"prompt": p, "correct": "a", "wrong": "c"} for p in ["abcdefg", "bcd", "cdefgh", "defghij", "efghi"]]
METRICS = [
    metrics.logit_diff(),
    metrics.kl_from_baseline(),
    metrics.loss(2),
    metrics.answer_logprob("correct"),
]


@pytest.fixture
def tmodel(family):
    return splice.Model(build(family), CharTokenizer())


@pytest.mark.parametrize(
    "spec",
    [
        dict(sites="blocks.*.attn.z", interventions=splice.Zero(), over="heads"),
        dict(sites=["blocks.0.resid_pre", "blocks.2.resid_post"], interventions=splice.Zero(), over="pos"),
        dict(sites="blocks.*.mlp.out", interventions=[splice.Scale(s) for s in (0.0, 0.5, 2.0)]),
        dict(sites=["embed", "final_norm", "blocks.1.attn.k"], interventions=splice.Scale(0.5)),
    ],
)
def test_batched_sweep_equals_one_variant_at_a_time(tmodel, spec):
    sweep = splice.Sweep(metrics=METRICS, **spec)
    batched = sweep.run(tmodel, DATA, batch_size=2, max_rows=7, progress=False)
    sequential = sweep.run(tmodel, DATA, batch_size=2, prefix_reuse=False, progress=False)
    assert list(batched.columns) == list(sequential.columns)
    torch.testing.assert_close(
        torch.tensor(batched.value.to_numpy()),
        torch.tensor(sequential.value.to_numpy()),
        rtol=1e-5,
        atol=1e-5,
    )
    assert tmodel.hook_count == 0


def test_sweep_values_match_a_plain_forward_with_the_edit(tmodel):
    """Independent of the sweep machinery: the metric computed by hand from a full forward."""
    sweep = splice.Sweep(
        sites="blocks.1.attn.z", interventions=splice.Zero(), over="heads", metrics=[metrics.logit_diff()]
    )
    table = sweep.run(tmodel, DATA, batch_size=5, progress=False)
    a, c = tmodel.to_single_token("a"), tmodel.to_single_token("c")
    for head in range(tmodel.dims.n_heads):
        with torch.no_grad():
            logits, _ = tmodel.run(
                [d["prompt"] for d in DATA], edits={"blocks.1.attn.z": splice.Zero(heads=head)}
            )
        expected = float((logits[:, -1, a] - logits[:, -1, c]).mean())
        row = table[(table["head"] == head) & (table.metric == "logit_diff")].iloc[0]
        assert row.value == pytest.approx(expected, abs=1e-5)
    clean = table[table.variant == -1].iloc[0]
    with torch.no_grad():
        logits = tmodel([d["prompt"] for d in DATA])
    assert clean.value == pytest.approx(float((logits[:, -1, a] - logits[:, -1, c]).mean()), abs=1e-5)


def test_table_is_tidy(tmodel):
    sweep = splice.Sweep(
        sites="blocks.*.attn.z", interventions=splice.Zero(), over="heads", metrics=METRICS[:2]
    )
    table = sweep.run(tmodel, DATA, progress=False)
    n_variants = tmodel.dims.n_layers * tmodel.dims.n_heads
    assert len(table) == (n_variants + 1) * 2
    assert set(table.columns) >= {
        "variant",
        "site",
        "layer",
        "head",
        "pos",
        "intervention",
        "metric",
        "value",
        "baseline",
        "effect",
        "relative",
    }
    row = table[(table.layer == 2) & (table["head"] == 1) & (table.metric == "logit_diff")].iloc[0]
    assert row.site == "blocks.2.attn.z" and row.intervention == "Zero(heads=1)"
    assert row.effect == pytest.approx(row.value - row.baseline)
    grid = (
        table[table.metric == "logit_diff"]
        .dropna(subset=["head"])
        .pivot(index="layer", columns="head", values="effect")
    )
    assert grid.shape == (tmodel.dims.n_layers, tmodel.dims.n_heads)


def test_bad_sweeps_are_refused(tmodel):
    with pytest.raises(splice.SpliceError, match="no head axis"):
        splice.Sweep(
            sites="blocks.0.resid_post", interventions=splice.Zero(), over="heads", metrics=METRICS[:1]
        ).run(tmodel, DATA, progress=False)
    with pytest.raises(splice.SpliceError, match="already sets heads"):
        splice.Sweep(
            sites="blocks.0.attn.z", interventions=splice.Zero(heads=1), over="heads", metrics=METRICS[:1]
        ).run(tmodel, DATA, progress=False)
    with pytest.raises(splice.SpliceError, match="at least one metric"):
        splice.Sweep(sites="blocks.0.attn.z", interventions=splice.Zero())
    with pytest.raises(splice.SpliceError, match="data field 'answer'"):
        splice.Sweep(
            sites="blocks.0.attn.z", interventions=splice.Zero(), metrics=[metrics.answer_logprob()]
        ).run(tmodel, DATA, progress=False)
    assert tmodel.hook_count == 0


def test_checkpoint_resumes_after_sigkill_without_recomputing(tmp_path):
    path = tmp_path / "sweep.jsonl"
    job = subprocess.Popen(
        [sys.executable, str(Path(sweep_job.__file__)), str(path)],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    sweep_job.kill_after_lines(job, path, 8)
    done_before = len(path.read_text().splitlines()) - 1
    total = (3 * 4 + 1) * 2  # (heads x layers + clean) x prompt batches
    assert 0 < done_before < total

    calls = []
    model, sweep = sweep_job.job()
    # Same metric (same spec), counting its calls: one per (variant, prompt batch) computed.
    slow = sweep.metrics[1]
    sweep.metrics[1] = metrics.Metric(
        slow.name, lambda *a: (calls.append(1), slow.fn(*a))[1], slow.tail, slow.spec
    )
    resumed = sweep.run(model, sweep_job.DATA, batch_size=3, max_rows=6, checkpoint=path, progress=False)
    assert len(calls) == total - done_before  # finished work was not recomputed
    fresh = sweep_job.run(None)
    assert resumed.equals(fresh)
    lines = [json.loads(line) for line in path.read_text().splitlines()]
    assert len({(r["variant"], r["batch"]) for r in lines[1:]}) == total


def test_checkpoint_from_another_sweep_is_refused(tmp_path):
    path = tmp_path / "sweep.jsonl"
    model, sweep = sweep_job.job()
    small = splice.Sweep(
        sites="blocks.0.attn.z", interventions=splice.Zero(), over="heads", metrics=[metrics.logit_diff()]
    )
    small.run(model, sweep_job.DATA, checkpoint=path, progress=False)
    with pytest.raises(splice.SpliceError, match="different sweep"):
        splice.Sweep(
            sites="blocks.1.attn.z", interventions=splice.Zero(), over="heads", metrics=[metrics.logit_diff()]
        ).run(model, sweep_job.DATA, checkpoint=path, progress=False)
    # same sweep again: everything is read back, nothing recomputed, same table
    again = small.run(model, sweep_job.DATA, checkpoint=path, progress=False)
    assert again.equals(small.run(model, sweep_job.DATA, progress=False))


def test_the_progress_bar_counts_variants_and_starts_after_the_first_trace(monkeypatch):
    """Counting the clean trace as a variant made the first estimate the trace's time multiplied
    by every variant (~30 min shown for a 48 s sweep)."""
    import tqdm.auto

    from splice.sweeps.replay import PrefixReplay

    events, bars = [], []

    class Bar:
        def __init__(self, total, initial=0, **kwargs):
            events.append("bar")
            self.total, self.n = total, initial
            bars.append(self)

        def update(self, k):
            self.n += k

        def close(self):
            events.append("close")

    real_check = PrefixReplay.check
    monkeypatch.setattr(
        PrefixReplay, "check", lambda self: (events.append("trace checked"), real_check(self))[1]
    )
    monkeypatch.setattr(tqdm.auto, "tqdm", Bar)
    model = splice.Model(build("llama"), CharTokenizer())
    sweep = splice.Sweep(
        sites="blocks.1.attn.z", interventions=splice.Zero(), over="heads", metrics=[metrics.logit_diff()]
    )
    sweep.run(model, DATA, batch_size=2)
    n_variants, n_batches = model.dims.n_heads, 3
    assert events == ["trace checked", "bar", "close"]
    assert bars[0].total == n_variants * n_batches == bars[0].n
