"""Gemma2 (`Gemma2ForCausalLM`): Llama-like projections, but each sublayer's output is normalised
before it joins the residual stream (`post_attention_layernorm`, `post_feedforward_layernorm`), and
the MLP's input norm is `pre_feedforward_layernorm`. `attn.out` / `mlp.out` are those post-norm
outputs (what is actually added), so `resid_pre + attn.out + mlp.out == resid_post`; `attn.z`
through `o_proj` gives the attention output *before* its post-norm.

The embedding module scales by sqrt(d_model); `embed` (input of layer 0) is the scaled tensor.
`Gemma2ForCausalLM.forward` soft-caps the logits after `lm_head`, outside any module, so `logits`
is read from the model's own output (its `.logits`), i.e. exactly what the model returns."""

from collections.abc import Callable
from typing import Any

import torch

from . import llama
from .table import Architecture, Dims, Point, residual_stream_points

LAYER = "model.layers.{l}"
"""Path of decoder layer `{l}`."""


def points(d: Dims) -> dict[str, Point]:
    """The Gemma2 site table: Llama's, with `attn.out`/`mlp.out` the post-norms' outputs and
    `logits` read from the model's own (soft-capped) output.

    Example:
        >>> from splice.architectures.table import Dims
        >>> points(Dims(2, 32, 4, 2, 8, 64, 100))["attn.out"].module
        'model.layers.{l}.post_attention_layernorm'
    """
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


def soft_cap(config: Any) -> Callable[[torch.Tensor], torch.Tensor] | None:
    """`cap * tanh(logits / cap)`, as `Gemma2ForCausalLM.forward` applies after `lm_head`
    (None when `final_logit_softcapping` is None).

    Example:
        >>> import torch, transformers
        >>> soft_cap(transformers.Gemma2Config(final_logit_softcapping=30.0))(torch.tensor([100.0]))
        tensor([29.9237])
    """
    cap = config.final_logit_softcapping
    return None if cap is None else lambda logits: torch.tanh(logits / cap) * cap


ARCHITECTURE = Architecture("gemma2", ("gemma2",), "model", llama.dims, points, logits_transform=soft_cap)
"""The Gemma2 table (registered in `splice.architectures.ARCHITECTURES`)."""
