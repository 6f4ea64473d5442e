"""Half precision: every family in bfloat16 (and a few in float16) edits, records, sweeps and
generates like hand-written PyTorch hooks in the same dtype.

The rule under test (docs/how-to/precision.md): an edit computes in the activation's dtype; a
declared value of another dtype (a float32 steering vector, a float32 recording patched in) is
cast to it first, so the reference hooks below cast the same way (`v.to(t.dtype)`); `Apply`
results are not cast (another dtype is refused); recordings keep the model's dtype; metrics
compute in float32 and tables hold float64 numbers.
"""

from __future__ import annotations

import math

import pytest
import torch
from conftest import CharTokenizer, build
from families import FAMILIES
from handhooks import eager_attentions, hand_record, register

import splice
from splice import metrics

BF16, FP16 = torch.bfloat16, torch.float16
SITE = "blocks.1.resid_post"
HEADS = "blocks.1.attn.z"
_MODELS: dict[tuple[str, torch.dtype], tuple] = {}


def half(family: str, dtype: torch.dtype = BF16):
    """(hf model, splice.Model) of the tiny family in `dtype`, built once per module."""
    if (family, dtype) not in _MODELS:
        hf = build(family).to(dtype)
        _MODELS[(family, dtype)] = (hf, splice.Model(hf, CharTokenizer()))
    return _MODELS[(family, dtype)]


@pytest.fixture(scope="module")
def ids():
    return torch.randint(1, 97, (2, 9), generator=torch.Generator().manual_seed(1))


def _set(index, fn):
    """Hand edit t[index] = fn(t[index]) (the hook already works on a clone)."""

    def edit(t):
        t[index] = fn(t[index])
        return t

    return edit


def _hand_logits(hf, family, site, fn, ids):
    handle = register(hf, family, site, fn)
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        handle.remove()


def cases(m, hf, family, dtype, ids):
    """(site, intervention, hand-written hook in `dtype`) triples; every value is float32, so the
    hooks cast it to `dtype` exactly as the rule says splice does."""
    g = torch.Generator().manual_seed(3)
    d, d_head = m.dims.d_model, m.sites[HEADS][-1]
    vec = torch.randn(d, generator=g)  # float32, like a steering vector computed elsewhere
    per_dim = torch.rand(d, generator=g) + 0.5
    head_vec = torch.randn(d_head, generator=g)
    direction = torch.randn(d, generator=g)
    unit = (direction.double() / direction.double().norm()).float()  # the float64 basis, in float32
    bound = torch.full((d,), 0.05)
    with torch.no_grad():
        _, other = m.run(ids.flip(1), record=SITE)
    source = other[SITE].float()  # a float32 copy of a recording (as if saved from a float32 run)
    c = lambda x: torch.tensor(x).to(dtype)  # noqa: E731  a number, cast like a declared value
    return [
        (SITE, splice.Zero(pos=2), _set((slice(None), 2), torch.zeros_like)),
        (SITE, splice.Scale(0.3, pos=-1), _set((slice(None), -1), lambda r: r * c(0.3))),
        (
            SITE,
            splice.Replace(vec, pos=3),
            _set((slice(None), 3), lambda r: vec.to(dtype).expand_as(r).clone()),
        ),
        (SITE, splice.Add(vec), lambda t: t + vec.to(dtype)),
        (
            SITE,
            splice.Add(vec, scale=0.7, pos=[1, 5]),
            _set((slice(None), [1, 5]), lambda r: r + vec.to(dtype) * c(0.7)),
        ),
        (SITE, splice.Add(vec, scale=per_dim), lambda t: t + vec.to(dtype) * per_dim.to(dtype)),
        (
            SITE,
            splice.Scale(per_dim, dims=slice(0, 7)),
            _set((..., slice(0, 7)), lambda r: r * per_dim[:7].to(dtype)),
        ),
        (
            SITE,
            splice.Clamp(min=-bound, max=bound),
            lambda t: torch.clamp(t, -bound.to(dtype), bound.to(dtype)),
        ),
        (
            SITE,
            splice.ProjectOut(direction),
            lambda t: (t.float() - (t.float() @ unit[:, None]) * unit).to(dtype),
        ),
        (SITE, splice.Patch({SITE: source}, pos=2), _set((slice(None), 2), lambda r: source[:, 2].to(dtype))),
        (
            SITE,
            splice.Mean({SITE: other[SITE]}, pos=4),
            _set(
                (slice(None), 4), lambda r: other[SITE].double().mean((0, 1)).to(dtype).expand_as(r).clone()
            ),
        ),
        # A one-row reference: every draw is row 0, so Resample is that row, cast.
        (SITE, splice.Resample({SITE: source[:1]}), lambda t: source[:1].to(dtype).expand_as(t).clone()),
        (HEADS, splice.Zero(heads=1), _set((slice(None), slice(None), 1), torch.zeros_like)),
        (
            HEADS,
            splice.Add(head_vec, heads=0, pos=-1),
            _set((slice(None), -1, 0), lambda r: r + head_vec.to(dtype)),
        ),
        (
            SITE,
            splice.Apply(lambda r: (r.float().tanh() * 2).to(r.dtype), pos=0),
            _set((slice(None), 0), lambda r: (r.float().tanh() * 2).to(dtype)),
        ),
    ]


