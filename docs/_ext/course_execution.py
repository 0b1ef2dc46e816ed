"""Executes the lessons for the site, several at once, into a jupyter-cache that later builds reuse.

MyST-NB runs in its ``cache`` mode: a lesson whose code cells are already in the cache is not executed
again. This extension fills that cache before Sphinx reads any page, running the lessons that are missing
in parallel (one kernel per worker, the CPU threads shared out between them), and stops the build with
each failing lesson's traceback if any cell raises.

The cache folder is ``build/jupyter-cache/<mode>-<package hash>`` (``COURSE_SITE_CACHE`` moves
``build/jupyter-cache``). jupyter-cache keys each entry by the lesson's code cells; the folder's name adds
the run mode and a hash of the package's code and shipped models, which the outputs depend on too. So a
rebuild after editing prose or the site retrains nothing, an edited lesson is executed again alone, and a
change to the package executes every lesson again in a fresh folder.
"""
from __future__ import annotations

import hashlib
import multiprocessing
import os
import re
import shutil
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor, as_completed
from pathlib import Path
from typing import List, Optional, Tuple

import nbformat
from sphinx.application import Sphinx
from sphinx.errors import SphinxError
from sphinx.util import logging

logger = logging.getLogger(__name__)
ANSI_RE = re.compile(r"\x1b\[[0-9;]*m")  # the colours of IPython's tracebacks


class LessonExecutionError(SphinxError):
    category = "Lesson execution error"


def package_hash(package: Path) -> str:
    """A short hash of every file of the package (code and shipped models), caches excluded."""
    h = hashlib.sha256()
    for path in sorted(package.rglob("*")):
        if path.is_file() and "__pycache__" not in path.parts and path.suffix != ".pyc":
            h.update(path.relative_to(package).as_posix().encode())
            h.update(path.read_bytes())
    return h.hexdigest()[:12]


def cache_folder(root: Path, mode: str) -> Path:
    """Where the executed lessons of ``mode`` are cached for the package as it is now."""
    base = Path(os.environ.get("COURSE_SITE_CACHE") or root / "build" / "jupyter-cache")
    return base / f"{mode}-{package_hash(root / 'diffusion_course')}"


def _execute(path: str, timeout: Optional[int], threads: int) -> Tuple[str, str, float, Optional[str]]:
    """Run one lesson in a fresh kernel inside an empty folder; returns (path, executed notebook as
    JSON, seconds, what went wrong or None). Runs in a worker process of its own."""
    import traceback

    from jupyter_cache.executors.utils import single_nb_execution

    os.environ["OMP_NUM_THREADS"] = str(threads)  # the kernel inherits it, and so does torch in it
    # the kernel's own log lines (stderr) go to a file, shown only when the lesson fails
    log = tempfile.TemporaryFile("w+")
    os.dup2(log.fileno(), 2)
    nb = nbformat.read(path, as_version=4)
    start = time.perf_counter()
    try:
        with tempfile.TemporaryDirectory(prefix="lesson-") as cwd:
            result = single_nb_execution(nb, cwd=cwd, timeout=timeout, allow_errors=False)
        error, seconds = result.exc_string, result.time
    except Exception:  # the kernel died, or did not start
        error, seconds = traceback.format_exc(), time.perf_counter() - start
    if error:
        log.seek(0)
        kernel_log = log.read().strip()
        if kernel_log:
            error += "\nwhat the kernel wrote to stderr:\n" + kernel_log[-3000:]
    return path, nbformat.writes(nb), seconds, error


def execute_missing(app: Sphinx) -> None:
    """Execute, in parallel, every lesson page that the cache lacks, and cache what succeeded."""
    from jupyter_cache import get_cache
    from jupyter_cache.base import CacheBundleIn

    if app.config.nb_execution_mode != "cache":
        return
    prune_old_caches(Path(app.config.nb_execution_cache_path))
    cache = get_cache(app.config.nb_execution_cache_path)
    missing: List[Path] = []
    for path in sorted((Path(app.srcdir) / "lessons").glob("*.ipynb")):
        try:
            cache.match_cache_notebook(nbformat.read(path, as_version=4))
        except KeyError:
            missing.append(path)
    if not missing:
        logger.info("[course] every lesson is in the execution cache %s", app.config.nb_execution_cache_path)
        return
    workers = max(1, min(len(missing), app.config.course_execution_workers or os.cpu_count() or 1))
    threads = max(1, (os.cpu_count() or 1) // workers)
    timeout = app.config.nb_execution_timeout
    timeout = None if timeout is None or timeout < 0 else timeout
    logger.info("[course] executing %d lesson(s) in the %s mode, %d at a time (%d CPU thread(s) each)",
                len(missing), app.config.course_run_mode, workers, threads)
    failed = []
    start = time.perf_counter()
    with ProcessPoolExecutor(workers, mp_context=multiprocessing.get_context("spawn")) as pool:
        jobs = [pool.submit(_execute, str(p), timeout, threads) for p in missing]
        for job in as_completed(jobs):
            path, text, seconds, error = job.result()
            name = Path(path).name
            if error:
                failed.append(f"{name}:\n{ANSI_RE.sub('', error)}")
                logger.info("[course] %s failed after %.1f s", name, seconds)
                continue
            cache.cache_notebook_bundle(CacheBundleIn(nbformat.reads(text, as_version=4), path,
                                                      data={"execution_seconds": seconds}),
                                        check_validity=False, overwrite=True)
            logger.info("[course] %s executed in %.1f s", name, seconds)
    logger.info("[course] lessons executed in %.1f s in all", time.perf_counter() - start)
    if failed:
        raise LessonExecutionError("a lesson raised an error while the site executed it "
                                   f"({app.config.course_run_mode} mode):\n\n" + "\n\n".join(failed))


def prune_old_caches(folder: Path) -> None:
    """Remove the cache folders of the same mode made for earlier versions of the package."""
    mode = folder.name.rsplit("-", 1)[0]
    if folder.parent.is_dir():
        for other in folder.parent.glob(f"{mode}-*"):
            if other != folder and other.is_dir() and other.name.rsplit("-", 1)[0] == mode:
                shutil.rmtree(other, ignore_errors=True)


def setup(app: Sphinx) -> dict:
    app.add_config_value("course_execution_workers", 0, "")
    # after course_lessons has written the lesson pages (priority 400)
    app.connect("builder-inited", execute_missing, priority=600)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
