"""SAEs attached to a forward (`Model.attach`, `splice.SAE`): transparency, latent edits, the
error term, recording, refusals and clean-up, on tiny random models of several families, each
against an independent computation (the bare model, a hand-written hook, the SAE's own math)."""

from __future__ import annotations

import pytest
import torch
from conftest import VOCAB, build, hook_total
from handhooks import hand_record, register

import splice
from splice import SAE, Edits, SpliceError, Zero
from splice.sae import SAEConfig, SparseAutoencoder

SITE = "blocks.1.resid_post"
D_SAE = 48
# Families covering each residual layout: pre-norm llama-style, GPT-2, parallel residual
# (gpt_neox), OPT's flattened MLP; every family runs the transparency test.
SOME = ["llama", "gpt2", "gpt_neox", "opt"]


def make_sae(
    d_in: int, arch: str = "standard", seed: int = 0, d_sae: int = D_SAE, **cfg
) -> SparseAutoencoder:
    """A random SAE whose latents are active on a good share of tokens (biases around 0)."""
    g = torch.Generator().manual_seed(seed)
    if arch == "topk":
        cfg.setdefault("k", 6)
    weights = {
        "W_enc": torch.randn(d_in, d_sae, generator=g) / d_in**0.5,
        "b_enc": torch.randn(d_sae, generator=g) * 0.1,
        "W_dec": torch.randn(d_sae, d_in, generator=g) / d_sae**0.5,
        "b_dec": torch.randn(d_in, generator=g) * 0.1,
    }
    if arch == "jumprelu":
        weights["threshold"] = torch.rand(d_sae, generator=g) * 0.2
    return SparseAutoencoder(
        SAEConfig(arch, d_in, d_sae, hook_name="blocks.1.hook_resid_post", **cfg), weights
    )


def ids_for(seed: int = 1, shape=(2, 9)) -> torch.Tensor:
    return torch.randint(1, VOCAB, shape, generator=torch.Generator().manual_seed(seed))


@pytest.fixture(scope="module", params=SOME)
def fam(request):
    hf = build(request.param)
    return request.param, hf, splice.Model(hf)


def test_attached_sae_with_no_edit_is_bit_for_bit_transparent(family):
    hf = build(family)
    m, ids = splice.Model(hf), ids_for()
    sae = make_sae(m.dims.d_model)
    bare = m(ids)
    with m.attach(sae, SITE):
        assert torch.equal(m(ids), bare)
    # Reading every sub-site changes nothing either.
    with m.attach(sae, SITE), m.record([SITE + ".sae.acts", SITE + ".sae.recon", SITE + ".sae.error"]) as rec:
        assert torch.equal(m(ids), bare)
    x = hand_record(hf, family, SITE, ids)
    assert torch.equal(rec[SITE + ".sae.acts"], sae.encode(x))
    assert torch.equal(rec[SITE + ".sae.recon"], sae.decode(sae.encode(x)))
    assert torch.equal(rec[SITE + ".sae.error"], x - sae.decode(sae.encode(x)))
    assert hook_total(hf) == 0


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_latents_are_the_sae_encoding_of_the_site_bit_for_bit(fam, arch):
    family, hf, m = fam
    ids = ids_for(2)
    sae = make_sae(m.dims.d_model, arch)
    with m.attach(sae, SITE), m.record(SITE + ".sae.acts") as rec:
        m(ids)
    x = hand_record(hf, family, SITE, ids)  # an independent hook on the bare model
    assert torch.equal(rec[SITE + ".sae.acts"], sae.encode(x))
    acts = rec[SITE + ".sae.acts"]
    if arch == "topk":
        assert ((acts != 0).sum(-1) <= 6).all()
    assert (acts > 0).float().mean() > 0.05  # the test SAE's latents do fire


