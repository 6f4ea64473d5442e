"""TransformerLens conveniences: weights in TL's layout read through the tables, unembed / ln_final,
Recording.stack over globs, run_with_cache / run_with_hooks, and the BOS rule of to_tokens.

Every weight is checked against an independent computation on every family fixture: recorded
activations (and a hand-written hook on the output projection), never splice's own reading.
Tolerances are stated where the math differs from the model's (a matmul against the fused or
per-head product): atol 1e-5 in float32; identical math is compared with torch.equal."""

from __future__ import annotations

import pytest
import torch
from conftest import CharTokenizer, build, hook_total
from families import FAMILIES
from transformers import LlamaConfig, LlamaForCausalLM

import splice

ATOL = 1e-5  # float32, matmul order differs from the model's fused projection


def close(a, b, what=""):
    torch.testing.assert_close(a, b, rtol=0, atol=ATOL, msg=lambda m: f"{what}: {m}")


# -- weights ---------------------------------------------------------------------------------------
def test_qkv_weights_reproduce_the_recorded_projections(model, ids):
    d = model.dims
    sites = [f"blocks.*.attn.{p}" for p in ("in", "q", "k", "v")]
    with torch.no_grad():
        _, cache = model.run(ids, record=sites)
    W = {p: getattr(model, f"W_{p}") for p in "QKV"}
    b = {p: getattr(model, f"b_{p}") for p in "QKV"}
    for p in "QKV":
        assert W[p].shape == (d.n_layers, d.n_heads, d.d_model, d.d_head), p
        assert b[p].shape == (d.n_layers, d.n_heads, d.d_head), p
    group = d.n_heads // d.n_kv_heads
    for l in range(d.n_layers):
        x = cache[f"blocks.{l}.attn.in"]
        for h in range(d.n_heads):
            for p in "QKV":
                head = h if p == "Q" else h // group  # the KV head query head h reads
                want = cache[f"blocks.{l}.attn.{p.lower()}"][..., head, :]
                close(x @ W[p][l, h] + b[p][l, h], want, f"{p} layer {l} head {h}")


