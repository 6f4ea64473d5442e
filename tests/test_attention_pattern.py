"""attn.scores / attn.pattern against HF's eager attention and hand arithmetic; GQA head ablations."""

import pytest
import torch
from handhooks import eager_attentions

import splice


@pytest.fixture
def pmodel(model):
    if "blocks.0.attn.pattern" not in model.sites:
        # Falcon and BLOOM compute attention inline: no pattern sites, and that is asserted here.
        assert "attn.pattern" not in model.layout.points
        return None
    return model


def test_pattern_agrees_with_hf_eager_attention(pmodel, hf, ids):
    if pmodel is None:
        return
    original = hf.config._attn_implementation
    with torch.no_grad():
        _, rec = pmodel.run(ids, record=["blocks.*.attn.pattern", "blocks.*.attn.scores"])
        ref = eager_attentions(hf, ids)
    assert hf.config._attn_implementation == original and pmodel.hook_count == 0
    for layer in range(pmodel.dims.n_layers):
        pattern = rec[f"blocks.{layer}.attn.pattern"]
        assert pattern.shape == (2, pmodel.dims.n_heads, 9, 9)
        torch.testing.assert_close(pattern, ref.attentions[layer], rtol=0, atol=1e-6)
        assert torch.equal(rec[f"blocks.{layer}.attn.scores"].softmax(-1), pattern)
        assert torch.all(pattern.triu(1) == 0)  # causal


def test_z_is_pattern_times_v_with_gqa_sharing(pmodel, ids):
    if pmodel is None:
        return
    d = pmodel.dims
    with torch.no_grad():
        _, rec = pmodel.run(ids, record=["blocks.1.attn.pattern", "blocks.1.attn.v", "blocks.1.attn.z"])
    v = rec["blocks.1.attn.v"].transpose(1, 2)  # [b, kv, pos, d]
    v = torch.stack([v[:, h // (d.n_heads // d.n_kv_heads)] for h in range(d.n_heads)], dim=1)
    z = torch.matmul(rec["blocks.1.attn.pattern"], v).transpose(1, 2)
    torch.testing.assert_close(z, rec["blocks.1.attn.z"], rtol=0, atol=1e-6)


def test_zero_pattern_of_a_head_equals_zero_z_of_that_head(pmodel, ids):
    if pmodel is None:
        return
    with torch.no_grad():
        a, rec = pmodel.run(
            ids, edits={"blocks.1.attn.pattern": splice.Zero(heads=2)}, record="blocks.1.attn.z"
        )
        b, _ = pmodel.run(
            ids, edits={"blocks.1.attn.z": splice.Zero(heads=2), "blocks.1.attn.pattern": splice.Scale(1.0)}
        )
    assert torch.equal(rec["blocks.1.attn.z"][:, :, 2], torch.zeros_like(rec["blocks.1.attn.z"][:, :, 2]))
    assert torch.equal(a, b)


def test_uniform_pattern_averages_values(pmodel, ids):
    if pmodel is None:
        return
    causal = torch.ones(9, 9).tril()
    uniform = causal / causal.sum(-1, keepdim=True)
    with torch.no_grad():
        _, rec = pmodel.run(
            ids,
            edits={"blocks.0.attn.pattern": splice.Replace(uniform, heads=0)},
            record=["blocks.0.attn.v", "blocks.0.attn.z"],
        )
    v0 = rec["blocks.0.attn.v"][:, :, 0]  # head 0 reads KV head 0
    expected = torch.stack([v0[:, : p + 1].mean(1) for p in range(9)], dim=1)
    torch.testing.assert_close(rec["blocks.0.attn.z"][:, :, 0], expected, rtol=0, atol=1e-6)


def test_scores_edit_keeps_masked_pairs_masked(pmodel, ids):
    if pmodel is None:
        return
    with torch.no_grad():
        _, rec = pmodel.run(
            ids, edits={"blocks.0.attn.scores": splice.Scale(-2.0)}, record="blocks.0.attn.pattern"
        )
    pattern = rec["blocks.0.attn.pattern"]
    assert torch.isfinite(pattern).all() and torch.all(pattern.triu(1) == 0)
    torch.testing.assert_close(pattern.sum(-1), torch.ones_like(pattern.sum(-1)))


def test_kv_head_ablation_is_query_group_ablation(model, ids):
    """Under GQA, zeroing KV head g's values zeroes the output of every query head reading it."""
    d = model.dims
    groups = d.n_heads // d.n_kv_heads
    g = d.n_kv_heads - 1
    with torch.no_grad():
        a, rec = model.run(ids, edits={"blocks.1.attn.v": splice.Zero(heads=g)}, record="blocks.1.attn.z")
        b, _ = model.run(
            ids, edits={"blocks.1.attn.z": splice.Zero(heads=list(range(g * groups, (g + 1) * groups)))}
        )
    assert torch.all(rec["blocks.1.attn.z"][:, :, g * groups : (g + 1) * groups] == 0)
    torch.testing.assert_close(a, b, rtol=0, atol=1e-6)


def test_pattern_sites_restore_the_attention_implementation_after_errors(pmodel, hf, ids):
    if pmodel is None:
        return
    original = hf.config._attn_implementation
    with pytest.raises(splice.SpliceError):
        with pmodel.edit({"blocks.0.attn.pattern": splice.Zero(heads=99)}):
            hf(ids)
    with pytest.raises(RuntimeError):
        with pmodel.record("blocks.0.attn.pattern"):
            raise RuntimeError("user code failed")
    assert hf.config._attn_implementation == original and pmodel.hook_count == 0
