"""Durable sweep progress: a header line holding the sweep's spec hash, then one JSON line per
finished (variant, prompt batch), fsynced.

The file is created with its header and first results together, by an atomic rename, so a sweep
that fails before its first result leaves nothing behind; a header with no results (left by an
older splice) is no sweep's progress and is taken over. After that, results are only appended. A
killed sweep resumes from what reached the disk (an unfinished last line is dropped, and cut off
only when something is appended); a file from a different sweep is refused rather than mixed in;
a finished checkpoint is only read, so a read-only one works."""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

from ..engine import files
from ..errors import SpliceError

HEADER = '{"splice_sweep": 1, "spec_hash": "..."} (the header line of a splice sweep checkpoint)'
"""How messages describe a checkpoint's header line."""
RECORD = '{"variant": int, "batch": int, "values": {metric: [numbers]}} (one finished result per line)'
"""How messages describe a checkpoint's result lines."""


class Checkpoint:
    """A sweep's finished (variant, prompt batch) results, kept durably in a JSON-lines file.

    Opening one reads what an earlier run of the same sweep finished (see the module docstring);
    `has` tells the sweep what to skip and `add` records new results.

    Args:
        path: The checkpoint file (created with the first results, its folder too), or None to
            keep results in memory only.
        spec_hash: The sweep's identity (data, variants, metrics); a file holding another
            sweep's results is refused.

    Attributes:
        done: `{(variant, batch): record}` of every finished result.

    Raises:
        SpliceError: For an unreadable or damaged file (naming the line), or one belonging to a
            different sweep.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "sweep.jsonl"
        >>> Checkpoint(path, "abc123").add([{"variant": 0, "batch": 1, "values": {"logit_diff": [0.5]}}])
        >>> print(path.read_text(), end="")
        {"splice_sweep": 1, "spec_hash": "abc123"}
        {"variant": 0, "batch": 1, "values": {"logit_diff": [0.5]}}
        >>> Checkpoint(path, "abc123").has(0, 1)  # resumed
        True
        >>> Checkpoint(path, "def456")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: checkpoint ...sweep.jsonl belongs to a different sweep (spec hash abc123, this sweep def456): ...
    """

    def __init__(self, path: str | os.PathLike[str] | None, spec_hash: str):
        """path=None keeps results in memory only."""
        self.path = Path(path) if path is not None else None
        self.spec_hash = spec_hash
        self.done: dict[tuple[int, int], dict[str, Any]] = {}
        self._own = False  # the file holds this sweep's header and results (appends go there)
        self._cut: int | None = None  # where an unfinished last line starts, cut off before appending
        if self.path is not None:
            self._load(self._read())

    def _read(self) -> bytes:
        assert self.path is not None  # only called with a file
        try:
            return self.path.read_bytes()
        except FileNotFoundError:
            return b""
        except OSError as error:
            raise SpliceError(f"cannot read checkpoint {self.path}: {error.strerror or error}") from None

    def _load(self, data: bytes) -> None:
        """Take in the finished results of this sweep; see the module docstring for the rest."""
        *lines, tail = data.split(b"\n")
        if not lines:
            if tail:
                raise self._damaged(1, "the first line is cut short (no newline)", HEADER)
            return
        header = self._header(lines[0])
        numbered = [(n, line) for n, line in enumerate(lines[1:], start=2) if line.strip()]
        if not numbered:
            return
        if header["spec_hash"] != self.spec_hash:
            raise SpliceError(
                f"checkpoint {self.path} belongs to a different sweep (spec hash {header['spec_hash'][:12]}, "
                f"this sweep {self.spec_hash[:12]}): results would be mixed. Use another path or delete the file."
            )
        for n, line in numbered:
            record = self._record(n, line)
            self.done[(record["variant"], record["batch"])] = record
        self._own = True
        self._cut = len(data) - len(tail) if tail else None

    def _header(self, line: bytes) -> dict:
        header = files.parse_json(line, f"checkpoint {self.path}", HEADER, line=1)
        if (
            not isinstance(header, dict)
            or header.get("splice_sweep") != 1
            or not isinstance(header.get("spec_hash"), str)
        ):
            raise self._damaged(1, f"got {line[:60].decode(errors='replace')!r}", HEADER)
        return header

    def _record(self, n: int, line: bytes) -> dict:
        record = files.parse_json(line, f"checkpoint {self.path}", RECORD, line=n)
        if not isinstance(record, dict):
            raise self._damaged(n, f"got a JSON {type(record).__name__}", RECORD)
        missing = [k for k in ("variant", "batch", "values") if k not in record]
        if missing:
            raise self._damaged(n, f"missing {', '.join(missing)}", RECORD)
        values = record["values"]
        if not (
            files.is_int(record["variant"])
            and files.is_int(record["batch"])
            and isinstance(values, dict)
            and all(isinstance(v, list) for v in values.values())
        ):
            raise self._damaged(n, "a field of the wrong type", RECORD)
        return record

    def _damaged(self, n: int, problem: str, expected: str) -> SpliceError:
        return SpliceError(
            f"checkpoint {self.path} line {n}: {problem}; expected {expected}. "
            "If it is not a splice checkpoint use another path; if it is a damaged one, delete it"
        )

    def has(self, variant: int, batch: int) -> bool:
        """Whether (variant, prompt batch) is finished (variant -1 is the baseline)."""
        return (variant, batch) in self.done

    def add(self, records: list[dict[str, Any]]) -> None:
        """Record finished results, on disk in one durable write (appended and fsynced; the first
        write creates the file with its header atomically).

        Args:
            records: `{"variant": int, "batch": int, "values": {metric: [numbers]}}` each.

        Raises:
            SpliceError: If the file cannot be written.
        """
        if not records:
            return
        if self.path is not None:
            self._write("".join(json.dumps(r) + "\n" for r in records).encode())
        for record in records:
            self.done[(record["variant"], record["batch"])] = record

    def _write(self, lines: bytes) -> None:
        assert self.path is not None  # only called with a file
        if not self._own:  # the first results: the file appears with its header, whole
            header = json.dumps({"splice_sweep": 1, "spec_hash": self.spec_hash}) + "\n"
            try:
                self.path.parent.mkdir(parents=True, exist_ok=True)
            except OSError as error:
                raise SpliceError(
                    f"cannot create the folder of checkpoint {self.path}: {error.strerror or error}"
                ) from None
            files.write_atomic(self.path, header.encode() + lines)
            self._own = True
            return
        try:
            with open(self.path, "ab") as handle:
                if self._cut is not None:
                    handle.truncate(self._cut)
                handle.write(lines)
                handle.flush()
                os.fsync(handle.fileno())
        except OSError as error:
            raise SpliceError(f"cannot append to checkpoint {self.path}: {error.strerror or error}") from None
        self._cut = None
