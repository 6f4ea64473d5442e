"""Recording: detached copies of activations by site, one per forward or accumulated."""

from __future__ import annotations

import html
from collections.abc import Callable, Iterator, Mapping, Sequence
from typing import Any, Literal, overload

import torch

from ..errors import SpliceError
from .sites import Site, canonical_name, is_pattern

MODES = ("overwrite", "accumulate")
_REPR_ROWS = 30  # sites a text repr lists before summarising the rest


class Recording(Mapping):
    """Site -> tensor ("overwrite": the last forward's value) or list of tensors ("accumulate":
    one per forward; `stack`/`cat` join them).

    Values are clones, detached: nothing the model or the user does later can change them. They
    keep the dtype the model computed them in (a bfloat16 model records bfloat16, never upcast).
    Keys accept the same aliases as edits (`blocks.3.hook_resid_post`, `("z", 3)`).

    Example:
        >>> import splice, torch, transformers
        >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
        >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
        >>> logits, cache = m.run(torch.tensor([[1, 2, 3]]), record="blocks.*.resid_post")
        >>> cache["blocks.1.hook_resid_post"].shape  # [batch, pos, d_model]
        torch.Size([1, 3, 16])
        >>> cache
        Recording(overwrite, 2 of 2 sites recorded)
          blocks.0.resid_post  [1, 3, 16]  float32
          blocks.1.resid_post  [1, 3, 16]  float32
    """

    def __init__(self, resolve: Callable[[Any], list[Site]], sites: list[str], mode: str = "overwrite"):
        """Used by `Model.record` / `Model.run`: `resolve` maps a key to the model's sites, `sites`
        are the canonical names to record, `mode` is "overwrite" or "accumulate"."""
        if mode not in MODES:
            raise SpliceError(f"record mode must be one of {MODES}; got {mode!r}")
        self.mode = mode
        self.sites = list(sites)
        self._resolve = resolve
        self._data: dict[str, Any] = {}

    def complete(self) -> bool:
        """Every site has a value (in a fresh recording: this forward reached them all)."""
        return len(self._data) == len(self.sites)

    def store(self, name: str, tensor: torch.Tensor) -> None:
        """Keep a detached copy of `tensor`, in its own dtype, as site `name` (called by the hook engine)."""
        value = tensor.detach().clone()
        if self.mode == "overwrite":
            self._data[name] = value
        else:
            self._data.setdefault(name, []).append(value)

    def _name(self, key: Any) -> str:
        sites = self._resolve(key)
        if len(sites) != 1:
            raise SpliceError(
                f"{key!r} names {len(sites)} sites; index a recording by one site "
                "(stack(key) joins several sites of one shape on a new first axis)"
            )
        name = sites[0].name
        if name not in self._data:
            if name in self.sites:
                raise SpliceError(f"{name} was recorded but never ran: no forward pass reached it")
            raise SpliceError(f"{name} was not recorded; recorded sites: {self._listing()}")
        return name

    def _listing(self, limit: int = 8) -> str:
        more = f" ... ({len(self.sites)} in all)" if len(self.sites) > limit else ""
        return (", ".join(self.sites[:limit]) or "none") + more

    def __getitem__(self, key: Any) -> Any:
        return self._data[self._name(key)]

    def __iter__(self) -> Iterator[str]:
        return iter(self._data)

    def __len__(self) -> int:
        return len(self._data)

    def __contains__(self, key: object) -> bool:
        try:
            self._name(key)
        except SpliceError:
            return False
        return True

    def _entries(self, key: Any) -> list[torch.Tensor]:
        value = self[key]
        return value if isinstance(value, list) else [value]

    # -- joining ---------------------------------------------------------------------------------
    def _matching(self, key: Any) -> list[str] | None:
        """Recorded sites named by a glob or a list of keys, in layer order (each glob's matches
        sorted by layer, then in forward order within a layer); None for a single-site key."""
        if isinstance(key, list):
            keys = key
        elif isinstance(key, str) and is_pattern(canonical_name(key)):
            keys = [key]
        else:
            return None
        if not keys:
            raise SpliceError("stack([]) names no site; pass a site, a glob or a non-empty list of them")
        names: list[str] = []
        for one in keys:
            sites = [site for site in self._resolve(one) if site.name in self.sites]
            if not sites:
                raise SpliceError(
                    f"{one!r} matches no recorded site; this recording holds {self._listing()}. "
                    f"Record it first, e.g. m.run(..., record={one!r})"
                )
            for site in sorted(sites, key=_layer_rank):  # stable: forward order within a layer
                if site.name not in names:
                    names.append(site.name)
        return names

    @overload
    def stack(self, key: Any, dim: int = 0, *, return_labels: Literal[False] = False) -> torch.Tensor: ...

    @overload
    def stack(
        self, key: Any, dim: int = 0, *, return_labels: Literal[True]
    ) -> tuple[torch.Tensor, list[str]]: ...

    def stack(
        self, key: Any, dim: int = 0, *, return_labels: bool = False
    ) -> torch.Tensor | tuple[torch.Tensor, list[str]]:
        """Join recorded tensors on a new axis.

        Why: a layer sweep (logit lens, probes) wants one `[layer, batch, pos, d_model]` tensor, as
        TransformerLens' `cache.stack_activation` gives; accumulated forwards want one tensor too.

        Args:
            key: One site (name, alias or `("z", 3)` tuple): its entries (one per forward in
                accumulate mode; the one value in overwrite mode) on a new axis `dim`. A glob
                (`"blocks.*.resid_post"`) or a list of keys: every recorded site it names, ordered
                by layer (layer 10 after 9; a list keeps the order given), on a new axis `dim`;
                in accumulate mode each site's entries are stacked on axis `dim` first and the
                sites go on a new first axis (`[site, entry, ...]` for dim=0).
            dim: Where the new axis goes (see `key`); default 0, first.
            return_labels: Also return the canonical names of the stacked sites, in order.

        Returns:
            The stacked tensor, or `(tensor, labels)` with return_labels=True.

        Raises:
            SpliceError: the glob matches no recorded site (naming what was recorded), or the
                tensors differ in shape (naming each site's shape).

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> _, cache = m.run(torch.tensor([[1, 2, 3]]), record="blocks.*.resid_post")
            >>> resid, labels = cache.stack("blocks.*.resid_post", return_labels=True)
            >>> resid.shape, labels  # [layer, batch, pos, d_model]
            (torch.Size([2, 1, 3, 16]), ['blocks.0.resid_post', 'blocks.1.resid_post'])
        """
        names = self._matching(key)
        if names is None:
            out = self._stack_entries(key, dim)
            labels = [self._name(key)]
        else:
            labels = names
            if self.mode == "accumulate":
                parts = [self._stack_entries(name, dim) for name in names]
            else:
                parts = [self[name] for name in names]
            shapes = {name: list(part.shape) for name, part in zip(names, parts)}
            if len({tuple(s) for s in shapes.values()}) > 1:
                listed = ", ".join(f"{n} {s}" for n, s in shapes.items())
                raise SpliceError(
                    f"cannot stack {key!r}: the sites it names have different shapes ({listed}); "
                    "stack sites of one shape, e.g. 'blocks.*.resid_post'"
                )
            out = torch.stack(parts, dim=0 if self.mode == "accumulate" else dim)
        return (out, labels) if return_labels else out

    def _stack_entries(self, key: Any, dim: int) -> torch.Tensor:
        entries = self._entries(key)
        shapes = {tuple(e.shape) for e in entries}
        if len(shapes) > 1:
            raise SpliceError(
                f"cannot stack {key!r}: forwards had shapes {sorted(shapes)}; use cat(key, dim=...)"
            )
        return torch.stack(entries, dim=dim)

    def cat(self, key: Any, dim: int = 0) -> torch.Tensor:
        """Accumulated entries of one site joined along an existing axis.

        Args:
            key: One site (name, alias or tuple).
            dim: 0 joins the forwards' batches; 1 their positions (the steps of a cached
                `generate`). Every other axis must match.

        Example:
            >>> import splice, torch, transformers
            >>> config = transformers.GPT2Config(n_layer=2, n_embd=16, n_head=2, vocab_size=32, bos_token_id=0, eos_token_id=0)
            >>> m = splice.Model(transformers.GPT2LMHeadModel(config).eval())  # tiny, random weights
            >>> with m.record("blocks.1.resid_post", mode="accumulate") as rec:
            ...     for n in (1, 2):
            ...         _ = m(torch.ones(n, 3, dtype=torch.long))
            >>> rec.cat("blocks.1.resid_post").shape  # [1 + 2 rows, pos, d_model]
            torch.Size([3, 3, 16])
        """
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

    # -- display ---------------------------------------------------------------------------------
    def _rows(self) -> list[tuple[str, str, str]]:
        """(site, shape, dtype) per requested site, in recording order; unreached sites say so."""
        rows = []
        for name in self.sites:
            value = self._data.get(name)
            if value is None:
                rows.append((name, "not reached", ""))
            elif isinstance(value, list):
                shapes = sorted({tuple(v.shape) for v in value})
                shown = " | ".join(str(list(s)) for s in shapes)
                count = f"{len(value)} entr{'y' if len(value) == 1 else 'ies'}"
                rows.append((name, f"{count} x {shown}", _dtypes(value)))
            else:
                rows.append((name, str(list(value.shape)), _dtypes([value])))
        return rows

    def _summary(self) -> str:
        return f"{self.mode}, {len(self._data)} of {len(self.sites)} sites recorded"

    def __repr__(self) -> str:
        rows = self._rows()
        width = max((len(r[0]) for r in rows[:_REPR_ROWS]), default=0)
        lines = [f"  {s:<{width}}  {shape}  {dtype}".rstrip() for s, shape, dtype in rows[:_REPR_ROWS]]
        if len(rows) > _REPR_ROWS:
            lines.append(f"  ... and {len(rows) - _REPR_ROWS} more sites (list(recording.sites) names them)")
        return f"Recording({self._summary()})" + ("\n" + "\n".join(lines) if lines else "")

    def _repr_html_(self) -> str:
        """A table of sites, shapes and dtypes for Jupyter."""
        cells = "".join(
            f"<tr><td><code>{html.escape(s)}</code></td><td>{html.escape(shape)}</td><td>{html.escape(d)}</td></tr>"
            for s, shape, d in self._rows()
        )
        return (
            f"<div><b>Recording</b> ({html.escape(self._summary())})"
            '<div style="max-height:24em;overflow:auto"><table>'
            f"<thead><tr><th>site</th><th>shape</th><th>dtype</th></tr></thead><tbody>{cells}</tbody>"
            "</table></div></div>"
        )


def _dtypes(values: Sequence[torch.Tensor]) -> str:
    return ", ".join(sorted({str(v.dtype).removeprefix("torch.") for v in values}))


def _layer_rank(site: Site) -> int:
    """embed first, then layers in numeric order, then final_norm and logits."""
    if site.layer is not None:
        return site.layer + 1
    return 0 if site.point == "embed" else 1 << 30
