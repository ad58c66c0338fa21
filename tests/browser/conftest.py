"""Fixtures of the page test: Debian's Chromium (installed when absent), and ``mer serve`` on tiny models.

The server is the real command, ``python -m mer_ray serve``, in its own process (so its Ray and Serve share
no state with this pytest process), on the tiny models of the Serve tests, over real HTTP on a free port.
"""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import httpx
import pytest

from tests.conftest import REPO

CHROMIUM = Path("/usr/bin/chromium")


def _install_chromium() -> str | None:
    """Install Debian's ``chromium`` with apt-get; None when it is there after, else why not."""
    if os.geteuid() != 0:
        return "not root, so apt-get cannot install it (run `apt-get install -y chromium` as root)"
    if shutil.which("apt-get") is None:
        return "no apt-get on this machine"
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    why = ""
    for cmd in (["apt-get", "install", "-y", "-q", "chromium"], ["apt-get", "update", "-q"], ["apt-get", "install", "-y", "-q", "chromium"]):
        try:
            res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=900)
        except subprocess.TimeoutExpired:
            return f"`{' '.join(cmd)}` ran over 900 s"
        if res.returncode == 0 and CHROMIUM.exists():
            return None
        if res.returncode != 0:
            why = f"`{' '.join(cmd)}` exited {res.returncode}: {(res.stderr or res.stdout).strip()[-400:]}"
    return why or f"apt-get installed chromium but {CHROMIUM} is not there"


@pytest.fixture(scope="session")
def chromium() -> str:
    """The path of Debian's Chromium; installs the package when it is absent, and skips only when that fails."""
    if not CHROMIUM.exists():
        why = _install_chromium()
        if why:
            pytest.skip(f"Debian's chromium is not installed and installing it failed: {why}")
    return str(CHROMIUM)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _tail(path: Path, n: int = 4000) -> str:
    return path.read_text(errors="replace")[-n:] if path.exists() else ""


@pytest.fixture(scope="module")
def page_models(tmp_path_factory) -> Path:
    """``$MER_PAGE_MODELS`` (a real models dir, e.g. for the README's screenshot), else the Serve tests' tiny models
    with their tiny calibration."""
    if os.environ.get("MER_PAGE_MODELS"):
        return Path(os.environ["MER_PAGE_MODELS"]).resolve()
    from tests.integration.serve.test_local_mode import tiny_models
    from tests.unit.serve.tiny_calibration import write_calibration

    models = tiny_models(tmp_path_factory.mktemp("models"))
    write_calibration(models)  # temperatures and conformal scores for meld7 and meld_sentiment3, none for the others
    return models


@pytest.fixture(scope="module")
def server(tmp_path_factory, page_models) -> str:
    """``mer serve --no-llm`` on ``page_models`` at a free port; its base URL, once ``/healthz`` answers.

    Module-scoped: the server (a Ray instance) is gone before the rest of the suite runs."""
    port, log = _free_port(), tmp_path_factory.mktemp("serve") / "serve.log"
    cmd = [sys.executable, "-m", "mer_ray", "serve", "--config", str(REPO / "serve" / "mer.yaml"), "--models", str(page_models),
           "--no-llm", "--port", str(port), "--num-cpus", "2"]
    env = {**os.environ, "RAY_TMPDIR": str(tmp_path_factory.mktemp("ray"))}  # a short path: Ray's socket names
    env.pop("RAY_ADDRESS", None)
    url = f"http://127.0.0.1:{port}"
    with log.open("wb") as out:
        proc = subprocess.Popen(cmd, cwd=REPO, env=env, stdout=out, stderr=subprocess.STDOUT, start_new_session=True)
    try:
        deadline = time.time() + 300
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mer serve exited {proc.returncode} before answering:\n{_tail(log)}")
            try:
                if httpx.get(url + "/healthz", timeout=5).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.time() > deadline:
                pytest.fail(f"mer serve did not answer /healthz within 300 s:\n{_tail(log)}")
            time.sleep(0.5)
        yield url
    finally:
        proc.send_signal(signal.SIGINT)  # mer serve shuts Serve and Ray down on Ctrl-C
        try:
            proc.wait(timeout=60)
        except subprocess.TimeoutExpired:
            pass
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # whatever of its process group is left (its own session)
        except ProcessLookupError:
            pass
        proc.wait(timeout=10)
