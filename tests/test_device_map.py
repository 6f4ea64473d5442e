"""Models split across devices by accelerate: a tiny model loaded with a `device_map` that keeps
some layers on "cpu" and offloads others (and the embedding, so the first parameter is on "meta")
to "disk" computes, under splice's edits, recordings, generation, sweeps and patching, exactly
what the same weights compute undispatched. Also: `accelerate.cpu_offload`, errors leaving the
model as it was, and the replay moving each layer's input to the layer's device.

Only CPU here: every block executes on the CPU, so this checks the offload machinery (weights on
"meta" between calls, accelerate's forward wrappers beside splice's hooks), not copies between
two devices; `benchmarks/gpu.py` checks a GPU/CPU split on a CUDA machine.
"""

from __future__ import annotations

import dataclasses

import accelerate
import pandas as pd
import pytest
import torch
from conftest import build, hook_total
from handhooks import register

import splice
from splice import metrics, patching
from splice.engine import devices
from splice.engine.sites import Site
from splice.sweeps.replay import PrefixReplay

FAMILIES = ["gpt2", "gpt_neox", "llama", "opt"]
PROMPTS = ["abcdefg", "bcd", "cdefgh"]  # different lengths: left padding, per-row positions
DATA = [
    {"prompt": p, "correct": "a", "wrong": "c", "clean": p[::-1]}
    for p in ["abcdefg", "bcdefgh", "cdefghi", "defghij", "efghijk"]
]


def save_tokenizer(folder) -> None:
    """One token per printable character (ids 1..95), 0 for padding: `splice.load` needs a
    tokenizer in the folder, and the tiny models have 97 token ids."""
    from tokenizers import Regex, Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<pad>": 0} | {chr(c): c - 31 for c in range(32, 127)}
    inner = Tokenizer(models.WordLevel(vocab, unk_token="<pad>"))
    inner.pre_tokenizer = pre_tokenizers.Split(Regex("."), behavior="isolated")
    PreTrainedTokenizerFast(tokenizer_object=inner, pad_token="<pad>", eos_token="<pad>").save_pretrained(
        folder
    )


def split_map(hf) -> dict[str, str]:
    """Layer 1 and the embeddings (lm_head with them when tied) on "disk", the rest on "cpu"."""
    names = {module: name for name, module in hf.named_modules()}
    layout = splice.Model(hf).layout
    layers = [names[layout.module(Site("resid_pre", i))] for i in range(layout.n_layers)]
    disk = {layers[1], names[hf.get_input_embeddings()], names[hf.get_output_embeddings()]}
    placed = {name: ("disk" if name in disk else "cpu") for name in layers + sorted(disk)}
    for name, module in hf.named_modules():  # every other leaf (final norm, rotary tables, ...)
        inside = any(name == p or name.startswith(p + ".") for p in placed)
        if name and not inside and not any(module.children()):
            placed[name] = "cpu"
    return placed


def rest_as_mapped(model: splice.Model, device_map: dict[str, str]) -> bool:
    """Weights mapped to "disk" rest on "meta" (loaded only during their module's forward), the
    others on the CPU."""
    for name, p in model.hf.named_parameters():
        entry = max((k for k in device_map if name.startswith(k + ".")), key=len)
        if p.device.type != ("meta" if device_map[entry] == "disk" else "cpu"):
            return False
    return True


@pytest.fixture(scope="module", params=FAMILIES)
def pair(request, tmp_path_factory):
    """(undispatched, dispatched) splice Models of the same saved weights, and the map."""
    folder = tmp_path_factory.mktemp(request.param)
    hf = build(request.param)
    hf.save_pretrained(folder / "model")
    save_tokenizer(folder / "model")
    device_map = split_map(hf)
    plain = splice.load(folder / "model")
    split = splice.load(
        {"model": str(folder / "model"), "device_map": device_map, "offload_folder": str(folder / "offload")}
    )
    return plain, split, device_map


def meta_parameters(model: splice.Model) -> set[str]:
    return {name for name, p in model.hf.named_parameters() if p.device.type == "meta"}


