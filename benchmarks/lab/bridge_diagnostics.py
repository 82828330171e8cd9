"""Diagnostics of the bridge's per-call host cost (beside bridge_overhead.py, which measures it).

    python benchmarks/lab/bridge_diagnostics.py pieces    [--device cuda] [--shapes 1x16x16,4x4096x1024]
    python benchmarks/lab/bridge_diagnostics.py in-flight [--device cuda] [--shape 1x16x16] [--calls 200]
    python benchmarks/lab/bridge_diagnostics.py probe     (CUDA)
    python benchmarks/lab/bridge_diagnostics.py variants  [--device cuda] [--reps 5]

pieces: each piece of a bridged call of the JAX scan timed in a loop of its own. "host" is the
    mean wall time per iteration before the final synchronization (what the Python thread
    spends), "+sync" includes waiting for the device. The sum of the pieces against the whole
    calls ("bridge fwd+bwd") shows what the pieces cost when they run together.
in-flight: the same pieces timed inside real forward+backward calls (host timers wrapped around
    the bridge's functions, no synchronization inside), and the threads each ran on.
probe: does any step make the host wait for queued GPU work? Each step is timed on the host right
    after ~250 ms of matmuls were queued on the stream it depends on; a step whose host time
    approaches that synchronizes.
variants: bridge_overhead's measurement (tiny and large, fwd and fwd+bwd, against native JAX)
    with changes that are not in the bridge, each patched in for this process only:
    - "borrowed capsules": DLPack capsules whose deleter is libc free() of the capsule's own
      block instead of torch's capsules, whose deleter releases the tensor and so takes the GIL
      on whatever thread JAX frees the buffer. Safe inside a bridged call (the caller holds the
      tensors; outputs make torch's stream wait for JAX), not for the public ``bridge.to_jax``.
    - "single-threaded autograd": ``torch.autograd.set_multithreading_enabled(False)`` (a
      user-level switch; train.py --main-thread-backward): backward runs on the calling thread
      instead of torch's worker thread per CUDA device.
    - "GIL switch 10us": ``sys.setswitchinterval(1e-5)``.
    - "no import events (unsafe)": every tensor imported with no stream, so no PJRT definition
      event and no torch->JAX stream hand-off. Unsafe in general (JAX may read a tensor before
      torch's queued work on it ends); safe here because the measured inputs are ready before
      the timing starts. It bounds what the ordering costs: the H200 pieces suggest that an
      export after a computation whose inputs carry definition events waits ~50 us for another
      thread (to_jax + plain + to_torch 170 us against 112 without the export, while exporting
      after a computation on kept arrays adds 7 us; results/h200/bridge_pieces.txt). If this variant is
      much faster, importing without events when torch's stream has no pending work
      (``torch.cuda.current_stream().query()``) would keep it safe.

H200 results (benchmarks/results/h200/): bridge_pieces.txt (`pieces`), bridge_in_flight.txt
(`in-flight`) and bridge_probe_variants.txt (`probe` and `variants`): no step waits for the GPU; torch's autograd
worker thread is the largest hand-off (single-threaded autograd halves a bridged fwd+bwd); the
borrowed capsules and the switch interval change nothing beyond noise.
"""

from __future__ import annotations

import argparse
import collections
import contextlib
import ctypes
import struct
import sys
import threading
import time

import torch

import bridge_overhead  # noqa: E402  (imports bridge first: JAX's GPU memory policy)
import bridge  # noqa: E402
import bridge.convert as convert  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bridge.convert import _find_fast_paths, exchange, prepare  # noqa: E402
from bridge.function import _saved_residuals  # noqa: E402
from gateloop_hybrid.kernels.jax_scan import scan_jax as jax_scan  # noqa: E402


# ---- pieces ---------------------------------------------------------------------------------

