"""The user-facing benchmarks run end to end on a CPU: benchmarks/scan_speed.py and model_speed.py (and lab probes that tests name).

pytest.ini puts benchmarks/ on the import path, as running a script there does."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import scan_speed
from scan_impls import Case
from gateloop_hybrid.scan.torch_scan import scan_loop

ROOT = Path(__file__).resolve().parent.parent
SCRIPT = ROOT / "benchmarks" / "scan_speed.py"


@pytest.mark.parametrize("dtype", ["float32", "complex64"])
def test_reference_gradients_equal_autograd_of_a_loop(dtype):
    """scan_speed's error column: the package's float64 reference, driven by one cotangent."""
    a, x, ct = scan_speed.make_inputs(Case(2, 5, 3, dtype), torch.device("cpu"), seed=1)
    wide = torch.complex128 if a.is_complex() else torch.float64
    a64 = a.to(wide).requires_grad_(True)
    x64 = x.to(wide).requires_grad_(True)
    h = scan_loop(a64, x64)[0]
    da, dx = torch.autograd.grad(h, (a64, x64), ct.to(wide))
    h_ref, (da_ref, dx_ref) = scan_speed.reference(a, x, ct)
    for name, got, want in (("h", h_ref, h), ("da", da_ref, da), ("dx", dx_ref, dx)):
        torch.testing.assert_close(got, want.detach(), rtol=1e-12, atol=1e-12, msg=name)


def test_inputs_are_random_gates_in_unit_disc():
    a, x, ct = scan_speed.make_inputs(Case(2, 64, 8, "complex64"), torch.device("cpu"))
    mag = a.abs()
    assert a.dtype == x.dtype == ct.dtype == torch.complex64
    assert (mag > 0).all() and (mag < 1).all()
    assert a.angle().std() > 1.0                      # spread phases, not all near zero
    assert x.abs().std() > 0 and ct.abs().std() > 0


@pytest.mark.slow
def test_cpu_run_end_to_end(tmp_path):
    """A tiny CPU run: every row is measured or carries a reason; outputs are written."""
    out_json, out_png = tmp_path / "r.json", tmp_path / "r.png"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "1x24x4",
           "--dtypes", "float32,complex64", "--reps", "3", "--budget", "0.05", "--no-progress",
           "--backends", "torch,loop,torch-loop,jax-native,accel-scalar,accel-complex+T,fla-chunk,pallas",
           "--json", str(out_json), "--plot", str(out_png)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "device: CPU" in proc.stdout and "copy bandwidth" in proc.stdout
    assert "# command: scan_speed.py --device cpu" in proc.stdout
    data = json.loads(out_json.read_text())
    meta, rows = data["meta"], data["results"]
    assert meta["versions"]["torch"] == torch.__version__ and meta["bandwidth"] > 0
    assert out_png.stat().st_size > 0
    assert {(r["dtype"], r["N"]) for r in rows} == {("float32", 24), ("complex64", 24)}
    by_key = {}
    for r in rows:
        by_key.setdefault(r["key"], []).append(r)
        if r["status"] == "skipped":
            assert r["reason"], r
            continue
        for which in ("fwd", "fwdbwd"):
            res = r[which]
            assert "error" not in res, (r["impl"], which, res)
            assert res["median_ms"] > 0 and res["reps"] >= 1 and res["x_floor"] > 0
            assert res["rel_err"] < 1e-5, (r["impl"], which, res["rel_err"])
    # the design's baseline always runs; peers absent or GPU-only are rows with a reason
    assert all(r["status"] == "ok" for r in by_key["torch-loop"])
    for key in ("accel-scalar", "accel-complex+T", "fla-chunk"):
        assert all(r["status"] == "skipped" and r["reason"] for r in by_key[key]), by_key[key]
    assert "accelerated-scan scalar (B,C,T): " in proc.stdout


def test_bad_shape_is_a_clear_error():
    """The script exits with this message (on stderr, status 1) before it measures anything."""
    with pytest.raises(SystemExit, match="BxNxD"):
        scan_speed.main(["--shapes", "4x4096", "--device", "cpu"])


def test_isolated_run_survives_a_crashing_implementation(tmp_path):
    """--isolate: a process-killing fault (a CUDA illegal address, say; here an abort injected into
    one implementation) becomes that implementation's 'failed' row, and the rest still run."""
    out_json = tmp_path / "r.json"
    cmd = [sys.executable, str(SCRIPT), "--device", "cpu", "--shapes", "1x24x4", "--dtypes", "float32",
           "--reps", "3", "--budget", "0.05", "--no-progress", "--isolate", "yes",
           "--backends", "torch,loop,torch-loop", "--backward-thread", "main", "--json", str(out_json)]
    env = {**os.environ, "_SCAN_SPEED_TEST_CRASH_KEY": "loop"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    data = json.loads(out_json.read_text())
    rows = {r["key"]: r for r in data["results"]}
    assert set(rows) == {"torch", "loop", "torch-loop"}
    assert any("backward on the calling thread" in n for n in data["meta"]["notes"])
    assert rows["loop"]["status"] == "failed" and "process died (signal SIGABRT)" in rows["loop"]["reason"]
    for key in ("torch", "torch-loop"):
        assert rows[key]["status"] == "ok" and rows[key]["fwdbwd"]["rel_err"] < 1e-5
    assert "worker died" in proc.stderr and "gate_loop_scan[loop]: the process died" in proc.stdout


def test_step_profile_runs_on_cpu():
    """benchmarks/lab/step_profile.py: both models step, and the scan's share is measured."""
    cmd = [sys.executable, str(SCRIPT.parent / "lab" / "step_profile.py"), "--device", "cpu", "--seq-len", "32",
           "--dim", "32", "--depth", "1", "--batch", "2", "--grad-accum", "1", "--steps", "2",
           "--scan-backends", "torch"]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert "# command: step_profile.py --device cpu" in proc.stdout
    lines = [ln.split() for ln in proc.stdout.splitlines()]
    assert any(ln[:2] == ["attention", "(sdpa)"] for ln in lines)
    rows = {ln[1]: ln for ln in lines if ln and ln[0] == "gateloop[torch]"}
    assert set(rows) == {"worker", "main"}             # --backward-thread both (default)
    for row in rows.values():
        assert float(row[2]) > 0 and float(row[4]) > 0 and row[5].endswith("%")


def test_rotated_kernels_probe_runs_on_cpu(tmp_path):
    """benchmarks/lab/rotated_kernels.py: every kernel of a two-segment walk and the op, in
    interpret mode, with bytes, FLOPs and a floor per kernel (the probe builds each kernel's
    arguments itself, so this keeps it in step with the kernels' signatures)."""
    pytest.importorskip("jax")
    out = tmp_path / "kernels.json"
    cmd = [sys.executable, str(SCRIPT.parent / "lab" / "rotated_kernels.py"), "--device", "cpu", "--shapes",
           "1x128x1x64", "--segments", "2", "--grouped", "false", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = {r["kernel"]: r for r in json.loads(out.read_text())["rows"]}
    assert set(rows) == {"summary", "forward", "backward_q", "summary_back", "backward_kv", "op (forward+backward)"}
    for name in ("forward", "backward_q", "backward_kv"):
        assert rows[name]["ms"] > 0 and rows[name]["bytes"] > 0 and rows[name]["flops"] > 0 and rows[name]["floor_ms"] > 0


def test_compile_grads_runs_on_cpu():
    """benchmarks/lab/compile_grads.py: eager and compiled gradients of wide heads (the chunked
    form) agree on a CPU (a row with a relative error, not an exception). Compiled with aot_eager
    (TORCH_COMPILE_OVERRIDE_BACKENDS): Inductor's C++ build of the chunked form took 48 s of CPU
    here (cold cache, 2-core machine), and the script's rows are the same either way."""
    cmd = [sys.executable, str(SCRIPT.parent / "lab" / "compile_grads.py"), "--device", "cpu", "--dim", "16",
           "--depth", "1", "--seq", "20", "--heads", "2", "--backends", "torch", "--modes", "default"]
    env = {**os.environ, "TORCH_COMPILE_OVERRIDE_BACKENDS": ">=0:aot_eager"}
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT, env=env)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = [ln.split() for ln in proc.stdout.splitlines() if ln.split()[:2] == ["2", "torch"]]
    assert len(rows) == 1 and rows[0][4] == "on" and float(rows[0][7]) < 1e-4, rows


def test_model_speed_runs_on_cpu(tmp_path):
    """benchmarks/model_speed.py: every model that is installed steps in each mode asked for, with
    tokens/s, the GateLoop/attention ratio, and its JSON."""
    out = tmp_path / "speed.json"
    cmd = [sys.executable, str(SCRIPT.parent / "model_speed.py"), "--device", "cpu", "--models", "gateloop,attention",
           "--modes", "eager,reduce-overhead", "--configs", "32x1", "--seq-lens", "32,16", "--tokens", "64",
           "--warmup", "1", "--steps", "2", "--no-recompute", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    # reduce-overhead needs CUDA: dropped on a CPU, so one row per (model, seq)
    assert sorted((r["model"], r["seq"], r["batch"]) for r in rows) == [
        ("attention", 16, 4), ("attention", 32, 2), ("gateloop", 16, 4), ("gateloop", 32, 2)]
    for r in rows:
        assert "error" not in r and r["tokens_per_s"] > 0 and math.isfinite(r["loss"]) and r["mode"] == "eager"
    assert [r["recompute"] for r in rows if r["model"] == "gateloop"] == [False, False]
    assert "gateloop (store) [eager]" in proc.stdout
    assert proc.stdout.count("gateloop/attention") == 2


def test_from_json_merges_runs(tmp_path, capsys):
    """--from-json a,b: one table from several runs; every row keeps its own run's x floor."""
    def run(bw, key, N):
        row = {"impl": key, "key": key, "group": "gate_loop_scan", "dtype": "float32", "B": 1, "N": N,
               "D": 4, "status": "ok", "reason": None,
               "fwd": {"median_ms": 1.0, "p25_ms": 1.0, "p75_ms": 1.0, "x_floor": bw, "rel_err": 1e-7,
                       "peak_bytes": None, "peak_how": None, "first_s": 0.1, "reps": 3}}
        return {"meta": {"date": "d", "device": "cpu", "device_name": "cpu", "jax_device": "cpu",
                         "versions": {"torch": "x"}, "git": "g", "bandwidth": bw * 1e9,
                         "bandwidth_GBps": bw, "argv": ["--x"], "notes": []}, "results": [row]}
    paths = []
    for i, (bw, key, n) in enumerate(((10.0, "torch", 8), (20.0, "loop", 16))):
        paths.append(tmp_path / f"r{i}.json")
        paths[-1].write_text(json.dumps(run(bw, key, n)))
    merged = scan_speed.merge_runs([json.loads(p.read_text()) for p in paths])
    assert [r["key"] for r in merged["results"]] == ["torch", "loop"]
    assert [r["fwd"]["x_floor"] for r in merged["results"]] == [10.0, 20.0]
    assert len(merged["meta"]["notes"]) == 2 and "20 GB/s" in merged["meta"]["notes"][1]
    out = tmp_path / "m.json"
    assert scan_speed.main(["--from-json", ",".join(map(str, paths)), "--json", str(out), "--passes", "fwd"]) == 0
    assert json.loads(out.read_text()) == merged
    table = capsys.readouterr().out.splitlines()       # the merged table too
    assert table[0] == "# scan_speed" and {"torch", "loop"} <= {line.split(" ")[0] for line in table}


def test_ddp_scaling_commands_and_table(tmp_path, capsys):
    """benchmarks/lab/ddp_scaling.py: one GPU plain, N GPUs under torchrun (--fsdp for the fsdp case);
    its table reads train.py's metrics and divides by N x the one-GPU tokens/s."""
    sys.path.insert(0, str(ROOT / "benchmarks" / "lab"))
    try:
        import ddp_scaling
    finally:
        sys.path.pop(0)
    assert ddp_scaling.main(["--dry-run", "--out", str(tmp_path), "--gpus", "4", "--cases", "gateloop", "fsdp"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert len(lines) == 4 and "torch.distributed.run" not in lines[0] and "--nproc_per_node 4" in lines[1]
    assert "--fsdp" in lines[3] and "--fsdp" not in lines[1] and all("--seq-len 4096" in line for line in lines)
    for name, ranks, parallel, tps in (("gateloop-1gpu", 1, None, 1000.0), ("gateloop-2gpu", 2, "ddp", 1800.0)):
        (tmp_path / name).mkdir()
        (tmp_path / name / "metrics.jsonl").write_text("\n".join(json.dumps(r) for r in (
            dict(kind="start", ranks=ranks, parallel=parallel, params=2e7, device_name="GPU", torch="2.x"),
            dict(kind="end", step=50, steady_tokens_per_s=tps, peak_mem_bytes=2 ** 30))) + "\n")
    text = ddp_scaling.summarise(tmp_path)
    assert "| gateloop-2gpu | 2 | ddp | 20.00M | 50 | 1,800 | 0.90 | 1.00 | 0.00 |" in text, text
    # without --data and without GCIDE: the bundled text repeated, long enough for seq 4096
    path = ddp_scaling.data_file(None, tmp_path / "runs")
    if path != ddp_scaling.GCIDE:
        sys.path.insert(0, str(ROOT))
        try:
            import train
        finally:
            sys.path.pop(0)
        _, val = train.split_data(*train.read_bytes(path))
        assert path.stat().st_size == ddp_scaling.REPEATED_BYTES and len(val) > 4096 + 2


def test_wide_heads_runs_on_cpu_and_reports_a_form_it_cannot_run(tmp_path):
    """benchmarks/wide_heads.py: each form asked for is timed or reported as failed with its
    reason (the kernels need a GPU that passed their self-test), and the JSON holds both."""
    out = tmp_path / "wide.json"
    cmd = [sys.executable, str(SCRIPT.parent / "wide_heads.py"), "--device", "cpu", "--shapes", "1x64x2x64",
           "--forms", "kernels,kernels-compiled,sdpa", "--repeats", "1", "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    results = {r["form"]: r for r in json.loads(out.read_text())["results"]}
    assert "the route takes 'chunked'" in results["kernels"]["error"]
    assert "the route takes 'chunked'" in results["kernels-compiled"]["error"]
    assert results["sdpa"]["wall_ms"] > 0 and results["sdpa"]["device_ms"] is None


def test_generate_speed_runs_on_cpu(tmp_path):
    """benchmarks/generate_speed.py: every model, batch and context asked for, with the state's
    bytes (a GateLoop state's the same at every context) and the JSON."""
    out = tmp_path / "gen.json"
    cmd = [sys.executable, str(SCRIPT.parent / "generate_speed.py"), "--device", "cpu", "--dim", "32", "--depth", "1",
           "--batches", "1,2", "--contexts", "8,32", "--new-tokens", "2", "--warmup", "1", "--dtype", "float32",
           "--json", str(out)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-3000:]
    rows = json.loads(out.read_text())["rows"]
    assert len(rows) == 3 * 2 * 2 and all(r["tokens_per_s"] > 0 for r in rows)
    state = {(r["model"], r["batch"], r["context"]): r["state_bytes"] for r in rows}
    assert state[("gateloop-wide", 2, 8)] == state[("gateloop-wide", 2, 32)]
    assert state[("attention", 2, 8)] < state[("attention", 2, 32)]
