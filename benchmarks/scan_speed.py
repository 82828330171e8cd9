"""Every way to run the GateLoop scan h_t = a_t * h_{t-1} + x_t, side by side, against the floor.

    python benchmarks/scan_speed.py                       # CPU or GPU defaults
    python benchmarks/scan_speed.py --device cuda --json out.json --plot out.png
    python benchmarks/scan_speed.py --shapes 4x4096x1024 --dtypes float32 --backends jax,jax-native

For each case (dtype, B, N, D) and each implementation (benchmarks/scan_impls.py) it measures the
forward and the forward+backward (gradients wrt a and x for a random cotangent):

- time: median and interquartile range over repetitions after two warm-up calls (the first
  call's time, compilation included, is kept as `first_s`); each repetition runs the call
  `inner` times back to back between device synchronisations (torch.cuda.synchronize, and
  jax.block_until_ready on JAX outputs) and reports the mean (benchmarks/harness.py);
- error: max |y - y_ref| / max |y_ref| against the package's float64 reference
  (gateloop_hybrid.scan.reference), for h (fwd) and for the worse of da, dx (fwd+bwd);
- peak memory above the inputs: torch.cuda.max_memory_allocated for torch code; for JAX,
  natively XLA's compiled memory_analysis (temp + output bytes), through the bridge the growth
  of JAX's peak_bytes_in_use (an upper bound, marked <=, when the peak did not grow);
- x floor: time over the memory floor, 3 x (bytes of one tensor) forward and 8 x forward+backward,
  at the copy bandwidth measured at the start of the same run.

Gates are sigmoid(randn) in (0, 1), times exp(i * uniform(-pi, pi)) for complex; x and the
cotangent are randn. Cases that an implementation cannot run appear with the reason.
"""

from __future__ import annotations

import argparse
import gc
import json
import math
import os
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import traceback
from pathlib import Path

import torch

import harness
import plots
import scan_impls
from gateloop_hybrid.scan.reference import scan_reference, scan_reference_vjp
from scan_impls import Case

DTYPES = ("float32", "complex64", "bfloat16")
# The default grid, in the order it runs (most wanted first, so --max-minutes cuts the least):
# core shapes in float32, complex64, then an N sweep at B=4, D=1024 (with 4x4096x1024), then bf16.
GPU_CORE = ["4x4096x1024", "1x65536x512", "16x1024x1024"]
GPU_SWEEP = [f"4x{n}x1024" for n in (256, 1024, 16384)]
GPU_GRID = ([(s, d, True) for d in ("float32", "complex64") for s in GPU_CORE]
            + [(s, d, False) for d in ("float32", "complex64") for s in GPU_SWEEP]
            + [(s, "bfloat16", True) for s in GPU_CORE])
CPU_GRID = [(s, d, core) for d in ("float32", "complex64")
            for s, core in (("2x512x64", True), ("2x128x64", False))]


# --------------------------------------------------------------------------------------------
# inputs and the float64 reference


def make_inputs(case: Case, device: torch.device, seed: int = 0):
    """a (gates, |a| in (0,1)), x and a cotangent ct, all (B, N, D) in the case's dtype."""
    g = torch.Generator(device=device).manual_seed(seed)
    shape = (case.B, case.N, case.D)

    def randn():
        return torch.randn(shape, generator=g, dtype=torch.float32, device=device)

    mag = torch.sigmoid(randn())
    if case.is_complex:
        phase = (torch.rand(shape, generator=g, dtype=torch.float32, device=device) * 2 - 1) * math.pi
        a = torch.polar(mag, phase)
        x = torch.complex(randn(), randn())
        ct = torch.complex(randn(), randn())
    else:
        a, x, ct = mag, randn(), randn()
    dt = case.torch_dtype
    return a.to(dt), x.to(dt), ct.to(dt)


def reference(a: torch.Tensor, x: torch.Tensor, ct: torch.Tensor):
    """float64 h and the torch-convention gradients (da, dx) of <ct, h>, from the package's
    sequential reference and its hand-written backward."""
    wide = torch.complex128 if a.is_complex() or x.is_complex() else torch.float64
    a, x, ct = (t.to(wide) for t in (a, x, ct))
    h, _ = scan_reference(a, x)
    da, dx, _ = scan_reference_vjp(a, x, None, h, ct, None)
    return h, (da, dx)


