"""Patching sweeps and attribution patching: batched equals one-at-a-time, both equal patching
and gradients done by hand with plain hooks, and attribution tracks the exact sweep."""

import pytest
import torch
from conftest import CharTokenizer, build
from handhooks import hand_record, register

import splice
from splice import Mean, Resample, metrics
from splice.patching import attribution, patch_sweep, rank_correlation

PAIRS = [("abcdefg", "abcxefg"), ("bcdefgh", "bcdyfgh"), ("cdefg", "cdzfg"), ("defghij", "dxfghij")]
DATA = [{"prompt": corrupt, "clean": clean, "correct": "h", "wrong": "b"} for clean, corrupt in PAIRS]
EVEN = DATA[:2] + DATA[3:]  # one length: no padding, for by-hand references
METRIC = metrics.logit_diff()


@pytest.fixture
def tmodel(family):
    return splice.Model(build(family), CharTokenizer())


def _close(a, b):
    torch.testing.assert_close(
        torch.tensor(a.to_numpy(dtype=float)),
        torch.tensor(b.to_numpy(dtype=float)),
        rtol=1e-5,
        atol=1e-5,
        equal_nan=True,
    )


@pytest.mark.parametrize("sites,over", [("blocks.*.resid_pre", "pos"), ("blocks.*.attn.z", "heads")])
def test_patching_sweep_batched_equals_one_variant_at_a_time(tmodel, sites, over):
    batched = patch_sweep(tmodel, DATA, sites, over, [METRIC], batch_size=3, max_rows=7, progress=False)
    sequential = patch_sweep(
        tmodel, DATA, sites, over, [METRIC], batch_size=3, prefix_reuse=False, progress=False
    )
    _close(batched.value, sequential.value)
    _close(batched.baseline, sequential.baseline)
    _close(batched.source, sequential.source)
    _close(batched.normalised, (batched.value - batched.baseline) / (batched.source - batched.baseline))
    assert tmodel.hook_count == 0


def test_mean_and_resample_in_a_sweep_equal_one_variant_at_a_time(tmodel):
    _, reference = tmodel.run(["qrstuvw", "rstuvwx", "stuvwxy"], record="blocks.*.mlp.out")
    sweep = splice.Sweep(
        sites="blocks.*.mlp.out",
        interventions=[Mean(reference, pos=slice(1, None)), Resample(reference, seed=5)],
        metrics=[METRIC],
    )
    batched = sweep.run(tmodel, EVEN, batch_size=3, max_rows=7, progress=False)
    sequential = sweep.run(tmodel, EVEN, batch_size=3, prefix_reuse=False, progress=False)
    _close(batched.value, sequential.value)


def _ids(model, field):
    return torch.stack([model.to_tokens(d[field])[0] for d in EVEN])


def _logit_diff(logits, model):
    a, b = model.to_single_token("h"), model.to_single_token("b")
    return logits[:, -1, a] - logits[:, -1, b]


def test_patching_table_matches_hand_written_patching(tmodel, family):
    hf = tmodel.hf
    table = patch_sweep(tmodel, EVEN, "blocks.*.resid_pre", "pos", [METRIC], progress=False)
    clean_ids, corrupt_ids = _ids(tmodel, "clean"), _ids(tmodel, "prompt")
    with torch.no_grad():
        clean_value = float(_logit_diff(hf(clean_ids).logits, tmodel).mean())
        corrupt_value = float(_logit_diff(hf(corrupt_ids).logits, tmodel).mean())
    for layer, pos in [(0, 3), (1, 3), (tmodel.dims.n_layers - 1, 6), (1, 0)]:
        site = f"blocks.{layer}.resid_pre"
        clean_site = hand_record(hf, family, site, clean_ids)

        def patch(t):
            t[:, pos] = clean_site[:, pos]
            return t

        handle = register(hf, family, site, patch)
        with torch.no_grad():
            patched = float(_logit_diff(hf(corrupt_ids).logits, tmodel).mean())
        handle.remove()
        row = table[(table.layer == layer) & (table.pos == pos)].iloc[0]
        assert row.value == pytest.approx(patched, abs=1e-5)
        assert row.baseline == pytest.approx(corrupt_value, abs=1e-5) and row.source == pytest.approx(
            clean_value, abs=1e-5
        )
        span = clean_value - corrupt_value  # value errors of 1e-5 become 1e-5 / |span| after normalising
        assert row.normalised == pytest.approx((patched - corrupt_value) / span, abs=3e-5 / abs(span))


def test_attribution_equals_gradients_taken_by_hand(family):
    tmodel = splice.Model(build(family), CharTokenizer())
    hf = tmodel.hf
    table = attribution(tmodel, EVEN, "blocks.*.resid_pre", "pos", [METRIC])
    clean_ids, corrupt_ids = _ids(tmodel, "clean"), _ids(tmodel, "prompt")
    for layer in (0, tmodel.dims.n_layers - 1):
        site = f"blocks.{layer}.resid_pre"
        clean_site = hand_record(hf, family, site, clean_ids)
        grabbed = []

        def leaf(t):
            t = t.detach().requires_grad_(True)
            grabbed.append(t)
            return t

        handle = register(hf, family, site, leaf)
        value = _logit_diff(hf(corrupt_ids).logits, tmodel)
        handle.remove()
        (grad,) = torch.autograd.grad(value.sum(), grabbed)
        estimate = ((clean_site - grabbed[0].detach()) * grad).sum(-1)  # [prompts, pos]
        for pos in range(corrupt_ids.shape[1]):
            row = table[(table.layer == layer) & (table.pos == pos)].iloc[0]
            assert row.effect == pytest.approx(float(estimate[:, pos].mean()), abs=1e-5)
    assert all(p.grad is None for p in hf.parameters()), "attribution must not touch parameter gradients"
    assert tmodel.hook_count == 0


