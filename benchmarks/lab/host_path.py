"""What a small call costs the host: torch's two ways to make a differentiable op, and
gate_loop_scan's own path to the Mosaic kernels.

    python benchmarks/lab/host_path.py [--device cpu|cuda] [--json PATH]

1. The same op, whose body only allocates its outputs as a kernel launch does (h (B, N, D) and
   h_last (B, D); backward dx), written as a ``torch.autograd.Function`` (with and without
   ``once_differentiable``) and as a ``torch.library.custom_op`` with ``register_autograd``:
   forward without grad, forward with grad, and forward+backward, beside ``x + x`` and
   ``torch.cumsum``'s forward+backward.
2. ``gate_loop_scan(backend="pallas")``: on a GPU, the Mosaic kernels; on a CPU, routed to the
   Mosaic path with its launches replaced by the same allocations, which leaves the package's
   Python between the call and the launch (the checks, the route, the plan lookup, the pair
   views, the autograd hand-off). ``--profile K`` lists where its forward+backward spends the
   host's time.

Timing: 2,000-20,000 back-to-back calls, then a device synchronisation, best of 7 repetitions,
per call in microseconds. Shape 1x16x128 (the Mosaic kernels' smallest feature tile).
"""

from __future__ import annotations

import argparse
import cProfile
import datetime
import json
import platform
import pstats
import timeit

import torch

B, N, D = 1, 16, 128


def per_call_us(fn, device, calls):
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)

    def block():
        for _ in range(calls):
            fn()
        sync()
    block()
    return min(timeit.repeat(block, number=1, repeat=7)) / calls * 1e6


def autograd_ways(device):
    """The same stand-in op, once per way of making it differentiable."""
    def body():
        return torch.empty(B, N, D, device=device), torch.empty(B, D, device=device)

    class Plain(torch.autograd.Function):
        @staticmethod
        def forward(ctx, x):
            ctx.save_for_backward(x)
            return body()

        @staticmethod
        def backward(ctx, gh, gl):
            x, = ctx.saved_tensors
            return torch.empty_like(x)

    class Once(Plain):
        backward = staticmethod(torch.autograd.function.once_differentiable(Plain.backward))

    @torch.library.custom_op("host_path_probe::op", mutates_args=())
    def op(x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return body()

    @op.register_fake
    def _(x):
        return body()

    @torch.library.custom_op("host_path_probe::op_backward", mutates_args=())
    def op_backward(x: torch.Tensor, gh: torch.Tensor) -> torch.Tensor:
        return torch.empty_like(x)

    def setup_context(ctx, inputs, output):
        ctx.save_for_backward(inputs[0])

    op.register_autograd(lambda ctx, gh, gl: op_backward(ctx.saved_tensors[0], gh), setup_context=setup_context)
    return {"autograd.Function + once_differentiable": Once.apply, "autograd.Function": Plain.apply,
            "torch.library.custom_op": op}


def stub_mosaic_launches():
    """gate_loop_scan on CPU tensors routed to the Mosaic op, whose launches only allocate."""
    from gateloop_hybrid import routing
    from gateloop_hybrid.ops import mosaic as mosaic_op

    def outputs(walk):
        if walk.backward:
            return torch.empty(B, N, D), torch.empty(B, N, D)
        return torch.empty(B, N, D), torch.empty(B, D)

    class Allocating:
        def __call__(self, *tensors, stage, walk, out_dtypes):
            return outputs(mosaic_op.mosaic_scan.Walk(*walk))

        def bind(self, *tensors, stage, walk, out_dtypes):
            key = mosaic_op.mosaic_scan.Walk(*walk)
            return lambda tensors: outputs(key)

    mosaic_op._KERNEL = Allocating()
    route = routing.route
    routing.route = lambda op, backend="auto", **facts: (
        routing.Route("mosaic", "host_path probe") if op == "scan" else route(op, backend, **facts))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    p.add_argument("--json", default=None)
    p.add_argument("--profile", type=int, default=0, metavar="K",
                   help="also print the K functions with the most own time in gate_loop_scan's forward+backward")
    args = p.parse_args()
    device = torch.device(args.device)
    name = torch.cuda.get_device_name(device) if device.type == "cuda" else platform.processor() or "cpu"
    header = (f"host cost per call, {B}x{N}x{D} float32, on {name} ({device.type}); torch {torch.__version__}, "
              f"python {platform.python_version()}; {datetime.date.today()}")
    print(header)
    x = torch.randn(B, N, D, device=device)
    a = torch.rand(B, N, D, device=device)
    ct = torch.randn(B, N, D, device=device)
    xr, ar = x.clone().requires_grad_(), a.clone().requires_grad_()
    rows = []

    def row(name, fwd=None, fwd_grad=None, fwd_bwd=None):
        r = {"name": name}
        if fwd is not None:
            with torch.no_grad():
                r["fwd_us"] = per_call_us(fwd, device, 20000)
        if fwd_grad is not None:
            r["fwd_grad_us"] = per_call_us(fwd_grad, device, 20000)
        if fwd_bwd is not None:
            r["fwd_bwd_us"] = per_call_us(fwd_bwd, device, 4000)
        rows.append(r)
        cells = [f"{r[k]:9.2f}" if k in r else f"{'-':>9s}" for k in ("fwd_us", "fwd_grad_us", "fwd_bwd_us")]
        print(f"{name:44s} " + " ".join(cells), flush=True)

    print(f"{'':44s} {'fwd':>9s} {'fwd grad':>9s} {'fwd+bwd':>9s}  (us per call)")
    row("x + x", fwd=lambda: x + x)
    row("torch.cumsum", fwd=lambda: torch.cumsum(x, 1), fwd_grad=lambda: torch.cumsum(xr, 1),
        fwd_bwd=lambda: torch.cumsum(xr, 1).backward(ct))
    for name, f in autograd_ways(device).items():
        row(name, fwd=lambda f=f: f(x), fwd_grad=lambda f=f: f(xr), fwd_bwd=lambda f=f: f(xr)[0].backward(ct))
    from gateloop_hybrid.scan import gate_loop_scan
    if device.type == "cpu":
        stub_mosaic_launches()
    scan_fwd_bwd = lambda: gate_loop_scan(ar, xr, backend="pallas")[0].backward(ct)
    row("gate_loop_scan[pallas]" + (", launches stubbed" if device.type == "cpu" else ""),
        fwd=lambda: gate_loop_scan(a, x, backend="pallas"), fwd_grad=lambda: gate_loop_scan(ar, xr, backend="pallas"),
        fwd_bwd=scan_fwd_bwd)
    if args.profile:
        profile = cProfile.Profile()
        profile.enable()
        for _ in range(2000):
            scan_fwd_bwd()
        profile.disable()
        print("\ngate_loop_scan forward+backward, 2000 calls, by own time:")
        pstats.Stats(profile).sort_stats("tottime").print_stats(args.profile)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"header": header, "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
