"""JSON-safe encoding of intervention fields (tensors, slices, tuples, site -> tensor mappings) and back."""

from __future__ import annotations

import torch

from .errors import SpliceError


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


def decode(value):
    if isinstance(value, dict):
        if "tensor" in value:
            dtype = getattr(torch, value.get("dtype", "float32"))
            return torch.tensor(value["tensor"], dtype=dtype)
        if "slice" in value:
            return slice(*value["slice"])
        if "mapping" in value:
            return {k: decode(v) for k, v in value["mapping"].items()}
        raise SpliceError(f"cannot decode {value!r}: expected a tensor, slice or mapping record")
    if isinstance(value, list):
        return tuple(decode(v) for v in value)
    return value
