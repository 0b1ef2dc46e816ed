"""The Makefile's `make lab` works for a normal user and as root (the usual user in a container), where
JupyterLab refuses to start without --allow-root, and `make test` runs every test and notebook once, the site's
tests after the rest. Checked with `make -n` (print the commands, run nothing)."""
import os
import shutil
import subprocess
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def lab_command(env=None) -> str:
    """The JupyterLab line that `make lab` would run."""
    assert shutil.which("make"), "make is not installed (the README's two commands need it)"
    done = subprocess.run(["make", "-n", "lab"], cwd=ROOT, env=env, capture_output=True, text=True, timeout=60,
                          check=True)
    lines = [line for line in done.stdout.splitlines() if "jupyter lab" in line]
    assert len(lines) == 1, done.stdout
    return lines[0]


def fake_id(tmp_path: Path, uid: int) -> dict:
    """An environment whose `id -u` prints ``uid``: the Makefile asks `id` for the effective user id."""
    bin_dir = tmp_path / f"uid{uid}"
    bin_dir.mkdir()
    (bin_dir / "id").write_text(f"#!/bin/sh\necho {uid}\n")
    (bin_dir / "id").chmod(0o755)
    return {**os.environ, "PATH": f"{bin_dir}{os.pathsep}{os.environ['PATH']}"}


def test_make_lab_passes_allow_root_only_to_root(tmp_path):
    assert lab_command(fake_id(tmp_path, 0)).endswith("-m jupyter lab --allow-root notebooks/")
    assert lab_command(fake_id(tmp_path, 1000)).endswith("-m jupyter lab notebooks/")
    # and for whoever runs this test, without the fake
    real = lab_command()
    assert ("--allow-root" in real) == (os.geteuid() == 0), real


def test_make_lab_passes_lab_args_on(tmp_path):
    line = lab_command({**fake_id(tmp_path, 1000), "LAB_ARGS": "--ip=0.0.0.0 --no-browser"})
    assert line.endswith("-m jupyter lab --ip=0.0.0.0 --no-browser notebooks/")


def pytest_lines(*make_args: str) -> list:
    """The pytest lines that `make test` would run, each as its words."""
    done = subprocess.run(["make", "-n", "test", *make_args], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=True)
    joined = done.stdout.replace("\\\n", " ")  # the recipe's continued lines, as make hands them to the shell
    return [line.split() for line in joined.splitlines() if "-m pytest" in line]


def test_make_test_runs_the_suite_in_workers_then_the_site():
    parallel, site = pytest_lines()
    assert parallel[parallel.index("-n") + 1] == "2" and "loadfile" in parallel  # a notebook stays in one worker
    assert {"--nbval-lax", "--nbval-current-env", "tests", "notebooks"} <= set(parallel)
    assert parallel[parallel.index("--ignore") + 1] == "tests/test_site.py"
    assert site[-1] == "tests/test_site.py"
    one, = pytest_lines("TEST_WORKERS=0")  # one process: everything, the root conftest puts the site last
    assert "-n" not in one and one[-2:] == ["tests", "notebooks"] and "--ignore" not in one