def _edits_equal_hand_hooks(family, dtype, ids):
    hf, m = half(family, dtype)
    with torch.no_grad():
        clean = hf(ids).logits
    assert clean.dtype == dtype
    changed, all_cases = 0, cases(m, hf, family, dtype, ids)
    for site, intervention, hand in all_cases:
        expected = _hand_logits(hf, family, site, hand, ids)
        with torch.no_grad():
            got, _ = m.run(ids, edits={site: intervention})
        assert got.dtype == dtype
        assert torch.equal(got, expected), (
            f"{family} {dtype} {site} {intervention!r}: max diff {(got.float() - expected.float()).abs().max():.3g}"
        )
        changed += not torch.equal(expected, clean)
    assert changed == len(all_cases)  # every edit reaches the logits


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_bf16_edits_equal_hand_hooks_bit_for_bit(family, ids):
    _edits_equal_hand_hooks(family, BF16, ids)


@pytest.mark.parametrize("family", ["gpt2", "llama", "gemma2"])
def test_fp16_edits_equal_hand_hooks_bit_for_bit(family, ids):
    _edits_equal_hand_hooks(family, FP16, ids)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_recordings_keep_the_model_dtype(family, ids):
    hf, m = half(family)
    with torch.no_grad():
        _, everything = m.run(ids, record="*")
    floating = [name for name in everything if everything[name].is_floating_point()]
    assert len(floating) == len(everything) > 10
    assert {everything[name].dtype for name in floating} == {BF16}
    # Recording attn.scores/pattern runs those layers' attention eagerly (see engine/attention.py),
    # which in bf16 rounds differently from sdpa: compare a recording without them to hand hooks.
    sites = ["embed", "blocks.0.attn.q", HEADS, "blocks.1.mlp.post", SITE, "final_norm", "logits"]
    with torch.no_grad():
        _, rec = m.run(ids, record=sites)
    for site in sites:
        assert rec[site].dtype == BF16 and torch.equal(rec[site], hand_record(hf, family, site, ids)), site


@pytest.mark.parametrize("family", sorted(f for f in FAMILIES if f not in ("bloom", "falcon")))
def test_bf16_attention_pattern_agrees_with_hf_eager_attention(family, ids):
    """Falcon and BLOOM have no pattern site. The pattern is a bf16 softmax (computed in float32,
    rounded once, as HF's eager attention does); probabilities are <= 1, so one bf16 ulp is at
    most 2**-8: the tolerance."""
    hf, m = half(family)
    with torch.no_grad():
        _, rec = m.run(ids, record="blocks.*.attn.pattern")
        ref = eager_attentions(hf, ids)
    for layer in range(m.dims.n_layers):
        pattern = rec[f"blocks.{layer}.attn.pattern"]
        assert pattern.dtype == ref.attentions[layer].dtype == BF16
        torch.testing.assert_close(pattern, ref.attentions[layer], rtol=0, atol=2**-8)


def test_fp32_values_into_bf16_are_cast_not_promoted(ids):
    """Without the cast, t + v * s with a float32 [1] tensor s would promote to float32 (and be
    refused as the wrong dtype), or, computed in float32 and rounded, differ from the rule."""
    hf, m = half("llama")
    vec = torch.randn(m.dims.d_model, generator=torch.Generator().manual_seed(0))
    scale = torch.tensor([0.3])
    with torch.no_grad():
        _, rec = m.run(ids, edits={SITE: splice.Add(vec, scale=scale)}, record=SITE)
    base = hand_record(hf, "llama", SITE, ids)
    assert rec[SITE].dtype == BF16
    assert torch.equal(rec[SITE], base + vec.to(BF16) * scale.to(BF16))
    assert not torch.equal(rec[SITE], (base.float() + vec * scale).to(BF16))  # not computed in float32


