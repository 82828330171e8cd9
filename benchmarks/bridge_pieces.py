"""The bridge's per-call host cost, piece by piece (a diagnostic beside bridge_overhead.py).

    python benchmarks/bridge_pieces.py [--device cuda] [--shapes 1x16x16,4x4096x1024]

Each line times one piece of a bridged call of the JAX scan in a loop of its own: "host" is the
mean wall time per iteration before the final synchronization (what the Python thread spends),
"+sync" includes waiting for the device at the end. Comparing the sum of the pieces with the
whole calls ("bridge fwd+bwd") shows how much the pieces cost when they run together.
"""

from __future__ import annotations

import argparse
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bridge  # noqa: E402  (sets JAX's GPU memory policy first)
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402

from bridge.convert import _find_fast_paths, exchange, prepare  # noqa: E402
from bridge.function import _saved_residuals  # noqa: E402
from gateloop_hybrid.scan.jax_scan import gate_loop_scan as jax_scan  # noqa: E402


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--shapes", default=None, help="BxNxD list (default 1x16x16 and a large one)")
    args = p.parse_args()
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


if __name__ == "__main__":
    main()