def test_attribution_has_the_exact_tables_layout_and_tracks_it(capsys):
    tmodel = splice.Model(build("gpt2"), CharTokenizer())
    for sites, over in [("blocks.*.resid_pre", "pos"), ("blocks.*.attn.z", "heads")]:
        exact = patch_sweep(tmodel, DATA, sites, over, [METRIC], progress=False)
        approx = attribution(tmodel, DATA, sites, over, [METRIC])
        assert list(approx.columns) == list(exact.columns)
        assert approx[["variant", "site", "layer", "head", "pos", "metric"]].equals(
            exact[["variant", "site", "layer", "head", "pos", "metric"]]
        )
        _close(approx.baseline, exact.baseline)
        _close(approx.source, exact.source)
        rho = rank_correlation(exact, approx)
        print(f"{sites} over {over}: Spearman rank correlation attribution vs exact = {rho:.3f}")
        assert -1 <= rho <= 1  # reported, not asserted: attribution is an approximation


def test_patch_field_sweep_refuses_missing_source_field(tmodel):
    with pytest.raises(splice.SpliceError, match="data field 'clean'"):
        patch_sweep(
            tmodel,
            [{"prompt": "abc", "correct": "h", "wrong": "b"}],
            "blocks.0.resid_pre",
            "pos",
            [METRIC],
            progress=False,
        )
    assert tmodel.hook_count == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])  # a GQA family and a learned-position one
def test_integrated_gradients_equal_a_hand_written_path_average(family):
    tmodel = splice.Model(build(family), CharTokenizer())
    hf = tmodel.hf
    steps = 4
    table = attribution(tmodel, EVEN, "blocks.1.resid_pre", "pos", [METRIC], steps=steps)
    chunked = attribution(tmodel, EVEN, "blocks.1.resid_pre", "pos", [METRIC], steps=steps, max_rows=3)
    assert (table.effect - chunked.effect).abs().max() <= 1e-6  # one step per forward == all at once
    clean_ids, corrupt_ids = _ids(tmodel, "clean"), _ids(tmodel, "prompt")
    site = "blocks.1.resid_pre"
    clean_embed, corrupt_embed = (hand_record(hf, family, "embed", ids) for ids in (clean_ids, corrupt_ids))
    clean_site, corrupt_site = (hand_record(hf, family, site, ids) for ids in (clean_ids, corrupt_ids))
    total = torch.zeros_like(corrupt_site)
    for i in range(steps):  # alpha = 0, 1/4, 2/4, 3/4: a hand-written hook at each point of the path
        alpha = i / steps
        grabbed = []

        def leaf(t):
            t = t.detach().requires_grad_(True)
            grabbed.append(t)
            return t

        handles = [
            register(
                hf, family, "embed", lambda t, a=alpha: corrupt_embed + a * (clean_embed - corrupt_embed)
            ),
            register(hf, family, site, leaf),
        ]
        try:
            value = _logit_diff(hf(corrupt_ids).logits, tmodel)
        finally:
            for handle in handles:
                handle.remove()
        (grad,) = torch.autograd.grad(value.sum(), grabbed)
        total += grad
    estimate = ((clean_site - corrupt_site) * total / steps).sum(-1)
    for pos in range(corrupt_ids.shape[1]):
        row = table[table.pos == pos].iloc[0]
        assert row.effect == pytest.approx(float(estimate[:, pos].mean()), abs=1e-5)
    assert "integrated gradients in 4 steps along inputs" in table.intervention.iloc[1]
    assert all(p.grad is None for p in hf.parameters())
    assert tmodel.hook_count == 0


def test_integrated_gradients_at_the_embedding_approach_the_exact_effect():
    """Completeness: along the whole path, IG's estimate of patching the embedding converges to the
    exact effect, which the one-step estimate misses."""
    tmodel = splice.Model(build("llama"), CharTokenizer())
    exact = patch_sweep(tmodel, EVEN, "embed", None, [METRIC], progress=False)
    plain = attribution(tmodel, EVEN, "embed", None, [METRIC])
    integrated = attribution(tmodel, EVEN, "embed", None, [METRIC], steps=64)
    effect = lambda t: float(t[t.variant == 0].effect.iloc[0])  # noqa: E731
    assert abs(effect(integrated) - effect(exact)) <= 0.05 * abs(effect(exact))
    assert abs(effect(integrated) - effect(exact)) < abs(effect(plain) - effect(exact))
    # Along each site's own path the estimate of patching a whole site converges to its exact
    # effect too, site by site (here two layers' residual streams in one call).
    sites = ["blocks.1.resid_pre", "blocks.2.resid_pre"]
    exact = patch_sweep(tmodel, EVEN, sites, None, [METRIC], progress=False)
    per_site = attribution(tmodel, EVEN, sites, None, [METRIC], steps=64, path="sites")
    for v in (0, 1):
        want = float(exact[exact.variant == v].effect.iloc[0])
        assert abs(float(per_site[per_site.variant == v].effect.iloc[0]) - want) <= 0.05 * abs(want)
    with pytest.raises(splice.SpliceError, match="steps must be a positive int"):
        attribution(tmodel, EVEN, "embed", None, [METRIC], steps=0)
    with pytest.raises(splice.SpliceError, match="path= takes 'inputs'"):
        attribution(tmodel, EVEN, "embed", None, [METRIC], steps=2, path="edges")
