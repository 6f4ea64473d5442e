"""Every example script runs to completion: each asserts its own claims against the real model."""

import os
import runpy
import subprocess
import sys
from pathlib import Path

import pytest

EXAMPLES_DIR = Path(__file__).resolve().parents[1] / "examples"
SCRIPTS = sorted(p.name for p in EXAMPLES_DIR.glob("*.py") if p.name != "tour.py")
# The sweeps on the real model run on fewer prompts here to keep the suite short.
ARGS = {
    "ioi_head_sweep.py": ["out", "--prompts", "6"],
    "ioi_patching.py": ["out", "--prompts", "3"],
    "train_sae.py": ["out", "--quick"],
    "ioi_circuit.py": ["out", "--prompts", "2", "--steps", "2", "--quick"],
}


@pytest.mark.real
@pytest.mark.parametrize("script", SCRIPTS)
def test_example_runs(script, tmp_path):
    # Run from a scratch folder: examples that save figures write relative to the working directory.
    result = subprocess.run(
        [sys.executable, str(EXAMPLES_DIR / script), *ARGS.get(script, [])],
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


def test_tour_runs_only_tested_examples():
    """tour.py lists scripts that exist, so each is also tested above."""
    tour = runpy.run_path(str(EXAMPLES_DIR / "tour.py"), run_name="tour")
    listed = [script for _, script in tour["EXAMPLES"]]
    assert listed and set(listed) <= set(SCRIPTS), f"tour.py lists {listed}; examples are {SCRIPTS}"


def test_make_demo_runs_the_main_job():
    makefile = (EXAMPLES_DIR.parent / "Makefile").read_text()
    assert "examples/ioi_head_sweep.py" in makefile.split("demo: install", 1)[1].split("\n\n", 1)[0]