def test_zeroing_a_latent_moves_the_site_by_exactly_its_decoder_row(fam):
    family, hf, m = fam
    ids = ids_for(3)
    sae = make_sae(m.dims.d_model)
    x = hand_record(hf, family, SITE, ids)
    acts = sae.encode(x)
    k = int((acts > 0).sum((0, 1)).argmax())  # the latent active on most tokens
    with m.attach(sae, SITE), m.edit({SITE + ".sae.acts": Zero(dims=[k])}), m.record(SITE) as rec:
        m(ids)
    expected = -acts[..., k : k + 1] * sae.W_dec[k].detach()
    assert (acts[..., k] > 0).sum() >= 3
    torch.testing.assert_close(rec[SITE] - x, expected, rtol=0, atol=1e-6)
    # Only that latent: positions where it is 0 are untouched, bit for bit.
    silent = acts[..., k] == 0
    assert torch.equal(rec[SITE][silent], x[silent])


@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_error_term_false_equals_a_hand_hook_on_the_reconstruction(fam, arch):
    family, hf, m = fam
    ids = ids_for(4)
    sae = make_sae(m.dims.d_model, arch, seed=5)
    with m.attach(sae, SITE, error_term=False):
        spliced = m(ids)
    handle = register(hf, family, SITE, lambda t: sae.decode(sae.encode(t)))
    try:
        with torch.no_grad():
            hand = hf(ids).logits
    finally:
        handle.remove()
    assert torch.equal(spliced, hand)
    assert not torch.allclose(spliced, m(ids), atol=1e-4)  # the reconstruction does change the model


def test_edits_at_recon_and_error_sub_sites(fam):
    family, hf, m = fam
    ids = ids_for(5)
    sae = make_sae(m.dims.d_model)
    x = hand_record(hf, family, SITE, ids)
    recon = sae.decode(sae.encode(x))
    # Zeroing the error term is running on the reconstruction.
    with m.attach(sae, SITE), m.edit({SITE + ".sae.error": Zero()}), m.record(SITE) as rec:
        m(ids)
    torch.testing.assert_close(rec[SITE], recon, rtol=0, atol=1e-6)
    # Scaling the reconstruction by 0 leaves the error term alone.
    with m.attach(sae, SITE), m.edit({SITE + ".sae.recon": splice.Scale(0.0)}), m.record(SITE) as rec:
        m(ids)
    torch.testing.assert_close(rec[SITE], x - recon, rtol=0, atol=1e-6)


def test_several_saes_at_several_sites(fam):
    family, hf, m = fam
    ids = ids_for(6)
    d = m.dims.d_model
    first, second = make_sae(d, seed=1), make_sae(d, "topk", seed=2)
    with m.attach(first, "blocks.0.resid_post", error_term=False), m.attach(second, SITE, error_term=False):
        both = m(ids)
    handles = [
        register(hf, family, "blocks.0.resid_post", lambda t: first.decode(first.encode(t))),
        register(hf, family, SITE, lambda t: second.decode(second.encode(t))),
    ]
    try:
        with torch.no_grad():
            hand = hf(ids).logits
    finally:
        for handle in handles:
            handle.remove()
    assert torch.equal(both, hand)


def test_edits_dict_form_and_live_registry(fam):
    family, hf, m = fam
    ids = ids_for(7)
    sae = make_sae(m.dims.d_model)
    bare = m(ids)
    with m.edit(Edits({SITE: SAE(sae)})) as live:
        assert torch.equal(m(ids), bare)
        live[SITE + ".sae.acts"] = Zero()
        everything_off = m(ids)
        del live[SITE + ".sae.acts"]
        assert torch.equal(m(ids), bare)
    with m.attach(sae, SITE), m.edit({SITE + ".sae.acts": Zero()}):
        assert torch.equal(m(ids), everything_off)


def test_hook_names_resolve_and_saelens_sub_site_names_are_aliases(fam):
    family, hf, m = fam
    ids = ids_for(8)
    sae = make_sae(m.dims.d_model)  # hook_name blocks.1.hook_resid_post
    with m.attach(sae) as edits, m.record("blocks.1.hook_resid_post.hook_sae_acts_post") as rec:
        assert list(edits) == [SITE]
        assert m.attached(SITE) is sae and m.attached("blocks.0.resid_post") is None
        m(ids)
    assert list(rec) == [SITE + ".sae.acts"]
    assert m.attached(SITE) is None


