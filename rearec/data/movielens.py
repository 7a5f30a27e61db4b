"""MovieLens-100K, as shipped inside the ``recbole`` wheel.

The recbole 1.2.1 wheel carries ``recbole/dataset_example/ml-100k/ml-100k.inter`` (100,000 ratings by
943 users on 1,682 movies, Unix-second timestamps, ratings 1-5). We only read that file: recbole is
never imported (its imports need an older numpy), nothing is downloaded, and the file is never
copied into this repository (the MovieLens license does not allow redistribution).
"""
from __future__ import annotations

import importlib.util
import site
import sys
from pathlib import Path

from rearec.data.errors import DataError

__all__ = ["movielens_100k_path", "ML100K_NAME", "INSTALL_HINT"]

#: The name ``load_dataset`` and the command line accept for this dataset.
ML100K_NAME = "ml-100k"
INSTALL_HINT = ("MovieLens-100K comes from the recbole wheel: "
                "pip install --no-deps recbole==1.2.1")
_RELATIVE = Path("dataset_example") / "ml-100k" / "ml-100k.inter"


def _package_dirs() -> list[Path]:
    """Directories that may hold the recbole package, found without importing it."""
    dirs: list[Path] = []
    try:
        # For a top-level name, find_spec only asks the path finders: recbole/__init__ is not run.
        spec = importlib.util.find_spec("recbole")
    except (ImportError, ValueError):
        spec = None
    if spec is not None and spec.submodule_search_locations:
        dirs.extend(Path(p) for p in spec.submodule_search_locations)
    roots: list[str] = list(sys.path)
    try:
        roots += site.getsitepackages()
    except AttributeError:  # some embedded interpreters lack it
        pass
    try:
        roots.append(site.getusersitepackages())
    except AttributeError:
        pass
    dirs.extend(Path(r or ".") / "recbole" for r in roots)
    return dirs


def movielens_100k_path() -> Path:
    """Path of ``ml-100k.inter`` inside the installed recbole wheel.

    Raises DataError with the install command when the wheel is not installed.
    """
    for d in _package_dirs():
        candidate = d / _RELATIVE
        if candidate.is_file():
            return candidate.resolve()
    raise DataError(INSTALL_HINT)
