"""Named sets of train.py runs that answer the seed's open questions, run one after another with
checkpoints (an interrupted set resumes where it stopped), and their report: a table and plots of
validation bits per character against steps and against training seconds, over seeds.

    python benchmarks/experiments.py list
    python benchmarks/experiments.py run seed-questions --out runs/experiments --data data/enwik8.gz
    python benchmarks/experiments.py report --out runs/experiments --json report.json --plot report.png

A set fixes what its runs share (data, sequence length, batch, accumulation, learning rate, steps,
validation) and what each run changes (the model flags); every run is repeated for each seed.
``run`` starts each run that has not finished with train.py, with ``--resume`` when its folder
holds a checkpoint, and marks it finished when train.py returns 0 (``finished.json``). A run
whose shared flags changed since it started is refused rather than mixed. ``--steps``,
``--seeds`` and ``--only`` narrow a set (a short trial, one run); ``--stop-after N`` ends after N
runs; ``--compile MODE`` passes train.py's --compile (CUDA graphs: reduce-overhead). ``report`` reads every run's metrics.jsonl.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(Path(__file__).resolve().parent))  # plots, when run as a script

# The seed's settings (dim 512, depth 6, seq 1024, batch 4 x accumulation 4, lr 1e-4), to 20k steps.
SEED_SETTINGS = dict(dim=512, depth=6, seq_len=1024, batch_size=4, grad_accum=4, lr=1e-4, max_steps=20_000,
                     val_every=500, val_batches=16, ckpt_every=1000, sample_every=0, log_every=50)

SETS = {
    "seed-questions": dict(
        about="the seed's open questions: GateLoop against attention at equal parameters, its ablations, "
              "wide heads, and hybrids with attention",
        shared=SEED_SETTINGS,
        seeds=[0, 1],
        runs={
            "gateloop": dict(gate_loop_heads=512),
            "gateloop-8x64": dict(gate_loop_heads=8),
            "attention": dict(layer_pattern="a", gate_loop_heads=512, heads=8, dim_head=64, rotary_emb=True),
            "hybrid-ga": dict(layer_pattern="ga", gate_loop_heads=512, heads=8, dim_head=64),
            "hybrid-m": dict(layer_pattern="m", gate_loop_heads=512, heads=8, dim_head=64),
            "ablate-complex": dict(gate_loop_heads=512, ablate_complex=True),
            "ablate-state-transition": dict(gate_loop_heads=512, ablate_state_transition=True),
        }),
    # the same runs at a size a CPU trains in seconds: for the runner's own tests and a dry run
    "tiny": dict(
        about="the seed-questions runs at a tiny size",
        shared=dict(dim=32, depth=2, seq_len=32, batch_size=4, grad_accum=1, lr=3e-3, max_steps=4, val_every=2,
                    val_batches=1, ckpt_every=2, sample_every=0, log_every=1, device="cpu", scan_backend="torch"),
        seeds=[0, 1],
        runs={
            "gateloop": dict(gate_loop_heads=32),
            "attention": dict(layer_pattern="a", gate_loop_heads=32, heads=2, dim_head=16),
            "hybrid-m": dict(layer_pattern="m", gate_loop_heads=32, heads=2, dim_head=16),
        }),
}

FINISHED = "finished.json"


def flags(options: dict) -> list[str]:
    """train.py's command-line flags for a dict of its options (True: the bare flag)."""
    out = []
    for name, value in options.items():
        flag = "--" + name.replace("_", "-")
        if value is True:
            out.append(flag)
        elif value is False:
            out.append("--no-" + name.replace("_", "-"))
        else:
            out += [flag, str(value)]
    return out