def test_latent_patching_between_prompts(fam):
    family, hf, m = fam
    clean, corrupt = ids_for(9), ids_for(10)
    sae = make_sae(m.dims.d_model)
    with m.attach(sae, SITE, error_term=False):
        with m.record(SITE + ".sae.acts") as rec:
            clean_logits = m(clean)
        with m.edit({SITE + ".sae.acts": splice.Patch(rec)}):
            patched = m(corrupt)
    # With the reconstruction alone, everything after the site depends on the latents only.
    torch.testing.assert_close(patched, clean_logits, rtol=0, atol=1e-5)


def test_attach_refusals_leave_nothing_behind(fam):
    family, hf, m = fam
    ids = ids_for(11)
    d = m.dims.d_model
    bare = m(ids)
    wide = make_sae(d + 1)
    with pytest.raises(SpliceError, match=rf"SAE d_in {d + 1} does not fit site '{SITE}'"):
        with m.attach(wide, SITE):
            pass
    with pytest.raises(SpliceError, match="an SAE is attached at one site"):
        with m.attach(make_sae(d), "blocks.*.resid_post"):
            pass
    with pytest.raises(
        SpliceError,
        match=r"'blocks.1.attn.pattern' has no fixed width \(shape \('batch', \d+, 'pos', 'k_pos'\)\)",
    ):
        with m.attach(make_sae(d), "blocks.1.attn.pattern"):
            pass
    sae = make_sae(d)
    with pytest.raises(
        SpliceError, match=rf"dim \[{D_SAE}\] out of range at {SITE}.sae.acts: valid 0..{D_SAE - 1}"
    ):
        with m.attach(sae, SITE), m.edit({SITE + ".sae.acts": Zero(dims=[D_SAE])}):
            pass
    with pytest.raises(SpliceError, match="two SAEs are attached at"):
        with m.attach(sae, SITE), m.attach(make_sae(d, seed=3), SITE):
            pass
    with pytest.raises(SpliceError, match="takes no dims="):
        SAE(sae, dims=[1])
    with pytest.raises(SpliceError, match="cannot be serialised"):
        Edits({SITE: SAE(sae)}).to_dict()
    # Sub-site edits without an SAE: refused when the forward begins, before any module runs.
    with m.edit({SITE + ".sae.acts": Zero()}):
        with pytest.raises(SpliceError, match=rf"no SAE is attached at {SITE}"):
            m(ids)
        with m.attach(sae, SITE):  # attached afterwards: fine
            m(ids)

    # An SAE that raises mid-forward.
    class Broken(torch.nn.Module):
        d_in = d

        def encode(self, x):
            raise RuntimeError("boom")

        def decode(self, f):
            return f

    with pytest.raises(RuntimeError, match="boom"):
        with m.attach(Broken(), SITE), m.record(SITE + ".sae.acts"):
            m(ids)
    assert hook_total(hf) == 0
    assert torch.equal(m(ids), bare)


def test_head_site_saes_flattened_and_one_head(fam):
    family, hf, m = fam
    ids = ids_for(12)
    dims = m.dims
    z = "blocks.1.attn.z"
    flat = make_sae(dims.n_heads * dims.d_head, seed=4, reshape_activations="hook_z")
    one = make_sae(dims.d_head, seed=5, hook_head_index=1)
    with m.attach(flat, z, error_term=False):
        spliced = m(ids)

    def flat_hand(t):
        return flat.decode(flat.encode(t.flatten(2))).view(t.shape)

    handle = register(hf, family, z, flat_hand)
    try:
        with torch.no_grad():
            hand = hf(ids).logits
    finally:
        handle.remove()
    torch.testing.assert_close(spliced, hand, rtol=0, atol=1e-6)
    with m.attach(one, z, error_term=False), m.record(z) as rec:
        m(ids)
    x = hand_record(hf, family, z, ids)
    expected = x.clone()
    expected[:, :, 1] = one.decode(one.encode(x[:, :, 1]))
    torch.testing.assert_close(rec[z], expected, rtol=0, atol=1e-6)
    assert torch.equal(rec[z][:, :, 0], x[:, :, 0])


