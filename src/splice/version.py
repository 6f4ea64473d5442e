"""The installed version of splice, read from the package metadata (`importlib.metadata`), whose
one source is `version` in pyproject.toml: a release bump edits one line, and saved files and
`splice --version` can never disagree with what pip says is installed."""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("splice")
except PackageNotFoundError:  # imported from a source tree that was never installed
    __version__ = "0+unknown"
