"""Reading and writing splice's own files (sweep configs, edits, data, checkpoints).

Reading turns every way a file can be wrong into one SpliceError naming the file, the line and
what was expected, never a parser's traceback. Writing replaces a file whole or not at all.

YAML is read with the safe loader minus anchors and aliases: splice's files never need them, and
nested aliases let a few hundred bytes expand into millions of values ("billion laughs").
A tensor record may hold at most `MAX_TENSOR_ELEMENTS` numbers: larger values belong in
safetensors files (as steering vectors are saved), not in YAML or JSON.
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path

import yaml

from ..errors import SpliceError
from .interventions import Intervention

MAX_TENSOR_ELEMENTS = 10_000_000
YAML_SUFFIXES = (".yaml", ".yml")


class _Loader(yaml.SafeLoader):
    """The safe loader, refusing the first anchor or alias at its line."""

    def compose_node(self, parent, index):
        event = self.peek_event()
        if isinstance(event, yaml.AliasEvent) or getattr(event, "anchor", None) is not None:
            raise yaml.composer.ComposerError(
                None,
                None,
                "YAML anchors and aliases (&name, *name) are refused: splice files never need them, "
                "and nested aliases can expand a small file into millions of values; write the values out",
                event.start_mark,
            )
        return super().compose_node(parent, index)


class _Dumper(yaml.SafeDumper):
    """The safe dumper, writing a repeated object out again instead of as an alias (which
    `_Loader` would refuse)."""

    def ignore_aliases(self, data):
        return True


class Document:
    """Parsed data and where it came from, so that an error can name the file, the line and the
    key path of the part that was wrong. `path=None`: data built in memory (`label` names it)."""

    def __init__(self, data, path: Path | None = None, text: str | None = None, label: str = "edits"):
        self.data, self.path, self.text, self.label = data, path, text, label

    def error(self, keys, message: str) -> SpliceError:
        return SpliceError(f"{self.where(keys)}: {message}")

    def where(self, keys=()) -> str:
        place = str(self.path) if self.path is not None else self.label
        line = self.line(keys)
        place += f" line {line}" if line is not None else ""
        return place + (f" at {''.join(f'[{k!r}]' for k in keys)}" if keys else "")

    def line(self, keys) -> int | None:
        """1-based line of `keys`, or of the deepest part of them in the file (None if not even the
        first is: a missing top-level key has no line). JSON is composed as YAML for this, which
        is only done when an error needs it."""
        if self.text is None:
            return None
        try:
            node = yaml.compose(self.text, Loader=_Loader)
        except (yaml.YAMLError, RecursionError):
            return None
        found = None if keys else node
        for key in keys:
            node = _child(node, key)
            if node is None:
                break
            found = node
        return found.start_mark.line + 1 if found is not None else None


def _child(node, key):
    if isinstance(node, yaml.MappingNode):
        return next(
            (v for k, v in node.value if isinstance(k, yaml.ScalarNode) and k.value == str(key)), None
        )
    if isinstance(node, yaml.SequenceNode) and isinstance(key, int) and 0 <= key < len(node.value):
        return node.value[key]
    return None


def _one_line(text) -> str:
    return " ".join(str(text).split())


# -- reading ------------------------------------------------------------------------------------
def read_text(path, what: str) -> str:
    """A file's text, or an error naming it and what it should have been."""
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpliceError(f"{path}: not UTF-8 text (byte {error.start}); expected {what}") from None
    except OSError as error:
        raise SpliceError(f"cannot read {path}: {error.strerror or error}; expected {what}") from None


def parse_json(text, where: str, what: str, line: int | None = None):
    """`json.loads`, a syntax error named at its line (`line`: the file line `text` came from)."""
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        at = error.lineno if line is None else line
        raise SpliceError(
            f"{where} line {at}: invalid JSON ({error.msg}, column {error.colno}); expected {what}"
        ) from None
    except (UnicodeDecodeError, RecursionError) as error:
        at = f" line {line}" if line is not None else ""
        raise SpliceError(f"{where}{at}: unreadable JSON ({type(error).__name__}); expected {what}") from None


def load_json(path, what: str) -> Document:
    path = Path(path)
    text = read_text(path, what)
    return Document(parse_json(text, str(path), what), path, text)


def load_yaml(path, what: str) -> Document:
    """A YAML file through the alias-free safe loader."""
    path = Path(path)
    text = read_text(path, what)
    try:
        data = yaml.load(text, Loader=_Loader)
    except yaml.MarkedYAMLError as error:
        problem = ": ".join(_one_line(p) for p in (error.context, error.problem) if p)
        line = f" line {error.problem_mark.line + 1}" if error.problem_mark is not None else ""
        raise SpliceError(f"{path}{line}: {problem}; expected {what}") from None
    except (yaml.YAMLError, RecursionError) as error:
        raise SpliceError(
            f"{path}: unreadable YAML ({_one_line(error) or type(error).__name__}); expected {what}"
        ) from None
    return Document(data, path, text)


def load_document(path, what: str) -> Document:
    """YAML for `.yaml`/`.yml`, JSON otherwise."""
    return load_yaml(path, what) if Path(path).suffix in YAML_SUFFIXES else load_json(path, what)


