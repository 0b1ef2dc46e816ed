"""The lesson pages and the front page's lesson table.

Before Sphinx looks for its sources, every lesson source ``notebooks/solutions/NN_topic.ipynb`` is copied
to ``docs/lessons/NN_topic.ipynb`` (a build folder that git ignores) with one markdown cell added under the
title: the "Open in Colab" button for the learner's form ``notebooks/NN_topic.ipynb`` and a link to that
form on GitHub. Nothing else of the lesson changes, so the execution cache, which hashes the code cells,
sees the same notebook as the repository holds.

The ``lesson-table`` directive writes the front page's table from ``exercises.lesson_table``, the function
that writes the README's table: the lessons, their titles and their Colab links have one source.
"""
from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Dict, List

from docutils import nodes
from docutils.statemachine import StringList
from sphinx.application import Sphinx
from sphinx.errors import ExtensionError
from sphinx.util.docutils import SphinxDirective

from diffusion_course import exercises

# the site's own "Open in Colab" badge (docs/_static), so that every page shows without the network
BADGE = "_static/open-in-colab.svg"
# one row of exercises.lesson_table: | title | [NN.ipynb](learner) | [solutions](source) | [![...](badge)](colab) |
ROW_RE = re.compile(r"^\| (?P<title>.+?) \| \[(?P<file>[^\]]+)\]\((?P<learner>[^)]+)\) \| "
                    r"\[solutions\]\((?P<source>[^)]+)\) \| \[!\[[^\]]*\]\([^)]+\)\]\((?P<colab>[^)]+)\) \|$")


def lesson_rows(root: Path) -> List[Dict[str, str]]:
    """The README's lesson table, parsed: one dict per lesson with its title, file name, learner path,
    source path and Colab URL."""
    table = exercises.lesson_table(root, exercises.repository_url(root))
    rows = []
    for line in table.splitlines()[2:]:
        m = ROW_RE.match(line)
        if not m:
            raise ExtensionError(f"the site cannot read this row of exercises.lesson_table: {line!r}; "
                                 "update ROW_RE in docs/_ext/course_lessons.py with the table's new layout")
        rows.append(m.groupdict())
    if not rows:
        raise ExtensionError("exercises.lesson_table lists no lesson (is notebooks/solutions/ empty?)")
    return rows


def banner_cell(row: Dict[str, str], url: str, mode: str) -> dict:
    """The markdown cell added under a lesson's title on its page."""
    learner_on_github = f"{url}/blob/main/{row['learner']}"
    text = (f"[![Open in Colab](../{BADGE})]({row['colab']})\n\n"
            f"*This page is the lesson with its solutions written out, executed in the `{mode}` run mode. "
            f"To work through it yourself, open the learner's form [`{row['learner']}`]({learner_on_github}) "
            "on Colab (the button above) or in JupyterLab after `make lab`: there each exercise is a stub for "
            "you to fill in, and its checker tells you whether your answer is right.*")
    return {"cell_type": "markdown", "id": "site-banner", "metadata": {},
            "source": text.splitlines(keepends=True)}


def write_if_changed(path: Path, text: str) -> bool:
    """Write ``text`` unless the file already holds it (so Sphinx re-reads only what changed)."""
    if path.is_file() and path.read_text() == text:
        return False
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    return True


def copy_lessons(app: Sphinx) -> None:
    """Copy every lesson source into ``docs/lessons/``, with its Colab banner, and drop stale copies."""
    root = Path(app.config.course_root)
    url = exercises.repository_url(root)
    out = Path(app.srcdir) / "lessons"
    wanted = set()
    for row in lesson_rows(root):
        src = root / row["source"]
        nb = json.loads(src.read_text())
        nb["cells"].insert(1, banner_cell(row, url, app.config.course_run_mode))
        name = Path(row["source"]).name
        wanted.add(name)
        write_if_changed(out / name, json.dumps(nb, indent=1, ensure_ascii=False) + "\n")
    for old in out.glob("*.ipynb"):
        if old.name not in wanted:
            old.unlink()


class LessonTable(SphinxDirective):
    """``lesson-table``: the table of lessons, each linked to its page, its learner's form and Colab."""

    has_content = False

    def run(self) -> List[nodes.Node]:
        root = Path(self.config.course_root)
        url = exercises.repository_url(root)
        lines = ["| lesson | learner's form | Colab |", "| --- | --- | --- |"]
        for row in lesson_rows(root):
            stem = Path(row["source"]).stem
            title = row["title"].replace("`", "")
            lines.append(f"| {{doc}}`{title} </lessons/{stem}>` | [{row['file']}]({url}/blob/main/{row['learner']}) "
                         f"| [![Open in Colab](/{BADGE})]({row['colab']}) |")
        container = nodes.container(classes=["lesson-table"])
        self.state.nested_parse(StringList(lines, source="exercises.lesson_table"), self.content_offset, container)
        return [container]


def setup(app: Sphinx) -> dict:
    app.add_config_value("course_root", "", "env")
    app.add_config_value("course_run_mode", "quick", "env")
    app.connect("builder-inited", copy_lessons, priority=400)
    app.add_directive("lesson-table", LessonTable)
    return {"parallel_read_safe": True, "parallel_write_safe": True}
