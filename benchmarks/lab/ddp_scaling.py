"""Tokens per second of train.py on one GPU against several (torchrun: DDP, and FSDP2), measured by
train.py itself (the end record's steady_tokens_per_s in metrics.jsonl: training steps only, after
each run's first 10).

    python benchmarks/lab/ddp_scaling.py --data data/gcide.dict.dz                 # every case, 2 GPUs
    python benchmarks/lab/ddp_scaling.py --data data/gcide.dict.dz --cases gateloop --time-budget 60
    python benchmarks/lab/ddp_scaling.py --cases fsdp --time-budget 60    # no --data: see --data's help
    python benchmarks/lab/ddp_scaling.py --dry-run                                  # the commands only
    python benchmarks/lab/ddp_scaling.py --summarise runs/scaling/20261201-120000  # the table again

Cases (seq 4096, --batch-size 4 --grad-accum 4 per GPU, bf16 autocast; each GPU does the same work,
so N GPUs train N times the global batch):

    gateloop     dim 512, depth 6 (23.9M parameters), --no-checkpoint-scan: 1 GPU, N GPUs DDP
    attention    the same with --attention --ff-mult 5 (23.9M):              1 GPU, N GPUs DDP
    fsdp         GateLoop dim 1024, depth 8, --gate-loop-heads 1024:          1 GPU, N GPUs FSDP2

One GPU is plain `python train.py`; N GPUs `torchrun --standalone --nproc_per_node N train.py`.
Prints a markdown table: steady tokens/s, scaling (N-GPU tokens/s over N x the 1-GPU tokens/s),
peak memory per GPU (torch's and JAX's pools), parameters.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
GiB = 2 ** 30
GCIDE = REPO / "data" / "gcide.dict.dz"
BUNDLED = REPO / "tests" / "data" / "devils_dictionary.txt"
REPEATED_BYTES = 16 * 2 ** 20

CASES = {
    "gateloop": (["--dim", "512", "--depth", "6", "--no-checkpoint-scan"], "ddp"),
    "attention": (["--dim", "512", "--depth", "6", "--attention", "--ff-mult", "5"], "ddp"),
    "fsdp": (["--dim", "1024", "--depth", "8", "--gate-loop-heads", "1024", "--no-checkpoint-scan"], "fsdp"),
}
COMMON = ["--seq-len", "4096", "--batch-size", "4", "--grad-accum", "4", "--val-every", "0", "--sample-every", "0",
          "--ckpt-every", "0", "--log-every", "10", "--max-steps", "1000000"]


def runs(args) -> list[tuple[str, int, list[str]]]:
    """(run name, GPUs, command) for every case asked for: one GPU, then args.gpus GPUs."""
    out = []
    for case in args.cases:
        flags, parallel = CASES[case]
        for gpus in (1, args.gpus):
            name = f"{case}-{gpus}gpu"
            train = [str(REPO / "train.py"), "--data", args.data, "--out-dir", str(args.out / name),
                     "--time-budget", str(args.time_budget), *COMMON, *flags]
            if gpus == 1:
                cmd = [sys.executable, *train]
            else:
                cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(gpus),
                       *train, *(["--fsdp"] if parallel == "fsdp" else [])]
            out.append((name, gpus, cmd))
    return out


def data_file(data: str | None, out: Path, write: bool = True) -> Path:
    """--data; without it GCIDE where docs/training.md puts it, else the bundled text repeated to
    16 MiB in ``out`` (written when ``write``). Tokens/s does not depend on the text; seq 4096 needs
    more than the bundled text's validation split."""
    if data is not None:
        return Path(data).resolve()
    if GCIDE.is_file():
        return GCIDE
    path = out / "repeated_text.txt"
    if write:
        text = BUNDLED.read_bytes()
        out.mkdir(parents=True, exist_ok=True)
        path.write_bytes((text * (REPEATED_BYTES // len(text) + 1))[:REPEATED_BYTES])
    return path


def read_run(folder: Path) -> dict | None:
    """What the table needs from one run's metrics.jsonl (its last start and end records)."""
    path = folder / "metrics.jsonl"
    if not path.is_file():
        return None
    records = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    starts = [r for r in records if r["kind"] == "start"]
    ends = [r for r in records if r["kind"] == "end"]
    if not starts or not ends:
        return None
    start, end = starts[-1], ends[-1]
    return dict(name=folder.name, gpus=start.get("ranks", 1), parallel=start.get("parallel") or "-",
                params=start["params"], device=start.get("device_name"), torch=start["torch"],
                steps=end["step"], tokens_per_s=end.get("steady_tokens_per_s"),
                peak=end.get("peak_mem_bytes", 0) / GiB, jax_peak=end.get("jax_peak_mem_bytes", 0) / GiB)


def table(rows: list[dict]) -> str:
    """Markdown: one line per run; scaling against the same case's one-GPU run."""
    one = {r["name"].rsplit("-", 1)[0]: r["tokens_per_s"] for r in rows if r["gpus"] == 1}
    lines = ["| run | GPUs | parallel | params | steps | steady tokens/s | scaling | peak torch GiB/GPU | "
             "peak JAX GiB/GPU |", "|---|---|---|---|---|---|---|---|---|"]
    for r in rows:
        base = one.get(r["name"].rsplit("-", 1)[0])
        scaling = (f"{r['tokens_per_s'] / (r['gpus'] * base):.2f}"
                   if r["gpus"] > 1 and base and r["tokens_per_s"] else "-")
        tps = f"{r['tokens_per_s']:,.0f}" if r["tokens_per_s"] else "-"
        lines.append(f"| {r['name']} | {r['gpus']} | {r['parallel']} | {r['params'] / 1e6:.2f}M | {r['steps']} | "
                     f"{tps} | {scaling} | {r['peak']:.2f} | {r['jax_peak']:.2f} |")
    return "\n".join(lines)


def summarise(folder: Path) -> str:
    rows = [r for r in (read_run(d) for d in sorted(folder.iterdir()) if d.is_dir()) if r is not None]
    if not rows:
        raise SystemExit(f"ddp_scaling.py: no finished runs (metrics.jsonl with an end record) under {folder}")
    head = f"{rows[0]['device']}, torch {rows[0]['torch']}; runs in {folder}"
    return head + "\n\n" + table(rows)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--data", default=None,
                   help="train.py --data (default: data/gcide.dict.dz if there, else the bundled text repeated to "
                        "16 MiB, written into --out)")
    p.add_argument("--gpus", type=int, default=2, help="GPUs of the several-GPU runs (default: 2)")
    p.add_argument("--cases", nargs="+", default=list(CASES), choices=list(CASES), help="default: all")
    p.add_argument("--time-budget", type=float, default=120.0, help="seconds of training per run (default: 120)")
    p.add_argument("--out", type=Path, default=None, help="folder for the runs (default: runs/scaling/<time>)")
    p.add_argument("--dry-run", action="store_true", help="print the commands, run nothing")
    p.add_argument("--summarise", type=Path, default=None, metavar="DIR", help="print the table of finished runs")
    args = p.parse_args(argv)
    if args.summarise is not None:
        print(summarise(args.summarise))
        return 0
    if args.gpus < 2:
        p.error(f"--gpus {args.gpus}: must be at least 2")
    args.out = (args.out or REPO / "runs" / "scaling" / time.strftime("%Y%m%d-%H%M%S")).resolve()
    if args.data is not None and not Path(args.data).is_file():
        p.error(f"--data {args.data}: no such file (see docs/training.md for GCIDE)")
    args.data = str(data_file(args.data, args.out, write=not args.dry_run))
    todo = runs(args)
    if args.dry_run:
        print("\n".join(" ".join(cmd) for _, _, cmd in todo))
        return 0
    args.out.mkdir(parents=True, exist_ok=True)
    for name, _, cmd in todo:
        print(f"ddp_scaling.py: {name}: {' '.join(cmd)}", file=sys.stderr, flush=True)
        with open(args.out / f"{name}.log", "w") as log:
            code = subprocess.run(cmd, cwd=REPO, stdout=log, stderr=subprocess.STDOUT).returncode
        if code:
            print(f"ddp_scaling.py: {name} exited with {code}; see {args.out / f'{name}.log'}", file=sys.stderr)
    print(summarise(args.out))
    return 0


if __name__ == "__main__":
    sys.exit(main())
