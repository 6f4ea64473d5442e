"""Qwen2 (`Qwen2ForCausalLM`): Llama's module tree with biases on q/k/v (not on o). The q/k/v
sites are the projection outputs, bias included, before rotary."""

from . import llama
from .table import Architecture

ARCHITECTURE = Architecture("qwen2", ("qwen2",), "model", llama.dims, llama.points)
"""The Qwen2 (Llama's) table (registered in `splice.architectures.ARCHITECTURES`)."""
