"""train.py and sample.py: data reading, loss falls, exact resume, crash-safe and verified
checkpoints, sampling, the CLI, and one clear error for each way a run can be set up wrong.

Everything runs on the CPU with a tiny model on tests/data/devils_dictionary.txt (public domain,
shipped in the repo); nothing is downloaded. The scan backend is "torch" (plain torch, no JIT
warm-up) to keep the suite fast; the backends themselves are tested elsewhere.
"""

from __future__ import annotations

import dataclasses
import errno
import gzip
import json
import math
import os
import shutil
import subprocess
import sys
import tempfile
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gateloop_hybrid.training as training  # noqa: E402
from gateloop_hybrid.training import checkpoints, cli  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = REPO / "tests" / "data" / "devils_dictionary.txt"

# A model small enough for a 2-core CPU: a few thousand steps/minute.
TINY = ["--dim", "32", "--depth", "2", "--gate-loop-heads", "8", "--scan-backend", "torch",
        "--seq-len", "32", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3",
        "--val-batches", "2", "--prime-len", "16", "--gen-len", "8", "--device", "cpu", "--threads", "1"]



SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")


def run_train(tmp_path: Path, *extra: str, name: str = "run") -> dict:
    out = tmp_path / name
    argv = ["--data", str(TEXT), "--out-dir", str(out), *TINY, *extra]
    cfg, given = training.parse_train_args(argv)
    return training.train(cfg, given)


def read_metrics(path: Path, kind: str) -> list[dict]:
    return [r for r in map(json.loads, path.read_text().splitlines()) if r["kind"] == kind]


# ---------------------------------------------------------------------------------------------
# data


def test_read_bytes_raw_gz_zip_agree(tmp_path):
    raw = TEXT.read_bytes()
    gz = tmp_path / "text.gz"
    gz.write_bytes(gzip.compress(raw))
    zp = tmp_path / "text.zip"
    with zipfile.ZipFile(zp, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("enwik8", raw)
    assert training.read_bytes(TEXT) == (raw, TEXT.name)
    assert training.read_bytes(gz) == (raw, "text")
    assert training.read_bytes(zp) == (raw, "enwik8")  # the member's name, which picks the split


def test_zip_with_several_members_is_refused(tmp_path):
    zp = tmp_path / "two.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("a", b"x")
        z.writestr("b", b"y")
    with pytest.raises(training.DataError, match="exactly one"):
        training.read_bytes(zp)


def test_split_enwik8_and_proportional():
    enwik8 = bytes(100_000_000)  # the size of the real thing; zeros are enough here
    tr, va = training.split_data(enwik8, "enwik8")
    assert (len(tr), len(va)) == (90_000_000, 5_000_000)
    del enwik8, tr, va
    tr, va = training.split_data(bytes(range(256)) * 4, "other.txt")
    assert len(tr) == 1024 * 90 // 95 and len(tr) + len(va) == 1024
    assert tr.dtype == torch.uint8 and int(va[0]) == len(tr) % 256  # contiguous, in order


def test_missing_data_names_enwik8_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/enwik8.gz here
    assert cli.train_main(["--out-dir", str(tmp_path / "run"), "--device", "cpu", "--threads", "1"]) == 2
    msg = capsys.readouterr().err
    assert "http://mattmahoney.net/dc/enwik8.zip" in msg and "--data PATH" in msg
    assert "Hutter" in msg and "never downloads" in msg
    assert not (tmp_path / "data").exists()


def test_sampler_windows_come_from_the_data_and_follow_the_seed():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    a = training.Sampler(data, seq_len=16, batch_size=3, seed=5)
    b = training.Sampler(data, seq_len=16, batch_size=3, seed=5)
    x = a.next()
    assert x.shape == (3, 17) and x.dtype == torch.int64
    assert torch.equal((x[:, 1:] - x[:, :-1]) % 256, torch.ones(3, 16, dtype=torch.int64))
    assert torch.equal(x, b.next())
    state = a.state()
    y = a.next()
    a.set_state(state)
    assert torch.equal(y, a.next())


# ---------------------------------------------------------------------------------------------
# training


def test_loss_falls_and_metrics_are_written(tmp_path):
    summary = run_train(tmp_path, "--max-steps", "30", "--log-every", "5", "--val-every", "15",
                        "--sample-every", "15", "--ckpt-every", "0")
    losses = [summary["losses"][s] for s in sorted(summary["losses"])]
    assert len(losses) == 30
    assert losses[0] > 5.0  # about ln 256 at the start
    assert sum(losses[-5:]) / 5 < losses[0] - 1.5, losses
    val = summary["val"]
    assert sorted(val) == [15, 30] and val[30] < val[15] < 8.0

    metrics = tmp_path / "run" / "metrics.jsonl"
    start, = read_metrics(metrics, "start")
    assert start["params"] > 0 and start["config"]["dim"] == 32 and not start["resumed"]
    assert start["scan_backend"] == "torch" and start["train_bytes"] + start["val_bytes"] == TEXT.stat().st_size
    records = read_metrics(metrics, "train")
    assert [r["step"] for r in records] == [5, 10, 15, 20, 25, 30]
    assert all(r["tokens_per_s"] > 0 and math.isclose(r["bpc"], r["loss"] / math.log(2)) for r in records)
    assert records[0]["loss"] == pytest.approx(sum(losses[:5]) / 5)
    assert [r["step"] for r in read_metrics(metrics, "val")] == [15, 30]
    samples = read_metrics(metrics, "sample")
    assert [s["step"] for s in samples] == [15, 30] and all(len(s["prime"]) > 0 for s in samples)
    end, = read_metrics(metrics, "end")
    assert end["reason"] == "max_steps" and end["step"] == 30
    # the final checkpoint is written even with --ckpt-every 0
    assert training.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 30


def test_time_budget_stops_early(tmp_path):
    summary = run_train(tmp_path, "--max-steps", "100000", "--time-budget", "0.5",
                        "--val-every", "0", "--sample-every", "0")
    assert summary["reason"] == "time_budget" and 0 < summary["step"] < 100000
    assert training.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == summary["step"]


def test_attention_baseline_trains(tmp_path):
    summary = run_train(tmp_path, "--attention", "--heads", "2", "--dim-head", "16", "--max-steps", "3",
                        "--val-every", "0", "--sample-every", "3")
    assert summary["step"] == 3
    cfg = training.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]
    assert cfg["attention"] is True


