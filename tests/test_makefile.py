"""The Makefile's `make lab` works for a normal user and as root (the usual user in a container), where
JupyterLab refuses to start without --allow-root. Checked with `make -n` (print the commands, run nothing)."""
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
