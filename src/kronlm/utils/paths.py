"""Where kronlm finds local copies of public data and the models shipped inside PyPI packages.

Library code knows no machine layout: the data folder is what the caller passes, else what
``$KRONLM_DATA_DIR`` names, else there is none. The command line and the benchmarks add one
default of their own, :func:`default_data_dir` (the repository's example data beside a checkout).
"""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path

DATA_DIR_ENV = "KRONLM_DATA_DIR"
# The repository's example data: ../shared/data beside a checkout (its README lists the files).
EXAMPLE_DATA_DIR = Path("..") / "shared" / "data"


def data_dir(explicit: str | os.PathLike | None = None) -> Path | None:
    """Return the folder of local copies of public data, or None when none is configured.

    The folder holds copies laid out like the public originals, e.g.
    ``wikitext-2-raw/wiki.valid.raw`` and ``glue/SST-2/dev.tsv``. Nothing is probed: neither the
    working directory nor the location of this package.

    Args:
        explicit: a folder given by the caller (``--data-dir``); wins over the environment.

    Returns:
        ``explicit`` if given, else ``$KRONLM_DATA_DIR`` if set and non-empty, else None.

    Raises:
        NotADirectoryError: the chosen folder does not exist or is not a folder (the message names
            it and where it came from).
    """
    if explicit is not None:
        folder, origin = Path(explicit).expanduser(), "data directory"
    elif os.environ.get(DATA_DIR_ENV):
        folder, origin = Path(os.environ[DATA_DIR_ENV]).expanduser(), f"${DATA_DIR_ENV}"
    else:
        return None
    if not folder.is_dir():
        raise NotADirectoryError(f"{origin} {folder} is not a folder")
    return folder


def default_data_dir() -> Path | None:
    """The data folder of the command line and the benchmarks when none is given:
    ``$KRONLM_DATA_DIR``, else ``../shared/data`` relative to the working directory when that folder
    exists (the repository's example data), else None. Library functions never use it."""
    if os.environ.get(DATA_DIR_ENV):
        return Path(os.environ[DATA_DIR_ENV])
    return EXAMPLE_DATA_DIR.resolve() if EXAMPLE_DATA_DIR.is_dir() else None


def package_dir(import_name: str) -> Path | None:
    """Folder of an installed package without importing it (some model packages fail to import)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent
