"""Settings of the whole test suite: the unit tests under ``tests/`` and the lessons under ``notebooks/``,
which nbval runs cell by cell.

* **The lessons run in the quick mode** (the kernels that nbval starts inherit ``DIFFUSION_COURSE_MODE``),
  and figures render off screen.
* **The site renders the executions the suite already made.** When nbval has run every code cell of a
  lesson's solution form without an error in the quick mode, the executed notebook (its code cells with the
  outputs nbval received) is stored in the site's execution cache (``docs/_ext/course_execution.py``), and
  ``tests/test_site.py`` is moved to the end of the run. The site build then finds each lesson in the cache
  and executes none a third time. Interactive widgets (the sliders and the progress bars) are left out of
  the stored outputs: a static page cannot run them, and what an ``interact`` call draws is kept as the
  cell's ordinary output. A lesson that failed, or was not run, is executed by the site build itself.
"""
from __future__ import annotations

import contextlib
import copy
import os
import sys
from pathlib import Path
from typing import Dict, List

import pytest

ROOT = Path(__file__).resolve().parent
SOLUTIONS = ROOT / "notebooks" / "solutions"
SITE_TESTS = ROOT / "tests" / "test_site.py"
WIDGET_VIEW = "application/vnd.jupyter.widget-view+json"

os.environ["DIFFUSION_COURSE_MODE"] = "quick"
os.environ.setdefault("MPLBACKEND", "Agg")
if os.environ.get("PYTEST_XDIST_WORKER"):
    # one of several test processes (``make test`` runs pytest-xdist's workers, one per core): each one and the
    # kernels it starts keep to one CPU thread, so the workers never take each other's cores
    # (``utils.cpu_threads``: two processes that both ask for every core both run slower)
    os.environ.setdefault("DIFFUSION_COURSE_THREADS", "1")
    os.environ.setdefault("OMP_NUM_THREADS", "1")


def pytest_collection_modifyitems(session, config, items):
    """Run the site's tests after the lessons, so that the site build reuses their executions."""
    items.sort(key=lambda item: Path(str(item.fspath)) == SITE_TESTS)  # a stable sort: the rest keep order


class _LessonRecord:
    """The outputs nbval received for the code cells of one solution notebook, in order."""

    def __init__(self, n_code_cells: int):
        self.n_code_cells = n_code_cells
        self.outputs: Dict[int, list] = {}
        self.failed = False


_records: Dict[Path, _LessonRecord] = {}


def _nbval_cell(item) -> bool:
    return type(item).__name__ == "IPyNbCell" and hasattr(item, "cell_num") and hasattr(item.parent, "nb")


def _static_outputs(outputs) -> List[dict]:
    """The outputs a static page can show: widget views are dropped, everything else is kept as received."""
    return [out for out in outputs or [] if WIDGET_VIEW not in out.get("data", {})]


@pytest.hookimpl(hookwrapper=True)
def pytest_runtest_makereport(item, call):
    outcome = yield
    if not _nbval_cell(item):
        return
    path = Path(str(item.fspath)).resolve()
    if path.parent != SOLUTIONS:
        return
    report = outcome.get_result()
    record = _records.get(path)
    if record is None:
        n_code = sum(cell.cell_type == "code" for cell in item.parent.nb.cells)
        record = _records[path] = _LessonRecord(n_code)
    if report.failed or report.skipped:
        record.failed = True
        return
    if call.when != "call":
        return
    record.outputs[item.cell_num] = _static_outputs(getattr(item, "test_outputs", None))
    if not record.failed and len(record.outputs) == record.n_code_cells:
        _store_in_site_cache(path, item.parent.nb, record)


def _store_in_site_cache(path: Path, nb, record: _LessonRecord) -> None:
    """Put the executed lesson into the quick mode's execution cache of the site."""
    try:
        from jupyter_cache import get_cache
        from jupyter_cache.base import CacheBundleIn
    except ImportError:  # the site's packages are not installed: nothing to store
        return
    sys.path.insert(0, str(ROOT / "docs" / "_ext"))
    try:
        from course_execution import cache_folder
    finally:
        sys.path.remove(str(ROOT / "docs" / "_ext"))
    executed = copy.deepcopy(nb)
    count = 0
    for cell in executed.cells:
        if cell.cell_type != "code":
            continue
        count += 1
        cell.execution_count = count
        cell.outputs = copy.deepcopy(record.outputs[count - 1])
        for out in cell.outputs:
            if out.get("output_type") == "execute_result":
                out["execution_count"] = count
    folder = cache_folder(ROOT, "quick")
    folder.mkdir(parents=True, exist_ok=True)
    uri = str(ROOT / "docs" / "lessons" / path.name)
    with _exclusive(folder / ".nbval-store.lock"):  # parallel workers write one cache (an SQLite file) in turn
        cache = get_cache(str(folder))
        cache.cache_notebook_bundle(CacheBundleIn(executed, uri, data={"executed_by": "nbval"}),
                                    check_validity=False, overwrite=True)


@contextlib.contextmanager
def _exclusive(lock_path: Path):
    """Hold an exclusive lock on ``lock_path`` (where the platform offers ``fcntl``; elsewhere nothing)."""
    try:
        import fcntl
    except ImportError:
        yield
        return
    with open(lock_path, "a") as handle:
        fcntl.flock(handle, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(handle, fcntl.LOCK_UN)
