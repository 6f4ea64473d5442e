"""What an SAE is, apart from its weights: `SAEConfig`, and reading it from SAELens' `cfg.json`.

SAELens has written two layouts of `cfg.json`, and both are read here:

- 6.0 and later: `architecture`, `d_in`, `d_sae`, `dtype`, `apply_b_dec_to_input`,
  `normalize_activations`, `reshape_activations`, the TopK fields `k` and
  `rescale_acts_by_decoder_norm`, and a `metadata` mapping holding `hook_name`,
  `hook_head_index`, `model_name` and `sae_lens_version` (6.x or later, which marks the layout).
- Before 6.0 (no `sae_lens_version`, or an older one): everything flat, `hook_name` (or the
  still older `hook_point`) at the top, `architecture` possibly absent (meaning `standard`), and
  TopK written as `activation_fn_str: "topk"` with `activation_fn_kwargs: {"k": ...}`.

Anything the file says that splice would have to guess at or compute differently (another
architecture, an activation normalisation other than none, another activation function) is
refused by name rather than approximated: an SAE that loads computes what SAELens computes.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType
from typing import Any

import torch

from ..errors import SpliceError

ARCHITECTURES = ("standard", "jumprelu", "topk")
"""The architectures splice computes: ReLU (`standard`), `jumprelu` and `topk`."""

DTYPES: dict[str, torch.dtype] = {
    "float32": torch.float32,
    "float64": torch.float64,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
}
"""The dtype names a `cfg.json` may give (also written `torch.float32` etc.), as SAELens knows them."""

RESHAPES = ("none", "hook_z")
"""Values of `reshape_activations`: `hook_z` means the SAE reads attention heads flattened
(`[..., n_heads * d_head]`); the caller flattens them (`encode` only takes `[..., d_in]`)."""

FORMAT_VERSION = "6.0.0"
"""The `sae_lens_version` written into a saved file whose metadata has no 6.x one: the first
SAELens release with the layout `save` writes."""

# Keys that SAELens < 6 wrote at the top level and 6.x keeps in `metadata`; the rest of an old
# file's keys (training details) are kept in `metadata` only if they are in this set.
_METADATA_KEYS = {
    "model_name",
    "model_class_name",
    "hook_name",
    "hook_head_index",
    "model_from_pretrained_kwargs",
    "prepend_bos",
    "exclude_special_tokens",
    "neuronpedia_id",
    "context_size",
    "seqpos_slice",
    "dataset_path",
    "sae_lens_version",
    "sae_lens_training_version",
}


@dataclass(frozen=True)
class SAEConfig:
    """The shape, activation function and origin of a sparse autoencoder (frozen; checked on
    construction, so a config that exists is a valid one).

    Attributes:
        architecture: `"standard"` (ReLU), `"jumprelu"` or `"topk"`.
        d_in: Width of the activations it reads and reconstructs.
        d_sae: Number of features.
        k: Features kept per input (TopK only; required there, None for the others).
        hook_name: The TransformerLens hook it was trained on (e.g. `"blocks.8.hook_resid_post"`),
            or None if the file does not say; `splice.sae.resolve_site` turns it into a site.
        hook_head_index: The single attention head it reads at a head site, or None.
        apply_b_dec_to_input: Whether `encode` subtracts `b_dec` from its input first.
        rescale_acts_by_decoder_norm: TopK only: pre-activations are scaled by the decoder rows'
            norms before the top k are chosen, and activations divided by them in `decode`.
        reshape_activations: `"none"`, or `"hook_z"` for an SAE on flattened attention heads.
        dtype: Name of the parameters' dtype when it was built or loaded (`"float32"`, ...).
        metadata: The file's other metadata (`model_name`, `sae_lens_version`, ...), kept so that
            `splice.sae.save` writes it back; read-only, not compared or hashed.

    Example:
        >>> cfg = SAEConfig("topk", d_in=16, d_sae=64, k=4, hook_name="blocks.1.hook_resid_post")
        >>> cfg.architecture, cfg.k, cfg.dtype
        ('topk', 4, 'float32')
        >>> SAEConfig("topk", d_in=16, d_sae=64)
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: 'k': a topk SAE needs k, an int in 1..64 (d_sae); got None
    """

    architecture: str
    d_in: int
    d_sae: int
    k: int | None = None
    hook_name: str | None = None
    hook_head_index: int | None = None
    apply_b_dec_to_input: bool = True
    rescale_acts_by_decoder_norm: bool = False
    reshape_activations: str = "none"
    dtype: str = "float32"
    metadata: Mapping[str, Any] = field(default_factory=dict, compare=False, hash=False)

    def __post_init__(self) -> None:
        if self.architecture not in ARCHITECTURES:
            raise SpliceError(
                f"'architecture': {self.architecture!r} is not one splice computes; expected one of "
                f"{', '.join(ARCHITECTURES)}"
            )
        for key in ("d_in", "d_sae"):
            value = getattr(self, key)
            if not _is_int(value) or value < 1:
                raise SpliceError(f"{key!r}: expected a positive int; got {value!r}")
        if self.architecture == "topk":
            if not _is_int(self.k) or not 1 <= self.k <= self.d_sae:  # type: ignore[operator]
                raise SpliceError(
                    f"'k': a topk SAE needs k, an int in 1..{self.d_sae} (d_sae); got {self.k!r}"
                )
        elif self.k is not None:
            raise SpliceError(f"'k': only a topk SAE has k; this one is {self.architecture}")
        if self.rescale_acts_by_decoder_norm is not False and self.architecture != "topk":
            raise SpliceError("'rescale_acts_by_decoder_norm': only a topk SAE can have it set")
        for key in ("apply_b_dec_to_input", "rescale_acts_by_decoder_norm"):
            if not isinstance(getattr(self, key), bool):
                raise SpliceError(f"{key!r}: expected true or false; got {getattr(self, key)!r}")
        if self.hook_name is not None and not isinstance(self.hook_name, str):
            raise SpliceError(f"'hook_name': expected a string or null; got {self.hook_name!r}")
        if self.hook_head_index is not None and (
            not _is_int(self.hook_head_index) or self.hook_head_index < 0
        ):
            raise SpliceError(
                f"'hook_head_index': expected a head index (int >= 0) or null; got {self.hook_head_index!r}"
            )
        if self.reshape_activations not in RESHAPES:
            raise SpliceError(
                f"'reshape_activations': expected one of {', '.join(map(repr, RESHAPES))}; "
                f"got {self.reshape_activations!r}"
            )
        if self.dtype not in DTYPES:
            raise SpliceError(f"'dtype': expected one of {', '.join(DTYPES)}; got {self.dtype!r}")
        if not isinstance(self.metadata, Mapping):
            raise SpliceError(f"'metadata': expected a mapping; got {type(self.metadata).__name__}")
        object.__setattr__(self, "metadata", MappingProxyType(dict(self.metadata)))

    @property
    def torch_dtype(self) -> torch.dtype:
        """`dtype` as a `torch.dtype`.

        Example:
            >>> SAEConfig("standard", 4, 8, dtype="bfloat16").torch_dtype
            torch.bfloat16
        """
        return DTYPES[self.dtype]

    def weight_shapes(self) -> dict[str, tuple[int, ...]]:
        """The tensors an SAE of this config has, and their shapes (as stored in
        `sae_weights.safetensors`).

        Example:
            >>> SAEConfig("jumprelu", d_in=4, d_sae=8).weight_shapes()
            {'W_enc': (4, 8), 'b_enc': (8,), 'W_dec': (8, 4), 'b_dec': (4,), 'threshold': (8,)}
        """
        shapes = {
            "W_enc": (self.d_in, self.d_sae),
            "b_enc": (self.d_sae,),
            "W_dec": (self.d_sae, self.d_in),
            "b_dec": (self.d_in,),
        }
        if self.architecture == "jumprelu":
            shapes["threshold"] = (self.d_sae,)
        return shapes


def _is_int(value: Any) -> bool:
    return isinstance(value, int) and not isinstance(value, bool)


def dtype_name(dtype: torch.dtype | str) -> str:
    """The canonical name (`"float32"`, ...) of a dtype given as a `torch.dtype` or a name
    (`"float32"` or `"torch.float32"`).

    Raises:
        SpliceError: For a dtype an SAE file cannot hold (not one of `DTYPES`).

    Example:
        >>> dtype_name(torch.bfloat16), dtype_name("torch.float16")
        ('bfloat16', 'float16')
    """
    if isinstance(dtype, torch.dtype):
        name = str(dtype).removeprefix("torch.")
    elif isinstance(dtype, str):
        name = dtype.removeprefix("torch.")
    else:
        raise SpliceError(f"a dtype is a torch.dtype or a name such as 'float32'; got {dtype!r}")
    if name not in DTYPES:
        raise SpliceError(f"dtype {dtype!r}: expected one of {', '.join(DTYPES)}")
    return name


def is_v6_layout(data: Mapping[str, Any]) -> bool:
    """Whether a `cfg.json` has SAELens' 6.x layout: its `sae_lens_version` (at the top, or in
    `metadata`) is 6 or later. SAELens decides the same way; a file without one is older.

    Example:
        >>> is_v6_layout({"metadata": {"sae_lens_version": "6.54.12"}}), is_v6_layout({"hook_name": "x"})
        (True, False)
    """
    version = data.get("sae_lens_version")
    metadata = data.get("metadata")
    if not version and isinstance(metadata, Mapping):
        version = metadata.get("sae_lens_version")
    match = re.match(r"\s*v?(\d+)", version) if isinstance(version, str) else None
    return match is not None and int(match.group(1)) >= 6


def parse_cfg(data: Any, where: str) -> SAEConfig:
    """Read a parsed SAELens `cfg.json` (either layout, see the module docstring) into an
    `SAEConfig`.

    Args:
        data: The parsed JSON.
        where: The file, named in every error.

    Returns:
        The config; keys it has no use for (training details, `device`, ...) are dropped, the
        metadata kept.

    Raises:
        SpliceError: Naming `where`, the key and what was expected, for a missing or mistyped key,
            an architecture or activation function splice does not compute, or an
            `normalize_activations` other than none.

    Example:
        >>> old = {"d_in": 4, "d_sae": 8, "hook_point": "blocks.0.hook_resid_pre", "activation_fn_str": "topk",
        ...        "activation_fn_kwargs": {"k": 2}}
        >>> cfg = parse_cfg(old, "cfg.json")
        >>> cfg.architecture, cfg.k, cfg.hook_name
        ('topk', 2, 'blocks.0.hook_resid_pre')
        >>> parse_cfg({"d_in": 4, "d_sae": 8, "normalize_activations": "layer_norm"}, "x/cfg.json")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: x/cfg.json: 'normalize_activations' is 'layer_norm'; splice computes SAEs without activation normalisation only (expected 'none')
    """
    if not isinstance(data, Mapping):
        raise SpliceError(f"{where}: expected a JSON object (SAELens' cfg.json); got {type(data).__name__}")

    def fail(key: str, message: str) -> SpliceError:
        return SpliceError(f"{where}: {key!r} {message}")

    for key in ("d_in", "d_sae"):
        if key not in data:
            raise fail(key, "is missing; expected a positive int")
    v6 = is_v6_layout(data)
    metadata_in = data.get("metadata", {})
    if not isinstance(metadata_in, Mapping):
        raise fail("metadata", f"must be an object; got {metadata_in!r}")
    metadata = dict(metadata_in) if v6 else {k: v for k, v in data.items() if k in _METADATA_KEYS}
    if v6:
        if "architecture" not in data:
            raise fail("architecture", f"is missing; expected one of {', '.join(ARCHITECTURES)}")
        architecture = data["architecture"]
        k = data.get("k")
    else:
        # SAELens < 6: `hook_point` was the first name of `hook_name`, and TopK an activation function.
        if "hook_point" in data and "hook_name" not in metadata:
            metadata["hook_name"] = data["hook_point"]
        if "hook_name" not in metadata and "hook_name" in metadata_in:  # 6.x-like, but unversioned
            metadata["hook_name"] = metadata_in["hook_name"]
        if "hook_point_head_index" in data and "hook_head_index" not in metadata:
            metadata["hook_head_index"] = data["hook_point_head_index"]
        architecture = data.get("architecture", "standard")
        activation = data.get("activation_fn_str", data.get("activation_fn"))
        kwargs = data.get("activation_fn_kwargs") or {}
        if not isinstance(kwargs, Mapping):
            raise fail("activation_fn_kwargs", f"must be an object; got {kwargs!r}")
        k = kwargs.get("k", data.get("k"))
        if activation == "topk" and architecture in ("standard", "topk"):
            architecture = "topk"
        elif activation not in (None, "relu"):
            raise fail(
                "activation_fn_str",
                f"is {activation!r}; splice computes relu (and topk for a standard or topk SAE)",
            )
        elif architecture == "topk" and activation == "relu":
            # SAELens 5 computed ReLU for this combination and SAELens 6 computes TopK.
            raise fail("activation_fn_str", "is 'relu' for a topk SAE; expected 'topk' (ambiguous file)")
    if not isinstance(architecture, str) or architecture not in ARCHITECTURES:
        raise fail(
            "architecture",
            f"is {architecture!r}; splice reads {', '.join(ARCHITECTURES)} SAEs "
            "(load others with their own library and pass them to splice.sae.as_sae)",
        )
    if architecture != "topk":
        k = None
    normalize = data.get("normalize_activations", "none")
    if normalize not in (None, False, "none"):
        shown = "expected_average_only_in" if normalize is True else normalize
        raise fail(
            "normalize_activations",
            f"is {shown!r}; splice computes SAEs without activation normalisation only (expected 'none')",
        )
    hook_name = metadata.pop("hook_name", None)
    reshape = data.get("reshape_activations")
    if reshape is None:
        reshape = "hook_z" if isinstance(hook_name, str) and "hook_z" in hook_name else "none"
    dtype = data.get("dtype", "float32")
    try:
        dtype = dtype_name(dtype) if isinstance(dtype, str) else dtype
        return SAEConfig(
            architecture=architecture,
            d_in=data["d_in"],
            d_sae=data["d_sae"],
            k=k,
            hook_name=hook_name,
            hook_head_index=metadata.pop("hook_head_index", None),
            apply_b_dec_to_input=data.get("apply_b_dec_to_input", True),
            rescale_acts_by_decoder_norm=data.get("rescale_acts_by_decoder_norm", False)
            if architecture == "topk"
            else False,
            reshape_activations=reshape,
            dtype=dtype,
            metadata=metadata,
        )
    except SpliceError as error:
        raise SpliceError(f"{where}: {error}") from None


def to_cfg_json(cfg: SAEConfig, dtype: str) -> dict[str, Any]:
    """The `cfg.json` that SAELens 6 writes for `cfg`, so that `SAE.load_from_disk` reads it.

    Args:
        cfg: The config.
        dtype: The dtype name the weights are saved in.

    Returns:
        A JSON-able dict in the 6.x layout. `metadata.sae_lens_version` is kept when it is 6 or
        later and otherwise set to `"6.0.0"`: it marks the layout (SAELens reads a file without
        one as the older layout and would lose `metadata.hook_name`).

    Example:
        >>> to_cfg_json(SAEConfig("topk", 4, 8, k=2), "float32")["metadata"]
        {'hook_name': None, 'hook_head_index': None, 'sae_lens_version': '6.0.0'}
    """
    metadata = {**cfg.metadata, "hook_name": cfg.hook_name, "hook_head_index": cfg.hook_head_index}
    if not is_v6_layout({"metadata": metadata}):
        metadata["sae_lens_version"] = FORMAT_VERSION
    out: dict[str, Any] = {
        "d_in": cfg.d_in,
        "d_sae": cfg.d_sae,
        "dtype": dtype,
        "device": "cpu",
        "apply_b_dec_to_input": cfg.apply_b_dec_to_input,
        "normalize_activations": "none",
        "reshape_activations": cfg.reshape_activations,
        "metadata": metadata,
        "architecture": cfg.architecture,
    }
    if cfg.architecture == "topk":
        out["k"] = cfg.k
        out["rescale_acts_by_decoder_norm"] = cfg.rescale_acts_by_decoder_norm
    return out


FLOAT_CODES = {"F16": "float16", "BF16": "bfloat16", "F32": "float32", "F64": "float64"}
"""safetensors' dtype codes of the tensors an SAE file may hold."""

