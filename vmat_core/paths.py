"""Where VMAT Planner keeps its data.

Everything the product generates or reads lives under one data directory so that a case or run id can be
checked to stay inside it. The directory is ``$VMAT_DATA_DIR`` when set, else ``data/`` beside the package.
"""

from __future__ import annotations

import os
from pathlib import Path

DATA_DIR_ENV = "VMAT_DATA_DIR"
_REPO_ROOT = Path(__file__).resolve().parent.parent


def data_dir() -> Path:
    """The root of all generated content (case cache, runs, jobs)."""
    value = os.environ.get(DATA_DIR_ENV)
    return Path(value).expanduser().resolve() if value else (_REPO_ROOT / "data").resolve()


def portpy_data_dir() -> Path:
    """PortPy patient folders (``<data>/portpy/<case_id>/``), as PortPy's DataExplorer expects them."""
    return data_dir() / "portpy"


def runs_dir() -> Path:
    return data_dir() / "runs"


def cache_dir() -> Path:
    return data_dir() / "cache"


def jobs_dir() -> Path:
    return data_dir() / "jobs"
