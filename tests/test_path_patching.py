"""Path patching: both passes equal a hand-written two-pass implementation with plain torch hooks
(no splice), the identities of the definition hold, the batched sweep equals one sender at a time,
and a checkpointed sweep resumes without recomputing."""

import pytest
import torch
from conftest import CharTokenizer, build
from families import FAMILIES
from handhooks import register

import splice
from splice import metrics
from splice.path_patching import nodes, path_patch, path_patch_sweep

PAIRS = [("abcdefg", "abcxefg"), ("bcdefgh", "bcdyfgh"), ("cdefg", "cdzfg"), ("defghij", "dxfghij")]
DATA = [{"prompt": corrupt, "clean": clean, "correct": "h", "wrong": "b"} for clean, corrupt in PAIRS]
EVEN = DATA[:2] + DATA[3:]  # one length: no padding, for by-hand references
METRIC = metrics.logit_diff()
# every family: GQA and MQA, fused QKV, parallel residuals, norms after the sublayers, flat MLPs
HAND_FAMILIES = sorted(FAMILIES)


def _model(family):
    return splice.Model(build(family), CharTokenizer())


def _ids(model, field):
    return torch.stack([model.to_tokens(d[field])[0] for d in EVEN])


def _logit_diff(logits, model):
    a, b = model.to_single_token("h"), model.to_single_token("b")
    return logits[:, -1, a] - logits[:, -1, b]


def _capture(hf, family, site, ids, hooks=()):
    """The site's tensor in a forward of `ids` with the given (site, fn) hand hooks in place."""
    seen = []

    def keep(t):
        seen.append(t.clone())
        return t

    handles = [register(hf, family, s, fn) for s, fn in hooks] + [register(hf, family, site, keep)]
    try:
        with torch.no_grad():
            hf(ids)
    finally:
        for h in handles:
            h.remove()
    return seen[0]


def hand_path_patch(model, family, senders, receivers):
    """Path patching by hand: senders [(layer, head or None for the MLP)], receivers
    [(point, layer, head or None)] or "logits". Returns the mean metric of pass 2."""
    hf = model.hf
    base_ids, source_ids = _ids(model, "prompt"), _ids(model, "clean")
    n_layers = model.dims.n_layers
    top = n_layers - 1 if receivers == "logits" else max(layer for _, layer, _ in receivers)
    freeze = []
    for layer in range(top + 1):
        for site, is_head in ((f"blocks.{layer}.attn.z", True), (f"blocks.{layer}.mlp.out", False)):
            base = _capture(hf, family, site, base_ids)
            source = _capture(hf, family, site, source_ids)
            heads = [h for (sl, h) in senders if sl == layer and h is not None] if is_head else []
            mlp = any(sl == layer and h is None for sl, h in senders)

            def fn(t, base=base, source=source, heads=heads, whole=(not is_head and mlp)):
                new = source.clone() if whole else base.clone()
                for h in heads:
                    new[:, :, h] = source[:, :, h]
                return new

            freeze.append((site, fn))
    if receivers == "logits":
        return float(_logit_diff(_hooked_logits(hf, family, freeze, base_ids), model).mean())
    recorded = {
        (point, layer): _capture(hf, family, f"blocks.{layer}.{point}", base_ids, freeze)
        for point, layer, _ in receivers
    }
    writes = []
    for point, layer, head in receivers:
        value = recorded[(point, layer)]

        def write(t, value=value, head=head):
            if head is None:
                return value.clone()
            t[:, :, head] = value[:, :, head]
            return t

        writes.append((f"blocks.{layer}.{point}", write))
    return float(_logit_diff(_hooked_logits(hf, family, writes, base_ids), model).mean())


def _hooked_logits(hf, family, hooks, ids):
    """The bare model's logits with hand-written hooks (site, fn) in place, removed afterwards."""
    handles = [register(hf, family, s, fn) for s, fn in hooks]
    try:
        with torch.no_grad():
            return hf(ids).logits
    finally:
        for h in handles:
            h.remove()


def _receiver_name(point, layer, head):
    return f"blocks.{layer}.{point}" + ("" if head is None else f".h{head}")


def _sender_name(layer, head):
    return f"blocks.{layer}.mlp" if head is None else f"blocks.{layer}.attn.h{head}"


CASES = [
    # senders, receivers
    ([(0, 1)], [("attn.q", 2, 1)]),
    ([(0, 1), (1, None)], [("attn.k", 2, 1), ("attn.v", 2, 0), ("mlp.in", 1, None)]),
    ([(0, None), (1, 2)], [("attn.q", 2, None), ("attn.v", 1, None)]),
    ([(1, 0)], "logits"),
]


