"""`blocks.L.attn.result`: each head's contribution to the output projection's output, against
independent computations (the TL-layout weights, a hand-written hook on the projection), edits on
it against hand-written hooks that recompute the projection, and what touching it costs."""

import pytest
import torch
from conftest import CharTokenizer, build, hook_total
from families import FAMILIES, after_attn_proj

import splice
from splice import metrics

LAYER = 1
SITE = f"blocks.{LAYER}.attn.result"


def projection(hf, family, layer=LAYER):
    """The output projection (the module whose input is attn.z), from the tests' own module map."""
    module, io = FAMILIES[family].hand_module(hf, "attn.z", layer)
    assert io == "in"
    return module


def per_head_weight(module, heads):
    """[heads, d_head, d_out] by hand: nn.Linear stores [out, in], GPT-2's Conv1D [in, out]."""
    weight = module.weight.T if isinstance(module, torch.nn.Linear) else module.weight
    return weight.reshape(heads, -1, weight.shape[-1])


def hand_result(module, z_flat, heads):
    """Per-head results [..., heads, d_out] from the projection's input, by hand."""
    z = z_flat.reshape(*z_flat.shape[:-1], heads, -1)
    return torch.einsum("bphd,hdo->bpho", z, per_head_weight(module, heads))


def bias_of(module):
    return module.bias if module.bias is not None else 0.0


def hand_projection_hook(module, heads, fn):
    """A forward hook that recomputes the projection from its input z: sum over heads of
    fn(per-head results) + bias."""

    def hook(mod, args, out):
        return fn(hand_result(mod, args[0], heads).clone()).sum(-2) + bias_of(mod)

    return module.register_forward_hook(hook)


def capture_projection(hf, family, ids, layer=LAYER):
    """(input, output) of the output projection in a plain forward, captured without splice."""
    seen = {}

    def keep(mod, args, out):
        seen["in"], seen["out"] = args[0].clone(), out.clone()

    handle = projection(hf, family, layer).register_forward_hook(keep)
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        handle.remove()
    return seen["in"], seen["out"]


# -- what it is --------------------------------------------------------------------------------
def test_listed_with_its_shape_and_aliases(model):
    d = model.dims
    assert model.sites[SITE] == ("batch", "pos", d.n_heads, d.d_model)
    names = list(model.sites)
    assert names.index(SITE) == names.index(f"blocks.{LAYER}.attn.z") + 1  # forward order
    assert model.resolve(("result", LAYER)) == model.resolve(f"blocks.{LAYER}.attn.hook_result") == [SITE]
    assert model.resolve("blocks.*.attn.result") == [f"blocks.{l}.attn.result" for l in range(d.n_layers)]
    # Its module is the attn.z point's module, read from the table.
    point, z = model.layout.points["attn.result"], model.layout.points["attn.z"]
    assert (point.module, point.io, z.io) == (z.module, "output", "input")


def test_heads_sum_with_the_bias_to_the_projection_output_and_attn_out(model, hf, family, ids):
    with torch.no_grad():
        logits, rec = model.run(ids, record=["blocks.*.attn.result", "blocks.*.attn.out"])
        assert torch.equal(logits, hf(ids).logits)  # recording it changes nothing
        for layer in range(model.dims.n_layers):
            result = rec[f"blocks.{layer}.attn.result"]
            assert result.shape == (*ids.shape, model.dims.n_heads, model.dims.d_model)
            total = result.sum(-2) + model.b_O[layer]
            _, projected = capture_projection(hf, family, ids, layer)
            torch.testing.assert_close(total, projected, rtol=0, atol=1e-5)
            # attn.out is the projection's output, except Gemma2's: after the post-attention norm.
            out = rec[f"blocks.{layer}.attn.out"]
            torch.testing.assert_close(after_attn_proj(family, hf, layer, total), out, rtol=0, atol=1e-5)
            if family != "gemma2":
                torch.testing.assert_close(total, out, rtol=0, atol=1e-5)


