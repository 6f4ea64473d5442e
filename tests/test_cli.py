"""`splice sites` on the embedded model, run as a user would."""

import subprocess
import sys

import pytest


@pytest.mark.real
def test_sites_lists_names_and_shapes():
    out = subprocess.run([sys.executable, "-m", "splice.cli", "sites", "--filter", "blocks.29."], capture_output=True, text=True, timeout=300)
    assert out.returncode == 0, out.stderr
    assert "blocks.29.attn.k     [batch, pos, 3, 64]" in out.stdout
    assert "blocks.28." not in out.stdout


def test_errors_are_reported_not_raised():
    out = subprocess.run([sys.executable, "-m", "splice.cli", "sites", "/nonexistent/model/dir"], capture_output=True, text=True, timeout=300)
    assert out.returncode != 0
