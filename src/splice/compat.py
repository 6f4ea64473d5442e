"""Which transformers releases splice is tested with, read from splice's own installed metadata
(the range in pyproject.toml, so it is written down once). Running on a release outside it is said
once, at import: transformers renames arguments between minor releases, and a rename that splice
has not seen could make an edit land on the wrong tokens."""

from __future__ import annotations

import warnings
from importlib import metadata

from packaging.requirements import Requirement


class UntestedVersionWarning(UserWarning):
    """The installed transformers is outside the range splice's test suite has passed on.

    Issued once, when splice is imported. splice may well work, but transformers renames
    arguments between minor releases and a rename splice has not seen could move an edit; run
    `make test-latest` in a clone of splice to find out, and report the result. Silence it with
    `warnings.filterwarnings("ignore", category=splice.UntestedVersionWarning)`.

    Example:
        >>> import warnings
        >>> with warnings.catch_warnings(record=True) as caught:
        ...     warnings.simplefilter("always")
        ...     inside = check_transformers("1.0.0")
        >>> inside, caught[0].category.__name__
        (False, 'UntestedVersionWarning')
    """


def tested_transformers() -> str | None:
    """The version specifier splice declares for transformers, from its installed metadata.

    Returns:
        A specifier such as `'<5.25,>=5.23'`, or None if splice is not installed as a
        distribution (e.g. run from a bare source tree) or declares no unconditional
        transformers requirement.

    Example:
        >>> spec = tested_transformers()
        >>> spec is None or ">=" in spec
        True
    """
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
    """Warn (`UntestedVersionWarning`) if a transformers version is outside the tested range.

    Args:
        version: A transformers version string, e.g. `transformers.__version__`. Pre-releases
            count as inside the range they fall in.

    Returns:
        True if the version is inside the tested range (or no range is known); False after
        warning otherwise.

    Example:
        >>> import transformers
        >>> spec = tested_transformers()
        >>> check_transformers("1.0.0") if spec is None else True  # no range known: accepted
        True
    """
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
