"""The embedded SmolLM2-135M (Llama, 30 layers, GQA 9/3 heads) passes the same parity battery."""

import pytest
import torch
from handhooks import register

import splice

pytestmark = pytest.mark.real
PROMPTS = ["When Mary and John went to the store, John gave a drink to", "The capital of France is"]


@pytest.fixture(scope="module")
def batch(smol):
    return splice.tokens.encode(smol.tokenizer, PROMPTS)


def test_shape_of_the_embedded_model(smol):
    d = smol.dims
    assert (d.n_layers, d.d_model, d.n_heads, d.n_kv_heads, d.d_head) == (30, 576, 9, 3, 64)
    assert smol.sites["blocks.29.attn.k"] == ("batch", "pos", 3, 64)


def test_cached_copy_equals_the_gguf_weights(smol, batch):
    direct, _ = splice.load_hf(from_gguf=True)
    with torch.no_grad():
        assert torch.equal(direct(**batch).logits, smol.hf(**batch).logits)


def test_knows_the_answer(smol):
    with torch.no_grad():
        logits = smol("When Mary and John went to the store, John gave a drink to")
    assert smol.to_string(logits[0, -1].argmax()) == " Mary"


@pytest.mark.parametrize("attn", ["sdpa", "eager"])
def test_hidden_state_parity_and_reconstruction(smol, batch, attn):
    smol.hf.set_attn_implementation(attn)
    try:
        with torch.no_grad():
            ref = smol.hf(**batch, output_hidden_states=True)
            # Every site but the attention patterns, which switch touched layers to eager attention.
            sites = [n for n in smol.sites if not n.endswith(("attn.pattern", "attn.scores"))]
            logits, rec = smol.run(batch, record=sites)
    finally:
        smol.hf.set_attn_implementation("sdpa")
    assert torch.equal(logits, ref.logits)
    assert torch.equal(rec["embed"], ref.hidden_states[0])
    for layer in range(29):
        assert torch.equal(rec[f"blocks.{layer}.resid_post"], ref.hidden_states[layer + 1])
    assert torch.equal(rec["final_norm"], ref.hidden_states[30])
    assert torch.equal(smol.hf.model.norm(rec["blocks.29.resid_post"]), ref.hidden_states[30])
    for layer in range(30):
        s = lambda p: rec[f"blocks.{layer}.{p}"]  # noqa: E731
        torch.testing.assert_close(
            s("resid_pre") + s("attn.out") + s("mlp.out"), s("resid_post"), rtol=0, atol=1e-4
        )
        torch.testing.assert_close(
            smol.hf.model.layers[layer].self_attn.o_proj(s("attn.z").flatten(-2)),
            s("attn.out"),
            rtol=0,
            atol=1e-5,
        )


@pytest.mark.parametrize(
    "site,heads",
    [("blocks.7.attn.q", 4), ("blocks.7.attn.k", 1), ("blocks.7.attn.v", 2), ("blocks.7.attn.z", 8)],
)
def test_gqa_head_edit_parity(smol, batch, site, heads):
    def hand(t):
        t[:, :, heads] = 0
        return t

    with torch.no_grad():
        handle = register(smol.hf, "llama", site, hand)
        try:
            expected = smol.hf(**batch).logits
        finally:
            handle.remove()
        with smol.edit({site: splice.Zero(heads=heads)}):
            got = smol.hf(**batch).logits
        clean = smol.hf(**batch).logits
    assert torch.equal(got, expected)
    assert not torch.equal(got, clean)
    assert smol.hook_count == 0


def test_attention_pattern_matches_hf_eager(smol, batch):
    with torch.no_grad():
        _, rec = smol.run(batch, record="blocks.*.attn.pattern")
        smol.hf.set_attn_implementation("eager")
        try:
            ref = smol.hf(**batch, output_attentions=True)
        finally:
            smol.hf.set_attn_implementation("sdpa")
    for layer in range(30):
        # Padded rows: compare real query/key pairs only (padding rows are masked either way).
        mask = batch["attention_mask"].bool()
        got, want = rec[f"blocks.{layer}.attn.pattern"], ref.attentions[layer]
        pairs = mask[:, None, :, None] & mask[:, None, None, :]
        torch.testing.assert_close(got.masked_fill(~pairs, 0), want.masked_fill(~pairs, 0), rtol=0, atol=1e-5)
    assert smol.hf.config._attn_implementation == "sdpa" and smol.hook_count == 0


def test_the_cache_is_keyed_by_content_and_a_complete_copy_is_reused(smol, tmp_path, monkeypatch):
    """Several venvs share one cache (each installs the GGUF with its own mtime): a copy made from
    the same file content is used as it is, never rebuilt or removed under another process."""
    from transformers import AutoModelForCausalLM

    from splice import loading

    real = loading._embedded_cache()
    monkeypatch.setenv("SPLICE_CACHE", str(tmp_path))
    copy = tmp_path / real.name
    copy.mkdir()
    (copy / "splice-source.json").write_text((real / "splice-source.json").read_text())

    def refuse(*args, **kwargs):
        raise AssertionError("a complete copy for this content exists: nothing may be converted")

    monkeypatch.setattr(AutoModelForCausalLM, "from_pretrained", refuse)
    (loading.embedded_model_dir() / loading.GGUF_FILE).touch()  # a new mtime, same content
    assert loading._embedded_cache() == copy
    assert (copy / "splice-source.json").exists()


def test_load_prints_no_progress_bars(smol, capfd):
    from transformers.utils import logging

    assert logging.is_progress_bar_enabled()
    again = splice.load()
    out, err = capfd.readouterr()
    assert "Loading weights" not in out + err and again.dims == smol.dims
    assert logging.is_progress_bar_enabled()  # restored for everything else
