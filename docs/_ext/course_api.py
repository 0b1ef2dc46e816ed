"""The API reference: one page per module of the package, written by autodoc from the docstrings.

The pages are generated into ``docs/api/`` (ignored by git) from the modules that exist, so a new module
appears without anyone editing the site. Each public docstring names the lesson that teaches it
("Lesson: 04_unet", "Lessons: 03_training_and_sampling and 04_unet"); those names become links to the
lessons' pages.
"""
from __future__ import annotations

import importlib
import inspect
import io
import pkgutil
import re
from pathlib import Path
from typing import List

from docutils import nodes
from docutils.core import publish_doctree
from sphinx.application import Sphinx
from sphinx.util import logging

from course_lessons import write_if_changed

# the pattern tests/test_repo.py reads the lesson names with
LESSONS_RE = re.compile(r"([Ll]essons?:?\s+)((?:\d\d_\w+(?:,\s*|\s+and\s+)?)+)")
NAME_RE = re.compile(r"\d\d_\w+")
# a Sphinx role such as :class:`UNet` or :math:`\bar\alpha_t`
ROLE_RE = re.compile(r":[\w.+-]+(?::[\w.+-]+)*:`([^`]*)`")

logger = logging.getLogger(__name__)


def public_modules(package: str = "diffusion_course") -> List[str]:
    """Every importable module of the package whose name has no part starting with an underscore."""
    pkg = importlib.import_module(package)
    names = [package]
    for info in pkgutil.walk_packages(pkg.__path__, f"{package}."):
        if not any(part.startswith("_") for part in info.name.split(".")[1:]):
            names.append(info.name)
    return sorted(names)


def summary(module: str) -> str:
    """The first sentence of a module's docstring, on one line."""
    doc = inspect.getdoc(importlib.import_module(module)) or ""
    first = doc.split("\n\n", 1)[0].replace("\n", " ").strip()
    return first


def write_api_pages(app: Sphinx) -> None:
    """Write ``api/index.rst`` and one ``api/<module>.rst`` per module; remove pages of gone modules."""
    out = Path(app.srcdir) / "api"
    modules = public_modules()
    index = ["API reference", "=============", "",
             "The package ``diffusion_course`` holds what the lessons build, one idea per module. Every "
             "function and class names the lesson that teaches it, and the name links to that lesson.", "",
             ".. toctree::", "   :hidden:", ""]
    index += [f"   {m}" for m in modules]
    index.append("")
    for m in modules:
        first = summary(m)
        # a summary that plain reStructuredText cannot read is left out here (its page shows it)
        index.append(f"* :doc:`{m}`" + (f": {first}" if first and not rst_problems(first) else ""))
    write_if_changed(out / "index.rst", "\n".join(index) + "\n")
    wanted = {"index.rst"}
    for m in modules:
        # :ignore-module-all: documents each object once, on the page of the module that defines it
        # (diffusion_course.nn re-exports its submodules' classes in __all__)
        page = [m, "=" * len(m), "", f".. automodule:: {m}", "   :members:", "   :ignore-module-all:",
                "   :show-inheritance:", ""]
        wanted.add(f"{m}.rst")
        write_if_changed(out / f"{m}.rst", "\n".join(page))
    for old in out.glob("*.rst"):
        if old.name not in wanted:
            old.unlink()


def rst_problems(text: str) -> List[str]:
    """What plain docutils reports (warnings and worse) about a docstring, Sphinx roles aside."""
    plain = ROLE_RE.sub(lambda m: "``" + m.group(1).strip("`") + "``" if m.group(1).strip("`") else "", text)
    settings = {"report_level": 2, "halt_level": 5, "warning_stream": io.StringIO(),
                "file_insertion_enabled": False, "raw_enabled": False}
    try:
        doctree = publish_doctree(plain, settings_overrides=settings)
    except Exception:  # leave the judgement to Sphinx, which reports the problem itself
        return []
    # messages from transforms (an undefined |substitution|) leave only a "problematic" node behind
    return ([m.astext() for m in doctree.findall(nodes.system_message) if m["level"] >= 2]
            + [p.astext() for p in doctree.findall(nodes.problematic)])


def link_lessons(app: Sphinx, what: str, name: str, obj, options, lines: List[str]) -> None:
    """autodoc-process-docstring: turn each lesson name after "Lesson:" into a link to its page.

    A docstring listed in ``course_docstrings_shown_verbatim`` that is not valid reStructuredText is shown
    as written (a literal block), followed by its lesson links; any other invalid docstring is left to
    Sphinx, whose warning fails the build."""
    lessons = {p.stem for p in (Path(app.srcdir) / "lessons").glob("*.ipynb")}
    text = "\n".join(lines)

    def to_links(m: re.Match) -> str:
        names = NAME_RE.sub(lambda n: f":doc:`{n.group(0)} </lessons/{n.group(0)}>`"
                            if n.group(0) in lessons else n.group(0), m.group(2))
        return m.group(1) + names

    if name in app.config.course_docstrings_shown_verbatim and text.strip() and rst_problems(text):
        logger.info("[course] the docstring of %s is not valid reStructuredText; shown as written", name)
        links = [to_links(m) for m in LESSONS_RE.finditer(text)]
        lines[:] = ["::", ""] + ["    " + ln for ln in lines] + [""] + [" ".join(links).replace("\n", " ")]
        return
    new = LESSONS_RE.sub(to_links, text)
    if new != text:
        lines[:] = new.split("\n")


def setup(app: Sphinx) -> dict:
    app.add_config_value("course_docstrings_shown_verbatim", [], "env")
    app.connect("builder-inited", write_api_pages, priority=450)
    app.connect("autodoc-process-docstring", link_lessons)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
