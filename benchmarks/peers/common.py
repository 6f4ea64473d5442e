"""What every peer run shares: the model, its weights, the inputs and the five edits.

The GPT-2-small-shaped model (`GPT2Config()`, random weights, seed 0) is built once and saved to
`benchmarks/peers/weights/gpt2-small-seed0.safetensors`; every process (one per peer venv) loads
that file, so each library sees the same numbers. Nothing touches a model hub: the tokenizer a
wrapper may insist on is a word-level one built here over the model's vocabulary (`t0` ... `tN`),
and every input is token ids anyway.
"""

from __future__ import annotations

import hashlib
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
WEIGHTS = HERE / "weights"
RESULTS = HERE / "results"

# The five edits (layer, head, factor, positions are the issue's)
ZERO_LAYER, ZERO_HEAD = 3, 5
SCALE_LAYER, SCALE = 6, 0.5
ADD_LAYER = 8
PATCH_LAYER, PATCH_POS = 4, 5
EDITS = ("zero_head", "scale_mlp", "add_last", "patch_pos", "record_resid")
EDIT_LABELS = {
    "zero_head": f"Zero head {ZERO_HEAD} of layer {ZERO_LAYER} at z",
    "scale_mlp": f"Scale mlp.out of layer {SCALE_LAYER} by {SCALE}",
    "add_last": f"Add v to resid_post of layer {ADD_LAYER} at pos -1",
    "patch_pos": f"Patch resid_pre of layer {PATCH_LAYER} at pos {PATCH_POS} from another prompt",
    "record_resid": "Record all resid_post",
}
SWEEP_A, SWEEP_B = 11, 22  # the logit-difference tokens of the head-ablation sweep


def quiet_transformers() -> None:
    import transformers

    transformers.logging.set_verbosity_error()
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")


def gpt2_config(tiny: bool = False):
    from transformers import GPT2Config

    if tiny:  # same module tree as overhead.py's fixed-cost model
        return GPT2Config(n_embd=64, n_head=4, n_layer=12, vocab_size=512)
    return GPT2Config()


def weights_path(tiny: bool = False) -> Path:
    return WEIGHTS / ("gpt2-tiny-seed0.safetensors" if tiny else "gpt2-small-seed0.safetensors")


def build_hf(tiny: bool = False, attn_implementation: str | None = None):
    """A fresh GPT2LMHeadModel with the shared weights (created and saved on first use)."""
    from safetensors.torch import load_file, save_file
    from transformers import GPT2LMHeadModel

    config = gpt2_config(tiny)
    if attn_implementation:
        config._attn_implementation = attn_implementation
    path = weights_path(tiny)
    if not path.exists():
        torch.manual_seed(0)
        model = GPT2LMHeadModel(config).eval()
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {k: v.contiguous() for k, v in model.state_dict().items() if k != "lm_head.weight"}  # tied
        tmp = path.with_suffix(".tmp")
        save_file(state, str(tmp))
        tmp.rename(path)
        return model
    model = GPT2LMHeadModel(config)  # random init is overwritten below
    missing, unexpected = model.load_state_dict(load_file(str(path)), strict=False)
    if unexpected or set(missing) - {"lm_head.weight"}:
        raise RuntimeError(f"weights file {path} does not fit: missing {missing}, unexpected {unexpected}")
    model.tie_weights()
    if model.lm_head.weight.data_ptr() != model.transformer.wte.weight.data_ptr():
        raise RuntimeError("lm_head is not tied to wte")
    return model.eval()


def weights_digest(model) -> str:
    """A short hash of the parameters, printed so a reader can see every process used the same ones."""
    h = hashlib.sha256()
    for name, p in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(p.detach().contiguous().numpy().tobytes())
    return h.hexdigest()[:12]


def make_tokenizer(vocab_size: int):
    """A hub-free word-level tokenizer over the model's vocabulary (for wrappers that want one).

    It is saved under weights/ and loaded back with `from_pretrained(local dir)`, because the
    TransformerLens bridge re-loads a tokenizer from its `name_or_path`."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import AutoTokenizer, PreTrainedTokenizerFast

    path = WEIGHTS / f"tokenizer-{vocab_size}"
    if not (path / "tokenizer.json").exists():
        vocab = {f"t{i}": i for i in range(vocab_size)}
        tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="t0"))
        tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
        last = f"t{vocab_size - 1}"
        PreTrainedTokenizerFast(
            tokenizer_object=tok,
            bos_token=last,
            eos_token=last,
            pad_token=last,
            unk_token="t0",
            padding_side="left",
        ).save_pretrained(str(path))
    return AutoTokenizer.from_pretrained(str(path))


@dataclass
class Inputs:
    ids: torch.Tensor  # [batch, seq] the prompts every edit runs on
    other: torch.Tensor  # [batch, seq] the prompts patched from
    v: torch.Tensor  # [d_model] the vector added at the last position


def make_inputs(batch: int, seq: int, vocab: int, d_model: int, seed: int = 1) -> Inputs:
    g = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab, (batch, seq), generator=g)
    other = torch.randint(0, vocab, (batch, seq), generator=g)
    v = torch.randn(d_model, generator=g)
    return Inputs(ids, other, v)


def sweep_ids(prompts: int, seq: int, vocab: int, seed: int = 2) -> torch.Tensor:
    return torch.randint(0, vocab, (prompts, seq), generator=torch.Generator().manual_seed(seed))


def log(*args) -> None:
    print(*args, file=sys.stderr, flush=True)
