"""The index of an activation cache: `index.json`, beside the safetensors shards it lists.

It says what the cache is of (the model's identity and spec, the sites and their row shapes, the
stored dtype, the settings that shape the rows) and which shards are finished, with their row and
document counts, sizes and checksums. The per-row arrays (token id, document, position) live in
the shards, next to the activations they describe, so the index stays a few hundred bytes per
shard whatever the corpus size.

The index is written before the first shard and rewritten whole (atomically) after every shard: a
shard not listed in it is unfinished, whatever is on disk. A cache is refused for reuse when what
it is of differs from what is asked (`difference`), so two runs never mix in one directory.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any

import torch

from ..engine.files import load_json, write_atomic
from ..errors import SpliceError

FORMAT = "splice-activations"
"""The `format` value of every index."""
VERSION = 1
"""The index layout version this splice writes and reads."""
INDEX_FILE = "index.json"
"""The index's file name inside a cache directory."""
ROW_FIELDS = ("tokens", "documents", "positions")
"""The int64 arrays every shard holds beside the activations, one value per row: the token id,
the document's index in the corpus, and the token's position in the document (0 is its first)."""
DTYPES = {
    "float32": torch.float32,
    "float16": torch.float16,
    "bfloat16": torch.bfloat16,
    "float64": torch.float64,
}
"""The dtypes activations may be stored in, by name."""
SAFETENSORS_DTYPES = {
    "F32": torch.float32,
    "F16": torch.float16,
    "BF16": torch.bfloat16,
    "F64": torch.float64,
    "I64": torch.int64,
}
"""safetensors' dtype codes of the tensors a shard holds."""
SAME = ("format", "version", "identity", "sites", "dtype", "settings")
"""What must match for a run to continue a cache (`identity` is the model's)."""
_SHARD_NAME = re.compile(r"^shard-\d{5,}\.safetensors$")


def shard_file(number: int) -> str:
    """The file name of shard `number`.

    Example:
        >>> shard_file(3)
        'shard-00003.safetensors'
    """
    return f"shard-{number:05d}.safetensors"


def is_shard_file(name: str) -> bool:
    """Whether `name` is a shard's file name (`shard_file`).

    Example:
        >>> is_shard_file("shard-00003.safetensors"), is_shard_file("../x.safetensors")
        (True, False)
    """
    return _SHARD_NAME.match(name) is not None


def dtype_name(dtype: torch.dtype) -> str:
    """The name a dtype has in the index (`"float32"`).

    Example:
        >>> dtype_name(torch.bfloat16)
        'bfloat16'
    """
    return str(dtype).removeprefix("torch.")


def parse_dtype(value: Any) -> torch.dtype:
    """A storage dtype from a `torch.dtype` or its name.

    Raises:
        SpliceError: For anything but float32, float16, bfloat16 or float64.

    Example:
        >>> parse_dtype("bfloat16")
        torch.bfloat16
        >>> parse_dtype(torch.int8)
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: dtype must be one of float32, float16, bfloat16, float64 (a torch.dtype or its name); got torch.int8
    """
    name = dtype_name(value) if isinstance(value, torch.dtype) else value
    if not isinstance(name, str) or name not in DTYPES:
        raise SpliceError(
            f"dtype must be one of {', '.join(DTYPES)} (a torch.dtype or its name); got {value!r}"
        )
    return DTYPES[name]


def new(
    spec: dict[str, Any] | None,
    identity: dict[str, Any],
    sites: dict[str, dict[str, Any]],
    dtype: torch.dtype,
    settings: dict[str, Any],
    splice_version: str,
) -> dict[str, Any]:
    """A fresh index, with no shard yet.

    Args:
        spec: The model's spec as data (`ModelSpec.to_dict()`), None for a model wrapped by hand.
        identity: The model's identity (`splice.loading.identity`): name, revision, weights
            digest, dtype.
        sites: {site name: {"axes": [...], "shape": [...]}}: each row's axes and shape.
        dtype: The stored activations' dtype.
        settings: What else shapes the rows (token cap, BOS rule, batch and shard sizes).
        splice_version: The version writing it (informational).

    Example:
        >>> index = new(None, {"name": "tiny"}, {"embed": {"axes": ["d_model"], "shape": [8]}}, torch.float32, {}, "0")
        >>> index["rows"], index["shards"], index["complete"]
        (0, [], False)
    """
    return {
        "format": FORMAT,
        "version": VERSION,
        "splice_version": splice_version,
        "spec": spec,
        "identity": identity,
        "sites": sites,
        "dtype": dtype_name(dtype),
        "row_fields": {field: "int64" for field in ROW_FIELDS},
        "settings": settings,
        "rows": 0,
        "documents": 0,
        "truncated_documents": 0,
        "complete": False,
        "shards": [],
    }


