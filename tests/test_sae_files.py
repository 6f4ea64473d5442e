"""splice.sae without a model's forward: SAELens' file format read and written, the three
architectures against hand-written math, hook names as sites, the width check, and every way an
SAE folder can be wrong refused by name (and nothing unpickled).

The cross-check against SAELens itself runs in its own venv: benchmarks/peers/sae_interop.py.
"""

from __future__ import annotations

import json
import operator
import pickle
import re
from pathlib import Path

import pytest
import torch
import torch.nn as nn
from conftest import build
from safetensors.torch import load_file, save_file

import splice
from splice import SpliceError
from splice import sae as ssae
from splice.sae import SAEConfig, SparseAutoencoder

D_IN, D_SAE, K = 16, 64, 5
HOOK = "blocks.1.hook_resid_post"


def weights(arch: str, seed: int = 0, d_in: int = D_IN, d_sae: int = D_SAE) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    w = {
        "W_enc": torch.randn(d_in, d_sae, generator=g),
        "b_enc": torch.randn(d_sae, generator=g) * 0.5,
        "W_dec": torch.randn(d_sae, d_in, generator=g),
        "b_dec": torch.randn(d_in, generator=g) * 0.5,
    }
    if arch == "jumprelu":
        w["threshold"] = torch.randn(d_sae, generator=g) * 2.0  # some negative: ReLU must still apply
    return w


def make(arch: str, seed: int = 0, **cfg) -> SparseAutoencoder:
    if arch == "topk":
        cfg.setdefault("k", K)
    config = SAEConfig(arch, D_IN, D_SAE, hook_name=HOOK, **cfg)
    return SparseAutoencoder(config, weights(arch, seed))


def inputs(seed: int = 1, shape=(3, 7, D_IN)) -> torch.Tensor:
    return torch.randn(shape, generator=torch.Generator().manual_seed(seed)) * 2.0


def hand_pre(w, x, apply_b_dec):
    x_in = x - w["b_dec"] if apply_b_dec else x
    return x_in @ w["W_enc"] + w["b_enc"]


def hand_topk(pre: torch.Tensor, k: int) -> torch.Tensor:
    """Top k by a full descending sort (not torch.topk), ReLU on the kept values."""
    order = pre.argsort(dim=-1, descending=True)[..., :k]
    keep = torch.zeros_like(pre, dtype=torch.bool).scatter(-1, order, True)
    return torch.where(keep & (pre > 0), pre, torch.zeros_like(pre))


# -- the architectures against hand-written math ---------------------------------------------------
@pytest.mark.parametrize("apply_b_dec", [True, False])
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk", "topk-rescaled"])
def test_encode_decode_match_hand_math(arch, apply_b_dec):
    rescale = arch == "topk-rescaled"
    arch = arch.removesuffix("-rescaled")
    extra = {"rescale_acts_by_decoder_norm": True} if rescale else {}
    sae = make(arch, apply_b_dec_to_input=apply_b_dec, **extra)
    w, x = weights(arch), inputs()
    pre = hand_pre(w, x, apply_b_dec)
    norms = w["W_dec"].norm(dim=-1)
    if arch == "standard":
        expected = torch.where(pre > 0, pre, torch.zeros_like(pre))
    elif arch == "jumprelu":
        expected = torch.where((pre > w["threshold"]) & (pre > 0), pre, torch.zeros_like(pre))
    else:
        expected = hand_topk(pre * norms if rescale else pre, K)
    with torch.no_grad():
        acts = sae.encode(x)
        recon = sae.decode(acts)
        assert torch.equal(sae.pre_acts(x), pre)  # the same ops: bit for bit
        assert torch.equal(acts, expected)
        scaled = expected * (1 / norms) if rescale else expected
        assert torch.equal(recon, scaled @ w["W_dec"] + w["b_dec"])
        assert torch.equal(sae(x), recon)
        # an independent float64 computation agrees to float32 rounding (stated tolerance 1e-4)
        w64 = {k: v.double() for k, v in w.items()}
        recon64 = (scaled.double()) @ w64["W_dec"] + w64["b_dec"]
        assert torch.allclose(recon.double(), recon64, atol=1e-4, rtol=0)
    assert acts.shape == (3, 7, D_SAE) and recon.shape == (3, 7, D_IN)
    assert (acts >= 0).all()


