"""Reading and writing SAEs in SAELens' on-disk format: a folder with `cfg.json` and
`sae_weights.safetensors`.

Only safetensors is read: nothing is unpickled, so a folder whose weights are a pickle
(`.pt`, `.pth`, `.bin`, `.ckpt`) is refused by name rather than loaded, and a pickle renamed to
`.safetensors` fails as the not-safetensors file it is. Every way a folder can be wrong is one
`SpliceError` naming the file, the key and what was expected. Tensor names and shapes are
checked from the safetensors header before any tensor is read.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import torch

from ..engine.files import parse_json, read_text, write_atomic
from ..errors import SpliceError
from .config import SAEConfig, check_weight_specs, dtype_name, parse_cfg, to_cfg_json
from .modules import SparseAutoencoder

CFG_FILENAME = "cfg.json"
"""The config file of an SAE folder (SAELens' name)."""
WEIGHTS_FILENAME = "sae_weights.safetensors"
"""The weights file of an SAE folder (SAELens' name)."""
PICKLE_SUFFIXES = (".pt", ".pth", ".bin", ".ckpt", ".pkl", ".pickle")
"""Weight files that may be pickles: never opened, named in the error when they are all there is."""


def _folder(path: str | os.PathLike[str]) -> Path:
    """The SAE folder for a path to it, to its `cfg.json` or to its weights file."""
    path = Path(path)
    if path.is_dir():
        return path
    if path.name in (CFG_FILENAME, WEIGHTS_FILENAME):
        return path.parent
    if path.suffix in PICKLE_SUFFIXES:
        raise SpliceError(
            f"{path}: splice reads SAE weights from safetensors only and never unpickles a file; "
            f"expected a folder with {CFG_FILENAME} and {WEIGHTS_FILENAME} (SAELens' format)"
        )
    if not path.exists():
        raise SpliceError(
            f"{path}: no such SAE folder; expected a folder with {CFG_FILENAME} and {WEIGHTS_FILENAME}"
        )
    raise SpliceError(
        f"{path}: expected an SAE folder with {CFG_FILENAME} and {WEIGHTS_FILENAME}, or one of them"
    )


def load(
    path: str | os.PathLike[str],
    device: torch.device | str | None = None,
    dtype: torch.dtype | str | None = None,
) -> SparseAutoencoder:
    """Load an SAE saved in SAELens' format (by SAELens' `save_model` or `splice.sae.save`).

    Reads `cfg.json` (SAELens 6 or older layout) and `sae_weights.safetensors`. No SAELens
    install is needed and nothing is unpickled.

    Args:
        path: The SAE folder, or its `cfg.json` or `sae_weights.safetensors`.
        device: Where to put the parameters (default: the CPU).
        dtype: Their dtype (a `torch.dtype` or a name); default the `dtype` in `cfg.json`,
            as SAELens does (the weights are cast to it).

    Returns:
        The `SparseAutoencoder`, whose `cfg.hook_name` says where it was trained.

    Raises:
        SpliceError: Naming the file, key and expectation, for a missing file, invalid JSON, a
            missing or mistyped key, an architecture or normalisation splice does not compute,
            weights that are not safetensors, or tensors missing, unexpected or not matching
            `d_in`/`d_sae`.

    Example:
        >>> import tempfile
        >>> from splice.sae import SAEConfig, SparseAutoencoder, save
        >>> sae = SparseAutoencoder(SAEConfig("standard", d_in=4, d_sae=8, hook_name="blocks.0.hook_resid_post"))
        >>> folder = tempfile.mkdtemp()
        >>> _ = save(sae, folder)
        >>> load(folder)
        SparseAutoencoder(standard, d_in=4, d_sae=8, hook_name='blocks.0.hook_resid_post')
    """
    folder = _folder(path)
    cfg_file = folder / CFG_FILENAME
    weights_file = folder / WEIGHTS_FILENAME
    if not cfg_file.is_file():
        raise SpliceError(f"{folder}: no {CFG_FILENAME}; expected an SAE folder in SAELens' format")
    what = "an SAE config (SAELens' cfg.json)"
    cfg = parse_cfg(parse_json(read_text(cfg_file, what), str(cfg_file), what), str(cfg_file))
    if not weights_file.is_file():
        pickles = sorted(p.name for p in folder.iterdir() if p.suffix in PICKLE_SUFFIXES)
        found = (
            f"; found {', '.join(pickles)}, which splice does not read (it never unpickles)"
            if pickles
            else ""
        )
        raise SpliceError(f"{folder}: no {WEIGHTS_FILENAME}{found}; expected SAE weights as safetensors")
    target = dtype_name(dtype) if dtype is not None else cfg.dtype
    tensors = _read_weights(weights_file, cfg)
    return SparseAutoencoder(cfg, tensors, device=device, dtype=target)


def _read_weights(file: Path, cfg: SAEConfig) -> dict[str, torch.Tensor]:
    """The tensors of a weights file, checked from its header first, converted to the names
    and values `SparseAutoencoder` takes (threshold from log_threshold, all-ones scaling dropped)."""
    from safetensors import SafetensorError, safe_open

    where = str(file)
    try:
        with safe_open(str(file), framework="pt", device="cpu") as handle:
            specs = {}
            for name in handle.keys():  # noqa: SIM118 (a safe_open handle is not a mapping)
                piece = handle.get_slice(name)
                specs[name] = (tuple(piece.get_shape()), piece.get_dtype())
            check_weight_specs(cfg, specs, where)
            tensors = {name: handle.get_tensor(name) for name in specs}
    except (SafetensorError, OSError, ValueError) as error:
        raise SpliceError(
            f"{where}: not a readable safetensors file ({error}); expected SAE weights"
        ) from None
    if "log_threshold" in tensors:
        tensors["threshold"] = torch.exp(tensors.pop("log_threshold"))
    if "scaling_factor" in tensors:
        scaling = tensors.pop("scaling_factor")
        if not torch.equal(scaling, torch.ones_like(scaling)):
            raise SpliceError(
                f"{where}: tensor 'scaling_factor' is not all ones (an SAELens < 6 fine-tuning scale); "
                "splice, like SAELens 6, reads only SAEs without one (fold it into W_dec first)"
            )
    return tensors


def save(sae: SparseAutoencoder, path: str | os.PathLike[str]) -> tuple[Path, Path]:
    """Write `sae` in SAELens' format, which SAELens' `SAE.load_from_disk` and `load` read.

    The folder gets `cfg.json` (SAELens 6 layout, `cfg.metadata` written back) and
    `sae_weights.safetensors` (the parameters as they are, dtype included). Each file is
    replaced whole or not at all.

    Args:
        sae: A `SparseAutoencoder` (another library's SAE is saved with that library).
        path: The folder; created if needed.

    Returns:
        The paths of the weights file and the config file.

    Raises:
        SpliceError: If `sae` is not a `SparseAutoencoder`, or `path` is an existing file.

    Example:
        >>> import tempfile
        >>> from splice.sae import SAEConfig, SparseAutoencoder
        >>> sae = SparseAutoencoder(SAEConfig("jumprelu", d_in=4, d_sae=8))
        >>> weights, cfg = save(sae, tempfile.mkdtemp())
        >>> weights.name, cfg.name
        ('sae_weights.safetensors', 'cfg.json')
    """
    from safetensors.torch import save_file

    if not isinstance(sae, SparseAutoencoder):
        raise SpliceError(
            f"splice.sae.save writes a splice SparseAutoencoder; got {type(sae).__name__} "
            "(save another library's SAE with that library, e.g. SAELens' sae.save_model(path))"
        )
    folder = Path(path)
    if folder.exists() and not folder.is_dir():
        raise SpliceError(
            f"{folder}: is a file; expected a folder to write {CFG_FILENAME} and {WEIGHTS_FILENAME} in"
        )
    try:
        folder.mkdir(parents=True, exist_ok=True)
    except OSError as error:
        raise SpliceError(f"cannot create {folder}: {error.strerror or error}") from None
    tensors = {name: p.detach().cpu().contiguous() for name, p in sae.named_parameters()}
    dtypes = {t.dtype for t in tensors.values()}
    if len(dtypes) != 1:
        raise SpliceError(f"SAE parameters have several dtypes ({sorted(map(str, dtypes))}); expected one")
    dtype = dtype_name(dtypes.pop())
    weights_file, cfg_file = folder / WEIGHTS_FILENAME, folder / CFG_FILENAME
    temporary = weights_file.with_name(f".{weights_file.name}.tmp{os.getpid()}")
    try:
        save_file(tensors, str(temporary))
        os.replace(temporary, weights_file)
    except OSError as error:
        raise SpliceError(f"cannot write {weights_file}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
    text = json.dumps(to_cfg_json(sae.cfg, dtype), indent=2) + "\n"
    write_atomic(cfg_file, text.encode("utf-8"))
    return weights_file, cfg_file
