"""`Edits`: the live registry of interventions by site (the "dictionary injection board").

It is a plain mutable mapping. Models that are inside `model.edit(edits)` listen to it, so a
change takes effect on the next forward with no re-registration, and a key that does not name a
site of a listening model is refused on assignment (the registry is left as it was).
"""

from __future__ import annotations

import json
from collections.abc import Callable, MutableMapping
from pathlib import Path

from .errors import SpliceError
from .interventions import Intervention
from .sites import canonical_name


def _as_list(key, value) -> tuple[Intervention, ...]:
    items = value if isinstance(value, (list, tuple)) else [value]
    for item in items:
        if not isinstance(item, Intervention):
            raise SpliceError(f"edits[{key!r}] must be an Intervention or a list of them (e.g. Zero(), Scale(0.5)); got {item!r}")
    return tuple(items)


class Edits(MutableMapping):
    """Site -> intervention or ordered list of interventions. Keys may be canonical names,
    TransformerLens names, `(name, layer)` tuples or globs like `blocks.*.mlp.out`."""

    def __init__(self, mapping=None, /, **kwargs):
        self._items: dict[str, tuple[Intervention, ...]] = {}
        self._listeners: list[Callable[[], None]] = []
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
        before = dict(self._items)
        mutate()
        try:
            for listener in list(self._listeners):
                listener()
        except Exception:
            self._items = before
            for listener in list(self._listeners):
                listener()
            raise

    def _listen(self, callback):
        self._listeners.append(callback)

    def _unlisten(self, callback):
        if callback in self._listeners:
            self._listeners.remove(callback)

    # -- persistence ---------------------------------------------------------------------------
    def to_dict(self) -> dict:
        return {key: [iv.to_dict() for iv in items] for key, items in self._items.items()}

    @classmethod
    def from_dict(cls, record: dict) -> "Edits":
        if not isinstance(record, dict):
            raise SpliceError(f"an edits file holds a mapping of site -> intervention(s); got {type(record).__name__}")
        out = cls()
        for key, value in record.items():
            values = value if isinstance(value, list) else [value]
            out._items[canonical_name(key)] = tuple(Intervention.from_dict(v) for v in values)
        return out

    def save(self, path) -> None:
        """Write JSON (`.json`) or YAML (`.yaml`/`.yml`)."""
        path = Path(path)
        if path.suffix in (".yaml", ".yml"):
            import yaml

            path.write_text(yaml.safe_dump(self.to_dict(), sort_keys=False))
        else:
            path.write_text(json.dumps(self.to_dict(), indent=1))

    @classmethod
    def load(cls, path) -> "Edits":
        """Read a file written by `save` (YAML through the safe loader only)."""
        path = Path(path)
        text = path.read_text()
        if path.suffix in (".yaml", ".yml"):
            import yaml

            return cls.from_dict(yaml.safe_load(text))
        return cls.from_dict(json.loads(text))


def as_edits(value) -> Edits:
    if isinstance(value, Edits):
        return value
    if value is None:
        return Edits()
    if isinstance(value, dict):
        return Edits(value)
    raise SpliceError(f"edits must be an Edits or a dict of site -> intervention; got {type(value).__name__}")