@pytest.mark.parametrize("dtype", [BF16, FP16])
def test_apply_result_of_another_dtype_is_refused(dtype, ids):
    _, m = half("llama", dtype)
    with pytest.raises(
        splice.SpliceError, match=rf"Apply result at {SITE} is torch.float32, expected {dtype} .*not cast"
    ):
        m.run(ids, edits={SITE: splice.Apply(lambda r: r.float() * 2)})
    with pytest.raises(
        splice.SpliceError, match=rf"Apply result at {HEADS} is torch.float32, expected {dtype} .*not cast"
    ):
        m.run(ids, edits={HEADS: splice.Apply(lambda r: r.float(), heads=1)})
    # The model is left as it was: no hook stays behind after the error.
    assert m.hook_count == 0


def test_values_beyond_float16_range_are_refused(ids):
    _, m = half("gpt2", FP16)
    d = m.dims.d_model
    big = torch.zeros(d)
    big[5] = 1e5
    with pytest.raises(
        splice.SpliceError, match=r"Add vector at blocks\.1\.resid_post has 1 of \d+ value.*float16.*\(5,\)"
    ):
        m.run(ids, edits={SITE: splice.Add(big)})
    with pytest.raises(
        splice.SpliceError,
        match=r"Scale factor at blocks\.1\.resid_post is 1e\+06, outside the range of torch\.float16",
    ):
        m.run(ids, edits={SITE: splice.Scale(1e6)})
    with pytest.raises(splice.SpliceError, match="Add scale"):
        m.run(ids, edits={SITE: splice.Add(1.0, scale=torch.tensor(7e4))})
    # 65510 rounds to float16's largest value 65504 (not inf); -inf in Replace stays meaningful.
    with torch.no_grad():
        _, rec = m.run(ids, edits={SITE: splice.Replace(65510.0, pos=0)}, record=SITE)
    assert rec[SITE][:, 0].eq(65504).all()
    with torch.no_grad():
        _, rec = m.run(
            ids,
            edits={"blocks.0.attn.scores": splice.Replace(float("-inf"), dims=0, pos=3)},
            record="blocks.0.attn.pattern",
        )
    assert rec["blocks.0.attn.pattern"][:, :, 3, 0].eq(0).all()
    # The same value is fine in bfloat16 (float32's range).
    _, bf = half("gpt2", BF16)
    with torch.no_grad():
        bf.run(ids, edits={SITE: splice.Add(big)})


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_gradients_in_bf16_equal_a_hand_hook(family, ids):
    """What attribution patching differentiates: d loss / d (a float32 probe added in bf16)."""
    hf, m = half(family)
    probe = torch.zeros(2, 9, m.dims.d_model, requires_grad=True)
    with m.edit({SITE: splice.Add(probe)}):
        loss = hf(ids).logits[:, -1].float().logsumexp(-1).sum()
    (grad,) = torch.autograd.grad(loss, probe)
    ref = torch.zeros(2, 9, m.dims.d_model, requires_grad=True)
    handle = register(hf, family, SITE, lambda t: t + ref.to(BF16))
    try:
        ref_loss = hf(ids).logits[:, -1].float().logsumexp(-1).sum()
    finally:
        handle.remove()
    (ref_grad,) = torch.autograd.grad(ref_loss, ref)
    assert torch.equal(loss, ref_loss) and grad.dtype == torch.float32
    assert torch.equal(grad, ref_grad) and grad.abs().sum() > 0


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_generate_with_an_edit_equals_hand_hooked_generate(family):
    hf, m = half(family)
    prompt = torch.randint(1, 97, (1, 6), generator=torch.Generator().manual_seed(2))
    vec = torch.randn(m.dims.d_model, generator=torch.Generator().manual_seed(4))
    edits = {SITE: splice.Add(vec, scale=4.0, pos=slice(6, None))}  # the generated tokens only
    kwargs = dict(max_new_tokens=5, do_sample=False, pad_token_id=0, attention_mask=torch.ones_like(prompt))

    def steer_generated(t):  # with the KV cache a generated token's forward sees one position
        return t + vec.to(BF16) * torch.tensor(4.0).to(BF16) if t.shape[1] == 1 else t

    handle = register(hf, family, SITE, steer_generated)
    try:
        with torch.no_grad():
            hand = hf.generate(prompt, output_logits=True, return_dict_in_generate=True, **kwargs)
    finally:
        handle.remove()
    with torch.no_grad():
        clean = hf.generate(prompt, output_logits=True, return_dict_in_generate=True, **kwargs)
        with m.edit(edits):
            got = hf.generate(prompt, output_logits=True, return_dict_in_generate=True, **kwargs)
    tokens = m.generate(prompt, edits=edits, max_new_tokens=5, return_tokens=True)
    assert torch.equal(tokens, hand.sequences) and torch.equal(got.sequences, hand.sequences)
    assert all(torch.equal(a, b) for a, b in zip(got.logits, hand.logits))  # HF returns them as float32
    assert torch.equal(got.logits[0], clean.logits[0])  # the prompt's forward is not steered
    assert not torch.equal(got.logits[1], clean.logits[1])  # the first generated token's is


