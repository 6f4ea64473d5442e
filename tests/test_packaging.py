"""The installed package describes itself correctly: one version, a licence file that matches
the declared licence, the typing marker, and the metadata a package index shows."""

import importlib.metadata as md
import subprocess
import sys
import tomllib
from pathlib import Path

import splice

ROOT = Path(__file__).parent.parent


def test_one_version_source():
    declared = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["version"]
    assert splice.__version__ == md.version("splice") == declared
    out = subprocess.run([sys.executable, "-m", "splice.cli", "--version"], capture_output=True, text=True)
    assert out.stdout.strip() == f"splice {declared}"


def test_licence_file_matches_the_declared_licence():
    meta = md.metadata("splice")
    assert meta["License-Expression"] == "MIT"
    assert (ROOT / "LICENSE").read_text().startswith("MIT License")


def test_metadata_a_package_index_shows():
    meta = md.metadata("splice")
    assert meta["Author"] or meta["Author-email"]
    assert "interpretability" in meta["Keywords"]
    assert "Typing :: Typed" in meta.get_all("Classifier")
    assert {"embedded", "test", "docs"} <= set(meta.get_all("Provides-Extra"))


def test_the_typing_marker_ships_with_the_package():
    assert (Path(splice.__file__).parent / "py.typed").is_file()