def plan(set_name: str, steps: int | None = None, seeds: list[int] | None = None,
         only: list[str] | None = None) -> list[dict]:
    """The set's runs, one per (run, seed): name, folder name, and train.py's options."""
    spec = SETS[set_name]
    unknown = sorted(set(only or ()) - set(spec["runs"]))
    if unknown:
        raise SystemExit(f"experiments.py: set {set_name!r} has no run {', '.join(unknown)}; "
                         f"its runs: {', '.join(spec['runs'])}")
    shared = dict(spec["shared"], **({} if steps is None else {"max_steps": steps}))
    out = []
    for name, model in spec["runs"].items():
        if only and name not in only:
            continue
        for seed in seeds if seeds is not None else spec["seeds"]:
            out.append(dict(run=name, seed=seed, folder=f"{name}-seed{seed}",
                            options=dict(shared, **model, seed=seed)))
    return out


def train_command(run: dict, out: Path, data: str | None, resume: bool, compile_mode: str | None = None) -> list[str]:
    argv = [sys.executable, str(ROOT / "train.py"), *flags(run["options"]), "--out-dir", str(out / run["folder"])]
    if data:
        argv += ["--data", data]
    if compile_mode:               # how this invocation runs, not what the run is: may change on a resume
        argv += ["--compile", compile_mode]
    return argv + (["--resume"] if resume else [])


def status(run: dict, out: Path) -> str:
    """"finished", "partial" (a checkpoint to resume from) or "new"."""
    folder = out / run["folder"]
    marker = folder / FINISHED
    if marker.is_file():
        done = json.loads(marker.read_text())
        if done.get("options") != run["options"]:
            raise SystemExit(f"experiments.py: {folder} finished with other options than the set now gives "
                             f"({_differences(done.get('options', {}), run['options'])}); use another --out")
        return "finished"
    if (folder / "checkpoint.pt").is_file():
        started = folder / "options.json"
        options = json.loads(started.read_text()) if started.is_file() else run["options"]
        if options != run["options"]:
            raise SystemExit(f"experiments.py: {folder} was started with other options than the set now gives "
                             f"({_differences(options, run['options'])}); use another --out")
        return "partial"
    return "new"


def _differences(old: dict, new: dict) -> str:
    names = sorted(k for k in set(old) | set(new) if old.get(k) != new.get(k))
    return ", ".join(f"{k}: {old.get(k)!r} -> {new.get(k)!r}" for k in names)


def run_set(args) -> int:
    out = Path(args.out).resolve()
    data = None if args.data is None else str(Path(args.data).resolve())
    runs = plan(args.set, args.steps, args.seeds, args.only)
    done_now = 0
    for run in runs:
        state = status(run, out)
        if state == "finished":
            print(f"{run['folder']}: finished", flush=True)
            continue
        if args.stop_after is not None and done_now >= args.stop_after:
            print(f"experiments.py: stopped after {done_now} runs (--stop-after); run again to go on", flush=True)
            return 0
        folder = out / run["folder"]
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "options.json").write_text(json.dumps(run["options"], sort_keys=True) + "\n")
        argv = train_command(run, out, data, resume=state == "partial", compile_mode=args.compile)
        print(f"{run['folder']}: {'resuming' if state == 'partial' else 'starting'}: {' '.join(argv[1:])}", flush=True)
        if args.dry_run:
            continue
        t0 = time.time()
        rc = subprocess.call(argv, cwd=ROOT)
        if rc != 0:
            print(f"experiments.py: {run['folder']} stopped with exit status {rc}; run again to resume it", flush=True)
            return rc
        (folder / FINISHED).write_text(json.dumps(dict(options=run["options"], wall_s=time.time() - t0)) + "\n")
        done_now += 1
    return 0


