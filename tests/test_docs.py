"""The documentation runs: every ```python block of README.md and docs/**/*.md, and the site build.

Each markdown file is one session, like a notebook: its python blocks run in order in one shared
namespace, in a scratch working directory, with matplotlib on Agg. There is no opt-out: a
```python block always runs (output samples go in ```text or ```console blocks). A failure names
the file, the line where the failing block starts and the exception; the traceback points at
lines of the markdown file itself.

The embedded model is loaded once per test session: inside these tests `splice.load()` with no
argument returns the same `splice.Model` every time (splice never modifies the model it wraps, so
pages cannot leak state into each other through it). Pages whose code loads it are marked `real`.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
import traceback
import types
from dataclasses import dataclass
from pathlib import Path

import pytest
import yaml

import splice
import splice.loading
import splice.spec

ROOT = Path(__file__).resolve().parents[1]
DOCS = ROOT / "docs"
MARKDOWN = [ROOT / "README.md", *sorted(DOCS.rglob("*.md"))]
RUNS = ("python", "py")  # info strings of blocks that run
# A page uses the embedded model if its code calls splice.load (or a bare `load(` imported from
# splice) or runs the CLI, which loads one. `Edits.load(...)` and the like do not count.
USES_MODEL = re.compile(r"\bsplice\.load\(|(?<![.\w])load\(|\bcli\.main\(|(?<![.\w])main\(\[")
FENCE = re.compile(r"^(?P<indent>[ \t]*)(?P<fence>`{3,}|~{3,})[ \t]*(?P<info>[^`]*?)[ \t]*$")


@dataclass(frozen=True)
class Block:
    line: int  # 1-based line of the opening fence
    code: str


def python_blocks(path: Path) -> list[Block]:
    """The ```python blocks of a markdown file, in order, dedented to their fence's indentation
    (blocks inside admonitions and tabs are indented)."""
    blocks, lines = [], path.read_text(encoding="utf-8").splitlines()
    i = 0
    while i < len(lines):
        opening = FENCE.match(lines[i])
        if opening is None:
            i += 1
            continue
        indent, fence = opening["indent"], opening["fence"]
        language = (opening["info"].split() or [""])[0].lstrip(".").lower()
        body, j = [], i + 1
        while j < len(lines):
            closing = FENCE.match(lines[j])
            if closing and closing["fence"][0] == fence[0] and len(closing["fence"]) >= len(fence):
                if not closing["info"]:
                    break
            body.append(lines[j][len(indent) :] if lines[j].startswith(indent) else lines[j].lstrip())
            j += 1
        else:
            raise AssertionError(f"{path.relative_to(ROOT)}:{i + 1}: code block never closed")
        if language in RUNS:
            blocks.append(Block(i + 1, "\n".join(body) + "\n"))
        i = j + 1
    return blocks


def _param(path: Path):
    rel = path.relative_to(ROOT).as_posix()
    try:
        code = "".join(block.code for block in python_blocks(path))
    except AssertionError:  # an unclosed fence: the test itself reports it
        code = ""
    marks = [pytest.mark.real] if USES_MODEL.search(code) else []
    return pytest.param(path, id=rel, marks=marks)


@pytest.fixture
def load_once(request, monkeypatch):
    """`splice.load()` (the embedded model) loads once per session; anything else loads as usual."""
    real_load = splice.spec.load
    # conftest's session-scoped embedded model, for the pages marked `real` (those that load it).
    embedded = request.getfixturevalue("smol") if request.node.get_closest_marker("real") else None

    def load(name_or_path=None, progress: bool = False, **kwargs):
        if embedded is not None and name_or_path in splice.loading.EMBEDDED_NAMES and not kwargs:
            return embedded
        return real_load(name_or_path, progress=progress, **kwargs)

    monkeypatch.setattr(splice, "load", load)
    monkeypatch.setattr(splice.spec, "load", load)


@pytest.mark.parametrize("path", [_param(p) for p in MARKDOWN])
def test_markdown_code_runs(path, tmp_path, monkeypatch, load_once):
    import matplotlib

    matplotlib.use("Agg")
    monkeypatch.setenv("MPLBACKEND", "Agg")
    monkeypatch.chdir(tmp_path)
    rel = path.relative_to(ROOT).as_posix()
    blocks = python_blocks(path)
    # A real module, so that classes, dataclasses and pickling in the blocks work as in a script.
    page = types.ModuleType("docs_page_" + re.sub(r"\W", "_", rel))
    page.__file__ = str(path)
    monkeypatch.setitem(sys.modules, page.__name__, page)
    for block in blocks:
        failure = _run(block, path, rel, page)
        if failure:
            pytest.fail(failure, pytrace=False)


def _run(block: Block, path: Path, rel: str, page: types.ModuleType) -> str | None:
    """Run one block in the page's namespace; on failure, a message naming the file, the line
    where the block starts, the exception, and the lines of the page it went through."""
    try:
        # Padding the code to its line in the file makes tracebacks name markdown lines.
        exec(compile("\n" * block.line + block.code, str(path), "exec"), page.__dict__)
    except (Exception, SystemExit) as error:
        frames = traceback.extract_tb(error.__traceback__)
        in_page = [f"  {rel}:{f.lineno}: {f.line}" for f in frames if f.filename == str(path)]
        if isinstance(error, SyntaxError) and error.filename == str(path):
            in_page.append(f"  {rel}:{error.lineno}: {(error.text or '').strip()}")
        return (
            f"{rel}: the python block starting at line {block.line} raised {type(error).__name__}: {error}\n"
            + "".join(line + "\n" for line in in_page)
            + "".join(traceback.format_exception(error)[-12:])
        )
    return None


def _nav_pages(nav) -> set[str]:
    pages = set()
    for item in nav:
        values = item.values() if isinstance(item, dict) else [item]
        for value in values:
            if isinstance(value, list):
                pages |= _nav_pages(value)
            elif isinstance(value, str) and value.endswith(".md"):
                pages.add(value)
    return pages


class _ConfigLoader(yaml.SafeLoader):
    """mkdocs.yml may hold `!!python/name:` tags (theme extensions); the nav test ignores them."""


_ConfigLoader.add_multi_constructor("", lambda loader, suffix, node: None)


def test_every_docs_page_is_in_the_nav():
    """Also checked by the strict build (validation.nav.omitted_files: warn); this one is instant
    and names the pages."""
    config = yaml.load((ROOT / "mkdocs.yml").read_text(), Loader=_ConfigLoader)
    listed = _nav_pages(config["nav"])
    on_disk = {p.relative_to(DOCS).as_posix() for p in DOCS.rglob("*.md")}
    assert not on_disk - listed, (
        f"pages under docs/ missing from the nav in mkdocs.yml: {sorted(on_disk - listed)}"
    )
    assert not listed - on_disk - _generated_pages(), (
        f"nav entries with no page: {sorted(listed - on_disk - _generated_pages())}"
    )


def _generated_pages() -> set[str]:
    return {f"architectures/{arch.name}.md" for arch in splice.ARCHITECTURES}


def test_api_reference_covers_every_public_name():
    """Everything in splice.__all__, and the feature modules, has a `::: splice.<name>` entry."""
    documented = set()
    for path in (DOCS / "reference").glob("*.md"):
        documented |= set(re.findall(r"^::: splice\.([\w.]+)", path.read_text(), flags=re.MULTILINE))
    wanted = set(splice.__all__) | {"metrics", "patching", "steering", "plot", "strategies"}
    assert not wanted - documented, (
        f"not in the API reference (docs/reference/): {sorted(wanted - documented)}"
    )


def test_site_builds_strict(tmp_path):
    """`mkdocs build --strict`: no broken link or anchor, no page outside the nav, every
    mkdocstrings reference resolves and every docstring parses (warnings are errors)."""
    result = subprocess.run(
        [sys.executable, "-m", "mkdocs", "build", "--strict", "--site-dir", str(tmp_path / "site")],
        cwd=ROOT,
        env={**os.environ, "NO_MKDOCS_2_WARNING": "1", "PYTHONDONTWRITEBYTECODE": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, f"mkdocs build --strict failed:\n{result.stdout}\n{result.stderr}"
    for family in _generated_pages():
        assert (tmp_path / "site" / family.removesuffix(".md") / "index.html").exists(), family
