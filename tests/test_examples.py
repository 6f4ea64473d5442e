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
def test_example_runs(script):
    result = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / script)],
        cwd=EXAMPLES_DIR.parent,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert result.returncode == 0, (
        f"examples/{script} exited with {result.returncode}\n"
        f"--- stdout ---\n{result.stdout}\n--- stderr ---\n{result.stderr}"
    )


def test_demo_lists_every_example():
    """demo.py (run by `make demo`) runs all the scripts tested above, and only existing ones."""
    demo = runpy.run_path(str(EXAMPLES_DIR / "demo.py"), run_name="demo")
    listed = [script for _, script in demo["EXAMPLES"]]
    assert sorted(listed) == SCRIPTS