def test_apply_b_dec_to_input_changes_the_input_only():
    on, off = make("standard"), make("standard", apply_b_dec_to_input=False)
    x = inputs()
    with torch.no_grad():
        assert not torch.equal(on.encode(x), off.encode(x))
        # with b_dec subtracted by hand, the off-SAE computes what the on-SAE does
        shifted = x - on.b_dec
        assert torch.equal(off.encode(shifted), on.encode(x))
        assert torch.equal(on.decode(on.encode(x)), off.decode(on.encode(x)))  # decode ignores it


def test_topk_keeps_exactly_k_per_row():
    sae = make("topk")
    with torch.no_grad():
        sae.b_enc.fill_(1000.0)  # every pre-activation positive: ReLU zeroes none of the top k
        acts = sae.encode(inputs(shape=(4, 11, D_IN)))
    assert ((acts != 0).sum(-1) == K).all()
    plain = make("topk")  # in general at most k (ReLU may zero some of them)
    with torch.no_grad():
        assert ((plain.encode(inputs()) != 0).sum(-1) <= K).all()


def test_jumprelu_threshold_is_strict_and_after_relu():
    cfg = SAEConfig("jumprelu", d_in=4, d_sae=4, apply_b_dec_to_input=False)
    w = {
        "W_enc": torch.eye(4),
        "b_enc": torch.zeros(4),
        "W_dec": torch.eye(4),
        "b_dec": torch.zeros(4),
        "threshold": torch.tensor([1.0, 1.0, -2.0, -2.0]),
    }
    sae = SparseAutoencoder(cfg, w)
    x = torch.tensor([[1.0, 1.5, -1.0, 0.5]])
    with torch.no_grad():
        # pre == threshold -> 0; above -> itself; above a negative threshold but negative -> 0 (ReLU)
        assert sae.encode(x).tolist() == [[0.0, 1.5, 0.0, 0.5]]


def test_input_width_is_checked():
    sae = make("standard")
    with pytest.raises(SpliceError, match=r"expected \[\.\.\., 16\]"):
        sae.encode(torch.zeros(2, 15))
    with pytest.raises(SpliceError, match=r"expected \[\.\.\., 64\]"):
        sae.decode(torch.zeros(2, 16))


def test_config_is_validated():
    with pytest.raises(SpliceError, match="'architecture': 'gated'"):
        SAEConfig("gated", 16, 64)
    with pytest.raises(SpliceError, match="'k'"):
        SAEConfig("topk", 16, 64, k=65)
    with pytest.raises(SpliceError, match="only a topk SAE has k"):
        SAEConfig("standard", 16, 64, k=3)
    with pytest.raises(SpliceError, match="'d_in'"):
        SAEConfig("standard", True, 64)  # type: ignore[arg-type]
    with pytest.raises(SpliceError, match="no tensor 'threshold'"):
        SparseAutoencoder(SAEConfig("jumprelu", D_IN, D_SAE), weights("standard"))
    with pytest.raises(SpliceError, match="'W_enc' has shape"):
        SparseAutoencoder(SAEConfig("standard", D_IN, D_SAE), weights("standard", d_sae=32))


