"""Table and plot of train.py head-to-head runs from their metrics JSONL files (or the runs.json
that --json writes from them: each run's start record, validation curve and end record).

    python benchmarks/lab/summarise_train.py DIR [DIR ...] [--plot PATH] [--json runs.json]
"""
import argparse
import glob
import json
import os
import sys

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))
import plots  # noqa: E402

GiB = 2 ** 30
VAL_KEYS = ("step", "wall_s", "train_time_s", "bpc")


def read_runs(dirs) -> list[dict]:
    """Each finished run in the folders: {"file", "start", "val": {key: [...]}, "end"}."""
    runs = []
    for d in dirs:
        if os.path.isfile(os.path.join(d, "runs.json")):
            runs += json.load(open(os.path.join(d, "runs.json")))["runs"]
        for path in sorted(glob.glob(f"{d}/*.jsonl")):
            recs = [json.loads(line) for line in open(path)]
            starts = [r for r in recs if r["kind"] == "start"]
            ends = [r for r in recs if r["kind"] == "end"]
            val = [r for r in recs if r["kind"] == "val"]
            if starts and ends and val:
                runs.append(dict(file=os.path.basename(path), start=starts[-1], end=ends[-1],
                                 val={k: [r[k] for r in val] for k in VAL_KEYS}))
    return runs


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dirs", nargs="+")
    p.add_argument("--plot", default=None)
    p.add_argument("--json", default=None, help="write the runs (start, validation curve, end) here")
    args = p.parse_args()
    runs = read_runs(args.dirs)
    print("| model | seq | params | steps | steady tokens/s | peak torch GiB | peak JAX GiB | final val bpc |")
    print("|---|---|---|---|---|---|---|---|")
    for run in runs:
        start, end, cfg = run["start"], run["end"], run["start"]["config"]
        print(f"| {plots.run_name(run)} | {cfg['seq_len']} | {start['params'] / 1e6:.2f}M | {end['step']} | "
              f"{end['steady_tokens_per_s'] or float('nan'):,.0f} | "
              f"{end.get('peak_mem_bytes', 0) / GiB:.2f} | {end.get('jax_peak_mem_bytes', 0) / GiB:.2f} | "
              f"{run['val']['bpc'][-1]:.3f} |")
    if args.json:
        with open(args.json, "w") as f:
            f.write('{"runs":[\n' + ",\n".join(json.dumps(r, separators=(",", ":")) for r in runs) + "\n]}\n")
    if args.plot:
        plots.train_curves(runs, args.plot)


if __name__ == "__main__":
    main()
