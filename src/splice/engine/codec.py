"""JSON-safe encoding of intervention fields (tensors, slices, tuples, site -> tensor mappings) and back.

The records are plain JSON/YAML data, so an edits file or a sweep config can be read with a safe
loader and checked before anything is built (see `splice.engine.files`).
"""

from __future__ import annotations

from typing import Any

import torch

from ..errors import SpliceError


def encode(value: Any) -> Any:
    """One intervention field as JSON-safe data (what `Intervention.to_dict` writes).

    Args:
        value: A tensor (`{"tensor": nested list, "dtype": name}`, detached and moved to the
            CPU), a slice (`{"slice": [start, stop, step]}`), a tuple (a list), a dict
            (`{"mapping": {str(key): encoded value}}`), None, a bool, int, float or str (as
            they are).

    Returns:
        The encoded value; `decode` inverts it.

    Raises:
        SpliceError: For any other type (functions, modules, arbitrary objects).

    Example:
        >>> import torch
        >>> encode(torch.tensor([1.0, 2.0]))
        {'tensor': [1.0, 2.0], 'dtype': 'float32'}
        >>> encode((1, slice(0, 4)))
        [1, {'slice': [0, 4, None]}]
    """
    if isinstance(value, torch.Tensor):
        return {"tensor": value.detach().cpu().tolist(), "dtype": str(value.dtype).removeprefix("torch.")}
    if isinstance(value, slice):
        return {"slice": [value.start, value.stop, value.step]}
    if isinstance(value, tuple):
        return [encode(v) for v in value]
    if isinstance(value, dict):
        return {"mapping": {str(k): encode(v) for k, v in value.items()}}
    if value is None or isinstance(value, (bool, int, float, str)):
        return value
    raise SpliceError(f"cannot serialise {type(value).__name__} value {value!r}")


def _dtype(name) -> torch.dtype:
    """A dtype named in a saved record ("float32", "bool", ...); refuses anything else, e.g. a
    hand-edited "Tensor" or "Size", which getattr(torch, name) would turn into a class (or a crash)."""
    dtype = getattr(torch, name, None) if isinstance(name, str) else None
    if not isinstance(dtype, torch.dtype):
        raise SpliceError(
            f"cannot decode a tensor with dtype {name!r}: expected a torch dtype name such as 'float32', 'bfloat16' or 'bool'"
        )
    return dtype


def decode(value: Any) -> Any:
    """The inverse of `encode`: records back to tensors, slices, tuples and dicts.

    Args:
        value: Data as `encode` writes it (lists become tuples; other plain values pass
            through).

    Returns:
        The decoded value.

    Raises:
        SpliceError: For a dict that is no tensor, slice or mapping record, or a tensor
            record whose dtype names no torch dtype.

    Example:
        >>> decode({"tensor": [1.0, 2.0], "dtype": "float32"})
        tensor([1., 2.])
        >>> decode([1, {"slice": [0, 4, None]}])
        (1, slice(0, 4, None))
        >>> decode({"tensor": [1], "dtype": "Tensor"})  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: cannot decode a tensor with dtype 'Tensor': ...
    """
    if isinstance(value, dict):
        if "tensor" in value:
            return torch.tensor(value["tensor"], dtype=_dtype(value.get("dtype", "float32")))
        if "slice" in value:
            return slice(*value["slice"])
        if "mapping" in value:
            return {k: decode(v) for k, v in value["mapping"].items()}
        raise SpliceError(f"cannot decode {value!r}: expected a tensor, slice or mapping record")
    if isinstance(value, list):
        return tuple(decode(v) for v in value)
    return value
