"""./dev: its commands, and where its set-up takes torch from (./dev setup --dry-run prints the pip
commands and runs none): the CPU build from torch's CPU index without an NVIDIA driver, the default
index with one, or where the CPU index cannot be reached."""

from __future__ import annotations

import functools
import http.server
import os
import shutil
import subprocess
import threading
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parent.parent
DEV = ROOT / "dev"


def dev(*args, env=None, path_prefix=None):
    env = {k: v for k, v in os.environ.items() if k not in ("TORCH_SPEC", "DEV_TORCH_CPU_INDEX")} | (env or {})
    if path_prefix:
        env["PATH"] = f"{path_prefix}{os.pathsep}{env['PATH']}"
    return subprocess.run([str(DEV), *args], env=env, capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="module")
def index(tmp_path_factory):
    """A package index that answers (its pages need not exist: any HTTP answer counts)."""
    root = tmp_path_factory.mktemp("index")
    handler = functools.partial(http.server.SimpleHTTPRequestHandler, directory=str(root))
    handler.log_message = lambda *a: None
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    yield f"http://127.0.0.1:{server.server_port}/whl/cpu"
    server.shutdown()


@pytest.fixture
def fake_nvidia_smi(tmp_path):
    (tmp_path / "nvidia-smi").write_text("#!/bin/sh\nexit 0\n")
    (tmp_path / "nvidia-smi").chmod(0o755)
    return tmp_path


def torch_commands(proc):
    assert proc.returncode == 0, proc.stderr
    return [line for line in proc.stdout.splitlines() if "torch" in line]


no_driver = pytest.mark.skipif(shutil.which("nvidia-smi") is not None or Path("/proc/driver/nvidia").exists(),
                               reason="this machine has an NVIDIA driver")


def test_dev_without_a_command_lists_them():
    proc = dev()
    assert proc.returncode == 0 and all(c in proc.stdout for c in ("bench", "test", "python", "setup")), proc.stderr


@no_driver
def test_without_an_nvidia_driver_torch_is_the_cpu_build(index):
    proc = dev("setup", "--dry-run", env={"DEV_TORCH_CPU_INDEX": index})
    assert torch_commands(proc) == [
        f".venv/bin/python -m pip install -q --timeout 10 --retries 0 --index-url {index} torch==2.13.0"]
    assert f"./dev: torch: the CPU build of torch==2.13.0 from {index}" in proc.stderr
    assert "-e .[test,bench,train]" in proc.stdout.splitlines()[-1]


def test_with_an_nvidia_driver_torch_comes_from_the_default_index(index, fake_nvidia_smi):
    proc = dev("setup", "--dry-run", env={"DEV_TORCH_CPU_INDEX": index}, path_prefix=fake_nvidia_smi)
    assert torch_commands(proc) == [".venv/bin/python -m pip install -q torch==2.13.0"]
    assert "./dev: torch: torch==2.13.0 from the default index (an NVIDIA driver is present)" in proc.stderr


@no_driver
def test_an_unreachable_cpu_index_falls_back_to_the_default_index_at_once():
    start = time.monotonic()
    proc = dev("setup", "--dry-run", env={"DEV_TORCH_CPU_INDEX": "http://127.0.0.1:9/", "TORCH_SPEC": "torch==2.5.1"})
    assert time.monotonic() - start < 20
    assert torch_commands(proc) == [".venv/bin/python -m pip install -q torch==2.5.1"]
    assert "from the default index (no NVIDIA driver, but http://127.0.0.1:9/ could not be reached" in proc.stderr


@no_driver
def test_torch_spec_picks_the_version(index):
    proc = dev("setup", "--dry-run", env={"DEV_TORCH_CPU_INDEX": index, "TORCH_SPEC": "torch==2.5.1"})
    assert torch_commands(proc)[0].endswith(f"--index-url {index} torch==2.5.1")


def test_a_dry_run_changes_nothing(index):
    stamp = ROOT / ".venv" / ".installed"
    before = stamp.stat().st_mtime_ns if stamp.exists() else None
    proc = dev("setup", "--dry-run", env={"DEV_TORCH_CPU_INDEX": index})
    assert proc.returncode == 0, proc.stderr
    assert (stamp.stat().st_mtime_ns if stamp.exists() else None) == before
