"""griffe extension (used by mkdocstrings): read splice's docstrings the way they are written.

Two conventions of splice's Google-style docstrings that griffe's parser does not read as meant:

- `Example:` (singular) heading `>>>` doctests. griffe only treats `Examples:` as a section of
  examples; any other title becomes an admonition whose body is Markdown, so `>>>` turns into a
  nested quote and an output such as `['a', 'b']` into a broken link. It is read as `Examples:`.
- Several parameters sharing one entry of `Args:` (`title, xlabel: Labels of the plot.`). griffe
  reads that as one parameter named "title, xlabel" and warns that it is not in the signature.
  The entry is repeated for each name.

Both rewrites are made to the docstring text griffe parses, never to the source files.
"""

from __future__ import annotations

import re

import griffe

EXAMPLE = re.compile(r"^(?P<indent>[ \t]*)Example:[ \t]*$", re.MULTILINE)
ARGS_TITLES = (
    "Args:",
    "Arguments:",
    "Parameters:",
    "Params:",
    "Keyword Args:",
    "Keyword Arguments:",
    "Other Parameters:",
)
GROUPED = re.compile(
    r"^(?P<indent>[ \t]+)(?P<names>\*{0,2}\w+(?:[ \t]*,[ \t]*\*{0,2}\w+)+)(?P<rest>[ \t]*(?:\([^)]*\))?:.*)$"
)


def _indent(line: str) -> int:
    return len(line) - len(line.lstrip())


def split_grouped_parameters(text: str) -> str:
    """`a, b: text` (plus its continuation lines) inside an arguments section -> one entry each."""
    lines, out, i = text.split("\n"), [], 0
    section_indent = None
    while i < len(lines):
        line = lines[i]
        stripped = line.strip()
        if stripped in ARGS_TITLES:
            section_indent = _indent(line)
            out.append(line)
            i += 1
            continue
        if section_indent is not None and stripped and _indent(line) <= section_indent:
            section_indent = None  # the section ended
        match = GROUPED.match(line) if section_indent is not None else None
        if match is None:
            out.append(line)
            i += 1
            continue
        entry_indent = _indent(line)
        block_end = i + 1
        while block_end < len(lines) and (
            not lines[block_end].strip() or _indent(lines[block_end]) > entry_indent
        ):
            block_end += 1
        continuation = lines[i + 1 : block_end]
        for name in (n.strip() for n in match["names"].split(",")):
            out.append(f"{match['indent']}{name}{match['rest']}")
            out.extend(continuation)
        i = block_end
    return "\n".join(out)


class SpliceDocstrings(griffe.Extension):
    def on_object(self, *, obj, loader, **kwargs) -> None:
        docstring = obj.docstring
        if docstring is None:
            return
        value = EXAMPLE.sub(lambda m: f"{m['indent']}Examples:", docstring.value)
        docstring.value = split_grouped_parameters(value)
