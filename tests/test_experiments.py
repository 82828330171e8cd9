"""benchmarks/experiments.py: a set's runs go one after another, an interrupted set resumes (a
finished run is skipped, a run with a checkpoint continues with --resume), a set whose options
changed under a run is refused, and the report reads every run's metrics (tiny CPU runs)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

import experiments

DATA = str(Path(__file__).resolve().parent / "data" / "devils_dictionary.txt")


def run(*argv):
    return experiments.main(list(argv))


def test_an_interrupted_set_resumes_where_it_stopped(tmp_path, capsys):
    out = tmp_path / "set"
    common = ("--out", str(out), "--data", DATA, "--seeds", "0", "--only", "gateloop,hybrid-m")
    assert run("run", "tiny", *common, "--stop-after", "1") == 0
    assert (out / "gateloop-seed0" / experiments.FINISHED).is_file()
    assert not (out / "hybrid-m-seed0").exists()
    # the second run stopped half way: train.py for 2 of its 4 steps, checkpoint at step 2
    hybrid = experiments.plan("tiny", seeds=[0], only=["hybrid-m"])[0]
    argv = experiments.train_command(hybrid, out, DATA, resume=False)
    argv[argv.index("--max-steps") + 1] = "2"
    (out / hybrid["folder"]).mkdir()
    (out / hybrid["folder"] / "options.json").write_text(json.dumps(hybrid["options"]))
    subprocess.run(argv, check=True, capture_output=True)
    assert experiments.status(hybrid, out) == "partial"
    capsys.readouterr()
    assert run("run", "tiny", *common) == 0
    said = capsys.readouterr().out
    assert "gateloop-seed0: finished" in said and "hybrid-m-seed0: resuming" in said and "--resume" in said
    records = [json.loads(line) for line in (out / hybrid["folder"] / "metrics.jsonl").read_text().splitlines()]
    assert [r["resumed"] for r in records if r["kind"] == "start"] == [False, True]
    assert [r["step"] for r in records if r["kind"] == "val"] == [2, 4]
    capsys.readouterr()
    assert run("run", "tiny", *common) == 0
    assert capsys.readouterr().out.count("finished") == 2


def test_a_set_whose_options_changed_under_a_run_is_refused(tmp_path):
    out = tmp_path / "set"
    run_ = experiments.plan("tiny", seeds=[0], only=["gateloop"])[0]
    (out / run_["folder"]).mkdir(parents=True)
    (out / run_["folder"] / experiments.FINISHED).write_text(json.dumps(dict(options=run_["options"])))
    assert experiments.status(run_, out) == "finished"
    with pytest.raises(SystemExit, match=r"other options.*max_steps: 4 -> 6"):
        run("run", "tiny", "--out", str(out), "--seeds", "0", "--only", "gateloop", "--steps", "6")


def write_metrics(folder: Path, seed: int, finished: bool = True):
    """A run's metrics.jsonl as train.py writes it, resumed once (step 2 validated twice)."""
    folder.mkdir(parents=True)
    records = [dict(kind="start", step=0, resumed=False, params=1000, device="cpu"),
               dict(kind="val", step=2, bpc=5.0 + seed, train_time_s=1.0),
               dict(kind="start", step=2, resumed=True, params=1000, device="cpu"),
               dict(kind="val", step=2, bpc=4.0 + seed, train_time_s=1.0),
               dict(kind="val", step=4, bpc=3.0 + seed, train_time_s=2.0),
               dict(kind="end", step=4, train_time_s=120.0, steady_tokens_per_s=500.0 + seed)]
    (folder / "metrics.jsonl").write_text("".join(json.dumps(r) + "\n" for r in records))
    if finished:
        (folder / experiments.FINISHED).write_text("{}")


def test_the_report_averages_seeds_and_draws(tmp_path, capsys):
    out = tmp_path / "set"
    write_metrics(out / "attention-seed0", 0)
    write_metrics(out / "attention-seed1", 1, finished=False)
    report, plot = tmp_path / "report.json", tmp_path / "report.png"
    pytest.importorskip("matplotlib")
    assert run("report", "--out", str(out), "--json", str(report), "--plot", str(plot)) == 0
    assert "| attention | 2 (1) | 4 | 0.00M | 3.500 ± 0.707 | 500 | 2.0 |" in capsys.readouterr().out
    result = json.loads(report.read_text())["experiments"]
    assert result["curves"]["attention"][0]["bpc"] == [4.0, 3.0]     # the step run again counts once
    assert plot.stat().st_size > 0


def test_unknown_runs_and_dry_runs(tmp_path, capsys):
    with pytest.raises(SystemExit, match="no run nope"):
        run("run", "tiny", "--out", str(tmp_path), "--only", "nope")
    assert run("run", "seed-questions", "--out", str(tmp_path / "dry"), "--dry-run") == 0
    said = capsys.readouterr().out
    assert said.count("starting") == 14 and "--ablate-complex" in said and "--rotary-emb" in said
    run("run", "tiny", "--out", str(tmp_path / "dry"), "--only", "gateloop", "--dry-run", "--compile", "default")
    assert "--compile default" in capsys.readouterr().out
    assert not any((tmp_path / "dry").glob("*/metrics.jsonl"))


def test_the_script_runs_as_a_script():
    script = Path(experiments.__file__)
    listed = subprocess.run([sys.executable, str(script), "list"], capture_output=True, text=True, check=True).stdout
    assert "seed-questions" in listed and "ablate-state-transition" in listed
