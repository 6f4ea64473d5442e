"""Which transformers releases splice is tested with, read from splice's own installed metadata
(the range in pyproject.toml, so it is written down once). Running on a release outside it is said
once, at import: transformers renames arguments between minor releases, and a rename that splice
has not seen could make an edit land on the wrong tokens."""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.requirements import Requirement


class UntestedVersionWarning(UserWarning):
    """transformers is outside the range splice's test suite has passed on."""


def tested_transformers() -> str | None:
    """The version specifier splice declares for transformers (None if splice is not installed)."""
    try:
        requirements = metadata.requires("splice") or []
    except metadata.PackageNotFoundError:
        return None
    for line in requirements:
        requirement = Requirement(line)
        if requirement.name == "transformers" and not requirement.marker:
            return str(requirement.specifier)
    return None


def check_transformers(version: str) -> bool:
    """Warn if `version` is outside the tested range; True if it is inside."""
    spec = tested_transformers()
    if spec is None:
        return True
    from packaging.specifiers import SpecifierSet

    if SpecifierSet(spec).contains(version, prereleases=True):
        return True
    warnings.warn(
        f"splice is tested with transformers{spec}; this is transformers {version}. Run `make test-latest` "
        "in a clone of splice and report the result (pass or fail) as an issue, so the range can be widened.",
        UntestedVersionWarning,
        stacklevel=2,
    )
    return False
