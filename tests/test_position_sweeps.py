"""Position sweeps replay only the tokens an edit can change (`splice.sweeps.suffix`): equal to the
reference path on every family, with and without padding; the suffix is all that runs; a family
whose cache path does not reproduce falls back, saying why; nothing is left installed."""

from __future__ import annotations

import warnings

import pytest
import torch
from conftest import build

import splice
from splice import metrics, patching
from splice.sweeps import suffix
from splice.sweeps.data import batches_of
from splice.sweeps.replay import PrefixReplay
from splice.sweeps.shards import ShardRunner, plan_shards
from splice.sweeps.suffix import SuffixFallbackWarning, SuffixReplays
from splice.sweeps.suffix_edits import variant_starts

# Same-length clean/corrupt pairs; the lengths differ between rows (left padding in a batch).
PADDED = [
    {"prompt": p, "clean": c, "correct": "a", "wrong": "c"}
    for p, c in [("abcdefg", "gfedcba"), ("bcdef", "fedcb"), ("cdefgh", "hgfedc")]
]
EVEN = [{**row, "prompt": row["prompt"][:5], "clean": row["clean"][:5]} for row in PADDED]
METRICS = [metrics.logit_diff(), metrics.kl_from_baseline()]


@pytest.fixture
def tm(char_model):
    return char_model


@pytest.fixture
def gpt2(char_gpt2):
    return char_gpt2


def _values(table):
    return torch.tensor(table.value.to_numpy(), dtype=torch.float64)


@pytest.mark.parametrize("data", [EVEN, PADDED], ids=["even", "left-padded"])
def test_resid_pre_pos_patching_equals_the_reference_path(tm, data):
    with warnings.catch_warnings():
        warnings.simplefilter("error", SuffixFallbackWarning)  # every family takes the suffix path
        fast = patching.patch_sweep(tm, data, metrics=METRICS, batch_size=3, progress=False)
    reference = patching.patch_sweep(
        tm, data, metrics=METRICS, batch_size=3, prefix_reuse=False, progress=False
    )
    torch.testing.assert_close(_values(fast), _values(reference), rtol=1e-5, atol=1e-5)
    assert tm.hook_count == 0


def _layers(model):
    return [model.layout.module(splice.engine.sites.Site("resid_pre", i)) for i in range(model.dims.n_layers)]


def _query_positions(model, runner, shards):
    """Rows x query positions the decoder layers compute while the shards run (not counting the
    probes, which call stubbed layers that compute nothing)."""
    seen = []

    def count(module, args):
        if "forward" not in module.__dict__:
            seen.append(args[0].shape[0] * args[0].shape[1])

    handles = [layer.register_forward_pre_hook(count) for layer in _layers(model)]
    try:
        for shard in shards:
            runner.run(shard)
    finally:
        for handle in handles:
            handle.remove()
    return sum(seen)


def test_only_the_tokens_after_each_edit_are_computed(gpt2):
    """One site, one variant per position, one variant per shard: the layers see exactly each
    variant's suffix (and the whole sequence in the layers-only sweep)."""
    sweep = splice.Sweep(sites="blocks.1.resid_pre", interventions=splice.Zero(), over="pos", metrics=METRICS)
    batch = batches_of(gpt2, EVEN, 3)[0]
    seq, n, layers = 5, 3, gpt2.dims.n_layers - 1  # layers 1.. are replayed
    variants = sweep.variants(gpt2, seq)
    starts = variant_starts(gpt2, variants, batch.kwargs)
    assert [starts[v.id] for v in variants] == list(range(seq))
    counts = {}
    for mode in (True, "layers"):
        runner = ShardRunner(gpt2, METRICS, variants, [batch], None, mode)
        runner.enter(0)
        shards = [plan_shards([v], n, 1, 0, False)[0] for v in variants]
        counts[mode] = _query_positions(gpt2, runner, shards)
    assert counts["layers"] == len(variants) * n * layers * seq
    assert counts[True] == n * layers * sum(seq - p for p in range(seq))
    assert gpt2.hook_count == 0


