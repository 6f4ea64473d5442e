"""Mistral (`MistralForCausalLM`): Llama's module tree (separate q/k/v/o projections, gated MLP,
RMS norms, GQA); the sliding-window attention lives inside the attention call, not in the tree."""

from . import llama
from .table import Architecture

ARCHITECTURE = Architecture("mistral", ("mistral",), "model", llama.dims, llama.points)
"""The Mistral (Llama's) table (registered in `splice.architectures.ARCHITECTURES`)."""
