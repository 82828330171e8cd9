"""Experiments on the bridge's per-call cost that are not (yet) in the bridge: timed side by side.

    python benchmarks/bridge_experiments.py [--device cuda]

Each variant patches the bridge in this process only, then runs bridge_overhead.py's measurement
(tiny and large, forward and forward+backward, against native JAX):

- "default": the bridge as it is.
- "borrowed capsules": tensors go to JAX in DLPack capsules that this script builds, whose
  deleter is libc's free() of the capsule's own block, instead of torch's capsules, whose
  deleter releases the torch tensor and so must take the GIL on whatever thread JAX frees the
  buffer (on CUDA, a callback thread after the kernels finish). The hypothesis (README, "Bridge
  overhead"): those GIL hand-offs between threads are part of the cost that grows with the number
  of cores. Safe inside a bridged call because the caller holds the tensors for the call (and
  autograd holds the saved ones through backward), and every output makes torch's stream wait
  for JAX's computation, so freed memory is reused only after JAX's reads. Not safe for the
  public ``bridge.to_jax``, whose array may outlive the tensor: this stays an experiment.
- "single-threaded autograd": torch runs the backward of CUDA tensors on a worker thread per
  device, so every backward is a hand-off from the calling thread and back;
  ``torch.autograd.set_multithreading_enabled(False)`` (a user-level switch, not the bridge's to
  set) runs it on the calling thread. Measured here around the whole forward+backward.
- "GIL switch 10us": ``sys.setswitchinterval(1e-5)``: a thread waiting for the GIL gets it after
  10 us instead of 5 ms when the holder does not release it by itself.

H200 results (benchmarks/results/bridge_experiments_h200.txt): backward on the calling thread
cut the bridged forward+backward by about half; the borrowed capsules and the short switch
interval changed nothing beyond noise; the probe found no step that waits for the GPU.

``--probe`` (CUDA) first asks, step by step, whether the bridge makes the host wait for queued GPU
work: each step is timed on the host right after ~20 ms of matmuls were queued on the stream the
step depends on. A step whose host time is near the queued GPU time synchronizes.
"""

from __future__ import annotations

import argparse
import contextlib
import ctypes
import struct
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bridge_overhead  # noqa: E402  (imports bridge first)
import bridge.convert as convert  # noqa: E402

_libc = ctypes.CDLL(None)
_libc.malloc.restype = ctypes.c_void_p
_libc.malloc.argtypes = [ctypes.c_size_t]
_FREE = ctypes.cast(_libc.free, ctypes.c_void_p).value
_capsule_new = ctypes.pythonapi.PyCapsule_New
_capsule_new.restype = ctypes.py_object
_capsule_new.argtypes = [ctypes.c_void_p, ctypes.c_char_p, ctypes.c_void_p]
# DLManagedTensor (DLPack 0.x, x86-64/aarch64): data, device (type, id), ndim, dtype (code, bits,
# lanes), shape*, strides*, byte_offset, manager_ctx, deleter: 64 bytes, then shape and strides.
_HEADER = struct.Struct("<QiiiBBHQQQQQ")
_DL_CODES = {torch.float16: (2, 16), torch.bfloat16: (4, 16), torch.float32: (2, 32),
             torch.float64: (2, 64), torch.complex64: (5, 64), torch.complex128: (5, 128),
             torch.int8: (0, 8), torch.int16: (0, 16), torch.int32: (0, 32), torch.int64: (0, 64),
             torch.uint8: (1, 8), torch.bool: (6, 8)}


@contextlib.contextmanager
def switch_interval(seconds=1e-5):
    old = sys.getswitchinterval()
    sys.setswitchinterval(seconds)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def borrowed_capsule(t: torch.Tensor):
    """A "dltensor" capsule viewing t's memory, owning nothing but its own malloc'd block."""
    nd = t.dim()
    block = _libc.malloc(_HEADER.size + 16 * nd)
    code, bits = _DL_CODES[t.dtype]
    dl_type, dl_id = (2, t.device.index) if t.is_cuda else (1, 0)
    payload = (_HEADER.pack(t.data_ptr(), dl_type, dl_id, nd, code, bits, 1, block + 64,
                            block + 64 + 8 * nd, 0, 0, _FREE)
               + struct.pack(f"<{2 * nd}q", *t.shape, *t.stride()))
    ctypes.memmove(block, payload, len(payload))
    return _capsule_new(block, b"dltensor", None)


