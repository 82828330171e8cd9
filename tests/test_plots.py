"""benchmarks/plots.py redraws every PNG kept under benchmarks/results/ from its JSON, and
summarise_train.py prints the stored training summaries from the stored runs."""
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
RESULTS = ROOT / "benchmarks" / "results"

pytest.importorskip("matplotlib")
plots = pytest.importorskip("plots")     # benchmarks/ is on pytest's pythonpath
Image = pytest.importorskip("PIL.Image")


def test_every_kept_png_has_a_figure_entry():
    kept = sorted(p.relative_to(RESULTS).as_posix() for p in RESULTS.rglob("*.png"))
    assert kept == sorted(plots.FIGURES)
    for spec in plots.FIGURES.values():
        for source in spec["sources"]:
            assert (RESULTS / source).is_file(), source


@pytest.mark.parametrize("figure", sorted(plots.FIGURES))
def test_redraw_from_json(figure, tmp_path):
    assert plots.main([f"benchmarks/results/{figure}", "--out", str(tmp_path)]) == 0
    new, old = Image.open(tmp_path / figure), Image.open(RESULTS / figure)
    assert new.size == old.size and new.format == "PNG"


def test_redraw_command_and_json_input(tmp_path):
    figure = "h200/model_speed/fused_reduce_overhead.png"
    cmd = [sys.executable, str(ROOT / "benchmarks" / "plots.py"), f"benchmarks/results/{figure}", "--out", str(tmp_path)]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert [p.relative_to(tmp_path).as_posix() for p in tmp_path.rglob("*.png")] == [figure]
    out = tmp_path / "cpu.png"
    assert plots.main([str(RESULTS / "cpu" / "scan_speed.json"), "-o", str(out)]) == 0
    assert Image.open(out).format == "PNG"


@pytest.mark.parametrize("run", ["train", "train_compiled"])
def test_summarise_train_reprints_the_summary(run, tmp_path):
    script = ROOT / "benchmarks" / "lab" / "summarise_train.py"
    proc = subprocess.run([sys.executable, str(script), str(RESULTS / "h200" / run), "--plot", str(tmp_path / "p.png")],
                          capture_output=True, text=True, timeout=300, cwd=ROOT)
    assert proc.returncode == 0, proc.stderr[-2000:]
    assert proc.stdout == (RESULTS / "h200" / run / "summary.md").read_text()
    assert Image.open(tmp_path / "p.png").size == Image.open(RESULTS / "h200" / run / "h2h.png").size
