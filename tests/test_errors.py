"""Bad input gets a SpliceError that says what was wrong and what was expected; the model is untouched."""

import pytest
import torch
from conftest import hook_total

import splice


def _clean_after(model, hf, ids, fn):
    before, clean = hook_total(hf), hf(ids).logits.detach()
    fn()
    assert hook_total(hf) == before and model.hook_count == 0
    assert torch.equal(hf(ids).logits, clean)


def _raises(model, hf, ids, edits, match):
    def run():
        with pytest.raises(splice.SpliceError, match=match):
            with model.edit(edits):
                hf(ids)

    _clean_after(model, hf, ids, run)


def test_unknown_site_lists_close_matches(model, hf, ids):
    _raises(
        model,
        hf,
        ids,
        {"blocks.1.attn.zz": splice.Zero()},
        r"unknown site 'blocks.1.attn.zz'.*did you mean.*'blocks.1.attn.z'",
    )
    _raises(model, hf, ids, {"blocks.1.resid_psot": splice.Zero()}, r"blocks.1.resid_post")
    _raises(model, hf, ids, {"blocks.*.nope": splice.Zero()}, r"matches no site")


def test_layer_out_of_range_names_valid_range(model, hf, ids):
    _raises(model, hf, ids, {"blocks.7.resid_post": splice.Zero()}, r"layer 7 .* 3 layers, valid 0\.\.2")


def test_an_alias_never_names_a_different_tensor(model):
    # TransformerLens' "result" is z @ W_O per head: splice's attn.result, never attn.z.
    assert (
        model.resolve(("result", 1)) == model.resolve("blocks.1.attn.hook_result") == ["blocks.1.attn.result"]
    )
    with pytest.raises(splice.SpliceError):
        model.resolve("blocks.1.ln1.hook_normalized")  # a TL tensor that differs from splice's
    assert model.resolve(("z", 1)) == model.resolve("blocks.1.attn.hook_z") == ["blocks.1.attn.z"]


def test_negative_layer_counts_from_the_end(model):
    assert model.resolve("blocks.-1.resid_post") == ["blocks.2.resid_post"]


def test_head_out_of_range(model, hf, ids):
    n = model.dims.n_heads
    _raises(
        model,
        hf,
        ids,
        {"blocks.0.attn.z": splice.Zero(heads=n)},
        rf"head {n} is out of range.*valid 0\.\.{n - 1}",
    )
    kv = model.dims.n_kv_heads
    _raises(
        model,
        hf,
        ids,
        {"blocks.0.attn.k": splice.Zero(heads=[0, kv])},
        rf"head \[{kv}\] out of range.*valid 0\.\.{kv - 1}",
    )
    _raises(model, hf, ids, {"blocks.0.resid_post": splice.Zero(heads=0)}, r"no head axis")


def test_dim_out_of_range(model, hf, ids):
    d = model.dims.d_model
    _raises(
        model,
        hf,
        ids,
        {"blocks.0.resid_post": splice.Zero(dims=d)},
        rf"dim {d} is out of range.*valid 0\.\.{d - 1}",
    )


def test_position_out_of_range(model, hf, ids):
    _raises(
        model,
        hf,
        ids,
        {"blocks.0.resid_post": splice.Zero(pos=9)},
        r"pos 9 is out of range.*9 tokens, valid 0\.\.8",
    )
    _raises(model, hf, ids, {"blocks.0.resid_post": splice.Zero(pos=[1, -10])}, r"pos -10 is out of range")


def test_bad_shapes_name_both_shapes(model, hf, ids):
    d = model.dims.d_model
    # Static: caught when the context is entered, before any forward.
    _raises(
        model,
        hf,
        ids,
        {"blocks.0.resid_post": splice.Add(torch.ones(d + 1))},
        rf"shape \[{d + 1}\] cannot broadcast.*blocks.0.resid_post",
    )
    _raises(
        model,
        hf,
        ids,
        {"blocks.0.attn.z": splice.Replace(torch.ones(3, model.dims.d_head), heads=[0, 1])},
        r"shape \[3, \d+\] cannot broadcast.*trailing shape \[2, \d+\]",
    )
    # Dynamic: the batch/pos part only shows up in the forward.
    _raises(
        model,
        hf,
        ids,
        {"blocks.0.resid_post": splice.Replace(torch.ones(3, 9, d))},
        rf"shape \[3, 9, {d}\] cannot broadcast.*\[2, 9, {d}\]",
    )


def test_bad_dtype(model, hf, ids):
    _raises(
        model,
        hf,
        ids,
        {"blocks.0.resid_post": splice.Replace(torch.ones(model.dims.d_model, dtype=torch.long))},
        r"dtype torch.int64.*floating",
    )


def test_bad_values_at_construction():
    with pytest.raises(splice.SpliceError, match="heads must be"):
        splice.Zero(heads="0")
    with pytest.raises(splice.SpliceError, match="empty list"):
        splice.Zero(pos=[])
    with pytest.raises(splice.SpliceError, match=r"\[batch, pos\] bool"):
        splice.Zero(pos=torch.ones(3, dtype=torch.bool))
    with pytest.raises(splice.SpliceError, match="must be an Intervention"):
        splice.Edits({"blocks.0.resid_post": "zero"})
    with pytest.raises(splice.SpliceError, match=r"tuple site must be \(name, layer\)"):
        splice.Edits({("z",): splice.Zero()})


def test_unsupported_model_names_class_and_docs():
    from transformers import BertConfig, BertModel

    with pytest.raises(splice.SpliceError, match=r"BertModel \(model_type 'bert'\).*Adding an architecture"):
        splice.Model(
            BertModel(
                BertConfig(num_hidden_layers=1, hidden_size=16, num_attention_heads=2, intermediate_size=16)
            )
        )


def test_recording_lookups(model, ids):
    with model.record("blocks.0.resid_post") as rec:
        pass
    with pytest.raises(splice.SpliceError, match="never ran"):
        rec["blocks.0.resid_post"]
    with pytest.raises(splice.SpliceError, match="was not recorded"):
        rec["blocks.1.resid_post"]
    with pytest.raises(splice.SpliceError, match="record mode"):
        with model.record("embed", mode="sum"):
            pass
    assert model.hook_count == 0
