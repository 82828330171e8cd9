"""The benchmarks' plots, drawn from their JSON: scan_speed.py, model_speed.py and
lab/summarise_train.py draw with these functions, and every PNG under benchmarks/results/ is
redrawn from the JSON beside it by

    python benchmarks/plots.py                                  # every figure in FIGURES
    python benchmarks/plots.py results/h200/scan_speed.png      # the named ones
    python benchmarks/plots.py --out DIR                        # into DIR, not beside their JSON
    python benchmarks/plots.py some.json -o some.png            # any scan_speed.py, model_speed.py or
                                                                # experiments.py report JSON, or
                                                                # summarise_train.py's runs.json

Needs matplotlib. PNGs are written with a 64-colour palette (a third of the bytes of full colour).
"""
from __future__ import annotations

import argparse
import io
import json
import sys
from pathlib import Path

RESULTS = Path(__file__).resolve().parent / "results"
DTYPES = ("float32", "complex64", "bfloat16")
ITEMSIZE = {"float32": 4, "complex64": 8, "bfloat16": 2}

# each kept PNG under benchmarks/results/: the JSON it is drawn from, and which rows
FIGURES = {
    "h200/scan_speed.png": dict(sources=["h200/scan_speed.json"]),
    "h200/model_speed/fused_reduce_overhead.png": dict(
        sources=["h200/model_speed/fused_512x6_1024x8_4096.json", "h200/model_speed/fused_16384_1024.json"],
        where={"mode": "reduce-overhead"}),
    "h200/train/h2h.png": dict(sources=["h200/train/runs.json"]),
    "h200/train_compiled/h2h.png": dict(sources=["h200/train_compiled/runs.json"]),
}


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _save(fig, path) -> None:
    """Write fig as a palette PNG (lines and text on white need few colours)."""
    from PIL import Image

    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=fig.dpi)
    _pyplot().close(fig)
    buf.seek(0)
    img = Image.open(buf).convert("RGB").quantize(colors=64, method=Image.Quantize.MEDIANCUT)
    Path(path).parent.mkdir(parents=True, exist_ok=True)
    img.save(path, format="PNG", optimize=True)