def test_unrepeated_kv_weights_have_one_entry_per_kv_head(model, ids):
    d = model.dims
    with torch.no_grad():
        _, cache = model.run(ids, record=["blocks.-1.attn.in", "blocks.-1.attn.k", "blocks.-1.attn.v"])
    group = d.n_heads // d.n_kv_heads
    for p in "KV":
        kv = model.head_weights(f"W_{p}", repeat_kv=False)
        kv_bias = model.head_weights(f"b_{p}", repeat_kv=False)
        assert kv.shape == (d.n_layers, d.n_kv_heads, d.d_model, d.d_head)
        assert kv_bias.shape == (d.n_layers, d.n_kv_heads, d.d_head)
        repeated = getattr(model, f"W_{p}")
        for h in range(d.n_heads):
            assert torch.equal(repeated[:, h], kv[:, h // group])
        x = cache["blocks.-1.attn.in"]
        for g in range(d.n_kv_heads):
            close(x @ kv[-1, g] + kv_bias[-1, g], cache[f"blocks.-1.attn.{p.lower()}"][..., g, :], f"{p} {g}")
        one = model.head_weights(f"W_{p}", layer=-1, repeat_kv=False)
        assert torch.equal(one, kv[-1])


def test_output_weights_reproduce_the_output_projection(family, hf, model, ids):
    """sum_h z[..., h, :] @ W_O[l, h] + b_O[l] == the output projection's output, taken with a
    hand-written forward hook on the module (from the family's hand-written map, checked to be
    the module the table names for attn.z)."""
    d = model.dims
    outputs, handles = {}, []
    for l in range(d.n_layers):
        module, io = FAMILIES[family].hand_module(hf, "attn.z", l)
        assert io == "in"
        assert module is model.layout.module(model.layout.sites_of(f"blocks.{l}.attn.z")[0])
        handles.append(module.register_forward_hook(lambda mod, args, out, l=l: outputs.__setitem__(l, out)))
    try:
        with torch.no_grad():
            _, cache = model.run(ids, record="blocks.*.attn.z")
    finally:
        for handle in handles:
            handle.remove()
    W_O, b_O = model.W_O, model.b_O
    assert W_O.shape == (d.n_layers, d.n_heads, d.d_head, d.d_model)
    assert b_O.shape == (d.n_layers, d.d_model)
    for l in range(d.n_layers):
        z = cache[f"blocks.{l}.attn.z"]
        mine = sum(z[..., h, :] @ W_O[l, h] for h in range(d.n_heads)) + b_O[l]
        close(mine, outputs[l], f"layer {l}")
        close(torch.einsum("bphd,hdm->bpm", z, W_O[l]) + b_O[l], outputs[l], f"layer {l} einsum")


def test_unembed_and_ln_final_equal_the_model(hf, model, ids):
    with torch.no_grad():
        logits, cache = model.run(ids, record=["blocks.-1.resid_post", "final_norm"])
        assert torch.equal(model.unembed(cache["final_norm"]), logits)  # the same ops on the same tensor
        assert torch.equal(model.ln_final(cache["blocks.-1.resid_post"]), cache["final_norm"])
        # resid @ W_U + b_U is the logit lens by hand (soft-capped where the model caps).
        by_hand = cache["final_norm"] @ model.W_U + model.b_U
        cap = getattr(hf.config, "final_logit_softcapping", None)
        if cap is not None:
            by_hand = torch.tanh(by_hand / cap) * cap
        close(by_hand, logits, "resid @ W_U + b_U")
        # Gradients flow through both.
    resid = cache["blocks.-1.resid_post"].clone().requires_grad_()
    model.unembed(model.ln_final(resid)).sum().backward()
    assert resid.grad is not None and resid.grad.abs().sum() > 0


def test_embedding_and_unembedding_matrices(hf, model, ids):
    d = model.dims
    W_E, W_U, b_U = model.W_E, model.W_U, model.b_U
    assert W_E.shape == (d.vocab, d.d_model) and W_U.shape == (d.d_model, d.vocab) and b_U.shape == (d.vocab,)
    with torch.no_grad():
        assert torch.equal(W_E[ids], hf.get_input_embeddings()(ids))
        head = hf.get_output_embeddings()
        assert torch.equal(W_U, head.weight.T)
        assert torch.equal(b_U, head.bias if head.bias is not None else torch.zeros(d.vocab))


def test_weights_are_detached_copies_in_the_model_dtype(hf, model, ids):
    params = {id(p) for p in hf.parameters()}
    param_ptrs = {p.data_ptr() for p in hf.parameters()}
    with torch.no_grad():
        before = hf(ids).logits
    names = ["W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"]
    for name in names:
        value = getattr(model, name)
        assert id(value) not in params and value.data_ptr() not in param_ptrs, name
        assert not value.requires_grad and value.grad_fn is None, name
        assert value.dtype == torch.float32 and value.device == model.device, name
        value.add_(1.0)  # changing the copy must not change the model
        assert not torch.equal(getattr(model, name), value), name
    with torch.no_grad():
        assert torch.equal(hf(ids).logits, before)


def test_head_weights_by_layer_and_hostile_arguments(model):
    d = model.dims
    for name in ("W_Q", "W_K", "W_V", "W_O", "b_Q", "b_K", "b_V", "b_O"):
        stacked = getattr(model, name)
        assert torch.equal(model.head_weights(name, layer=-1), stacked[-1]), name
        assert torch.equal(model.head_weights(name, layer=0), stacked[0]), name
    with pytest.raises(splice.SpliceError, match=r"layer 3 is out of range.*3 layers"):
        model.head_weights("W_Q", layer=d.n_layers)
    with pytest.raises(splice.SpliceError, match=r"layer -4 is out of range"):
        model.head_weights("W_Q", layer=-d.n_layers - 1)
    with pytest.raises(splice.SpliceError, match="unknown head weight 'W_X'.*W_Q"):
        model.head_weights("W_X")
    with pytest.raises(splice.SpliceError, match="layer must be an int"):
        model.head_weights("W_Q", layer=1.0)


def test_unembed_and_ln_final_refuse_bad_residuals(model):
    d = model.dims
    for fn, name in ((model.unembed, "unembed"), (model.ln_final, "ln_final")):
        with pytest.raises(
            splice.SpliceError,
            match=rf"{name}: resid has shape \[2, 3, {d.d_model + 1}\].*d_model={d.d_model}",
        ):
            fn(torch.zeros(2, 3, d.d_model + 1))
        with pytest.raises(splice.SpliceError, match="floating-point"):
            fn(torch.zeros(2, d.d_model, dtype=torch.long))
        with pytest.raises(splice.SpliceError, match="float64.*float32"):
            fn(torch.zeros(2, d.d_model, dtype=torch.float64))
    assert model.unembed(torch.zeros(d.d_model)).shape == (d.vocab,)


def test_tokens_to_residual_directions_are_W_U_columns(hf):
    model = splice.Model(hf, CharTokenizer())
    W_U = model.W_U
    a, b = model.to_single_token("a"), model.to_single_token("b")
    assert torch.equal(model.tokens_to_residual_directions("a"), W_U[:, a])
    assert torch.equal(model.tokens_to_residual_directions(["a", "b"]), W_U[:, [a, b]].T)
    assert torch.equal(model.tokens_to_residual_directions(a), W_U[:, a])
    assert torch.equal(model.tokens_to_residual_directions([a, b]), W_U[:, [a, b]].T)
    grid = torch.tensor([[a, b, a], [b, b, a]])
    assert torch.equal(model.tokens_to_residual_directions(grid), W_U[:, grid].permute(1, 2, 0))
    with pytest.raises(
        splice.SpliceError, match=r"'ab' is 2 tokens.*expected a string that is a single token"
    ):
        model.tokens_to_residual_directions("ab")
    with pytest.raises(splice.SpliceError, match=r"token id 97 is out of range.*97 columns"):
        model.tokens_to_residual_directions(97)
    with pytest.raises(splice.SpliceError, match=r"token id -1 is out of range"):
        model.tokens_to_residual_directions(torch.tensor([-1, 3]))
    for bad in (1.5, torch.tensor([1.0]), torch.tensor([True]), [], ["a", 3]):
        with pytest.raises(splice.SpliceError, match="tokens_to_residual_directions takes"):
            model.tokens_to_residual_directions(bad)


def test_a_bare_decoder_has_no_unembedding(hf):
    decoder = getattr(hf, splice.Model(hf).layout.arch.decoder)
    bare = splice.Model(decoder)
    assert bare.W_Q.shape[0] == bare.dims.n_layers  # the attention weights are there
    with pytest.raises(splice.SpliceError, match=r"has no output embedding \(lm_head\).*bare decoder"):
        _ = bare.W_U


# -- Recording.stack over globs ------------------------------------------------------------------
@pytest.fixture(scope="module")
def deep():
    """A 12-layer Llama: layer 10 and 11 sort before 2 lexically, not numerically."""
    torch.manual_seed(0)
    config = LlamaConfig(
        num_hidden_layers=12,
        hidden_size=16,
        num_attention_heads=2,
        num_key_value_heads=1,
        head_dim=8,
        intermediate_size=16,
        vocab_size=97,
        max_position_embeddings=32,
    )
    return splice.Model(LlamaForCausalLM(config).eval())


def test_stack_orders_a_glob_by_layer_with_labels(deep, ids):
    with torch.no_grad():
        _, cache = deep.run(ids, record="blocks.*.resid_post")
        hidden = deep.hf(ids, output_hidden_states=True).hidden_states
    stacked, labels = cache.stack("blocks.*.resid_post", return_labels=True)
    assert labels == [f"blocks.{l}.resid_post" for l in range(12)]
    assert stacked.shape == (12, 2, 9, 16)
    for l in range(12):
        assert torch.equal(stacked[l], cache[labels[l]])
    assert torch.equal(stacked[:-1], torch.stack(hidden[1:-1]))  # HF's last entry is after the norm
    assert torch.equal(cache.stack([f"blocks.{l}.hook_resid_post" for l in range(12)]), stacked)
    # A subset recorded in any order comes back by layer; a list keeps the order given.
    with torch.no_grad():
        _, some = deep.run(
            ids, record=["blocks.11.resid_post", "blocks.2.resid_post", "blocks.10.resid_post"]
        )
    _, labels = some.stack("blocks.*.resid_post", return_labels=True)
    assert labels == ["blocks.2.resid_post", "blocks.10.resid_post", "blocks.11.resid_post"]
    _, labels = some.stack(["blocks.11.resid_post", ("resid_post", 2)], return_labels=True)
    assert labels == ["blocks.11.resid_post", "blocks.2.resid_post"]
    _, labels = cache.stack("blocks.1*.resid_post", return_labels=True)
    assert labels == ["blocks.1.resid_post", "blocks.10.resid_post", "blocks.11.resid_post"]


def test_stack_errors_name_the_pattern_and_what_was_recorded(model, ids):
    with torch.no_grad():
        _, cache = model.run(ids, record=["blocks.0.resid_post", "blocks.0.attn.q", "blocks.1.resid_post"])
    with pytest.raises(
        splice.SpliceError, match=r"'blocks.\*.attn.z' matches no recorded site.*blocks.0.resid_post"
    ):
        cache.stack("blocks.*.attn.z")
    with pytest.raises(splice.SpliceError, match=r"different shapes.*blocks.0.attn.q \[2, 9, \d+, \d+\]"):
        cache.stack("blocks.0.*")
    with pytest.raises(splice.SpliceError, match="names no site"):
        cache.stack([])
    with pytest.raises(splice.SpliceError, match="matches no site of this model"):
        cache.stack("blocks.*.nothing")
    with pytest.raises(splice.SpliceError, match=r"names \d+ sites.*stack\(key\)"):
        cache.cat("blocks.*.resid_post")


def test_stack_of_a_glob_in_accumulate_mode_and_the_single_site_form(model, ids):
    with torch.no_grad(), model.record("blocks.*.resid_post", mode="accumulate") as rec:
        model(ids)
        model(ids)
        model(ids)
    L = model.dims.n_layers
    stacked = rec.stack("blocks.*.resid_post")
    assert stacked.shape == (L, 3, 2, 9, model.dims.d_model)  # [site, entry, batch, pos, d_model]
    assert torch.equal(stacked[1], rec.stack("blocks.1.resid_post"))  # the single-site form is unchanged
    tensor, labels = rec.stack("blocks.1.resid_post", return_labels=True)
    assert labels == ["blocks.1.resid_post"] and tensor.shape == (3, 2, 9, model.dims.d_model)


def test_recording_repr_and_html(model, ids):
    with torch.no_grad():
        _, cache = model.run(ids, record=["blocks.0.resid_post", "blocks.1.attn.z"])
    text = repr(cache)
    d = model.dims
    assert "overwrite, 2 of 2 sites recorded" in text
    assert "blocks.0.resid_post" in text and f"[2, 9, {d.d_model}]" in text and "float32" in text
    assert f"[2, 9, {d.n_heads}, {d.d_head}]" in text
    html = cache._repr_html_()
    assert "<table>" in html and "blocks.1.attn.z" in html and "float32" in html
    with torch.no_grad(), model.record("blocks.0.resid_post", mode="accumulate") as rec:
        model(ids)
        model(ids[:1])
    assert "2 entries x [1, 9, " in repr(rec) and "accumulate" in repr(rec)
    big = model.run(ids, record="*")[1]
    assert "more sites" in repr(big)


# -- run_with_hooks / run_with_cache -------------------------------------------------------------
def zero_head_1(z, hook):
    z[:, :, 1] = 0.0
    return z


def test_run_with_hooks_equals_the_declarative_edit(model, ids):
    with torch.no_grad():
        want, _ = model.run(ids, edits={"blocks.1.attn.z": splice.Zero(heads=1)})
        got = model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.hook_z", zero_head_1)])
        assert torch.equal(got, want)

        def in_place_only(z, hook):  # TL: in-place changes with a None return count
            z[:, :, 1] = 0.0

        assert torch.equal(model.run_with_hooks(ids, fwd_hooks=[(("z", 1), in_place_only)]), want)
    assert model.hook_count == 0


def test_run_with_hooks_keeps_what_a_none_hook_returns_and_names_the_site(model, ids):
    seen = []

    def look(x, hook):
        seen.append((hook.name, hook.layer(), tuple(x.shape)))

    L, d = model.dims.n_layers, model.dims
    with torch.no_grad():
        clean = model(ids)
        got = model.run_with_hooks(
            ids,
            fwd_hooks=[
                (("z", -1), look),
                ("blocks.0.hook_resid_post", look),
                ("embed", lambda x, hook: None),
            ],
        )
    assert torch.equal(got, clean)
    assert seen == [
        ("blocks.0.resid_post", 0, (2, 9, d.d_model)),
        (f"blocks.{L - 1}.attn.z", L - 1, (2, 9, d.n_heads, d.d_head)),
    ]
    with torch.no_grad():
        assert torch.equal(model.run_with_hooks(ids, fwd_hooks=[]), clean)
        assert model.run_with_hooks(ids, fwd_hooks=[], return_type=None) is None


def test_run_with_hooks_name_filters_and_globs(model, ids):
    names = []
    record = lambda x, hook: names.append(hook.name)  # noqa: E731
    with torch.no_grad():
        model.run_with_hooks(ids, fwd_hooks=[(lambda n: n.endswith("attn.hook_z"), record)])  # TL name
        L = model.dims.n_layers
        assert names == [f"blocks.{l}.attn.z" for l in range(L)]
        names.clear()
        model.run_with_hooks(ids, fwd_hooks=[("blocks.*.resid_post", record)])
        assert names == [f"blocks.{l}.resid_post" for l in range(L)]
    with pytest.raises(splice.SpliceError, match="accepts no site name"):
        model.run_with_hooks(ids, fwd_hooks=[(lambda n: False, record)])


def test_run_with_hooks_on_attention_patterns_and_several_hooks_per_site(model, ids):
    if "attn.pattern" not in model.layout.points:  # Falcon, BLOOM: attention computed inline
        with pytest.raises(splice.SpliceError):
            model.run_with_hooks(ids, fwd_hooks=[("blocks.0.attn.hook_pattern", lambda p, hook: p)])
        assert model.hook_count == 0
        return
    order = []

    def first(p, hook):
        order.append("first")
        return p * 0.5

    def second(p, hook):
        order.append("second")
        assert hook.name == "blocks.1.attn.pattern" and p.shape[1] == model.dims.n_heads

    with torch.no_grad():
        want, _ = model.run(ids, edits={"blocks.1.attn.pattern": splice.Scale(0.5)})
        got = model.run_with_hooks(
            ids, fwd_hooks=[("blocks.1.attn.hook_pattern", first), ("blocks.1.attn.pattern", second)]
        )
    assert order == ["first", "second"] and torch.equal(got, want)
    assert model.hook_count == 0


def test_hook_layer_of_a_global_site_is_an_error():
    assert splice.engine.tl_hooks.Hook("blocks.11.attn.z").layer() == 11
    with pytest.raises(splice.SpliceError, match="final_norm is not a layer's site"):
        splice.engine.tl_hooks.Hook("final_norm").layer()


def test_run_with_hooks_on_a_padded_batch_sees_the_whole_site(hf):
    model = splice.Model(hf, CharTokenizer())
    prompts = ["ab", "abcdef"]
    shapes = []

    def zero(z, hook):
        shapes.append(tuple(z.shape))
        return zero_head_1(z, hook)

    with torch.no_grad():
        want, _ = model.run(prompts, edits={"blocks.1.attn.z": splice.Zero(heads=1)})
        got = model.run_with_hooks(prompts, fwd_hooks=[("blocks.1.attn.z", zero)])
    assert shapes == [(2, 6, model.dims.n_heads, model.dims.d_head)]
    assert torch.equal(got, want)


def test_run_with_hooks_cleans_up_after_an_exception_in_the_hook(hf, model, ids):
    before = hook_total(hf)
    with torch.no_grad():
        clean = model(ids)

    def boom(x, hook):
        raise RuntimeError("boom")

    with pytest.raises(RuntimeError, match="boom"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.z", boom)])
    assert model.hook_count == 0 and hook_total(hf) == before
    with torch.no_grad():
        assert torch.equal(model(ids), clean)


def test_run_with_hooks_refuses_a_wrong_shape_and_unmappable_arguments(model, ids):
    d = model.dims
    with pytest.raises(
        splice.SpliceError,
        match=rf"at blocks.1.attn.z returned a torch.float32 tensor of shape \[2, 9, {d.n_heads}\]; "
        rf"expected a torch.float32 tensor of shape \[2, 9, {d.n_heads}, {d.d_head}\]",
    ):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.z", lambda z, hook: z.sum(-1))])
    with pytest.raises(splice.SpliceError, match="returned int"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.z", lambda z, hook: 3)])
    assert model.hook_count == 0
    hook = ("blocks.1.attn.z", zero_head_1)
    refused = {
        "bwd_hooks": ([hook], "no splice equivalent.*backward hooks"),
        "stop_at_layer": (2, "stop_after_record=True"),
        "reset_hooks_end": (False, "always removes its hooks"),
        "return_type": ("loss", "cross_entropy"),
        "padding_side": ("right", "on the left"),
        "prepend_bos": (True, "applies to text"),
    }
    for name, (value, message) in refused.items():
        with pytest.raises(splice.SpliceError, match=message):
            model.run_with_hooks(ids, fwd_hooks=[hook], **{name: value})
    with pytest.raises(splice.SpliceError, match="list of \\(site, fn\\) pairs"):
        model.run_with_hooks(ids, fwd_hooks=hook[1])
    with pytest.raises(splice.SpliceError, match=r"fwd_hooks\[0\] must be a \(site, fn\) pair"):
        model.run_with_hooks(ids, fwd_hooks=[hook[0]])
    with pytest.raises(splice.SpliceError, match=r"fwd_hooks\[0\]: the hook must be a function"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.z", "zero")])
    with pytest.raises(splice.SpliceError, match="unknown site"):
        model.run_with_hooks(ids, fwd_hooks=[("blocks.1.attn.zz", zero_head_1)])
    with pytest.raises(splice.SpliceError, match="out of range"):
        model.run_with_hooks(ids, fwd_hooks=[(("z", -99), zero_head_1)])
    with torch.no_grad():  # empty bwd_hooks, clear_contexts and the defaults are accepted
        model.run_with_hooks(ids, fwd_hooks=[hook], bwd_hooks=[], clear_contexts=True, reset_hooks_end=True)
    assert model.hook_count == 0


def test_run_with_cache_equals_run_with_record(model, ids):
    with torch.no_grad():
        logits, cache = model.run_with_cache(ids)
        want_logits, want = model.run(ids, record="*")
    assert torch.equal(logits, want_logits)
    assert list(cache) == list(want) == model.layout.site_names()
    for name in want:
        assert torch.equal(cache[name], want[name]), name
    L = model.dims.n_layers
    posts = [f"blocks.{l}.resid_post" for l in range(L)]
    with torch.no_grad():
        want_logits, want = model.run(ids, record=posts)  # no pattern site: attention runs its own kernel
        for names_filter in (
            "blocks.*.resid_post",
            [f"blocks.{l}.hook_resid_post" for l in range(L)],
            lambda name: name.endswith("hook_resid_post"),  # TL names
            lambda name: name.endswith(".resid_post"),  # canonical names
        ):
            logits, cache = model.run_with_cache(ids, names_filter=names_filter)
            assert list(cache) == posts
            assert torch.equal(logits, want_logits)
            for name in posts:
                assert torch.equal(cache[name], want[name])
        none, plain = model.run_with_cache(
            ids, names_filter="final_norm", return_type=None, return_cache_object=False
        )
    assert none is None and type(plain) is dict and list(plain) == ["final_norm"]
    assert model.hook_count == 0
    with pytest.raises(splice.SpliceError, match="incl_bwd"):
        model.run_with_cache(ids, incl_bwd=True)
    with pytest.raises(splice.SpliceError, match="remove_batch_dim.*\\[0\\]"):
        model.run_with_cache(ids, remove_batch_dim=True)
    with pytest.raises(splice.SpliceError, match="accepts no site name"):
        model.run_with_cache(ids, names_filter=lambda n: "nothing" in n)
    with pytest.raises(splice.SpliceError, match="names_filter must be"):
        model.run_with_cache(ids, names_filter=3)


# -- tokens and the BOS rule ---------------------------------------------------------------------
BOS = ord("~") % 90 + 1  # CharTokenizer's id for "~": our stand-in BOS


class BosCharTokenizer(CharTokenizer):
    """CharTokenizer with a BOS token its rule does not add (like GPT-2's and SmolLM2's)."""

    bos_token_id = BOS


class AddsBosCharTokenizer(BosCharTokenizer):
    """... and one whose rule adds it (like Llama's)."""

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = super().__call__(text)["input_ids"]
        return {"input_ids": [BOS] + ids if add_special_tokens else ids}


def chars(text):
    return [ord(c) % 90 + 1 for c in text]


@pytest.fixture
def tiny_hf():
    return build("llama")


def test_prepend_bos_with_a_tokenizer_without_bos(tiny_hf):
    model = splice.Model(tiny_hf, CharTokenizer())
    assert model.to_tokens("abc")[0].tolist() == chars("abc")
    assert model.to_tokens("abc", prepend_bos=False)[0].tolist() == chars("abc")
    with pytest.raises(splice.SpliceError, match="prepend_bos=True, but this tokenizer .*has no BOS"):
        model.to_tokens("abc", prepend_bos=True)
    with pytest.raises(splice.SpliceError, match="prepend_bos must be None"):
        model.to_tokens("abc", prepend_bos="yes")


@pytest.mark.parametrize(
    "tokenizer", [BosCharTokenizer(), AddsBosCharTokenizer()], ids=["rule_adds_none", "rule_adds_bos"]
)
def test_prepend_bos_true_false_none_never_doubles(tiny_hf, tokenizer):
    model = splice.Model(tiny_hf, tokenizer)
    adds = isinstance(tokenizer, AddsBosCharTokenizer)
    rule = [BOS] if adds else []
    assert model.to_tokens("abc")[0].tolist() == rule + chars("abc")
    assert model.to_tokens("abc", prepend_bos=True)[0].tolist() == [BOS] + chars("abc")
    assert model.to_tokens("abc", prepend_bos=False)[0].tolist() == chars("abc")
    # Text that starts with BOS: never two; with False the BOS written in the text stays (it is text).
    for setting in (None, True, False):
        assert model.to_tokens("~abc", prepend_bos=setting)[0].tolist() == [BOS] + chars("abc"), setting
    assert model.to_str_tokens("ab", prepend_bos=True) == [tokenizer.decode([i]) for i in [BOS] + chars("ab")]
    # Batches: BOS per row, then left padding.
    batch = model.to_tokens(["ab", "abcd"], prepend_bos=True)
    assert batch.tolist() == [[0, 0, BOS] + chars("ab"), [BOS] + chars("abcd")]
    # The same rule reaches run_with_cache / run_with_hooks.
    with torch.no_grad():
        logits, _ = model.run_with_cache("ab", names_filter="embed", prepend_bos=True)
        assert torch.equal(logits, model(model.to_tokens("ab", prepend_bos=True)))
        assert model.run_with_hooks("ab", prepend_bos=False).shape[1] == 2


def test_token_helpers_refuse_what_is_not_text(tiny_hf):
    model = splice.Model(tiny_hf, BosCharTokenizer())
    with pytest.raises(splice.SpliceError, match="applies to text"):
        splice.tokens.encode(model.tokenizer, torch.tensor([[1, 2]]), prepend_bos=True)
    with pytest.raises(splice.SpliceError, match="applies to text"):
        model.to_str_tokens([1, 2], prepend_bos=False)
    with pytest.raises(splice.SpliceError, match="string or a non-empty list of strings"):
        model.to_tokens(torch.tensor([1, 2]))
    with pytest.raises(splice.SpliceError, match="has no tokens"):
        model.to_tokens("")
    decoded = [[model.tokenizer.decode([i]) for i in chars(t)] for t in ("ab", "c")]
    assert model.to_str_tokens(["ab", "c"]) == decoded
    assert model.to_string(torch.tensor(chars("ab"))) == "".join(decoded[0])


@pytest.mark.real
def test_smollm2_bos_rule_and_weights(smol):
    tokenizer = smol.tokenizer
    bos = tokenizer.bos_token_id
    plain = tokenizer("When Mary and John")["input_ids"]
    assert plain[0] != bos  # SmolLM2's tokenizer adds no BOS by default
    assert smol.to_tokens("When Mary and John")[0].tolist() == plain
    assert smol.to_tokens("When Mary and John", prepend_bos=False)[0].tolist() == plain
    assert smol.to_tokens("When Mary and John", prepend_bos=True)[0].tolist() == [bos] + plain
    assert (
        smol.to_tokens(tokenizer.bos_token + "When", prepend_bos=True)[0].tolist()
        == [bos] + tokenizer("When")["input_ids"]
    )
    # GQA weights (9 query heads reading 3 KV heads) on the real model, first and last layer.
    d = smol.dims
    with torch.no_grad():
        logits, cache = smol.run_with_cache(
            "When Mary and John",
            names_filter=["blocks.0.attn.*", f"blocks.{d.n_layers - 1}.attn.*", "final_norm"],
        )
    group = d.n_heads // d.n_kv_heads
    for l in (0, d.n_layers - 1):
        x = cache[f"blocks.{l}.attn.in"]
        W_K = smol.head_weights("W_K", layer=l)
        for h in range(d.n_heads):
            torch.testing.assert_close(
                x @ W_K[h], cache[f"blocks.{l}.attn.k"][..., h // group, :], rtol=0, atol=1e-4
            )
    assert torch.equal(smol.unembed(cache["final_norm"]), logits)
    mary = smol.tokens_to_residual_directions(" Mary")
    assert mary.shape == (d.d_model,)
    torch.testing.assert_close(
        cache["final_norm"][0, -1] @ mary, logits[0, -1, smol.to_single_token(" Mary")]
    )


def test_splice_arguments_in_a_tl_call_are_refused_with_the_splice_call(model, ids):
    with pytest.raises(splice.SpliceError, match="edits= belong.*m.run"):
        model.run_with_hooks(ids, fwd_hooks=[], edits={"blocks.0.mlp.out": splice.Zero()})
    with pytest.raises(splice.SpliceError, match="record, stop_after_record= belong"):
        model.run_with_cache(ids, record="blocks.0.mlp.out", stop_after_record=True)
    assert model.hook_count == 0