def test_equals_z_times_W_O_and_a_hand_written_hook_on_the_projection(model, hf, family, ids):
    with torch.no_grad():
        _, rec = model.run(ids, record=[SITE, f"blocks.{LAYER}.attn.z"])
    z, result = rec[f"blocks.{LAYER}.attn.z"], rec[SITE]
    by_weights = torch.einsum("bphd,hdm->bphm", z, model.W_O[LAYER])
    torch.testing.assert_close(result, by_weights, rtol=0, atol=1e-6)
    z_in, _ = capture_projection(hf, family, ids)
    with torch.no_grad():
        by_hand = hand_result(projection(hf, family), z_in, model.dims.n_heads)
    torch.testing.assert_close(result, by_hand, rtol=0, atol=1e-6)


@pytest.mark.parametrize("layout", ["multi-query", "per-head qkv", "new architecture"])
def test_falcon_layouts_and_an_output_bias(layout):
    """The table's z view and module serve every Falcon layout; here with a bias on `dense`."""
    config = FAMILIES["falcon"].tiny().config
    config.bias = True
    if layout == "per-head qkv":
        config.multi_query = False
    elif layout == "new architecture":
        config.new_decoder_architecture, config.num_kv_heads = True, config.num_attention_heads
    torch.manual_seed(0)
    hf = type(FAMILIES["falcon"].tiny())(config).eval()
    with torch.no_grad():
        for p in hf.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    model, ids = splice.Model(hf), torch.randint(1, 90, (2, 9), generator=torch.Generator().manual_seed(1))
    assert model.dims.n_kv_heads == (1 if layout == "multi-query" else config.num_attention_heads)
    assert model.b_O[LAYER].abs().sum() > 0
    with torch.no_grad():
        _, rec = model.run(ids, record=[SITE, f"blocks.{LAYER}.attn.out"])
        torch.testing.assert_close(
            rec[SITE].sum(-2) + model.b_O[LAYER], rec[f"blocks.{LAYER}.attn.out"], rtol=0, atol=1e-5
        )
        at_z, _ = model.run(ids, edits={f"blocks.{LAYER}.attn.z": splice.Zero(heads=2)})
        at_result, _ = model.run(ids, edits={SITE: splice.Zero(heads=2)})
    assert torch.equal(at_z, at_result)


# -- edits -------------------------------------------------------------------------------------
def test_zero_heads_at_result_equals_zero_heads_at_z_bit_for_bit(model, ids):
    n = model.dims.n_heads
    for heads, pos in [(0, None), (n - 1, None), ([0, n - 1], [2, 5]), (1, -1)]:
        kw = {"heads": heads} | ({"pos": pos} if pos is not None else {})
        with torch.no_grad():
            at_z, _ = model.run(ids, edits={f"blocks.{LAYER}.attn.z": splice.Zero(**kw)})
            at_result, _ = model.run(ids, edits={SITE: splice.Zero(**kw)})
        assert torch.equal(at_result, at_z), kw


def _edit_cases(n_heads, d_model):
    g = torch.Generator().manual_seed(7)
    vec = torch.randn(d_model, generator=g)
    pair = [0, n_heads - 1]
    full = torch.randn(2, 9, len(pair), d_model, generator=g)

    def at(index, fn):
        def edit(t):
            t[index] = fn(t[index])
            return t

        return edit

    return [
        (splice.Scale(0.5, heads=1), at((slice(None), slice(None), 1), lambda r: r * 0.5)),
        (splice.Scale(-2.0, pos=[1, 6]), at((slice(None), [1, 6]), lambda r: r * -2.0)),
        (splice.Add(vec, heads=pair, pos=3), at((slice(None), 3, pair), lambda r: r + vec)),
        (splice.Add(vec, scale=2.0), lambda t: t + 2.0 * vec),  # every head: the bias still once
        (splice.Replace(full, heads=pair), at((slice(None), slice(None), pair), lambda r: full.clone())),
        (splice.Replace(vec, pos=4, heads=0), at((slice(None), 4, 0), lambda r: vec.expand_as(r).clone())),
        (splice.Zero(dims=slice(0, 3)), at((..., slice(0, 3)), torch.zeros_like)),
        (splice.Scale(3.0, rows=1, heads=0), at((1, slice(None), 0), lambda r: r * 3.0)),
    ]


