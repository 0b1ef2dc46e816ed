import json
import re
import shutil
from pathlib import Path

import pytest

from diffusion_course import exercises
from diffusion_course.exercises import ExerciseFormatError

ROOT = Path(__file__).resolve().parents[1]
re_id = re.compile(r"[a-zA-Z0-9_-]{1,64}")  # what nbformat 4.5 allows as a cell id

SOLUTION_CELL = '''# Exercise 9.1: add one
def add_one(x):
    """x: (B,) -> (B,)"""
    ### BEGIN SOLUTION
    y = x + 1
    return y
    ### END SOLUTION
'''


def _nb(cells):
    return {"cells": cells, "metadata": {}, "nbformat": 4, "nbformat_minor": 5}


def _code(src, outputs=None, count=None):
    return {"cell_type": "code", "id": "c", "metadata": {}, "source": src, "outputs": outputs or [],
            "execution_count": count}


def test_stub_replaces_the_block_at_its_indentation():
    new, n = exercises.stub_solutions(SOLUTION_CELL)
    assert n == 1
    assert "y = x + 1" not in new and "return y" not in new
    assert '    raise NotImplementedError("Exercise 9.1: add one")' in new.splitlines()
    ns = {}
    exec(new, ns)
    with pytest.raises(NotImplementedError, match="Exercise 9.1: add one"):
        ns["add_one"](1)
    # the solution form itself runs
    exec(SOLUTION_CELL, ns)
    assert ns["add_one"](1) == 2


def test_stub_errors_name_the_problem():
    with pytest.raises(ExerciseFormatError, match="without '### END SOLUTION'"):
        exercises.stub_solutions("# Exercise 1.1: x\n### BEGIN SOLUTION\nx = 1\n")
    with pytest.raises(ExerciseFormatError, match="without '### BEGIN SOLUTION'"):
        exercises.stub_solutions("x = 1\n### END SOLUTION\n")
    with pytest.raises(ExerciseFormatError, match="Exercise N.M"):
        exercises.stub_solutions("### BEGIN SOLUTION\nx = 1\n### END SOLUTION\n")
    with pytest.raises(ExerciseFormatError, match="nested"):
        exercises.stub_solutions("# Exercise 1.1: x\n### BEGIN SOLUTION\n### BEGIN SOLUTION\n### END SOLUTION\n")
    assert exercises.stub_solutions("x = 1") == ("x = 1", 0)


def test_learner_form_clears_outputs_but_pinned_ones_and_adds_a_note():
    out = [{"output_type": "stream", "name": "stdout", "text": "1\n"}]
    nb = _nb([{"cell_type": "markdown", "id": "m", "metadata": {}, "source": "# 09 · Test"},
              _code(SOLUTION_CELL, out, 3),
              _code("# NBVAL_CHECK_OUTPUT\nprint(1)", out, 4)])
    learner, n = exercises.learner_notebook(nb, "09_test.ipynb", "https://github.com/a/b")
    assert n == 1 and len(learner["cells"]) == 4
    assert "solutions/09_test.ipynb" in "".join(learner["cells"][1]["source"])
    assert learner["cells"][2]["outputs"] == [] and learner["cells"][2]["execution_count"] is None
    assert learner["cells"][3]["outputs"] == out and learner["cells"][3]["execution_count"] == 4
    assert nb["cells"][1]["outputs"] == out  # the input is not modified


