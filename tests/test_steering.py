"""Contrastive steering vectors: the difference of means by hand, files and provenance, steering
only generated positions, the coefficient sweep, and a visible change on the embedded model."""

import hashlib
import json
from datetime import datetime

import pytest
import torch
from conftest import CharTokenizer, build

import splice
from splice.loading import weights_sha256
from splice.steering import SteeringVector, coefficient_sweep, config_fingerprint, contrastive

SITE = "blocks.1.resid_post"
# Different lengths, so batches are left-padded and padding must be left out of the means.
POSITIVE = ["a happy day", "joy", "we love sunny weddings", "kind words"]
NEGATIVE = ["dark rage!", "hate it", "an angry shout at noon", "no"]


@pytest.fixture
def charmodel(hf):
    return splice.Model(hf, CharTokenizer())


def _by_hand(model, prompts, site, pick):
    """Pooled mean over prompts (run one at a time, no padding) of the tokens `pick` selects."""
    rows = []
    with torch.no_grad():
        for prompt in prompts:
            _, rec = model.run(prompt, record=site)
            act = rec[site][0]  # [seq, ...]
            chosen = pick(act)
            rows.append(chosen if chosen.dim() == act.dim() else chosen[None])
    return torch.cat(rows).double().mean(0)


LAST = lambda a: a[-1]  # noqa: E731
PICKS = [  # (positions, the same choice by hand on one unpadded prompt's [seq, ...] activations)
    ("last", LAST),
    ("all", lambda a: a),
    (1, lambda a: a[1]),
    (-2, lambda a: a[-2]),
    (slice(1, None), lambda a: a[1:]),
    (slice(0, 3, 2), lambda a: a[0:3:2]),
]


@pytest.mark.parametrize("positions,pick", PICKS, ids=[str(p) for p, _ in PICKS])
def test_contrastive_is_the_difference_of_means(charmodel, positions, pick):
    sv = contrastive(charmodel, POSITIVE, NEGATIVE, SITE, positions=positions, batch_size=3)
    expected = _by_hand(charmodel, POSITIVE, SITE, pick) - _by_hand(charmodel, NEGATIVE, SITE, pick)
    assert sv.vector.shape == (charmodel.dims.d_model,) and sv.vector.dtype == torch.float32
    torch.testing.assert_close(sv.vector.double(), expected, rtol=1e-5, atol=1e-6)
    assert sv.site == SITE and sv.positions == positions and sv.n_positive == 4 and sv.n_negative == 4
    assert sv.norm == pytest.approx(float(sv.vector.double().norm()))