def test_edits_equal_a_hand_hook_recomputing_the_projection_from_z(model, hf, family, ids):
    module, n = projection(hf, family), model.dims.n_heads
    with torch.no_grad():
        clean = hf(ids).logits
        for intervention, hand in _edit_cases(n, model.dims.d_model):
            handle = hand_projection_hook(module, n, hand)
            try:
                expected = hf(ids).logits
            finally:
                handle.remove()
            got, rec = model.run(ids, edits={SITE: intervention}, record=SITE)
            torch.testing.assert_close(got, expected, rtol=0, atol=1e-5, msg=repr(intervention))
            assert not torch.allclose(got, clean), intervention  # the edit reached the logits
            # The recording (after the edits) holds the edited result, computed from the same z.
            z_in, _ = capture_projection(hf, family, ids)
            torch.testing.assert_close(
                rec[SITE], hand(hand_result(module, z_in, n).clone()), rtol=0, atol=1e-6
            )


def test_the_bias_is_added_once_and_no_head_edit_touches_it(model, hf, family, ids):
    """Zeroing every head leaves exactly the output projection's bias (0 without one)."""
    seen = {}
    handle = projection(hf, family).register_forward_hook(lambda m, a, out: seen.update(out=out.clone()))
    try:
        with torch.no_grad():
            model.run(ids, edits={SITE: splice.Zero()})
    finally:
        handle.remove()
    assert torch.equal(seen["out"], model.b_O[LAYER].expand_as(seen["out"]))


def test_identity_edits_and_patching_with_itself_are_bit_identical(model, hf, ids):
    with torch.no_grad():
        clean = hf(ids).logits
        _, rec = model.run(ids, record=SITE)
        for edit in [
            splice.Scale(1.0),
            splice.Add(torch.zeros(model.dims.d_model), heads=1),
            splice.Patch(rec),
            splice.Replace(rec[SITE]),
            splice.ProjectOut([]),
        ]:
            assert torch.equal(model.run(ids, edits={SITE: edit})[0], clean), edit


def test_an_edit_of_z_applies_first(model, hf, family, ids):
    """z is the projection's input, edited by its input hook; the result is read from the edited
    z on the output hook. So both edits in one forward equal both made in z (bit for bit here)."""
    z_site = f"blocks.{LAYER}.attn.z"
    with torch.no_grad():
        _, clean = model.run(ids, record=SITE)
        both, rec = model.run(
            ids,
            edits={z_site: splice.Scale(2.0, heads=0), SITE: splice.Zero(heads=1)},
            record=[z_site, SITE],
        )
        in_z, _ = model.run(ids, edits={z_site: [splice.Scale(2.0, heads=0), splice.Zero(heads=1)]})
    assert torch.equal(both, in_z)
    assert torch.equal(rec[SITE][:, :, 0], 2 * clean[SITE][:, :, 0])  # read from the scaled z
    assert torch.equal(rec[SITE][:, :, 1], torch.zeros_like(rec[SITE][:, :, 1]))
    assert torch.equal(rec[SITE][:, :, 2:], clean[SITE][:, :, 2:])
    # The other order cannot be asked for: a result edit is after the projection's input.
    module, n = projection(hf, family), model.dims.n_heads
    z_in, _ = capture_projection(hf, family, ids)
    with torch.no_grad():
        scaled = z_in.clone().reshape(*z_in.shape[:-1], n, -1)
        scaled[:, :, 0] *= 2
        by_hand = hand_result(module, scaled.flatten(-2), n)
    torch.testing.assert_close(rec[SITE][:, :, 0], by_hand[:, :, 0], rtol=0, atol=1e-6)


