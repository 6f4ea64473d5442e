"""Gemma2 (`Gemma2ForCausalLM`): Llama-like projections, but each sublayer's output is normalised
before it joins the residual stream (`post_attention_layernorm`, `post_feedforward_layernorm`), and
the MLP's input norm is `pre_feedforward_layernorm`. `attn.out` / `mlp.out` are those post-norm
outputs (what is actually added), so `resid_pre + attn.out + mlp.out == resid_post`; `attn.z`
through `o_proj` gives the attention output *before* its post-norm.

The embedding module scales by sqrt(d_model); `embed` (input of layer 0) is the scaled tensor.
`Gemma2ForCausalLM.forward` soft-caps the logits after `lm_head`, outside any module, so `logits`
is read from the model's own output (its `.logits`), i.e. exactly what the model returns."""

import torch

from . import llama
from .table import Architecture, Dims, Point, residual_stream_points

LAYER = "model.layers.{l}"


def points(d: Dims) -> dict[str, Point]:
    table = llama.points(d)
    table.update(
        residual_stream_points(
            LAYER,
            f"{LAYER}.self_attn",
            f"{LAYER}.mlp",
            "model.norm",
            attn_out=f"{LAYER}.post_attention_layernorm",
        )
    )
    table["mlp.out"] = Point(f"{LAYER}.post_feedforward_layernorm", "output")
    table["logits"] = Point("", "output", field="logits")  # the model's own output
    return table


def soft_cap(config):
    """`cap * tanh(logits / cap)`, as `Gemma2ForCausalLM.forward` applies after `lm_head`."""
    cap = config.final_logit_softcapping
    return None if cap is None else lambda logits: torch.tanh(logits / cap) * cap


ARCHITECTURE = Architecture("gemma2", ("gemma2",), "model", llama.dims, points, logits_transform=soft_cap)
