"""Hooks exist only inside contexts, the registry is live, and nothing survives an exception."""

import copy

import pytest
import torch
from conftest import build, hook_total
from families import FAMILIES

import splice


def test_no_hooks_outside_contexts_and_output_unchanged(model, hf, ids):
    before = hook_total(hf)
    clean = hf(ids).logits.detach()
    with model.edit({"blocks.1.attn.z": splice.Zero(heads=1)}), model.record("*"):
        assert model.hook_count > 0 and hook_total(hf) > before
    assert model.hook_count == 0 and hook_total(hf) == before
    assert torch.equal(hf(ids).logits, clean)


def test_user_model_is_not_modified(model, hf, ids):
    forwards = {name: m.forward for name, m in hf.named_modules()}
    children = {name: m for name, m in hf.named_modules()}
    params = {k: v.clone() for k, v in hf.state_dict().items()}
    with model.edit({"blocks.*.mlp.out": splice.Scale(0.5)}), torch.no_grad():
        hf(ids)
        assert {name: m for name, m in hf.named_modules()} == children
        assert all(m.forward == forwards[name] for name, m in hf.named_modules())
    assert all(torch.equal(v, params[k]) for k, v in hf.state_dict().items())


def test_exception_inside_context_removes_every_hook(model, hf, ids):
    before = hook_total(hf)
    clean = hf(ids).logits.detach()
    with pytest.raises(RuntimeError, match="boom"):
        with model.edit({"blocks.0.resid_post": splice.Zero()}), model.record("*"):
            hf(ids)
            raise RuntimeError("boom")
    assert hook_total(hf) == before and model.hook_count == 0
    assert torch.equal(hf(ids).logits, clean)


def test_exception_raised_by_an_edit_mid_forward_cleans_up(model, hf, ids):
    before = hook_total(hf)
    clean = hf(ids).logits.detach()
    bad = splice.Replace(torch.ones(5, model.dims.d_model))  # 5 positions; the input has 9
    with pytest.raises(splice.SpliceError, match=r"\[5, \d+\].*blocks.1.resid_post"):
        with model.edit({"blocks.1.resid_post": bad}):
            hf(ids)
    assert hook_total(hf) == before
    assert torch.equal(hf(ids).logits, clean)


def test_live_registry_changes_take_effect_without_reentering(model, hf, ids):
    edits = splice.Edits()
    clean = hf(ids).logits.detach()
    with model.edit(edits) as live, torch.no_grad():
        assert live is edits
        assert torch.equal(hf(ids).logits, clean)
        live["blocks.0.mlp.out"] = splice.Zero()
        first = hf(ids).logits
        assert not torch.equal(first, clean)
        handles = model.engine.installed()
        live["blocks.0.mlp.out"] = splice.Scale(0.0)  # same module: no new hook needed
        assert torch.equal(hf(ids).logits, first)
        assert model.engine.installed() == handles
        del live["blocks.0.mlp.out"]
        assert torch.equal(hf(ids).logits, clean)
        with pytest.raises(splice.SpliceError, match="unknown site"):
            live["blocks.0.mlp.outt"] = splice.Zero()
        assert "blocks.0.mlp.outt" not in live  # refused assignment left the registry as it was
        assert torch.equal(hf(ids).logits, clean)
    assert model.hook_count == 0


def test_same_edits_on_two_models(family, ids):
    from conftest import build

    a, b = splice.Model(build(family, 0)), splice.Model(build(family, 1))
    edits = splice.Edits({"blocks.0.mlp.out": splice.Zero()})
    with a.edit(edits), b.edit(edits):
        edits["blocks.1.mlp.out"] = splice.Zero()
        assert {k[0] for k in a.engine.installed()} >= {
            a.layout.module_path(a.layout.sites_of("blocks.1.mlp.out")[0])
        }
        assert len(b.engine.installed()) == len(a.engine.installed())
    assert a.hook_count == b.hook_count == 0


def test_hf_output_hidden_states_sees_edited_values(model, hf, ids):
    with torch.no_grad():
        hf(ids, output_hidden_states=True)  # transformers installs its capture hooks lazily, now
        with model.edit({"blocks.0.resid_post": splice.Zero(pos=2)}):
            out = hf(ids, output_hidden_states=True)
    assert torch.equal(out.hidden_states[1][:, 2], torch.zeros_like(out.hidden_states[1][:, 2]))


class _Bypass(torch.nn.Module):
    """Computes what `target` computes without calling it, so its hooks never run (works where the
    hooked module changes the width, e.g. OPT's fc2 or BLOOM's dense_4h_to_h)."""

    def __init__(self, target):
        super().__init__()
        self.forward = target.forward


def test_every_edit_must_fire(model, hf, family, ids):
    # Calling the bare decoder skips lm_head: an edit at logits can never run.
    base = getattr(hf, model.layout.arch.decoder)
    with model.edit({"logits": splice.Zero()}), torch.no_grad():
        hf(ids)  # fine through the wrapped model
        wrapped_over_base = splice.Model(base)
        assert "logits" not in wrapped_over_base.sites
    with model.edit({"blocks.1.mlp.out": splice.Zero(), "blocks.2.mlp.out": splice.Zero()}), torch.no_grad():
        # A model that routes around a layer's MLP (as layer-skipping variants do): the hooked
        # module is never called.
        target = FAMILIES[family].hand_module(hf, "mlp.out", 2)[0]
        path = next(name for name, mod in hf.named_modules() if mod is target)
        parent_path, _, attr = path.rpartition(".")
        parent = hf.get_submodule(parent_path)
        setattr(parent, attr, _Bypass(target))
        try:
            with pytest.raises(splice.SpliceError, match="blocks.2.mlp.out never ran"):
                hf(ids)
        finally:
            setattr(parent, attr, target)
    assert model.hook_count == 0


