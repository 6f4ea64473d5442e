"""Gemma (`GemmaForCausalLM`): Llama's module tree. Its embedding module multiplies by
sqrt(d_model) itself, so `embed` (the input of layer 0) is the scaled embedding, as in HF's
`hidden_states[0]`; the (1 + weight) RMS norms are ordinary modules."""

from . import llama
from .table import Architecture

ARCHITECTURE = Architecture("gemma", ("gemma",), "model", llama.dims, llama.points)
"""The Gemma (Llama's) table (registered in `splice.architectures.ARCHITECTURES`)."""