@pytest.mark.parametrize("family", HAND_FAMILIES)
def test_path_patch_equals_two_passes_by_hand(family):
    model = _model(family)
    base_ids, source_ids = _ids(model, "prompt"), _ids(model, "clean")
    with torch.no_grad():
        baseline = float(_logit_diff(model.hf(base_ids).logits, model).mean())
        source = float(_logit_diff(model.hf(source_ids).logits, model).mean())
    kv, moved = model.dims.n_kv_heads, []
    for senders, receivers in CASES:
        if receivers != "logits":  # key/value heads exist up to n_kv_heads (1 under multi-query attention)
            receivers = [(p, layer, h if h is None or p == "attn.q" else h % kv) for p, layer, h in receivers]
        names = "logits" if receivers == "logits" else [_receiver_name(*r) for r in receivers]
        table = path_patch(model, EVEN, [_sender_name(*s) for s in senders], names, METRIC)
        row = table[table.variant == 0].iloc[0]
        expected = hand_path_patch(model, family, senders, receivers)
        assert row.value == pytest.approx(expected, abs=1e-5), (senders, receivers)
        assert row.baseline == pytest.approx(baseline, abs=1e-5)
        assert row.source == pytest.approx(source, abs=1e-5)
        assert row.effect == pytest.approx(row.value - row.baseline, abs=1e-12)
        # Random tiny models move the metric little (1e-7..1e-2): the effect itself must agree too
        assert row.effect == pytest.approx(expected - baseline, rel=1e-3, abs=1e-7), (senders, receivers)
        moved.append(abs(expected - baseline) > 1e-6)
    assert sum(moved) >= 3, "the cases must move the metric, or they test nothing"
    assert model.hook_count == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_head_to_logits_is_the_heads_direct_logit_change(family):
    """With every other node frozen, the final residual stream is the base run's plus the head's
    output change through W_O: its logits, by hand, are path patching's value."""
    model = _model(family)
    hf = model.hf
    base_ids, source_ids = _ids(model, "prompt"), _ids(model, "clean")
    layer, head, d = 0, 1, model.dims.d_head
    z_base = _capture(hf, family, f"blocks.{layer}.attn.z", base_ids)[:, :, head]
    z_source = _capture(hf, family, f"blocks.{layer}.attn.z", source_ids)[:, :, head]
    final = _capture(hf, family, f"blocks.{model.dims.n_layers - 1}.resid_post", base_ids)
    if family == "gpt2":  # Conv1D: out = z @ W, W [d_model (heads x d_head), d_model]
        w_o = hf.transformer.h[layer].attn.c_proj.weight[head * d : (head + 1) * d]
        final_norm = hf.transformer.ln_f
    else:  # Linear: out = z @ W.T, W [d_model, heads x d_head]
        w_o = hf.model.layers[layer].self_attn.o_proj.weight[:, head * d : (head + 1) * d].T
        final_norm = hf.model.norm
    with torch.no_grad():
        logits = hf.lm_head(final_norm(final + (z_source - z_base) @ w_o))
    expected = float(_logit_diff(logits, model).mean())
    table = path_patch(model, EVEN, f"blocks.{layer}.attn.h{head}", "logits", METRIC)
    assert table[table.variant == 0].value.iloc[0] == pytest.approx(expected, abs=1e-5)


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_identities(family):
    model = _model(family)
    nothing = path_patch(model, DATA, [], "blocks.2.attn.q", METRIC)
    assert (nothing.effect == 0).all()
    # a sender after the receiver's layer has no path: exactly the baseline
    later = path_patch(model, DATA, ["blocks.2.attn.h0", "blocks.2.mlp"], "blocks.1.attn.k.h1", METRIC)
    assert (later.effect == 0).all()
    # heads of a layer do not reach that layer's q/k/v, nor an MLP its own input: computed, ~0
    same = path_patch(
        model, DATA, ["blocks.1.attn.h0", "blocks.1.mlp"], ["blocks.1.attn.q", "blocks.1.attn.v"], METRIC
    )
    assert same[same.variant == 0].effect.abs().max() < 1e-5
    mlp = path_patch(model, DATA, "blocks.1.mlp", "blocks.1.mlp.in", METRIC)
    assert mlp[mlp.variant == 0].effect.abs().max() < 1e-5
    # patching from the base prompts themselves changes nothing
    itself = [{**d, "clean": d["prompt"]} for d in DATA]
    self_patch = path_patch(model, itself, "blocks.*", "logits", METRIC)
    assert self_patch[self_patch.variant == 0].effect.abs().max() < 1e-5
    # every node as a sender into the logits restores the source run (nothing is left frozen)
    everything = path_patch(model, EVEN, "blocks.*", "logits", METRIC)
    row = everything[everything.variant == 0].iloc[0]
    assert row.value == pytest.approx(row.source, abs=1e-5)
    assert model.hook_count == 0


