"""Patch, Mean and Resample: parity with hand-written hooks that record the source run and write
it back by hand, identities, alignment rules, errors and round trips."""

import pytest
import torch
from conftest import VOCAB
from handhooks import hand_and_splice, hand_record

import splice
from splice import Mean, Patch, Resample
from splice.engine.interventions import Intervention
from splice.patching import mean_reference

SITES = ["blocks.1.resid_pre", "blocks.0.attn.z", "blocks.1.mlp.post", "blocks.1.resid_post"]


def _ids(rows, seq, seed):
    return torch.randint(1, VOCAB, (rows, seq), generator=torch.Generator().manual_seed(seed))


def _write(index, values):
    def edit(t):
        t[index] = values[index] if values.shape == t.shape else values
        return t

    return edit


@pytest.mark.parametrize("site", SITES)
def test_patch_matches_a_hand_written_patch(model, hf, family, ids, site):
    source = hand_record(hf, family, site, _ids(2, 9, 5))
    heads = {"heads": 1} if site.endswith("attn.z") else {}
    head_index = (1,) if heads else ()
    cases = [
        (Patch({site: source}), _write((slice(None),), source)),
        (Patch({site: source}, pos=[2, 6], **heads), _write((slice(None), [2, 6]) + head_index, source)),
        (Patch(source, pos=-1, rows=1), _write((slice(1, 2), -1), source)),
    ]
    with torch.no_grad():
        for intervention, hand in cases:
            expected, got = hand_and_splice(model, hf, family, site, intervention, hand, ids)
            assert torch.equal(got, expected), (
                f"{site} {intervention!r}: max diff {(got - expected).abs().max():.3g}"
            )


def test_patch_between_prompts_of_different_lengths_needs_source_pos(model, hf, family, ids):
    site = "blocks.1.resid_post"
    longer = hand_record(hf, family, site, _ids(2, 12, 6))
    with pytest.raises(splice.SpliceError, match=r"12 positions but this forward has 9.*source_pos="):
        with torch.no_grad(), model.edit({site: Patch({site: longer}, pos=3)}):
            hf(ids)
    with pytest.raises(splice.SpliceError, match=r"pos= selects 2 position\(s\) but source_pos= selects 1"):
        with torch.no_grad(), model.edit({site: Patch({site: longer}, pos=[3, 4], source_pos=10)}):
            hf(ids)
    assert model.hook_count == 0

    def hand(t):
        t[:, [3, 8]] = longer[:, [10, 11]]
        return t

    with torch.no_grad():
        expected, got = hand_and_splice(
            model, hf, family, site, Patch({site: longer}, pos=[3, -1], source_pos=[10, 11]), hand, ids
        )
    assert torch.equal(got, expected)


def test_patching_a_run_with_itself_is_bit_identical(model, hf, ids):
    with torch.no_grad():
        clean = hf(ids).logits
        _, recording = model.run(ids, record="blocks.*.resid_pre")
        with model.edit({"blocks.*.resid_pre": Patch(recording)}):
            assert torch.equal(hf(ids).logits, clean)


def test_patch_errors_name_the_problem(model, hf, ids):
    site = "blocks.1.resid_post"
    _, recording = model.run(_ids(3, 9, 2), record=site)
    with pytest.raises(splice.SpliceError, match=r"3 rows but the batch has 2"):
        with torch.no_grad(), model.edit({site: Patch(recording)}):
            hf(ids)
    with pytest.raises(
        splice.SpliceError, match=r"no activations for blocks.0.mlp.out; its source holds blocks.1.resid_post"
    ):
        with torch.no_grad(), model.edit({"blocks.0.mlp.out": Patch(recording)}):
            hf(ids)
    with pytest.raises(splice.SpliceError, match=r"names a data field; it only has values inside a sweep"):
        with torch.no_grad(), model.edit({site: Patch("clean")}):
            hf(ids)
    with pytest.raises(
        splice.SpliceError,
        match=r"source for blocks.1.resid_post has shape \[2, 9, 3\]; the site is \[batch=2, pos=9, d_model=",
    ):
        with torch.no_grad(), model.edit({site: Patch(torch.zeros(2, 9, 3))}):
            hf(ids)
    with pytest.raises(splice.SpliceError, match="Patch needs a source"):
        Patch()
    assert model.hook_count == 0