def test_planned_shards_pack_short_suffixes(gpt2):
    sweep = splice.Sweep(sites="blocks.*.resid_pre", interventions=splice.Zero(), over="pos", metrics=METRICS)
    batch = batches_of(gpt2, EVEN, 3)[0]
    variants = sweep.variants(gpt2, 5)
    starts = variant_starts(gpt2, variants, batch.kwargs)
    shards = plan_shards(variants, 3, 2, 0, True, starts=starts, seq=5)
    assert sorted(i for s in shards for i in s.variants) == [v.id for v in variants]
    for s in shards:  # one start each, within the budget of 2 full rows, and in replay order
        (first,) = {starts[i] for i in s.variants}
        assert len(s.variants) * (5 - first) <= 2 * 5 and s.block == 2
        layers = [variants[i].start_layer for i in s.variants]
        assert layers == sorted(layers)
    assert len(shards) < len(plan_shards(variants, 3, 2, 0, True))
    for first in set(starts.values()):  # as few shards per start as fit, of near-equal sizes
        sizes = [len(s.variants) for s in shards if starts[s.variants[0]] == first]
        assert len(sizes) == -(-sum(sizes) // max(1, 10 // (5 - first)))
        assert max(sizes) - min(sizes) <= 1


@pytest.mark.parametrize("family", ["gpt2", "llama", "bloom", "gemma2"])
def test_a_suffix_replay_under_an_edit_equals_the_full_replay(family):
    model = splice.Model(build(family))
    ids = torch.randint(1, 97, (3, 8), generator=torch.Generator().manual_seed(2))
    mask = torch.ones(3, 8, dtype=torch.long)
    mask[0, :3] = 0
    kwargs = {"input_ids": ids, "attention_mask": mask, "position_ids": (mask.cumsum(-1) - 1).clamp(min=0)}
    prefix = PrefixReplay(model, kwargs, tail=3)
    replays = SuffixReplays(prefix)
    assert replays.reason is None
    edit = {"blocks.1.resid_pre": splice.Scale(0.5, pos=[3, 4])}  # row 0: columns 6, 7
    with torch.no_grad(), model.edit(edit):
        full = prefix.replay([1], 3)
        part = prefix.replay([1], 3, replays.window(3))
    torch.testing.assert_close(part, full, rtol=1e-5, atol=1e-5)
    assert model.hook_count == 0


@pytest.mark.parametrize("side", ["left", "right"])
def test_metrics_reading_padding_tokens_rule_suffixes_out(gpt2, side):
    """A padding token's output may depend on later tokens (eager attention attends uniformly
    when every key is masked), so its logits must come from a full replay."""
    mask = torch.ones(2, 6, dtype=torch.long)
    mask[0, :2] = 0 if side == "left" else 1
    mask[0, 4:] = 1 if side == "left" else 0
    kwargs = {"input_ids": torch.randint(1, 97, (2, 6)), "attention_mask": mask}
    reads_padding = PrefixReplay(gpt2, kwargs, tail=None if side == "left" else 1)
    assert "padding tokens" in (SuffixReplays(reads_padding).reason or "")
    if side == "left":
        assert SuffixReplays(PrefixReplay(gpt2, kwargs, tail=4)).reason is None


def test_edits_that_may_touch_earlier_tokens_replay_every_token(gpt2):
    """Negative positions and functions are not known to spare earlier tokens: full replays."""
    interventions = [splice.Zero(pos=-1), splice.Apply(lambda x: x * 0.5, pos=2), splice.Zero(pos=[3, 1])]
    sweep = splice.Sweep(sites="blocks.1.resid_pre", interventions=interventions, metrics=METRICS)
    batch = batches_of(gpt2, EVEN, 3)[0]
    assert list(variant_starts(gpt2, sweep.variants(gpt2, 5), batch.kwargs).values()) == [0, 0, 1]
    fast = sweep.run(gpt2, PADDED, batch_size=3, progress=False)
    reference = sweep.run(gpt2, PADDED, batch_size=3, prefix_reuse=False, progress=False)
    torch.testing.assert_close(_values(fast), _values(reference), rtol=1e-5, atol=1e-5)


def test_a_cache_path_that_does_not_reproduce_falls_back_saying_why(gpt2, monkeypatch):
    def wrong(self, i, copies):  # the earlier tokens' keys dropped: attention sees the suffix only
        args, kwargs = PrefixReplay.layer_call(self.owner.prefix, i, copies)
        return args, kwargs

    monkeypatch.setattr(suffix.Suffix, "layer_call", wrong)
    sweep = splice.Sweep(sites="blocks.*.resid_pre", interventions=splice.Zero(), over="pos", metrics=METRICS)
    with pytest.warns(SuffixFallbackWarning, match="does not reproduce the model's logits"):
        fast = sweep.run(gpt2, PADDED, batch_size=3, progress=False)
    reference = sweep.run(gpt2, PADDED, batch_size=3, prefix_reuse=False, progress=False)
    torch.testing.assert_close(_values(fast), _values(reference), rtol=1e-5, atol=1e-5)
    assert gpt2.hook_count == 0


def test_a_model_without_a_cache_argument_falls_back(gpt2, monkeypatch):
    monkeypatch.setattr(suffix, "cache_keyword", lambda hf: None)
    batch = batches_of(gpt2, EVEN, 3)[0]
    sweep = splice.Sweep(sites="blocks.0.resid_pre", interventions=splice.Zero(), over="pos", metrics=METRICS)
    runner = ShardRunner(gpt2, METRICS, sweep.variants(gpt2, 5), [batch], 1)
    with pytest.warns(SuffixFallbackWarning, match="takes no KV cache"):
        runner.enter(0)
    assert runner.suffixes is None and "takes no KV cache" in (runner.fallback or "")


def test_a_failure_inside_the_probe_leaves_no_stub_and_no_hook(gpt2):
    """A forward raising while the layers are stubbed: the check fails (fallback), every layer
    gets its own forward back, and nothing of splice stays installed."""
    layers = _layers(gpt2)

    def fail_when_stubbed(module, args):
        if "forward" in layers[0].__dict__:
            raise RuntimeError("boom")

    norm = gpt2.layout.module(splice.engine.sites.Site("final_norm"))
    handle = norm.register_forward_pre_hook(fail_when_stubbed)
    try:
        prefix = PrefixReplay(gpt2, batches_of(gpt2, PADDED, 3)[0].kwargs, tail=1)
        replays = SuffixReplays(prefix)
    finally:
        handle.remove()
    assert replays.reason is not None and "boom" in replays.reason
    assert all("forward" not in layer.__dict__ for layer in layers)
    assert gpt2.hook_count == 0


def test_no_hook_is_left_after_a_failing_metric(gpt2):
    calls = []

    def failing(logits, baseline, batch):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("metric failed")
        return logits[:, -1, 0]

    metric = metrics.Metric("failing", failing, 1, ("failing",))
    sweep = splice.Sweep(
        sites="blocks.*.resid_pre", interventions=splice.Zero(), over="pos", metrics=[metric]
    )
    with pytest.raises(RuntimeError, match="metric failed"):
        sweep.run(gpt2, PADDED, batch_size=3, progress=False)
    assert gpt2.hook_count == 0


def test_checkpoints_resume_on_the_suffix_path(gpt2, tmp_path):
    path = tmp_path / "sweep.jsonl"
    sweep = splice.Sweep(sites="blocks.*.resid_pre", interventions=splice.Zero(), over="pos", metrics=METRICS)
    whole = sweep.run(gpt2, PADDED, batch_size=2, checkpoint=path, progress=False)
    lines = path.read_text().splitlines()
    path.write_text("\n".join(lines[: len(lines) // 2]) + "\n")
    resumed = sweep.run(gpt2, PADDED, batch_size=2, checkpoint=path, progress=False)
    torch.testing.assert_close(_values(resumed), _values(whole), rtol=1e-5, atol=1e-6)


def test_position_sweeps_through_an_attached_sae(gpt2):
    from test_sae_attach import make_sae

    sae = make_sae(gpt2.dims.d_model, "topk", seed=3)
    sweep = splice.Sweep(
        sites="blocks.1.resid_post.sae.acts",
        interventions=splice.Zero(),
        over=("features", "pos"),
        features=[0, 3],
        sae=sae,
        metrics=METRICS,
    )
    fast = sweep.run(gpt2, PADDED, batch_size=3, progress=False)
    reference = sweep.run(gpt2, PADDED, batch_size=3, prefix_reuse=False, progress=False)
    torch.testing.assert_close(_values(fast), _values(reference), rtol=1e-5, atol=1e-5)
    assert gpt2.hook_count == 0


def test_bad_prefix_reuse_and_suffix_starts_are_refused(gpt2):
    sweep = splice.Sweep(sites="blocks.0.resid_pre", interventions=splice.Zero(), over="pos", metrics=METRICS)
    with pytest.raises(splice.SpliceError, match="prefix_reuse= takes True, 'layers' or False; got 'tokens'"):
        sweep.run(gpt2, EVEN, prefix_reuse="tokens", progress=False)
    prefix = PrefixReplay(gpt2, batches_of(gpt2, EVEN, 3)[0].kwargs, tail=1)
    with pytest.raises(splice.SpliceError, match="starts at token 1..4 of this batch; got 5"):
        SuffixReplays(prefix).window(5)


def test_other_threads_compute_the_real_model_while_a_suffix_sweep_probes(gpt2):
    """A sweep's probes stub the layers out in its own context only: a second thread running
    plain forwards of the same model all the while gets the model's own logits every time, and
    the sweep's table is the one it gets alone."""
    import threading

    ids = torch.tensor([[3, 4, 5, 6, 7, 8, 9, 10]])
    with torch.no_grad():
        expected = gpt2.hf(ids).logits
    alone = patching.patch_sweep(gpt2, EVEN, metrics=METRICS, batch_size=3, progress=False)
    done = threading.Event()
    results: list[bool] = []

    def forwards():
        with torch.no_grad():
            while not done.is_set():
                results.append(torch.equal(gpt2.hf(ids).logits, expected))

    other = threading.Thread(target=forwards)
    other.start()
    try:
        tables = [
            patching.patch_sweep(gpt2, EVEN, metrics=METRICS, batch_size=1, progress=False) for _ in range(3)
        ]
    finally:
        done.set()
        other.join()
    assert len(results) > 10 and all(results), f"{results.count(False)} of {len(results)} forwards were wrong"
    for table in tables:
        torch.testing.assert_close(_values(table), _values(alone), rtol=1e-6, atol=1e-6)
    assert all("forward" not in layer.__dict__ for layer in _layers(gpt2))
    assert gpt2.hook_count == 0
