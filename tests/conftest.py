"""Tiny random-weight models for every supported family, built from configs (no hub access)."""

from __future__ import annotations

import pytest
import torch
from families import FAMILIES
from transformers.utils import logging as hf_logging

import splice

hf_logging.set_verbosity_error()
# Tiny models gain nothing from threads, and two busy threads on a shared 2-core runner thrash.
torch.set_num_threads(1)

VOCAB = 97


def build(family: str, seed: int = 0):
    torch.manual_seed(seed)
    model = FAMILIES[family].tiny().eval()
    # Random init leaves some parameters at exactly 0 / 1 (biases, norm weights); jitter them so
    # that an edit anywhere reaches the logits and every site computes something distinct.
    with torch.no_grad():
        for p in model.parameters():
            p.add_(torch.randn_like(p) * 0.02)
    return model


class CharTokenizer:
    """A stand-in tokenizer (one token per character) so token-level features run without a hub."""

    pad_token_id, eos_token_id = 0, 0

    def __call__(self, text, add_special_tokens=True, return_tensors=None):
        ids = [ord(c) % 90 + 1 for c in text]
        return {"input_ids": torch.tensor([ids]) if return_tensors == "pt" else ids}

    def decode(self, ids, skip_special_tokens=False):
        return "".join(chr(i - 1 + 32) if i else "" for i in ids)

    def batch_decode(self, rows, skip_special_tokens=False):
        return [self.decode(r.tolist()) for r in rows]


@pytest.fixture(params=sorted(FAMILIES))
def family(request):
    return request.param


@pytest.fixture
def hf(family):
    return build(family)


@pytest.fixture
def model(hf):
    return splice.Model(hf)


@pytest.fixture
def ids():
    return torch.randint(1, VOCAB, (2, 9), generator=torch.Generator().manual_seed(1))


@pytest.fixture(scope="module", params=sorted(FAMILIES))
def char_model(request):
    """A tiny model of each family with the character tokenizer, shared by one test module."""
    return splice.Model(build(request.param), CharTokenizer())


@pytest.fixture(scope="module")
def char_gpt2():
    """The tiny GPT-2 with the character tokenizer, shared by one test module."""
    return splice.Model(build("gpt2"), CharTokenizer())


def hook_total(module: torch.nn.Module) -> int:
    """Every forward / pre-forward hook on a module tree (ours or anyone's)."""
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in module.modules())


@pytest.fixture(scope="session")
def smol():
    """The embedded SmolLM2-135M model (cached as safetensors after the first load)."""
    return splice.load()
