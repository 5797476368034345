"""Where kronlm finds the local copies of public data and the models shipped inside PyPI packages."""

from __future__ import annotations

import importlib.util
import os
from pathlib import Path


def shared_data_dir() -> Path | None:
    """Return the folder of local public data (WikiText-2, GLUE), or None when there is none.

    Looks at ``$KRONLM_DATA_DIR``, then ``../shared/data`` from the working directory and from the
    repository that holds this package (an editable install).
    """
    candidates = []
    if os.environ.get("KRONLM_DATA_DIR"):
        candidates.append(Path(os.environ["KRONLM_DATA_DIR"]))
    candidates.append(Path.cwd().parent / "shared" / "data")
    candidates.append(Path(__file__).resolve().parents[4] / "shared" / "data")
    for cand in candidates:
        if cand.is_dir():
            return cand
    return None


def package_dir(import_name: str) -> Path | None:
    """Folder of an installed package without importing it (some model packages fail to import)."""
    spec = importlib.util.find_spec(import_name)
    if spec is None or spec.origin is None:
        return None
    return Path(spec.origin).parent
