"""A JupyterLab server and a headless Chromium for the browser tests (`make test-browser`).

These tests are optional: they need Chromium from the system's packages and Playwright from PyPI (the
`browser` extra), so `make test` does not collect them; `make test-browser` sets COURSE_BROWSER_TEST=1.
"""
import json
import os
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

if not os.environ.get("COURSE_BROWSER_TEST"):
    collect_ignore_glob = ["test_*.py"]

ROOT = Path(__file__).resolve().parents[2]
SHOTS = ROOT / "build" / "browser"
NO_CHROMIUM = ("the browser tests need Chromium, which is not installed: on Debian or Ubuntu "
               "`sudo apt-get install -y chromium` (chromium-browser on older Ubuntu), or set CHROMIUM to the "
               "path of a Chromium or Chrome binary")
# flags for a machine without a display and without a network: no GPU, no background connections
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-quic", "--no-first-run",
                 "--disable-background-networking", "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _lab_settings(folder: Path) -> None:
    """JupyterLab settings for a test: every cell kept in the page (no windowing, so that the test sees
    every output), no news or update checks (no network)."""
    settings = {
        "@jupyterlab/notebook-extension/tracker.jupyterlab-settings": {"windowingMode": "none"},
        "@jupyterlab/apputils-extension/notification.jupyterlab-settings": {"fetchNews": "false",
                                                                            "checkForUpdates": False},
    }
    for name, value in settings.items():
        path = folder / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(value))


@pytest.fixture(scope="session")
def chromium_path() -> str:
    found = os.environ.get("CHROMIUM") or shutil.which("chromium") or shutil.which("chromium-browser")
    if not found or not Path(found).exists():
        pytest.fail(NO_CHROMIUM)
    return found


@pytest.fixture(scope="session")
def lab(tmp_path_factory):
    """A JupyterLab server on 127.0.0.1 serving a copy of notebooks/ (the learner's forms), so that what the
    browser runs and saves never touches the repository. Kernels run in the quick mode. Yields its base URL
    with the token."""
    home = tmp_path_factory.mktemp("lab")
    served = home / "notebooks"
    shutil.copytree(ROOT / "notebooks", served, ignore=shutil.ignore_patterns(".ipynb_checkpoints"))
    _lab_settings(home / "settings")
    token = os.urandom(12).hex()
    port = _free_port()
    env = {**os.environ, "DIFFUSION_COURSE_MODE": "quick", "JUPYTERLAB_SETTINGS_DIR": str(home / "settings"),
           "JUPYTERLAB_WORKSPACES_DIR": str(home / "workspaces"), "JUPYTER_RUNTIME_DIR": str(home / "runtime"),
           "IPYTHONDIR": str(home / "ipython"), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    cmd = [sys.executable, "-m", "jupyter", "lab", "--no-browser", f"--ServerApp.port={port}",
           "--ServerApp.ip=127.0.0.1", f"--IdentityProvider.token={token}", f"--ServerApp.root_dir={served}",
           "--LabApp.expose_app_in_browser=True", "--LabApp.news_url=None",
           "--LabApp.check_for_updates_class=jupyterlab.NeverCheckForUpdate"]
    if os.geteuid() == 0:
        cmd.append("--allow-root")
    log = open(home / "lab.log", "w")
    server = subprocess.Popen(cmd, cwd=served, env=env, stdout=log, stderr=subprocess.STDOUT)
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.time() + 120
        while True:
            try:
                with urllib.request.urlopen(f"{base}/api/status?token={token}", timeout=5):
                    break
            except OSError:
                if server.poll() is not None or time.time() > deadline:
                    raise RuntimeError("JupyterLab did not start:\n" + (home / "lab.log").read_text()[-3000:])
                time.sleep(0.5)
        yield {"url": base, "token": token, "root": served}
    finally:
        server.terminate()  # the server shuts its kernels down
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()
        log.close()
        SHOTS.mkdir(parents=True, exist_ok=True)
        shutil.copy(home / "lab.log", SHOTS / "jupyterlab.log")  # the server's and kernels' log, to read after a failure


def shut_down_kernels(lab) -> None:
    """Stop every kernel the server runs (after each lesson, so that lessons never share the CPU)."""
    auth = {"Authorization": f"token {lab['token']}"}
    with urllib.request.urlopen(urllib.request.Request(f"{lab['url']}/api/sessions", headers=auth), timeout=30) as r:
        sessions = json.load(r)
    for s in sessions:
        req = urllib.request.Request(f"{lab['url']}/api/sessions/{s['id']}", headers=auth, method="DELETE")
        urllib.request.urlopen(req, timeout=60).close()


@pytest.fixture(autouse=True)
def one_lesson_at_a_time(lab):
    """After each test, stop the kernels it started."""
    yield
    shut_down_kernels(lab)


@pytest.fixture(scope="session")
def browser(chromium_path):
    from playwright.sync_api import sync_playwright

    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=chromium_path, headless=True, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture(scope="session")
def shots() -> Path:
    """build/browser/, emptied of the screenshots of an earlier run."""
    SHOTS.mkdir(parents=True, exist_ok=True)
    for old in SHOTS.glob("*.png"):
        old.unlink()
    return SHOTS