def test_gradients_reach_an_injected_vector_even_from_zero(model, hf, family, ids):
    v = torch.zeros(model.dims.d_model, requires_grad=True)
    logits, _ = model.run(ids, edits={SITE: splice.Add(v, heads=[0, 1])})
    logits[:, -1].logsumexp(-1).sum().backward()
    assert v.grad is not None and v.grad.abs().sum() > 0
    # The same change by hand: the projection's output gets 2v.
    w = torch.zeros(model.dims.d_model, requires_grad=True)
    handle = projection(hf, family).register_forward_hook(lambda m, a, out: out + 2 * w)
    try:
        hf(ids).logits[:, -1].logsumexp(-1).sum().backward()
    finally:
        handle.remove()
    torch.testing.assert_close(v.grad, w.grad, rtol=1e-5, atol=1e-6)


# -- cost: only when touched, only where touched --------------------------------------------------
def test_untouched_it_costs_nothing_and_touched_it_hooks_one_module(model, hf, family, ids):
    with torch.no_grad():
        bare = hf(ids).logits
        logits, _ = model.run(ids, record=["blocks.*.attn.out", "blocks.*.attn.z"])
        assert torch.equal(logits, bare)
    with model.record(SITE):
        path = model.layout.points["attn.z"].module.replace("{l}", str(LAYER))
        assert model.engine.installed() == {(path, "output")}  # no other layer, no other module
    before = hook_total(hf)
    with model.record(["blocks.*.resid_post", "blocks.0.attn.z"]), torch.no_grad():
        others = hf(ids).logits
    with model.record(["blocks.*.resid_post", "blocks.0.attn.z", SITE]) as rec, torch.no_grad():
        also = hf(ids).logits
    assert torch.equal(others, also) and torch.equal(also, bare)
    assert SITE in rec.sites and model.hook_count == 0 and hook_total(hf) == before


def test_recorded_alone_stopped_after_and_by_glob(model, hf, ids):
    with torch.no_grad():
        _, alone = model.run(ids, record=SITE)
        stopped, early = model.run(ids, record=SITE, stop_after_record=True)
        _, every = model.run(ids, record="blocks.*.attn.result")
    assert stopped is None and list(alone) == list(early) == [SITE]
    assert torch.equal(alone[SITE], early[SITE]) and torch.equal(alone[SITE], every[SITE])
    assert list(every) == [f"blocks.{l}.attn.result" for l in range(model.dims.n_layers)]


def test_transformerlens_hook_names_and_run_with_hooks(model, ids):
    def zero_head_1(result, hook):
        result[:, :, 1] = 0.0
        return result

    with torch.no_grad():
        want, _ = model.run(ids, edits={f"blocks.{LAYER}.attn.z": splice.Zero(heads=1)})
        got = model.run_with_hooks(ids, fwd_hooks=[(f"blocks.{LAYER}.attn.hook_result", zero_head_1)])
        _, cache = model.run_with_cache(ids, names_filter=lambda name: name.endswith("hook_result"))
    assert torch.equal(got, want)
    assert list(cache) == [f"blocks.{l}.attn.result" for l in range(model.dims.n_layers)]


# -- sweeps --------------------------------------------------------------------------------------
DATA = [{"prompt": p, "correct": "a", "wrong": "c"} for p in ["abcdefg", "bcd", "cdefgh", "defghij"]]


def test_sweep_over_heads_equals_one_at_a_time_and_the_z_sweep(family):
    tmodel = splice.Model(build(family), CharTokenizer())
    mets = [metrics.logit_diff(), metrics.kl_from_baseline()]
    sweep = splice.Sweep(
        sites="blocks.*.attn.result", interventions=splice.Zero(), over="heads", metrics=mets
    )
    batched = sweep.run(tmodel, DATA, batch_size=2, max_rows=7, progress=False)
    sequential = sweep.run(tmodel, DATA, batch_size=2, prefix_reuse=False, progress=False)
    by_z = splice.Sweep(sites="blocks.*.attn.z", interventions=splice.Zero(), over="heads", metrics=mets).run(
        tmodel, DATA, batch_size=2, progress=False
    )
    assert len(batched) == len(by_z) == (tmodel.dims.n_layers * tmodel.dims.n_heads + 1) * len(mets)
    for other in (sequential, by_z):
        torch.testing.assert_close(
            torch.tensor(batched.value.to_numpy()), torch.tensor(other.value.to_numpy()), rtol=1e-5, atol=1e-5
        )
    assert list(batched["head"].dropna().unique()) == list(range(tmodel.dims.n_heads))
    assert tmodel.hook_count == 0


