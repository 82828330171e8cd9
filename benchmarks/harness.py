"""What the benchmarks share: how a call is timed, and the environment every result names.

Importing this module imports `bridge` when JAX is installed, which sets JAX's GPU memory policy
(no 75% preallocation) before JAX starts: the benchmarks never set it themselves.
"""

from __future__ import annotations

import datetime
import os
import platform
import statistics
import subprocess
import sys
import time
from pathlib import Path

import torch

try:
    import bridge  # noqa: F401  (JAX's GPU memory policy, before JAX starts)
except ImportError:                  # no JAX: the torch backends still run
    pass

ROOT = Path(__file__).resolve().parent.parent


def device_wait(device: torch.device):
    """A wait(out) that blocks until the device's queued work is done."""
    if device.type == "cuda":
        return lambda _out: torch.cuda.synchronize(device)
    return lambda _out: None


def measure(fn, wait, reps: int, budget_s: float, target_rep_s: float = 0.0, check=None, peak=None,
            inner: int | None = None):
    """Time fn(); returns (first-call seconds, per-call seconds of each repetition, inner).

    Call 1 (compilation included) gives `first` and its output goes to `check` (untimed). Call 2
    runs under `peak` (a memory measurement) when given and sizes `inner`, the calls per
    repetition, so that one repetition lasts about target_rep_s; each repetition ends with
    wait(out). Repetitions stop at `reps`, or once budget_s has passed and at least 3 are done.
    """
    t0 = time.perf_counter()
    out = fn()
    wait(out)
    first = time.perf_counter() - t0
    if check is not None:
        check(out)
    del out
    t0 = time.perf_counter()
    if peak is not None:
        peak(fn)
    else:
        wait(fn())
    single = time.perf_counter() - t0
    if inner is None:
        inner = max(1, min(1000, int(target_rep_s / max(single, 1e-7))))
    min_reps = 3 if single < budget_s else 1
    times = []
    start = time.perf_counter()
    for _ in range(reps):
        t0 = time.perf_counter()
        for _ in range(inner):
            out = fn()
        wait(out)
        times.append((time.perf_counter() - t0) / inner)
        del out
        if len(times) >= min_reps and time.perf_counter() - start > budget_s:
            break
    return first, times, inner


def stats(times) -> dict:
    """Median, quartiles and extremes of per-call seconds, in milliseconds."""
    q = statistics.quantiles(times, n=4) if len(times) >= 2 else [times[0]] * 3
    return {"median_ms": 1e3 * statistics.median(times), "p25_ms": 1e3 * q[0],
            "p75_ms": 1e3 * q[2], "min_ms": 1e3 * min(times), "max_ms": 1e3 * max(times),
            "reps": len(times)}


def versions() -> dict:
    v = {"python": platform.python_version(), "torch": torch.__version__}
    for name in ("jax", "jaxlib", "triton", "accelerated_scan", "fla"):
        try:
            v[name] = getattr(__import__(name), "__version__", "?")
        except Exception:
            v[name] = None
    return v


def git_revision() -> str | None:
    """The checkout's commit (with '+dirty' for uncommitted changes), or None outside git."""
    def git(*args):
        return subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True, timeout=10)
    try:
        rev = git("rev-parse", "--short", "HEAD")
        if rev.returncode != 0:
            return None
        dirty = git("status", "--porcelain", "--untracked-files=no").stdout.strip()
        return rev.stdout.strip() + ("+dirty" if dirty else "")
    except (OSError, subprocess.SubprocessError):
        return None


def device_name(device: torch.device) -> str:
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    name = platform.processor() or platform.machine()
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith("model name"):
                name = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"CPU {name} ({os.cpu_count()} cores, torch threads {torch.get_num_threads()})"


def jax_device() -> str | None:
    try:
        import jax

        d = jax.devices()[0]
        return f"{d.platform}:{d.device_kind}"
    except Exception as e:
        return f"unavailable ({type(e).__name__})"


def environment(device: torch.device) -> dict:
    """Date, machine, versions, commit and command line: what every result file starts with."""
    return {"date": datetime.datetime.now().astimezone().isoformat(timespec="seconds"),
            "device": str(device), "device_name": device_name(device), "jax_device": jax_device(),
            "versions": versions(), "git": git_revision(),
            "argv": [Path(sys.argv[0]).name, *sys.argv[1:]]}


def header(env: dict) -> list[str]:
    return [f"# {env['date']}  device: {env['device_name']}   jax device: {env['jax_device']}",
            "# versions: " + ", ".join(f"{k} {v}" for k, v in env["versions"].items() if v)
            + (f"; gateloop_hybrid at {env['git']}" if env.get("git") else ""),
            "# command: " + " ".join(env["argv"])]