def test_resume_gives_the_same_losses_as_an_uninterrupted_run(tmp_path):
    common = ["--log-every", "1", "--val-every", "3", "--sample-every", "4", "--ckpt-every", "5"]
    full = run_train(tmp_path, "--max-steps", "10", *common, name="full")
    first = run_train(tmp_path, "--max-steps", "5", *common, name="split")
    assert [first["losses"][s] for s in range(1, 6)] == [full["losses"][s] for s in range(1, 6)]
    second = run_train(tmp_path, "--max-steps", "10", "--resume", name="split")
    assert sorted(second["losses"]) == list(range(6, 11))
    assert [second["losses"][s] for s in range(6, 11)] == [full["losses"][s] for s in range(6, 11)]  # exact
    assert second["val"][9] == full["val"][9]

    a = training.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = training.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert a["step"] == b["step"] == 10
    for k in a["model"]:
        assert torch.equal(a["model"][k], b["model"][k]), k
    assert torch.equal(a["rng"]["data"], b["rng"]["data"])
    # the metrics file of the resumed run was appended to, with the same per-step losses
    ra = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "full" / "metrics.jsonl", "train")}
    rb = {r["step"]: r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl", "train")}
    assert ra == rb
    assert [r["resumed"] for r in read_metrics(tmp_path / "split" / "metrics.jsonl", "start")] == [False, True]


def test_no_checkpoint_scan_trains_the_same_model(tmp_path):
    """--no-checkpoint-scan stores the scan's states instead of recomputing them: same losses."""
    common = ["--max-steps", "4", "--log-every", "1", "--val-every", "0", "--sample-every", "0"]
    recompute = run_train(tmp_path, *common, name="recompute")
    stored = run_train(tmp_path, *common, "--no-checkpoint-scan", name="stored")
    assert [stored["losses"][s] for s in range(1, 5)] == pytest.approx(
        [recompute["losses"][s] for s in range(1, 5)], rel=1e-6)
    start = read_metrics(tmp_path / "stored" / "metrics.jsonl", "start")[0]
    assert start["config"]["checkpoint_scan"] is False
    for flag, expected in (("--checkpoint-scan", True), ("--no-checkpoint-scan", False)):
        cfg, _ = training.parse_train_args([*TINY, flag])
        model = training.build_model(cfg.model_kwargs())
        mixers = [m for m in model.modules() if hasattr(m, "checkpoint_gate_looped_attn")]
        assert mixers and all(m.checkpoint_gate_looped_attn is expected for m in mixers)


def test_compile_trains_the_same_model(tmp_path):
    """--compile default: the training forward and backward through torch.compile, the same
    losses as eager; CUDA graphs are refused on the CPU by name. One layer: compiling on the CPU
    takes most of this module's time, in proportion to the depth."""
    common = ["--max-steps", "3", "--log-every", "1", "--val-every", "0", "--sample-every", "0", "--depth", "1"]
    eager = run_train(tmp_path, *common, name="eager")
    compiled = run_train(tmp_path, *common, "--compile", "default", name="compiled")
    assert [compiled["losses"][s] for s in range(1, 4)] == pytest.approx(
        [eager["losses"][s] for s in range(1, 4)], rel=1e-4)
    with pytest.raises(training.ConfigError, match="--compile reduce-overhead: CUDA graphs need a CUDA device"):
        run_train(tmp_path, *common, "--compile", "reduce-overhead", name="graphs")
    with pytest.raises(training.ConfigError, match="--compile fast: unknown mode"):
        run_train(tmp_path, *common, "--compile", "fast", name="bad")


def test_main_thread_backward_trains_the_same_and_restores_torchs_setting(tmp_path, monkeypatch):
    """--main-thread-backward turns autograd's worker threads off around backward only."""
    seen = []
    original = torch.autograd.set_multithreading_enabled

    class Recording(original):
        def __init__(self, mode):
            seen.append(mode)
            super().__init__(mode)
    monkeypatch.setattr(torch.autograd, "set_multithreading_enabled", Recording)
    common = ["--max-steps", "3", "--log-every", "1", "--val-every", "0", "--sample-every", "0"]
    default = run_train(tmp_path, *common, name="default")
    assert seen and set(seen) == {True}
    seen.clear()
    main = run_train(tmp_path, *common, "--main-thread-backward", name="main")
    assert seen and set(seen) == {False}
    assert torch.autograd.is_multithreading_enabled()       # restored after each backward
    assert [main["losses"][s] for s in range(1, 4)] == pytest.approx(
        [default["losses"][s] for s in range(1, 4)], rel=1e-6)


def test_resume_refuses_a_different_model_and_fresh_run_refuses_to_overwrite(tmp_path):
    run_train(tmp_path, "--max-steps", "1", "--val-every", "0", "--sample-every", "0")
    with pytest.raises(training.ConfigError, match="--resume to continue"):
        run_train(tmp_path, "--max-steps", "2")
    with pytest.raises(training.ConfigError, match="--dim 48 differs"):
        run_train(tmp_path, "--max-steps", "2", "--resume", "--dim", "48")
    with pytest.raises(training.ConfigError, match="no checkpoint"):
        run_train(tmp_path, "--resume", name="nothing-here")
    with pytest.raises(training.ConfigError, match="--scan-backend nope: .*unknown backend"):
        run_train(tmp_path, "--scan-backend", "nope", name="bad-backend")


def test_checkpoint_opens_with_weights_only(tmp_path):
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    state = torch.load(tmp_path / "run" / "checkpoint.pt", weights_only=True)
    assert set(state) >= {"model", "optimizer", "step", "rng", "config"}
    assert state["step"] == 2 and state["config"]["seq_len"] == 32
    assert set(state["rng"]) >= {"torch", "python", "data"}


# ---------------------------------------------------------------------------------------------
# crash safety


DYING_DRIVER = textwrap.dedent("""
    import io, os, signal, sys
    sys.path.insert(0, {repo!r})
    from gateloop_hybrid.training import checkpoints, cli

    real_write = checkpoints.write_all
    calls = 0

    def write_then_die_halfway(f, data):
        # The second checkpoint: write half of it, make sure it is on disk, then SIGKILL ourselves.
        global calls
        calls += 1
        if calls < 2:
            return real_write(f, data)
        f.write(bytes(data[: len(data) // 2]))
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    checkpoints.write_all = write_then_die_halfway
    sys.exit(cli.train_main(sys.argv[1:]))
""")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def test_killed_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path):
    driver = tmp_path / "driver.py"
    driver.write_text(DYING_DRIVER.format(repo=str(REPO)))
    out = tmp_path / "run"
    argv = ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", "6", "--ckpt-every", "2",
            "--val-every", "0", "--sample-every", "0"]
    proc = subprocess.run([sys.executable, str(driver), *argv], capture_output=True, text=True, timeout=120,
                          env=SUBPROCESS_ENV)
    assert proc.returncode == -9, proc.stderr[-2000:]
    partial = out / ".checkpoint.pt.partial"
    assert partial.exists() and partial.stat().st_size > 0  # it really died mid-write
    state = training.load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2  # the first checkpoint, whole
    # and the run resumes from it
    summary = run_train(tmp_path, "--max-steps", "6", "--resume")
    assert sorted(summary["losses"]) == [3, 4, 5, 6]
    assert training.load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert not partial.exists()