_AXES = {"W_enc": "[d_in, d_sae]", "b_enc": "[d_sae]", "W_dec": "[d_sae, d_in]", "b_dec": "[d_in]"}


def check_weight_specs(cfg: SAEConfig, specs: Mapping[str, tuple[tuple[int, ...], str]], where: str) -> None:
    """Check the tensors of an SAE's weights file against its config before any is read.

    Besides `cfg.weight_shapes()`, a file may hold `log_threshold` instead of `threshold` (older
    JumpReLU checkpoints; the threshold is its exp) and a `scaling_factor` of shape `[d_sae]`
    (SAELens < 6, accepted only when all ones, which the loader checks).

    Args:
        cfg: The config read from `cfg.json`.
        specs: Tensor name -> (shape, safetensors dtype code such as `"F32"`).
        where: The weights file, named in every error.

    Raises:
        SpliceError: For a missing or unexpected tensor, a shape that does not match `d_in` /
            `d_sae`, or a dtype that is not floating point.

    Example:
        >>> cfg = SAEConfig("standard", d_in=4, d_sae=8)
        >>> specs = {"W_enc": ((4, 8), "F32"), "b_enc": ((8,), "F32"), "W_dec": ((8, 4), "F32"), "b_dec": ((5,), "F32")}
        >>> check_weight_specs(cfg, specs, "w.safetensors")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: w.safetensors: tensor 'b_dec' has shape [5]; expected [4] ([d_in] with d_in 4, d_sae 8 from cfg.json)
    """
    expected: dict[str, tuple[int, ...]] = dict(cfg.weight_shapes())
    if cfg.architecture == "jumprelu" and "threshold" not in specs and "log_threshold" in specs:
        expected["log_threshold"] = expected.pop("threshold")
    if "scaling_factor" in specs:
        expected["scaling_factor"] = (cfg.d_sae,)
    held = ", ".join(specs) or "no tensors"
    for name, shape in expected.items():
        if name not in specs:
            axes = _AXES.get(name, "[d_sae]")
            raise SpliceError(
                f"{where}: no tensor {name!r}; a {cfg.architecture} SAE needs {name} {axes} "
                f"(the file holds {held})"
            )
        got, code = specs[name]
        if tuple(got) != shape:
            raise SpliceError(
                f"{where}: tensor {name!r} has shape {list(got)}; expected {list(shape)} "
                f"({_AXES.get(name, '[d_sae]')} with d_in {cfg.d_in}, d_sae {cfg.d_sae} from cfg.json)"
            )
        if code not in FLOAT_CODES:
            raise SpliceError(
                f"{where}: tensor {name!r} has dtype {code}; expected a floating point one "
                f"({', '.join(FLOAT_CODES)})"
            )
    for name in specs:
        if name not in expected:
            raise SpliceError(
                f"{where}: unexpected tensor {name!r}; a {cfg.architecture} SAE holds only "
                f"{', '.join(cfg.weight_shapes())}"
            )
