"""Scaffolding shared by the bench scripts (imported as ``_common``: a script's own folder is on ``sys.path``)."""

from __future__ import annotations

import os
import shutil
import statistics
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from pathlib import Path


@contextmanager
def scratch_data_dir(prefix: str, *, link_cases: bool = True, ensure_phantom: bool = False) -> Iterator[Path]:
    """A new data directory under the system's temporary folder, made ``VMAT_DATA_DIR`` while the block runs.

    Runs, caches and jobs then go to the scratch folder, so a bench never touches the user's. With
    ``link_cases`` its ``portpy`` folder links to the cases of the data directory in effect before, which are
    read in place; ``ensure_phantom`` first builds the synthetic case there if it is missing (about a minute).
    On exit the previous ``VMAT_DATA_DIR`` comes back and the folder is removed.
    """
    # Imported here: the scripts put the repository on sys.path only after importing this module.
    from vmat_core import paths, phantom

    cases = None
    if link_cases:
        if ensure_phantom:
            phantom.ensure_phantom(paths.portpy_data_dir())
        cases = paths.portpy_data_dir().resolve()
    previous = os.environ.get(paths.DATA_DIR_ENV)
    tmp = Path(tempfile.mkdtemp(prefix=prefix))
    try:
        if cases is not None:
            (tmp / "portpy").symlink_to(cases, target_is_directory=True)
        os.environ[paths.DATA_DIR_ENV] = str(tmp)
        yield tmp
    finally:
        if previous is None:
            os.environ.pop(paths.DATA_DIR_ENV, None)
        else:
            os.environ[paths.DATA_DIR_ENV] = previous
        shutil.rmtree(tmp, ignore_errors=True)


def median_time(fn: Callable[[], object], repeat: int = 1) -> tuple[float, object]:
    """(median wall time in seconds over ``repeat`` calls of ``fn``, the last call's result)."""
    times, result = [], None
    for _ in range(repeat):
        t = time.perf_counter()
        result = fn()
        times.append(time.perf_counter() - t)
    return statistics.median(times), result
