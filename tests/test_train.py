"""train.py: data reading, loss falls, exact resume, crash-safe checkpoints, sampling, the CLI.

Everything runs on the CPU with a tiny model on tests/data/devils_dictionary.txt (public domain,
shipped in the repo); nothing is downloaded. The scan backend is "torch" (plain torch, no JIT
warm-up) to keep the suite fast; the backends themselves are tested elsewhere.
"""

from __future__ import annotations

import gzip
import json
import math
import os
import subprocess
import sys
import textwrap
import zipfile
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import train  # noqa: E402

TEXT = REPO / "tests" / "data" / "devils_dictionary.txt"

# A model small enough for a 2-core CPU: a few thousand steps/minute.
TINY = ["--dim", "32", "--depth", "2", "--gate-loop-heads", "8", "--scan-backend", "torch",
        "--seq-len", "32", "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3",
        "--val-batches", "2", "--prime-len", "16", "--gen-len", "8", "--device", "cpu"]


@pytest.fixture(autouse=True, scope="module")
def one_torch_thread():
    """The models here are tiny: one intra-op thread is faster, and far faster on a busy machine."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


SUBPROCESS_ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")


def run_train(tmp_path: Path, *extra: str, name: str = "run") -> dict:
    out = tmp_path / name
    argv = ["--data", str(TEXT), "--out-dir", str(out), *TINY, *extra]
    cfg, given = train.parse_train_args(argv)
    return train.train(cfg, given)


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
    assert train.read_bytes(TEXT) == (raw, TEXT.name)
    assert train.read_bytes(gz) == (raw, "text")
    assert train.read_bytes(zp) == (raw, "enwik8")  # the member's name, which picks the split


def test_zip_with_several_members_is_refused(tmp_path):
    zp = tmp_path / "two.zip"
    with zipfile.ZipFile(zp, "w") as z:
        z.writestr("a", b"x")
        z.writestr("b", b"y")
    with pytest.raises(SystemExit, match="exactly one"):
        train.read_bytes(zp)


def test_split_enwik8_and_proportional():
    enwik8 = bytes(100_000_000)  # the size of the real thing; zeros are enough here
    tr, va = train.split_data(enwik8, "enwik8")
    assert (len(tr), len(va)) == (90_000_000, 5_000_000)
    del enwik8, tr, va
    tr, va = train.split_data(bytes(range(256)) * 4, "other.txt")
    assert len(tr) == 1024 * 90 // 95 and len(tr) + len(va) == 1024
    assert tr.dtype == torch.uint8 and int(va[0]) == len(tr) % 256  # contiguous, in order


def test_missing_data_names_enwik8_and_downloads_nothing(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)  # no data/enwik8.gz here
    with pytest.raises(SystemExit) as e:
        train.main(["--out-dir", str(tmp_path / "run")])
    msg = str(e.value)
    assert "http://mattmahoney.net/dc/enwik8.zip" in msg and "--data PATH" in msg
    assert "Hutter" in msg and "never downloads" in msg
    assert not (tmp_path / "data").exists()


def test_sampler_windows_come_from_the_data_and_follow_the_seed():
    data = torch.arange(1000, dtype=torch.int64).to(torch.uint8)
    a = train.Sampler(data, seq_len=16, batch_size=3, seed=5)
    b = train.Sampler(data, seq_len=16, batch_size=3, seed=5)
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
    assert train.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == 30


def test_time_budget_stops_early(tmp_path):
    summary = run_train(tmp_path, "--max-steps", "100000", "--time-budget", "0.5",
                        "--val-every", "0", "--sample-every", "0")
    assert summary["reason"] == "time_budget" and 0 < summary["step"] < 100000
    assert train.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["step"] == summary["step"]


def test_attention_baseline_trains(tmp_path):
    summary = run_train(tmp_path, "--attention", "--heads", "2", "--dim-head", "16", "--max-steps", "3",
                        "--val-every", "0", "--sample-every", "3")
    assert summary["step"] == 3
    cfg = train.load_checkpoint(tmp_path / "run" / "checkpoint.pt")["config"]
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

    a = train.load_checkpoint(tmp_path / "full" / "checkpoint.pt")
    b = train.load_checkpoint(tmp_path / "split" / "checkpoint.pt")
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
        cfg, _ = train.parse_train_args([*TINY, flag])
        model = train.build_model(cfg.model_kwargs())
        mixers = [m for m in model.modules() if hasattr(m, "checkpoint_gate_looped_attn")]
        assert mixers and all(m.checkpoint_gate_looped_attn is expected for m in mixers)


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
    with pytest.raises(SystemExit, match="--resume to continue"):
        run_train(tmp_path, "--max-steps", "2")
    with pytest.raises(SystemExit, match="--dim 48 differs"):
        run_train(tmp_path, "--max-steps", "2", "--resume", "--dim", "48")
    with pytest.raises(SystemExit, match="no checkpoint"):
        run_train(tmp_path, "--resume", name="nothing-here")
    with pytest.raises(SystemExit, match="--scan-backend nope: .*unknown backend"):
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
    import torch
    import train

    real_save = torch.save
    calls = 0

    def save_then_die_halfway(obj, f, *args, **kwargs):
        # The second checkpoint: write half of it, make sure it is on disk, then SIGKILL ourselves.
        global calls
        calls += 1
        if calls < 2:
            return real_save(obj, f, *args, **kwargs)
        buf = io.BytesIO()
        real_save(obj, buf, *args, **kwargs)
        f.write(buf.getvalue()[: len(buf.getvalue()) // 2])
        f.flush()
        os.fsync(f.fileno())
        os.kill(os.getpid(), signal.SIGKILL)

    torch.save = save_then_die_halfway
    sys.exit(train.main(sys.argv[1:]))
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
    state = train.load_checkpoint(out / "checkpoint.pt")
    assert state["step"] == 2  # the first checkpoint, whole
    # and the run resumes from it
    summary = run_train(tmp_path, "--max-steps", "6", "--resume")
    assert sorted(summary["losses"]) == [3, 4, 5, 6]
    assert train.load_checkpoint(out / "checkpoint.pt")["step"] == 6
    assert not partial.exists()


def test_ctrl_c_while_writing_a_checkpoint_leaves_the_previous_one(tmp_path, monkeypatch, capsys):
    real_save = torch.save
    calls = []

    def save_then_interrupt(obj, f, *args, **kwargs):
        calls.append(1)
        if len(calls) < 2:
            return real_save(obj, f, *args, **kwargs)
        f.write(b"half a checkpoint")
        raise KeyboardInterrupt

    monkeypatch.setattr(torch, "save", save_then_interrupt)
    out = tmp_path / "run"
    code = train.main(["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", "6",
                       "--ckpt-every", "2", "--val-every", "0", "--sample-every", "0"])
    assert code == 130
    assert "interrupted at step 4" in capsys.readouterr().err
    assert train.load_checkpoint(out / "checkpoint.pt")["step"] == 2
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "metrics.jsonl"]  # no leftovers


# ---------------------------------------------------------------------------------------------
# command line


def test_optional_loggers_fail_clearly_when_missing(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorboard", None)  # import tensorboard -> ImportError
    with pytest.raises(SystemExit, match="--tensorboard needs the tensorboard package"):
        run_train(tmp_path, "--max-steps", "1", "--tensorboard")
    monkeypatch.setitem(sys.modules, "wandb", None)
    with pytest.raises(SystemExit, match="--wandb needs the wandb package"):
        run_train(tmp_path, "--max-steps", "1", "--wandb", name="run2")


def test_help_documents_every_flag(capsys):
    with pytest.raises(SystemExit) as e:
        train.main(["--help"])
    assert e.value.code == 0
    text = capsys.readouterr().out
    for f in train.dataclasses.fields(train.TrainConfig):
        assert "--" + f.name.replace("_", "-") in text, f.name
    assert "enwik8.zip" in text and "train.py sample" in text
    with pytest.raises(SystemExit):
        train.main(["sample", "--help"])
    text = capsys.readouterr().out
    for flag in ("--checkpoint", "--prompt", "--length", "--temperature", "--top-k", "--seed", "--device",
                 "--scan-backend", "--bf16"):
        assert flag in text


def test_sampling_from_a_checkpoint_works_from_the_command_line(tmp_path):
    run_train(tmp_path, "--max-steps", "2", "--val-every", "0", "--sample-every", "0")
    ckpt = tmp_path / "run" / "checkpoint.pt"
    prompt = "ABASEMENT, n.  "
    args = ["--checkpoint", str(ckpt), "--prompt", prompt, "--length", "40", "--device", "cpu", "--seed", "3"]
    proc = subprocess.run([sys.executable, str(REPO / "train.py"), "sample", *args], capture_output=True,
                          timeout=120, env=SUBPROCESS_ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    text = proc.stdout.decode("utf-8")
    assert text.startswith(prompt) and len(proc.stdout) > len(prompt) + 20
    assert b"40 bytes after a 15-byte prompt" in proc.stderr
    # the same seed gives the same text, in-process too
    assert train.sample_main(args) + "\n" == text
