"""BLOOM (`BloomForCausalLM`): fused `query_key_value` laid out per head as `[q k v]`, ALiBi, and
sublayers that add the residual themselves: the attention module returns `resid_pre + attn.out`
(so its output *is* resid_mid) and the MLP returns `resid_mid + mlp.out` (= resid_post). The
contributions are therefore the outputs of the projections (`dense`, `dense_4h_to_h`), and
resid_mid is a real tensor: an edit there is exact. The embedding norm runs before layer 0, so
`embed` is after it.

Refused: `apply_residual_connection_post_layernorm=True` (the residual is the normed stream, so the
sites do not add up) and `pretraining_tp > 1` with `slow_but_exact` (the projections are then
applied slice by slice, never called as modules)."""

from typing import Any

from ..errors import SpliceError
from .table import Architecture, Dims, Point, interleaved_qkv_points, residual_stream_points
from .views import WHOLE, Heads

LAYER = "transformer.h.{l}"
"""Path of decoder layer `{l}`."""


def dims(config: Any) -> Dims:
    """Sizes of a `BloomConfig` (d_mlp is 4 * d_model); refuses the configurations in the
    module docstring.

    Raises:
        SpliceError: For `apply_residual_connection_post_layernorm=True`, or
            `pretraining_tp > 1` with `slow_but_exact=True`.

    Example:
        >>> import transformers
        >>> config = transformers.BloomConfig(n_layer=2, hidden_size=16, n_head=2,
        ...                                   apply_residual_connection_post_layernorm=True)
        >>> dims(config)  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: splice does not support BLOOM with apply_residual_connection_post_layernorm=True: ...
    """
    if config.apply_residual_connection_post_layernorm:
        raise SpliceError(
            "splice does not support BLOOM with apply_residual_connection_post_layernorm=True: "
            "its residual stream is the normalised one, so the residual sites do not add up"
        )
    if config.pretraining_tp > 1 and config.slow_but_exact:
        raise SpliceError(
            "splice does not support BLOOM with pretraining_tp > 1 and slow_but_exact=True: "
            "the output projections are applied in slices and never called; set slow_but_exact=False"
        )
    d_model, heads = config.hidden_size, config.n_head
    return Dims(config.n_layer, d_model, heads, heads, d_model // heads, 4 * d_model, config.vocab_size)


def points(d: Dims) -> dict[str, Point]:
    """The BLOOM site table: q/k/v interleaved per head, contributions read at the `dense` and
    `dense_4h_to_h` outputs, `resid_mid` the attention module's own output.

    Example:
        >>> from splice.architectures.table import Dims
        >>> points(Dims(2, 16, 2, 2, 8, 64, 100))["resid_mid"].module
        'transformer.h.{l}.self_attention'
    """
    attn, mlp = f"{LAYER}.self_attention", f"{LAYER}.mlp"
    qkv = f"{attn}.query_key_value"
    table = residual_stream_points(LAYER, attn, mlp, "transformer.ln_f")
    table.update(interleaved_qkv_points(qkv, d.n_heads))
    table.update(
        {
            "attn.z": Point(f"{attn}.dense", "input", Heads(d.n_heads)),
            "attn.out": Point(f"{attn}.dense", "output"),
            "resid_mid": Point(attn, "output", WHOLE),  # the attention module adds the residual itself
            "mlp.post": Point(f"{mlp}.dense_4h_to_h", "input"),
            "mlp.out": Point(f"{mlp}.dense_4h_to_h", "output"),
        }
    )
    return table


ARCHITECTURE = Architecture("bloom", ("bloom",), "transformer", dims, points)
"""The BLOOM table (registered in `splice.architectures.ARCHITECTURES`)."""