def test_the_split_is_real_and_inputs_go_to_the_embedding(pair):
    plain, split, device_map = pair
    assert "disk" in device_map.values() and "cpu" in device_map.values()
    assert split.hf.hf_device_map == device_map
    # The embedding is offloaded: the first parameter rests on "meta", inputs must not go there.
    assert next(split.hf.parameters()).device.type == "meta"
    assert split.device == torch.device("cpu") == plain.device
    assert rest_as_mapped(split, device_map)
    assert split.spec.to_dict()["device_map"] == device_map
    with torch.no_grad():
        assert torch.equal(split(PROMPTS), plain(PROMPTS))


def mid(model: splice.Model) -> str:
    """Layer 1's residual between attention and MLP, a site computed from the layer's input
    (`attn.out` where a parallel residual has none)."""
    return "blocks.1.resid_mid" if "blocks.1.resid_mid" in model.sites else "blocks.1.attn.out"


def edits_for(model: splice.Model, source: splice.Recording) -> list[dict]:
    vector = torch.linspace(-1, 1, model.dims.d_model)
    return [
        {"blocks.1.attn.z": splice.Zero(heads=[0, 2], pos=-1)},
        {mid(model): splice.Add(vector, pos=slice(1, 4))},
        {"blocks.1.attn.result": splice.Scale(0.0, heads=1)},  # reads the offloaded weights
        {"blocks.0.resid_post": splice.Patch(source), "blocks.1.attn.v": splice.Patch(source, heads=0)},
        {"blocks.1.mlp.out": splice.Mean(source), "blocks.2.resid_pre": splice.Scale(2.0, dims=[0, 3])},
        {"embed": splice.Zero(pos=[0, 2]), "blocks.2.mlp.out": splice.Add(1.0, pos=-2)},
    ]


def test_edits_give_the_undispatched_logits(pair):
    plain, split, device_map = pair
    with torch.no_grad():
        source = plain.run(["gfedcba", "dcb", "hgfedc"], record="*")[1]
        for edits in edits_for(plain, source):
            expected, _ = plain.run(PROMPTS, edits=edits)
            got, _ = split.run(PROMPTS, edits=edits)
            assert torch.equal(got, expected), list(edits)
            assert not torch.equal(got, plain(PROMPTS)), f"{list(edits)} changed nothing: a vacuous check"
    assert split.hook_count == 0
    assert rest_as_mapped(split, device_map)  # offloaded again


def test_a_head_edit_matches_a_hand_written_hook_on_the_undispatched_model(pair, request):
    plain, split, _ = pair
    family = request.node.callspec.params["pair"]
    ids = torch.randint(1, 96, (2, 7), generator=torch.Generator().manual_seed(3))

    def zero_head(z):  # [batch, pos, head, d_head]
        z[:, :, 1] = 0
        return z

    handle = register(plain.hf, family, "blocks.1.attn.z", zero_head)
    try:
        with torch.no_grad():
            expected = plain.hf(ids).logits
    finally:
        handle.remove()
    with torch.no_grad():
        got = split.run(ids, edits={"blocks.1.attn.z": splice.Zero(heads=1)})[0]
    assert torch.equal(got, expected)


def test_recordings_are_the_undispatched_ones(pair):
    plain, split, _ = pair
    with torch.no_grad():
        expected = plain.run(PROMPTS, record="*")[1]
        got = split.run(PROMPTS, record="*")[1]
    assert list(got) == list(expected)
    for name in expected:
        assert got[name].device.type == "cpu", name
        assert torch.equal(got[name], expected[name]), name


def test_weights_and_readouts_read_offloaded_modules(pair):
    """TransformerLens-style weights and the unembedding read weights that rest on disk."""
    plain, split, _ = pair
    for name in ("W_E", "W_U", "b_U", "W_Q", "W_K", "W_V", "W_O", "b_O"):
        assert torch.equal(getattr(split, name), getattr(plain, name)), name
    _, rec = plain.run(PROMPTS, record="final_norm")
    resid = rec["final_norm"]
    assert torch.equal(split.unembed(resid), plain.unembed(resid))
    assert torch.equal(split.ln_final(resid), plain.ln_final(resid))
    assert meta_parameters(split)  # the offloaded weights went back to disk after each read