def test_mean_ablation_matches_a_hand_computed_mean(model, hf, family, ids):
    site = "blocks.1.mlp.out"
    references = [_ids(3, 9, 11), _ids(2, 7, 12)]
    with torch.no_grad(), model.record(site, mode="accumulate") as recording:
        for r in references:
            hf(r)
    by_hand = (
        torch.cat([hand_record(hf, family, site, r).reshape(-1, model.dims.d_model) for r in references])
        .double()
        .mean(0)
        .float()
    )
    with torch.no_grad():
        expected, got = hand_and_splice(
            model,
            hf,
            family,
            site,
            Mean(recording, pos=slice(2, 5)),
            _write((slice(None), slice(2, 5)), by_hand),
            ids,
        )
    torch.testing.assert_close(got, expected, rtol=1e-5, atol=1e-6)  # float64 means summed in another order


def test_mean_per_position_with_the_prompt_itself_is_bit_identical(model, hf, ids):
    one = ids[:1]
    with torch.no_grad():
        clean = hf(one).logits
        _, recording = model.run(one, record=["blocks.0.attn.z", "blocks.1.mlp.in"], mode="accumulate")
        with model.edit(
            {
                "blocks.0.attn.z": Mean(recording, per_position=True, heads=0),
                "blocks.1.mlp.in": Mean(recording, per_position=True),
            }
        ):
            assert torch.equal(hf(one).logits, clean)


def test_mean_reference_leaves_padding_out(model):
    prompts = [list(range(1, 8)), list(range(3, 7)), list(range(5, 14))]
    site = "blocks.1.resid_post"
    means = mean_reference(model, [{"input_ids": p} for p in prompts], site, batch_size=2)
    with torch.no_grad():
        rows = [model.run(torch.tensor([p]), record=site)[1][site][0] for p in prompts]
    expected = torch.cat(rows).double().mean(0)
    torch.testing.assert_close(means[site].double().reshape(-1), expected, rtol=1e-5, atol=1e-6)


def test_resample_draws_reproducibly_from_reference_rows(model, hf, family, ids):
    site = "blocks.1.resid_pre"
    reference = hand_record(hf, family, site, _ids(6, 9, 21))
    draws = torch.randint(6, (2,), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        expected, got = hand_and_splice(
            model,
            hf,
            family,
            site,
            Resample({site: reference}, seed=3),
            _write((slice(None),), reference[draws]),
            ids,
        )
        assert torch.equal(got, expected)
        with model.edit({site: Resample({site: reference}, seed=3)}):
            again = hf(ids).logits
        with model.edit({site: Resample({site: reference}, seed=4)}):
            other = hf(ids).logits
    assert torch.equal(again, got) and not torch.equal(other, got)


@pytest.mark.parametrize(
    "make",
    [
        lambda t: Patch({"blocks.1.resid_post": t}, pos=[1, 2], source_pos=(3, 4)),
        lambda t: Patch("clean", heads=2),
        lambda t: Mean({"blocks.1.resid_post": t}, per_position=True),
        lambda t: Mean(t),
        lambda t: Resample({"blocks.1.resid_post": t}, seed=9, pos=-1),
    ],
    ids=["patch", "patch-field", "mean-per-pos", "mean-tensor", "resample"],
)
def test_round_trip_through_dict(make):
    intervention = make(torch.randn(2, 5, 4))
    again = Intervention.from_dict(intervention.to_dict())
    assert again == intervention and repr(again) == repr(intervention)
