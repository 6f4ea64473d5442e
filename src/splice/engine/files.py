"""Reading and writing splice's own files (sweep configs, edits, data, checkpoints).

Reading turns every way a file can be wrong into one SpliceError naming the file, the line and
what was expected, never a parser's traceback. Writing replaces a file whole or not at all.

YAML is read with the safe loader minus anchors and aliases: splice's files never need them, and
nested aliases let a few hundred bytes expand into millions of values ("billion laughs").
A tensor record may hold at most `MAX_TENSOR_ELEMENTS` numbers: larger values belong in
safetensors files (as steering vectors are saved), not in YAML or JSON.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any, TypeAlias

import torch
import yaml

from ..errors import SpliceError
from .interventions import Intervention

PathLike: TypeAlias = str | os.PathLike[str]
"""A file name: a string or a `pathlib.Path`."""

MAX_TENSOR_ELEMENTS = 10_000_000
"""The most numbers a tensor record in a YAML/JSON file may hold (larger values belong in
safetensors files); checked before anything is allocated."""
YAML_SUFFIXES = (".yaml", ".yml")
"""File suffixes read and written as YAML; every other file is JSON."""


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
    key path of the part that was wrong.

    Args:
        data: The parsed data.
        path: The file it was read from; None for data built in memory (`label` names it).
        text: The file's text, from which lines are found when an error needs one.
        label: How messages name in-memory data (default `"edits"`).

    Example:
        >>> doc = Document({"embed": [{"type": "Zap"}]})
        >>> doc.where(("embed", 0))
        "edits at ['embed'][0]"
        >>> doc.error(("embed", 0), "unknown type")
        SpliceError("edits at ['embed'][0]: unknown type")
    """

    def __init__(self, data: Any, path: Path | None = None, text: str | None = None, label: str = "edits"):
        self.data, self.path, self.text, self.label = data, path, text, label

    def error(self, keys: tuple[Any, ...], message: str) -> SpliceError:
        """A SpliceError placing `message` at the key path `keys` (file, line and keys); raise it.

        Args:
            keys: The key path of the part that was wrong, e.g. `("sweep", "interventions", 0)`.
            message: What was wrong and what was expected.
        """
        return SpliceError(f"{self.where(keys)}: {message}")

    def where(self, keys: tuple[Any, ...] = ()) -> str:
        """`'<file> line <n> at [k1][k2]'` for a key path (the line when the text is known)."""
        place = str(self.path) if self.path is not None else self.label
        line = self.line(keys)
        place += f" line {line}" if line is not None else ""
        return place + (f" at {''.join(f'[{k!r}]' for k in keys)}" if keys else "")

    def line(self, keys: tuple[Any, ...]) -> int | None:
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
def read_text(path: PathLike, what: str) -> str:
    """A file's text (UTF-8), or an error naming it and what it should have been.

    Args:
        path: The file.
        what: What the file should hold, for messages.

    Raises:
        SpliceError: If the file cannot be read or is not UTF-8.

    Example:
        >>> read_text("/no/such/file", "an edits file")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: cannot read /no/such/file: No such file or directory; expected an edits file
    """
    path = Path(path)
    try:
        return path.read_text(encoding="utf-8")
    except UnicodeDecodeError as error:
        raise SpliceError(f"{path}: not UTF-8 text (byte {error.start}); expected {what}") from None
    except OSError as error:
        raise SpliceError(f"cannot read {path}: {error.strerror or error}; expected {what}") from None


def parse_json(text: str | bytes, where: str, what: str, line: int | None = None) -> Any:
    """`json.loads`, with a syntax error named at its line.

    Args:
        text: JSON text (a whole file, or one line of a JSON-lines file).
        where: The file, for messages.
        what: What the text should hold, for messages.
        line: The file line `text` came from (a JSON-lines file); None: count lines in `text`.

    Returns:
        The parsed data.

    Raises:
        SpliceError: For invalid or unreadable JSON, naming the file and line.

    Example:
        >>> parse_json('{"a": }', "edits.json", "an edits file")
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: edits.json line 1: invalid JSON (Expecting value, column 7); expected an edits file
    """
    try:
        return json.loads(text)
    except json.JSONDecodeError as error:
        at = error.lineno if line is None else line
        raise SpliceError(
            f"{where} line {at}: invalid JSON ({error.msg}, column {error.colno}); expected {what}"
        ) from None
    except (UnicodeDecodeError, RecursionError) as error:
        at_line = f" line {line}" if line is not None else ""
        raise SpliceError(
            f"{where}{at_line}: unreadable JSON ({type(error).__name__}); expected {what}"
        ) from None


def load_json(path: PathLike, what: str) -> Document:
    """A JSON file as a `Document` (errors name the file and line).

    Args:
        path: The file.
        what: What it should hold, for messages.

    Raises:
        SpliceError: If it cannot be read or is not valid JSON.
    """
    path = Path(path)
    text = read_text(path, what)
    return Document(parse_json(text, str(path), what), path, text)