def test_generation_with_an_edit(pair):
    plain, split, _ = pair
    edits = {"blocks.1.resid_post": splice.Add(torch.linspace(-2, 2, plain.dims.d_model), pos=slice(5, None))}
    expected = plain.generate(PROMPTS, edits=edits, max_new_tokens=4, return_tokens=True)
    got = split.generate(PROMPTS, edits=edits, max_new_tokens=4, return_tokens=True)
    assert torch.equal(got, expected)
    assert not torch.equal(got, plain.generate(PROMPTS, max_new_tokens=4, return_tokens=True))


def test_batched_sweeps_give_the_undispatched_table(pair, tmp_path):
    plain, split, _ = pair
    sweep = splice.Sweep(
        sites=["blocks.*.attn.z", "blocks.1.attn.result"],
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff(), metrics.kl_from_baseline()],
    )
    # max_rows=7: chunks of three variants join the replay at different layers (and devices).
    expected = sweep.run(plain, DATA, batch_size=2, max_rows=7, progress=False)
    got = sweep.run(split, DATA, batch_size=2, max_rows=7, progress=False)
    pd.testing.assert_frame_equal(got, expected, check_exact=True)
    # A checkpoint identifies the model by its weights, offloaded ones included (read from disk):
    # a second run of the split model resumes its finished checkpoint instead of recomputing.
    first = sweep.run(split, DATA, batch_size=2, max_rows=7, progress=False, checkpoint=tmp_path / "ck.jsonl")
    calls = []
    counting = splice.Sweep(
        sites=["blocks.*.attn.z", "blocks.1.attn.result"],
        interventions=splice.Zero(),
        over="heads",
        metrics=[metrics.logit_diff(), metrics.kl_from_baseline()],
    )
    counting.metrics[0] = dataclasses.replace(
        counting.metrics[0], fn=lambda *a, f=counting.metrics[0].fn: (calls.append(1), f(*a))[1]
    )
    resumed = counting.run(
        split, DATA, batch_size=2, max_rows=7, progress=False, checkpoint=tmp_path / "ck.jsonl"
    )
    assert calls == []
    pd.testing.assert_frame_equal(first, expected, check_exact=True)
    pd.testing.assert_frame_equal(resumed, expected, check_exact=True)
    assert (expected[expected.variant >= 0].effect != 0).any()
    # Every vocabulary column unembedded (vocab=None), the replay computes what the model does:
    # the split model's table is the plain one's bit for bit. A plain model's logit difference
    # alone unembeds its two columns only (the split model's unembedding is accelerate's, so it
    # computes all): a matrix product of another shape, equal to rounding.
    everything = dataclasses.replace(metrics.logit_diff(), vocab=None)
    for metric, exact in ((everything, True), (metrics.logit_diff(), False)):
        by_position = splice.Sweep(
            sites=["embed", mid(plain)], interventions=splice.Zero(), over="pos", metrics=metric
        )
        pd.testing.assert_frame_equal(
            by_position.run(split, DATA, batch_size=3, max_rows=5, progress=False),
            by_position.run(plain, DATA, batch_size=3, max_rows=5, progress=False),
            check_exact=exact,
            rtol=1e-5,
            atol=1e-5,
        )
    assert split.hook_count == 0


def test_patch_sweep_gives_the_undispatched_table(pair):
    plain, split, _ = pair
    # As above: bit for bit when every column is unembedded, to rounding when only two are.
    everything = dataclasses.replace(metrics.logit_diff(), vocab=None)
    for metric, exact in ((everything, True), (metrics.logit_diff(), False)):
        kwargs = dict(sites="blocks.*.resid_pre", over="pos", metrics=[metric], batch_size=2)
        expected = patching.patch_sweep(plain, DATA, progress=False, **kwargs)
        got = patching.patch_sweep(split, DATA, progress=False, **kwargs)
        pd.testing.assert_frame_equal(got, expected, check_exact=exact, rtol=1e-5, atol=1e-5)
        assert expected.normalised.notna().any()


def accelerate_state(model: splice.Model) -> tuple:
    """Every torch hook, accelerate's wrappers (its `_hf_hook` objects) and where weights rest."""
    return (
        hook_total(model.hf),
        {name: id(m._hf_hook) for name, m in model.hf.named_modules() if hasattr(m, "_hf_hook")},
        meta_parameters(model),
    )


