"""Every intervention type at every site kind equals a hand-written torch hook doing the same edit."""

import pytest
import torch
from families import FAMILIES, after_mlp_proj, parallel
from handhooks import hand_and_splice, register

import splice


def _set(index, fn):
    """Hand edit: t[index] = fn(t[index]) on a clone the hook already made."""

    def edit(t):
        t[index] = fn(t[index])
        return t

    return edit


def cases(last: int, heads: bool, n_heads: int = 2):
    """(intervention, hand-written equivalent) pairs for a site whose last axis has size `last`."""
    g = torch.Generator().manual_seed(3)
    vec = torch.randn(last, generator=g)
    one, pair = (1, [0, 1]) if n_heads > 1 else (0, [0])  # multi-query K/V sites have a single head
    full = torch.randn(2, 9, *((len(pair), last) if heads else (last,)), generator=g)
    h = (slice(None), [2, 5], one) if heads else (slice(None), [2, 5])
    out = [
        (splice.Zero(), lambda t: torch.zeros_like(t)),
        (splice.Zero(pos=4, dims=slice(0, 3)), _set((slice(None), 4, ..., slice(0, 3)), torch.zeros_like)),
        (splice.Scale(0.5, pos=-1), _set((slice(None), -1), lambda r: r * 0.5)),
        (splice.Scale(-2.0, pos=[1, 6]), _set((slice(None), [1, 6]), lambda r: r * -2.0)),
        (splice.Replace(vec, pos=3), _set((slice(None), 3), lambda r: vec.expand_as(r).clone())),
        (splice.Add(vec, scale=2.0), lambda t: t + vec * 2.0),
        (splice.Add(vec, pos=slice(2, 7, 2)), _set((slice(None), slice(2, 7, 2)), lambda r: r + vec)),
        (splice.Scale(2.0, rows=1, pos=3), _set((slice(1, 2), 3), lambda r: r * 2.0)),
        (
            splice.Zero(rows=[0], pos=torch.tensor([[0, 1, 1, 0, 0, 0, 0, 0, 1]] * 2, dtype=torch.bool)),
            _set((0, [1, 2, 8]), torch.zeros_like),
        ),
        (
            splice.Zero(
                pos=torch.tensor([[1, 0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0, 1]], dtype=torch.bool)
            ),
            lambda t: t.masked_fill(
                torch.tensor(
                    [[1, 0, 0, 1, 0, 0, 0, 0, 0], [0, 0, 1, 0, 0, 0, 0, 0, 1]], dtype=torch.bool
                ).view(2, 9, *([1] * (t.dim() - 2))),
                0.0,
            ),
        ),
    ]
    if heads:
        out += [
            (splice.Zero(heads=one), _set((slice(None), slice(None), one), torch.zeros_like)),
            (splice.Zero(heads=one, pos=[2, 5]), _set(h, torch.zeros_like)),
            (splice.Scale(3.0, heads=pair, dims=[0, 2]), lambda t: _heads_dims(t, pair, [0, 2], 3.0)),
            (splice.Replace(full, heads=pair), lambda t: _replace_heads(t, full, pair)),
        ]
    else:
        out.append((splice.Replace(full), lambda t: full.clone()))
    return out


def _heads_dims(t, heads, dims, factor):
    for h in heads:
        for d in dims:
            t[:, :, h, d] = t[:, :, h, d] * factor
    return t


def _replace_heads(t, full, heads):
    t[:, :, heads] = full
    return t


SITES = [
    "embed",
    "blocks.1.resid_pre",
    "blocks.1.attn.in",
    "blocks.1.attn.q",
    "blocks.1.attn.k",
    "blocks.1.attn.v",
    "blocks.1.attn.z",
    "blocks.1.attn.out",
    "blocks.1.mlp.in",
    "blocks.1.mlp.post",
    "blocks.1.mlp.out",
    "blocks.2.resid_post",
    "final_norm",
    "logits",
]