def host_wait_probe():
    import time
    import jax
    from bridge import jax2torch
    from bridge.convert import exchange, prepare
    big = torch.randn(4096, 4096, device="cuda") / 64

    def torch_busy():
        y = big
        for _ in range(40):
            y = y @ big
        return y

    @jax.jit
    def jax_busy(x):
        y = x
        for _ in range(40):
            y = y @ x
        return y

    jax_ident = jax.jit(lambda x: x * 2)
    jbig = exchange.to_jax([big])[0]
    bridged = jax2torch(lambda x: x * 2)
    leaf = big.clone().requires_grad_()

    def busy_then(step):
        def run():
            torch.cuda.synchronize(); jax.block_until_ready(jbig)
            t0 = time.perf_counter(); keep = step(); t1 = time.perf_counter()
            torch.cuda.synchronize(); jax.block_until_ready([k for k in keep if isinstance(k, jax.Array)])
            return (t1 - t0) * 1e3
        run()
        return min(run() for _ in range(5))

    steps = {
        "torch busy (launch only)": lambda: [torch_busy()],
        "jax busy (launch only)": lambda: [jax_busy(jbig)],
        "torch busy + to_jax(stream)": lambda: exchange.to_jax([torch_busy()], one_computation=True),
        "torch busy + to_jax + jit": lambda: [jax_ident(*exchange.to_jax([torch_busy()], one_computation=True))],
        "torch busy + to_jax + jit + del": lambda: (jax_ident(*exchange.to_jax([torch_busy()], one_computation=True)), [])[1],
        "jax busy + to_torch": lambda: [exchange.to_torch([jax_busy(jbig)])],
        "jax busy + to_torch + del array": lambda: [t for t in exchange.to_torch([jax_busy(jbig)])],
        "torch busy + bridged no-grad": lambda: [bridged(torch_busy())],
        "torch busy + bridged fwd (grad)": lambda: [bridged(leaf @ big)],
        "torch busy + bridged fwd+bwd": lambda: [torch.autograd.grad(bridged(leaf @ big).sum(), leaf)],
        "torch busy + torch fwd+bwd": lambda: [torch.autograd.grad((leaf @ big * 2).sum(), leaf)],
    }
    torch.cuda.synchronize()
    t0 = time.perf_counter(); torch_busy(); torch.cuda.synchronize()
    print(f"queued GPU work: torch busy {1e3 * (time.perf_counter() - t0):.1f} ms (synchronized)")
    for name, step in steps.items():
        print(f"  {name:<36} host {busy_then(step):8.2f} ms", flush=True)


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--reps", type=int, default=5)
    p.add_argument("--probe", action="store_true", help="first run the host-wait probe (CUDA)")
    args = p.parse_args()
    if args.probe:
        host_wait_probe()
    assert _HEADER.size == 64
    cases = {"tiny": ((1, 16, 16), 200),
             "large": ((4, 4096, 1024) if args.device == "cuda" else (4, 1024, 256), 20 if args.device == "cuda" else 3)}
    variants = {"default": (convert._to_dlpack, contextlib.nullcontext),
                "borrowed capsules": (borrowed_capsule, contextlib.nullcontext),
                "single-threaded autograd": (convert._to_dlpack,
                                             lambda: torch.autograd.set_multithreading_enabled(False)),
                "both": (borrowed_capsule, lambda: torch.autograd.set_multithreading_enabled(False)),
                "GIL switch 10us": (convert._to_dlpack, switch_interval)}
    print(f"{'variant':>24} {'case':>6} {'native fwd':>11} {'bridge fwd':>11} {'native f+b':>11} {'bridge f+b':>11}  (us per call)")
    for name, (to_dlpack, mode) in variants.items():
        convert._to_dlpack = to_dlpack
        for label, (shape, calls) in cases.items():
            with mode():
                r = bridge_overhead.measure(shape, args.device, calls, args.reps)
            print(f"{name:>24} {label:>6} " + " ".join(
                f"{r[k]['median_us']:11.1f}" for k in ("native_fwd", "bridge_fwd", "native_fwd_bwd", "bridge_fwd_bwd")),
                flush=True)


if __name__ == "__main__":
    main()
