"""Shared fixtures.

The synthetic case is built once into the project's data directory (``make test`` builds it before pytest) and
reused; everything a test writes (runs, jobs, caches) goes to a per-session temporary data directory whose
``portpy`` folder links to the built case, so tests never touch a user's runs.
"""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

from vmat_core import paths

_REAL_PORTPY_DIR = paths.portpy_data_dir()


@pytest.fixture(scope="session")
def portpy_dir() -> Path:
    """The folder holding PortPy patient folders, with the synthetic case built."""
    from vmat_core.phantom import ensure_phantom

    return ensure_phantom(_REAL_PORTPY_DIR).parent


@pytest.fixture(scope="session")
def case_dir(portpy_dir: Path) -> Path:
    from vmat_core.phantom import CASE_ID

    return portpy_dir / CASE_ID


@pytest.fixture(scope="session", autouse=True)
def session_data_dir(tmp_path_factory) -> Path:
    """A fresh data directory for the whole session (runs, jobs, cache); ``portpy`` links to the real cases."""
    root = tmp_path_factory.mktemp("vmat-data")
    (root / "portpy").symlink_to(_REAL_PORTPY_DIR, target_is_directory=True)
    old = os.environ.get(paths.DATA_DIR_ENV)
    os.environ[paths.DATA_DIR_ENV] = str(root)
    yield root
    if old is None:
        os.environ.pop(paths.DATA_DIR_ENV, None)
    else:
        os.environ[paths.DATA_DIR_ENV] = old


@pytest.fixture()
def runs_root(tmp_path: Path) -> Path:
    """An empty run store root for one test."""
    root = tmp_path / "runs"
    root.mkdir()
    return root


@pytest.fixture(scope="session")
def browser_type_launch_args(browser_type_launch_args):
    """The system Chromium for the browser tests, without the background traffic this closed network refuses."""
    return {
        **browser_type_launch_args,
        "executable_path": shutil.which("chromium"),
        "args": ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"],
    }
