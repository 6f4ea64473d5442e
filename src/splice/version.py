"""The version of splice: one place, read by the package, its metadata (pyproject) and saved files."""

__version__ = "0.1.0"
