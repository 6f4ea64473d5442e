"""Logit lens and tuned lens (`splice.lens`): the last layer's lens is the model's output on every
family, identity translators are the logit lens bit for bit, edits are read, fitting lowers the
held-out KL at every layer and never touches the model, files round-trip with their provenance,
and bad input is refused before any forward."""

from __future__ import annotations

import json

import pytest
import torch
from conftest import VOCAB, CharTokenizer, build

import splice
from splice.lens import TunedLens, fit_tuned_lens, kl_by_layer, lens_logits, logit_lens, text_windows
from splice.loading import weights_sha256

TEXTS = [
    "The quick brown fox jumps over the lazy dog while the cat sleeps on the warm mat.",
    "A journey of a thousand miles begins with a single step, taken slowly and with care.",
    "To be or not to be, that is the question whether it is nobler in the mind to suffer.",
    "All happy families are alike; each unhappy family is unhappy in its own way, they say.",
    "It was the best of times, it was the worst of times, it was the age of wisdom and folly.",
    "Call me Ishmael. Some years ago, never mind how long precisely, I went to sea again.",
]
HELD_OUT = [
    "In a hole in the ground there lived a hobbit, not a nasty, dirty, wet hole at all.",
    "It is a truth universally acknowledged that a single man in possession of a fortune.",
]


class Forwards:
    """Counts forwards of an HF model (a pre-hook on the whole model), to check refusals happen first."""

    def __init__(self, hf):
        self.count = 0
        self.handle = hf.register_forward_pre_hook(self._hook)

    def _hook(self, module, args):
        self.count += 1

    def close(self):
        self.handle.remove()


# -- the logit lens --------------------------------------------------------------------------------
def test_last_layer_lens_is_the_models_output(model, hf, ids):
    """On all 13 families: the last resid_post through the final norm and unembedding is what the
    model unembeds (float32, within 1e-6), in the stacked logits and in the table."""
    logits, names = lens_logits(model, ids, sites="blocks.-1.resid_post")
    with torch.no_grad():
        expected = hf(ids).logits
    assert names == [f"blocks.{model.dims.n_layers - 1}.resid_post"]
    assert logits.dtype == torch.float32
    torch.testing.assert_close(logits[0], expected, rtol=0, atol=1e-6)
    table = logit_lens(model, ids, sites="blocks.-1.resid_post", top_k=3)
    top = table[table["rank"] == 0].sort_values(["batch", "pos"])
    assert top["token_id"].tolist() == expected.argmax(-1).flatten().tolist()
    torch.testing.assert_close(
        torch.tensor(top["logit"].tolist()), expected.max(-1).values.flatten(), rtol=0, atol=1e-6
    )


def test_identity_translators_are_the_logit_lens_bit_for_bit(model, ids):
    identity = TunedLens.identity(model)
    plain, _ = lens_logits(model, ids)
    tuned, _ = lens_logits(model, ids, lens=identity)
    assert torch.equal(plain, tuned)
    assert logit_lens(model, ids, lens=identity).equals(logit_lens(model, ids))


def test_every_layer_is_its_own_final_norm_and_unembedding():
    m = splice.Model(build("llama"))
    ids = torch.tensor([[5, 6, 7, 8]])
    logits, names = lens_logits(m, ids, sites=["embed", "blocks.*.resid_pre"])
    _, rec = m.run(ids, record=names)
    assert rec is not None
    assert names[0] == "embed" and len(names) == 1 + m.dims.n_layers
    for i, name in enumerate(names):
        with torch.no_grad():
            torch.testing.assert_close(logits[i], m.unembed(m.ln_final(rec[name])), rtol=0, atol=1e-6)


def test_table_layout_and_probabilities():
    m = splice.Model(build("gpt2"), CharTokenizer())
    table = logit_lens(m, "abcd", top_k=4)
    assert list(table.columns) == [
        "site", "layer", "batch", "pos", "input_token", "rank", "token", "token_id", "logit", "prob",
    ]  # fmt: skip
    assert len(table) == m.dims.n_layers * 4 * 4
    chars = CharTokenizer()
    ids = torch.tensor([chars("abcd")["input_ids"]])
    assert table[table["rank"] == 0]["input_token"].tolist()[:4] == [
        chars.decode([i]) for i in ids[0].tolist()
    ]
    for _, cell in table.groupby(["site", "pos"]):
        assert cell["rank"].tolist() == [0, 1, 2, 3]
        assert cell["logit"].is_monotonic_decreasing and cell["prob"].is_monotonic_decreasing
    probs = lens_logits(m, ids)[0].softmax(-1)
    top = table[table["rank"] == 0].sort_values(["layer", "pos"])
    torch.testing.assert_close(
        torch.tensor(top["prob"].tolist()), probs.max(-1).values.flatten(), rtol=0, atol=1e-6
    )