# -- hostile input ---------------------------------------------------------------------------------
def test_heads_out_of_range_and_wrong_shapes_are_refused_naming_site_and_shapes(model, hf, ids):
    n, d = model.dims.n_heads, model.dims.d_model
    before = hook_total(hf)
    with pytest.raises(splice.SpliceError, match=rf"head.*{n}"):
        model.run(ids, edits={SITE: splice.Zero(heads=n)})
    with pytest.raises(splice.SpliceError, match=rf"\[{d + 1}\].*{SITE}.*head={n}, d_model={d}"):
        model.run(ids, edits={SITE: splice.Add(torch.ones(d + 1))})
    z_shaped = torch.ones(n, model.dims.d_head)  # z's shape, not result's
    with pytest.raises(splice.SpliceError, match=rf"\[{n}, {model.dims.d_head}\].*{SITE}"):
        model.run(ids, edits={SITE: splice.Replace(z_shaped)})
    with pytest.raises(splice.SpliceError, match=rf"\[2, 5, {n}, {d}\].*{SITE}.*\[2, 9, {n}, {d}\]"):
        model.run(ids, edits={SITE: splice.Replace(torch.ones(2, 5, n, d))})
    assert hook_total(hf) == before and model.hook_count == 0
    with torch.no_grad():
        assert torch.equal(model.run(ids)[0], hf(ids).logits)


def test_an_exception_mid_forward_leaves_no_hook(model, hf, ids):
    before = hook_total(hf)
    clean = hf(ids).logits.detach()

    def boom(x):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
        model.run(ids, edits={SITE: splice.Apply(boom)}, record="blocks.*.attn.result")
    assert hook_total(hf) == before and model.hook_count == 0
    assert torch.equal(hf(ids).logits, clean)


# -- generation ------------------------------------------------------------------------------------
PROMPT, NEW = 6, 4


def test_generation_with_a_kv_cache_and_positions(model, hf, ids):
    with torch.no_grad():
        hf.get_output_embeddings().weight.mul_(8)  # clear greedy margins
    prompt = ids[:, :PROMPT]
    marker = torch.full((model.dims.d_model,), 0.25)
    edit = {SITE: splice.Replace(marker, heads=0, pos=slice(PROMPT, None))}

    def generate(**kw):
        with torch.no_grad():
            return hf.generate(
                prompt,
                attention_mask=torch.ones_like(prompt),
                max_new_tokens=NEW,
                do_sample=False,
                pad_token_id=0,
                **kw,
            )

    plain = generate()
    with model.edit(edit), model.record(SITE, mode="accumulate") as rec:
        cached = generate(use_cache=True)
    with model.edit(edit):
        uncached = generate(use_cache=False)
    assert torch.equal(cached, uncached)
    steps = rec[SITE]
    assert len(steps) == NEW and steps[0].shape[1] == PROMPT  # the prompt, then one token per step
    assert not torch.any(steps[0][:, :, 0] == 0.25)  # the prompt is untouched
    for step in steps[1:]:
        assert (
            step.shape[1] == 1 and torch.all(step[:, :, 0] == 0.25) and not torch.any(step[:, :, 1] == 0.25)
        )
    assert cached.shape == plain.shape
    with (
        model.edit({SITE: splice.Zero(heads=0, pos=-1)}),
        pytest.raises(splice.SpliceError, match="negative"),
    ):
        generate()
