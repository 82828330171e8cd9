"""gateloop_hybrid.training's guards: ranks that agree before the first step, resumes that check
their data, one clear line for each bad device, data file, checkpoint or torchrun environment, old
checkpoints that still load, and a layout without import loops or private names across modules.

CPU only, a tiny model, a few steps; the two-rank tests start two processes with gloo by hand
(no torchrun agent), each told its rank through the environment.
"""

from __future__ import annotations

import ast
import json
import os
import re
import shlex
import socket
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gateloop_hybrid.training as training  # noqa: E402
from gateloop_hybrid.training import checkpoints, cli, config, data, metrics, world  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = REPO / "tests" / "data" / "devils_dictionary.txt"
TINY = ["--dim", "16", "--depth", "1", "--gate-loop-heads", "4", "--scan-backend", "torch", "--seq-len", "16",
        "--batch-size", "2", "--grad-accum", "1", "--val-batches", "1", "--prime-len", "8", "--gen-len", "4",
        "--device", "cpu", "--threads", "1", "--val-every", "0", "--sample-every", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
    ENV.pop(name, None)


def run_train(out: Path, *extra: str, data_path: Path = TEXT) -> dict:
    return training.train(*training.parse_train_args(["--data", str(data_path), "--out-dir", str(out), *TINY,
                                                      *extra]))


def main_err(capsys, argv, main=cli.train_main) -> tuple[int, str]:
    capsys.readouterr()
    code = main(argv)
    return code, capsys.readouterr().err.strip()


def one_line(err: str, prog: str = "train.py") -> str:
    lines = [line for line in err.splitlines() if line.startswith(prog)]
    assert len(lines) == 1 and "Traceback" not in err, err
    return lines[0]


# ---------------------------------------------------------------------------------------------
# ranks agree before the first step


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def two_ranks(argvs: list[list[str]], timeout: float = 120) -> list[tuple[int, str]]:
    """Start `python train.py` as ranks 0 and 1 of a gloo group, each with its own flags; their
    (exit code, stderr)."""
    port = free_port()
    procs = []
    for rank, argv in enumerate(argvs):
        env = dict(ENV, RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE=str(len(argvs)),
                   LOCAL_WORLD_SIZE=str(len(argvs)), MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *argv], env=env, cwd=REPO,
                                      stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True))
    try:
        return [(p.wait(timeout=timeout), p.stderr.read()) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()


def test_ranks_given_different_flags_or_data_all_stop_with_one_line(tmp_path):
    """Another --lr, --seq-len, --seed, --scan-backend, --val-every, --max-steps or --data on one rank:
    both ranks exit 2 before the first step, rank 0 naming each flag and both ranks' values."""
    other = tmp_path / "other.txt"
    other.write_bytes(TEXT.read_bytes()[:20_000])
    base = ["--data", str(TEXT), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "4", "--lr", "0.003"]
    differ = ["--lr", "0.002", "--seq-len", "24", "--seed", "5", "--scan-backend", "loop", "--val-every", "2",
              "--max-steps", "6", "--data", str(other), "--threads", "2"]
    (code0, err0), (code1, err1) = two_ranks([base, [*base, *differ]])
    assert code0 == code1 == 2, (err0[-2000:], err1[-2000:])
    line = one_line(err0)
    assert line.startswith("train.py: ranks disagree on ") and line.endswith("start every rank with the same flags, "
                                                                           "data and checkpoint"), line
    for part in ("--lr (rank 0: 0.003, rank 1: 0.002)", "--seq-len (rank 0: 16, rank 1: 24)",
                 "--seed (rank 0: 0, rank 1: 5)", "--scan-backend (rank 0: torch, rank 1: loop)",
                 "--val-every (rank 0: 0, rank 1: 2)", "--max-steps (rank 0: 4, rank 1: 6)",
                 f"--data (rank 0: {TEXT} (47,207 bytes, sampled sha256 ", f"rank 1: {other} (20,000 bytes"):
        assert part in line, (part, line)
    assert "--threads" not in line  # threads may differ from rank to rank
    assert one_line(err1) == line  # each rank says why it stopped
    assert not (tmp_path / "run").exists()  # nothing written


def test_an_error_on_one_rank_stops_both(tmp_path):
    """A missing file on rank 1 alone: both exit 2, and rank 0 says which rank met what."""
    base = ["--data", str(TEXT), "--out-dir", str(tmp_path / "run"), *TINY, "--max-steps", "2"]
    (code0, err0), (code1, err1) = two_ranks([base, [*base, "--data", str(tmp_path / "missing.txt")]])
    assert code0 == code1 == 2, (err0[-2000:], err1[-2000:])
    line = one_line(err0)
    assert line.startswith(f"train.py [rank 1]: --data {tmp_path / 'missing.txt'}: no such file"), err0
    assert one_line(err1) == line  # said by rank 0 and by the rank that met it


def test_disagreement_names_every_rank_that_differs():
    facts = [dict(lr=0.1, seq_len=32, data=None), dict(lr=0.1, seq_len=64, data=None),
             dict(lr=0.2, seq_len=64, data=None)]
    assert world.disagreement(facts) == ("ranks disagree on --lr (rank 0: 0.1, rank 2: 0.2), --seq-len (rank 0: 32, "
                                         "rank 1: 64, rank 2: 64); start every rank with the same flags, data and "
                                         "checkpoint")
    assert world.disagreement(facts[:1] * 3) is None
    cfg = training.TrainConfig(threads=3, metrics="m.jsonl", out_dir="here", data="x")
    facts = world.run_facts(cfg, dict(path="/a/x", size=3, sha256="ab"), None)
    assert not set(config.PER_RANK) & (set(facts) - {"data"}) and facts["data"]["size"] == 3
    assert {"lr", "seq_len", "seed", "scan_backend", "val_every", "max_steps", "fsdp", "checkpoint"} <= set(facts)


# ---------------------------------------------------------------------------------------------
# resumes check their data


def test_fingerprint_samples_blocks_of_a_large_file_and_notices_edits(tmp_path):
    big = tmp_path / "big.bin"
    raw = bytearray(os.urandom(1 << 20))
    big.write_bytes(raw)
    fp = data.fingerprint(big)
    assert fp["size"] == 1 << 20 and fp["path"] == str(big.resolve())
    copy = tmp_path / "copy.bin"
    copy.write_bytes(raw)
    assert data.same_data(fp, data.fingerprint(copy))  # the same bytes elsewhere
    for at in (0, len(raw) // 2, len(raw) - 1):  # first block, a sampled block, last block
        edited = bytearray(raw)
        edited[at if at != len(raw) // 2 else (len(raw) - 4096) * 8 // 17] ^= 1
        big.write_bytes(edited)
        assert not data.same_data(fp, data.fingerprint(big)), at
    big.write_bytes(raw + b"x")
    assert not data.same_data(fp, data.fingerprint(big))
    small = tmp_path / "small.txt"  # below 18 blocks: every byte counts
    small.write_bytes(TEXT.read_bytes())
    fp_small = data.fingerprint(small)
    edited = bytearray(TEXT.read_bytes())
    edited[12_345] ^= 1
    small.write_bytes(edited)
    assert not data.same_data(fp_small, data.fingerprint(small))


def test_resume_refuses_changed_data_unless_allowed(tmp_path, capsys):
    text = tmp_path / "text.txt"
    raw = TEXT.read_bytes()
    text.write_bytes(raw)
    out = tmp_path / "run"
    run_train(out, "--max-steps", "1", data_path=text)
    state = training.load_checkpoint(out / "checkpoint.pt")
    assert state["data_fingerprint"] == data.fingerprint(text)
    # edited in place, same length
    edited = bytearray(raw)
    edited[len(raw) // 3] ^= 0x20
    text.write_bytes(edited)
    argv = ["--data", str(text), "--out-dir", str(out), *TINY, "--resume", "--max-steps", "2"]
    code, err = main_err(capsys, argv)
    line = one_line(err)
    assert code == 2 and line.startswith(f"train.py: --resume: --data {text} has changed since "), line
    assert "47,207 bytes" in line and line.endswith("pass --allow-data-change to train on it anyway"), line
    # another file, not the same length
    other = tmp_path / "other.txt"
    other.write_bytes(raw[:30_000])
    code, err = main_err(capsys, [*argv[:1], str(other), *argv[2:]])
    assert code == 2 and f"--data {other} (30,000 bytes" in one_line(err) and f"trained on, {text} (47,207" in err, err
    # --allow-data-change: a warning, and training goes on with it (recorded from now on)
    code, err = main_err(capsys, [*argv[:1], str(other), *argv[2:], "--allow-data-change"])
    assert code == 0, err
    assert "train.py: warning: --allow-data-change: --data" in err and "training goes on with it" in err, err
    assert training.load_checkpoint(out / "checkpoint.pt")["data_fingerprint"]["size"] == 30_000
    # the same bytes at another path: the same data
    copy = tmp_path / "copy.txt"
    copy.write_bytes(raw[:30_000])
    code, err = main_err(capsys, [*argv[:1], str(copy), *argv[2:-1], "3"])
    assert code == 0 and "warning" not in err, err


def rewrite(path: Path, state: dict) -> None:
    """Save `state` as a checkpoint with a valid checksum, as a crafted or older file would be."""
    state = dict(state)
    state["checksum"] = checkpoints.content_checksum(state)
    torch.save(state, path)


def test_checkpoints_without_a_fingerprint_resume_with_one_warning(tmp_path, capsys):
    out = tmp_path / "run"
    run_train(out, "--max-steps", "1")
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    del state["data_fingerprint"]
    del state["config"]["allow_data_change"]
    rewrite(out / "checkpoint.pt", state)
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--resume", "--max-steps", "2"])
    assert code == 0, err
    warnings = [line for line in err.splitlines() if "warning" in line]
    assert warnings == [f"train.py: warning: {out / 'checkpoint.pt'} records no fingerprint of its data (written "
                        f"before checkpoints carried one): --data is checked by its split sizes only"], err


def git_old_train_py() -> str | None:
    """train.py as it was while it held the whole trainer (before gateloop_hybrid.training), or None
    without the git history."""
    try:
        commit = subprocess.run(["git", "log", "-1", "--format=%H", "--diff-filter=D", "--",
                                 "gateloop_hybrid/distributed.py"], cwd=REPO, capture_output=True, text=True,
                                timeout=30).stdout.strip()
        if not commit:
            return None
        old = subprocess.run(["git", "show", f"{commit}^:train.py"], cwd=REPO, capture_output=True, text=True,
                             timeout=30)
    except (OSError, subprocess.SubprocessError):
        return None
    return old.stdout if old.returncode == 0 and "class _Run" in old.stdout else None


OLD_DRIVER = textwrap.dedent("""
    import sys
    sys.path.insert(0, {repo!r})
    import gateloop_hybrid.training.distributed as moved
    sys.modules["gateloop_hybrid.distributed"] = moved   # where the old train.py looks for it
    import gateloop_hybrid
    gateloop_hybrid.distributed = moved
    sys.path.insert(0, {here!r})
    import old_train
    sys.exit(old_train.main(sys.argv[1:]))
""")


def test_a_checkpoint_written_by_the_single_file_train_py_resumes_and_samples(tmp_path, capsys):
    old = git_old_train_py()
    if old is None:
        pytest.skip("needs the git history with the single-file train.py")
    (tmp_path / "old_train.py").write_text(old)
    driver = tmp_path / "driver.py"
    driver.write_text(OLD_DRIVER.format(repo=str(REPO), here=str(tmp_path)))
    out = tmp_path / "run"
    argv = ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", "2", "--log-every", "1"]
    proc = subprocess.run([sys.executable, str(driver), *argv], capture_output=True, text=True, timeout=120, env=ENV)
    assert proc.returncode == 0, proc.stderr[-2000:]
    old_state = torch.load(out / "checkpoint.pt", weights_only=True)
    assert "data_fingerprint" not in old_state and old_state["step"] == 2
    # the same run in one go, by this code: resuming the old checkpoint gives its losses exactly
    full = run_train(tmp_path / "full", "--max-steps", "4")
    capsys.readouterr()
    resumed = run_train(out, "--max-steps", "4", "--resume")
    assert [resumed["losses"][s] for s in (3, 4)] == [full["losses"][s] for s in (3, 4)]
    assert "records no fingerprint" in capsys.readouterr().err
    code, err = main_err(capsys, ["--checkpoint", str(out / "checkpoint.pt"), "--prompt", "A", "--length", "4",
                                  "--device", "cpu"], main=cli.sample_main)
    assert code == 0, err


# ---------------------------------------------------------------------------------------------
# one clear line for each bad device, data file, checkpoint or environment


def test_device_meta_is_refused_in_one_line(tmp_path, capsys):
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(tmp_path / "run"), *TINY, "--device", "meta"])
    assert code == 2 and one_line(err).startswith("train.py: --device meta: holds tensor shapes but no values"), err
    code, err = main_err(capsys, ["--checkpoint", str(TEXT), "--prompt", "x", "--device", "meta"],
                         main=cli.sample_main)
    assert code == 2 and one_line(err, "sample.py").startswith("sample.py: --device meta: holds tensor shapes"), err
    assert not (tmp_path / "run").exists()


@pytest.mark.parametrize("kind", ["dev-null", "dev-zero", "fifo", "folder", "empty", "broken-link"])
def test_data_that_is_not_a_regular_file_says_what_it_is(tmp_path, capsys, kind):
    path = {"dev-null": Path("/dev/null"), "dev-zero": Path("/dev/zero")}.get(kind, tmp_path / "data")
    if kind in ("dev-null", "dev-zero") and not path.exists():
        pytest.skip(f"no {path} here")
    if kind == "fifo":
        if not hasattr(os, "mkfifo"):
            pytest.skip("no FIFOs here")
        os.mkfifo(path)
    elif kind == "folder":
        path.mkdir()
    elif kind == "empty":
        path.write_bytes(b"")
    elif kind == "broken-link":
        path.symlink_to(tmp_path / "gone")
    code, err = main_err(capsys, ["--data", str(path), "--out-dir", str(tmp_path / "run"), *TINY])
    said = {"dev-null": "is a character device, not a regular file", "dev-zero": "is a character device",
            "fifo": "is a named pipe (FIFO), not a regular file", "folder": "is a folder",
            "empty": "is empty (0 bytes)", "broken-link": "a broken symbolic link"}[kind]
    line = one_line(err)
    assert code == 2 and line.startswith(f"train.py: --data {path}") and said in line, line
    assert "no such file" not in line or kind == "broken-link"


@pytest.mark.parametrize("entry,value,said", [
    ("config", [1, 2], "a config that is not a dict (config: [1, 2])"),
    ("model", [torch.zeros(3)] * 2, "model weights that are not a dict (model: a list of 2 entries)"),
    ("step", "7", "a step that is not a whole number >= 0 (step: '7')"),
    ("data_len", [1], "split sizes that are not two whole numbers"),
    ("log_window", dict(loss="x"), "a log window that is not a dict of numbers"),
])
def test_a_crafted_checkpoint_is_refused_in_one_line(tmp_path, capsys, entry, value, said):
    out = tmp_path / "run"
    run_train(out, "--max-steps", "1")
    path = out / "checkpoint.pt"
    state = torch.load(path, weights_only=True)
    state[entry] = value
    rewrite(path, state)
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--resume", "--max-steps", "2"])
    line = one_line(err)
    assert code == 1 and said in line and line.endswith("it is not a checkpoint train.py can use"), line
    code, err = main_err(capsys, ["--checkpoint", str(path), "--prompt", "x", "--device", "cpu"], main=cli.sample_main)
    assert code == 1 and said in one_line(err, "sample.py"), err


@pytest.mark.parametrize("env,said", [
    (dict(RANK="3", WORLD_SIZE="2", LOCAL_RANK="0"), "RANK=3 and WORLD_SIZE=2: need 0 <= RANK < WORLD_SIZE"),
    (dict(RANK="1"), "RANK=1 is set but WORLD_SIZE is not"),
    (dict(LOCAL_RANK="0", RANK="0"), "RANK=0 and LOCAL_RANK=0 are set but WORLD_SIZE is not"),
    (dict(WORLD_SIZE="2", LOCAL_RANK="0"), "RANK is not set, though WORLD_SIZE is"),
    (dict(WORLD_SIZE="2", RANK="0", LOCAL_RANK="0"), "MASTER_ADDR and MASTER_PORT are not set (WORLD_SIZE=2, RANK=0)"),
    (dict(WORLD_SIZE="0", RANK="0", LOCAL_RANK="0"), "WORLD_SIZE=0: need at least 1"),
])
def test_a_torchrun_environment_that_does_not_add_up_is_named(tmp_path, capsys, monkeypatch, env, said):
    for name in ("WORLD_SIZE", "RANK", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT"):
        monkeypatch.delenv(name, raising=False)
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    code, err = main_err(capsys, ["--data", str(TEXT), "--out-dir", str(tmp_path / "run"), *TINY])
    line = one_line(err)  # printed by every process, whatever RANK says
    assert code == 2 and line.startswith("train.py: torchrun's environment: ") and said in line, line


# ---------------------------------------------------------------------------------------------
# the demo, the README, the entry points


def test_preset_demo_runs_in_jax_too():
    for framework, scan in (("torch", "torch"), ("jax", "jax")):
        cfg, given = training.parse_train_args(["--preset", "demo", "--framework", framework])
        cfg = training.apply_preset(cfg, given)
        training.check_config(cfg)
        assert cfg.scan_backend == scan and cfg.dim == training.PRESETS["demo"]["dim"]
    cfg, given = training.parse_train_args(["--preset", "demo", "--framework", "jax", "--scan-backend", "pallas"])
    assert training.apply_preset(cfg, given).scan_backend == "pallas"  # typed flags still win


def test_memorizing_is_said_once_when_validation_rises_while_training_falls():
    watch = metrics.MemorizingWatch(44_722)
    assert watch.see(100, 3.5, None) is None
    assert watch.see(200, 3.0, 3.2) is None       # both fall
    assert watch.see(300, 3.1, 3.3) is None       # both rise
    assert watch.see(350, 3.11, 3.2) is None      # within the noise of validation
    note = watch.see(400, 3.2, 2.9)
    assert note == ("step 400: validation rising while training loss falls (3.11 -> 3.20 against 3.20 -> 2.90 bits "
                    "per character): the model is memorizing its 45 KB of training text")
    assert watch.see(500, 3.6, 2.5) is None       # once


TRAIN_COMMAND = re.compile(r"^(?:torchrun .*?|python |gateloop-)(train\.py|sample\.py|train|sample)\s+(.*?)(?:\s+#.*)?$")


def commands(text: str) -> list[tuple[str, list[str]]]:
    """(train or sample, argv) of every command line in the text's shell blocks and indented examples."""
    out = []
    for line in text.splitlines():
        m = TRAIN_COMMAND.match(line.strip())
        if m:
            out.append((m.group(1).removesuffix(".py"), shlex.split(m.group(2))))
    return out


def out_dir_of(argv: list[str]) -> str:
    cfg, given = training.parse_train_args(argv)
    cfg = training.apply_preset(cfg, given)
    return cfg.out_dir or str(Path("runs") / ("attention" if cfg.attention else "gateloop"))


@pytest.mark.parametrize("doc", ["README.md", "docs/training.md", "train.py"])
def test_the_documented_commands_agree_on_their_out_dirs(doc):
    """Run in the order written, each documented --resume and sample.py --checkpoint names a folder
    that a train command before it writes (--preset demo writes runs/demo, a plain run runs/gateloop),
    and the demo, the one run that needs no download, is followed by a sample of its checkpoint."""
    written, sampled, demos = set(), set(), set()
    for kind, argv in commands((REPO / doc).read_text(encoding="utf-8")):
        if kind == "train" and argv[:1] == ["sample"]:
            kind, argv = "sample", argv[1:]
        if kind == "train" and "--help" not in argv:
            out = out_dir_of(argv)
            if "--resume" in argv:
                assert out in written, (doc, argv, written)
            written.add(out)
            if "--preset" in argv:
                demos.add(out)
        elif kind == "sample" and "--checkpoint" in argv:
            folder = str(Path(argv[argv.index("--checkpoint") + 1]).parent)
            assert folder in written, (doc, argv, written)
            sampled.add(folder)
    assert demos and demos <= sampled, (doc, demos, sampled)


def test_setup_names_the_console_commands_and_they_exist():
    setup = (REPO / "setup.py").read_text(encoding="utf-8")
    entries = dict(re.findall(r'"(gateloop-\w+) = ([\w.]+:\w+)"', setup))
    assert entries == {"gateloop-train": "gateloop_hybrid.training.cli:train_main",
                       "gateloop-sample": "gateloop_hybrid.training.cli:sample_main"}
    import importlib
    for target in entries.values():
        module, name = target.split(":")
        assert callable(getattr(importlib.import_module(module), name))


def test_train_py_and_sample_py_are_the_command_lines_and_keep_the_api():
    import sample
    import train

    assert train.main is cli.train_main and sample.main is cli.sample_main
    for name in ("train", "TrainConfig", "load_checkpoint", "read_bytes", "split_data", "TrainError",
                 "CHECKPOINT_FORMAT", "content_checksum", "Sampler"):
        assert getattr(train, name) is getattr(training, name), name
    assert sample.sample is cli.sample and sample.build_parser is cli.build_sample_parser
    for path in (REPO / "train.py", REPO / "sample.py"):
        assert len(path.read_text().splitlines()) < 60, path


def test_no_import_loop_and_no_private_name_across_modules():
    package = REPO / "gateloop_hybrid" / "training"
    for path in [*package.glob("*.py"), REPO / "train.py", REPO / "sample.py"]:
        tree = ast.parse(path.read_text(encoding="utf-8"))
        for node in ast.walk(tree):
            if isinstance(node, ast.Import):
                names = [a.name for a in node.names]
                assert not {"train", "sample"} & set(names), (path, names)
            elif isinstance(node, ast.ImportFrom):
                assert node.module not in ("train", "sample"), path
                private = [a.name for a in node.names if a.name.startswith("_") and a.name != "__future__"]
                assert not private, (path, private)
            elif isinstance(node, ast.Attribute) and isinstance(node.value, ast.Name) and path.parent == package:
                module_names = {"checkpoints", "distributed", "config", "data", "devices", "errors", "metrics",
                                "resume", "run", "world", "loop", "cli"}
                if node.value.id in module_names:
                    assert not node.attr.startswith("_"), (path, node.value.id, node.attr)
    assert not (REPO / "gateloop_hybrid" / "distributed.py").exists()


def test_metrics_records_keep_their_kinds(tmp_path):
    """The metrics file of a short run: the kinds and order that readers of metrics.jsonl expect."""
    out = tmp_path / "run"
    run_train(out, "--max-steps", "2", "--log-every", "1")
    kinds = [json.loads(line)["kind"] for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert kinds == ["start", "train", "train", "val", "end"]