@pytest.mark.parametrize("family", ["llama", "gpt2"])
def test_sweep_batched_equals_one_sender_at_a_time(family):
    model = _model(family)
    senders = nodes(model, "blocks.[01].*") + ["blocks.2.attn.h0"]
    both = [METRIC, metrics.kl_from_baseline()]
    for receivers in (["blocks.2.attn.q.h1", "blocks.1.mlp.in"], "logits"):
        table = path_patch_sweep(
            model, DATA, senders, receivers, both, batch_size=3, max_rows=7, progress=False
        )
        assert list(table[table.variant >= 0].sender.unique()) == senders
        for i, sender in enumerate(senders):
            one = path_patch(model, DATA, sender, receivers, both, batch_size=3)
            for metric in ("logit_diff", "kl_from_baseline"):
                got = table[(table.variant == i) & (table.metric == metric)].iloc[0]
                want = one[(one.variant == 0) & (one.metric == metric)].iloc[0]
                for column in ("value", "baseline", "source", "effect"):
                    assert got[column] == pytest.approx(want[column], abs=1e-5), (sender, metric, column)
                assert got.receiver == want.receiver
    grid = splice.grid(table[table.sender.str.contains("attn")], metric="logit_diff")
    assert grid.shape == (3, model.dims.n_heads)
    assert model.hook_count == 0


def test_checkpoint_resume_recomputes_nothing(tmp_path):
    model = _model("llama")
    forwards = []
    handle = model.hf.register_forward_hook(lambda *a: forwards.append(1))
    path = tmp_path / "paths.jsonl"
    run = dict(
        senders="blocks.*",
        receivers="blocks.2.attn.q",
        metrics=METRIC,
        batch_size=2,
        max_rows=4,
        progress=False,
    )
    try:
        first = path_patch_sweep(model, DATA, checkpoint=path, **run)
        fresh = len(forwards)
        forwards.clear()
        again = path_patch_sweep(model, DATA, checkpoint=path, **run)
        assert forwards == []  # nothing recomputed
        assert again.equals(first)
        # a sweep cut off: the last results lost, the rest resumed
        lines = path.read_text().splitlines(keepends=True)
        path.write_text("".join(lines[: len(lines) - 3]))
        resumed = path_patch_sweep(model, DATA, checkpoint=path, **run)
        assert 0 < len(forwards) < fresh
        torch.testing.assert_close(
            torch.tensor(resumed.value.to_numpy(float)),
            torch.tensor(first.value.to_numpy(float)),
            rtol=0,
            atol=1e-6,
        )
        with pytest.raises(splice.SpliceError, match="different sweep"):
            path_patch_sweep(model, DATA, checkpoint=path, **{**run, "receivers": "logits"})
    finally:
        handle.remove()


def test_bad_names_are_refused():
    model = _model("llama")  # 3 layers, 6 query heads, 2 key/value heads
    for senders, receivers, message in [
        ("blocks.0.attn.h6", "logits", "head 6 is out of range"),
        ("blocks.3.mlp", "logits", "layer 3 is out of range"),
        ("blocks.0.attn.z", "logits", "unknown sender"),
        (("blocks.0.attn", 1), "logits", "node names"),
        ("blocks.*.attn.x*", "logits", "matches no node"),
        ("blocks.0.mlp", "blocks.1.attn.q.h6", "6 query heads"),
        ("blocks.0.mlp", "blocks.1.attn.k.h2", "2 key/value heads"),
        ("blocks.0.mlp", "blocks.1.attn.o", "unknown receiver"),
        ("blocks.0.mlp", "blocks.1.mlp.out", "unknown receiver"),
        ("blocks.0.mlp", ["logits", "blocks.1.mlp.in"], "cannot be combined"),
        ("blocks.0.mlp", [], "at least one receiver"),
    ]:
        with pytest.raises(splice.SpliceError, match=message):
            path_patch(model, EVEN, senders, receivers, METRIC)
    with pytest.raises(splice.SpliceError, match="at least one metric"):
        path_patch(model, EVEN, "blocks.0.mlp", "logits", [])
    with pytest.raises(splice.SpliceError, match="'clean' prompt needs as many tokens"):
        path_patch(model, [{**EVEN[0], "clean": "abc"}], "blocks.0.mlp", "logits", METRIC)
    with pytest.raises(splice.SpliceError, match="field 'other'"):
        path_patch(model, EVEN, "blocks.0.mlp", "logits", METRIC, source="other")
    assert nodes(model, "blocks.-1.mlp") == ["blocks.2.mlp"]
    assert nodes(model, "blocks.-2.*") == [f"blocks.1.attn.h{h}" for h in range(6)] + ["blocks.1.mlp"]
    assert model.hook_count == 0


def test_no_hooks_left_after_an_exception():
    """A forward that fails inside either pass (a plain hook raising in the middle of the model,
    while splice's edits and recordings are in place) leaves no splice hook behind."""
    model = _model("gpt2")
    # forwards: base, source, pass 1, pass 2 (none for "logits": pass 1 gives the logits)
    for receivers, failing in (("blocks.2.attn.q", 3), ("blocks.2.attn.q", 4), ("logits", 3)):
        seen = []

        def fail(module, args, output, failing=failing):
            seen.append(model.hook_count)
            if len(seen) == failing:
                raise RuntimeError("forward failed")

        handle = model.hf.transformer.h[1].register_forward_hook(fail)
        try:
            with pytest.raises(RuntimeError, match="forward failed"):
                path_patch_sweep(model, EVEN, "blocks.0.*", receivers, METRIC, progress=False)
        finally:
            handle.remove()
        assert seen[-1] > 0  # the failure came with splice hooks in place
        assert model.hook_count == 0