def read_run(folder: Path) -> dict | None:
    """One run's metrics: the last start record, validation by step (the last record of a step
    that was run again after a resume), and the end record; None before its first validation."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    start, end, val = None, None, {}
    for line in path.read_text().splitlines():
        if not line.strip():
            continue
        rec = json.loads(line)
        if rec["kind"] == "start":
            start = rec
        elif rec["kind"] == "end":
            end = rec
        elif rec["kind"] == "val":
            val[rec["step"]] = rec
    if start is None or not val:
        return None
    steps = sorted(val)
    return dict(start=start, end=end, finished=(folder / FINISHED).is_file(),
                val=dict(step=steps, bpc=[val[s]["bpc"] for s in steps],
                         train_time_s=[val[s]["train_time_s"] for s in steps]))


def report(args) -> int:
    out = Path(args.out)
    groups: dict[str, list] = {}
    for folder in sorted(p for p in out.iterdir() if p.is_dir()):
        run = read_run(folder)
        if run is not None:
            name = folder.name.rsplit("-seed", 1)[0]
            groups.setdefault(name, []).append(dict(run, folder=folder.name))
    if not groups:
        raise SystemExit(f"experiments.py: no run with a validation record under {out}")
    rows = []
    for name, runs in groups.items():
        final = [r["val"]["bpc"][-1] for r in runs]
        speed = [r["end"]["steady_tokens_per_s"] for r in runs if r["end"] and r["end"].get("steady_tokens_per_s")]
        minutes = [r["end"]["train_time_s"] / 60 for r in runs if r["end"]]
        rows.append(dict(run=name, seeds=len(runs), finished=sum(r["finished"] for r in runs),
                         steps=min(r["val"]["step"][-1] for r in runs), params=runs[0]["start"]["params"],
                         bpc_mean=statistics.fmean(final), bpc_std=statistics.stdev(final) if len(final) > 1 else None,
                         tokens_per_s=statistics.fmean(speed) if speed else None,
                         minutes_per_run=statistics.fmean(minutes) if minutes else None,
                         device=runs[0]["start"].get("device_name") or runs[0]["start"].get("device")))
    lines = ["| run | seeds (finished) | steps | params | final val bpc | tokens/s | minutes a run |",
             "| --- | --- | --- | --- | --- | --- | --- |"]
    for r in rows:
        spread = "" if r["bpc_std"] is None else f" ± {r['bpc_std']:.3f}"
        lines.append(f"| {r['run']} | {r['seeds']} ({r['finished']}) | {r['steps']} | {r['params'] / 1e6:.2f}M | "
                     f"{r['bpc_mean']:.3f}{spread} | "
                     f"{'-' if r['tokens_per_s'] is None else format(r['tokens_per_s'], ',.0f')} | "
                     f"{'-' if r['minutes_per_run'] is None else format(r['minutes_per_run'], '.1f')} |")
    print("\n".join(lines))
    curves = {name: [dict(folder=r["folder"], **r["val"]) for r in runs] for name, runs in groups.items()}
    result = dict(experiments=dict(out=str(out), rows=rows, curves=curves))
    if args.json:
        Path(args.json).write_text(json.dumps(result, separators=(",", ":")) + "\n")
    if args.plot:
        import plots
        plots.experiment_curves(result["experiments"], args.plot)
    return 0


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    sub = p.add_subparsers(dest="command", required=True)
    sub.add_parser("list", help="the sets and their runs")
    r = sub.add_parser("run", help="run a set's pending runs, resuming a partial one")
    r.add_argument("set", choices=sorted(SETS))
    r.add_argument("--out", required=True, help="folder of the set's runs (one subfolder per run and seed)")
    r.add_argument("--data", help="train.py --data for every run (default: train.py's)")
    r.add_argument("--steps", type=int, help="optimiser steps per run instead of the set's")
    r.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], help="comma list instead of the set's")
    r.add_argument("--only", type=lambda s: s.split(","), help="comma list of the set's runs")
    r.add_argument("--stop-after", type=int, help="end after this many runs")
    r.add_argument("--compile", metavar="MODE", help="train.py --compile for every run (e.g. reduce-overhead on CUDA)")
    r.add_argument("--dry-run", action="store_true", help="print the train.py commands, run none")
    rep = sub.add_parser("report", help="table, JSON and plot of the runs under --out")
    rep.add_argument("--out", required=True)
    rep.add_argument("--json")
    rep.add_argument("--plot")
    args = p.parse_args(argv)
    if args.command == "list":
        for name, spec in SETS.items():
            print(f"{name}: {spec['about']}; seeds {spec['seeds']}; shared {spec['shared']}")
            for run, model in spec["runs"].items():
                print(f"    {run}: {model}")
        return 0
    if args.command == "run":
        return run_set(args)
    return report(args)


if __name__ == "__main__":
    sys.exit(main())
