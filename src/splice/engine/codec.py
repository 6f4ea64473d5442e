"""JSON-safe encoding of intervention fields (tensors, slices, tuples, site -> tensor mappings) and back."""

from __future__ import annotations

import torch

from ..errors import SpliceError


def encode(value):
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


def decode(value):
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