def test_errors_leave_only_accelerates_own_hooks_and_the_same_model(pair):
    _, split, _ = pair
    before = accelerate_state(split)
    assert before[1], "the model carries no accelerate hooks: not a dispatched model"
    with torch.no_grad():
        clean = split(PROMPTS)

    def boom(x):
        raise RuntimeError("boom")

    for site in ("blocks.1.attn.result", mid(split), "blocks.2.attn.z"):
        with pytest.raises(RuntimeError, match="boom"), torch.no_grad():
            with split.edit({site: splice.Apply(boom)}):
                split(PROMPTS)
        assert split.hook_count == 0
        assert accelerate_state(split) == before, site
    with (
        pytest.raises(splice.SpliceError),
        split.edit({"blocks.1.mlp.out": splice.Apply(lambda x: x[:, :1])}),
    ):
        split(PROMPTS)  # a result of the wrong shape, mid-forward in the offloaded layer
    _, rec = split.run(PROMPTS, record="blocks.1.attn.result", stop_after_record=True)  # stopped early
    assert rec["blocks.1.attn.result"].shape[:3] == (3, 7, split.dims.n_heads)
    assert split.hook_count == 0
    assert accelerate_state(split) == before
    with torch.no_grad():
        assert torch.equal(split(PROMPTS), clean)


def test_cpu_offload_of_every_module(tmp_path):
    """accelerate.cpu_offload: every weight kept in a CPU state dict, "meta" in the model."""
    hf = build("llama")
    plain = splice.Model(build("llama"))
    offloaded = splice.Model(accelerate.cpu_offload(hf, execution_device=torch.device("cpu")))
    assert {p.device.type for p in offloaded.hf.parameters()} == {"meta"}
    assert offloaded.device == torch.device("cpu")
    ids = torch.randint(1, 96, (3, 6), generator=torch.Generator().manual_seed(5))
    with torch.no_grad():
        source = plain.run(ids.flip(1), record="*")[1]
        for edits in edits_for(plain, source):
            assert torch.equal(offloaded.run(ids, edits=edits)[0], plain.run(ids, edits=edits)[0])
    data = [{"input_ids": row, "correct": 3, "wrong": 4} for row in ids.tolist()]
    sweep = splice.Sweep(
        sites="blocks.*.attn.z", interventions=splice.Zero(), over="heads", metrics=metrics.logit_diff()
    )
    pd.testing.assert_frame_equal(
        sweep.run(offloaded, data, max_rows=8, progress=False),
        sweep.run(plain, data, max_rows=8, progress=False),
    )
    # Parameters read with their values, offloaded ones loaded one module at a time.
    sums = [float(p.detach().double().sum()) for p in devices.parameters(offloaded.hf)]
    assert sums == [float(p.detach().double().sum()) for p in plain.hf.parameters()]
    assert {p.device.type for p in offloaded.hf.parameters()} == {"meta"}


def test_the_replay_runs_each_layer_on_its_own_device():
    """Where accelerate says a layer computes, the replay sends its input (and the final norm's
    and unembedding's): a stand-in hook on layer 1 naming "meta" as its execution device."""
    model = splice.Model(build("llama"))
    ids = torch.randint(1, 96, (2, 5), generator=torch.Generator().manual_seed(2))
    prefix = PrefixReplay(model, {"input_ids": ids}, tail=1)
    layers = prefix.layers
    seen = []

    class Stop(Exception):
        pass

    def look(module, args, kwargs):
        seen.append((args[0] if args else kwargs["hidden_states"]).device.type)
        raise Stop

    layers[1]._hf_hook = type("Hook", (), {"execution_device": torch.device("meta")})()
    handle = layers[1].register_forward_pre_hook(look, with_kwargs=True)
    try:
        assert devices.execution_device(layers[1]) == torch.device("meta")
        with pytest.raises(Stop), torch.no_grad():
            prefix.replay([0, 2], 1)
    finally:
        handle.remove()
        del layers[1]._hf_hook
    assert seen == ["meta"]
    assert model.hook_count == 0
    with torch.no_grad():  # a replay is another batch shape: equal within PrefixReplay.check's 1e-5 here
        torch.testing.assert_close(
            prefix.replay([0, 2], 1), prefix.logits.repeat(2, 1, 1), rtol=1e-5, atol=1e-5
        )
