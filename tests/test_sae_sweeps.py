"""Sweeps over SAE latents (`Sweep(over="features")`), feature patching and attribution through an
attached SAE: batched == one latent at a time == a plain forward with the edit, `top:N` against
the latents' own totals, checkpoints tied to the SAE's weights, and attribution gradients against
a hand-computed chain rule."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer, build
from test_sae_attach import make_sae

import splice
from splice import SpliceError, Sweep, Zero, metrics, patching

SITE = "blocks.1.resid_post"
ACTS = SITE + ".sae.acts"
DATA = [{"prompt": p, "correct": "a", "wrong": "c"} for p in ["abcdefg", "bcd", "cdefgh", "defghij", "efghi"]]
METRICS = [metrics.logit_diff(), metrics.kl_from_baseline()]


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tm(request):
    return splice.Model(build(request.param), CharTokenizer())


def test_feature_sweep_batched_equals_one_at_a_time_and_a_plain_forward(tm):
    sae = make_sae(tm.dims.d_model, "topk", seed=3)
    sweep = Sweep(
        sites=ACTS, interventions=Zero(), over="features", features="top:6", metrics=METRICS, sae=sae
    )
    batched = sweep.run(tm, DATA, batch_size=2, max_rows=7, progress=False)
    sequential = sweep.run(tm, DATA, batch_size=2, prefix_reuse=False, progress=False)
    assert list(batched.columns[:6]) == ["variant", "site", "layer", "head", "pos", "feature"]
    torch.testing.assert_close(
        torch.tensor(batched.value.to_numpy()),
        torch.tensor(sequential.value.to_numpy()),
        rtol=1e-5,
        atol=1e-5,
    )
    # Independent of the sweep: each latent zeroed in a plain forward under the attached SAE.
    a, c = tm.to_single_token("a"), tm.to_single_token("c")
    diffs = batched[batched.metric == "logit_diff"]
    features = [int(k) for k in diffs.feature.dropna()]
    assert len(features) == 6
    for k in features:
        with torch.no_grad(), tm.attach(sae, SITE):
            logits, _ = tm.run([d["prompt"] for d in DATA], edits={ACTS: Zero(dims=k)})
        expected = float((logits[:, -1, a] - logits[:, -1, c]).mean())
        assert diffs[diffs.feature == k].value.item() == pytest.approx(expected, abs=1e-5)
    # The baseline is the bare model's: the attached SAE with no edit changes nothing.
    with torch.no_grad():
        logits = tm([d["prompt"] for d in DATA])
    base = float((logits[:, -1, a] - logits[:, -1, c]).mean())
    assert diffs.baseline.iloc[0] == pytest.approx(base, abs=1e-6)
    assert tm.hook_count == 0


def test_top_n_is_the_most_active_latents_on_the_data(tm):
    sae = make_sae(tm.dims.d_model, seed=4)
    sweep = Sweep(sites=ACTS, interventions=Zero(), over="features", features="top:5", metrics=METRICS)
    with tm.attach(sae, SITE):
        table = sweep.run(tm, DATA, batch_size=5, progress=False)
        with tm.record(ACTS, mode="accumulate") as rec:  # one prompt at a time: no padding at all
            for d in DATA:
                tm(d["prompt"])
    totals = sum(acts.sum((0, 1)) for acts in rec[ACTS])  # accumulate mode: one tensor per forward
    expected = torch.topk(totals, 5).indices.tolist()
    got = table[table.metric == "logit_diff"].feature.dropna().astype(int).tolist()
    assert got == expected
    # Every latent (features=None) and an explicit list.
    assert (
        len(
            Sweep(sites=ACTS, interventions=Zero(), over="features", metrics=METRICS, sae=sae).variants(tm, 3)
        )
        == 48
    )
    listed = Sweep(
        sites=ACTS, interventions=Zero(), over="features", features=[7, 2], metrics=METRICS, sae=sae
    )
    assert [v.feature for v in listed.variants(tm, 3)] == [7, 2]


def test_feature_sweep_refusals(tm):
    sae = make_sae(tm.dims.d_model)
    with pytest.raises(SpliceError, match="features= takes a list of latent indices"):
        Sweep(sites=ACTS, interventions=Zero(), over="features", features="top", metrics=METRICS)
    with pytest.raises(SpliceError, match="features= and sae= go with over='features'"):
        Sweep(sites=ACTS, interventions=Zero(), features=[1], metrics=METRICS)
    with pytest.raises(SpliceError, match="none is attached: pass sae= to the Sweep"):
        Sweep(sites=ACTS, interventions=Zero(), over="features", features=[1], metrics=METRICS).run(
            tm, DATA, progress=False
        )
    with pytest.raises(
        SpliceError, match=r"sweep a '<site>.sae.acts' sub-site; got \['blocks.1.resid_post'\]"
    ):
        Sweep(sites=SITE, interventions=Zero(), over="features", features=[1], metrics=METRICS, sae=sae).run(
            tm, DATA, progress=False
        )
    with pytest.raises(SpliceError, match="names latent 48; the SAE at .* has 48"):
        Sweep(sites=ACTS, interventions=Zero(), over="features", features=[48], metrics=METRICS, sae=sae).run(
            tm, DATA, progress=False
        )
    with pytest.raises(SpliceError, match="already sets dims="):
        Sweep(sites=ACTS, interventions=Zero(dims=1), over="features", metrics=METRICS, sae=sae).variants(
            tm, 3
        )
    assert tm.hook_count == 0


def test_feature_checkpoint_resumes_and_refuses_another_sae(tm, tmp_path):
    sae = make_sae(tm.dims.d_model, seed=5)
    path = tmp_path / "features.jsonl"
    sweep = Sweep(
        sites=ACTS, interventions=Zero(), over="features", features=[0, 1, 2, 3], metrics=METRICS, sae=sae
    )
    first = sweep.run(tm, DATA, batch_size=5, checkpoint=path, progress=False)
    again = sweep.run(tm, DATA, batch_size=5, checkpoint=path, progress=False)  # all from the file
    assert first.equals(again)
    other = Sweep(
        sites=ACTS,
        interventions=Zero(),
        over="features",
        features=[0, 1, 2, 3],
        metrics=METRICS,
        sae=make_sae(tm.dims.d_model, seed=6),
    )
    with pytest.raises(SpliceError, match="different"):
        other.run(tm, DATA, batch_size=5, checkpoint=path, progress=False)


def test_feature_patching_and_attribution_match_the_chain_rule(tm):
    sae = make_sae(tm.dims.d_model, seed=7)
    data = [{"prompt": "abcdef", "clean": "fedcba", "correct": "a", "wrong": "c"}]
    metric = metrics.logit_diff()
    with tm.attach(sae, SITE):
        exact = patching.patch_sweep(
            tm, data, ACTS, over="features", features=[0, 5, 9], metrics=metric, progress=False
        )
        approx = patching.attribution(tm, data, ACTS, over="features", features=[0, 5, 9], metrics=metric)
        with tm.record(ACTS) as rec:
            tm("fedcba")
        clean_acts = rec[ACTS]
        probe = torch.zeros(1, 6, tm.dims.d_model, requires_grad=True)
        with torch.enable_grad(), tm.edit({SITE: splice.Add(probe)}), tm.record(ACTS) as corrupt:
            logits = tm("abcdef")
            a, c = tm.to_single_token("a"), tm.to_single_token("c")
            (grad_site,) = torch.autograd.grad(logits[0, -1, a] - logits[0, -1, c], [probe])
    grad_latents = grad_site @ sae.W_dec.detach().T  # chain rule through decode, by hand
    for k in (0, 5, 9):
        row = approx[approx.feature == k].iloc[0]
        by_hand = float(((clean_acts - corrupt[ACTS]) * grad_latents)[..., k].sum())
        assert row.effect == pytest.approx(by_hand, abs=1e-4)
    assert set(exact.feature.dropna()) == {0, 5, 9}
    assert "source" in exact.columns


def test_effect_bars_draws_the_largest_effects(tm, tmp_path):
    sae = make_sae(tm.dims.d_model, seed=8)
    table = Sweep(
        sites=ACTS, interventions=Zero(), over="features", features="top:4", metrics=METRICS, sae=sae
    ).run(tm, DATA, batch_size=5, progress=False)
    path = splice.plot.effect_bars(table, tmp_path / "bars.png", top=3)
    assert path.stat().st_size > 1000
    with pytest.raises(SpliceError, match="no rows for metric 'nope'"):
        splice.plot.effect_bars(table, tmp_path / "x.png", metric="nope")


def test_feature_sweep_reuses_the_layers_before_the_sae():
    hf = build("llama")
    m = splice.Model(hf, CharTokenizer())
    sae = make_sae(m.dims.d_model, seed=9)
    layers = hf.model.layers
    calls = [0] * len(layers)
    handles = [
        layer.register_forward_pre_hook(lambda mod, args, i=i: calls.__setitem__(i, calls[i] + 1))
        for i, layer in enumerate(layers)
    ]
    try:
        sweep = Sweep(
            sites=ACTS,
            interventions=Zero(),
            over="features",
            features=list(range(8)),
            metrics=METRICS,
            sae=sae,
        )
        sweep.run(m, DATA, batch_size=5, max_rows=20, progress=False)
    finally:
        for handle in handles:
            handle.remove()
    # One prompt batch: layer 0 runs once (the unedited trace); the SAE's layer 1 runs in the trace,
    # in the replay check (which replays this 3-layer model's last two layers) and for the variants
    # (twice: 8 variants x 5 rows in blocks of 20 rows). Layer 0 is never recomputed.
    assert len(layers) == 3
    assert calls[0] == 1
    assert calls[1] == 1 + 1 + 2