def test_a_padded_batch_counts_positions_from_each_rows_first_token():
    m = splice.Model(build("llama"), CharTokenizer())
    table = logit_lens(m, ["ab", "wxyz"], sites="blocks.-1.resid_post", top_k=1)
    assert table[table["batch"] == 0]["pos"].tolist() == [0, 1]
    assert table[table["batch"] == 1]["pos"].tolist() == [0, 1, 2, 3]
    alone = logit_lens(m, "ab", sites="blocks.-1.resid_post", top_k=1)
    assert table[table["batch"] == 0]["token_id"].tolist() == alone["token_id"].tolist()


def test_edits_are_read_in_the_same_forward(model, ids):
    edits = {"blocks.0.mlp.out": splice.Zero(pos=slice(2, None))}
    logits, names = lens_logits(model, ids, edits=edits)
    _, rec = model.run(ids, edits=edits, record="blocks.*.resid_post")
    assert rec is not None
    with torch.no_grad():
        expected = torch.stack([model.unembed(model.ln_final(rec[n])) for n in names])
    torch.testing.assert_close(logits, expected, rtol=0, atol=1e-6)
    clean, _ = lens_logits(model, ids)
    torch.testing.assert_close(logits[..., :2, :], clean[..., :2, :], rtol=0, atol=1e-6)  # edited from 2 on
    assert not torch.equal(logits[-1], clean[-1])
    assert model.hook_count == 0


def test_a_custom_lens_function_is_applied_before_the_readout():
    m = splice.Model(build("gpt2"))
    ids = torch.tensor([[1, 2, 3]])
    seen = []

    def halve(site, resid):
        seen.append(site)
        return resid * 0.5

    logits, names = lens_logits(m, ids, lens=halve)
    _, rec = m.run(ids, record=names)
    assert rec is not None
    assert seen == names
    with torch.no_grad():
        torch.testing.assert_close(logits[0], m.unembed(m.ln_final(rec[names[0]] * 0.5)))


# -- refusals, before any forward --------------------------------------------------------------------
@pytest.mark.parametrize(
    "kwargs, message",
    [
        ({"sites": "blocks.0.attn.z"}, "resid"),
        ({"sites": "blocks.0.mlp.post"}, "d_model"),
        ({"sites": "final_norm"}, "already normalised"),
        ({"sites": "blocks.9.resid_post"}, "blocks.9"),
        ({"sites": []}, "names no site"),
        ({"top_k": 0}, "top_k"),
        ({"top_k": VOCAB + 1}, "top_k"),
        ({"top_k": 2.5}, "top_k"),
        ({"lens": "tuned"}, "TunedLens"),
    ],
)
def test_bad_arguments_are_refused_before_any_forward(kwargs, message):
    hf = build("llama")
    m = splice.Model(hf)
    forwards = Forwards(hf)
    try:
        with pytest.raises(splice.SpliceError, match=message):
            logit_lens(m, torch.tensor([[1, 2, 3]]), **kwargs)
    finally:
        forwards.close()
    assert forwards.count == 0


def test_a_lens_without_the_site_or_of_another_width_is_refused():
    hf = build("llama")
    m = splice.Model(hf)
    forwards = Forwards(hf)
    try:
        with pytest.raises(splice.SpliceError, match="no translator for"):
            logit_lens(m, torch.tensor([[1, 2]]), lens=TunedLens.identity(m, "blocks.0.resid_post"))
        other = splice.Model(build("gpt2"))
        if other.dims.d_model != m.dims.d_model:
            with pytest.raises(splice.SpliceError, match="d_model"):
                logit_lens(m, torch.tensor([[1, 2]]), lens=TunedLens.identity(other))
        with pytest.raises(splice.SpliceError, match="texts"):
            fit_tuned_lens(m, [], progress=False)
        with pytest.raises(splice.SpliceError, match="lr"):
            fit_tuned_lens(m, TEXTS, lr=-1.0, progress=False)
        with pytest.raises(splice.SpliceError, match="tokenizer"):
            fit_tuned_lens(m, TEXTS, progress=False)
    finally:
        forwards.close()
    assert forwards.count == 0


def test_text_windows_refuse_texts_shorter_than_a_window():
    m = splice.Model(build("gpt2"), CharTokenizer())
    assert text_windows(m, ["abcdefgh", "xyz"], 4).shape == (2, 4)
    with pytest.raises(splice.SpliceError, match="seq_len=10"):
        text_windows(m, ["abc"], 10)


# -- the tuned lens --------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def sharp():
    """A tiny Llama whose output distributions are far from uniform (its unembedding scaled up),
    so that the logit lens of its early layers is measurably wrong."""
    hf = build("llama", seed=3)
    with torch.no_grad():
        hf.lm_head.weight.mul_(25.0)
    return splice.Model(hf, CharTokenizer())