def pieces(args):
    dev = args.device
    cuda = dev == "cuda"
    shapes = args.shapes or ("1x16x16,4x4096x1024" if cuda else "1x16x16,2x1024x64")

    def sync():
        if cuda:
            torch.cuda.synchronize()

    def timed(name, fn, n):
        for _ in range(20):
            out = fn()
        sync()
        t0 = time.perf_counter()
        for _ in range(n):
            out = fn()
        t1 = time.perf_counter()
        if isinstance(out, jax.Array) or (isinstance(out, (list, tuple)) and out and isinstance(out[0], jax.Array)):
            jax.block_until_ready(out)
        sync()
        t2 = time.perf_counter()
        print(f"  {name:44s} host {(t1 - t0) / n * 1e6:8.1f} us   +sync {(t2 - t0) / n * 1e6:8.1f} us", flush=True)

    import_fn, _ = _find_fast_paths() or (None, None)
    for shape in shapes.split(","):
        B, N, D = map(int, shape.split("x"))
        n = 1000 if B * N * D < 1 << 20 else 100
        print(f"== {dev} {B}x{N}x{D} float32")
        a = torch.rand(B, N, D, device=dev)
        x = torch.randn(B, N, D, device=dev)
        ar, xr = a.clone().requires_grad_(), x.clone().requires_grad_()
        ct = (torch.randn_like(a), torch.randn(B, D, device=dev))
        f = bridge.jax2torch(jax_scan)
        spec, tensors = f._spec((a, x), {})
        spec.signature(tensors, False)
        sig = spec.signature([ar, xr], True)
        arrays = exchange.to_jax(tensors)
        link = exchange._links[a.device]
        ja, jx = jnp.array(arrays[0]), jnp.array(arrays[1])
        native = jax.jit(lambda a, x: jax_scan(a, x))

        timed("prepare x2", lambda: [prepare(t) for t in tensors], n)
        timed("exchange.to_jax x2 (one definition event)", lambda: exchange.to_jax(tensors, one_computation=True), n)
        timed("exchange.to_jax x2 (an event each)", lambda: exchange.to_jax(tensors), n)
        if import_fn is not None:
            timed("  of which: import x2 with no event", lambda: [import_fn(torch._C._to_dlpack(t), link.jax_device, None, link.dl_type) for t in tensors], n)
        if cuda:
            timed("  of which: torch->JAX stream hand-off", link.torch_to_jax_order, n)
        timed("jitted plain call, arrays kept", lambda: spec.plain(*arrays), n)
        timed("jitted vjp forward, arrays kept", lambda: spec.vjp_fwd(*arrays), n)
        timed("to_jax + plain", lambda: spec.plain(*exchange.to_jax(tensors, one_computation=True)), n)
        outs = spec.plain(*arrays)
        jax.block_until_ready(outs)
        timed("exchange.to_torch x2 of ready arrays", lambda: exchange.to_torch(outs), n)
        timed("to_jax + plain + to_torch", lambda: exchange.to_torch(spec.plain(*exchange.to_jax(tensors, one_computation=True))), n)
        if import_fn is not None:   # the same with no definition event (inputs are ready here)
            timed("import x2 (no event) + plain + to_torch", lambda: exchange.to_torch(spec.plain(
                *[import_fn(torch._C._to_dlpack(t), link.jax_device, None, link.dl_type) for t in tensors])), n)
        with torch.no_grad():
            timed("bridge call, no grad", lambda: f(a, x), n)
        timed("native jitted call (JAX arrays)", lambda: native(ja, jx), n)
        timed("bridge fwd (grad)", lambda: f(ar, xr), n)
        timed("bridge fwd+bwd", lambda: torch.autograd.grad(f(ar, xr), (ar, xr), ct), n)

        def torch_only():   # what torch's autograd engine costs for a one-op graph
            h = torch.cumsum(ar * xr, 1)
            return torch.autograd.grad((h, h[:, -1]), (ar, xr), ct)
        timed("torch-only graph fwd+bwd (cumsum)", torch_only, n)

        outs, extras, (ia, oa, ea) = spec.run([ar, xr], True, known=True, keep_arrays=True)
        res = _saved_residuals(sig, [ar, xr], outs, extras)
        res_arrays = _saved_residuals(sig, ia, oa, ea)
        timed("spec.run with vjp (the forward's work)", lambda: spec.run([ar, xr], True, known=True), n)
        timed("spec.run_bwd, main thread", lambda: spec.run_bwd(sig, res, ct, False, res_arrays), n)
        ct_arrays = exchange.to_jax(list(ct))
        timed("  of which: jitted backward", lambda: sig.bwd(res_arrays, ct_arrays), n)

        def side_thread():      # torch runs CUDA backward on its own device thread
            box = {}

            def work():
                if cuda:
                    torch.cuda.set_device(a.device)
                t0 = time.perf_counter()
                for _ in range(n):
                    spec.run_bwd(sig, res, ct, False, res_arrays)
                box["us"] = (time.perf_counter() - t0) / n * 1e6
            th = threading.Thread(target=work)
            th.start()
            th.join()
            return box["us"]
        side_thread()
        print(f"  {'spec.run_bwd, another thread':44s} host {side_thread():8.1f} us", flush=True)



