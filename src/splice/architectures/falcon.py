"""Falcon (`FalconForCausalLM`). The fused `query_key_value` layout follows the KV-head count:
multi-query (falcon-7b; also the new decoder architecture with one KV head) is `[Q | K | V]` with
one K and one V head; full multi-head attention (falcon-rw; the new architecture with as many KV
heads as heads) is laid out per head as `[q k v]`. The new architecture with 1 < KV heads < heads
(falcon-40b/180b) groups `[q ... q k v]` per KV head, which no view expresses yet: refused.

Parallel attention (`parallel_attn`, always with the new architecture): attention and MLP read the
block input through their norms (one shared `input_layernorm`, or `ln_attn`/`ln_mlp`) and the
block returns `resid_pre + attn.out + mlp.out`; otherwise the block is sequential like GPT-2.
Rotary and ALiBi variants share the table (sites are taken before rotary)."""

from typing import Any

from ..errors import SpliceError
from .table import Architecture, Dims, Point, residual_stream_points
from .views import Heads, InterleavedHeads, View

LAYER = "transformer.h.{l}"
"""Path of decoder layer `{l}`."""


def _kv_heads(config: Any) -> int:
    if config.new_decoder_architecture:
        return config.num_kv_heads
    return 1 if config.multi_query else config.num_attention_heads


def dims(config: Any) -> Dims:
    """Sizes of a `FalconConfig`; the KV-head count follows its layout flags.

    Raises:
        SpliceError: For the grouped layout (1 < KV heads < heads), which no view expresses.

    Example:
        >>> import transformers
        >>> config = transformers.FalconConfig(num_hidden_layers=2, hidden_size=32, num_attention_heads=4,
        ...                                    new_decoder_architecture=True, num_kv_heads=2)
        >>> dims(config)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: splice does not support Falcon's grouped query_key_value yet (2 KV heads for 4 heads, ...
    """
    heads, kv = config.num_attention_heads, _kv_heads(config)
    if kv not in (1, heads):
        raise SpliceError(
            f"splice does not support Falcon's grouped query_key_value yet ({kv} KV heads for {heads} heads, "
            "laid out [q ... q k v] per KV head); multi-query and full multi-head Falcon are supported"
        )
    return Dims(
        config.num_hidden_layers,
        config.hidden_size,
        heads,
        kv,
        config.hidden_size // heads,
        config.ffn_hidden_size,
        config.vocab_size,
    )


def points(d: Dims) -> dict[str, Point]:
    """The Falcon site table: q/k/v are `[Q | K | V]` slices (multi-query) or interleaved per
    head (full multi-head) in `query_key_value`'s output; z is `dense`'s input.

    Example:
        >>> from splice.architectures.table import Dims
        >>> points(Dims(2, 32, 4, 1, 8, 128, 100))["attn.k"].view  # multi-query: one K head
        Heads(heads=1, start=32, stop=40)
    """
    attn = f"{LAYER}.self_attention"
    qkv, width = f"{attn}.query_key_value", d.n_heads * d.d_head
    table = residual_stream_points(LAYER, attn, f"{LAYER}.mlp", "transformer.ln_f")
    views: tuple[View, ...]
    if d.n_kv_heads == 1:  # multi-query: [Q (heads) | K (one head) | V (one head)]
        views = (
            Heads(d.n_heads, 0, width),
            Heads(1, width, width + d.d_head),
            Heads(1, width + d.d_head, width + 2 * d.d_head),
        )
    else:  # per head [q k v]
        views = tuple(InterleavedHeads(d.n_heads, 3, i) for i in range(3))
    table.update(
        {
            "attn.q": Point(qkv, "output", views[0]),
            "attn.k": Point(qkv, "output", views[1]),
            "attn.v": Point(qkv, "output", views[2]),
            "attn.z": Point(f"{attn}.dense", "input", Heads(d.n_heads)),
            "mlp.post": Point(f"{LAYER}.mlp.dense_4h_to_h", "input"),
        }
    )
    return table


ARCHITECTURE = Architecture(
    "falcon",
    ("falcon",),
    "transformer",
    dims,
    points,
    parallel_residual=lambda config: bool(config.parallel_attn or config.new_decoder_architecture),
)
"""The Falcon table (registered in `splice.architectures.ARCHITECTURES`)."""