def test_ctrl_c_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch, capsys):
    real_write = checkpoints.write_all
    calls = []

    def write_then_interrupt(f, data):
        calls.append(1)
        if len(calls) < 2:
            return real_write(f, data)
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(checkpoints, "write_all", write_then_interrupt)
    out = tmp_path / "run"
    code = cli.train_main(["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", "6",
                       "--ckpt-every", "2", "--val-every", "0", "--sample-every", "0"])
    assert code == 130
    assert "interrupted at step 4" in capsys.readouterr().err
    assert training.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no leftovers


# ---------------------------------------------------------------------------------------------
# command line


def test_optional_loggers_fail_clearly_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(training.ConfigError, match="--tensorboard needs the tensorboard package"):
        run_train(tmp_path, "--max-steps", "1", "--tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(training.ConfigError, match="--wandb needs the wandb package"):
        run_train(tmp_path, "--max-steps", "1", "--wandb", name="run2")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in dataclasses.fields(training.TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "enwik8.zip" in text and "sample.py" in text and "--preset" in text
    for entry in (lambda: cli.train_main(["sample", "--help"]), lambda: cli.sample_main(["--help"])):
        with pytest.raises(SystemExit) as e:
            entry()
        assert e.value.code == 0
        text = capsys.readouterr().out
        for flag in ("--checkpoint", "--prompt", "--length", "--temperature", "--top-k", "--seed", "--device",
                     "--scan-backend", "--bf16", "--threads"):
            assert flag in text


def test_sampling_from_a_checkpoint_works_from_the_command_line(tmp_path):
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    prompt = "ABASEMENT, n.  "
    args = ["--checkpoint", str(ckpt), "--prompt", prompt, "--length", "40", "--device", "cpu", "--seed", "3"]
    proc = subprocess.run([sys.executable, str(REPO / "sample.py"), *args], capture_output=True,
                          timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout.decode("utf-8")
    assert text.startswith(prompt) and len(proc.stdout) > len(prompt) + 20
    assert b"40 bytes after a 15-byte prompt" in proc.stderr
    # the same seed gives the same text, in-process too, and through train.py sample
    assert cli.sample(cli.build_sample_parser().parse_args(args)) + "\n" == text
    assert cli.train_main(["sample", *args]) == 0


# ---------------------------------------------------------------------------------------------
# what a run says, presets, threads


def test_start_prints_a_one_line_summary(tmp_path, capsys):
    run_train(tmp_path, "--max-steps", "1", "--val-every", "0", "--sample-every", "0")
    err = capsys.readouterr().err
    line, = [l for l in err.splitlines() if l.startswith("train.py: GateLoop")]
    for part in ("parameters", "scan torch", "cpu, 1 thread", str(TEXT.name), "train /", "1 steps", "out "):
        assert part in line, (part, line)


def test_resume_checks_the_merged_config_not_the_defaults(tmp_path, capsys):
    """--resume --dim 32 alone: the default --gate-loop-heads 512 is the checkpoint's 8, no error."""
    run_train(tmp_path, "--max-steps", "1", "--val-every", "0", "--sample-every", "0")
    out = tmp_path / "run"
    base = ["--data", str(TEXT), "--out-dir", str(out), "--device", "cpu", "--threads", "1"]
    assert cli.train_main([*base, "--resume", "--max-steps", "2", "--dim", "32"]) == 0
    code, err = main_err(capsys, [*base, "--resume", "--max-steps", "3", "--lr", "nan"])
    assert code == 2 and err.splitlines()[-1] == "train.py: --lr nan: must be a finite number > 0", err


def test_resume_of_a_finished_run_says_so_and_changes_nothing(tmp_path, capsys):
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    metrics = tmp_path / "run" / "metrics.jsonl"
    before = metrics.read_bytes(), (tmp_path / "run" / "checkpoint.pt").read_bytes()
    capsys.readouterr()
    summary = run_train(tmp_path, "--resume")
    assert summary["reason"] == "already_done" and summary["step"] == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "at step 2" in err and "--max-steps is 2" in err, err
    assert (metrics.read_bytes(), (tmp_path / "run" / "checkpoint.pt").read_bytes()) == before


def test_preset_demo_fills_in_flags_that_were_not_typed(tmp_path):
    cfg, given = training.parse_train_args(["--preset", "demo", "--max-steps", "3", "--dim", "48"])
    cfg = training.apply_preset(cfg, given)
    demo = training.PRESETS["demo"]
    assert cfg.max_steps == 3 and cfg.dim == 48  # typed flags win
    assert cfg.depth == demo["depth"] and cfg.seq_len == demo["seq_len"] and cfg.device == "cpu"
    assert Path(cfg.data) == training.DEMO_TEXT and training.DEMO_TEXT.is_file()
    training.check_config(cfg)
    with pytest.raises(training.ConfigError, match="--preset nope: unknown"):
        training.apply_preset(training.parse_train_args(["--preset", "nope"])[0], set())


def test_preset_demo_trains_and_samples(tmp_path, capsys):
    out = tmp_path / "demo"
    summary = training.train(*training.parse_train_args(
        ["--preset", "demo", "--out-dir", str(out), "--max-steps", "2", "--val-every", "0", "--sample-every", "2",
         "--gen-len", "16", "--threads", "1"]))
    assert summary["step"] == 2
    assert "--- step 2 sample ---" in capsys.readouterr().out
    assert training.load_checkpoint(out / "checkpoint.pt")["config"]["preset"] == "demo"


def test_default_threads_leave_busy_cores_alone(monkeypatch):
    monkeypatch.setattr(os, "sched_getaffinity", lambda pid: {0, 1, 2, 3}, raising=False)
    monkeypatch.setattr(os, "getloadavg", lambda: (3.2, 0.0, 0.0))
    assert training.default_threads() == 1
    monkeypatch.setattr(os, "getloadavg", lambda: (0.1, 0.0, 0.0))
    assert training.default_threads() == 4
    monkeypatch.setattr(os, "getloadavg", lambda: (9.0, 0.0, 0.0))
    assert training.default_threads() == 1
    before = torch.get_num_threads()
    try:
        cfg = training.TrainConfig(threads=3)
        assert training.set_threads(cfg, torch.device("cpu")) == 3
        monkeypatch.setenv("OMP_NUM_THREADS", "2")
        torch.set_num_threads(2)
        assert training.set_threads(training.TrainConfig(), torch.device("cpu")) == 2  # the environment wins
        monkeypatch.delenv("OMP_NUM_THREADS")
        assert training.set_threads(training.TrainConfig(), torch.device("cpu")) == 1  # load 9 on 4 cores
    finally:
        torch.set_num_threads(before)


# ---------------------------------------------------------------------------------------------
# one clear error for every bad set-up


def main_err(capsys, argv) -> tuple[int, str]:
    code = cli.train_main(argv)
    return code, capsys.readouterr().err.strip()


BAD_FLAGS = [
    ("--batch-size", "0"), ("--dim", "0"), ("--grad-accum", "0"), ("--log-every", "0"), ("--val-batches", "0"),
    ("--seq-len", "-5"), ("--depth", "0"), ("--lr", "nan"), ("--lr", "-1"), ("--clip", "inf"),
    ("--temperature", "nan"), ("--temperature", "-1"), ("--top-k", "0"), ("--max-steps", "-1"),
    ("--time-budget", "nan"), ("--gate-loop-heads", "5"), ("--threads", "0"), ("--prime-len", "0"),
    ("--seed", "-1"), ("--ckpt-every", "-2"), ("--device", "nonsense"), ("--device", "cuda:99"),
]


@pytest.mark.parametrize("flag,value", BAD_FLAGS, ids=[f"{f}={v}" for f, v in BAD_FLAGS])
def test_bad_flags_stop_in_one_line_with_exit_code_2(tmp_path, capsys, flag, value):
    out = tmp_path / "run"
    argv = ["--data", str(TEXT), "--out-dir", str(out), *TINY, flag, value]
    code, err = main_err(capsys, argv)
    assert code == 2 and len(err.splitlines()) == 1, err
    assert err.startswith("train.py: ") and f"{flag} {value}" in err, err
    assert not out.exists()  # nothing written


def test_unparseable_flag_is_one_line_not_the_whole_usage(capsys):
    with pytest.raises(SystemExit) as e:
        cli.train_main(["--batch-size", "many"])
    assert e.value.code == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "--batch-size" in err and "'many'" in err


@pytest.mark.parametrize("kind", ["empty", "empty-gzip", "short", "broken-gzip", "folder", "no-such-file"])
def test_bad_data_stops_in_one_line(tmp_path, capsys, kind):
    path = tmp_path / "data.bin"
    if kind == "empty":
        path.write_bytes(b"")
    elif kind == "empty-gzip":
        path.write_bytes(gzip.compress(b""))
    elif kind == "short":
        path.write_bytes(b"x" * 100)  # splits into 94/6 bytes: shorter than --seq-len 32
    elif kind == "broken-gzip":
        path.write_bytes(gzip.compress(TEXT.read_bytes())[:5000])
    elif kind == "folder":
        path.mkdir()
    out = tmp_path / "run"
    code, err = main_err(capsys, ["--data", str(path), "--out-dir", str(out), *TINY])
    assert code == 2 and len(err.splitlines()) == 1, err
    assert f"--data {path}" in err, err
    assert not out.exists()


def test_output_folder_that_cannot_be_written_is_refused_before_training(tmp_path, capsys, monkeypatch):
    blocker = tmp_path / "a-file"
    blocker.write_text("")
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(blocker / "run"), *TINY, "--max-steps", "1"])
    assert code == 1 and len(err.splitlines()) == 1 and "--out-dir" in err and "cannot create" in err, err

    def read_only(*args, **kwargs):
        raise OSError(errno.EROFS, "Read-only file system")
    monkeypatch.setattr(tempfile, "mkstemp", read_only)
    steps = []
    monkeypatch.setattr(training.Run, "train_step", lambda self: steps.append(1))
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(tmp_path / "ro"), *TINY])
    assert code == 1 and "read-only file system" in err and not steps, err


