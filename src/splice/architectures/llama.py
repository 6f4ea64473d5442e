"""Llama family (`LlamaForCausalLM`, GQA): separate q/k/v projections, gated MLP, RMS norms."""

from typing import Any

from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads

LAYER = "model.layers.{l}"
"""Path of decoder layer `{l}`."""


def dims(config: Any) -> Dims:
    """Sizes of a Llama-style config (`head_dim` and `num_key_value_heads` when given; shared by
    Mistral, Qwen2, Gemma, Gemma2 and Phi-3).

    Example:
        >>> import transformers
        >>> config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, num_attention_heads=4,
        ...                                   num_key_value_heads=2, intermediate_size=128, vocab_size=100)
        >>> dims(config)
        Dims(n_layers=2, d_model=64, n_heads=4, n_kv_heads=2, d_head=16, d_mlp=128, vocab=100)
    """
    heads = config.num_attention_heads
    d_head = getattr(config, "head_dim", None) or config.hidden_size // heads
    kv = getattr(config, "num_key_value_heads", None) or heads
    return Dims(
        config.num_hidden_layers,
        config.hidden_size,
        heads,
        kv,
        d_head,
        config.intermediate_size,
        config.vocab_size,
    )


def points(d: Dims) -> dict[str, Point]:
    """The Llama site table: q/k/v are the `q_proj`/`k_proj`/`v_proj` outputs (k and v with the
    KV-head count), z is `o_proj`'s input, `mlp.post` is `down_proj`'s input.

    Example:
        >>> from splice.architectures.table import Dims
        >>> points(Dims(2, 64, 4, 2, 16, 128, 100))["attn.k"].view
        Heads(heads=2, start=None, stop=None)
    """
    attn = f"{LAYER}.self_attn"
    table = residual_stream_points(LAYER, attn, f"{LAYER}.mlp", "model.norm")
    table.update(
        {
            "attn.q": Point(f"{attn}.q_proj", "output", Heads(d.n_heads)),
            "attn.k": Point(f"{attn}.k_proj", "output", Heads(d.n_kv_heads)),
            "attn.v": Point(f"{attn}.v_proj", "output", Heads(d.n_kv_heads)),
            "attn.z": Point(f"{attn}.o_proj", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.down_proj", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture("llama", ("llama",), "model", dims, points)
"""The Llama table (registered in `splice.architectures.ARCHITECTURES`)."""