def scan_speed(meta: dict, rows: list[dict], path) -> None:
    """Time against N, log-log: one panel per dtype and pass, one line per implementation."""
    plt = _pyplot()
    # the N sweep: the (B, D) pair with the most sequence lengths
    counts: dict = {}
    for r in rows:
        counts.setdefault((r["B"], r["D"]), set()).add(r["N"])
    (B, D), ns = max(counts.items(), key=lambda kv: (len(kv[1]), kv[0]))
    ns = sorted(ns)
    dtypes = [d for d in DTYPES if any(r["dtype"] == d for r in rows)]
    names = list(dict.fromkeys(r["impl"] for r in rows))
    cmap = plt.get_cmap("tab10")
    style = {n: dict(color=cmap(i % 10), marker="osD^v<>ph*"[i % 10], ms=4,
                     ls="-" if i < 10 else "-.") for i, n in enumerate(names)}
    fig, axes = plt.subplots(2, len(dtypes), figsize=(6 * len(dtypes), 8.5), squeeze=False, dpi=90)
    handles = {}
    for j, dt in enumerate(dtypes):
        for i, (which, k) in enumerate((("fwd", 3), ("fwdbwd", 8))):
            ax = axes[i][j]
            for name in names:
                pts = sorted((r["N"], r[which]["median_ms"]) for r in rows
                             if r["impl"] == name and r["dtype"] == dt and r["B"] == B
                             and r["D"] == D and r.get(which) and "median_ms" in r[which])
                if pts:
                    handles[name], = ax.plot(*zip(*pts), label=name, **style[name])
            floor = [k * B * n * D * ITEMSIZE[dt] / meta["bandwidth"] * 1e3 for n in ns]
            handles["floor"], = ax.plot(ns, floor, "k--", lw=2, label="memory floor (3x / 8x one tensor's "
                                        f"bytes at {meta['bandwidth_GBps']:.0f} GB/s)")
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("sequence length N")
            ax.set_ylabel("ms (median)")
            ax.set_title(f"{dt}, {'forward' if which == 'fwd' else 'forward+backward'}, "
                         f"B={B}, D={D}", fontsize=10)
            ax.grid(True, which="both", alpha=0.3)
    fig.legend(handles.values(), [h.get_label() for h in handles.values()], loc="lower center", ncol=3,
               fontsize=8, frameon=False)
    fig.suptitle(f"GateLoop scan h_t = a_t h_(t-1) + x_t: {meta['device_name']}, {meta['date'][:10]}",
                 fontsize=10)
    rows_of_legend = -(-len(handles) // 3)
    fig.tight_layout(rect=(0, 0.025 * rows_of_legend + 0.02, 1, 1))
    _save(fig, path)


def model_speed(rows: list[dict], env: dict, path) -> None:
    """Bars of training tokens/s per model and mode, grouped by size, sequence length and precision."""
    ok = [r for r in rows if "error" not in r]
    groups = sorted({(r["dim"], r["depth"], r["seq"], r["precision"]) for r in ok})
    series = list(dict.fromkeys((r["model"], r["mode"]) for r in ok))      # in the order they ran
    if not groups or not series:
        return
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(max(6, 1.6 * len(groups) * max(1, len(series)) / 3), 4.5), dpi=110)
    width = 0.8 / len(series)
    for i, (model, mode) in enumerate(series):
        ys = []
        for g in groups:
            match = [r for r in ok if (r["dim"], r["depth"], r["seq"], r["precision"]) == g
                     and (r["model"], r["mode"]) == (model, mode)]
            ys.append(match[0]["tokens_per_s"] / 1e3 if match else 0)
        ax.bar([j + i * width for j in range(len(groups))], ys, width, label=f"{model} [{mode}]")
    ax.set_xticks([j + 0.4 - width / 2 for j in range(len(groups))])
    ax.set_xticklabels([f"{d}x{L}\nseq {s}\n{p}" for d, L, s, p in groups])
    ax.set_ylabel("training tokens/s (thousands)")
    ax.set_title(f"{env['device_name']}, {env['date'][:10]}", fontsize=9)
    ax.legend(fontsize=7, ncol=2)
    fig.tight_layout()
    _save(fig, path)


def run_name(run: dict) -> str:
    """A train.py run's label from its start record: the model, scan backend, heads, recompute."""
    start = run["start"]
    cfg = start["config"]
    if cfg["attention"]:
        return "attention (sdpa)"
    heads = cfg.get("gate_loop_heads") or cfg["dim"]
    return (f"gateloop ({start['scan_backend']}"
            + ("" if heads == cfg["dim"] else f", {heads} heads of {cfg['dim'] // heads}")
            + ("" if cfg.get("checkpoint_scan", True) else ", no recompute") + ")")


def train_curves(runs: list[dict], path) -> None:
    """Validation bits per character against wall-clock seconds, one panel per sequence length."""
    plt = _pyplot()
    lengths = sorted({r["start"]["config"]["seq_len"] for r in runs})
    fig, axes = plt.subplots(1, len(lengths), figsize=(5.5 * len(lengths), 4), squeeze=False, dpi=100)
    for run in runs:
        ax = axes[0][lengths.index(run["start"]["config"]["seq_len"])]
        ax.plot(run["val"]["wall_s"], run["val"]["bpc"], marker="o", label=run_name(run))
        ax.set(title=f"sequence length {run['start']['config']['seq_len']}", xlabel="wall-clock seconds",
               ylabel="validation bits per char")
        ax.legend()
    fig.tight_layout()
    _save(fig, path)