def test_too_little_disk_for_two_checkpoints_is_refused_before_training(tmp_path, capsys, monkeypatch):
    usage = shutil.disk_usage(tmp_path)
    monkeypatch.setattr(shutil, "disk_usage", lambda p: usage._replace(free=100_000))
    out = tmp_path / "run"
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(out), *TINY])
    assert code == 1 and len(err.splitlines()) == 1 and "MiB free" in err and "--out-dir" in err, err
    assert not (out / "metrics.jsonl").exists() and not (out / "checkpoint.pt").exists()


def test_full_disk_while_checkpointing_says_so_and_keeps_the_previous_checkpoint(tmp_path, capsys, monkeypatch):
    real_write = checkpoints.write_all
    calls = []

    def fill_the_disk(f, data):
        calls.append(1)
        if len(calls) < 2:
            return real_write(f, data)
        f.write(bytes(data[:1000]))
        raise OSError(errno.ENOSPC, "No space left on device")

    monkeypatch.setattr(checkpoints, "write_all", fill_the_disk)
    out = tmp_path / "run"
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", "6",
                                  "--ckpt-every", "2", "--val-every", "0", "--sample-every", "0"])
    last = err.splitlines()[-1]
    assert code == 1 and last.startswith("train.py: step 4: cannot write the checkpoint") and "disk full" in last, err
    assert "still holds step 2, whole" in last
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no partial file left
    assert training.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    end = read_metrics(out / "metrics.jsonl", "end")[-1]
    assert end["reason"] == "CheckpointError" and end["step"] == 4
    monkeypatch.setattr(checkpoints, "write_all", real_write)  # space again: the run resumes
    assert run_train(tmp_path, "--max-steps", "6", "--resume")["step"] == 6