# -- intervention records ---------------------------------------------------------------------
INTERVENTION = "an intervention record such as {type: Zero, pos: 3} (see Intervention.to_dict)"


def intervention(doc: Document, keys: tuple, record) -> Intervention:
    """`Intervention.from_dict(record)`, with every way the record can be wrong named at its place."""
    if not isinstance(record, dict) or not isinstance(record.get("type"), str):
        raise doc.error(keys, f"expected {INTERVENTION}; got {_one_line(repr(record))[:80]}")
    for name, value in record.items():
        _check_value(doc, (*keys, name), value)
    try:
        return Intervention.from_dict(record)
    except (SpliceError, AttributeError, TypeError, ValueError, RuntimeError) as error:
        raise doc.error(keys, _one_line(error)) from None


def items_at(keys: tuple, value) -> list[tuple[tuple, object]]:
    """(key path, item) for each item of a list, or for a single value standing for a list of one."""
    if isinstance(value, list):
        return [((*keys, i), item) for i, item in enumerate(value)]
    return [(keys, value)]


def _check_value(doc: Document, keys: tuple, value) -> None:
    """Refuse what `codec.decode` would fail on, or allocate too much for, before it runs."""
    if isinstance(value, list):
        for i, item in enumerate(value):
            _check_value(doc, (*keys, i), item)
    elif isinstance(value, dict):
        kind = next((k for k in _RECORDS if k in value), None)
        if kind is None or set(value) - _RECORDS[kind]:
            raise doc.error(
                keys,
                "expected a tensor, slice or mapping record ({tensor: [...], dtype: float32}, "
                f"{{slice: [start, stop, step]}} or {{mapping: {{...}}}}); got keys {sorted(map(str, value))}",
            )
        _CHECKS[kind](doc, keys, value)


def _check_tensor(doc: Document, keys: tuple, value: dict) -> None:
    """Size and shape; the dtype name is checked where it is decoded."""
    shape = _shape(value["tensor"])
    if math.prod(shape) > MAX_TENSOR_ELEMENTS:
        raise doc.error(
            keys,
            f"a tensor of shape {shape} ({math.prod(shape):,} numbers) is over the limit of "
            f"{MAX_TENSOR_ELEMENTS:,} for values in YAML/JSON (splice.engine.files.MAX_TENSOR_ELEMENTS); "
            "expected a smaller value (save large tensors with safetensors)",
        )
    if not _rectangular(value["tensor"], shape):
        raise doc.error(
            keys,
            f"expected {{tensor: ...}} to hold a number or a rectangular nested list of numbers (shape {shape} from its first elements)",
        )


def _shape(nested) -> list[int]:
    """The shape read from first elements alone (cheap even for huge or shared lists)."""
    shape = []
    while isinstance(nested, list):
        shape.append(len(nested))
        if not nested:
            break
        nested = nested[0]
    return shape


def _rectangular(nested, shape: list[int]) -> bool:
    if not shape:
        return isinstance(nested, (int, float))
    return (
        isinstance(nested, list)
        and len(nested) == shape[0]
        and all(_rectangular(x, shape[1:]) for x in nested)
    )


def _check_slice(doc: Document, keys: tuple, value: dict) -> None:
    bounds = value["slice"]
    if not isinstance(bounds, list) or len(bounds) != 3 or not all(b is None or is_int(b) for b in bounds):
        raise doc.error(
            keys, f"expected {{slice: [start, stop, step]}}, three integers or nulls; got {bounds!r}"
        )
    if bounds[2] == 0:
        raise doc.error(
            keys, f"a slice step cannot be 0; expected a nonzero step or null in {{slice: {bounds!r}}}"
        )


def _check_mapping(doc: Document, keys: tuple, value: dict) -> None:
    if not isinstance(value["mapping"], dict):
        raise doc.error(keys, f"expected {{mapping: {{site: value}}}}; got {type(value['mapping']).__name__}")
    for name, item in value["mapping"].items():
        _check_value(doc, (*keys, "mapping", name), item)


def is_int(value) -> bool:
    """An int that is not a bool (JSON/YAML `true` must not pass for 1)."""
    return isinstance(value, int) and not isinstance(value, bool)


_RECORDS = {"tensor": {"tensor", "dtype"}, "slice": {"slice"}, "mapping": {"mapping"}}
_CHECKS = {"tensor": _check_tensor, "slice": _check_slice, "mapping": _check_mapping}


# -- writing ------------------------------------------------------------------------------------
def dump_yaml(data) -> str:
    """Safe YAML without anchors or aliases, in the data's own key order."""
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def write_atomic(path, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file beside it, synced, renamed over it."""
    path = Path(path)
    temporary = path.with_name(f".{path.name}.tmp{os.getpid()}")
    try:
        with open(temporary, "wb") as handle:
            handle.write(data)
            handle.flush()
            os.fsync(handle.fileno())
        os.replace(temporary, path)
    except OSError as error:
        raise SpliceError(f"cannot write {path}: {error.strerror or error}") from None
    finally:
        temporary.unlink(missing_ok=True)