def test_generate_under_edits_and_hooks_removed(model, hf, ids):
    prompt = ids[:1, :5]
    kwargs = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)
    clean = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    with model.edit(
        {"blocks.1.resid_post": splice.Add(torch.randn(model.dims.d_model) * 50, pos=slice(5, None))}
    ):
        steered = hf.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs)
    assert torch.equal(steered[:, :5], prompt)
    assert not torch.equal(steered, clean)
    assert torch.equal(hf.generate(prompt, attention_mask=torch.ones_like(prompt), **kwargs), clean)
    assert model.hook_count == 0


def test_a_module_swapped_after_wrapping_is_the_one_hooked(family, ids):
    """splice looks modules up afresh on every context (no stale cache): replacing a block's MLP
    after wrapping (as resize_token_embeddings does for the embedding) edits the new module."""
    hf = build(family)
    model = splice.Model(hf)
    with model.edit({"blocks.1.mlp.out": splice.Zero()}), torch.no_grad():
        hf(ids)  # looked up once before the swap
    mlp_path = model.layout.module_path(model.layout.sites_of("blocks.1.mlp.out")[0])
    parent_path, _, name = mlp_path.rpartition(".")
    parent = hf.get_submodule(parent_path)
    old = getattr(parent, name)
    new = copy.deepcopy(old)
    with torch.no_grad():
        for p in new.parameters():
            p.mul_(1.5)  # a different computation, so the swap shows in the logits
    setattr(parent, name, new)

    def zero(module, args, output):  # the same edit by hand, on the new module
        return (
            torch.zeros_like(output)
            if isinstance(output, torch.Tensor)
            else (torch.zeros_like(output[0]),) + output[1:]
        )

    with torch.no_grad():
        handle = new.register_forward_hook(zero)
        expected = hf(ids).logits
        handle.remove()
        unedited = hf(ids).logits
        with model.edit({"blocks.1.mlp.out": splice.Zero()}):
            got = hf(ids).logits
    assert model.hook_count == 0 and not old._forward_hooks and not new._forward_hooks
    assert torch.equal(got, expected) and not torch.equal(got, unedited)


def test_run_with_a_bad_record_key_starts_no_edit_either(model, hf, ids):
    clean = hf(ids).logits.detach()
    with pytest.raises(splice.SpliceError, match="unknown site"):
        model.run(ids, edits={"blocks.0.mlp.out": splice.Zero()}, record="blocks.0.nope")
    assert model.hook_count == 0 and not model.engine.active_here()
    assert torch.equal(hf(ids).logits, clean)


def test_run_frames_its_forward_alone_and_inside_an_open_context(model, hf, ids):
    """Model.run alone and inside an open context: positions (here from a padding mask), results
    and the outer context's recording must not depend on which."""
    mask = torch.ones_like(ids)
    mask[0, :3] = 0  # row 0 is left-padded: positions count from its first real token
    inputs = {"input_ids": ids, "attention_mask": mask}
    edits = {
        "blocks.1.attn.z": splice.Zero(heads=1, pos=-1),
        "blocks.0.resid_post": splice.Scale(2.0, pos=[1, 3]),
    }
    with torch.no_grad():
        with model.edit(edits):
            expected = hf(**inputs).logits
        alone, _ = model.run(inputs, edits=edits)
        assert model.hook_count == 0 and not model.engine.active_here()
        with model.record("blocks.1.resid_post") as outer:
            inside, rec = model.run(inputs, edits=edits, record="blocks.1.resid_post")
            assert model.hook_count > 0
        assert not model.engine.active_here()
    assert torch.equal(alone, expected) and torch.equal(inside, expected)
    assert torch.equal(outer["blocks.1.resid_post"], rec["blocks.1.resid_post"])
    clean = hf(**inputs).logits
    assert not torch.equal(alone, clean)


def test_run_alone_still_checks_that_every_edit_ran(model, hf, family, ids):
    target = FAMILIES[family].hand_module(hf, "mlp.out", 2)[0]
    path = next(name for name, mod in hf.named_modules() if mod is target)
    parent_path, _, attr = path.rpartition(".")
    parent = hf.get_submodule(parent_path)
    embed = hf.get_input_embeddings()
    # Swapped in mid-forward, after run has hooked `target`: the hooked module is never called.
    handle = embed.register_forward_hook(lambda *_: setattr(parent, attr, _Bypass(target)))
    try:
        with pytest.raises(splice.SpliceError, match="blocks.2.mlp.out never ran"), torch.no_grad():
            model.run(ids, edits={"blocks.2.mlp.out": splice.Zero()})
    finally:
        handle.remove()
        setattr(parent, attr, target)
    assert model.hook_count == 0 and not model.engine.active_here()
    assert torch.equal(model.run(ids)[0], hf(ids).logits)