@pytest.mark.parametrize("site", SITES)
def test_edit_matches_hand_written_hook(model, hf, family, ids, site):
    shape = model.sites[site]
    heads = len(shape) == 4
    ran = 0
    n_heads = shape[-2] if heads else 2
    for intervention, hand in cases(shape[-1], heads, n_heads):
        with torch.no_grad():
            expected, got = hand_and_splice(model, hf, family, site, intervention, hand, ids)
            clean = hf(ids).logits
        assert torch.equal(got, expected), (
            f"{site} {intervention!r}: max diff {(got - expected).abs().max():.3g}"
        )
        if not torch.equal(expected, clean):
            ran += 1
    assert ran >= len(cases(shape[-1], heads, n_heads)) - 1  # the edits really change the output


def test_resid_mid_edit_is_what_the_mlp_and_residual_see(model, hf, family, ids):
    """resid_mid has no module of its own: check the edit against the block's own arithmetic,
    resid_post = resid_mid' + mlp(norm2(resid_mid'))."""
    if parallel(family):
        with pytest.raises(splice.SpliceError, match="parallel residual"):
            model.run(ids, edits={"blocks.1.resid_mid": splice.Zero()})
        return
    value = torch.randn(2, 9, model.dims.d_model, generator=torch.Generator().manual_seed(5))
    norm2, mlp = FAMILIES[family].norms(hf, 1)[1], FAMILIES[family].mlp(hf, 1)
    with torch.no_grad():
        _, rec = model.run(
            ids,
            edits={"blocks.1.resid_mid": splice.Replace(value)},
            record=["blocks.1.resid_mid", "blocks.1.resid_post"],
        )
        torch.testing.assert_close(
            rec["blocks.1.resid_mid"], value, rtol=0, atol=1e-6
        )  # one rounding: (v - r) + r
        torch.testing.assert_close(
            rec["blocks.1.resid_post"],
            value + after_mlp_proj(family, hf, 1, mlp(norm2(value))),
            rtol=0,
            atol=1e-5,
        )
        _, zeroed = model.run(ids, edits={"blocks.1.resid_mid": splice.Zero()}, record="blocks.1.resid_mid")
        assert torch.equal(zeroed["blocks.1.resid_mid"], torch.zeros_like(value))  # r + (0 - r) is exact


def test_embed_and_resid_pre_0_are_the_same_tensor_applied_in_order(model, ids):
    with torch.no_grad():
        _, rec = model.run(
            ids,
            edits={"embed": splice.Scale(2.0), "blocks.0.resid_pre": splice.Add(1.0)},
            record=["embed", "blocks.0.resid_pre"],
        )
        clean, _ = model.run(ids, record=None)
        _, base = model.run(ids, record="embed")
    assert torch.equal(rec["embed"], base["embed"] * 2.0)
    assert torch.equal(rec["blocks.0.resid_pre"], base["embed"] * 2.0 + 1.0)


def test_gradients_flow_through_edits_and_into_injected_vectors(model, hf, family, ids):
    vector = torch.zeros(model.dims.d_model, requires_grad=True)
    with model.edit(
        {"blocks.1.resid_post": splice.Add(vector, pos=-1), "blocks.0.attn.z": splice.Zero(heads=0)}
    ):
        loss = hf(ids).logits[:, -1].logsumexp(-1).sum()
    loss.backward()
    # Independent: the same injection by a hand-written hook, gradient w.r.t. the hook's vector.
    ref_vector = torch.zeros(model.dims.d_model, requires_grad=True)
    handles = [
        register(hf, family, "blocks.1.resid_post", _set((slice(None), -1), lambda r: r + ref_vector)),
        register(hf, family, "blocks.0.attn.z", _set((slice(None), slice(None), 0), torch.zeros_like)),
    ]
    try:
        ref_loss = hf(ids).logits[:, -1].logsumexp(-1).sum()
    finally:
        for h in handles:
            h.remove()
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    assert vector.grad is not None and vector.grad.abs().sum() > 0
    torch.testing.assert_close(vector.grad, ref_vector.grad, rtol=1e-6, atol=1e-7)
