"""Table and plot of train.py head-to-head runs from their metrics JSONL files.

    python benchmarks/lab/summarise_train.py benchmarks/results/h200/train [--plot PATH]
"""
import argparse
import glob
import json

GiB = 2 ** 30


def main():
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("dirs", nargs="+")
    p.add_argument("--plot", default=None)
    args = p.parse_args()
    rows, curves = [], []
    for path in sorted(q for d in args.dirs for q in glob.glob(f"{d}/*.jsonl")):
        recs = [json.loads(line) for line in open(path)]
        start = [r for r in recs if r["kind"] == "start"][-1]
        ends = [r for r in recs if r["kind"] == "end"]
        val = [r for r in recs if r["kind"] == "val"]
        if not ends or not val:
            continue
        end, cfg = ends[-1], start["config"]
        heads = cfg.get("gate_loop_heads") or cfg["dim"]
        name = ("attention (sdpa)" if cfg["attention"] else f"gateloop ({start['scan_backend']}"
                + ("" if heads == cfg["dim"] else f", {heads} heads of {cfg['dim'] // heads}")
                + ("" if cfg.get("checkpoint_scan", True) else ", no recompute") + ")")
        rows.append(f"| {name} | {cfg['seq_len']} | {start['params'] / 1e6:.2f}M | {end['step']} | "
                    f"{end['steady_tokens_per_s'] or float('nan'):,.0f} | "
                    f"{end.get('peak_mem_bytes', 0) / GiB:.2f} | {end.get('jax_peak_mem_bytes', 0) / GiB:.2f} | "
                    f"{val[-1]['bpc']:.3f} |")
        curves.append((name, cfg["seq_len"], [r["wall_s"] for r in val], [r["bpc"] for r in val]))
    print("| model | seq | params | steps | steady tokens/s | peak torch GiB | peak JAX GiB | final val bpc |")
    print("|---|---|---|---|---|---|---|---|")
    print("\n".join(rows))
    if args.plot:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        lengths = sorted({c[1] for c in curves})
        fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False)
        for name, seq, x, y in curves:
            ax = axes[0][lengths.index(seq)]
            ax.plot(x, y, marker="o", label=name)
            ax.set(title=f"sequence length {seq}", xlabel="wall-clock seconds", ylabel="validation bits per char")
            ax.legend()
        fig.tight_layout()
        fig.savefig(args.plot, dpi=120)


if __name__ == "__main__":
    main()