def test_gradients_reach_latents_and_pass_the_site_unchanged(fam):
    family, hf, m = fam
    ids = ids_for(13)
    sae = make_sae(m.dims.d_model)
    probe = torch.zeros(2, 9, D_SAE, requires_grad=True)
    with torch.enable_grad(), m.attach(sae, SITE), m.edit({SITE + ".sae.acts": splice.Add(probe)}):
        logits = m(ids)
        (grad_probe,) = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), [probe])
    # d out / d latents = W_dec: the latent gradient is the site gradient through the decoder.
    site_probe = torch.zeros(2, 9, m.dims.d_model, requires_grad=True)
    with torch.enable_grad(), m.edit({SITE: splice.Add(site_probe)}):
        logits = m(ids)
        (grad_site,) = torch.autograd.grad(logits[:, -1].logsumexp(-1).sum(), [site_probe])
    torch.testing.assert_close(grad_probe, grad_site @ sae.W_dec.detach().T, rtol=1e-5, atol=1e-6)
    assert grad_probe.abs().sum() > 0


def test_feature_steer_equals_adding_to_the_latent_under_generate(fam):
    family, hf, m = fam
    sae = make_sae(m.dims.d_model, seed=9)
    prompt = ids_for(14, (1, 5))
    k, scale = 3, 6.0
    steer = splice.sae.FeatureSteer(sae, k, scale, pos=slice(5, None))
    assert torch.equal(steer.vector, sae.W_dec[k].detach())
    by_direction = m.generate(prompt, edits={SITE: steer}, max_new_tokens=6)
    with m.attach(sae, SITE):
        by_latent = m.generate(
            prompt,
            edits={SITE + ".sae.acts": splice.Add(scale, dims=k, pos=slice(5, None))},
            max_new_tokens=6,
        )
    assert torch.equal(by_direction, by_latent)
    assert not torch.equal(by_direction, m.generate(prompt, max_new_tokens=6))  # the steer does something
    # The prompt's own logits are untouched by a steer on generated positions only.
    ids = torch.cat([prompt, by_direction], 1)
    with m.edit({SITE: steer}), m.record(SITE) as rec:
        m(ids)
    x = hand_record(hf, family, SITE, ids)
    assert torch.equal(rec[SITE][:, :5], x[:, :5])
    torch.testing.assert_close(
        rec[SITE][:, 5:] - x[:, 5:], (scale * sae.W_dec[k].detach()).expand_as(x[:, 5:]), rtol=0, atol=1e-5
    )

    # A module without W_dec: the direction is decode(e_k) - decode(0).
    class Wrapped(torch.nn.Module):
        def __init__(self, inner):
            super().__init__()
            self.inner, self.d_in, self.d_sae = inner, inner.d_in, inner.d_sae

        def encode(self, x):
            return self.inner.encode(x)

        def decode(self, acts):
            return self.inner.decode(acts)

    torch.testing.assert_close(
        splice.sae.feature_direction(Wrapped(sae), k), sae.W_dec[k].detach(), rtol=0, atol=1e-6
    )
    with pytest.raises(SpliceError, match="feature must be a latent index in 0..47"):
        splice.sae.FeatureSteer(sae, 48)


def test_generic_sae_modules_take_the_two_decode_path_with_the_same_result(fam):
    family, hf, m = fam
    ids = ids_for(15)
    sae = make_sae(m.dims.d_model, "jumprelu", seed=10)

    class Plain(torch.nn.Module):  # encode/decode only: no linear_decoder, no W_dec
        d_in = sae.d_in

        def encode(self, x):
            return sae.encode(x)

        def decode(self, acts):
            return sae.decode(acts)

    edits = {SITE + ".sae.acts": Zero(dims=[1, 2, 3])}
    with m.attach(sae, SITE), m.edit(edits):
        fast = m(ids)
    with m.attach(Plain(), SITE), m.edit(edits):
        generic = m(ids)
    torch.testing.assert_close(fast, generic, rtol=0, atol=1e-5)


