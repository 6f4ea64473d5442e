"""The notebooks in notebooks/ run top to bottom against the real model, and are committed clean.

Each notebook runs in a fresh `python3` kernel of this interpreter (`sys.executable`, through a
kernel spec written for the test, so no user-level `python3` spec can pick another Python; a probe
cell appended to the in-memory copy checks it), in a scratch working directory, with
`MPLBACKEND=Agg` and one torch thread. A failure names the notebook, the cell index, the cell's
first line and the error. Many notebook cells assert their own claims.
"""

from __future__ import annotations

import json
import os
import re
import sys
from pathlib import Path

import nbformat
import pytest

NOTEBOOKS_DIR = Path(__file__).resolve().parents[1] / "notebooks"
NOTEBOOKS = sorted(p.name for p in NOTEBOOKS_DIR.glob("*.ipynb"))
CELL_TIMEOUT = 300  # seconds for one cell; the slowest cell takes well under a minute
PROBE = "import sys; print(sys.executable)"


def _first_line(source: str) -> str:
    lines = [line for line in source.splitlines() if line.strip()]
    return lines[0] if lines else "(empty)"


def _plain(text: str) -> str:
    return re.sub(r"\x1b\[[0-9;]*m", "", text)  # IPython colours its tracebacks


def _stream_text(cell, name: str = "stdout") -> str:
    return "".join(o.get("text", "") for o in cell.outputs if o.output_type == "stream" and o.name == name)


def _kernel_manager(spec_root: Path):
    """A manager for kernel "python3" = ipykernel on this interpreter, whatever else is installed."""
    from jupyter_client.kernelspec import KernelSpecManager
    from jupyter_client.manager import KernelManager

    spec = spec_root / "python3"
    spec.mkdir(parents=True)
    argv = [sys.executable, "-m", "ipykernel_launcher", "-f", "{connection_file}"]
    (spec / "kernel.json").write_text(
        json.dumps({"argv": argv, "display_name": "Python 3 (test)", "language": "python"})
    )
    specs = KernelSpecManager(kernel_dirs=[str(spec_root)], ensure_native_kernel=False)
    return KernelManager(kernel_name="python3", kernel_spec_manager=specs)


@pytest.mark.real
@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.removesuffix(".ipynb") for n in NOTEBOOKS])
def test_notebook_runs(notebook, tmp_path):
    from nbclient import NotebookClient
    from nbclient.exceptions import CellControlSignal, CellExecutionError, DeadKernelError

    nb = nbformat.read(NOTEBOOKS_DIR / notebook, as_version=4)
    nb.cells.append(nbformat.v4.new_code_cell(PROBE))
    work = tmp_path / "work"
    work.mkdir()
    client = NotebookClient(
        nb,
        km=_kernel_manager(tmp_path / "kernels"),
        kernel_name="python3",
        timeout=CELL_TIMEOUT,
        resources={"metadata": {"path": str(work)}},  # the kernel's working directory
    )
    # One torch thread unless the caller chose otherwise: on a shared 2-core runner two busy
    # threads thrash (a notebook took twice as long with two as with one, measured).
    env = {"OMP_NUM_THREADS": "1", **os.environ, "MPLBACKEND": "Agg", "PYTHONUNBUFFERED": "1"}
    with client.setup_kernel(env=env):
        for index, cell in enumerate(nb.cells):
            if cell.cell_type != "code":
                continue
            try:
                client.execute_cell(cell, index)
            except (CellExecutionError, CellControlSignal, TimeoutError, DeadKernelError) as error:
                what = f"{getattr(error, 'ename', type(error).__name__)}: {getattr(error, 'evalue', '')}"
                pytest.fail(
                    f"notebooks/{notebook}: cell {index} (0-based, markdown cells counted; "
                    f"{_first_line(cell.source)!r}) raised {_plain(what)}\n\n{_plain(str(error))}",
                    pytrace=False,
                )
    kernel_python = _stream_text(nb.cells[-1]).strip()
    assert Path(kernel_python).resolve() == Path(sys.executable).resolve(), (
        f"notebooks/{notebook} ran on {kernel_python!r}, not this interpreter {sys.executable!r}"
    )


def test_the_notebooks_are_there():
    assert {"quickstart.ipynb", "ioi_ablation_and_patching.ipynb", "steering.ipynb"} <= set(NOTEBOOKS)
    readme = (NOTEBOOKS_DIR / "README.md").read_text()
    missing = [n for n in NOTEBOOKS if n not in readme]
    assert not missing, f"notebooks/README.md does not describe {missing}"


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=[n.removesuffix(".ipynb") for n in NOTEBOOKS])
def test_notebook_is_committed_without_outputs(notebook):
    """Outputs and execution counts make every run a diff; clear them before committing
    (in Jupyter: Edit > Clear Outputs of All Cells, then save)."""
    nb = nbformat.read(NOTEBOOKS_DIR / notebook, as_version=4)
    nbformat.validate(nb)
    dirty = [
        index
        for index, cell in enumerate(nb.cells)
        if cell.cell_type == "code" and (cell.outputs or cell.execution_count is not None)
    ]
    assert not dirty, f"notebooks/{notebook}: cells {dirty} have outputs or execution counts; clear them"
    assert nb.metadata.get("kernelspec", {}).get("name") == "python3", f"notebooks/{notebook}: kernel spec"
    assert nb.metadata.get("language_info", {}).get("name") == "python", f"notebooks/{notebook}: language"