def test_fitting_lowers_held_out_kl_at_every_layer_and_leaves_the_model_alone(sharp):
    before = weights_sha256(sharp.hf)
    lens = fit_tuned_lens(sharp, TEXTS, steps=40, lr=1e-2, batch_size=4, seq_len=16, seed=0, progress=False)
    assert weights_sha256(sharp.hf) == before
    assert all(p.grad is None for p in sharp.hf.parameters())
    assert sharp.hook_count == 0
    logit = kl_by_layer(sharp, HELD_OUT, seq_len=16)
    tuned = kl_by_layer(sharp, HELD_OUT, lens=lens, seq_len=16)
    assert logit["site"].tolist() == tuned["site"].tolist() == lens.sites
    assert set(tuned["lens"]) == {"tuned"} and set(logit["lens"]) == {"logit"}
    last = f"blocks.{sharp.dims.n_layers - 1}.resid_post"
    assert lens.provenance["fixed"] == [last]
    for site, a, b in zip(logit["site"], logit["kl"], tuned["kl"]):
        if site == last:  # both are the model's output
            assert a < 1e-6 and b < 1e-6
        else:
            assert b < 0.9 * a, f"{site}: tuned lens KL {b:.4f} is not below the logit lens' {a:.4f}"


def test_fitting_is_deterministic_for_a_seed(sharp):
    fit = lambda seed: fit_tuned_lens(sharp, TEXTS, steps=3, seq_len=8, seed=seed, progress=False)  # noqa: E731
    a, b, c = fit(0), fit(0), fit(1)
    assert all(torch.equal(a.weights[s], b.weights[s]) for s in a.sites)
    assert not all(torch.equal(a.weights[s], c.weights[s]) for s in a.sites)


def test_save_and_load_keep_translators_and_provenance(sharp, tmp_path):
    lens = fit_tuned_lens(sharp, TEXTS, steps=2, seq_len=8, progress=False)
    tensors, meta = lens.save(tmp_path / "lens")
    assert (tensors.name, meta.name) == ("lens.safetensors", "lens.json")
    record = json.loads(meta.read_text())
    assert record["format"] == "splice-tuned-lens/1"
    assert record["model"]["weights_sha256"] == weights_sha256(sharp.hf)
    assert record["training"]["steps"] == 2 and record["training"]["seq_len"] == 8
    assert set(record["final_loss"]) == set(lens.sites) - set(record["fixed"])
    loaded = TunedLens.load(tmp_path / "lens.json", model=sharp)
    assert loaded.sites == lens.sites and loaded.provenance["training"] == lens.provenance["training"]
    assert all(torch.equal(loaded.weights[s], lens.weights[s]) for s in lens.sites)
    ids = torch.tensor([[3, 4, 5, 6]])
    assert torch.equal(lens_logits(sharp, ids, lens=loaded)[0], lens_logits(sharp, ids, lens=lens)[0])


def test_loading_refuses_other_weights_and_changed_files(sharp, tmp_path):
    lens = fit_tuned_lens(sharp, TEXTS, steps=1, seq_len=8, progress=False)
    tensors, meta = lens.save(tmp_path / "lens")
    other = splice.Model(build("llama", seed=4))
    with pytest.raises(splice.SpliceError, match="other weights"):
        TunedLens.load(tmp_path / "lens", model=other)
    record = json.loads(meta.read_text())
    first = next(iter(record["tensors_sha256"]))
    record["tensors_sha256"][first] = "0" * 64
    meta.write_text(json.dumps(record))
    with pytest.raises(splice.SpliceError, match="checksum"):
        TunedLens.load(tmp_path / "lens")
    meta.write_text(json.dumps({"format": "something else"}))
    with pytest.raises(splice.SpliceError, match="not a splice tuned lens"):
        TunedLens.load(tmp_path / "lens")
    with pytest.raises(splice.SpliceError, match="does not exist"):
        TunedLens.load(tmp_path / "missing")


def test_lens_heatmap_writes_a_png(tmp_path):
    m = splice.Model(build("llama"), CharTokenizer())
    table = logit_lens(m, ["hi", "the cat"], top_k=2)
    path = splice.plot.lens_heatmap(table, tmp_path / "out" / "lens.png", batch=1)
    assert path.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with pytest.raises(splice.SpliceError, match="batch 5"):
        splice.plot.lens_heatmap(table, tmp_path / "x.png", batch=5)
    with pytest.raises(splice.SpliceError, match="logit_lens table"):
        splice.plot.lens_heatmap(table.drop(columns="token"), tmp_path / "x.png")
