"""`Edits`: the live registry of interventions by site (the "dictionary injection board").

It is a plain mutable mapping. Models that are inside `model.edit(edits)` listen to it, so a
change takes effect on the next forward with no re-registration, and a key that does not name a
site of a listening model is refused on assignment (the registry is left as it was).
"""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from pathlib import Path

from ..errors import SpliceError
from . import files
from .interventions import Intervention
from .sites import canonical_name

EDITS_FILE = "an edits file: a mapping of site -> intervention record(s), as Edits.save writes"


def _as_list(key, value) -> tuple[Intervention, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, Intervention):
            raise SpliceError(
                f"edits[{key!r}] must be an Intervention or a list of them (e.g. Zero(), Scale(0.5)); got {item!r}"
            )
    return tuple(items)


class Edits(MutableMapping):
    """Site -> intervention or ordered list of interventions. Keys may be canonical names,
    TransformerLens names, `(name, layer)` tuples or globs like `blocks.*.mlp.out`."""

    def __init__(self, mapping=None, /, **kwargs):
        self._items: dict[str, tuple[Intervention, ...]] = {}
        self._listeners: list[Callable[[Edits], None]] = []
        self.version = 0  # bumped by every change: a forward's plan is rebuilt when it moves
        for key, value in dict(mapping or {}, **kwargs).items():
            self._items[canonical_name(key)] = _as_list(key, value)

    # -- mapping -------------------------------------------------------------------------------
    def __getitem__(self, key):
        items = self._items[canonical_name(key)]
        return items[0] if len(items) == 1 else list(items)

    def __setitem__(self, key, value):
        self._change(lambda: self._items.__setitem__(canonical_name(key), _as_list(key, value)))

    def __delitem__(self, key):
        name = canonical_name(key)
        if name not in self._items:
            raise KeyError(key)
        self._change(lambda: self._items.__delitem__(name))

    def __iter__(self):
        return iter(self._items)

    def __len__(self):
        return len(self._items)

    def __repr__(self):
        inner = ", ".join(f"{k!r}: {list(v) if len(v) > 1 else v[0]!r}" for k, v in self._items.items())
        return f"Edits({{{inner}}})"

    def items_flat(self):
        """(key, intervention) pairs in application order."""
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

    def subscribe(self, callback) -> None:
        """Call `callback(edits)` after every change (a model with this registry open does)."""
        self._listeners.append(callback)

    def unsubscribe(self, callback) -> None:
        if callback in self._listeners:
            self._listeners.remove(callback)

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {key: [iv.to_dict() for iv in items] for key, items in self._items.items()}

    @classmethod
    def from_dict(cls, record: dict) -> Edits:
        """The inverse of `to_dict`; a bad record is named by its key path."""
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

    def save(self, path) -> None:
        """Write JSON (`.json`) or YAML (`.yaml`/`.yml`), whole or not at all. YAML is written
        without aliases, which `load` refuses."""
        path = Path(path)
        record = self.to_dict()
        text = files.dump_yaml(record) if path.suffix in files.YAML_SUFFIXES else json.dumps(record, indent=1)
        files.write_atomic(path, text.encode())

    @classmethod
    def load(cls, path) -> Edits:
        """Read a file written by `save` (YAML through the safe loader, without aliases); any
        mistake is an error naming the file, line and key."""
        return cls._from_document(files.load_document(path, EDITS_FILE))


def as_edits(value) -> Edits:
    if isinstance(value, Edits):
        return value
    if value is None:
        return Edits()
    if isinstance(value, dict):
        return Edits(value)
    raise SpliceError(f"edits must be an Edits or a dict of site -> intervention; got {type(value).__name__}")