def test_build_in_a_scratch_repository(tmp_path):
    (tmp_path / "notebooks" / "solutions").mkdir(parents=True)
    (tmp_path / "pyproject.toml").write_text('[project]\nname = "x"\n[project.urls]\nRepository = "https://github.com/me/fork"\n')
    (tmp_path / "README.md").write_text(f"intro\n{exercises.TABLE_BEGIN}\nold\n{exercises.TABLE_END}\noutro\n")
    setup = 'import sys\nif "google.colab" in sys.modules:\n    %pip install -q "diffusion-course @ git+https://github.com/old/old"\n'
    src = _nb([{"cell_type": "markdown", "id": "m", "metadata": {}, "source": "# 01 · First"},
               _code(setup), _code(SOLUTION_CELL, [{"output_type": "stream", "name": "stdout", "text": "x"}], 1)])
    (tmp_path / "notebooks" / "solutions" / "01_first.ipynb").write_text(json.dumps(src))
    changed = exercises.build(tmp_path)
    assert set(changed) == {"notebooks/solutions/01_first.ipynb", "notebooks/01_first.ipynb", "README.md"}
    assert exercises.build(tmp_path, check=True) == []
    learner = json.loads((tmp_path / "notebooks" / "01_first.ipynb").read_text())
    assert "git+https://github.com/me/fork" in "".join(learner["cells"][2]["source"])
    assert "NotImplementedError" in "".join(learner["cells"][3]["source"])
    source = json.loads((tmp_path / "notebooks" / "solutions" / "01_first.ipynb").read_text())
    assert source["cells"][2]["outputs"] == [] and "### BEGIN SOLUTION" in "".join(source["cells"][2]["source"])
    readme = (tmp_path / "README.md").read_text()
    assert "colab.research.google.com/github/me/fork/blob/main/notebooks/01_first.ipynb" in readme
    assert readme.startswith("intro\n") and readme.endswith("outro\n") and "old\n" not in readme
    # a learner form without a source is reported
    shutil.copy(tmp_path / "notebooks" / "01_first.ipynb", tmp_path / "notebooks" / "02_orphan.ipynb")
    assert any("02_orphan" in c for c in exercises.build(tmp_path, check=True))


def test_learner_forms_and_readme_are_up_to_date():
    stale = exercises.build(ROOT, check=True)
    assert stale == [], f"run `python -m diffusion_course build`; out of date: {stale}"


def test_every_lesson_source_has_a_learner_form_with_stubs():
    sources = sorted((ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb"))
    assert sources, "no lesson sources found"
    for src in sources:
        learner = json.loads((ROOT / "notebooks" / src.name).read_text())
        text = "".join("".join(c["source"]) for c in learner["cells"])
        assert "### BEGIN SOLUTION" not in text
        source_text = "".join("".join(c["source"]) for c in json.loads(src.read_text())["cells"])
        stub = 'raise NotImplementedError("Exercise'
        assert text.count(stub) == source_text.count(stub) + source_text.count("### BEGIN SOLUTION")


def test_repository_url_and_colab_links():
    url = exercises.repository_url(ROOT)
    assert exercises.github_path(url).count("/") == 1
    assert exercises.colab_url(url, "notebooks/00_setup.ipynb").endswith("/blob/main/notebooks/00_setup.ipynb")
    with pytest.raises(ValueError, match="github.com/OWNER/NAME"):
        exercises.github_path("https://gitlab.com/a/b")


def test_command_line_build_check(capsys):
    from diffusion_course.__main__ import main

    assert main(["build", "--check"]) == 0
    assert "up to date" in capsys.readouterr().out


def test_cells_without_an_id_get_a_stable_unique_one_and_ids_there_are_kept():
    cells = [{"cell_type": "markdown", "metadata": {}, "source": "# 01 · First"}, _code("x = 1"), _code("x = 1"),
             {"cell_type": "markdown", "id": "keep-me", "metadata": {}, "source": "text"}]
    for c in cells[1:3]:
        del c["id"]
    first = exercises.clean_source_notebook(_nb(cells), "https://example.org/r")
    again = exercises.clean_source_notebook(_nb(cells), "https://example.org/r")
    ids = [c["id"] for c in first["cells"]]
    assert ids == [c["id"] for c in again["cells"]]
    assert len(set(ids)) == len(ids) and ids[3] == "keep-me"
    assert all(re_id.fullmatch(i) for i in ids)
    learner, _ = exercises.learner_notebook(_nb(cells), "01_first.ipynb", "https://example.org/r")
    assert [c["id"] for c in learner["cells"] if c["id"] != "learner-note"] == ids
