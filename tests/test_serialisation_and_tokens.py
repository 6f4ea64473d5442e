"""Interventions and registries round-trip through JSON/YAML; token helpers behave like TransformerLens'."""

import dataclasses
import json
import warnings

import pytest
import torch
from conftest import CharTokenizer

import splice


def test_repr_is_readable():
    assert repr(splice.Zero(pos=4, dims=slice(0, 10))) == "Zero(pos=4, dims=slice(0, 10, None))"
    assert repr(splice.Scale(0.5, heads=[1, 2])) == "Scale(heads=(1, 2), factor=0.5)"
    assert repr(splice.Add(torch.ones(8), scale=2.0)) == "Add(vector=<tensor float32 [8]>, scale=2.0)"


def test_interventions_are_frozen_and_compare_by_value():
    z = splice.Zero(pos=[1, 2])
    with pytest.raises(dataclasses.FrozenInstanceError):
        z.pos = 3
    assert splice.Add(torch.ones(3)) == splice.Add(torch.ones(3))
    assert splice.Add(torch.ones(3)) != splice.Add(torch.zeros(3))
    assert splice.Zero(pos=[1, 2]) == splice.Zero(pos=(1, 2))


@pytest.mark.parametrize(
    "iv",
    [
        splice.Zero(),
        splice.Zero(pos=4, dims=slice(0, 10)),
        splice.Scale(0.25, heads=[0, 3], pos=-1),
        splice.Replace(torch.arange(6.0).view(2, 3), pos=slice(1, None, 2)),
        splice.Add(torch.randn(5), scale=-3.0, dims=[0, 4]),
        splice.Zero(pos=torch.tensor([[True, False, True]])),
        splice.Replace(2.5, heads=1),
    ],
)
def test_round_trip_json(iv):
    record = iv.to_dict()
    again = splice.Intervention.from_dict(json.loads(json.dumps(record)))
    assert again == iv and type(again) is type(iv)


def test_edits_save_and_load(tmp_path):
    edits = splice.Edits(
        {
            "blocks.3.attn.q": splice.Zero(pos=4, dims=slice(0, 10)),
            "blocks.*.mlp.out": [splice.Scale(0.5), splice.Add(torch.ones(4))],
            ("z", 2): splice.Zero(heads=5),
        }
    )
    assert list(edits) == ["blocks.3.attn.q", "blocks.*.mlp.out", "blocks.2.attn.z"]
    for name in ("edits.json", "edits.yaml", "new/folder/edits.yaml"):  # save makes missing folders
        edits.save(tmp_path / name)
        again = splice.Edits.load(tmp_path / name)
        assert again.to_dict() == edits.to_dict()
        assert again["blocks.*.mlp.out"] == [splice.Scale(0.5), splice.Add(torch.ones(4))]


def test_unknown_type_and_fields_are_refused():
    with pytest.raises(splice.SpliceError, match="unknown intervention type 'Nope'"):
        splice.Intervention.from_dict({"type": "Nope"})
    with pytest.raises(splice.SpliceError, match=r"no field\(s\) \['factr'\]"):
        splice.Intervention.from_dict({"type": "Scale", "factr": 2})


def test_yaml_is_read_with_the_safe_loader(tmp_path):
    path = tmp_path / "evil.yaml"
    path.write_text("!!python/object/apply:os.system ['echo hi']\n")
    with pytest.raises(Exception) as info:
        splice.Edits.load(path)
    assert "could not determine a constructor" in str(info.value)


def test_token_helpers_and_left_padding(hf):
    model = splice.Model(hf, CharTokenizer())
    assert model.to_tokens("abc").shape == (1, 3)
    batch = model.to_tokens(["ab", "abcd"])
    assert batch.shape == (2, 4) and batch[0, :2].tolist() == [0, 0]
    assert model.to_single_token("a") == ord("a") % 90 + 1
    with pytest.raises(splice.SpliceError, match="2 tokens"):
        model.to_single_token("ab")
    assert len(model.to_str_tokens("hello")) == 5
    # Left-padded rows compute what they compute alone (positions count from the first real token).
    with torch.no_grad():
        padded = model(["ab", "abcd"])
        alone = model("ab")
    torch.testing.assert_close(padded[0, -2:], alone[0], rtol=1e-5, atol=1e-5)
    # Edits at pos=0 hit each row's first real token, never the padding.
    with (
        torch.no_grad(),
        model.record("blocks.0.resid_pre") as rec,
        model.edit({"blocks.0.resid_pre": splice.Zero(pos=0)}),
    ):
        model(["ab", "abcd"])
    x = rec["blocks.0.resid_pre"]
    assert x[0, 2].abs().sum() == 0 and x[0, :2].abs().sum() > 0 and x[1, 0].abs().sum() == 0


def test_test_prompt_reports_rank(hf, capsys):
    model = splice.Model(hf, CharTokenizer())
    assert model.test_prompt("abc", "d", top_k=3) is None  # printed only: a notebook shows it once
    out = capsys.readouterr().out
    assert "Performance on answer token" in out and "rank" in out
    with torch.no_grad():
        logits = model("abcd")[0, 2]
    expected = int((logits > logits[model.to_single_token("d")]).sum())
    for top_k in (3, expected + 1):  # the answer outside, then inside, the top k
        table = model.test_prompt("abc", "d", top_k=top_k, print_results=False)
        assert capsys.readouterr().out == ""
        answer = table[table.is_answer]
        assert len(answer) == 1 and answer.iloc[0]["rank"] == expected  # one row for it, never two
        assert len(table) == top_k + (expected >= top_k)


def test_an_untested_transformers_release_is_named_at_import():
    from packaging.specifiers import SpecifierSet

    from splice.compat import check_transformers, tested_transformers

    spec = tested_transformers()
    assert spec is not None
    lower = [s.version for s in SpecifierSet(spec) if s.operator == ">="]
    upper = [s.version for s in SpecifierSet(spec) if s.operator == "<"]
    assert lower and upper  # both bounds are declared
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert check_transformers(lower[0])
    with pytest.warns(
        splice.UntestedVersionWarning,
        match=r"tested with transformers.*this is transformers 99\.0\.0.*make test-latest",
    ):
        assert not check_transformers("99.0.0")
    with pytest.warns(splice.UntestedVersionWarning):
        assert not check_transformers(upper[0])