class _Batch:
    """What the built-in metrics read from a prompt batch (`len`, `input_ids`, `token_ids`)."""

    def __init__(self, input_ids, answers):
        self.input_ids, self._answers = input_ids, answers

    def __len__(self):
        return self.input_ids.shape[0]

    def token_ids(self, field):
        return self._answers[field]


def test_metrics_compute_in_float32():
    g = torch.Generator().manual_seed(0)
    logits = (torch.randn(3, 4, 97, generator=g) * 8).to(BF16)  # logits of a real model's size
    baseline = (torch.randn(3, 4, 97, generator=g) * 8).to(BF16)
    batch = _Batch(
        torch.randint(0, 97, (3, 4), generator=g),
        {"correct": torch.tensor([1, 2, 3]), "wrong": torch.tensor([4, 5, 6])},
    )
    f, fb = logits.float(), baseline.float()  # the reference: float32 from the bfloat16 logits
    rows = torch.arange(3)
    expected = {
        "logit_diff": f[rows, -1, [1, 2, 3]] - f[rows, -1, [4, 5, 6]],
        "answer_logprob": f[:, -1].log_softmax(-1)[rows, [1, 2, 3]],
        "loss_last2": -f[:, -3:-1].log_softmax(-1).gather(-1, batch.input_ids[:, -2:, None])[..., 0].mean(-1),
        "kl_from_baseline": (
            fb[:, -1:].softmax(-1) * (fb[:, -1:].log_softmax(-1) - f[:, -1:].log_softmax(-1))
        )
        .sum(-1)
        .mean(-1),
    }
    seen = []
    custom = metrics.custom(
        lambda lg, base, b: seen.append((lg.dtype, base.dtype)) or lg[:, -1, 0], name="first"
    )
    for metric in [
        metrics.logit_diff(),
        metrics.answer_logprob("correct"),
        metrics.loss(2),
        metrics.kl_from_baseline(),
        custom,
    ]:
        value = metric(logits, baseline, batch)
        assert value.dtype == torch.float32, metric.name
        if metric.name in expected:
            torch.testing.assert_close(value, expected[metric.name], rtol=0, atol=1e-6)
    assert seen == [(torch.float32, torch.float32)]
    # In bfloat16 the logit difference would be rounded: the float32 one is exact here.
    assert not torch.equal(
        expected["logit_diff"], (logits[rows, -1, [1, 2, 3]] - logits[rows, -1, [4, 5, 6]]).float()
    )
    assert torch.equal(metrics.logit_diff()(logits, baseline, batch), expected["logit_diff"])


DATA = [
    {"prompt": p, "correct": "a", "wrong": "c", "clean": p.upper()}
    for p in ["abcdefg", "bcdefgh", "cdefghi", "defghij", "efghijk"]
]
SWEEP_METRICS = [
    metrics.logit_diff(),
    metrics.kl_from_baseline(),
    metrics.loss(2),
    metrics.answer_logprob("correct"),
]


