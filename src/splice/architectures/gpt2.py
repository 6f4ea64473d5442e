"""GPT-2 (`GPT2LMHeadModel`): fused `c_attn` = [Q|K|V] on the last axis, Conv1D projections."""

from typing import Any

from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads

LAYER = "transformer.h.{l}"
"""Path of decoder layer `{l}`."""


def dims(config: Any) -> Dims:
    """Sizes of a `GPT2Config` (`n_inner` unset means 4 * d_model).

    Example:
        >>> import transformers
        >>> dims(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2)).d_mlp
        64
    """
    d_model, heads = config.n_embd, config.n_head
    return Dims(
        config.n_layer,
        d_model,
        heads,
        heads,
        d_model // heads,
        config.n_inner or 4 * d_model,
        config.vocab_size,
    )


def points(d: Dims) -> dict[str, Point]:
    """The GPT-2 site table: q/k/v are `[Q|K|V]` slices of `c_attn`'s output, z is the
    attention `c_proj`'s input, `mlp.post` the MLP `c_proj`'s input.

    Example:
        >>> import transformers
        >>> points(dims(transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2)))["attn.v"].view
        Heads(heads=2, start=32, stop=48)
    """
    qkv, width = f"{LAYER}.attn.c_attn", d.n_heads * d.d_head
    table = residual_stream_points(LAYER, f"{LAYER}.attn", f"{LAYER}.mlp", "transformer.ln_f")
    table.update(
        {
            "attn.q": Point(qkv, "output", Heads(d.n_heads, 0, width)),
            "attn.k": Point(qkv, "output", Heads(d.n_heads, width, 2 * width)),
            "attn.v": Point(qkv, "output", Heads(d.n_heads, 2 * width, 3 * width)),
            "attn.z": Point(f"{LAYER}.attn.c_proj", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.c_proj", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture("gpt2", ("gpt2",), "transformer", dims, points)
"""The GPT-2 table (registered in `splice.architectures.ARCHITECTURES`)."""
