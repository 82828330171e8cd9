"""Lab probe: host cost of back-to-back tiny calls (us per call) of gate_loop_scan[pallas] against
torch ops, in one process. Usage: python benchmarks/lab/host_cost_probe.py"""
import time
import torch
from gateloop_hybrid import explain
from gateloop_hybrid.scan import gate_loop_scan


def per_call_us(fn, k=3000):
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    t0 = time.perf_counter()
    for _ in range(k):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - t0) / k * 1e6


dev = torch.device("cuda")
print(explain("scan", "pallas", device=str(dev)))
for F in (16, 128):
    a = torch.rand(1, 16, F, device=dev) * 0.5 + 0.5
    x = torch.randn(1, 16, F, device=dev)
    g = torch.randn_like(x)
    ar, xr = a.clone().requires_grad_(), x.clone().requires_grad_()

    def scan_fb():
        h, _ = gate_loop_scan(ar, xr, backend="pallas")
        h.backward(g)

    def cumsum_fb():
        torch.cumsum(xr, 1).backward(g)
    with torch.no_grad():
        rows = {"torch add": per_call_us(lambda: x + x), "torch cumsum": per_call_us(lambda: torch.cumsum(x, 1)),
                "scan fwd": per_call_us(lambda: gate_loop_scan(a, x, backend="pallas"))}
    rows["torch cumsum fwd+bwd"] = per_call_us(cumsum_fb)
    rows["scan fwd+bwd"] = per_call_us(scan_fb)
    print(f"1x16x{F}:", {k: round(v, 1) for k, v in rows.items()},
          "ratios fwd/add %.2f, fwd+bwd/cumsum fwd+bwd %.2f" % (rows["scan fwd"] / rows["torch add"],
                                                                 rows["scan fwd+bwd"] / rows["torch cumsum fwd+bwd"]))
