"""The architecture registry: every family table in this package, and the one for a model."""

from __future__ import annotations

import importlib
import pkgutil
import sys

import torch.nn as nn

from ..errors import SpliceError
from .table import Architecture


def _discover() -> list[Architecture]:
    """Every `ARCHITECTURE` defined by a module of this package (one module per family)."""
    found = []
    for info in sorted(pkgutil.iter_modules(__path__), key=lambda i: i.name):
        module = importlib.import_module(f"{__name__}.{info.name}")
        if isinstance(getattr(module, "ARCHITECTURE", None), Architecture):
            found.append(module.ARCHITECTURE)
    return found


ARCHITECTURES: list[Architecture] = _discover()


def architecture_for(model: nn.Module) -> Architecture:
    """The table for a model, chosen by `config.model_type` (subclasses of a supported model work)."""
    config = getattr(model, "config", None)
    model_type = getattr(config, "model_type", None)
    for arch in ARCHITECTURES:
        if model_type in arch.model_types:
            return arch
    supported = ", ".join(t for a in ARCHITECTURES for t in a.model_types)
    raise SpliceError(
        f"splice has no adapter for {type(model).__name__} (model_type {model_type!r}); supported model types: "
        f"{supported}. Adding one is a small table: see 'Adding an architecture' in the README."
    )


def uses_attention_interface(attention: nn.Module) -> bool:
    """Pattern/scores sites need the attention module to dispatch through transformers'
    AttentionInterface (most families do; GPT-J, Falcon and BLOOM compute attention inline)."""
    return hasattr(sys.modules.get(type(attention).__module__), "ALL_ATTENTION_FUNCTIONS")
