"""Where a method finds what ``kvsqueeze calibrate`` fitted for a model: an explicit file, else the
user's (under ``$KVSQUEEZE_HOME``), else the one shipped with the package."""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path


def locate_calibrated(
    explicit: str, candidates: Sequence[Path], error: type[Exception], what: str, model: str, remedy: str
) -> Path:
    """``explicit`` if given (``error`` when it is no file), else the first existing candidate;
    when none exists, ``error`` names ``what`` was looked for, for which ``model``, where, and the
    ``remedy``."""
    if explicit:
        if not Path(explicit).is_file():
            raise error(f"{what} {explicit!r} does not exist")
        return Path(explicit)
    for path in candidates:
        if path.is_file():
            return path
    looked = ", ".join(str(path) for path in candidates)
    raise error(f"no {what} for {model!r} (looked in {looked}); {remedy}")