class CaseData:
    """One case's inputs, shared by every implementation, and its reference, made on first use."""

    def __init__(self, case: Case, device: torch.device):
        self.a, self.x, self.ct = make_inputs(case, device)
        self._ref = None

    @property
    def ref(self):
        if self._ref is None:
            self._ref = reference(self.a, self.x, self.ct)
        return self._ref


def rel_err(y: torch.Tensor, ref: torch.Tensor) -> float:
    y = y.detach().to(device=ref.device, dtype=ref.dtype if ref.is_complex() or not y.is_complex()
                      else torch.complex128)
    if y.shape != ref.shape:
        raise ValueError(f"shape {tuple(y.shape)} != reference {tuple(ref.shape)}")
    return float((y - ref).abs().max() / ref.abs().max().clamp_min(1e-300))


# --------------------------------------------------------------------------------------------
# memory


def torch_peak(fn, wait, device):
    """Bytes allocated by torch above what was live before one call (None off CUDA)."""
    if device.type != "cuda":
        out = fn()
        wait(out)
        return None
    gc.collect()
    torch.cuda.synchronize(device)
    base = torch.cuda.memory_allocated(device)
    torch.cuda.reset_peak_memory_stats(device)
    out = fn()
    wait(out)
    peak = torch.cuda.max_memory_allocated(device) - base
    del out
    return peak


def jax_stats():
    try:
        import jax

        s = jax.devices()[0].memory_stats()
        return (s.get("bytes_in_use", 0), s.get("peak_bytes_in_use", 0)) if s else None
    except Exception:
        return None


def memory(prep, which: str, fn, device):
    """(bytes, how) for one call of fn; how names the method (see the module docstring)."""
    if prep.static_memory is not None:
        out = fn()
        prep.wait(out)
        return prep.static_memory(which), "xla"
    before = jax_stats() if prep.uses_jax else None
    t = torch_peak(fn, prep.wait, device)
    if before is None:
        return t, ("torch" if t is not None else None)
    after = jax_stats()
    in_use, peak_before = before
    grew = after[1] > peak_before
    j = after[1] - in_use
    return (t or 0) + j, ("torch+jax" if grew else "<=torch+jax")