@pytest.mark.skipif(sys.platform != "linux", reason="RLIMIT_FSIZE and SIGXFSZ")
def test_a_real_failed_write_ends_the_process_with_one_line(tmp_path):
    """The kernel refuses the write (a file-size limit: EFBIG); the process exits 1, saying why."""
    driver = tmp_path / "driver.py"
    driver.write_text(textwrap.dedent(f"""
        import resource, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
        resource.setrlimit(resource.RLIMIT_FSIZE, (100_000, 100_000))  # a checkpoint is ~250 kB
        import train
        sys.exit(train.main(sys.argv[1:]))
    """))
    out = tmp_path / "run"
    proc = subprocess.run([sys.executable, str(driver), "--data", str(TEXT), "--out-dir", str(out), *TINY,
                           "--max-steps", "2", "--val-every", "0", "--sample-every", "0"],
                          capture_output=True, text=True, timeout=120, env=SUBPROCESS_ENV)
    last = proc.stderr.strip().splitlines()[-1]
    assert proc.returncode == 1, proc.stderr[-2000:]
    assert "cannot write the checkpoint" in last and "file too large" in last and "no checkpoint was written" in last
    assert "Traceback" not in proc.stderr
    assert not (out / "checkpoint.pt").exists() and not (out / ".checkpoint.pt.partial").exists()


