"""Recorded activations against independent computations: HF's own hidden states and hand math."""

import pytest
import torch
from families import FAMILIES, after_attn_proj, after_mlp_proj, parallel
from handhooks import HEAD_POINTS, read_site

import splice


def test_resid_post_matches_hf_hidden_states(model, hf, ids):
    with torch.no_grad():
        ref = hf(ids, output_hidden_states=True)
        logits, rec = model.run(ids, record=["embed", "blocks.*.resid_post", "final_norm", "logits"])
    n = model.dims.n_layers
    assert torch.equal(logits, ref.logits)
    assert torch.equal(rec["embed"], ref.hidden_states[0])
    for layer in range(n - 1):
        assert torch.equal(rec[f"blocks.{layer}.resid_post"], ref.hidden_states[layer + 1]), layer
    # HF's last entry is after the final norm.
    assert torch.equal(rec["final_norm"], ref.hidden_states[n])
    final_norm = model.layout.model.get_submodule(model.layout.points["final_norm"].module)
    assert torch.equal(final_norm(rec[f"blocks.{n - 1}.resid_post"]), ref.hidden_states[n])
    assert torch.equal(rec["logits"], ref.logits)


def test_residual_reconstruction(model, family, ids):
    with torch.no_grad():
        _, rec = model.run(ids, record="*")
    for layer in range(model.dims.n_layers):
        site = lambda p: rec[f"blocks.{layer}.{p}"]  # noqa: E731
        torch.testing.assert_close(
            site("resid_pre") + site("attn.out") + site("mlp.out"), site("resid_post"), rtol=0, atol=1e-5
        )
        if parallel(family):
            assert f"blocks.{layer}.resid_mid" not in model.sites
            with pytest.raises(splice.SpliceError, match="parallel residual"):
                model.resolve(f"blocks.{layer}.resid_mid")
        else:
            assert torch.equal(site("resid_mid"), site("resid_pre") + site("attn.out"))
        if layer:
            assert torch.equal(site("resid_pre"), rec[f"blocks.{layer - 1}.resid_post"])


def test_z_reproduces_attn_out_through_output_projection(model, family, ids):
    with torch.no_grad():
        _, rec = model.run(ids, record=["blocks.*.attn.z", "blocks.*.attn.out"])
        for layer in range(model.dims.n_layers):
            z = rec[f"blocks.{layer}.attn.z"]
            assert z.shape[-2:] == (model.dims.n_heads, model.dims.d_head)
            out_proj = model.hf.get_submodule(model.layout.points["attn.z"].module.replace("{l}", str(layer)))
            out = rec[f"blocks.{layer}.attn.out"]
            torch.testing.assert_close(
                after_attn_proj(family, model.hf, layer, out_proj(z.flatten(-2))), out, rtol=0, atol=1e-6
            )
            # Per head: the sum of each head's contribution (through its slice of the projection) is attn.out.
            # nn.Linear stores [out, in]; GPT-2's Conv1D stores [in, out].
            weight = out_proj.weight.T if isinstance(out_proj, torch.nn.Linear) else out_proj.weight
            per_head = torch.einsum("bphd,hdm->bphm", z, weight.view(z.shape[-2], z.shape[-1], -1))
            bias = getattr(out_proj, "bias", None)
            total = per_head.sum(-2) + (bias if bias is not None else 0)
            torch.testing.assert_close(
                after_attn_proj(family, model.hf, layer, total), out, rtol=1e-5, atol=1e-5
            )


def test_qkv_match_a_hand_written_hook(model, hf, family, ids):
    """q/k/v/z views (fused projections sliced, GQA projections) against raw module tensors."""
    spec, seen, handles = FAMILIES[family], {}, []
    for point in HEAD_POINTS:
        module, io = spec.hand_module(hf, point, 1)
        if io == "out":
            handles.append(
                module.register_forward_hook(lambda mod, a, out, p=point: seen.__setitem__(p, out))
            )
        else:
            handles.append(
                module.register_forward_pre_hook(lambda mod, a, p=point: seen.__setitem__(p, a[0]))
            )
    try:
        with torch.no_grad():
            _, rec = model.run(ids, record="blocks.1.attn.*")
    finally:
        for h in handles:
            h.remove()
    for point in HEAD_POINTS:
        assert torch.equal(
            rec[f"blocks.1.{point}"], read_site(hf, family, f"blocks.1.{point}", seen[point])
        ), point
    assert rec["blocks.1.attn.k"].shape[2] == model.dims.n_kv_heads


def test_mlp_post_and_ins(model, hf, family, ids):
    with torch.no_grad():
        _, rec = model.run(ids, record=["blocks.0.*"])
        down = hf.get_submodule(model.layout.points["mlp.post"].module.replace("{l}", "0"))
        torch.testing.assert_close(
            after_mlp_proj(family, hf, 0, down(rec["blocks.0.mlp.post"])),
            rec["blocks.0.mlp.out"],
            rtol=0,
            atol=1e-6,
        )
        norm1, norm2 = FAMILIES[family].norms(hf, 0)
        assert torch.equal(rec["blocks.0.attn.in"], norm1(rec["blocks.0.resid_pre"]))
        mlp_reads = rec["blocks.0.resid_pre"] if parallel(family) else rec["blocks.0.resid_mid"]
        assert torch.equal(rec["blocks.0.mlp.in"], norm2(mlp_reads))


