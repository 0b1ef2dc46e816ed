"""The course's website (docs/, `make site`) builds from the lesson sources in the quick mode without a single
warning, every local link and image in it resolves, every lesson has a page that the front page links to,
and the API reference links each docstring's lesson.

The lessons are executed by the build, several at once, into the jupyter-cache under build/jupyter-cache (keyed
by each lesson's code, the run mode and the package's files), and a second build reuses what the first one
executed as long as nothing it depends on changed. In the whole suite (`make test`) these tests run last and
the cache already holds every lesson that nbval ran without an error (the root conftest.py stores them), so
the build executes none of them again; run alone, this module executes them all.
"""
import importlib
import importlib.util
import inspect
import os
import re
import subprocess
import sys
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "docs"))

import check_site  # noqa: E402  (docs/check_site.py, which `make site` runs too)

from diffusion_course import exercises  # noqa: E402

# a warning or error in Sphinx's own format ("file:line: WARNING: ..." or "WARNING: ..."); the kernels'
# log lines ("[IPKernelApp] WARNING | ...") go to the same stream but are not the site's
SPHINX_PROBLEM = re.compile(r"(^|: )(WARNING|ERROR|CRITICAL):", re.M)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """A fresh quick-mode build of the site; returns the folder of its HTML pages."""
    out = tmp_path_factory.mktemp("site")
    env = {**os.environ, "DIFFUSION_COURSE_MODE": "quick"}
    cmd = [sys.executable, "-m", "sphinx", "-W", "--keep-going", "-b", "html", "-d", str(out / "doctrees"),
           str(ROOT / "docs"), str(out / "html")]
    start = time.perf_counter()
    done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=1800)
    seconds = time.perf_counter() - start
    log = done.stdout + done.stderr
    executed = re.findall(r"\[course\] (\S+\.ipynb) executed in ([\d.]+) s", log)
    print(f"\nsite built in {seconds:.0f} s; lessons executed now: "
          + (", ".join(f"{n} {s} s" for n, s in executed) or "none (all in the execution cache)"))
    assert done.returncode == 0, f"the site build failed (exit {done.returncode}):\n{log[-6000:]}"
    problems = [ln for ln in log.splitlines() if SPHINX_PROBLEM.search(ln)]
    assert not problems, "the site build warned:\n" + "\n".join(problems)
    return out / "html"


def test_every_local_link_and_image_resolves(site):
    broken = check_site.broken_links(site)
    assert not broken, "broken links in the built site:\n" + "\n".join(broken)


def test_every_lesson_has_a_page_linked_from_the_front_page(site):
    problems = check_site.lesson_problems(site, ROOT)
    assert not problems, "\n".join(problems)
    # the front page's table comes from the README's source: the same titles, in the same order
    index = (site / "index.html").read_text(encoding="utf-8")
    titles = [ln.split(" | ")[0].lstrip("| ") for ln in
              exercises.lesson_table(ROOT, exercises.repository_url(ROOT)).splitlines()[2:]]
    positions = [index.find(t.replace("&", "&amp;")) for t in titles]
    assert all(p >= 0 for p in positions), [t for t, p in zip(titles, positions) if p < 0]
    assert positions == sorted(positions)


def test_lesson_pages_show_their_outputs(site):
    """Figures are images of the site, the animations keep their player, and the text outputs are there."""
    for page in sorted((site / "lessons").glob("*.html")):
        html = page.read_text(encoding="utf-8")
        assert re.search(r'<img [^>]*src="\.\./_images/', html), f"{page.name} shows no figure"
    setup = (site / "lessons" / "00_setup.html").read_text(encoding="utf-8")
    assert "run mode : quick" in setup or "run mode: quick" in setup, "lesson 00's environment report"
    assert "class=\"animation\"" in setup, "lesson 00's animation (to_jshtml) is missing"


