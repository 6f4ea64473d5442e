"""GPT-J (`GPTJForCausalLM`): separate bias-free q/k/v projections (rotary applied after them),
and a parallel residual: attention and MLP both read `ln_1`'s output and the block returns
`resid_pre + attn.out + mlp.out` (there is no second norm and no resid_mid)."""

from typing import Any

from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads

LAYER = "transformer.h.{l}"
"""Path of decoder layer `{l}`."""


def dims(config: Any) -> Dims:
    """Sizes of a `GPTJConfig` (`n_inner` unset means 4 * d_model).

    Example:
        >>> import transformers
        >>> dims(transformers.GPTJConfig(n_layer=2, n_embd=32, n_head=4, rotary_dim=4)).d_head
        8
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
    """The GPT-J site table: q/k/v are the `q_proj`/`k_proj`/`v_proj` outputs, z is
    `out_proj`'s input, `mlp.post` is `fc_out`'s input.

    Example:
        >>> from splice.architectures.table import Dims
        >>> points(Dims(2, 32, 4, 4, 8, 128, 100))["attn.z"].module
        'transformer.h.{l}.attn.out_proj'
    """
    attn = f"{LAYER}.attn"
    table = residual_stream_points(LAYER, attn, f"{LAYER}.mlp", "transformer.ln_f")
    table.update(
        {
            "attn.q": Point(f"{attn}.q_proj", "output", Heads(d.n_heads)),
            "attn.k": Point(f"{attn}.k_proj", "output", Heads(d.n_heads)),
            "attn.v": Point(f"{attn}.v_proj", "output", Heads(d.n_heads)),
            "attn.z": Point(f"{attn}.out_proj", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.fc_out", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture(
    "gptj", ("gptj",), "transformer", dims, points, parallel_residual=lambda config: True
)
"""The GPT-J table (registered in `splice.architectures.ARCHITECTURES`)."""
