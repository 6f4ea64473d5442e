"""Recording: detached copies of activations by site, one per forward or accumulated."""

from __future__ import annotations

from collections.abc import Mapping

import torch

from ..errors import SpliceError

MODES = ("overwrite", "accumulate")


class Recording(Mapping):
    """Site -> tensor ("overwrite": the last forward's value) or list of tensors
    ("accumulate": one per forward; `stack`/`cat` join them). Values are clones, detached:
    nothing the model or the user does later can change them. Keys accept the same aliases as
    edits (`blocks.3.hook_resid_post`, `("z", 3)`)."""

    def __init__(self, resolve, sites: list[str], mode: str = "overwrite"):
        if mode not in MODES:
            raise SpliceError(f"record mode must be one of {MODES}; got {mode!r}")
        self.mode = mode
        self.sites = list(sites)
        self._resolve = resolve
        self._data: dict[str, object] = {}

    def complete(self) -> bool:
        """Every site has a value (in a fresh recording: this forward reached them all)."""
        return len(self._data) == len(self.sites)

    def store(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a detached copy of `tensor` as site `name` (called by the hook engine)."""
        value = tensor.detach().clone()
        if self.mode == "overwrite":
            self._data[name] = value
        else:
            self._data.setdefault(name, []).append(value)

    def _name(self, key) -> str:
        sites = self._resolve(key)
        if len(sites) != 1:
            raise SpliceError(f"{key!r} names {len(sites)} sites; index a recording by one site")
        name = sites[0].name
        if name not in self._data:
            if name in self.sites:
                raise SpliceError(f"{name} was recorded but never ran: no forward pass reached it")
            raise SpliceError(
                f"{name} was not recorded; recorded sites: {', '.join(self.sites[:8])}{' ...' if len(self.sites) > 8 else ''}"
            )
        return name

    def __getitem__(self, key):
        return self._data[self._name(key)]

    def __iter__(self):
        return iter(self._data)

    def __len__(self):
        return len(self._data)

    def __contains__(self, key):
        try:
            self._name(key)
        except SpliceError:
            return False
        return True

    def _entries(self, key) -> list[torch.Tensor]:
        value = self[key]
        return value if isinstance(value, list) else [value]

    def stack(self, key, dim: int = 0) -> torch.Tensor:
        """Accumulated entries stacked on a new axis (they must have one shape)."""
        entries = self._entries(key)
        shapes = {tuple(e.shape) for e in entries}
        if len(shapes) > 1:
            raise SpliceError(
                f"cannot stack {key!r}: forwards had shapes {sorted(shapes)}; use cat(key, dim=...)"
            )
        return torch.stack(entries, dim=dim)

    def cat(self, key, dim: int = 0) -> torch.Tensor:
        """Accumulated entries joined along an existing axis (0: batch; 1: positions, e.g. for
        the steps of a cached `generate`)."""
        entries = self._entries(key)
        try:
            return torch.cat(entries, dim=dim)
        except RuntimeError:
            shapes = [list(e.shape) for e in entries]
            differ = sorted(
                {axis for e in entries for axis in range(e.dim()) if e.shape[axis] != entries[0].shape[axis]}
            )
            hint = (
                f"; they differ on axis {differ}: cat joins along dim {dim} only, every other axis must match"
            )
            if dim == 0 and differ == [1]:
                hint += " (forwards of different lengths: cat(key, dim=1) joins a cached generate's steps; prompts of different lengths need one padded batch)"
            raise SpliceError(
                f"cannot cat {key!r} along dim {dim}: forwards had shapes {shapes}{hint}"
            ) from None

    def __repr__(self):
        shapes = {
            k: (list(v.shape) if isinstance(v, torch.Tensor) else f"{len(v)} entries")
            for k, v in self._data.items()
        }
        return f"Recording(mode={self.mode!r}, {shapes})"