def experiment_curves(experiments: dict, path) -> None:
    """experiments.py's report: validation bits per character against steps and against training
    seconds, one colour per run, the mean over seeds with a band from the lowest to the highest."""
    plt = _pyplot()
    fig, axes = plt.subplots(1, 2, figsize=(11, 4), dpi=100)
    for colour, (name, seeds) in enumerate(experiments["curves"].items()):
        steps = sorted(set.intersection(*(set(c["step"]) for c in seeds)))
        if not steps:
            continue
        at = [{s: (b, t) for s, b, t in zip(c["step"], c["bpc"], c["train_time_s"])} for c in seeds]
        bpc = [[a[s][0] for a in at] for s in steps]
        secs = [sum(a[s][1] for a in at) / len(at) for s in steps]
        mean = [sum(b) / len(b) for b in bpc]
        for ax, x in ((axes[0], steps), (axes[1], secs)):
            ax.plot(x, mean, color=f"C{colour}", label=f"{name} ({len(seeds)} seed{'s' * (len(seeds) > 1)})")
            if len(seeds) > 1:
                ax.fill_between(x, [min(b) for b in bpc], [max(b) for b in bpc], color=f"C{colour}", alpha=0.2)
    axes[0].set(xlabel="optimiser steps", ylabel="validation bits per char")
    axes[1].set(xlabel="training seconds (mean over seeds)", ylabel="validation bits per char")
    axes[0].legend(fontsize=7)
    fig.tight_layout()
    _save(fig, path)


def draw(sources: list, path, where: dict | None = None) -> None:
    """Draw the JSON files' plot into path; the kind of plot follows from the files' keys."""
    data = [json.loads(Path(s).read_text()) for s in sources]
    first = data[0]
    if "results" in first:        # scan_speed.py --json
        if len(data) > 1:
            raise SystemExit("plots.py: scan_speed.py runs are merged with scan_speed.py --from-json first")
        rows = [r for r in first["results"] if all(r.get(k) == v for k, v in (where or {}).items())]
        scan_speed(first["meta"], rows, path)
    elif "rows" in first:         # model_speed.py --json
        rows = [r for d in data for r in d["rows"] if all(r.get(k) == v for k, v in (where or {}).items())]
        model_speed(rows, first["env"], path)
    elif "runs" in first:         # lab/summarise_train.py --json
        train_curves([r for d in data for r in d["runs"]], path)
    elif "experiments" in first:  # experiments.py report --json
        experiment_curves(first["experiments"], path)
    else:
        raise SystemExit(f"plots.py: {sources[0]} is none of scan_speed.py's, model_speed.py's or "
                         f"summarise_train.py's JSON")


def _figure_key(name: str) -> str:
    path = Path(name).resolve()
    try:
        return path.relative_to(RESULTS).as_posix()
    except ValueError:
        return Path(name).as_posix().split("results/", 1)[-1]


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("paths", nargs="*", help="figures under benchmarks/results/ (PNG) or JSON files to draw")
    p.add_argument("--out", help="write the figures under this folder (keeping their paths under results/)")
    p.add_argument("-o", "--output", help="with JSON paths: the PNG to write")
    args = p.parse_args(argv)
    jsons = [q for q in args.paths if q.endswith(".json")]
    if jsons:
        if not args.output:
            p.error("drawing JSON files needs -o PNG")
        draw(jsons, args.output)
        print(args.output)
        return 0
    keys = [_figure_key(q) for q in args.paths] or list(FIGURES)
    unknown = [k for k in keys if k not in FIGURES]
    if unknown:
        p.error(f"no figure {', '.join(unknown)}; the figures: {', '.join(FIGURES)}")
    for key in keys:
        spec = FIGURES[key]
        target = Path(args.out) / key if args.out else RESULTS / key
        draw([RESULTS / s for s in spec["sources"]], target, spec.get("where"))
        print(target)
    return 0


if __name__ == "__main__":
    sys.exit(main())