def test_diverged_training_stops_without_overwriting_the_checkpoint(tmp_path, capsys, monkeypatch):
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    good = (tmp_path / "run" / "checkpoint.pt").read_bytes()
    real_step = training.Run.train_step

    def poisoned_step(self):
        loss, tps = real_step(self)
        with torch.no_grad():
            next(self.model.parameters()).fill_(float("nan"))
        return loss, tps
    monkeypatch.setattr(training.Run, "train_step", poisoned_step)
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(tmp_path / "run"), *TINY, "--resume",
                                  "--max-steps", "5", "--ckpt-every", "1"])
    assert code == 1 and "no longer finite at step 3" in err.splitlines()[-1] and "holds step 2" in err, err
    assert (tmp_path / "run" / "checkpoint.pt").read_bytes() == good


# ---------------------------------------------------------------------------------------------
# metrics and checkpoints follow the folder; damaged checkpoints are refused


def test_metrics_follow_the_out_dir_on_resume(tmp_path):
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0", name="old")
    (tmp_path / "old").rename(tmp_path / "new")
    run_train(tmp_path, "--max-steps", "3", "--resume", name="new")
    assert not (tmp_path / "old").exists()  # not recreated
    assert [r["resumed"] for r in read_metrics(tmp_path / "new" / "metrics.jsonl", "start")] == [False, True]
    elsewhere = tmp_path / "elsewhere.jsonl"
    run_train(tmp_path, "--max-steps", "4", "--resume", "--metrics", str(elsewhere), name="new")
    assert [r["step"] for r in read_metrics(elsewhere, "start")] == [3]


def test_metrics_may_not_overwrite_the_data_or_the_checkpoint(tmp_path, capsys):
    data = tmp_path / "data.txt"
    data.write_bytes(TEXT.read_bytes())
    code, err = main_err(capsys, ["--data", str(data), "--out-dir", str(tmp_path / "run"), *TINY,
                                  "--metrics", str(data)])
    assert code == 2 and "--metrics" in err and "is --data" in err and data.read_bytes() == TEXT.read_bytes()
    run_train(tmp_path, "--max-steps", "1", "--val-every", "0", "--sample-every", "0")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    before = ckpt.read_bytes()
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(tmp_path / "run"), *TINY, "--resume",
                                  "--max-steps", "2", "--metrics", str(ckpt)])
    assert code == 2 and "is the checkpoint" in err and ckpt.read_bytes() == before


def test_a_torn_metrics_line_does_not_swallow_the_next_record(tmp_path):
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    metrics = tmp_path / "run" / "metrics.jsonl"
    with open(metrics, "a") as f:
        f.write('{"kind": "train", "st')  # the write a kill -9 cut short
    run_train(tmp_path, "--max-steps", "3", "--resume")
    lines = metrics.read_text().splitlines()
    torn = lines.index('{"kind": "train", "st')
    assert json.loads(lines[torn + 1])["kind"] == "start" and json.loads(lines[torn + 1])["resumed"]
    assert read_metrics_lenient(metrics, "end")[-1]["step"] == 3


def read_metrics_lenient(path: Path, kind: str) -> list[dict]:
    out = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if record["kind"] == kind:
            out.append(record)
    return out


class NotATensor:
    """Something a weights_only load refuses to build."""


def _a_checkpoint(tmp_path) -> tuple[Path, dict]:
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    path = tmp_path / "run" / "checkpoint.pt"
    return path, torch.load(path, weights_only=True)