def bf16_tolerance(m, prompts) -> float:
    """How far two bf16 runs of the same math may differ in a metric, when only the batch layout
    differs (batched prefix replay vs one variant per forward): intermediates may then round
    differently, and they do (GPT-J: ~0.1 of this bound; the other families agree exactly).

    Each logit is a bf16 number; allow it to be off by one bf16 ulp of the largest logit
    magnitude L, ulp(L) = 2**(floor(log2 L) - 7) (8 significant bits). A logit difference then
    moves by at most 2 ulps, a log-softmax entry (logit minus logsumexp) by at most 2 ulps, and
    so do their means (loss, answer_logprob) and the KL to the baseline: 2 * ulp(L) for every
    metric. With the tiny models' logits (|L| ~ 0.6-1.6) that is 0.008-0.016."""
    with torch.no_grad():
        scale = m(prompts).float().abs().max().item()
    return 2 * 2.0 ** (math.floor(math.log2(scale)) - 7)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_batched_sweep_equals_sequential_within_bf16_tolerance(family):
    _, m = half(family)
    vec = torch.randn(m.dims.d_model, generator=torch.Generator().manual_seed(6))  # float32
    variants = []
    for layer in range(m.dims.n_layers):  # every layer a replay can start from
        variants += [(f"blocks.{layer}.attn.z", splice.Zero(heads=h)) for h in (0, m.dims.n_heads - 1)]
        variants += [
            (f"blocks.{layer}.mlp.out", splice.Scale(-3.0)),
            (f"blocks.{layer}.resid_post", splice.Add(vec, scale=4.0, pos=-1)),
        ]
    sweep = splice.Sweep(variants=variants, metrics=SWEEP_METRICS)
    batched = sweep.run(m, DATA, batch_size=3, max_rows=7, progress=False)
    sequential = sweep.run(m, DATA, batch_size=3, prefix_reuse=False, progress=False)
    tol = bf16_tolerance(m, [d["prompt"] for d in DATA])
    assert list(batched.columns) == list(sequential.columns)
    assert batched.value.dtype == "float64" and batched.effect.dtype == "float64"
    diff = (batched.value - sequential.value).abs()
    assert diff.max() <= tol, f"max diff {diff.max():.3g} > tolerance {tol:.3g}"
    # The test can fail: in every layer some edit moves a metric by far more than the tolerance,
    # so a variant run on the wrong rows or from the wrong layer would show.
    edited = sequential[(sequential.variant >= 0) & (sequential.metric != "kl_from_baseline")]
    strongest = edited.assign(size=edited.effect.abs()).groupby("layer")["size"].max()
    assert len(strongest) == m.dims.n_layers and (strongest > 10 * tol).all(), (strongest / tol).tolist()


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_patch_sweep_in_bf16_restores_the_source_run(family):
    """Patching the whole first residual stream from the clean run is the clean run: the value
    equals the source's within the bf16 tolerance above (the two are batched differently)."""
    _, m = half(family)
    table = splice.patching.patch_sweep(
        m,
        DATA,
        sites="blocks.0.resid_pre",
        over=None,
        metrics=[metrics.logit_diff()],
        batch_size=5,
        progress=False,
    )
    tol = bf16_tolerance(m, [d["clean"] for d in DATA] + [d["prompt"] for d in DATA])
    row = table[table.variant == 0].iloc[0]
    assert table.value.dtype == "float64" and table.normalised.dtype == "float64"
    assert abs(row.value - row.source) <= tol
    assert abs(row.source - row.baseline) > 5 * tol  # there is a difference to restore


@pytest.mark.parametrize("family", ["llama", "gpt_neox"])
def test_steering_vector_in_bf16(family):
    hf, m = half(family)
    sv = splice.steering.contrastive(m, ["abcd", "abce"], ["wxyz", "vxyz"], SITE)
    assert sv.vector.dtype == BF16

    # The vector is the difference of float64 means of the bf16 activations, rounded once.
    def last(prompts):
        tokens = torch.tensor([CharTokenizer()(p)["input_ids"] for p in prompts])
        return hand_record(hf, family, SITE, tokens)[:, -1].double().mean(0)

    assert torch.equal(sv.vector, (last(["abcd", "abce"]) - last(["wxyz", "vxyz"])).to(BF16))
    ids = torch.tensor([[1, 2, 3, 4, 5]])
    with torch.no_grad():
        got = m.run(ids, edits=sv.edit(0.3))[0]
    # The coefficient is cast too: 0.3 becomes the bfloat16 0.30078125.
    hand = _hand_logits(hf, family, SITE, lambda t: t + sv.vector * torch.tensor(0.3).to(BF16), ids)
    assert torch.equal(got, hand)
