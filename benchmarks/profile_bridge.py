"""Where one bridged forward+backward spends its time (a diagnostic for bridge_overhead.py).

    python benchmarks/profile_bridge.py [--device cuda] [--shape 1,16,16]

Wraps the bridge's pieces with host timers (no synchronization inside, so on CUDA a piece that
waits for the device shows it) and prints the mean microseconds per call of each.
"""
import argparse
import collections
import sys
import threading
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import bridge  # noqa: E402
from bridge.convert import exchange  # noqa: E402
import jax  # noqa: E402
from gateloop_hybrid.scan.jax_scan import gate_loop_scan as jax_scan  # noqa: E402

p = argparse.ArgumentParser()
p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
p.add_argument("--shape", default="1,16,16")
p.add_argument("--calls", type=int, default=200)
args = p.parse_args()
dev = args.device
B, N, D = map(int, args.shape.split(","))
f = bridge.jax2torch(jax_scan)
a = torch.rand(B, N, D, device=dev); x = torch.randn(B, N, D, device=dev)
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
