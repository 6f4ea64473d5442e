"""`Edits`: the live registry of interventions by site (the "dictionary injection board").

It is a plain mutable mapping. Models that are inside `model.edit(edits)` listen to it, so a
change takes effect on the next forward with no re-registration, and a key that does not name a
site of a listening model is refused on assignment (the registry is left as it was).
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Iterator, Mapping, MutableMapping, Sequence
from pathlib import Path
from typing import Any

from ..errors import SpliceError
from . import files
from .interventions import Intervention
from .sites import SiteKey, canonical_name

EDITS_FILE = "an edits file: a mapping of site -> intervention record(s), as Edits.save writes"


def _as_list(key, value) -> tuple[Intervention, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, Intervention):
            raise SpliceError(
                f"edits[{key!r}] must be an Intervention or a list of them (e.g. Zero(), Scale(0.5)); got {item!r}"
            )
    return tuple(items)


class Edits(MutableMapping[SiteKey, Intervention | list[Intervention]]):
    """The live registry of edits: site -> intervention, or an ordered list of them.

    A plain mutable mapping (the "dictionary injection board"). A model inside
    `model.edit(edits)` listens to it, so an assignment or deletion takes effect on the next
    forward with no re-registration, and a key that does not name a site of a listening model
    is refused at the assignment (the registry is left as it was). A forward already running
    keeps the plan it began with.

    Keys may be canonical names (`"blocks.3.attn.z"`), TransformerLens names
    (`"blocks.3.hook_resid_post"`), `(name, layer)` tuples (`("z", 3)`) or globs
    (`"blocks.*.mlp.out"`, expanded per model); they are stored canonical. The interventions of
    one key are applied in order; keys are applied in insertion order.

    Args:
        mapping: Initial entries: `{site key: intervention or list of interventions}`, or
            another `Edits`; default empty.
        **kwargs: More entries, for keys that are Python identifiers (`embed=Zero()`).

    Raises:
        SpliceError: For a value that is not an intervention or a list of them, or a key that
            is neither a string nor a `(name, int)` tuple.

    Example:
        >>> from splice import Edits, Scale, Zero
        >>> edits = Edits({"blocks.3.attn.z": Zero(heads=5), ("resid_post", 2): Scale(0.5)})
        >>> edits
        Edits({'blocks.3.attn.z': Zero(heads=5), 'blocks.2.resid_post': Scale(factor=0.5)})
        >>> edits["blocks.*.mlp.out"] = [Zero(pos=0), Scale(2.0)]
        >>> del edits[("z", 3)]
        >>> list(edits)
        ['blocks.2.resid_post', 'blocks.*.mlp.out']
        >>> Edits.from_dict(edits.to_dict()) == edits
        True
        >>> edits["embed"] = 3
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: edits['embed'] must be an Intervention or a list of them (e.g. Zero(), Scale(0.5)); got 3
    """

    # Mapping[Any, ...]: keys are site keys (SiteKey); Mapping is invariant in its key type, so
    # Mapping[SiteKey, ...] would refuse a plain dict[str, Zero].
    def __init__(
        self,
        mapping: Mapping[Any, Intervention | Sequence[Intervention]] | None = None,
        /,
        **kwargs: Intervention | Sequence[Intervention],
    ):
        self._items: dict[str, tuple[Intervention, ...]] = {}
        self._listeners: list[Callable[[Edits], None]] = []
        self.version = 0  # bumped by every change: a forward's plan is rebuilt when it moves
        for key, value in dict(mapping or {}, **kwargs).items():
            self._items[canonical_name(key)] = _as_list(key, value)

    # -- mapping -------------------------------------------------------------------------------
    def __getitem__(self, key: SiteKey) -> Intervention | list[Intervention]:
        """The intervention at `key` (any alias of it), or the list when there are several."""
        items = self._items[canonical_name(key)]
        return items[0] if len(items) == 1 else list(items)

    def __setitem__(self, key: SiteKey, value: Intervention | Sequence[Intervention]) -> None:
        """Set the intervention(s) at `key`; listening models check the key first."""
        self._change(lambda: self._items.__setitem__(canonical_name(key), _as_list(key, value)))

    def __delitem__(self, key: SiteKey) -> None:
        name = canonical_name(key)
        if name not in self._items:
            raise KeyError(key)
        self._change(lambda: self._items.__delitem__(name))

    def __iter__(self) -> Iterator[str]:
        return iter(self._items)

    def __len__(self) -> int:
        return len(self._items)

    def __repr__(self) -> str:
        inner = ", ".join(f"{k!r}: {list(v) if len(v) > 1 else v[0]!r}" for k, v in self._items.items())
        return f"Edits({{{inner}}})"

    def items_flat(self) -> list[tuple[str, Intervention]]:
        """Every (key, intervention) pair, in application order (a key's list is unrolled).

        Example:
            >>> from splice import Edits, Scale, Zero
            >>> Edits({"embed": [Zero(pos=0), Scale(2.0)]}).items_flat()
            [('embed', Zero(pos=0)), ('embed', Scale(factor=2.0))]
        """
        return [(key, iv) for key, items in self._items.items() for iv in items]

    # -- live updates --------------------------------------------------------------------------
    def _change(self, mutate):
        """Apply `mutate`, then tell every listening model; if one refuses the result (a key that
        names no site of it), undo the change and tell them again."""
        before = dict(self._items)
        mutate()
        self.version += 1
        try:
            for listener in list(self._listeners):
                listener(self)
        except Exception:
            self._items = before
            self.version += 1
            for listener in list(self._listeners):
                listener(self)
            raise

    def subscribe(self, callback: Callable[[Edits], None]) -> None:
        """Call `callback(edits)` after every change (a model with this registry open does).

        If a callback raises (a key that names no site of that model), the change is undone,
        every callback is called again with the registry as it was, and the error propagates.

        Args:
            callback: A function of the registry.

        Example:
            >>> from splice import Edits, Zero
            >>> edits, seen = Edits(), []
            >>> edits.subscribe(seen.append)
            >>> edits["embed"] = Zero()
            >>> len(seen)
            1
            >>> edits.unsubscribe(seen.append)
        """
        self._listeners.append(callback)

    def unsubscribe(self, callback: Callable[[Edits], None]) -> None:
        """Stop calling `callback` (no error if it was not subscribed)."""
        if callback in self._listeners:
            self._listeners.remove(callback)

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict[str, list[dict[str, Any]]]:
        """The registry as JSON-safe data: `{site: [intervention record, ...]}`.

        Returns:
            One list of `Intervention.to_dict` records per (canonical) key.

        Raises:
            SpliceError: If an intervention cannot be serialised (`Apply`).

        Example:
            >>> from splice import Edits, Zero
            >>> Edits({("z", 3): Zero(heads=5)}).to_dict()
            {'blocks.3.attn.z': [{'type': 'Zero', 'heads': 5}]}
        """
        return {key: [iv.to_dict() for iv in items] for key, items in self._items.items()}

    @classmethod
    def from_dict(cls, record: dict[str, Any]) -> Edits:
        """The inverse of `to_dict`; a bad record is named by its key path.

        Args:
            record: `{site: record or list of records}` (a single record stands for a list of
                one); see `Intervention.to_dict`.

        Returns:
            A new registry.

        Raises:
            SpliceError: Naming the key path of the first bad key or record.

        Example:
            >>> from splice import Edits
            >>> Edits.from_dict({"embed": {"type": "Scale", "factor": 0.5}})
            Edits({'embed': Scale(factor=0.5)})
            >>> Edits.from_dict({"embed": {"type": "Zap"}})  # doctest: +ELLIPSIS
            Traceback (most recent call last):
            ...
            splice.errors.SpliceError: edits at ['embed']: unknown intervention type 'Zap'; known: ...
        """
        return cls._from_document(files.Document(record))

    @classmethod
    def _from_document(cls, doc: files.Document) -> Edits:
        if not isinstance(doc.data, dict):
            raise doc.error(
                (), f"expected a mapping of site -> intervention record(s); got {type(doc.data).__name__}"
            )
        out = cls()
        for key, value in doc.data.items():
            try:
                name = canonical_name(key)
            except SpliceError as error:
                raise doc.error((key,), str(error)) from None
            out._items[name] = tuple(files.intervention(doc, k, r) for k, r in files.items_at((key,), value))
        return out

    def save(self, path: str | os.PathLike[str]) -> None:
        """Write the registry to a file, whole or not at all (atomically replaced).

        Args:
            path: A `.yaml`/`.yml` file (YAML, written without aliases, which `load` refuses)
                or any other name (JSON).

        Raises:
            SpliceError: If an intervention cannot be serialised (`Apply`) or the file cannot
                be written.

        Example:
            >>> import pathlib, tempfile
            >>> from splice import Edits, Scale, Zero
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "edits.yaml"
            >>> Edits({"blocks.3.attn.z": Zero(heads=5), "embed": Scale(0.5)}).save(path)
            >>> print(path.read_text(), end="")
            blocks.3.attn.z:
            - type: Zero
              heads: 5
            embed:
            - type: Scale
              factor: 0.5
        """
        path = Path(path)
        record = self.to_dict()
        text = files.dump_yaml(record) if path.suffix in files.YAML_SUFFIXES else json.dumps(record, indent=1)
        path.parent.mkdir(parents=True, exist_ok=True)
        files.write_atomic(path, text.encode())

    @classmethod
    def load(cls, path: str | os.PathLike[str]) -> Edits:
        """Read a file written by `save` (or by hand).

        Args:
            path: A `.yaml`/`.yml` file (read with the safe loader; anchors and aliases are
                refused) or a JSON file. Tensor records hold at most
                `splice.engine.files.MAX_TENSOR_ELEMENTS` numbers.

        Returns:
            A new registry.

        Raises:
            SpliceError: For any mistake, naming the file, the line and the key.

        Example:
            >>> import pathlib, tempfile
            >>> from splice import Edits, Zero
            >>> path = pathlib.Path(tempfile.mkdtemp()) / "edits.json"
            >>> Edits({"embed": Zero(pos=0)}).save(path)
            >>> Edits.load(path)
            Edits({'embed': Zero(pos=0)})
        """
        return cls._from_document(files.load_document(path, EDITS_FILE))


def as_edits(value: Edits | Mapping[Any, Intervention | Sequence[Intervention]] | None) -> Edits:
    """What `edits=` arguments accept, as a registry: an `Edits` as it is, a dict wrapped.

    Args:
        value: An `Edits` (returned itself, so it stays live), a dict of site ->
            intervention(s), or None (an empty registry).

    Raises:
        SpliceError: For anything else.

    Example:
        >>> from splice import Zero
        >>> as_edits({"embed": Zero()})
        Edits({'embed': Zero()})
    """
    if isinstance(value, Edits):
        return value
    if value is None:
        return Edits()
    if isinstance(value, dict):
        return Edits(value)
    raise SpliceError(f"edits must be an Edits or a dict of site -> intervention; got {type(value).__name__}")
