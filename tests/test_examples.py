"""Every example script runs to completion: each asserts its own claims against the real model."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES_DIR.glob("*.py") if p.name != "demo.py")


@pytest.mark.real
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path):
    # Run from a scratch folder: examples that save figures write relative to the working directory.
    result = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / script)],
        cwd=tmp_path,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"examples/{script} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def test_demo_runs_only_tested_examples():
    """demo.py (what `make demo` runs) lists scripts that exist, so each is also tested above."""
    demo = runpy.run_path(str(EXAMPLES_DIR / "demo.py"), run_name="demo")
    listed = [script for _, script in demo["EXAMPLES"]]
    assert listed and set(listed) <= set(SCRIPTS), f"demo.py lists {listed}; examples are {SCRIPTS}"
