"""The architecture registry: every family table in this package, and the one for a model.

An architecture is a table, not code: see `splice.architectures.table` for the format and
`splice.architectures.views` for how a site is cut out of a module tensor. A module of this
package that defines `ARCHITECTURE = Architecture(...)` is registered by being there.
"""

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
"""Every registered family table, by module name (`splice.ARCHITECTURES`).

Example:
    >>> import splice
    >>> sorted(t for arch in splice.ARCHITECTURES for t in arch.model_types)[:4]
    ['bloom', 'falcon', 'gemma', 'gemma2']
"""


def architecture_for(model: nn.Module) -> Architecture:
    """The table for a model, chosen by `config.model_type` (subclasses of a supported model work).

    Args:
        model: A Hugging Face model; only its `config.model_type` is read.

    Returns:
        The registered `Architecture` covering that model type.

    Raises:
        SpliceError: For an unsupported model, naming its class, its `model_type` and the
            supported ones.

    Example:
        >>> import torch
        >>> architecture_for(torch.nn.Linear(2, 2))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: splice has no adapter for Linear (model_type None); supported model types: bloom, ...
    """
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
    """Whether an attention module dispatches through transformers' `AttentionInterface`.

    Pattern/scores sites need it (most families do; Falcon and BLOOM compute attention
    inline, so they have no pattern sites).

    Args:
        attention: A layer's attention module.

    Example:
        >>> import torch
        >>> uses_attention_interface(torch.nn.Linear(2, 2))
        False
    """
    return hasattr(sys.modules.get(type(attention).__module__), "ALL_ATTENTION_FUNCTIONS")
