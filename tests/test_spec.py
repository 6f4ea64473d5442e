"""Model specs (issue 16): what `splice.load`, the sweep config's `model:` key and Ray workers
share. Parsing is checked here; loading from a spec on the embedded model."""

import pytest
import torch

import splice
from splice.config import load_config
from splice.spec import ModelSpec, spec_of


def test_the_forms_a_spec_takes():
    assert ModelSpec.parse(None).is_embedded and ModelSpec.parse("smollm2").is_embedded
    assert ModelSpec.parse("some/folder").to_dict() == {"model": "some/folder"}
    spec = ModelSpec.parse(
        {
            "model": "gpt2",
            "dtype": torch.bfloat16,
            "device_map": "auto",
            "attn_implementation": "eager",
            "revision": "main",
            "offload_folder": "/tmp/off",
            "options": {"low_cpu_mem_usage": True},
        }
    )
    assert spec.to_dict() == {
        "model": "gpt2",
        "dtype": "bfloat16",
        "device_map": "auto",
        "attn_implementation": "eager",
        "revision": "main",
        "offload_folder": "/tmp/off",
        "options": {"low_cpu_mem_usage": True},
    }
    assert ModelSpec.parse(spec.to_dict()) == spec  # round trip through plain data
    kwargs = spec.from_pretrained_kwargs()
    assert (
        kwargs["dtype"] is torch.bfloat16 and kwargs["low_cpu_mem_usage"] is True and "options" not in kwargs
    )


@pytest.mark.parametrize(
    "bad, message",
    [
        ({"model": "gpt2", "precision": "bf16"}, "unknown key 'precision'"),
        ({"model": "gpt2", "dtype": "fp16"}, "dtype 'fp16' is not one of"),
        ({"model": 3}, "model is a name or a path"),
        ({"model": "gpt2", "options": [1]}, "options is a mapping"),
        (3.5, "expected a model spec"),
    ],
)
def test_malformed_specs_are_refused_with_what_was_expected(bad, message):
    with pytest.raises(splice.SpliceError, match=message):
        ModelSpec.parse(bad)


def test_a_hand_wrapped_model_has_no_spec_and_a_factory_gives_one():
    from conftest import build

    model = splice.Model(build("gpt2"))
    assert model.spec is None
    with pytest.raises(splice.SpliceError, match="wrapped by hand"):
        spec_of(model)
    made = ModelSpec.from_factory(lambda: splice.Model(build("gpt2")))
    loaded = made.load()
    assert loaded.spec is made and isinstance(loaded, splice.Model)
    assert torch.equal(loaded.hf.lm_head.weight, model.hf.lm_head.weight)  # same seed, same weights
    with pytest.raises(splice.SpliceError, match="returned int; expected a splice.Model"):
        ModelSpec.from_factory(lambda: 3).load()


def test_a_config_with_a_bad_model_spec_is_refused_when_read(tmp_path):
    path = tmp_path / "sweep.yaml"
    path.write_text(
        "model: {model: embedded, dtype: half}\n"
        "data: [hello]\n"
        "sweep: {sites: blocks.0.attn.z, interventions: [{type: Zero}]}\n"
        "metrics: [loss]\n"
    )
    with pytest.raises(splice.SpliceError, match=r"sweep.yaml line 1 .*dtype 'half' is not one of"):
        load_config(path)
    path.write_text(path.read_text().replace("dtype: half", "dtype: bfloat16"))
    assert load_config(path).model == {"model": "embedded", "dtype": "bfloat16"}


@pytest.mark.real
def test_load_remembers_its_spec_and_applies_it(smol):
    assert smol.spec.to_dict() == {"model": "embedded"}
    half = splice.load({"model": "embedded", "dtype": "bfloat16"})
    assert half.spec.to_dict() == {"model": "embedded", "dtype": "bfloat16"}
    assert {p.dtype for p in half.hf.parameters()} == {torch.bfloat16}
    same = splice.load(dtype=torch.bfloat16)  # keyword form: the same spec
    assert same.spec == half.spec
    eager = splice.load(attn_implementation="eager")
    assert eager.spec.to_dict() == {"model": "embedded", "attn_implementation": "eager"}
    assert eager.hf.config._attn_implementation == "eager"
    ids = smol.to_tokens("The capital of France is")
    # eager and sdpa attention differ only in rounding
    assert torch.allclose(eager(ids), smol.hf(ids).logits, atol=1e-4)
