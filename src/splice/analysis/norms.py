"""A norm module read as an affine map whose statistics can be frozen.

Every norm splice's families use (`nn.LayerNorm`; the RMS norms of Llama, Mistral, Qwen2, Phi-3,
Gemma and Gemma2) computes `gain * centre(x) / sigma(x) + bias` per position, where
`centre` subtracts the mean (LayerNorm) or nothing (RMS norm), and `sigma(x)` is
`sqrt(mean(centre(x)**2) + eps)`. Taking `sigma` from one tensor (the real residual) and applying
the rest to another (one component of it) is linear in the component, so the parts of a sum map
to parts that add up to the norm of the sum, minus the bias. That is what direct logit attribution
("frozen" norm) and Gemma2's post-sublayer norms need.

The parameters are read from the module, not from a per-family table: a `nn.LayerNorm` by its
attributes, any other norm as an RMS norm whose `gain` is found by running the module's own
`forward` on a vector of ones (so Gemma's `1 + weight` and Llama's `weight` are both right without
knowing which). `check` then compares the map with the module's own output on a real tensor, so a
norm computing something else is refused instead of misread.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch
import torch.nn as nn

from ..errors import SpliceError

EPS_ATTRIBUTES = ("eps", "variance_epsilon", "epsilon")
"""Where norm modules keep their epsilon (`nn.LayerNorm` and Gemma: `eps`; Llama: `variance_epsilon`)."""


@dataclass(frozen=True)
class FrozenNorm:
    """`gain * centre(x) / sigma + bias`, with `sigma` supplied by the caller.

    Attributes:
        name: What the norm is, for messages (`"the final norm (LayerNorm)"`).
        centred: Whether the mean is subtracted first (LayerNorm) or not (RMS norm).
        gain: The per-feature scale `[d_model]`, float32.
        bias: The per-feature offset `[d_model]`, float32, or None (RMS norms).
        eps: Added to the mean square inside the square root.

    Example:
        >>> import torch
        >>> ln = torch.nn.LayerNorm(4)
        >>> norm = read_norm(ln, 4, "a LayerNorm")
        >>> x = torch.randn(3, 4)
        >>> parts = torch.stack([x / 2, x / 2])  # two components of x
        >>> mapped = norm.linear(parts, norm.sigma(x)).sum(0) + norm.bias
        >>> torch.allclose(mapped, ln(x), atol=1e-6)
        True
    """

    name: str
    centred: bool
    gain: torch.Tensor
    bias: torch.Tensor | None
    eps: float

    def sigma(self, x: torch.Tensor) -> torch.Tensor:
        """The norm's divisor for each vector of `x [..., d_model]`, as `[..., 1]` float32."""
        x = x.float()
        if self.centred:
            x = x - x.mean(-1, keepdim=True)
        return (x.pow(2).mean(-1, keepdim=True) + self.eps).sqrt()

    def linear(self, parts: torch.Tensor, sigma: torch.Tensor) -> torch.Tensor:
        """`gain * centre(parts) / sigma`, float32: the norm with frozen statistics, without its
        bias. `sigma` broadcasts against `parts` (`[..., 1]` from `sigma`)."""
        parts = parts.float()
        if self.centred:
            parts = parts - parts.mean(-1, keepdim=True)
        return parts / sigma * self.gain

    def direction(self, direction: torch.Tensor) -> torch.Tensor:
        """A readout direction pulled back through `linear` (before dividing by sigma): for any
        `part`, `linear(part, s) @ direction == (part @ direction(direction)) / s`. Float32."""
        pulled = direction.float() * self.gain
        return pulled - pulled.mean(-1, keepdim=True) if self.centred else pulled

    def apply(self, x: torch.Tensor) -> torch.Tensor:
        """The whole norm of `x` (its own statistics), float32: what `check` compares."""
        out = self.linear(x, self.sigma(x))
        return out if self.bias is None else out + self.bias


def read_norm(module: nn.Module, d_model: int, name: str) -> FrozenNorm:
    """Read `module` as a `FrozenNorm` (see the module docstring for how).

    Args:
        module: The norm module.
        d_model: The width it normalises.
        name: What it is, for messages.

    Returns:
        The norm's parameters as float32 tensors on the module's device (detached copies).

    Raises:
        SpliceError: For a module that is neither a `nn.LayerNorm` over `d_model` nor a norm
            with a `[d_model]` weight and an epsilon attribute.

    Example:
        >>> import torch
        >>> read_norm(torch.nn.Linear(4, 4), 4, "the final norm")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: the final norm is a Linear: splice reads nn.LayerNorm and RMS norms ...
    """
    kind = f"{name} ({type(module).__name__})"
    with torch.no_grad():
        if isinstance(module, nn.LayerNorm):
            if tuple(module.normalized_shape) != (d_model,):
                raise SpliceError(
                    f"{kind} normalises over {list(module.normalized_shape)}, expected [{d_model}] (d_model)"
                )
            ref = module.weight if module.weight is not None else None
            device = ref.device if ref is not None else None
            gain = (
                module.weight.detach().float().clone()
                if module.weight is not None
                else torch.ones(d_model, device=device)
            )
            bias = module.bias.detach().float().clone() if module.bias is not None else None
            return FrozenNorm(kind, True, gain, bias, float(module.eps))
        eps = next(
            (
                getattr(module, a)
                for a in EPS_ATTRIBUTES
                if isinstance(getattr(module, a, None), (int, float))
                and not isinstance(getattr(module, a), bool)
            ),
            None,
        )
        weight = getattr(module, "weight", None)
        if eps is None or not isinstance(weight, torch.Tensor) or tuple(weight.shape) != (d_model,):
            raise SpliceError(
                f"{name} is a {type(module).__name__}: splice reads nn.LayerNorm and RMS norms with a "
                f"[{d_model}] weight and an epsilon attribute ({', '.join(EPS_ATTRIBUTES)}) as frozen maps"
            )
        ones = torch.ones(d_model, dtype=weight.dtype, device=weight.device)
        # mean(ones**2) == 1, so the module's output on ones is gain / sqrt(1 + eps).
        gain = module.forward(ones).detach().float() * math.sqrt(1.0 + float(eps))
        return FrozenNorm(kind, False, gain, None, float(eps))


def check(norm: FrozenNorm, module: nn.Module, x: torch.Tensor) -> None:
    """Refuse `norm` unless it reproduces `module.forward(x)` (the module's own forward, no hooks).

    Raises:
        SpliceError: Naming the module and the largest difference, when the module computes
            something other than a LayerNorm or RMS norm.
    """
    with torch.no_grad():
        want = module.forward(x).float()
        got = norm.apply(x)
    tol = max(1e-4, 16 * torch.finfo(x.dtype).eps) * (1.0 + float(want.abs().max()))
    error = float((got - want).abs().max()) if want.numel() else 0.0
    if not error <= tol:
        raise SpliceError(
            f"{norm.name} does not compute gain * centre(x) / sqrt(mean square + eps) + bias (largest "
            f"difference {error:.3g} from its own output): splice cannot apply it with frozen statistics"
        )
