"""Durable sweep progress: one JSON line per finished (variant, prompt batch), fsynced, after a
header line holding the sweep's spec hash. A killed sweep resumes from what reached the disk; a
file from a different sweep is refused rather than mixed in."""

from __future__ import annotations

import json
import os
from pathlib import Path

from .errors import SpliceError


class Checkpoint:
    def __init__(self, path, spec_hash: str):
        """path=None keeps results in memory only."""
        self.path = Path(path) if path is not None else None
        self.spec_hash = spec_hash
        self.done: dict[tuple[int, int], dict] = {}
        if self.path is None:
            return
        if self.path.exists() and self.path.stat().st_size:
            self._load()
        else:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._append({"splice_sweep": 1, "spec_hash": spec_hash})

    def _load(self) -> None:
        lines = self.path.read_text().splitlines()
        header = json.loads(lines[0])
        if header.get("spec_hash") != self.spec_hash:
            raise SpliceError(
                f"checkpoint {self.path} belongs to a different sweep (spec hash {header.get('spec_hash', '?')[:12]}, "
                f"this sweep {self.spec_hash[:12]}): results would be mixed. Use another path or delete the file."
            )
        for number, line in enumerate(lines[1:], start=2):
            try:
                record = json.loads(line)
            except json.JSONDecodeError:
                if number == len(lines):  # a write cut short by a kill: drop it, it is recomputed
                    break
                raise SpliceError(f"checkpoint {self.path} line {number} is corrupt") from None
            self.done[(record["variant"], record["batch"])] = record
        # Rewrite without a torn tail so appends start on a clean line.
        self.path.write_text("\n".join([lines[0]] + [json.dumps(r) for r in self.done.values()]) + "\n")

    def _append(self, record: dict) -> None:
        with open(self.path, "a") as handle:
            handle.write(json.dumps(record) + "\n")
            handle.flush()
            os.fsync(handle.fileno())

    def has(self, variant: int, batch: int) -> bool:
        return (variant, batch) in self.done

    def add(self, records: list[dict]) -> None:
        """Append finished records in one durable write."""
        if not records:
            return
        if self.path is None:
            for record in records:
                self.done[(record["variant"], record["batch"])] = record
            return
        with open(self.path, "a") as handle:
            handle.write("".join(json.dumps(r) + "\n" for r in records))
            handle.flush()
            os.fsync(handle.fileno())
        for record in records:
            self.done[(record["variant"], record["batch"])] = record