def load_yaml(path: PathLike, what: str) -> Document:
    """A YAML file as a `Document`, read with the safe loader minus anchors and aliases.

    Args:
        path: The file.
        what: What it should hold, for messages.

    Raises:
        SpliceError: If it cannot be read, is not valid YAML, or uses an anchor or alias
            (named at its line).

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "edits.yaml"
        >>> _ = path.write_text("embed: [{type: Zero, pos: 1}]")
        >>> load_yaml(path, "an edits file").data
        {'embed': [{'type': 'Zero', 'pos': 1}]}
        >>> _ = path.write_text("{a: &x [1], b: *x}")
        >>> load_yaml(path, "an edits file")  # doctest: +ELLIPSIS
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: ...edits.yaml line 1: YAML anchors and aliases (&name, *name) are refused: ...
    """
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


def load_document(path: PathLike, what: str) -> Document:
    """A file as a `Document`: YAML for `.yaml`/`.yml` (see `load_yaml`), JSON otherwise."""
    return load_yaml(path, what) if Path(path).suffix in YAML_SUFFIXES else load_json(path, what)


# -- intervention records ---------------------------------------------------------------------
INTERVENTION = "an intervention record such as {type: Zero, pos: 3} (see Intervention.to_dict)"
"""How messages describe an intervention record."""


def intervention(doc: Document, keys: tuple[Any, ...], record: Any) -> Intervention:
    """`Intervention.from_dict(record)`, with every way the record can be wrong named at its place.

    Values are checked before they are decoded: tensor records must be rectangular and hold at
    most `MAX_TENSOR_ELEMENTS` numbers, slice records three ints or nulls.

    Args:
        doc: The document the record came from.
        keys: The record's key path in it.
        record: The record, e.g. `{"type": "Zero", "pos": 3}`.

    Returns:
        The intervention.

    Raises:
        SpliceError: Naming the file, line and key path, for anything wrong with the record.

    Example:
        >>> doc = Document({"embed": {"type": "Zero", "pos": 1.5}})
        >>> intervention(doc, ("embed",), doc.data["embed"])
        Traceback (most recent call last):
        ...
        splice.errors.SpliceError: edits at ['embed']: pos must be an int, slice or list of ints; got 1.5 (float)
    """
    if not isinstance(record, dict) or not isinstance(record.get("type"), str):
        raise doc.error(keys, f"expected {INTERVENTION}; got {_one_line(repr(record))[:80]}")
    for name, value in record.items():
        _check_value(doc, (*keys, name), value)
    try:
        return Intervention.from_dict(record)
    except (SpliceError, AttributeError, TypeError, ValueError, RuntimeError) as error:
        raise doc.error(keys, _one_line(error)) from None


def items_at(keys: tuple[Any, ...], value: Any) -> list[tuple[tuple[Any, ...], Any]]:
    """(key path, item) for each item of a list, or for a single value standing for a list of one.

    Example:
        >>> items_at(("embed",), [{"type": "Zero"}, {"type": "Scale"}])
        [(('embed', 0), {'type': 'Zero'}), (('embed', 1), {'type': 'Scale'})]
        >>> items_at(("embed",), {"type": "Zero"})
        [(('embed',), {'type': 'Zero'})]
    """
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


def is_int(value: object) -> bool:
    """An int that is not a bool (JSON/YAML `true` must not pass for 1).

    Example:
        >>> is_int(3), is_int(True)
        (True, False)
    """
    return isinstance(value, int) and not isinstance(value, bool)


_RECORDS = {"tensor": {"tensor", "dtype"}, "slice": {"slice"}, "mapping": {"mapping"}}
_CHECKS = {"tensor": _check_tensor, "slice": _check_slice, "mapping": _check_mapping}


# -- writing ------------------------------------------------------------------------------------
def dump_yaml(data: Any) -> str:
    """Safe YAML without anchors or aliases (which `load_yaml` refuses), in the data's own key order.

    Example:
        >>> print(dump_yaml({"embed": [{"type": "Zero"}]}), end="")
        embed:
        - type: Zero
    """
    return yaml.dump(data, Dumper=_Dumper, sort_keys=False)


def write_atomic(path: PathLike, data: bytes) -> None:
    """Write a whole file or nothing: a temporary file beside it, synced, renamed over it.

    A reader never sees a half-written file, and a crash leaves the old file (or none).

    Args:
        path: The file to create or replace.
        data: Its new contents.

    Raises:
        SpliceError: If it cannot be written.

    Example:
        >>> import pathlib, tempfile
        >>> path = pathlib.Path(tempfile.mkdtemp()) / "out.json"
        >>> write_atomic(path, b"{}")
        >>> path.read_bytes()
        b'{}'
    """
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


def tensor_sha256(tensor: torch.Tensor) -> str:
    """sha256 of a tensor's bytes (contiguous, on the CPU): the checksum saved next to a tensor
    file, so that loading can refuse a tensor file that belongs to another record.

    Example:
        >>> import torch
        >>> tensor_sha256(torch.zeros(2)) == tensor_sha256(torch.zeros(2)) != tensor_sha256(torch.ones(2))
        True
    """
    flat = tensor.detach().cpu().contiguous().reshape(-1)
    return hashlib.sha256(flat.view(torch.uint8).numpy().tobytes()).hexdigest()
