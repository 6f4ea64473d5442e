"""`ActivationStore`: a cache written by `cache_activations`, read back memory-mapped.

Each shard is a safetensors file; its tensors are mapped from disk (`torch.from_file`, private
and read-only in effect: nothing is written back), so opening a store of any size costs a few
kilobytes, and reading rows brings only their part of the files into memory. Indexing returns
copies, so what a caller holds never depends on the file staying as it was.
"""

from __future__ import annotations

import hashlib
import itertools
import json
import math
import numbers
import os
import struct
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

import torch
from torch.utils.data import Dataset

from ..engine.sites import canonical_name
from ..errors import SpliceError
from . import index


class ActivationStore(Dataset):
    """The rows of one site of an activation cache, as a torch `Dataset` (one `[*shape]` row per token).

    Why: training a probe or a sparse autoencoder wants shuffled batches of rows from more data
    than memory holds; the store maps the shards and gathers rows from wherever they are.

    `len(store)` is the number of rows (tokens). `store[i]` is one row `[*shape]`; a slice, a list
    or 1-D tensor of row indices, or a boolean mask (e.g. `store.positions > 0`) give `[k, *shape]`
    in the order asked. Rows come back as copies in memory; the store itself stays on disk.

    Args:
        out_dir: The directory `cache_activations` wrote.
        site: Which site to read (a name or alias); None when the cache holds one site.

    Attributes:
        path: The cache directory.
        site: The site read (its canonical name).
        sites: Every site the cache holds.
        shape: The shape of one row (`(d_model,)` for `resid_post`, `(n_heads, d_head)` for `attn.z`).
        dtype: The stored dtype.
        info: The index (a dict): model spec and identity, sites, settings, shards (see
            `splice.activations`).
        complete: Whether the whole corpus was cached (False: a run stopped; the finished shards
            are readable).

    Raises:
        SpliceError: For a missing or malformed index, a site the cache does not hold (or None
            when it holds several), or a shard file that is missing or of another size than the
            index says.

    Example:
        ```python
        store = splice.ActivationStore("acts")  # written by splice.cache_activations
        store[0].shape  # torch.Size([576]): one row, d_model values
        for batch in store.batches(4096, shuffle=True, seed=0):  # [4096, 576] each
            ...
        loader = torch.utils.data.DataLoader(store, batch_size=4096, shuffle=True)  # or as a Dataset
        ```
    """

    def __init__(self, out_dir: str | os.PathLike[str], site: Any = None):
        if not isinstance(out_dir, (str, os.PathLike)):
            raise SpliceError(f"out_dir must be a directory path; got {type(out_dir).__name__}")
        self.path = Path(out_dir)
        self.info = index.read(self.path)
        self.sites = list(self.info["sites"])
        self.site = self._choose(site)
        self.shape = tuple(self.info["sites"][self.site]["shape"])
        self.dtype = index.DTYPES[self.info["dtype"]]
        self.complete = bool(self.info["complete"])
        self._shards = self.info["shards"]
        for shard in self._shards:
            index.check_shard_size(
                self.path / shard["file"],
                shard,
                "expected the shard cache_activations wrote (the cache was altered or copied in part)",
            )
        self._starts = torch.tensor(
            [0, *itertools.accumulate(s["rows"] for s in self._shards)], dtype=torch.int64
        )
        self._maps: dict[int, dict[str, torch.Tensor]] = {}
        self._fields: dict[str, torch.Tensor] = {}

    def _choose(self, site: Any) -> str:
        if site is None:
            if len(self.sites) != 1:
                raise SpliceError(
                    f"{self.path} holds {len(self.sites)} sites ({', '.join(self.sites)}): pass site=... to choose one"
                )
            return self.sites[0]
        name = canonical_name(site)
        if name not in self.sites:
            raise SpliceError(f"{self.path} holds no site {site!r}; it holds {', '.join(self.sites)}")
        return name

    # -- the mapped shards ------------------------------------------------------------------------
    def _shard(self, number: int) -> dict[str, torch.Tensor]:
        """Shard `number`'s tensors (this site's and the row arrays), mapped from the file."""
        if number not in self._maps:
            self._maps[number] = self._map(number)
        return self._maps[number]

    def _map(self, number: int) -> dict[str, torch.Tensor]:
        shard = self._shards[number]
        file = self.path / shard["file"]
        want = {self.site: (self.dtype, (shard["rows"], *self.shape))}
        want |= {field: (torch.int64, (shard["rows"],)) for field in index.ROW_FIELDS}
        header, data_start = _header(file, shard["bytes"])
        whole = torch.from_file(str(file), shared=False, size=shard["bytes"], dtype=torch.uint8)
        out = {}
        for name, (dtype, shape) in want.items():
            entry = header.get(name)
            offsets = entry.get("data_offsets") if isinstance(entry, dict) else None
            if (
                not isinstance(entry, dict)
                or index.SAFETENSORS_DTYPES.get(str(entry.get("dtype"))) != dtype
                or not (
                    isinstance(offsets, list)
                    and len(offsets) == 2
                    and all(isinstance(o, int) for o in offsets)
                )
            ):
                raise SpliceError(
                    f"{file}: no readable {dtype} tensor {name!r} in it; expected one of shape {list(shape)}"
                )
            begin, end = data_start + offsets[0], data_start + offsets[1]
            if (
                end > shard["bytes"]
                or list(entry.get("shape", [])) != list(shape)
                or end - begin != math.prod(shape) * dtype.itemsize
            ):
                raise SpliceError(
                    f"{file}: tensor {name!r} has shape {entry.get('shape')} and {end - begin} bytes; the index "
                    f"says {list(shape)}"
                )
            if begin % dtype.itemsize:  # safetensors aligns tensors; read a misaligned one by copy
                from safetensors import safe_open

                with safe_open(str(file), framework="pt") as handle:
                    out[name] = handle.get_tensor(name)
            else:
                out[name] = whole[begin:end].view(dtype).view(shape)
        return out

    def _field(self, name: str) -> torch.Tensor:
        if name not in self._fields:
            parts = [self._shard(k)[name] for k in range(len(self._shards))]
            self._fields[name] = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.int64)
        return self._fields[name]

    # -- the row arrays -----------------------------------------------------------------------------
    @property
    def tokens(self) -> torch.Tensor:
        """The token id of every row (int64 `[len(store)]`, in memory: 8 bytes a row)."""
        return self._field("tokens")

    @property
    def documents(self) -> torch.Tensor:
        """The document (its index in the corpus) of every row (int64 `[len(store)]`); rows are in
        document order, then position order."""
        return self._field("documents")

    @property
    def positions(self) -> torch.Tensor:
        """The position of every row's token in its document (int64 `[len(store)]`; 0 is the first
        token, the BOS when there is one)."""
        return self._field("positions")

    @property
    def n_documents(self) -> int:
        """How many documents of the corpus the stored rows cover (documents without tokens included)."""
        return int(self.info["documents"])

    # -- rows -------------------------------------------------------------------------------------------
    def __len__(self) -> int:
        """The number of rows (tokens)."""
        return int(self._starts[-1])

    def __getitem__(self, key: Any) -> torch.Tensor:
        """Rows, copied into memory: `store[i]` is one row `[*shape]` (negative i counts from the
        end); `store[a:b]`, a list, a 1-D integer tensor or a boolean mask of `len(store)` give
        `[k, *shape]`, in the order asked.

        Raises:
            IndexError: For a row outside `0..len-1` (or `-len..-1`).
            SpliceError: For a key of another kind.
        """
        n = len(self)
        if isinstance(key, torch.Tensor) and key.dim() == 0 and key.dtype != torch.bool:
            key = key.item()
        if isinstance(key, numbers.Integral) and not isinstance(key, bool):  # int, numpy ints
            i = int(key)
            if not -n <= i < n:
                raise IndexError(f"row {i} is out of range: this store has {n} rows ({_range(n)})")
            return self._gather(torch.tensor([i % n]))[0]
        if isinstance(key, slice):
            return self._rows(*key.indices(n))
        rows = self._as_rows(key)
        return self._gather(rows)

    def __getitems__(self, indices: Sequence[int]) -> list[torch.Tensor]:
        """Several rows in one gather (what a `DataLoader` calls for a batch); its default collate
        stacks them back."""
        return list(self[list(indices)].unbind(0))

    def _as_rows(self, key: Any) -> torch.Tensor:
        n = len(self)
        try:
            rows = torch.as_tensor(key)
        except (TypeError, ValueError, RuntimeError):
            raise SpliceError(
                f"a store is indexed by an int, a slice, a list or 1-D tensor of ints, or a boolean mask; got {type(key).__name__}"
            ) from None
        if rows.dim() == 1 and rows.numel() == 0:  # [] is float to torch
            return rows.to(torch.int64)
        if rows.dtype == torch.bool:
            if rows.shape != (n,):
                raise SpliceError(
                    f"a boolean mask must have one entry per row ({n}); got shape {list(rows.shape)}"
                )
            return rows.nonzero().squeeze(1)
        if rows.dim() != 1 or rows.is_floating_point() or rows.is_complex():
            raise SpliceError(
                f"rows must be a 1-D integer tensor or list; got {rows.dtype} of shape {list(rows.shape)}"
            )
        rows = rows.to(torch.int64)
        if len(rows) and not bool(((rows >= -n) & (rows < n)).all()):
            bad = int(rows[(rows < -n) | (rows >= n)][0])
            raise IndexError(f"row {bad} is out of range: this store has {n} rows ({_range(n)})")
        return rows % n if n else rows

    def _rows(self, start: int, stop: int, step: int) -> torch.Tensor:
        if step != 1:
            return self._gather(torch.arange(start, stop, step, dtype=torch.int64))
        stop = max(start, stop)
        parts = []
        for k in range(len(self._shards)):
            lo, hi = int(self._starts[k]), int(self._starts[k + 1])
            if hi > start and lo < stop:
                parts.append(self._shard(k)[self.site][max(start, lo) - lo : min(stop, hi) - lo])
        if not parts:
            return torch.empty((0, *self.shape), dtype=self.dtype)
        return torch.cat(parts) if len(parts) > 1 else parts[0].clone()

    def _gather(self, rows: torch.Tensor) -> torch.Tensor:
        """Rows at global indices (in 0..len-1), read shard by shard, returned in the order given."""
        out = torch.empty((len(rows), *self.shape), dtype=self.dtype)
        if not len(rows):
            return out
        shard_of = torch.searchsorted(self._starts, rows, right=True) - 1
        for k in shard_of.unique().tolist():
            where = (shard_of == k).nonzero().squeeze(1)
            out[where] = self._shard(k)[self.site][rows[where] - self._starts[k]]
        return out

    def batches(
        self,
        batch_size: int,
        shuffle: bool = False,
        seed: int | None = None,
        drop_last: bool = False,
        with_rows: bool = False,
    ) -> Iterator[Any]:
        """Every row once, in batches `[batch_size, *shape]` (the last one shorter unless dropped).

        Args:
            batch_size: Rows per batch.
            shuffle: Visit the rows in a random order (one permutation of all rows); False reads
                them in order, shard by shard.
            seed: Seed of the permutation, for the same order every time; None draws one from
                torch's global generator (a new order per call, like a new epoch).
            drop_last: Leave out a last batch shorter than `batch_size`.
            with_rows: Yield `(batch, rows)`, `rows` being the row indices (int64 `[batch]`), to
                look up `tokens[rows]`, `documents[rows]`, `positions[rows]` (labels for a probe).

        Example:
            ```python
            for batch, rows in store.batches(1024, shuffle=True, seed=0, with_rows=True):
                labels = store.tokens[rows]
            ```
        """
        if not isinstance(batch_size, int) or isinstance(batch_size, bool) or batch_size < 1:
            raise SpliceError(f"batch_size must be a positive integer; got {batch_size!r}")
        n = len(self)
        if shuffle:
            generator = None if seed is None else torch.Generator().manual_seed(seed)
            order: torch.Tensor | None = torch.randperm(n, generator=generator)
        else:
            order = None
        end = n - n % batch_size if drop_last else n
        for start in range(0, end, batch_size):
            stop = min(start + batch_size, n)
            if order is None:
                rows = torch.arange(start, stop, dtype=torch.int64)
                batch = self._rows(start, stop, 1)
            else:
                rows = order[start:stop]
                batch = self._gather(rows)
            yield (batch, rows) if with_rows else batch

    # -- checks and display --------------------------------------------------------------------------
    def verify(self) -> None:
        """Check every shard file against the sha256 the index holds (reads the whole cache).

        Raises:
            SpliceError: Naming the first shard whose bytes changed.
        """
        for shard in self._shards:
            file = self.path / shard["file"]
            hasher = hashlib.sha256()
            with open(file, "rb") as handle:
                for block in iter(lambda: handle.read(1 << 22), b""):
                    hasher.update(block)
            if hasher.hexdigest() != shard["sha256"]:
                raise SpliceError(
                    f"{file}: its sha256 is not the one the index holds: the shard changed after it was written"
                )

    def __repr__(self) -> str:
        state = "" if self.complete else ", incomplete"
        return (
            f"ActivationStore({str(self.path)!r}, site={self.site!r}: {len(self)} rows x {list(self.shape)} "
            f"{index.dtype_name(self.dtype)}, {self.n_documents} documents in {len(self._shards)} shards{state})"
        )

    # -- pickling (DataLoader workers): mappings are reopened, not copied -----------------------------
    def __getstate__(self) -> dict[str, Any]:
        state = dict(self.__dict__)
        state["_maps"], state["_fields"] = {}, {}
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)


def _range(n: int) -> str:
    return f"0..{n - 1} or -{n}..-1" if n else "none"


def _header(file: Path, size: int) -> tuple[dict[str, Any], int]:
    """A safetensors file's header (name -> dtype, shape, data_offsets) and where its data starts:
    the file opens with the header's length (8 bytes, little-endian), then the header as JSON."""
    try:
        with open(file, "rb") as handle:
            head = handle.read(8)
            length = struct.unpack("<Q", head)[0] if len(head) == 8 else -1
            if not 0 < length <= size - 8:
                raise ValueError("bad header length")
            header = json.loads(handle.read(length))
    except (OSError, ValueError, UnicodeDecodeError) as error:
        raise SpliceError(
            f"{file}: not a readable safetensors file ({error}); expected a shard cache_activations wrote"
        ) from None
    if not isinstance(header, dict):
        raise SpliceError(f"{file}: not a safetensors header; expected a shard cache_activations wrote")
    return header, 8 + length