def test_contrastive_on_a_head_site_and_with_aliases(charmodel):
    sv = contrastive(charmodel, POSITIVE, NEGATIVE, ("z", 1))  # a TransformerLens-style key
    d = charmodel.dims
    assert sv.site == "blocks.1.attn.z" and sv.vector.shape == (d.n_heads, d.d_head)
    expected = _by_hand(charmodel, POSITIVE, sv.site, LAST) - _by_hand(charmodel, NEGATIVE, sv.site, LAST)
    torch.testing.assert_close(sv.vector.double(), expected, rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        charmodel.run("hello", edits=sv.edit(2.0))  # a [heads, d_head] vector fits its site


def test_contrastive_errors():
    model = splice.Model(build("llama"), CharTokenizer())
    with pytest.raises(splice.SpliceError, match="names 3 sites"):
        contrastive(model, POSITIVE, NEGATIVE, "blocks.*.resid_post")
    with pytest.raises(splice.SpliceError, match="axes"):
        contrastive(model, POSITIVE, NEGATIVE, "blocks.0.attn.pattern")
    with pytest.raises(splice.SpliceError, match=r"position 5 is outside 1 prompt\(s\), e\.g\. 'joy'"):
        contrastive(model, POSITIVE, NEGATIVE, SITE, positions=5)
    with pytest.raises(splice.SpliceError, match=r"selects no token of prompt 'joy'"):
        contrastive(model, POSITIVE, NEGATIVE, SITE, positions=slice(4, None))
    with pytest.raises(splice.SpliceError, match="positions must be"):
        contrastive(model, POSITIVE, NEGATIVE, SITE, positions="first")
    with pytest.raises(splice.SpliceError, match="negative prompts must be a non-empty list"):
        contrastive(model, POSITIVE, [], SITE)
    with pytest.raises(splice.SpliceError, match="tokenizer"):
        contrastive(splice.Model(model.hf), POSITIVE, NEGATIVE, SITE)
    assert model.hook_count == 0


def test_save_load_round_trip_with_provenance(tmp_path):
    model = splice.Model(build("gpt2"), CharTokenizer())
    sv = contrastive(model, POSITIVE, NEGATIVE, SITE, positions=slice(1, None))
    tensors, meta = sv.save(tmp_path / "vectors" / "love")
    assert tensors.name == "love.safetensors" and meta.name == "love.json" and tensors.exists()
    record = json.loads(meta.read_text())
    assert record["site"] == SITE and record["positions"] == {"slice": [1, None, None]}
    assert record["positive_sha256"] == hashlib.sha256(json.dumps(POSITIVE).encode()).hexdigest()
    assert record["negative_sha256"] == hashlib.sha256(json.dumps(NEGATIVE).encode()).hexdigest()
    # No _name_or_path on a model built from a config: the class names it, the digest identifies it.
    assert record["model"] == {
        "name": "GPT2LMHeadModel",
        "revision": None,
        "weights_sha256": weights_sha256(model.hf),
        "dtype": "float32",
    }
    assert (
        record["config_sha256"] == config_fingerprint(model.hf.config) and len(record["config_sha256"]) == 64
    )
    assert (
        record["n_positive"] == 4
        and record["n_negative"] == 4
        and record["splice_version"] == splice.__version__
    )
    assert record["shape"] == [model.dims.d_model] and record["norm"] == pytest.approx(sv.norm)
    assert datetime.fromisoformat(record["created"]).tzinfo is not None
    for path in (tmp_path / "vectors" / "love", tmp_path / "vectors" / "love.json", str(tensors)):
        again = SteeringVector.load(path)
        assert again == sv and again.positions == slice(1, None) and torch.equal(again.vector, sv.vector)
    assert "norm" in repr(sv) and SITE in repr(sv)

    # The fingerprint ignores where a config was loaded from, not what it says.
    model.hf.config._name_or_path = "somewhere/else"
    assert config_fingerprint(model.hf.config) == sv.config_sha256
    other = splice.Model(build("llama"), CharTokenizer())
    assert config_fingerprint(other.hf.config) != sv.config_sha256

    # A vector file from another vector is refused; so is a missing half.
    other_sv = contrastive(model, NEGATIVE, POSITIVE, SITE)
    other_sv.save(tmp_path / "hate")
    (tmp_path / "hate.safetensors").replace(tmp_path / "vectors" / "love.safetensors")
    with pytest.raises(splice.SpliceError, match="checksum"):
        SteeringVector.load(tmp_path / "vectors" / "love")
    with pytest.raises(splice.SpliceError, match="does not exist"):
        SteeringVector.load(tmp_path / "hate")


def test_edit_is_an_add_of_the_vector_at_its_site():
    v = torch.randn(8)
    sv = SteeringVector(v, SITE)
    edit = sv.edit(4.0, pos=slice(5, None))
    assert isinstance(edit, splice.Edits) and list(edit) == [SITE]  # what edits= takes as it is
    assert edit[SITE] == splice.Add(v, scale=4.0, pos=slice(5, None))
    assert sv.edit()[SITE] == splice.Add(v, scale=1.0)


def test_steering_touches_only_generated_positions(charmodel, family):
    prompt, new = "the cat sat", 4
    n = len(prompt)
    sv = contrastive(charmodel, POSITIVE, NEGATIVE, SITE)
    coef = 40.0 / max(sv.norm, 1e-6)  # a large push, whatever the tiny model's scale
    steer = sv.edit(coef, pos=slice(n, None))
    with torch.no_grad():
        with charmodel.record(SITE, mode="accumulate") as clean:
            unsteered = charmodel.generate(prompt, max_new_tokens=new, min_new_tokens=new)
        with charmodel.record(SITE, mode="accumulate") as rec:
            steered = charmodel.generate(prompt, edits=steer, max_new_tokens=new, min_new_tokens=new)
        _, plain = charmodel.run(prompt, record=SITE)
    entries, clean_entries = rec[SITE], clean[SITE]
    assert len(entries) == new and entries[0].shape[1] == n and all(e.shape[1] == 1 for e in entries[1:])
    # The prompt forward is untouched, bit for bit.
    assert torch.equal(entries[0], clean_entries[0]) and torch.equal(entries[0], plain[SITE])
    # The first generated token is predicted from the (unsteered) prompt, so it is the same token;
    # at its position the site is the clean value plus coef * vector, exactly.
    assert torch.equal(entries[1], clean_entries[1] + sv.vector * coef)
    assert steered[0] == unsteered[0]
    assert model_changed(entries, clean_entries)
    assert charmodel.hook_count == 0


def model_changed(entries, clean_entries) -> bool:
    return any(not torch.equal(a, b) for a, b in zip(entries[1:], clean_entries[1:]))


def test_coefficient_sweep_table():
    model = splice.Model(build("llama"), CharTokenizer())
    sv = contrastive(model, POSITIVE, NEGATIVE, SITE)
    big = 60.0 / sv.norm
    table = coefficient_sweep(model, sv, "the cat sat", [0.0, big, -big], max_new_tokens=6)
    assert list(table.columns) == [
        "coefficient",
        "text",
        "changed",
        "n_tokens",
        "logprob_shift",
        "baseline_logprob_shift",
    ]
    zero = table.iloc[0]
    assert (
        zero.coefficient == 0
        and not zero.changed
        and zero.logprob_shift == 0
        and zero.baseline_logprob_shift == 0
    )
    assert table.changed[1:].any()
    assert (table.baseline_logprob_shift[1:] != 0).all() and table.logprob_shift.notna().all()
    assert model.hook_count == 0


@pytest.mark.real
def test_love_vector_visibly_changes_smollm2_text(smol):
    love = [
        "I love weddings, the flowers and the happy couple.",
        "We celebrated our wedding with family, full of joy and love.",
        "The bride smiled at her groom as they exchanged rings.",
        "Love, kindness and romance filled the room.",
    ]
    anger = [
        "I hate you and I am furious with everything.",
        "He screamed in anger and smashed the door.",
        "She was full of rage, bitterness and hatred.",
        "Anger, hate and violence filled the room.",
    ]
    sv = contrastive(
        smol, love, anger, "blocks.8.resid_post", positions=slice(1, None)
    )  # skip the attention sink
    table = coefficient_sweep(smol, sv, "I went to the store and", [0.0, 4.0], max_new_tokens=12)
    print(table.to_string())
    assert not table.changed[0] and table.changed[1], table.text.tolist()
    assert table.logprob_shift[1] > 0
