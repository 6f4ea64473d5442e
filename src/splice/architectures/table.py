"""The adapter table format: an architecture is data (module paths and views), not code paths.

To add a family, write a module of this package that defines `ARCHITECTURE = Architecture(...)`;
it is registered by being there, and the hook engine needs nothing new.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

from .views import WHOLE, InterleavedHeads, ResidualSum


@dataclass(frozen=True)
class Dims:
    """Sizes of a model's named axes (see `splice.engine.sites.LAYER_POINTS`)."""

    n_layers: int
    d_model: int
    n_heads: int
    n_kv_heads: int
    d_head: int
    d_mlp: int
    vocab: int

    def size(self, axis: str) -> int | None:
        return {
            "d_model": self.d_model,
            "head": self.n_heads,
            "kv_head": self.n_kv_heads,
            "d_head": self.d_head,
            "d_mlp": self.d_mlp,
            "vocab": self.vocab,
        }.get(axis)


@dataclass(frozen=True)
class Point:
    """Where one site's tensor lives: a module (path with `{l}` for the layer), whether the site
    is that module's input or output, and the view that cuts the site out of it.

    `arg` is the keyword under which the module receives its input when it is called by keyword
    (Llama's `self_attn(hidden_states=...)`); otherwise the first positional argument is used.
    `field` is where the tensor sits in an output that is not a tensor: an index into a tuple
    (attention modules return `(output, weights)`) or a key of a `ModelOutput` (Gemma2's
    soft-capped `logits` exist only in the model's own output)."""

    module: str
    io: str  # "input" | "output" | "attention" (inside the attention function, see splice.engine.attention)
    view: object = WHOLE
    arg: str = "hidden_states"
    field: int | str = 0

    @property
    def needs_layer_input(self) -> bool:
        return getattr(self.view, "needs_layer_input", False)


@dataclass(frozen=True)
class Architecture:
    """One model family: which HF `model_type`s it covers, where its decoder lives, its sizes, and
    a function from sizes to its site table (point name -> Point). `logits_transform(config)`
    gives what the model applies to `lm_head`'s output outside any module (Gemma2's soft-cap), or
    None: a sweep that unembeds by hand applies it too."""

    name: str
    model_types: tuple[str, ...]
    decoder: str  # attribute of the *ForCausalLM that holds the decoder stack
    dims: Callable[[object], Dims]
    points: Callable[[Dims], dict[str, Point]]
    parallel_residual: Callable[[object], bool] = field(default=lambda config: False)
    logits_transform: Callable[[object], Callable | None] = field(default=lambda config: None)


def residual_stream_points(
    layer: str, attn: str, mlp: str, final_norm: str, attn_out: str | None = None
) -> dict[str, Point]:
    """The sites every pre-norm decoder family shares, from the paths of its layer, attention
    module, MLP module and final norm. `attn_out` is the module whose output is the attention's
    residual contribution, if not the attention module itself (Gemma2's post-attention norm)."""
    attn_out = attn_out or attn
    return {
        "embed": Point(layer.replace("{l}", "0"), "input"),
        "resid_pre": Point(layer, "input"),
        "attn.in": Point(attn, "input"),
        "attn.scores": Point(attn, "attention"),
        "attn.pattern": Point(attn, "attention"),
        "attn.out": Point(attn_out, "output"),
        "resid_mid": Point(attn_out, "output", ResidualSum()),
        "mlp.in": Point(mlp, "input"),
        "mlp.out": Point(mlp, "output"),
        "resid_post": Point(layer, "output"),
        "final_norm": Point(final_norm, "output"),
        "logits": Point("lm_head", "output"),
    }


def interleaved_qkv_points(qkv: str, heads: int) -> dict[str, Point]:
    """q/k/v of a fused projection laid out per head as [q k v] (GPT-NeoX, BLOOM, Falcon)."""
    return {
        f"attn.{part}": Point(qkv, "output", InterleavedHeads(heads, 3, i)) for i, part in enumerate("qkv")
    }