# ---- in-flight ------------------------------------------------------------------------------

def in_flight(args):
    dev = args.device
    B, N, D = map(int, args.shape.split("x"))
    f = bridge.jax2torch(jax_scan)
    a, x = torch.rand(B, N, D, device=dev), torch.randn(B, N, D, device=dev)
    ar, xr = a.clone().requires_grad_(), x.clone().requires_grad_()
    cts = (torch.randn(B, N, D, device=dev), torch.randn(B, D, device=dev))
    for _ in range(3):
        torch.autograd.grad(f(ar, xr), (ar, xr), cts)
    spec, _ = f._spec((ar, xr), {})
    sig = spec.signature([ar, xr], True)
    acc = collections.defaultdict(float)
    threads = set()

    def wrap(name, fn):
        def timed(*a, **k):
            threads.add((name, threading.current_thread().name))
            t = time.perf_counter()
            r = fn(*a, **k)
            acc[name] += time.perf_counter() - t
            return r
        return timed

    unwrapped = {"to_jax": exchange.to_jax, "to_torch": exchange.to_torch}
    spec.vjp_fwd = wrap("jit fwd", spec.vjp_fwd)
    sig.bwd = wrap("jit bwd", sig.bwd)
    exchange.to_jax = wrap("exchange.to_jax", exchange.to_jax)
    exchange.to_torch = wrap("exchange.to_torch", exchange.to_torch)
    spec.run = wrap("spec.run (fwd)", spec.run)
    spec.run_bwd = wrap("spec.run_bwd", spec.run_bwd)

    def sync():
        if dev == "cuda":
            torch.cuda.synchronize()

    sync()
    t = time.perf_counter()
    for _ in range(args.calls):
        t0 = time.perf_counter()
        out = f(ar, xr)
        acc["f(...) forward"] += time.perf_counter() - t0
        t1 = time.perf_counter()
        torch.autograd.grad(out, (ar, xr), cts)
        acc["autograd.grad"] += time.perf_counter() - t1
    sync()
    total = time.perf_counter() - t
    print(f"bridged fwd+bwd of the jax scan, {dev}, shape {(B, N, D)}: host microseconds per call")
    for k, v in acc.items():
        print(f"  {k:22s} {v / args.calls * 1e6:9.1f}")
    print(f"  {'total (synchronized)':22s} {total / args.calls * 1e6:9.1f}")
    print("threads:", sorted(threads))

    # The exchange alone, outside a call: importing the two inputs, exporting one ready output.
    exchange.to_jax, exchange.to_torch = unwrapped["to_jax"], unwrapped["to_torch"]
    arrays = exchange.to_jax([a, x])
    jax.block_until_ready(arrays)
    for name, piece in (("exchange.to_jax of 2 inputs", lambda: exchange.to_jax([a, x])),
                        ("exchange.to_torch of 1 ready array", lambda: exchange.to_torch(arrays[:1]))):
        for _ in range(50):
            piece()
        sync()
        t = time.perf_counter()
        for _ in range(2000):
            piece()
        sync()
        print(f"  {name:34s} {(time.perf_counter() - t) / 2000 * 1e6:9.1f}")