def test_the_search_index_covers_lessons_and_api(site):
    index = (site / "searchindex.js").read_text(encoding="utf-8")
    for src in sorted((ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb")):
        assert f'"lessons/{src.stem}"' in index, f"{src.stem} is not searchable"
    assert '"api/diffusion_course.ddpm"' in index
    assert (site / "search.html").is_file()


def _lessons_named_in_docstrings():
    import pkgutil

    import diffusion_course

    names = set()
    for info in pkgutil.walk_packages(diffusion_course.__path__, "diffusion_course."):
        if any(part.startswith("_") for part in info.name.split(".")[1:]):
            continue
        mod = importlib.import_module(info.name)
        docs = [inspect.getdoc(mod) or ""]
        for obj in vars(mod).values():
            if getattr(obj, "__module__", None) == mod.__name__ and (inspect.isfunction(obj) or inspect.isclass(obj)):
                docs.append(inspect.getdoc(obj) or "")
        for doc in docs:
            for group in re.findall(r"[Ll]essons?:?\s+((?:\d\d_\w+(?:,\s*|\s+and\s+)?)+)", doc):
                names.update(re.findall(r"\d\d_\w+", group))
    return names


def test_the_api_reference_links_every_lesson_its_docstrings_name(site):
    linked = set()
    for page in (site / "api").glob("diffusion_course*.html"):
        linked.update(re.findall(r'href="\.\./lessons/(\d\d_\w+)\.html', page.read_text(encoding="utf-8")))
    named = _lessons_named_in_docstrings()
    assert named, "no docstring names a lesson"
    assert named <= linked, f"lessons named in docstrings but never linked: {sorted(named - linked)}"


def test_the_link_checker_finds_what_is_broken(tmp_path):
    """check_site is not vacuous: a missing file, a missing anchor and a link out of the site are found,
    links to other sites and to existing anchors are not."""
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "ok.html").write_text('<h1 id="top">ok</h1>')
    (tmp_path / "index.html").write_text(
        '<a href="sub/ok.html#top">fine</a><a href="https://example.org/x">out</a><img src="sub/gone.png">'
        '<a href="sub/ok.html#nowhere">bad anchor</a><a href="../../etc/passwd">escape</a><a href="#here">x</a>'
        '<p id="here"></p>')
    problems = check_site.broken_links(tmp_path)
    assert len(problems) == 3, problems
    assert any("gone.png" in p for p in problems)
    assert any("nowhere" in p for p in problems)
    assert any("leaves the site" in p for p in problems)


def _root_conftest():
    spec = importlib.util.spec_from_file_location("course_root_conftest", ROOT / "conftest.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_the_suite_stores_what_nbval_executed_where_the_site_build_finds_it(tmp_path, monkeypatch):
    """The root conftest's cache entry for a lesson is found by the site's own lookup (the lesson page, i.e. the
    solution form with its banner cell added), carries the outputs received for each code cell in order, and
    leaves out widget views."""
    import nbformat
    from jupyter_cache import get_cache

    monkeypatch.syspath_prepend(str(ROOT / "docs" / "_ext"))
    from course_execution import cache_folder

    monkeypatch.setenv("COURSE_SITE_CACHE", str(tmp_path))
    root_conftest = _root_conftest()
    src = ROOT / "notebooks" / "solutions" / "00_setup.ipynb"
    nb = nbformat.read(src, as_version=4)
    n_code = sum(c.cell_type == "code" for c in nb.cells)
    record = root_conftest._LessonRecord(n_code)
    widget = nbformat.v4.new_output("display_data", data={root_conftest.WIDGET_VIEW: {"model_id": "x"},
                                                           "text/plain": "IntSlider(value=1)"})
    for k in range(n_code):
        text = nbformat.v4.new_output("stream", name="stdout", text=f"cell {k}\n")
        record.outputs[k] = root_conftest._static_outputs([text, widget])
    root_conftest._store_in_site_cache(src, nb, record)

    page = nbformat.read(src, as_version=4)  # what docs/_ext/course_lessons.py makes of the lesson
    page.cells.insert(1, nbformat.v4.new_markdown_cell("the banner", id="site-banner"))
    cache = get_cache(str(cache_folder(ROOT, "quick")))
    assert str(tmp_path) in str(cache_folder(ROOT, "quick"))
    _, merged = cache.merge_match_into_notebook(page)
    code = [c for c in merged.cells if c.cell_type == "code"]
    assert [[o.get("text") for o in c.outputs] for c in code] == [[f"cell {k}\n"] for k in range(n_code)]
    assert [c.execution_count for c in code] == list(range(1, n_code + 1))
    edited = nbformat.read(src, as_version=4)
    edited.cells[[c.cell_type for c in edited.cells].index("code")].source += "\nprint('changed')"
    with pytest.raises(KeyError):  # an edited lesson is not matched: the site executes it again
        cache.match_cache_notebook(edited)


def test_the_site_tests_run_after_the_lessons(request):
    """The root conftest moves this module's tests behind every notebook of the session."""
    items = request.session.items
    mine = [k for k, item in enumerate(items) if Path(str(item.fspath)) == Path(__file__).resolve()]
    others = [k for k, item in enumerate(items) if Path(str(item.fspath)) != Path(__file__).resolve()]
    assert mine and (not others or min(mine) > max(others))
