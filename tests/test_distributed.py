"""train.py under torchrun on the CPU (gloo): ranks share each batch, so N ranks of --batch-size B
train as one process of --batch-size N x B; checkpoints are full and resume on another number of
ranks, with DistributedDataParallel or FSDP2; rank 0 alone writes. Plus the pure pieces of
gateloop_hybrid.training.distributed.

The tiny model and data of tests/test_train.py; two ranks of one thread each.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO))

import gateloop_hybrid.training as training  # noqa: E402
from gateloop_hybrid.training import cli, distributed, resume  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TEXT = REPO / "tests" / "data" / "devils_dictionary.txt"
TINY = ["--data", str(TEXT), "--dim", "32", "--depth", "2", "--gate-loop-heads", "8", "--scan-backend", "torch",
        "--seq-len", "32", "--grad-accum", "1", "--lr", "3e-3", "--val-batches", "2", "--prime-len", "16",
        "--gen-len", "8", "--device", "cpu", "--threads", "1", "--log-every", "1", "--val-every", "3",
        "--sample-every", "3", "--ckpt-every", "3"]
# the ranks' means are averaged in another order than one process's mean: float32 rounding
ROUNDING = dict(rel=2e-5)



def one_process(out: Path, *extra: str) -> dict:
    return training.train(*training.parse_train_args(["--out-dir", str(out), *TINY, *extra]))


def torchrun(ranks: int, out: Path, *extra: str, check: bool = True) -> subprocess.CompletedProcess:
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(ranks),
           str(REPO / "train.py"), "--out-dir", str(out), *TINY, *extra]
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=240, env=env, cwd=REPO)
    if check:
        assert proc.returncode == 0, proc.stderr[-3000:]
    return proc


def records(out: Path, kind: str) -> list[dict]:
    lines = (out / "metrics.jsonl").read_text().splitlines()
    return [r for r in map(json.loads, lines) if r["kind"] == kind]


def losses(out: Path) -> dict:
    return {r["step"]: r["loss"] for r in records(out, "train")}


def checkpoint(out: Path) -> dict:
    return training.load_checkpoint(out / "checkpoint.pt")


def sample_text(out: Path) -> str:
    args = ["--checkpoint", str(out / "checkpoint.pt"), "--prompt", "ABSURDITY, n. ", "--length", "12",
            "--device", "cpu", "--seed", "1"]
    return cli.sample(cli.build_sample_parser().parse_args(args))


@pytest.fixture(scope="module")
def one(tmp_path_factory) -> dict:
    """The reference: one process, --batch-size 8, 6 steps, with a copy of its step-3 checkpoint,
    then on to step 9 (its losses only)."""
    root = tmp_path_factory.mktemp("one")
    one_process(root / "run", "--batch-size", "8", "--max-steps", "3")
    shutil.copytree(root / "run", root / "at3")
    full = one_process(root / "run", "--max-steps", "6", "--resume")
    shutil.copytree(root / "run", root / "at6")
    one_process(root / "run", "--max-steps", "9", "--resume")
    return dict(root=root, losses=losses(root / "run"), val=records(root / "run", "val"), at3=root / "at3",
                summary=full)


def test_two_ddp_ranks_train_as_one_process_and_resume_on_one(one, tmp_path, capsys):
    out = tmp_path / "ddp"
    proc = torchrun(2, out, "--batch-size", "4", "--max-steps", "3")
    got = losses(out)
    assert sorted(got) == [1, 2, 3]
    assert [got[s] for s in (1, 2, 3)] == pytest.approx([one["losses"][s] for s in (1, 2, 3)], **ROUNDING)
    val, = records(out, "val")
    assert val["step"] == one["val"][0]["step"] == 3
    assert val["loss"] == pytest.approx(one["val"][0]["loss"], **ROUNDING)
    # rank 0 alone wrote the metrics and the summary line; the sample came once
    start, = records(out, "start")
    assert start["ranks"] == 2 and start["parallel"] == "ddp" and len(records(out, "sample")) == 1
    assert proc.stderr.count("train.py: GateLoop") == 1, proc.stderr[-2000:]
    assert "on 2 ranks (DDP, --batch-size 4 each), rank 0 on cpu" in proc.stderr
    assert "256 tokens a step" in proc.stderr  # 4 sequences x 2 ranks x 32 bytes

    # the checkpoint is the single-process one: no "module." prefixes, the same weights
    ckpt, ref = checkpoint(out), checkpoint(one["at3"])
    assert ckpt["world_size"] == 2 and ckpt["config"]["batch_size"] == 4
    assert list(ckpt["model"]) == list(ref["model"])
    for k in ref["model"]:
        torch.testing.assert_close(ckpt["model"][k], ref["model"][k], rtol=1e-4, atol=1e-6)
    assert ckpt["optimizer"]["param_groups"][0]["params"] == ref["optimizer"]["param_groups"][0]["params"]
    assert torch.equal(ckpt["rng"]["data"], ref["rng"]["data"])
    assert sample_text(out).startswith("ABSURDITY, n. ")

    # 2 ranks -> 1 process: --batch-size becomes 8, the same global batches follow
    capsys.readouterr()
    summary = one_process(out, "--resume", "--max-steps", "6")
    assert sorted(summary["losses"]) == [4, 5, 6]
    assert [summary["losses"][s] for s in (4, 5, 6)] == pytest.approx(
        [one["losses"][s] for s in (4, 5, 6)], **ROUNDING)
    assert summary["val"][6] == pytest.approx(one["summary"]["val"][6], **ROUNDING)
    assert checkpoint(out)["config"]["batch_size"] == 8 and "--batch-size" not in capsys.readouterr().err


def test_fsdp2_ranks_resume_a_one_process_checkpoint(one, tmp_path):
    out = tmp_path / "fsdp"
    shutil.copytree(one["at3"], out)
    torchrun(2, out, "--resume", "--max-steps", "6", "--fsdp")
    got = losses(out)
    assert [got[s] for s in (4, 5, 6)] == pytest.approx([one["losses"][s] for s in (4, 5, 6)], **ROUNDING)
    at6, = [r for r in one["val"] if r["step"] == 6]
    assert records(out, "val")[-1]["loss"] == pytest.approx(at6["loss"], **ROUNDING)
    assert records(out, "start")[-1]["parallel"] == "fsdp2"
    # gathered whole: the shapes and names of one process's checkpoint, on the CPU
    ckpt, ref = checkpoint(out), checkpoint(one["root"] / "at6")
    assert ckpt["step"] == 6 and ckpt["world_size"] == 2 and ckpt["config"]["batch_size"] == 4
    assert {k: v.shape for k, v in ckpt["model"].items()} == {k: v.shape for k, v in ref["model"].items()}
    for k in ref["model"]:
        torch.testing.assert_close(ckpt["model"][k], ref["model"][k], rtol=1e-3, atol=1e-5)
    state, ref_state = ckpt["optimizer"]["state"], ref["optimizer"]["state"]
    assert sorted(state) == sorted(ref_state) and all(
        state[i]["exp_avg"].shape == ref_state[i]["exp_avg"].shape for i in state)
    assert sample_text(out).startswith("ABSURDITY, n. ")


@pytest.mark.skipif(sys.platform == "win32", reason="SIGKILL")
def descendants(pid: int) -> list[int]:
    """Every process below ``pid`` (from /proc), children first."""
    parent = {}
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            try:
                stat = open(f"/proc/{entry}/stat").read()
            except OSError:
                continue
            parent[int(entry)] = int(stat.rsplit(")", 1)[1].split()[1])
    found, frontier = [], [pid]
    while frontier:
        children = [p for p, pp in parent.items() if pp in frontier]
        found += children
        frontier = children
    return found


def test_two_ranks_killed_mid_run_resume_on_one_process(one, tmp_path):
    """kill -9 of torchrun and its ranks once a checkpoint exists; one process goes on from it."""
    import signal
    import time

    out = tmp_path / "killed"
    env = {k: v for k, v in os.environ.items() if k not in ("WORLD_SIZE", "RANK", "LOCAL_RANK")}
    env.update(OMP_NUM_THREADS="1")
    # a long sample after every step (rank 0 alone, the other rank waits) slows the run down enough
    # to kill it between checkpoints
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2",
           str(REPO / "train.py"), "--out-dir", str(out), *TINY, "--batch-size", "4", "--max-steps", "9",
           "--sample-every", "1", "--gen-len", "300"]
    proc = subprocess.Popen(cmd, env=env, cwd=REPO, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
                            start_new_session=True)
    try:
        deadline = time.monotonic() + 120
        while not (out / "checkpoint.pt").exists() and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.01)
    finally:
        ranks = descendants(proc.pid)        # torchrun starts its ranks outside its process group
        os.killpg(proc.pid, signal.SIGKILL)
        for pid in ranks:
            try:
                os.kill(pid, signal.SIGKILL)
            except ProcessLookupError:
                pass
        proc.wait()
    step = checkpoint(out)["step"]
    assert step in (3, 6), step
    summary = one_process(out, "--resume", "--max-steps", "9", "--sample-every", "0")
    after = list(range(step + 1, 10))
    assert sorted(summary["losses"]) == after
    assert [summary["losses"][s] for s in after] == pytest.approx([one["losses"][s] for s in after], **ROUNDING)


def test_a_resume_that_would_change_the_data_stream_stops_every_rank_with_one_line(one, tmp_path):
    out = tmp_path / "refused"
    shutil.copytree(one["at3"], out)
    proc = torchrun(2, out, "--resume", "--max-steps", "6", "--batch-size", "3", check=False)
    assert proc.returncode != 0
    lines = [line for line in proc.stderr.splitlines() if line.startswith("train.py")]
    assert lines == ["train.py: --resume: --batch-size 3 x 2 ranks = 6 sequences per micro-batch, but the "
                     "checkpoint's run drew 8 sequences per micro-batch (--batch-size 8 x 1 rank); a resumed run "
                     "keeps its data stream: pass --batch-size 4"], proc.stderr[-2000:]
    assert checkpoint(out)["step"] == 3


# ---------------------------------------------------------------------------------------------
# the pieces, without processes


def test_ranks_take_their_rows_of_one_global_batch():
    data = torch.arange(5000, dtype=torch.int64).to(torch.uint8)
    whole = training.Sampler(data, seq_len=16, batch_size=6, seed=3)
    ranks = [training.Sampler(data, seq_len=16, batch_size=2, seed=3, rank=r, world_size=3) for r in range(3)]
    for _ in range(3):
        assert torch.equal(torch.cat([s.next() for s in ranks]), whole.next())
    assert all(torch.equal(s.state(), whole.state()) for s in ranks)


@pytest.mark.parametrize("saved,ranks,typed,want", [
    ((4, 2), 1, None, 8), ((4, 2), 4, None, 2), ((8, 1), 2, 4, 4),
    ((4, 2), 3, None, "run on a number of ranks that divides 8"),
    ((8, 1), 2, 3, "--batch-size 3 x 2 ranks = 6 sequences per micro-batch, but the checkpoint's run drew 8 "
                   "sequences per micro-batch (--batch-size 8 x 1 rank); a resumed run keeps its data stream: "
                   "pass --batch-size 4"),
])
def test_resume_on_other_ranks_keeps_batch_size_times_ranks(saved, ranks, typed, want):
    cfg = training.TrainConfig(batch_size=typed if typed is not None else 4)
    given = {"batch_size"} if typed is not None else set()
    args = (cfg, given, dict(batch_size=saved[0]), saved[1], ranks)
    if isinstance(want, int):
        assert resume.resume_batch_size(*args) == want
    else:
        with pytest.raises(training.ConfigError, match=want.replace("(", r"\(").replace(")", r"\)")):
            resume.resume_batch_size(*args)


def test_fsdp_outside_torchrun_is_one_line(tmp_path, capsys, monkeypatch):
    monkeypatch.delenv("WORLD_SIZE", raising=False)
    code = cli.train_main(["--out-dir", str(tmp_path / "run"), *TINY, "--fsdp"])
    err = capsys.readouterr().err.strip()
    assert code == 2 and err.startswith("train.py: --fsdp shards the model across the ranks of a torchrun") \
        and len(err.splitlines()) == 1, err


def test_torchruns_environment_is_read_or_refused_by_name():
    env = dict(WORLD_SIZE="4", RANK="3", LOCAL_RANK="1", LOCAL_WORLD_SIZE="2")
    assert distributed.launched(env) and not distributed.launched({})
    assert distributed.ranks_from_env(env) == (3, 1, 4, 2)
    for bad, match in ((dict(env, RANK="4"), "RANK=4 and WORLD_SIZE=4"), (dict(env, LOCAL_RANK="x"), "LOCAL_RANK"),
                       ({"WORLD_SIZE": "2"}, "RANK is not set")):
        with pytest.raises(ValueError, match=match):
            distributed.ranks_from_env(bad)


def test_each_rank_gets_its_own_gpu_and_the_backend_follows_the_device():
    cuda, cpu = torch.device("cuda"), torch.device("cpu")
    assert distributed.rank_device(cuda, 1, 2, gpus=2) == torch.device("cuda", 1)
    assert distributed.rank_device(cpu, 1, 2, gpus=0) == cpu
    assert distributed.backend_for(torch.device("cuda", 1)) == "nccl" and distributed.backend_for(cpu) == "gloo"
    with pytest.raises(ValueError, match="3 ranks run on this machine but it has 2 GPU"):
        distributed.rank_device(cuda, 0, 3, gpus=2)
    with pytest.raises(ValueError, match="cuda:1 names one GPU"):
        distributed.rank_device(torch.device("cuda", 1), 0, 2, gpus=2)


def test_optimiser_state_by_name_and_by_index_round_trip():
    model = torch.nn.Sequential(torch.nn.Linear(3, 4), torch.nn.Linear(4, 2))
    opt = torch.optim.Adam(model.parameters())
    model(torch.randn(2, 3)).sum().backward()
    opt.step()
    names = distributed.parameter_names(model)
    assert names == ["0.weight", "0.bias", "1.weight", "1.bias"]
    by_index = opt.state_dict()
    by_name = distributed.optimizer_state_by_name(by_index, names)
    assert sorted(by_name["state"]) == sorted(names) and by_name["param_groups"][0]["params"] == names
    back = distributed.optimizer_state_by_index(by_name, names)
    assert back["param_groups"] == by_index["param_groups"] and sorted(back["state"]) == sorted(by_index["state"])
    with pytest.raises(ValueError, match="names a parameter the model lacks"):
        distributed.optimizer_state_by_index(by_name, names[:2])
