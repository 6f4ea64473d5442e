"""`SparseAutoencoder`: the three SAE architectures splice computes, as one plain `nn.Module`.

The arithmetic is SAELens' own, operation for operation (the same torch calls in the same order),
so an SAE loaded here encodes and decodes bit for bit as it does in SAELens on the same device
and dtype. It needs no SAELens install and keeps no state between calls: `encode` and `decode`
are pure functions of their input and the parameters.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import replace

import torch
import torch.nn as nn

from ..errors import SpliceError
from .config import DTYPES, SAEConfig, check_weight_specs, dtype_name


class SparseAutoencoder(nn.Module):
    """A sparse autoencoder: `encode(x) -> acts`, `decode(acts) -> x_hat`.

    With `x_in = x - b_dec` if `cfg.apply_b_dec_to_input` else `x`, and
    `pre = x_in @ W_enc + b_enc`:

    - `standard`: `acts = relu(pre)`.
    - `jumprelu`: `acts = relu(pre) * (pre > threshold)`.
    - `topk`: the k largest entries of `pre` (per row of the last axis) pass through `relu`, every
      other entry is 0; with `cfg.rescale_acts_by_decoder_norm`, `pre` is first multiplied by
      the decoder rows' norms `||W_dec[i]||`.

    `decode(acts) = acts @ W_dec + b_dec` (for TopK with `rescale_acts_by_decoder_norm`,
    `acts / ||W_dec[i]||` first), and `forward(x) = decode(encode(x))`.

    Args:
        cfg: The architecture and sizes.
        weights: `W_enc [d_in, d_sae]`, `b_enc [d_sae]`, `W_dec [d_sae, d_in]`, `b_dec [d_in]`,
            and `threshold [d_sae]` for JumpReLU; checked against `cfg`. None: all zeros
            (assign or load weights afterwards).
        device: Where the parameters live (default: the CPU, or where `weights` are).
        dtype: Their dtype (default `cfg.dtype`); `cfg.dtype` is set to it.

    Attributes:
        cfg: The `SAEConfig`.
        W_enc: Encoder weight, `[d_in, d_sae]`.
        b_enc: Encoder bias, `[d_sae]`.
        W_dec: Decoder weight, `[d_sae, d_in]` (row i is feature i's direction).
        b_dec: Decoder bias, `[d_in]`.
        threshold: JumpReLU thresholds, `[d_sae]`; None for the other architectures.

    Raises:
        SpliceError: If a weight is missing, unexpected, misshapen or not floating point.

    Example:
        >>> import torch
        >>> cfg = SAEConfig("topk", d_in=4, d_sae=8, k=2)
        >>> g = torch.Generator().manual_seed(0)
        >>> w = {"W_enc": torch.randn(4, 8, generator=g), "b_enc": torch.zeros(8),
        ...      "W_dec": torch.randn(8, 4, generator=g), "b_dec": torch.zeros(4)}
        >>> sae = SparseAutoencoder(cfg, w)
        >>> acts = sae.encode(torch.randn(3, 4, generator=g))
        >>> acts.shape, (acts != 0).sum(-1).tolist()
        (torch.Size([3, 8]), [2, 2, 2])
        >>> sae.decode(acts).shape
        torch.Size([3, 4])
    """

    threshold: nn.Parameter | None

    def __init__(
        self,
        cfg: SAEConfig,
        weights: Mapping[str, torch.Tensor] | None = None,
        *,
        device: torch.device | str | None = None,
        dtype: torch.dtype | str | None = None,
    ):
        super().__init__()
        if not isinstance(cfg, SAEConfig):
            raise SpliceError(f"SparseAutoencoder needs an SAEConfig; got {type(cfg).__name__}")
        name = cfg.dtype if dtype is None else dtype_name(dtype)
        self.cfg = replace(cfg, dtype=name) if name != cfg.dtype else cfg
        torch_dtype = DTYPES[name]
        shapes = cfg.weight_shapes()
        if weights is None:
            tensors = {k: torch.zeros(shape, dtype=torch_dtype, device=device) for k, shape in shapes.items()}
        else:
            if not isinstance(weights, Mapping) or not all(
                isinstance(v, torch.Tensor) for v in weights.values()
            ):
                raise SpliceError("SparseAutoencoder weights must be a mapping of names to tensors")
            specs = {k: (tuple(v.shape), _code(v.dtype)) for k, v in weights.items()}
            check_weight_specs(cfg, specs, "SparseAutoencoder weights")
            if "scaling_factor" in weights or "log_threshold" in weights:
                raise SpliceError(
                    "SparseAutoencoder weights: give threshold (not log_threshold) and no "
                    "scaling_factor; splice.sae.load converts files that hold them"
                )
            tensors = {k: v.detach().to(device=device, dtype=torch_dtype) for k, v in weights.items()}
        self.W_enc = nn.Parameter(tensors["W_enc"])
        self.b_enc = nn.Parameter(tensors["b_enc"])
        self.W_dec = nn.Parameter(tensors["W_dec"])
        self.b_dec = nn.Parameter(tensors["b_dec"])
        if cfg.architecture == "jumprelu":
            self.threshold = nn.Parameter(tensors["threshold"])
        else:
            self.register_parameter("threshold", None)

    @property
    def d_in(self) -> int:
        """Width of the activations it reads and reconstructs (`cfg.d_in`)."""
        return self.cfg.d_in

    @property
    def d_sae(self) -> int:
        """Number of features (`cfg.d_sae`)."""
        return self.cfg.d_sae

    def extra_repr(self) -> str:
        """What `repr` shows inside the parentheses: architecture, sizes, k and hook name."""
        k = f", k={self.cfg.k}" if self.cfg.k is not None else ""
        hook = f", hook_name={self.cfg.hook_name!r}" if self.cfg.hook_name else ""
        return f"{self.cfg.architecture}, d_in={self.d_in}, d_sae={self.d_sae}{k}{hook}"

    def pre_acts(self, x: torch.Tensor) -> torch.Tensor:
        """The encoder's pre-activations `x_in @ W_enc + b_enc` (before ReLU, threshold or top k).

        Args:
            x: Activations `[..., d_in]`; cast to the SAE's dtype.

        Returns:
            `[..., d_sae]`.

        Raises:
            SpliceError: If the last axis of `x` is not `d_in` wide.
        """
        if x.shape[-1:] != (self.cfg.d_in,):
            raise SpliceError(
                f"SAE input has shape {list(x.shape)}; expected [..., {self.cfg.d_in}] (its last axis is d_in)"
            )
        x = x.to(self.W_enc.dtype)
        if self.cfg.apply_b_dec_to_input:
            x = x - self.b_dec
        return x @ self.W_enc + self.b_enc

    def encode(self, x: torch.Tensor) -> torch.Tensor:
        """Feature activations of `x` (see the class docstring for each architecture's formula).

        Args:
            x: Activations `[..., d_in]`; cast to the SAE's dtype.

        Returns:
            `[..., d_sae]`, non-negative; for TopK at most k nonzeros per row.

        Raises:
            SpliceError: If the last axis of `x` is not `d_in` wide.
        """
        pre = self.pre_acts(x)
        arch = self.cfg.architecture
        if arch == "standard":
            return torch.relu(pre)
        if arch == "jumprelu":
            threshold = self.threshold
            assert threshold is not None  # a jumprelu SAE always has one
            return torch.relu(pre) * (pre > threshold).to(pre.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            pre = pre * self.W_dec.norm(dim=-1)
        values, indices = torch.topk(pre, k=self.cfg.k, dim=-1, sorted=False)  # type: ignore[arg-type]
        return torch.zeros_like(pre).scatter_(-1, indices, values.relu())

    def decode(self, acts: torch.Tensor) -> torch.Tensor:
        """Reconstruct activations from feature activations: `acts @ W_dec + b_dec`.

        Args:
            acts: Feature activations `[..., d_sae]` (from `encode`, possibly edited); cast to
                the SAE's dtype.

        Returns:
            `[..., d_in]`.

        Raises:
            SpliceError: If the last axis of `acts` is not `d_sae` wide.
        """
        if acts.shape[-1:] != (self.cfg.d_sae,):
            raise SpliceError(
                f"SAE feature activations have shape {list(acts.shape)}; expected [..., {self.cfg.d_sae}] "
                "(their last axis is d_sae)"
            )
        acts = acts.to(self.W_dec.dtype)
        if self.cfg.rescale_acts_by_decoder_norm:
            acts = acts * (1 / self.W_dec.norm(dim=-1))
        return acts @ self.W_dec + self.b_dec

    def linear_decoder(self) -> torch.Tensor:
        """The matrix `D` with `decode(a) - decode(b) == (a - b) @ D`: `W_dec`, with each row divided
        by its norm for TopK with `rescale_acts_by_decoder_norm`.

        Why: an attached SAE whose latents are edited adds `decode(a') - decode(a)` to the site;
        with `D` that costs only the edited latents' rows instead of two full decodes.
        """
        if self.cfg.rescale_acts_by_decoder_norm:
            return self.W_dec * (1 / self.W_dec.norm(dim=-1, keepdim=True))
        return self.W_dec

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """The reconstruction `decode(encode(x))`, `[..., d_in]`."""
        return self.decode(self.encode(x))


def _code(dtype: torch.dtype) -> str:
    """safetensors' code for a torch dtype (`"F32"`, ...), or its torch name if it has none here."""
    codes = {torch.float16: "F16", torch.bfloat16: "BF16", torch.float32: "F32", torch.float64: "F64"}
    return codes.get(dtype, str(dtype))