# ---- probe ----------------------------------------------------------------------------------

def host_wait_probe():
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
    bridged = bridge.jax2torch(lambda x: x * 2)
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



# ---- variants -------------------------------------------------------------------------------

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
def no_import_events():
    original = exchange.to_jax

    def to_jax(tensors, *, one_computation=False):
        fast = exchange.fast()
        link = exchange._links.get(tensors[0].device) if tensors else None
        if not fast or link is None or not link.cuda:
            return original(tensors, one_computation=one_computation)
        import_fn, _ = fast
        return [import_fn(convert._to_dlpack(t), link.jax_device, None, link.dl_type) for t in tensors]
    exchange.to_jax = to_jax
    try:
        yield
    finally:
        exchange.to_jax = original


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


def variants(args):
    assert _HEADER.size == 64
    cases = {"tiny": ((1, 16, 16), 200),
             "large": ((4, 4096, 1024) if args.device == "cuda" else (4, 1024, 256), 20 if args.device == "cuda" else 3)}
    variants = {"default": (convert._to_dlpack, contextlib.nullcontext),
                "borrowed capsules": (borrowed_capsule, contextlib.nullcontext),
                "single-threaded autograd": (convert._to_dlpack,
                                             lambda: torch.autograd.set_multithreading_enabled(False)),
                "both": (borrowed_capsule, lambda: torch.autograd.set_multithreading_enabled(False)),
                "GIL switch 10us": (convert._to_dlpack, switch_interval),
                "no import events (unsafe)": (convert._to_dlpack, no_import_events)}
    print(f"{'variant':>24} {'case':>6} {'native fwd':>11} {'bridge fwd':>11} {'native f+b':>11} {'bridge f+b':>11}  (us per call)")
    original = convert._to_dlpack
    try:
        for name, (to_dlpack, mode) in variants.items():
            convert._to_dlpack = to_dlpack
            for label, (shape, calls) in cases.items():
                with mode():
                    r = bridge_overhead.measure(shape, args.device, calls, args.reps)
                print(f"{name:>24} {label:>6} " + " ".join(
                    f"{r[k]['median_us']:11.1f}"
                    for k in ("native_fwd", "bridge_fwd", "native_fwd_bwd", "bridge_fwd_bwd")), flush=True)
    finally:
        convert._to_dlpack = original


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="what", required=True)
    device = dict(default="cuda" if torch.cuda.is_available() else "cpu")
    q = sub.add_parser("pieces", help="each piece of a bridged call timed alone")
    q.add_argument("--device", **device)
    q.add_argument("--shapes", default=None, help="BxNxD list (default 1x16x16 and a large one)")
    q = sub.add_parser("in-flight", help="the pieces timed inside real forward+backward calls")
    q.add_argument("--device", **device)
    q.add_argument("--shape", default="1x16x16", help="BxNxD")
    q.add_argument("--calls", type=int, default=200)
    sub.add_parser("probe", help="does any bridge step wait for queued GPU work? (CUDA)")
    q = sub.add_parser("variants", help="bridge_overhead's measurement with experimental changes")
    q.add_argument("--device", **device)
    q.add_argument("--reps", type=int, default=5)
    args = p.parse_args()
    if args.what == "probe" and not torch.cuda.is_available():
        raise SystemExit("probe needs a CUDA device")
    {"pieces": pieces, "in-flight": in_flight, "probe": lambda _: host_wait_probe(),
     "variants": variants}[args.what](args)


if __name__ == "__main__":
    main()