# -- save / load ------------------------------------------------------------------------------------
@pytest.mark.parametrize("arch", ["standard", "jumprelu", "topk"])
def test_save_load_round_trip_bit_for_bit(tmp_path, arch):
    sae = make(arch, metadata={"model_name": "tiny", "context_size": 128})
    weights_file, cfg_file = ssae.save(sae, tmp_path / "sae")
    assert {weights_file.name, cfg_file.name} == {"sae_weights.safetensors", "cfg.json"}
    back = ssae.load(tmp_path / "sae")
    assert back.cfg == sae.cfg and dict(back.cfg.metadata) == {
        "model_name": "tiny",
        "context_size": 128,
        "sae_lens_version": "6.0.0",
    }
    for (name, a), (name_b, b) in zip(sae.named_parameters(), back.named_parameters()):
        assert name == name_b and torch.equal(a, b) and a.dtype == b.dtype
    x = inputs()
    with torch.no_grad():
        assert torch.equal(back.encode(x), sae.encode(x)) and torch.equal(back(x), sae(x))
    # the file is SAELens 6's layout: hook name in metadata, architecture and k at the top
    written = json.loads(cfg_file.read_text())
    assert written["metadata"]["hook_name"] == HOOK and written["architecture"] == arch
    assert written["normalize_activations"] == "none" and written.get("k") == (K if arch == "topk" else None)
    assert set(load_file(str(weights_file))) == set(sae.cfg.weight_shapes())
    # also by the path of either file, and again after a second save over the first
    assert ssae.load(cfg_file).cfg == sae.cfg and ssae.load(weights_file).cfg == sae.cfg
    ssae.save(back, tmp_path / "sae")
    assert ssae.load(tmp_path / "sae").cfg == sae.cfg


def test_dtype_and_device(tmp_path):
    sae = make("jumprelu")
    ssae.save(sae.to(torch.bfloat16), tmp_path / "bf16")
    assert json.loads((tmp_path / "bf16" / "cfg.json").read_text())["dtype"] == "bfloat16"
    back = ssae.load(tmp_path / "bf16")
    assert back.W_enc.dtype == torch.bfloat16 and back.cfg.dtype == "bfloat16"
    assert torch.equal(back.threshold, sae.threshold)  # type: ignore[arg-type]
    wide = ssae.load(tmp_path / "bf16", device="cpu", dtype=torch.float64)
    assert wide.W_dec.dtype == torch.float64 and wide.cfg.dtype == "float64"
    assert wide.encode(inputs().to(torch.bfloat16)).dtype == torch.float64  # input cast to the SAE's dtype
    # the cfg's dtype decides when none is asked for, as in SAELens (weights are cast to it)
    cfg = json.loads((tmp_path / "bf16" / "cfg.json").read_text())
    (tmp_path / "bf16" / "cfg.json").write_text(json.dumps({**cfg, "dtype": "torch.float16"}))
    assert ssae.load(tmp_path / "bf16").b_dec.dtype == torch.float16


def write_folder(folder: Path, cfg: dict, tensors: dict[str, torch.Tensor] | None) -> Path:
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cfg.json").write_text(json.dumps(cfg))
    if tensors is not None:
        save_file({k: v.contiguous() for k, v in tensors.items()}, str(folder / "sae_weights.safetensors"))
    return folder


def v6_cfg(arch="standard", **extra):
    cfg = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "device": "cpu",
        "apply_b_dec_to_input": True,
        "normalize_activations": "none",
        "reshape_activations": "none",
        "metadata": {"hook_name": HOOK, "sae_lens_version": "6.54.12", "model_name": "gpt2"},
        "architecture": arch,
    }
    if arch == "topk":
        cfg.update(k=K, rescale_acts_by_decoder_norm=False)
    return {**cfg, **extra}