def test_accumulate_mode_keeps_one_entry_per_forward(model, ids):
    with torch.no_grad(), model.record("blocks.0.resid_post", mode="accumulate") as rec:
        model(ids)
        model(ids[:1])
        model(ids[:, :4])
    entries = rec["blocks.0.resid_post"]
    assert [tuple(e.shape[:2]) for e in entries] == [(2, 9), (1, 9), (2, 4)]
    with pytest.raises(splice.SpliceError, match="shapes"):
        rec.cat("blocks.0.resid_post")
    with pytest.raises(splice.SpliceError, match="shapes"):
        rec.stack("blocks.0.resid_post")
    with torch.no_grad(), model.record("blocks.0.resid_post", mode="accumulate") as same:
        model(ids)
        model(ids)
    assert same.stack("blocks.0.resid_post").shape == (2, 2, 9, model.dims.d_model)
    assert torch.equal(same.cat("blocks.0.resid_post"), torch.cat([entries[0], entries[0]]))
    with torch.no_grad(), model.record("blocks.0.resid_post", mode="overwrite") as rec2:
        model(ids)
        model(ids[:1])
    assert rec2["blocks.0.resid_post"].shape[0] == 1
    assert torch.equal(rec2["blocks.0.resid_post"], entries[1])


def test_recorded_values_are_the_edited_ones_and_are_copies(model, ids):
    with (
        torch.no_grad(),
        model.edit({"blocks.1.mlp.out": splice.Zero(pos=2)}),
        model.record("blocks.1.mlp.out") as rec,
    ):
        model(ids)
    value = rec["blocks.1.mlp.out"]
    assert torch.equal(value[:, 2], torch.zeros_like(value[:, 2]))
    assert value[:, 3].abs().sum() > 0
    assert not value.requires_grad


def test_tl_aliases_and_tuples_name_the_same_tensor(model, ids):
    with torch.no_grad():
        _, rec = model.run(
            ids,
            record=["blocks.1.hook_resid_post", ("z", 2), "blocks.0.attn.hook_q", "blocks.0.mlp.hook_post"],
        )
    assert torch.equal(rec["blocks.1.resid_post"], rec["blocks.1.hook_resid_post"])
    assert torch.equal(rec[("z", 2)], rec["blocks.2.attn.z"])
    assert set(rec) == {"blocks.1.resid_post", "blocks.2.attn.z", "blocks.0.attn.q", "blocks.0.mlp.post"}


def test_stop_after_record_equals_a_full_run_and_skips_the_rest(model, hf, ids):
    """The stopped forward records the same tensors and never calls the later layers or the
    final norm; the model is left exactly as it was, even inside an open edit context."""
    layers = model.layout.points["resid_post"].module
    calls = []
    watched = [
        hf.get_submodule(layers.replace("{l}", "2")),
        hf.get_submodule(model.layout.points["final_norm"].module),
    ]
    handles = [m.register_forward_hook(lambda *a, i=i: calls.append(i)) for i, m in enumerate(watched)]
    sites = ["blocks.0.attn.z", "blocks.1.resid_post"]
    try:
        with torch.no_grad():
            _, full = model.run(ids, record=sites)
            calls.clear()
            logits, stopped = model.run(
                ids, record=sites, stop_after_record=True, edits={"blocks.-1.mlp.out": splice.Zero()}
            )  # never reached: no error
        assert logits is None and calls == []
        for site in sites:
            assert torch.equal(stopped[site], full[site]), site
        assert model.hook_count == 0
        with torch.no_grad(), model.edit({"blocks.-1.mlp.out": splice.Scale(0.5)}):
            model.run(ids, record="blocks.0.resid_post", stop_after_record=True)
            edited = model(ids)  # the outer edit still runs and fires on the next full forward
        assert model.hook_count == 0
        with torch.no_grad():
            ref = model.run(ids, edits={"blocks.-1.mlp.out": splice.Scale(0.5)})[0]
        assert torch.equal(edited, ref)
        with torch.no_grad():
            assert torch.equal(model(ids), hf(ids).logits)
    finally:
        for h in handles:
            h.remove()


def test_stop_after_record_needs_a_recording(model, ids):
    with pytest.raises(splice.SpliceError, match="needs record="):
        model.run(ids, stop_after_record=True)


def test_cat_of_different_lengths_says_which_axis_and_what_to_do(model):
    with torch.no_grad(), model.record("blocks.0.resid_post", mode="accumulate") as rec:
        model(torch.ones(1, 5, dtype=torch.long))
        model(torch.ones(1, 3, dtype=torch.long))
    with pytest.raises(splice.SpliceError, match=r"differ on axis \[1\].*cat\(key, dim=1\)"):
        rec.cat("blocks.0.resid_post")
    assert rec.cat("blocks.0.resid_post", dim=1).shape[:2] == (1, 8)