def _flip_inside(path: Path, tensor: torch.Tensor) -> None:
    """Flip one bit in the middle of the bytes of `tensor` as stored in the file."""
    raw = bytearray(path.read_bytes())
    needle = tensor.contiguous().view(torch.uint8).numpy().tobytes()
    at = raw.find(needle)
    assert at >= 0 and raw.find(needle, at + 1) < 0
    raw[at + len(needle) // 2] ^= 0x10
    path.write_bytes(bytes(raw))


@pytest.mark.parametrize("where", ["weight", "optimiser"])
def test_a_flipped_bit_in_a_checkpoint_is_refused(tmp_path, where):
    path, state = _a_checkpoint(tmp_path)
    tensor = state["model"]["token_emb.weight"] if where == "weight" else state["optimizer"]["state"][0]["exp_avg"]
    _flip_inside(path, tensor)
    with pytest.raises(training.CheckpointError, match="do not match the checksum") as e:
        training.load_checkpoint(path)
    assert str(path) in str(e.value) and "weights_only" not in str(e.value)
    with pytest.raises(training.CheckpointError):
        run_train(tmp_path, "--max-steps", "3", "--resume")


def test_flipped_bytes_anywhere_are_refused_or_harmless(tmp_path):
    path, state = _a_checkpoint(tmp_path)
    raw = path.read_bytes()
    expected = training.content_checksum(state)
    damaged = tmp_path / "damaged.pt"
    for offset in range(0, len(raw), max(1, len(raw) // 60)):
        flipped = bytearray(raw)
        flipped[offset] ^= 0xFF
        damaged.write_bytes(bytes(flipped))
        try:
            loaded = training.load_checkpoint(damaged)
        except training.CheckpointError as e:
            assert str(damaged) in str(e) and "weights_only" not in str(e) and "\n" not in str(e)
            continue
        assert training.content_checksum(loaded) == expected, offset  # a byte the contents never depended on


def test_truncated_and_foreign_checkpoints_are_refused_in_one_line(tmp_path, capsys):
    path, _ = _a_checkpoint(tmp_path)
    raw = path.read_bytes()
    cases = {"empty": b"", "half": raw[: len(raw) // 2], "tail-cut": raw[:-10], "text": b"hello"}
    for name, content in cases.items():
        bad = tmp_path / f"{name}.pt"
        bad.write_bytes(content)
        with pytest.raises(training.CheckpointError, match="damaged or is not a checkpoint") as e:
            training.load_checkpoint(bad)
        assert "weights_only" not in str(e.value)
    pickled = tmp_path / "pickled.pt"
    torch.save({"format": training.CHECKPOINT_FORMAT, "x": NotATensor()}, pickled)  # a class: code to run
    with pytest.raises(training.CheckpointError, match="does not read as tensors and plain values") as e:
        training.load_checkpoint(pickled)
    assert "weights_only" not in str(e.value)
    # from the command line: one line, naming the file
    capsys.readouterr()
    assert cli.sample_main(["--checkpoint", str(tmp_path / "half.pt"), "--prompt", "x", "--device", "cpu"]) == 1
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "half.pt" in err


def test_sample_with_a_missing_checkpoint_or_bad_flags_is_one_line(tmp_path, capsys):
    cases = [
        (["--checkpoint", str(tmp_path / "nope.pt"), "--prompt", "x"], "--checkpoint"),
        (["--checkpoint", str(TEXT), "--prompt", ""], "--prompt"),
        (["--checkpoint", str(TEXT), "--prompt", "x", "--temperature", "nan"], "--temperature nan"),
        (["--checkpoint", str(TEXT), "--prompt", "x", "--top-k", "0"], "--top-k 0"),
        (["--checkpoint", str(TEXT), "--prompt", "x", "--length", "-1"], "--length -1"),
        (["--checkpoint", str(TEXT), "--prompt", "x", "--device", "cuda:99"], "--device cuda:99"),
    ]
    for argv, named in cases:
        assert cli.sample_main([*argv, "--device", "cpu"] if "--device" not in argv else argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and err.startswith("sample.py: ") and named in err, (argv, err)
    assert cli.sample_main(["--checkpoint", str(TEXT), "--prompt", "x", "--device", "cpu"]) == 1  # not a checkpoint
    assert "damaged or is not a checkpoint" in capsys.readouterr().err


def test_sample_with_a_tiny_temperature_is_greedy(tmp_path):
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    base = ["--checkpoint", str(tmp_path / "run" / "checkpoint.pt"), "--prompt", "The ", "--length", "12",
            "--device", "cpu", "--threads", "1"]
    greedy = cli.sample(cli.build_sample_parser().parse_args([*base, "--temperature", "0"]))
    tiny = cli.sample(cli.build_sample_parser().parse_args([*base, "--temperature", "1e-45"]))
    assert tiny == greedy


# ---------------------------------------------------------------------------------------------
# --framework jax: the same run with the model and its training step in pure JAX


JAX = ["--framework", "jax", "--scan-backend", "jax"]
JAX_COMMON = ["--log-every", "2", "--val-every", "3", "--sample-every", "6"]


@pytest.fixture(scope="module")
def jax_cache(tmp_path_factory):
    """JAX's persistent compilation cache, in a folder of this module's own: every JAX run here
    compiles the same few functions (a step, a loss, a sample), and the runs after the first load
    them instead of compiling again (about 25 s less a run on 2 busy cores). JAX's settings are put
    back afterwards."""
    pytest.importorskip("optax", reason="the jax extra: pip install 'gateloop-hybrid[jax]'")
    import jax
    from jax.experimental.compilation_cache import compilation_cache

    settings = dict(jax_persistent_cache_min_compile_time_secs=0, jax_persistent_cache_min_entry_size_bytes=-1)
    before = {name: getattr(jax.config, name) for name in [*settings, "jax_compilation_cache_dir"]}
    for name, value in settings.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()
    compilation_cache.set_cache_dir(str(tmp_path_factory.mktemp("jax-cache")))
    yield
    for name, value in before.items():
        jax.config.update(name, value)
    compilation_cache.reset_cache()


@pytest.fixture(scope="module")
def jax_and_torch(tmp_path_factory, jax_cache) -> dict:
    """The same 6 steps in JAX and in torch (each stopped at step 3 and resumed, which gives the
    losses of one run: tested for torch above), with copies of both at step 3."""
    root = tmp_path_factory.mktemp("jax")
    runs = {}
    for name, flags in (("jax", JAX), ("torch", [])):
        out = root / name
        argv = ["--data", str(TEXT), "--out-dir", str(out), *TINY, *JAX_COMMON, *flags]
        first = training.train(*training.parse_train_args([*argv, "--max-steps", "3"]))
        shutil.copytree(out, root / f"{name}-at3")
        second = training.train(*training.parse_train_args([*argv, "--max-steps", "6", "--resume"]))
        runs[name] = dict(losses={**first["losses"], **second["losses"]}, val={**first["val"], **second["val"]})
    return dict(root=root, **runs)


def test_jax_trains_the_torch_model_and_its_checkpoint_loads_in_torch(jax_and_torch, tmp_path):
    """Same initial weights, data and optimiser as torch: the losses agree to float32 rounding
    (they fall); the checkpoint loads in the torch model, gives the JAX loss, and samples."""
    import gateloop_hybrid.jax as glj
    import jax.numpy as jnp

    ran, torch_ran, root = jax_and_torch["jax"], jax_and_torch["torch"], jax_and_torch["root"]
    losses = [ran["losses"][s] for s in range(1, 7)]
    assert all(math.isfinite(x) for x in losses) and losses[-1] < losses[0] - 0.5, losses
    for s in range(1, 7):
        assert ran["losses"][s] == pytest.approx(torch_ran["losses"][s], rel=1e-4), s
    assert ran["val"][6] == pytest.approx(torch_ran["val"][6], rel=1e-4)
    records = read_metrics(root / "jax" / "metrics.jsonl", "train")
    assert [r["step"] for r in records] == [2, 4, 6]
    assert read_metrics(root / "jax" / "metrics.jsonl", "start")[0]["device"] == "jax:cpu:0"
    assert len(read_metrics(root / "jax" / "metrics.jsonl", "sample")[0]["text"]) > 0

    state = training.load_checkpoint(root / "jax" / "checkpoint.pt")
    assert state["format"] == training.CHECKPOINT_FORMAT and state["step"] == 6
    cfg = training.TrainConfig(**state["config"])
    model = training.build_model(cfg.model_kwargs())
    model.load_state_dict(state["model"], strict=True)
    batch = training.Sampler(training.split_data(TEXT.read_bytes(), TEXT.name)[1], cfg.seq_len, 3, seed=7).next()
    with torch.no_grad():
        torch_loss = model(batch, return_loss=True).item()
    jax_model = glj.from_torch_state_dict(state["model"], **cfg.model_kwargs())
    assert float(jax_model(jnp.asarray(batch.numpy()), return_loss=True)) == pytest.approx(torch_loss, rel=2e-6)

    args = ["--checkpoint", str(root / "jax" / "checkpoint.pt"), "--prompt", "ABASEMENT", "--length", "12",
            "--device", "cpu"]
    assert cli.sample(cli.build_sample_parser().parse_args(args)).startswith("ABASEMENT")


def test_jax_resume_continues_exactly_and_takes_a_torch_checkpoint(jax_and_torch, tmp_path, capsys):
    full, root = jax_and_torch["jax"], jax_and_torch["root"]
    shutil.copytree(root / "jax-at3", tmp_path / "split")
    capsys.readouterr()
    # no --framework: the checkpoint's config says jax (TINY's --scan-backend torch is overridden)
    second = run_train(tmp_path, "--max-steps", "6", "--resume", "--scan-backend", "jax", name="split")
    assert "in jax" in capsys.readouterr().err
    assert [second["losses"][s] for s in range(4, 7)] == [full["losses"][s] for s in range(4, 7)]  # exact
    # a torch run's checkpoint (weights and Adam's moments) continues in JAX
    shutil.copytree(root / "torch-at3", tmp_path / "from-torch")
    crossed = run_train(tmp_path, "--max-steps", "6", "--resume", *JAX, name="from-torch")
    for s in range(4, 7):
        assert crossed["losses"][s] == pytest.approx(full["losses"][s], rel=1e-4), s


@pytest.mark.parametrize("flags,message", [
    (["--framework", "tf"], "--framework tf: choose one of torch, jax"),
    (["--framework", "jax", "--scan-backend", "torch"], "--scan-backend torch: not a scan of --framework jax"),
    (["--framework", "jax", "--scan-backend", "jax", "--main-thread-backward"],
     "--main-thread-backward True: torch's autograd setting"),
    (["--framework", "jax", "--scan-backend", "pallas"], "--scan-backend pallas runs on a GPU"),
])
def test_jax_refuses_what_it_cannot_do_in_one_line(tmp_path, capsys, flags, message):
    if "pallas" in flags:
        pytest.importorskip("optax", reason="the jax extra: pip install 'gateloop-hybrid[jax]'")
    out = tmp_path / "run"
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(out), *TINY, *flags])
    assert code == 2 and len(err.splitlines()) == 1 and message in err, err