def test_reads_the_pre_6_layout(tmp_path):
    # SAELens < 6 wrote flat keys: hook_name (or hook_point) at the top, TopK as an activation function.
    old = {
        "d_in": D_IN,
        "d_sae": D_SAE,
        "dtype": "float32",
        "hook_point": "blocks.2.attn.hook_z",
        "activation_fn_str": "topk",
        "activation_fn_kwargs": {"k": 3},
        "apply_b_dec_to_input": False,
        "finetuning_scaling_factor": False,
        "normalize_activations": False,
        "context_size": 128,
        "l1_coefficient": 5.0,
    }
    w = {**weights("topk"), "scaling_factor": torch.ones(D_SAE)}  # all ones: dropped, as SAELens does
    sae = ssae.load(write_folder(tmp_path / "old", old, w))
    assert sae.cfg.architecture == "topk" and sae.cfg.k == 3 and sae.cfg.apply_b_dec_to_input is False
    assert sae.cfg.hook_name == "blocks.2.attn.hook_z" and sae.cfg.reshape_activations == "hook_z"
    assert dict(sae.cfg.metadata) == {"context_size": 128}
    # the older JumpReLU checkpoints' log_threshold becomes threshold = exp(log_threshold)
    w = weights("jumprelu")
    w["log_threshold"] = w.pop("threshold")
    jump = ssae.load(write_folder(tmp_path / "log", {**v6_cfg("jumprelu")}, w))
    assert torch.equal(jump.threshold, torch.exp(w["log_threshold"]))  # type: ignore[arg-type]
    assert ssae.load(
        write_folder(tmp_path / "plain", {"d_in": D_IN, "d_sae": D_SAE}, weights("standard"))
    ).cfg == (SAEConfig("standard", D_IN, D_SAE))


def cases():
    """(name, cfg or None for a broken cfg file, tensors, what the message must say)."""
    std, jump = weights("standard"), weights("jumprelu")
    no_threshold = {k: v for k, v in jump.items() if k != "threshold"}
    return [
        ("missing d_in", {k: v for k, v in v6_cfg().items() if k != "d_in"}, std, "'d_in' is missing"),
        ("d_in a string", v6_cfg(d_in="16"), std, "'d_in': expected a positive int; got '16'"),
        ("d_sae a float", v6_cfg(d_sae=64.0), std, "'d_sae': expected a positive int"),
        (
            "no architecture (6.x)",
            {k: v for k, v in v6_cfg().items() if k != "architecture"},
            std,
            "'architecture' is missing",
        ),
        ("gated", v6_cfg("gated"), std, "'architecture' is 'gated'"),
        ("architecture a list", v6_cfg(architecture=["topk"]), std, "'architecture' is ['topk']"),
        (
            "layer_norm",
            v6_cfg(normalize_activations="layer_norm"),
            std,
            "'normalize_activations' is 'layer_norm'",
        ),
        (
            "old bool normalize",
            {"d_in": D_IN, "d_sae": D_SAE, "normalize_activations": True},
            std,
            "'expected_average_only_in'",
        ),
        ("topk without k", {k: v for k, v in v6_cfg("topk").items() if k != "k"}, std, "a topk SAE needs k"),
        ("k > d_sae", v6_cfg("topk", k=D_SAE + 1), std, "a topk SAE needs k"),
        (
            "tanh-relu",
            {"d_in": D_IN, "d_sae": D_SAE, "activation_fn_str": "tanh-relu"},
            std,
            "'activation_fn_str' is 'tanh-relu'",
        ),
        ("bad dtype", v6_cfg(dtype="int8"), std, "dtype 'int8'"),
        (
            "bad apply_b_dec",
            v6_cfg(apply_b_dec_to_input="yes"),
            std,
            "'apply_b_dec_to_input': expected true or false",
        ),
        ("bad reshape", v6_cfg(reshape_activations="hook_q"), std, "'reshape_activations'"),
        (
            "hook_name a number",
            v6_cfg(metadata={"hook_name": 3, "sae_lens_version": "6.1.0"}),
            std,
            "'hook_name'",
        ),
        ("metadata a list", v6_cfg(metadata=[1]), std, "'metadata'"),
        ("cfg a list", [1, 2], std, "expected a JSON object"),
        (
            "no threshold",
            v6_cfg("jumprelu"),
            no_threshold,
            "no tensor 'threshold'; a jumprelu SAE needs threshold [d_sae]",
        ),
        (
            "W_enc transposed",
            v6_cfg(),
            {**std, "W_enc": std["W_enc"].T},
            "tensor 'W_enc' has shape [64, 16]; expected [16, 64]",
        ),
        ("d_in mismatch", v6_cfg(d_in=8), std, "tensor 'W_enc' has shape [16, 64]; expected [8, 64]"),
        ("extra tensor", v6_cfg(), {**std, "W_skip": torch.zeros(2)}, "unexpected tensor 'W_skip'"),
        ("int tensor", v6_cfg(), {**std, "b_dec": torch.zeros(D_IN, dtype=torch.int64)}, "has dtype I64"),
        (
            "scaling factor",
            v6_cfg(),
            {**std, "scaling_factor": torch.full((D_SAE,), 2.0)},
            "'scaling_factor' is not all ones",
        ),
    ]


