"""Where a run computes: the torch device for --device, CPU threads, bf16 autocast, seeded sampling,
JAX's device for --framework jax, and peak memory for the metrics."""

from __future__ import annotations

import contextlib
import os
import sys

import torch

from .errors import ConfigError

# device types that hold no values (shapes only): a model there cannot compute a loss
NO_DATA_DEVICES = ("meta",)


def check_device(name: str) -> torch.device:
    """The torch device for --device, or ConfigError when this machine has no such device."""
    if name == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {name}: not a torch device (cpu, cuda, cuda:1, ...)") from None
    if device.type in NO_DATA_DEVICES:
        raise ConfigError(f"--device {name}: holds tensor shapes but no values, so nothing can be trained or "
                          f"sampled there; choose cpu or cuda")
    if device.type == "cuda":
        if not torch.cuda.is_available():
            raise ConfigError(f"--device {name}: CUDA is not available on this machine")
        if device.index is not None and device.index >= torch.cuda.device_count():
            raise ConfigError(f"--device {name}: this machine has {torch.cuda.device_count()} CUDA device(s)")
    elif device.type != "cpu":
        try:  # a value that goes there and comes back: a device that computes
            ok = torch.ones(1, device=device).add(1).cpu().item() == 2.0
        except Exception:  # noqa: BLE001 - any backend's failure means the same thing here
            ok = False
        if not ok:
            raise ConfigError(f"--device {name}: not available on this machine") from None
    return device


def default_threads() -> int:
    """Threads for torch on the CPU when --threads is not given: the cores not busy right now."""
    try:
        cores = len(os.sched_getaffinity(0))
    except AttributeError:  # not Linux
        cores = os.cpu_count() or 1
    try:
        busy = os.getloadavg()[0]
    except (AttributeError, OSError):
        busy = 0.0
    return max(1, min(cores, int(cores - busy + 0.5)))


def set_threads(cfg, device: torch.device) -> int:
    """Apply cfg.threads (--threads, or the default) to torch on the CPU; returns the number in use."""
    if device.type == "cpu":
        if cfg.threads is not None:
            torch.set_num_threads(cfg.threads)
        elif not os.environ.get("OMP_NUM_THREADS"):
            torch.set_num_threads(default_threads())
    return torch.get_num_threads()


def autocast(device: torch.device, bf16: bool | None):
    """bf16 autocast on `device` when asked for (None: on for CUDA, off for the CPU)."""
    enabled = device.type == "cuda" if bf16 is None else bf16
    if not enabled:
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=torch.bfloat16)


@contextlib.contextmanager
def seeded_rng(device: torch.device, seed: int):
    """Run the body with torch's global RNG (CPU, and the model's GPU) seeded with `seed`, and put
    the previous state back afterwards: samples neither depend on nor disturb the training stream."""
    devices = []
    if device.type == "cuda":
        devices = [device.index if device.index is not None else torch.cuda.current_device()]
    with torch.random.fork_rng(devices=devices):
        torch.manual_seed(seed)
        yield


def jax_device(jax, name: str):
    """JAX's device for --device: auto (JAX's default), cpu, cuda or cuda:i (JAX's GPU i)."""
    if name == "auto":
        return jax.devices()[0]
    try:
        device = torch.device(name)
    except (RuntimeError, ValueError, TypeError):
        raise ConfigError(f"--device {name}: not a device name (cpu, cuda, cuda:1, ...)") from None
    if device.type not in ("cpu", "cuda"):
        raise ConfigError(f"--device {name}: --framework jax runs on cpu or cuda")
    try:
        devices = jax.devices("cpu" if device.type == "cpu" else "gpu")
    except RuntimeError:
        raise ConfigError(f"--device {name}: JAX has no GPU backend here (pip install 'gateloop-hybrid[cuda,jax]')") from None
    index = device.index or 0
    if index >= len(devices):
        raise ConfigError(f"--device {name}: JAX sees {len(devices)} device(s) of that kind")
    return devices[index]


def peak_memory(device: torch.device) -> dict:
    """Peak memory so far: torch's allocator, and JAX's when the scan brought JAX in."""
    out = {}
    if device.type == "cuda":
        out["peak_mem_bytes"] = torch.cuda.max_memory_allocated(device)
    if "jax" in sys.modules and device.type == "cuda":
        try:
            jax = sys.modules["jax"]
            index = device.index if device.index is not None else torch.cuda.current_device()
            # the JAX device that is this GPU: the same CUDA device ordinal (see bridge.convert)
            devs = [d for d in jax.devices() if d.platform == "gpu" and d.local_hardware_id == index]
            stats = devs[0].memory_stats() if devs else None
            if stats and "peak_bytes_in_use" in stats:
                out["jax_peak_mem_bytes"] = int(stats["peak_bytes_in_use"])
        except Exception:  # memory stats are a nicety; never fail a run over them
            pass
    return out