def difference(cached: dict[str, Any], wanted: dict[str, Any]) -> str | None:
    """What makes `cached` a cache of something else than `wanted` (None when they agree on `SAME`).

    Example:
        >>> a = new(None, {"name": "tiny"}, {}, torch.float32, {"max_tokens": 64}, "0")
        >>> b = new(None, {"name": "tiny"}, {}, torch.float32, {"max_tokens": 128}, "0")
        >>> difference(a, b)
        'settings max_tokens: cached 64, asked 128'
    """
    for key in SAME:
        old, now = cached.get(key), wanted.get(key)
        if old == now:
            continue
        if key == "sites" and isinstance(old, dict) and isinstance(now, dict) and list(old) != list(now):
            return f"sites: cached {list(old)}, asked {list(now)}"
        if isinstance(old, dict) and isinstance(now, dict):
            for inner in [*old, *(k for k in now if k not in old)]:
                if old.get(inner) != now.get(inner):
                    label = "model" if key == "identity" else key
                    return f"{label} {inner}: cached {old.get(inner)!r}, asked {now.get(inner)!r}"
        return f"{key}: cached {old!r}, asked {now!r}"
    return None


def write(out_dir: Path, index: dict[str, Any]) -> None:
    """Replace `out_dir/index.json` with `index`, whole or not at all."""
    import json

    write_atomic(out_dir / INDEX_FILE, (json.dumps(index, indent=1) + "\n").encode())


_WHAT = "an activation cache index written by splice.cache_activations"


def read(out_dir: Path) -> dict[str, Any]:
    """`out_dir/index.json`, checked: its format and version, and that every shard entry names a
    shard file and has counts that add up.

    Raises:
        SpliceError: For a missing or unreadable index, another format or version, or an entry
            that is malformed, naming the file and what was expected.

    Example:
        >>> import pathlib, tempfile
        >>> read(pathlib.Path(tempfile.mkdtemp()))  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: .../index.json: no such file; expected an activation cache index written by splice.cache_activations ...
    """
    path = out_dir / INDEX_FILE
    if not path.is_file():
        raise SpliceError(
            f"{path}: no such file; expected {_WHAT} (is {out_dir} the out_dir given to it, and did it start?)"
        )
    data = load_json(path, _WHAT).data

    def bad(message: str) -> SpliceError:
        return SpliceError(f"{path}: {message}; expected {_WHAT}")

    if not isinstance(data, dict) or data.get("format") != FORMAT:
        raise bad(f"format is {data.get('format') if isinstance(data, dict) else data!r}, not {FORMAT!r}")
    if data.get("version") != VERSION:
        raise bad(f"index version {data.get('version')!r}; this splice reads version {VERSION}")
    kinds = {"identity": dict, "sites": dict, "dtype": str, "settings": dict, "rows": int, "documents": int}
    kinds |= {"truncated_documents": int, "complete": bool, "shards": list}
    for key, kind in kinds.items():
        if not isinstance(data.get(key), kind) or (kind is int and isinstance(data.get(key), bool)):
            raise bad(f"{key!r} is {data.get(key)!r}, expected a {kind.__name__}")
    if data["dtype"] not in DTYPES:
        raise bad(f"dtype {data['dtype']!r} is not one of {', '.join(DTYPES)}")
    for name, site in data["sites"].items():
        shape = site.get("shape") if isinstance(site, dict) else None
        if not isinstance(shape, list) or not all(isinstance(n, int) and n > 0 for n in shape):
            raise bad(f"site {name!r} has no valid row shape ({site!r})")
    rows = documents = 0
    for number, shard in enumerate(data["shards"]):
        fields = ("rows", "first_document", "documents", "bytes")
        if (
            not isinstance(shard, dict)
            or shard.get("file") != shard_file(number)
            or not all(isinstance(shard.get(f), int) and shard[f] >= 0 for f in fields)
            or not isinstance(shard.get("sha256"), str)
        ):
            raise bad(
                f"shard entry {number} is {shard!r}; expected file {shard_file(number)!r}, counts and a sha256"
            )
        if shard["first_document"] != documents:
            raise bad(f"shard {number} starts at document {shard['first_document']}, expected {documents}")
        rows += shard["rows"]
        documents += shard["documents"]
    if (rows, documents) != (data["rows"], data["documents"]):
        raise bad(
            f"the shards hold {rows} rows of {documents} documents, the totals say {data['rows']} of {data['documents']}"
        )
    return data


def check_shard_size(path: Path, shard: dict[str, Any], advice: str) -> None:
    """Refuse a shard file that is missing or not the size the index recorded, ending the
    message with `advice` (what the caller's user should do)."""
    size = path.stat().st_size if path.is_file() else None
    if size != shard["bytes"]:
        found = "missing" if size is None else f"{size} bytes"
        raise SpliceError(f"{path}: shard file is {found}, the index says {shard['bytes']} bytes; {advice}")
