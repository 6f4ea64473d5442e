"""GPT-NeoX / Pythia (`GPTNeoXForCausalLM`): fused `query_key_value` laid out per head as
`[h0: q k v | h1: q k v | ...]` (the model views it as `(..., heads, 3*d_head)` and chunks the last
axis), partial rotary after the split, and a parallel residual unless `use_parallel_residual` is
false (then attention and MLP are sequential, as in GPT-2)."""

from typing import Any

from .table import Architecture, Dims, Point, interleaved_qkv_points, residual_stream_points
from .views import Heads

LAYER = "gpt_neox.layers.{l}"
"""Path of decoder layer `{l}`."""


def dims(config: Any) -> Dims:
    """Sizes of a `GPTNeoXConfig`.

    Example:
        >>> import transformers
        >>> config = transformers.GPTNeoXConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
        ...                                     intermediate_size=64, vocab_size=100)
        >>> dims(config)
        Dims(n_layers=2, d_model=32, n_heads=4, n_kv_heads=4, d_head=8, d_mlp=64, vocab=100)
    """
    heads = config.num_attention_heads
    return Dims(
        config.num_hidden_layers,
        config.hidden_size,
        heads,
        heads,
        config.hidden_size // heads,
        config.intermediate_size,
        config.vocab_size,
    )


def points(d: Dims) -> dict[str, Point]:
    """The GPT-NeoX site table: q/k/v interleaved per head in `query_key_value`'s output, z is
    `dense`'s input, `mlp.post` is `dense_4h_to_h`'s input.

    Example:
        >>> from splice.architectures.table import Dims
        >>> points(Dims(2, 32, 4, 4, 8, 64, 100))["attn.q"].view
        InterleavedHeads(heads=4, parts=3, index=0)
    """
    attn = f"{LAYER}.attention"
    qkv = f"{attn}.query_key_value"
    table = residual_stream_points(LAYER, attn, f"{LAYER}.mlp", "gpt_neox.final_layer_norm")
    table.update(interleaved_qkv_points(qkv, d.n_heads))
    table.update(
        {
            "attn.z": Point(f"{attn}.dense", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.dense_4h_to_h", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture(
    "gpt_neox",
    ("gpt_neox",),
    "gpt_neox",
    dims,
    points,
    parallel_residual=lambda config: bool(getattr(config, "use_parallel_residual", True)),
)
"""The GPT-NeoX table (registered in `splice.architectures.ARCHITECTURES`)."""