def measure_bandwidth(device: torch.device) -> float:
    """Bytes per second of a device-to-device copy, counting bytes read and written."""
    nbytes = (2 << 30) if device.type == "cuda" else (256 << 20)
    src = torch.empty(nbytes // 4, dtype=torch.float32, device=device).uniform_()
    dst = torch.empty_like(src)
    _, times, _ = harness.measure(lambda: dst.copy_(src), harness.device_wait(device), reps=10,
                                  budget_s=2.0)
    return 2 * nbytes / statistics.median(times)


# --------------------------------------------------------------------------------------------
# the run


def new_row(name: str, key: str, group: str, case: Case, status: str = "ok", reason=None) -> dict:
    """A result row before measurement: which implementation, which case, its status."""
    return {"impl": name, "key": key, "group": group, "dtype": case.dtype,
            "B": case.B, "N": case.N, "D": case.D, "status": status, "reason": reason}


def run_one(impl, case: Case, data: CaseData, device, args, bw: float, passes):
    row = new_row(impl.name, impl.key, impl.group, case)
    reason = impl.skip_reason(case, device)
    if reason is None and not impl.sweep and not case.core and not args.full:
        reason = "skipped: a comparison row, run on the main shapes only (--full runs it here)"
    if reason is None and impl.python_loop and case.N > args.loop_max_n:
        reason = f"skipped: N > --loop-max-n {args.loop_max_n} (one launch per step)"
    if reason is None and args.deadline and time.time() > args.deadline:
        reason = "skipped: --max-minutes reached"
    if reason is not None:
        row.update(status="skipped", reason=reason)
        return row
    try:
        prep = impl.prepare(data.a, data.x, data.ct)
    except Exception as e:
        row.update(status="failed", reason=f"prepare: {type(e).__name__}: {scan_impls.first_line(e)}")
        _debug(args)
        return row
    floors = {"fwd": 3 * case.tensor_bytes / bw, "fwdbwd": 8 * case.tensor_bytes / bw}
    for which in passes:
        fn = prep.fwd if which == "fwd" else prep.fwdbwd
        res = {}

        def check(out, which=which, res=res):
            try:
                ref = data.ref
                if which == "fwd":
                    res["rel_err"] = rel_err(prep.h_of(out), ref[0])
                else:
                    da, dx = prep.grads_of(out)
                    res["rel_err_da"] = rel_err(da, ref[1][0])
                    res["rel_err_dx"] = rel_err(dx, ref[1][1])
                    res["rel_err"] = max(res["rel_err_da"], res["rel_err_dx"])
            except Exception as e:
                res["rel_err_error"] = f"{type(e).__name__}: {scan_impls.first_line(e)}"
                _debug(args)

        def peak(fn, which=which, res=res):
            try:
                res["peak_bytes"], res["peak_how"] = memory(prep, which, fn, device)
            except Exception as e:
                if _is_oom(e):
                    raise
                res["peak_bytes"], res["peak_how"] = None, type(e).__name__

        try:
            first, times, inner = harness.measure(fn, prep.wait, args.reps, args.budget, args.target_rep,
                                          check=check, peak=peak)
            res.update(harness.stats(times), first_s=first, inner=inner)
            res["x_floor"] = res["median_ms"] / 1e3 / floors[which]
        except Exception as e:
            res["error"] = f"{type(e).__name__}: {scan_impls.first_line(e)}"
            _debug(args)
            row["status"] = "failed"
            _free(device)
        row[which] = res
    return row


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "RESOURCE_EXHAUSTED" in str(e) \
        or "out of memory" in str(e).lower()


def _free(device):
    gc.collect()
    if device.type == "cuda":
        torch.cuda.empty_cache()


def _debug(args):
    if args.verbose:
        traceback.print_exc()


# --------------------------------------------------------------------------------------------
# output


def fmt(r, what: str) -> str:
    """One cell of a pass's result r: "ms" (median ± half the IQR), "floor", "err" or "mem"."""
    if r is None or "error" in r:
        return "FAILED" if r is not None and what == "ms" else "-"
    if what == "ms":
        m, spread = r["median_ms"], (r["p75_ms"] - r["p25_ms"]) / 2 / max(r["median_ms"], 1e-12)
        return (f"{m:.3f}" if m < 10 else f"{m:.1f}" if m < 1000 else f"{m:.0f}") + f" ±{spread:.0%}"
    if what == "floor":
        return f"{r['x_floor']:.1f}" if "x_floor" in r else "-"
    if what == "err":
        return f"{r['rel_err']:.1e}" if "rel_err" in r else "?"
    if r.get("peak_bytes") is None:
        return "-"
    return ("<=" if str(r.get("peak_how", "")).startswith("<=") else "") + f"{r['peak_bytes'] / 2**20:.0f}"


def table(meta, rows) -> str:
    lines = [
        "# scan_speed", *harness.header(meta),
        f"# copy bandwidth (read+write): {meta['bandwidth_GBps']:.0f} GB/s; floor = 3x (fwd), "
        "8x (fwd+bwd) the bytes of one (B,N,D) tensor at that bandwidth",
        "# time: median ms ±half the interquartile range; err: max|y-ref|/max|ref| vs float64 "
        "(fwd: h, fwd+bwd: worse of da, dx); mem: peak MiB above inputs (<= upper bound)",
    ]
    for note in meta.get("notes", []):
        lines.append(f"# note: {note}")
    header = ("implementation", "fwd ms", "x floor", "err", "mem", "fwd+bwd ms", "x floor", "err",
              "mem", "first s")
    # an implementation skipped in every case for one reason is listed once, at the end
    reasons: dict = {}
    for r in rows:
        reasons.setdefault(r["impl"], set()).add(r["reason"] if r["status"] == "skipped" else None)
    everywhere = {k: next(iter(v)) for k, v in reasons.items() if len(v) == 1 and None not in v}
    groups: dict = {}
    for r in rows:
        groups.setdefault((r["dtype"], r["B"], r["D"], r["N"]), []).append(r)
    order = {d: i for i, d in enumerate(DTYPES)}
    for (dt, B, D, N), rs in sorted(groups.items(), key=lambda kv: (order.get(kv[0][0], 9), kv[0][1:])):
        c = Case(B, N, D, dt)
        lines.append("")
        flo = 3 * c.tensor_bytes / meta["bandwidth"] * 1e3
        lines.append(f"## {dt}  B={B} N={N} D={D}  (one tensor {c.tensor_bytes / 2**20:.0f} MiB; "
                     f"floor {flo:.3f} ms fwd, {flo * 8 / 3:.3f} ms fwd+bwd)")
        body, notes = [], []
        for r in rs:
            if r["impl"] in everywhere:
                continue
            if r["status"] == "skipped":
                notes.append(f"   {r['impl']}: {r['reason']}")
                continue
            f, b = r.get("fwd"), r.get("fwdbwd")
            first = max((p.get("first_s", 0) for p in (f, b) if p and "error" not in p), default=0)
            body.append((r["impl"], *(fmt(p, w) for p in (f, b) for w in ("ms", "floor", "err", "mem")),
                         f"{first:.1f}" if first else "-"))
            for which, p in (("fwd", f), ("fwd+bwd", b)):
                if p and "error" in p:
                    notes.append(f"   {r['impl']} {which} failed: {p['error']}")
                elif p and "rel_err_error" in p:
                    notes.append(f"   {r['impl']} {which} error check failed: {p['rel_err_error']}")
            if r.get("reason"):
                notes.append(f"   {r['impl']}: {r['reason']}")
        widths = [max(len(str(x)) for x in col) for col in zip(header, *body)] if body else []
        if body:
            lines.append("  ".join(h.ljust(w) if i == 0 else h.rjust(w)
                                   for i, (h, w) in enumerate(zip(header, widths))))
            for row in body:
                lines.append("  ".join(str(v).ljust(w) if i == 0 else str(v).rjust(w)
                                       for i, (v, w) in enumerate(zip(row, widths))))
        if notes:
            lines.append(" not run / failed here:")
            lines.extend(notes)
    if everywhere:
        lines.append("")
        lines.append("## not run in any case")
        lines.extend(f"   {k}: {v}" for k, v in everywhere.items())
    return "\n".join(lines)


# --------------------------------------------------------------------------------------------


def parse_shapes(s: str):
    out = []
    for item in s.split(","):
        item = item.strip().lower()
        if not item:
            continue
        try:
            B, N, D = (int(v) for v in item.split("x"))
        except ValueError:
            raise SystemExit(f"--shapes: {item!r} is not BxNxD, e.g. 4x4096x1024")
        out.append((B, N, D))
    return out


def merge_runs(runs: list) -> dict:
    """Several runs' JSON as one: the first run's meta, a note per run, all rows (each row's
    x floor stays that of the run that measured it)."""
    if len(runs) == 1:
        return runs[0]
    meta = dict(runs[0]["meta"])
    meta["notes"] = list(meta.get("notes", []))
    for i, run in enumerate(runs):
        m = run["meta"]
        meta["notes"].append(f"run {i + 1} of {len(runs)}: {len(run['results'])} rows, {m.get('date')}, "
                             f"copy bandwidth {m.get('bandwidth_GBps', 0):.0f} GB/s, "
                             f"git {m.get('git')}, argv: {' '.join(m.get('argv', []))}")
    meta["argv"] = ["merged: see notes"]
    return {"meta": meta, "results": [r for run in runs for r in run["results"]]}


def run_items(items, impls_by_key, device, args, bw, passes, on_row, on_start=None):
    """Measure each (case, implementation key) in order; inputs are made once per case."""
    data, current = None, None
    for case, key in items:
        if case != current:
            data = None
            _free(device)
            data, current = CaseData(case, device), case
        if on_start is not None:
            on_start(case, key)
        row = run_one(impls_by_key[key], case, data, device, args, bw, passes)
        _free(device)                          # what the implementation left, before the next
        on_row(row)


_CRASH_HOOK = "_SCAN_SPEED_TEST_CRASH_KEY"     # tests only: this implementation's run aborts


def worker(plan_path):
    """The child process of --isolate: runs the plan's items, one JSON line per event."""
    plan = json.loads(Path(plan_path).read_text())
    args = argparse.Namespace(**plan["args"])
    args.deadline = plan["deadline"]
    device = torch.device(args.device)
    torch.autograd.set_multithreading_enabled(args.backward_thread == "worker")
    impls, _ = scan_impls.build(device)
    items = [(Case(**c), key) for c, key in plan["items"]]
    out = open(plan["out"], "a", buffering=1)

    def on_start(case, key):
        out.write(json.dumps({"start": key, "case": vars(case)}) + "\n")
        if os.environ.get(_CRASH_HOOK) == key:
            os.abort()

    run_items(items, {im.key: im for im in impls}, device, args, plan["bw"], plan["passes"],
              lambda row: out.write(json.dumps({"row": row}) + "\n"), on_start)
    return 0


def run_isolated(items, labels, args, bw, passes, on_row, on_start):
    """Run the items in child processes; after a crash, record the item that was running as
    failed and start a new child for the rest."""
    remaining = list(items)
    child_args = {k: v for k, v in vars(args).items() if k not in ("deadline", "worker")}
    with tempfile.TemporaryDirectory(prefix="scan_speed_") as tmp:
        for attempt in range(len(items) + 1):
            if not remaining:
                return
            plan_path, out_path, err_path = (Path(tmp) / f"{n}{attempt}" for n in ("plan", "out", "err"))
            plan_path.write_text(json.dumps({
                "items": [[vars(c), k] for c, k in remaining], "args": child_args,
                "deadline": args.deadline, "bw": bw, "passes": passes, "out": str(out_path)}))
            out_path.touch()
            with open(err_path, "w") as err:
                proc = subprocess.Popen([sys.executable, str(Path(__file__).resolve()), "--worker",
                                         str(plan_path)], stdout=subprocess.DEVNULL, stderr=err)
            seen, started, overdue = 0, None, False
            try:
                while True:
                    done = proc.poll() is not None
                    # the last piece is '' after a newline, else a line still being written
                    complete = out_path.read_text().split("\n")[:-1]
                    for line in complete[seen:]:
                        try:
                            event = json.loads(line)
                        except json.JSONDecodeError:    # a line cut by the crash
                            continue
                        if "start" in event:
                            started = (Case(**event["case"]), event["start"])
                            on_start(*started)
                        else:
                            on_row(event["row"])
                            remaining.pop(0)
                            started = None
                    seen = len(complete)
                    if done:
                        break
                    if args.deadline and time.time() > args.deadline + 120:   # a hung compile or kernel
                        overdue = True
                        proc.kill()
                    time.sleep(0.2)
            finally:
                if proc.poll() is None:                 # interrupted: stop the child too
                    proc.kill()
                    proc.wait()
            if proc.returncode == 0 or not remaining:
                continue
            how = ("still running 2 minutes past --max-minutes" if overdue
                   else f"signal {signal.Signals(-proc.returncode).name}" if proc.returncode < 0
                   else f"exit code {proc.returncode}")
            tail = [ln for ln in err_path.read_text(errors="replace").splitlines()
                    if "Error" in ln or "error" in ln]
            if seen == 0:       # died before measuring anything: the set-up is broken, not a kernel
                err_tail = err_path.read_text(errors="replace").strip().splitlines()[-5:]
                print(f"scan_speed: the worker process failed to start ({how}):\n  " + "\n  ".join(err_tail),
                      file=sys.stderr, flush=True)
                for case, key in remaining:
                    name, group = labels.get(key, (key, "?"))
                    on_row(new_row(name, key, group, case, status="failed",
                                   reason=f"the worker process failed to start ({how})"))
                return
            case, key = started or remaining[0]
            print(f"scan_speed: the worker died ({how}) during {case.label()} {key}; "
                  f"last error line: {tail[-1] if tail else '-'}", file=sys.stderr, flush=True)
            name, group = labels.get(key, (key, "?"))
            on_row(new_row(name, key, group, case, status="failed",
                           reason=f"the process died ({how}) while running it"
                                  + (f": {tail[-1].strip()[:160]}" if tail else "")
                                  + "; later rows ran in a new process"))
            remaining.pop(0)


# --------------------------------------------------------------------------------------------
# host cost: tiny calls back to back, where the time is the host's, against plain torch ops

HOST_SHAPES = ("1x16x16", "1x16x128")


def host_cost(device, backends, args) -> list:
    """Per-call time (us) of back-to-back tiny calls, forward (no grad) and forward+backward, of
    gate_loop_scan per backend beside torch's own ops (x + x; cumsum along time), in one process.
    One repetition is 200 calls then a device synchronisation, so the host's time dominates."""
    from gateloop_hybrid.scan import gate_loop_scan

    rows = []
    for shape in HOST_SHAPES:
        (B, N, D), = parse_shapes(shape)
        g = torch.Generator().manual_seed(0)
        a = torch.sigmoid(torch.randn(B, N, D, generator=g)).to(device)
        x = torch.randn(B, N, D, generator=g).to(device)
        ct = torch.randn(B, N, D, generator=g).to(device)
        ar, xr = a.clone().requires_grad_(), x.clone().requires_grad_()

        def fwd_bwd(f):
            return lambda: f(ar, xr).backward(ct)
        impls = {"torch add (x + x)": (lambda a, x: x + x, None),
                 "torch cumsum": (lambda a, x: torch.cumsum(x, 1), fwd_bwd(lambda a, x: torch.cumsum(x, 1)))}
        for b in backends:
            scan = (lambda b: lambda a, x: gate_loop_scan(a, x, backend=b)[0])(b)
            impls[f"gate_loop_scan[{b}]"] = (scan, fwd_bwd(scan))
        wait = harness.device_wait(device)
        for name, (fwd, fb) in impls.items():
            row = {"shape": shape, "name": name}
            try:
                with torch.no_grad():
                    row["fwd_us"] = 1e6 * statistics.median(
                        harness.measure(lambda: fwd(a, x), wait, args.reps, args.budget, 0.0, inner=200)[1])
                if fb is not None:
                    row["fwdbwd_us"] = 1e6 * statistics.median(
                        harness.measure(fb, wait, args.reps, args.budget, 0.0, inner=200)[1])
            except Exception as e:
                row["error"] = f"{type(e).__name__}: {str(e).splitlines()[0][:160] if str(e) else ''}"
            rows.append(row)
    return rows


def host_table(rows) -> str:
    out = ["## host cost: tiny calls back to back, us per call (ratio to torch's op in the same run)",
           f"{'shape':9s} {'implementation':28s} {'fwd us':>8s} {'/ add':>6s} {'fwd+bwd us':>11s} {'/ cumsum':>9s}"]
    for shape in dict.fromkeys(r["shape"] for r in rows):
        here = {r["name"]: r for r in rows if r["shape"] == shape}
        add = here.get("torch add (x + x)", {}).get("fwd_us")
        cum = here.get("torch cumsum", {}).get("fwdbwd_us")
        for name, r in here.items():
            f, fb = r.get("fwd_us"), r.get("fwdbwd_us")
            cells = [f"{f:8.1f}" if f else f"{'-':>8s}", f"{f / add:6.2f}" if f and add else f"{'':6s}",
                     f"{fb:11.1f}" if fb else f"{'-':>11s}", f"{fb / cum:9.2f}" if fb and cum else ""]
            out.append(f"{shape:9s} {name:28s} " + " ".join(cells) + (f"  {r['error']}" if "error" in r else ""))
    return "\n".join(out)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="auto", help="auto (cuda when available), cuda, cpu")
    p.add_argument("--dtypes", default=None,
                   help=f"comma list of {', '.join(DTYPES)} (default: the grid's)")
    p.add_argument("--shapes", default=None,
                   help="comma list of BxNxD. Default on GPU: float32 and complex64 at "
                        f"{', '.join(GPU_CORE)}, an N sweep {', '.join(GPU_SWEEP)}, and bfloat16 "
                        "at the first three; on CPU float32 and complex64 at 2x128x64, 2x512x64. "
                        "Given --shapes, every shape runs in each of --dtypes (default float32, "
                        "complex64)")
    p.add_argument("--full", action="store_true",
                   help="run the comparison rows that compile per shape (jax-autodiff) on the "
                        "sweep shapes too")
    p.add_argument("--backends", default="all",
                   help="comma list of implementation keys (see --list), or all")
    p.add_argument("--list", action="store_true", help="list implementation keys and exit")
    p.add_argument("--passes", default="fwd,fwdbwd", help="fwd, fwdbwd or both")
    p.add_argument("--reps", type=int, default=None, help="repetitions (default GPU 20, CPU 5)")
    p.add_argument("--budget", type=float, default=None,
                   help="seconds of timed repetitions per measurement, at least 3 reps "
                        "(default GPU 1, CPU 0.2)")
    p.add_argument("--target-rep", type=float, default=None,
                   help="seconds one repetition aims at by repeating the call (default GPU 0.002, CPU 0)")
    p.add_argument("--loop-max-n", type=int, default=None,
                   help="largest N for the per-step Python loops (default GPU 4096, CPU 1024)")
    p.add_argument("--max-minutes", type=float, default=None,
                   help="skip what has not started after this many minutes (default GPU 8, CPU none)")
    p.add_argument("--json", default=None, help="write results as JSON (rewritten after each case)")
    p.add_argument("--plot", default=None, help="write a PNG: time against N, log-log")
    p.add_argument("--from-json", default=None, metavar="PATH[,PATH...]",
                   help="run nothing: print the table of earlier --json runs (and --plot them); "
                        "several are merged, each row keeping its own run's x floor (with --json, "
                        "the merged results are written there)")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bar on stderr")
    p.add_argument("--verbose", action="store_true", help="print tracebacks of failures")
    p.add_argument("--isolate", choices=("auto", "yes", "no"), default="auto",
                   help="run the measurements in a child process, and start a new one after a "
                        "crash (a CUDA fault ends a process): the implementation that was running "
                        "gets a 'failed' row and the rest go on (auto: yes on GPU)")
    p.add_argument("--backward-thread", choices=("worker", "main"), default="worker",
                   help="where autograd runs backward, for every row: torch's per-device worker thread "
                        "(torch's default for CUDA) or the calling thread "
                        "(torch.autograd.set_multithreading_enabled(False), as train.py --main-thread-backward)")
    p.add_argument("--host", choices=("auto", "yes", "no"), default="auto",
                   help=f"also time tiny calls ({', '.join(HOST_SHAPES)}) back to back against torch "
                        "ops, for the host's cost per call (auto: yes on GPU)")
    p.add_argument("--worker", default=None, help=argparse.SUPPRESS)   # internal: a child's plan
    args = p.parse_args(argv)
    if args.worker:
        return worker(args.worker)

    if args.from_json:
        data = merge_runs([json.loads(Path(f).read_text()) for f in args.from_json.split(",") if f])
        if args.json:
            Path(args.json).write_text(json.dumps(data, separators=(",", ":")))
        print(table(data["meta"], data["results"]))
        if data["meta"].get("host"):
            print(host_table(data["meta"]["host"]))
        if args.plot:
            plots.scan_speed(data["meta"], data["results"], args.plot)
        return 0
    if args.device == "auto":
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    device = torch.device(args.device)
    gpu = device.type == "cuda"
    args.reps = args.reps or (20 if gpu else 5)
    args.budget = args.budget if args.budget is not None else (1.0 if gpu else 0.2)
    args.target_rep = args.target_rep if args.target_rep is not None else (2e-3 if gpu else 0.0)
    args.loop_max_n = args.loop_max_n or (4096 if gpu else 1024)
    if args.max_minutes is None:
        args.max_minutes = 8.0 if gpu else 0.0
    args.deadline = time.time() + 60 * args.max_minutes if args.max_minutes else None
    grid = GPU_GRID if gpu else CPU_GRID
    if args.dtypes:
        dtypes = [d.strip() for d in args.dtypes.split(",") if d.strip()]
        for d in dtypes:
            if d not in DTYPES:
                raise SystemExit(f"--dtypes: unknown {d!r}; choose from {', '.join(DTYPES)}")
        grid = [g for g in grid if g[1] in dtypes] if not args.shapes else grid
    if args.shapes:
        dtypes = dtypes if args.dtypes else ["float32", "complex64"]
        grid = [(s, d, True) for d in dtypes for s in args.shapes.split(",") if s.strip()]
    cases = [Case(*parse_shapes(s)[0], d, core) for s, d, core in grid]
    passes = [s.strip() for s in args.passes.split(",") if s.strip()]
    if not set(passes) <= {"fwd", "fwdbwd"}:
        raise SystemExit("--passes takes fwd, fwdbwd")

    torch.autograd.set_multithreading_enabled(args.backward_thread == "worker")
    impls, notes = scan_impls.build(device)
    if args.backward_thread == "main":
        notes.append("backward on the calling thread (torch.autograd.set_multithreading_enabled(False))")
    if args.list:
        for im in impls:
            print(f"{im.key:16s} {im.group:15s} {im.name}")
        return 0
    if args.backends != "all":
        wanted = [k.strip() for k in args.backends.split(",") if k.strip()]
        unknown = set(wanted) - {im.key for im in impls}
        if unknown:
            notes.append(f"--backends: no implementation named {', '.join(sorted(unknown))} "
                         f"(available: {', '.join(im.key for im in impls)})")
        impls = [im for im in impls if im.key in wanted]

    bw = measure_bandwidth(device)
    meta = {
        **harness.environment(device), "bandwidth": bw, "bandwidth_GBps": bw / 1e9, "notes": notes,
        "config": {k: v for k, v in vars(args).items() if k != "deadline"},
        "floor": "3 x bytes of one (B,N,D) tensor (fwd), 8 x (fwd+bwd), at the measured copy bandwidth",
    }
    rows: list = []

    def save():
        if args.json:
            Path(args.json).parent.mkdir(parents=True, exist_ok=True)
            Path(args.json).write_text(json.dumps({"meta": meta, "results": rows}, separators=(",", ":")))

    def on_term(signum, frame):
        raise KeyboardInterrupt(f"signal {signum}")

    signal.signal(signal.SIGTERM, on_term)
    isolate = args.isolate == "yes" or (args.isolate == "auto" and gpu)
    items = [(case, im.key) for case in cases for im in impls]
    meta["isolated"] = isolate
    bar = None
    if not args.no_progress:
        try:
            from tqdm import tqdm

            bar = tqdm(total=len(items), file=sys.stderr, unit="run", dynamic_ncols=True)
        except ImportError:
            bar = None

    def on_row(row):
        rows.append(row)
        if bar is not None:
            bar.update()
        save()

    def on_start(case, key):
        if bar is not None:
            bar.set_description(f"{case.label()} {key}")

    if args.host == "yes" or (args.host == "auto" and gpu):
        wanted = [im.name[len("gate_loop_scan["):-1] for im in impls if im.group == "gate_loop_scan"]
        meta["host"] = host_cost(device, [b for b in wanted if b not in ("loop", "heinsen")], args)
        print(host_table(meta["host"]), flush=True)
        save()
    try:
        if isolate:
            run_isolated(items, {im.key: (im.name, im.group) for im in impls}, args, bw, passes,
                         on_row, on_start)
        else:
            run_items(items, {im.key: im for im in impls}, device, args, bw, passes, on_row, on_start)
    except KeyboardInterrupt as e:
        meta["notes"].append(f"interrupted ({e}); partial results")
    finally:
        if bar is not None:
            bar.close()
        save()
        print(table(meta, rows), flush=True)
        if meta.get("host"):
            print(host_table(meta["host"]), flush=True)
        if args.plot and rows:
            try:
                plots.scan_speed(meta, rows, args.plot)
            except Exception as e:
                print(f"# plot failed: {type(e).__name__}: {e}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