def test_top_features_tables_match_brute_force():
    g = torch.Generator().manual_seed(0)
    acts = torch.relu(torch.randn(2, 4, 10, generator=g))
    tokens = ["w", "x", "y", "z"]
    cells = splice.sae.top_features(acts, 5, tokens=tokens)
    flat = sorted(
        ((float(acts[r, p, f]), r, p, f) for r in range(2) for p in range(4) for f in range(10)), reverse=True
    )[:5]
    assert [(r, p, f) for _, r, p, f in flat] == list(zip(cells.row, cells.pos, cells.feature))
    assert list(cells.token) == [tokens[p] for _, _, p, _ in flat]
    per_token = splice.sae.top_features(acts[0], 2, by="token")
    assert len(per_token) <= 8 and "token" not in per_token
    for p in range(4):
        expected = torch.topk(acts[0, p], 2).indices.tolist()
        got = per_token[per_token.pos == p].feature.tolist()
        assert got == [f for f in expected if acts[0, p, f] > 0]
    by_feature = splice.sae.top_features(acts, 3, by="feature")
    peaks = acts.flatten(0, 1).max(0).values
    assert by_feature.feature.tolist() == torch.topk(peaks, 3).indices.tolist()
    assert by_feature.active_tokens.tolist() == [int((acts[..., f] > 0).sum()) for f in by_feature.feature]
    with pytest.raises(SpliceError, match="by= takes"):
        splice.sae.top_features(acts, 3, by="head")
    with pytest.raises(SpliceError, match="tokens has 3 entries; the latents have 4 positions"):
        splice.sae.top_features(acts, 3, tokens=["a", "b", "c"])


def test_threads_each_run_their_own_attached_sae(fam):
    import threading

    family, hf, m = fam
    ids = ids_for(16)
    saes = [make_sae(m.dims.d_model, seed=s) for s in (20, 21)]
    expected = []
    for sae in saes:
        with m.attach(sae, SITE, error_term=False):
            expected.append(m(ids))
    results: dict[int, list[bool]] = {0: [], 1: []}
    start = threading.Barrier(2)

    def work(i):
        start.wait()
        with m.attach(saes[i], SITE, error_term=False):
            for _ in range(10):
                results[i].append(torch.equal(m(ids), expected[i]))

    threads = [threading.Thread(target=work, args=(i,)) for i in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert results == {0: [True] * 10, 1: [True] * 10}
    assert hook_total(hf) == 0


def test_half_precision_model_with_a_float32_sae(fam):
    family, hf, m = fam
    half = splice.Model(build(family).to(torch.bfloat16))
    ids = ids_for(17)
    sae = make_sae(m.dims.d_model, seed=22)
    bare = half(ids)
    with half.attach(sae, SITE):
        assert torch.equal(half(ids), bare)
    with half.attach(sae, SITE, error_term=False), half.record([SITE, SITE + ".sae.acts"]) as rec:
        half(ids)
    assert rec[SITE].dtype == torch.bfloat16 and rec[SITE + ".sae.acts"].dtype == torch.float32
    x = hand_record(half.hf, family, SITE, ids)
    assert torch.equal(rec[SITE + ".sae.acts"], sae.encode(x))  # encode casts to the SAE's float32
    assert torch.equal(rec[SITE], sae.decode(sae.encode(x)).to(torch.bfloat16))


def test_a_forward_started_inside_an_sae_encode_runs_as_its_own_forward(fam):
    """An SAE whose `encode` itself runs the model (a hostile but legal module): the inner
    forward must see no attachment of the outer one, and the outer result must equal the same SAE
    without the inner call; nothing is left registered."""
    family, hf, m = fam
    ids = ids_for(18)
    plain = make_sae(m.dims.d_model, seed=22)
    expected_inner = m(ids)
    with m.attach(plain, SITE, error_term=False):
        expected = m(ids)
    inner: list[torch.Tensor] = []

    class Reentrant(torch.nn.Module):
        cfg = plain.cfg

        def encode(self, x):
            inner.append(m(ids))  # a whole forward of the same model, started mid-forward
            return plain.encode(x)

        def decode(self, a):
            return plain.decode(a)

    with m.attach(Reentrant(), SITE, error_term=False):
        got = m(ids)
    assert torch.equal(got, expected)
    assert len(inner) == 1 and torch.equal(inner[0], expected_inner)
    assert hook_total(hf) == 0 and m.hook_count == 0
