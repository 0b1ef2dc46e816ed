"""The repository keeps its promises: README commands and links, environment.yml, notebook hygiene, and
docstrings that name existing lessons."""
import importlib
import inspect
import json
import pkgutil
import re
from pathlib import Path

import pytest
import yaml

import diffusion_course
from diffusion_course import exercises

ROOT = Path(__file__).resolve().parents[1]
NOTEBOOKS = sorted(p for p in (ROOT / "notebooks").rglob("*.ipynb") if ".ipynb_checkpoints" not in p.parts)


def _pyproject():
    try:
        import tomllib
    except ImportError:  # Python 3.10: the standard library has no TOML reader yet
        tomllib = pytest.importorskip("tomli", reason="reading pyproject.toml on Python 3.10 needs tomli")

    return tomllib.loads((ROOT / "pyproject.toml").read_text())


def _split_req(req: str):
    m = re.match(r"^([A-Za-z0-9_.\-]+)\s*(.*)$", req.strip())
    return m.group(1).lower().replace("_", "-"), m.group(2).replace(" ", "")


def test_readme_has_exactly_the_two_setup_commands_and_ci_runs_one():
    readme = (ROOT / "README.md").read_text()
    blocks = re.findall(r"```bash\n(.*?)```", readme, re.S)
    setup = [b for b in blocks if "make lab" in b or "make test" in b]
    assert setup, "the README shows no set-up commands"
    assert "make lab" in readme and "make test" in readme
    ci = (ROOT / ".ci" / "run").read_text()
    assert re.search(r"^make test$", ci, re.M)


def test_readme_links_point_at_existing_notebooks():
    readme = (ROOT / "README.md").read_text()
    url = exercises.repository_url(ROOT)
    path = exercises.github_path(url)
    colab = re.findall(r"https://colab\.research\.google\.com/github/([^)\s]+)", readme)
    assert colab, "no Colab links in the README"
    for link in colab:
        assert link.startswith(f"{path}/blob/main/"), f"{link} does not use the repository URL of pyproject.toml"
        assert (ROOT / link.split("/blob/main/", 1)[1]).is_file(), link
    local = re.findall(r"\]\(((?:notebooks|diffusion_course|tests|benchmarks|data)/[^)#]+)\)", readme)
    for link in local:
        assert (ROOT / link).exists(), f"README links to missing {link}"
    for nb in (ROOT / "notebooks").glob("[0-9][0-9]_*.ipynb"):
        assert f"notebooks/{nb.name}" in readme, f"{nb.name} is missing from the README's lesson table"


def test_environment_yml_agrees_with_pyproject():
    env = yaml.safe_load((ROOT / "environment.yml").read_text())
    conda = {}
    pip = []
    for dep in env["dependencies"]:
        if isinstance(dep, dict):
            pip += dep["pip"]
        else:
            name, spec = _split_req(dep)
            conda[{"pytorch": "torch"}.get(name, name)] = spec
    proj = _pyproject()["project"]
    wanted = dict(_split_req(r) for r in proj["dependencies"] + proj["optional-dependencies"]["dev"])
    assert conda.pop("python") == proj["requires-python"]
    conda.pop("pip")
    assert pip[0] == "-e ."
    conda.update(dict(_split_req(r) for r in pip[1:]))  # packages conda-forge lacks come from PyPI
    assert conda == wanted


def test_notebooks_have_no_outputs_and_no_hard_coded_cuda():
    assert NOTEBOOKS
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text())
        for c in nb["cells"]:
            src = "".join(c["source"])
            if c["cell_type"] == "code" and "NBVAL_CHECK_OUTPUT" not in src:
                assert not c.get("outputs"), f"{p.name} has committed outputs"
            assert not re.search(r"\.cuda\(\)|CUDA_VISIBLE_DEVICES", src), f"{p.name} hard-codes CUDA"


def test_every_notebook_cell_has_a_unique_id():
    """nbformat 4.5 requires an id on every cell (nbformat warns now and will refuse later); `build` adds any
    that a new cell lacks."""
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text())
        ids = [c.get("id") for c in nb["cells"]]
        assert nb["nbformat"] == 4 and nb["nbformat_minor"] >= 5, p.name
        missing = [k for k, i in enumerate(ids) if not i]
        assert not missing, f"{p.relative_to(ROOT)}: cells {missing} have no id (run python -m diffusion_course build)"
        assert len(set(ids)) == len(ids), f"{p.relative_to(ROOT)}: cell ids repeat"


def test_every_notebook_has_the_colab_setup_cell_with_the_repository_url():
    url = exercises.repository_url(ROOT)
    for p in NOTEBOOKS:
        nb = json.loads(p.read_text())
        first_code = next(c for c in nb["cells"] if c["cell_type"] == "code")
        src = "".join(first_code["source"])
        assert '"google.colab" in sys.modules' in src and f"git+{url}" in src, p.name
        assert "env_report" in src, p.name


def _public_members():
    for info in pkgutil.walk_packages(diffusion_course.__path__, "diffusion_course."):
        if info.name.endswith("__main__"):
            continue
        mod = importlib.import_module(info.name)
        for name, obj in vars(mod).items():
            if name.startswith("_") or getattr(obj, "__module__", None) != mod.__name__:
                continue
            if inspect.isfunction(obj):
                yield f"{mod.__name__}.{name}", obj
            elif inspect.isclass(obj):
                yield f"{mod.__name__}.{name}", obj
                for mname, m in vars(obj).items():
                    if inspect.isfunction(m) and not mname.startswith("_") and mname != "forward":
                        yield f"{mod.__name__}.{name}.{mname}", m


def test_public_docstrings_name_an_existing_lesson():
    lessons = {p.stem for p in (ROOT / "notebooks" / "solutions").glob("[0-9][0-9]_*.ipynb")}
    missing, unknown = [], []
    for qual, obj in _public_members():
        doc = inspect.getdoc(obj) or ""
        if inspect.isclass(obj) and issubclass(obj, BaseException):
            continue
        names = re.findall(r"[Ll]essons?:?\s+((?:\d\d_\w+(?:,\s*|\s+and\s+)?)+)", doc)
        found = re.findall(r"\d\d_\w+", " ".join(names))
        if not found:
            missing.append(qual)
        unknown += [f"{qual}: {n}" for n in found if n not in lessons]
    assert not missing, f"docstrings that name no lesson: {missing}"
    assert not unknown, f"docstrings that name a lesson that does not exist: {unknown}"