@pytest.mark.parametrize("name, cfg, tensors, message", cases(), ids=[c[0] for c in cases()])
def test_malformed_folder_is_refused_naming_the_file(tmp_path, name, cfg, tensors, message):
    folder = write_folder(tmp_path / "sae", cfg, tensors)
    with pytest.raises(SpliceError) as info:
        ssae.load(folder)
    text = str(info.value)
    assert message in text, text
    assert str(folder) in text, text  # the file (cfg.json or the weights) is named


def test_broken_files_are_refused_naming_the_file(tmp_path):
    folder = tmp_path / "sae"
    with pytest.raises(SpliceError, match="no such SAE folder"):
        ssae.load(folder)
    folder.mkdir()
    with pytest.raises(SpliceError, match=f"{folder}: no cfg.json"):
        ssae.load(folder)
    (folder / "cfg.json").write_text('{"d_in": 16,')
    with pytest.raises(SpliceError, match=r"cfg.json line 1: invalid JSON"):
        ssae.load(folder)
    (folder / "cfg.json").write_bytes(b"\xff\xfe")
    with pytest.raises(SpliceError, match="cfg.json: not UTF-8"):
        ssae.load(folder)
    (folder / "cfg.json").write_text(json.dumps(v6_cfg()))
    with pytest.raises(SpliceError, match="no sae_weights.safetensors; expected SAE weights as safetensors"):
        ssae.load(folder)
    (folder / "sae_weights.safetensors").write_bytes(b"\x00" * 3)
    with pytest.raises(SpliceError, match=r"sae_weights.safetensors: not a readable safetensors file"):
        ssae.load(folder)
    save_file(weights("standard"), str(folder / "sae_weights.safetensors"))
    data = (folder / "sae_weights.safetensors").read_bytes()
    (folder / "sae_weights.safetensors").write_bytes(data[: len(data) // 2])  # truncated
    with pytest.raises(SpliceError, match=r"sae_weights.safetensors: not a readable safetensors file"):
        ssae.load(folder)
    (folder / "cfg.json.bak").write_text("{}")
    with pytest.raises(SpliceError, match=r"cfg.json.bak: expected an SAE folder"):
        ssae.load(folder / "cfg.json.bak")


class Bomb:
    """Unpickling this raises ZeroDivisionError: if splice ever unpickled a file, tests would see it."""

    def __reduce__(self):
        return (operator.truediv, (1, 0))


def test_nothing_is_unpickled(tmp_path, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("splice.sae unpickled something")

    monkeypatch.setattr(pickle, "load", forbidden)
    monkeypatch.setattr(pickle, "loads", forbidden)
    monkeypatch.setattr(torch, "load", forbidden)
    bomb = pickle.dumps(Bomb())
    # a pickle next to good files is ignored
    folder = write_folder(tmp_path / "both", v6_cfg(), weights("standard"))
    (folder / "sae_weights.pt").write_bytes(bomb)
    assert ssae.load(folder).cfg.architecture == "standard"
    # a pickle alone is refused by name
    only = write_folder(tmp_path / "only", v6_cfg(), None)
    (only / "sae_weights.pt").write_bytes(bomb)
    (only / "model.bin").write_bytes(bomb)
    with pytest.raises(
        SpliceError,
        match=r"no sae_weights.safetensors; found model.bin, sae_weights.pt, which splice does not read \(it never unpickles\)",
    ):
        ssae.load(only)
    with pytest.raises(
        SpliceError,
        match=r"sae_weights.pt: splice reads SAE weights from safetensors only and never unpickles",
    ):
        ssae.load(only / "sae_weights.pt")
    # a pickle under the safetensors name is not a safetensors file
    (only / "sae_weights.safetensors").write_bytes(bomb)
    with pytest.raises(SpliceError, match=r"sae_weights.safetensors: not a readable safetensors file"):
        ssae.load(only)


def test_save_refusals(tmp_path):
    with pytest.raises(SpliceError, match="writes a splice SparseAutoencoder; got Linear"):
        ssae.save(nn.Linear(2, 2), tmp_path)  # type: ignore[arg-type]
    (tmp_path / "file").write_text("x")
    with pytest.raises(SpliceError, match="is a file"):
        ssae.save(make("standard"), tmp_path / "file")


# -- hook names, sites and widths -------------------------------------------------------------------
@pytest.mark.parametrize(
    "hook, site",
    [
        ("blocks.8.hook_resid_post", "blocks.8.resid_post"),
        ("blocks.0.hook_resid_pre", "blocks.0.resid_pre"),
        ("blocks.3.hook_resid_mid", "blocks.3.resid_mid"),
        ("blocks.5.hook_mlp_out", "blocks.5.mlp.out"),
        ("blocks.5.hook_attn_out", "blocks.5.attn.out"),
        ("blocks.2.attn.hook_z", "blocks.2.attn.z"),
        ("blocks.2.mlp.hook_post", "blocks.2.mlp.post"),
        ("blocks.4.resid_post", "blocks.4.resid_post"),  # already a splice name
    ],
)
def test_hook_names_resolve_to_sites(hook, site):
    assert ssae.resolve_site(hook, 12) == site


@pytest.mark.parametrize(
    "hook, message",
    [
        ("hook_embed", "has no splice site computing the same tensor"),
        ("blocks.3.ln2.hook_normalized", "has no splice site computing the same tensor"),
        ("blocks.3.hook_mlp_in", "blocks.<l>.hook_resid_post"),
        ("blocks.12.hook_resid_post", "layer 12 in site 'blocks.12.resid_post' is out of range"),
        ("blocks.*.hook_resid_post", "is a pattern"),
        ("blocks.1.mlp.outt", "unknown site"),
    ],
)
def test_unknown_hook_names_are_refused(hook, message):
    with pytest.raises(SpliceError, match=re.escape(f"SAE hook_name {hook!r}")) as info:
        ssae.resolve_site(hook, 12)
    assert message in str(info.value)


@pytest.fixture(scope="module")
def llama():
    return splice.Model(build("llama"))  # 3 layers, d_model 48, 6 heads x 8, d_mlp 64


def test_resolve_and_fit_on_a_model(llama):
    sae = SparseAutoencoder(SAEConfig("standard", 48, 96, hook_name="blocks.2.hook_resid_post"))
    assert ssae.resolve_site(sae, llama) == "blocks.2.resid_post"
    assert ssae.check_fits(sae, llama) == "blocks.2.resid_post"
    assert ssae.check_fits(sae, llama, ("mlp_out", -1)) == "blocks.2.mlp.out"
    with pytest.raises(SpliceError, match="out of range: this model has 3 layers"):
        ssae.resolve_site("blocks.3.hook_resid_post", llama)
    with pytest.raises(SpliceError, match="has no hook_name"):
        ssae.resolve_site(SparseAutoencoder(SAEConfig("standard", 48, 96)), llama)
    with pytest.raises(SpliceError, match="an SAE goes at one site"):
        ssae.check_fits(sae, llama, "blocks.*.resid_post")


def test_width_mismatch_is_refused(llama):
    small = make("standard")  # d_in 16; the model's residual stream is 48 wide
    with pytest.raises(
        SpliceError,
        match=r"SAE d_in 16 does not fit site 'blocks\.1\.resid_post': its activations are 48 wide",
    ):
        ssae.check_fits(small, llama)
    mlp = SparseAutoencoder(SAEConfig("topk", 48, 96, k=4))
    with pytest.raises(SpliceError, match="its activations are 64 wide"):
        ssae.check_fits(mlp, llama, "blocks.0.mlp.post")
    with pytest.raises(SpliceError, match="has no fixed width"):
        ssae.check_fits(mlp, llama, "blocks.0.attn.pattern")


def test_head_sites(llama):
    flat = SparseAutoencoder(
        SAEConfig("standard", 48, 96, hook_name="blocks.1.attn.hook_z", reshape_activations="hook_z")
    )
    assert ssae.check_fits(flat, llama) == "blocks.1.attn.z"  # 6 heads x 8 flattened
    with pytest.raises(SpliceError, match="reads attention heads; site 'blocks.1.resid_post' has none"):
        ssae.check_fits(flat, llama, "blocks.1.resid_post")
    one = SparseAutoencoder(SAEConfig("standard", 8, 32, hook_name="blocks.1.attn.hook_z", hook_head_index=5))
    assert ssae.check_fits(one, llama) == "blocks.1.attn.z"
    wrong = SparseAutoencoder(
        SAEConfig("standard", 8, 32, hook_name="blocks.1.attn.hook_z", hook_head_index=6)
    )
    with pytest.raises(SpliceError, match="hook_head_index 6 is out of range"):
        ssae.check_fits(wrong, llama)
    # Without SAELens' reshape flag, the flattened heads are the only reading of a 48-wide SAE.
    flat_unflagged = SparseAutoencoder(SAEConfig("standard", 48, 96, hook_name="blocks.1.attn.hook_z"))
    assert ssae.check_fits(flat_unflagged, llama) == "blocks.1.attn.z"
    one_head = SparseAutoencoder(SAEConfig("standard", 8, 32, hook_name="blocks.1.attn.hook_z"))
    with pytest.raises(
        SpliceError, match="6 heads x 8 flattened .an SAE of one head's vectors needs a hook_head_index"
    ):
        ssae.check_fits(one_head, llama)


# -- any module with encode/decode ------------------------------------------------------------------
class DuckSAE(nn.Module):
    """Another library's SAE: its own names, only encode/decode and a width in common."""

    def __init__(self, d_in=48, d_sae=96):
        super().__init__()
        self.encoder = nn.Linear(d_in, d_sae)
        self.decoder = nn.Linear(d_sae, d_in)
        self.activation_dim = d_in  # dictionary_learning's name for d_in

    def encode(self, x):
        return self.encoder(x).relu()

    def decode(self, f):
        return self.decoder(f)


def test_as_sae_accepts_modules_with_encode_decode(llama):
    duck = DuckSAE()
    assert ssae.as_sae(duck) is duck
    sae = make("topk")
    assert ssae.as_sae(sae) is sae
    assert ssae.check_fits(duck, llama, "blocks.0.resid_pre") == "blocks.0.resid_pre"
    with pytest.raises(SpliceError, match="has no hook_name"):
        ssae.check_fits(duck, llama)


def test_as_sae_refuses_everything_else(tmp_path):
    with pytest.raises(SpliceError, match="Linear has no encode, decode"):
        ssae.as_sae(nn.Linear(2, 2))

    class NotAModule:
        def encode(self, x):
            return x

        def decode(self, f):
            return f

    with pytest.raises(SpliceError, match="got NotAModule"):
        ssae.as_sae(NotAModule())

    class HalfSAE(nn.Module):
        encode = None

        def decode(self, f):
            return f

    with pytest.raises(SpliceError, match="HalfSAE has no encode"):
        ssae.as_sae(HalfSAE())
    with pytest.raises(SpliceError, match=r"not a path .* splice\.sae\.load\(path\)"):
        ssae.as_sae(tmp_path)
    with pytest.raises(SpliceError, match="cannot tell the input width of Module"):
        ssae.check_fits(nn.Module(), splice.Model(build("gpt2")), "blocks.0.resid_pre")
