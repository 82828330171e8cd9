"""Hostile inputs to train.py, sample.py and the torch layers: bad flags, damaged data and
checkpoints, kill -9, full and read-only disks, bad generate and layer calls. Every attempt must
give the right result or stop with one clear error; each ends in one of hostile_tally's outcomes:

    right            the result is right (a run that should train trains, with the value asked for;
                     a damaged checkpoint whose damage changed nothing loads with the original contents)
    refused clearly  one clear error: a named exception or, on the command line, one line on stderr
                     and a nonzero exit code, whose message names the argument or file
    silent wrong     a wrong result without an error
    unclear          any other failure: a traceback, a message that names nothing, a hang

The command lines run through `train.main(argv)` / `sample.main(argv)` in this process (their
exit code and stderr, as a shell sees them), or as processes where the attack needs one (kills,
file-size limits, exit codes). The tmpfs attacks need root (mount); without it they are skipped.
"""

from __future__ import annotations

import contextlib
import errno
import gzip
import io
import os
import random
import shutil
import signal
import subprocess
import sys
import tempfile
import textwrap
import time
import traceback
import zipfile
from collections import Counter
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))
os.environ.setdefault("OMP_NUM_THREADS", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import hostile_tally  # noqa: E402

import sample  # noqa: E402
import train  # noqa: E402
from gateloop_hybrid.training import checkpoints  # noqa: E402
from gateloop_hybrid import (  # noqa: E402
    CausalFullAttention, GateLoopedAttention, RMSNorm, SimpleGateLoopLayer, Transformer,
)

TEXT = REPO / "tests" / "data" / "devils_dictionary.txt"
TINY = ["--dim", "32", "--depth", "2", "--gate-loop-heads", "8", "--scan-backend", "torch", "--seq-len", "32",
        "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3", "--val-batches", "2", "--prime-len", "16",
        "--gen-len", "8", "--device", "cpu", "--threads", "1", "--val-every", "0", "--sample-every", "0"]
ENV = dict(os.environ, OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8")

pytestmark = [pytest.mark.hostile, pytest.mark.usefixtures("one_torch_thread")]


def record(category: str, outcome: str, what: str, detail: str = "") -> None:
    assert outcome in ("right", "clear", "silent", "unclear"), outcome
    hostile_tally.record(f"{category}: {what}", outcome, detail if outcome in ("silent", "unclear") else "")


def error_lines(stderr: str) -> list[str]:
    """stderr without tqdm's progress output and train.py's start line and step reports."""
    out = []
    for line in stderr.replace("\r", "\n").splitlines():
        s = line.strip()
        if not s or s.startswith(("gateloop:", "attention:", "train.py: GateLoop", "train.py: attention,")):
            continue
        if s.startswith(("step ", "--- step")):
            continue
        out.append(s)
    return out


def judge_cli(code: int, stderr: str, prog: str, names: list[str], expect_error: bool) -> tuple[str, str]:
    """(outcome, detail) of a finished command line run."""
    lines = error_lines(stderr)
    if "Traceback" in stderr:
        return "unclear", stderr
    if not expect_error:
        return ("right", "") if code == 0 else ("unclear", f"exit {code}: {stderr}")
    if code == 0:
        return "silent", f"exit 0 where an error was due: {stderr}"
    if not lines:
        return "unclear", f"exit {code} and no message"
    last = lines[-1]
    if not last.startswith(f"{prog}: ") or "weights_only" in last:
        return "unclear", f"exit {code}: {stderr}"
    if names and not any(n in last for n in names):
        return "unclear", f"exit {code}, the message names none of {names}: {last}"
    return "clear", last


def run_main(entry, argv) -> tuple[int, str]:
    """Call train.main / sample.main in this process; (exit code, stderr)."""
    err, out = io.StringIO(), io.StringIO()
    with contextlib.redirect_stderr(err), contextlib.redirect_stdout(out):
        try:
            code = entry(argv)
        except SystemExit as e:  # argparse
            code = e.code if isinstance(e.code, int) else 1
        except BaseException:  # noqa: BLE001 - an escaping exception is what we count
            err.write(traceback.format_exc())
            code = -1
    return code, err.getvalue()


def run_process(argv, *, timeout=300, preexec=None, script=None) -> subprocess.CompletedProcess:
    cmd = [sys.executable, str(REPO / (script or "train.py")), *argv]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV, preexec_fn=preexec,
                          cwd=str(REPO))


# ---------------------------------------------------------------------------------------------
# flags


INT_FLAGS = {  # flag: (lowest valid, values to try that fit a tiny, quick run)
    "--dim": (1, [16, 32]), "--depth": (1, [1, 2]), "--heads": (1, [1, 2]), "--dim-head": (1, [4, 8]),
    "--ff-mult": (1, [1, 3]), "--seq-len": (1, [1, 8, 33]), "--batch-size": (1, [1, 3]),
    "--grad-accum": (1, [1, 2]), "--max-steps": (0, [0, 1, 2]), "--seed": (0, [0, 7, 2**62]),
    "--val-every": (0, [0, 1, 10**9]), "--val-batches": (1, [1, 3]), "--sample-every": (0, [0, 1, 10**9]),
    "--prime-len": (1, [1, 16]), "--gen-len": (0, [0, 5]), "--ckpt-every": (0, [0, 1, 10**9]),
    "--log-every": (1, [1, 10**9]), "--threads": (1, [1, 2]), "--top-k": (1, [1, 3, 1000]),
    "--gate-loop-heads": (1, [8, 32, 1]),
}
FLOAT_FLAGS = {"--lr": (0.0, False, ["1e-3", "3e-3"]), "--clip": (0.0, True, ["0", "0.5", "1e9"]),
               "--temperature": (0.0, True, ["0", "1.5", "1e-30"]), "--time-budget": (0.0, True, ["0", "100"])}
JUNK = ["", "abc", "1.5", "nan", "inf", "-inf", "1e3", "0x10", " 3", "３"]


def expected_int(flag: str, text: str) -> tuple[bool, str]:
    """(valid?, reason) for an int flag typed as text."""
    low, _ = INT_FLAGS[flag]
    try:
        value = int(text)
    except ValueError:
        if flag in ("--top-k", "--gate-loop-heads") and text.lower() == "none":
            return True, "none"
        return False, "not an int"
    if value < low:
        return False, f"below {low}"
    if flag == "--gate-loop-heads" and 32 % value:
        return False, "does not divide --dim 32"
    if flag == "--seed" and value >= 2**63:
        return False, "too large"
    if flag == "--seq-len" and value + 2 > 2485:  # the validation split of the text
        return False, "longer than the data"
    return True, ""


def expected_float(flag: str, text: str) -> bool:
    low, inclusive, _ = FLOAT_FLAGS[flag]
    try:
        value = float(text)
    except ValueError:
        return False
    if value != value or value in (float("inf"), float("-inf")):
        return False
    return value >= low if inclusive else value > low


def attack_flags(n_random: int, rng: random.Random, tmp: Path) -> None:
    cases = []
    for flag, (low, good) in INT_FLAGS.items():
        for text in [str(low - 1), str(low - 5), *map(str, good), *JUNK[:6]]:
            cases.append((flag, text))
    for flag, (_, _, good) in FLOAT_FLAGS.items():
        for text in ["-1", "nan", "inf", "-inf", "abc", "", *good]:
            cases.append((flag, text))
    for _ in range(n_random):
        flag = rng.choice(list(INT_FLAGS) + list(FLOAT_FLAGS))
        text = rng.choice([str(rng.randint(-3, 40)), rng.choice(JUNK), f"{rng.uniform(-1, 2):.3g}"])
        cases.append((flag, text))
    for i, (flag, text) in enumerate(cases):
        if flag in INT_FLAGS:
            ok, _ = expected_int(flag, text)
        else:
            ok = expected_float(flag, text)
        extra = []
        if flag in ("--heads", "--dim-head"):
            extra = ["--attention"]
        if flag == "--max-steps":
            extra = []
        out = tmp / f"flags{i}"
        argv = ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", "2", *extra, flag, text]
        code, err = run_main(train.main, argv)
        outcome, detail = judge_cli(code, err, "train.py", [flag], expect_error=not ok)
        if outcome == "right":  # the run trained with the value typed, not another
            outcome, detail = check_flag_was_used(out, flag, text)
        elif outcome == "clear" and out.exists() and any(out.iterdir()):
            outcome, detail = "unclear", f"refused, but wrote into {out}: {sorted(p.name for p in out.iterdir())}"
        record("flags", outcome, f"{flag} {text!r}", detail)
        shutil.rmtree(out, ignore_errors=True)
    # a few through a real process: the exit code and stderr as a shell sees them
    for flag, text in [("--batch-size", "0"), ("--dim", "0"), ("--grad-accum", "0"), ("--log-every", "0"),
                       ("--val-batches", "0"), ("--seq-len", "-5"), ("--lr", "nan"), ("--batch-size", "x")]:
        proc = run_process(["--data", str(TEXT), "--out-dir", str(tmp / "proc"), *TINY, flag, text])
        outcome, detail = judge_cli(proc.returncode, proc.stderr, "train.py", [flag], expect_error=True)
        if outcome == "clear" and proc.returncode != 2:
            outcome, detail = "unclear", f"exit {proc.returncode}, not 2, for a bad flag"
        record("flags", outcome, f"process {flag} {text!r}", detail)


def check_flag_was_used(out: Path, flag: str, text: str) -> tuple[str, str]:
    try:
        state = train.load_checkpoint(out / "checkpoint.pt")
    except train.TrainError as e:
        return "unclear", f"trained but its checkpoint does not load: {e}"
    name = flag[2:].replace("-", "_")
    if name == "threads":
        return "right", ""
    saved = state["config"][name]
    if text.lower() == "none":
        want = None
    elif flag in FLOAT_FLAGS:
        want = float(text)
    else:
        want = int(text)
    if saved != want:
        return "silent", f"{flag} {text} ran with {saved!r}"
    return "right", ""


# ---------------------------------------------------------------------------------------------
# data


def attack_data(tmp: Path) -> None:
    raw = TEXT.read_bytes()
    gz = gzip.compress(raw)
    zbuf = io.BytesIO()
    with zipfile.ZipFile(zbuf, "w", compression=zipfile.ZIP_DEFLATED) as z:
        z.writestr("text", raw)
    two = io.BytesIO()
    with zipfile.ZipFile(two, "w") as z:
        z.writestr("a", raw)
        z.writestr("b", raw)
    empty_zip = io.BytesIO()
    with zipfile.ZipFile(empty_zip, "w"):
        pass
    bad = {
        "empty": b"", "empty-gzip": gzip.compress(b""), "one-byte": b"x", "short": raw[:300],
        "gzip-truncated": gz[:len(gz) // 2], "gzip-header-only": gz[:10], "gzip-bad-crc": gz[:-8] + b"\0" * 8,
        "zip-truncated": zbuf.getvalue()[:len(zbuf.getvalue()) // 2], "zip-two-members": two.getvalue(),
        "zip-empty": empty_zip.getvalue(), "zip-magic-only": b"PK\x03\x04", "gzip-magic-only": b"\x1f\x8b",
        "gzip-of-short": gzip.compress(raw[:200]),
    }
    for i in range(6):  # flipped bytes inside the compressed streams
        for name, blob in (("gzip", gz), ("zip", zbuf.getvalue())):
            flipped = bytearray(blob)
            at = random.Random(i).randrange(20, len(blob) - 20)
            flipped[at] ^= 0xFF
            bad[f"{name}-flip{i}"] = bytes(flipped)
    good = {"raw": raw, "gzip": gz, "zip": zbuf.getvalue(), "binary": os.urandom(20_000),
            "exactly-enough": raw[:((32 + 2) * 95 + 94) // 5 + 60]}
    for name, blob in {**bad, **good}.items():
        path = tmp / f"data-{name}"
        path.write_bytes(blob)
        out = tmp / f"data-run-{name}"
        code, err = run_main(train.main, ["--data", str(path), "--out-dir", str(out), *TINY, "--max-steps", "1"])
        expect_error = name in bad
        if name.endswith(("-flip0", "-flip1", "-flip2", "-flip3", "-flip4", "-flip5")) and code == 0:
            # a flipped byte the decompressor cannot notice (e.g. in the gzip mtime): right if the data is the same
            try:
                same = train.read_bytes(path)[0] == raw
            except train.TrainError:
                same = False
            outcome, detail = ("right", "") if same else ("silent", "damaged data read without an error")
        else:
            outcome, detail = judge_cli(code, err, "train.py", ["--data"], expect_error)
        record("data", outcome, name, detail)
        shutil.rmtree(out, ignore_errors=True)
    for name, path in (("folder", tmp), ("missing", tmp / "no-such-file")):
        code, err = run_main(train.main, ["--data", str(path), "--out-dir", str(tmp / "x"), *TINY])
        outcome, detail = judge_cli(code, err, "train.py", ["--data"], True)
        record("data", outcome, name, detail)


# ---------------------------------------------------------------------------------------------
# checkpoints


def make_run(tmp: Path, name: str, steps: int = 2, *extra) -> Path:
    out = tmp / name
    shutil.rmtree(out, ignore_errors=True)
    code, err = run_main(train.main, ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", str(steps),
                                      *extra])
    assert code == 0, err
    return out


def judge_load(path: Path, expected: str) -> tuple[str, str]:
    """Load a damaged checkpoint: a clear refusal, or the original contents, or a failure."""
    try:
        state = train.load_checkpoint(path)
    except train.CheckpointError as e:
        msg = str(e)
        if "\n" in msg or str(path) not in msg or "weights_only" in msg:
            return "unclear", msg
        return "clear", msg
    except BaseException:  # noqa: BLE001
        return "unclear", traceback.format_exc()
    if train.content_checksum(state) != expected:
        return "silent", "a damaged checkpoint loaded with other contents"
    return "right", ""


def attack_checkpoint(tmp: Path, n_offsets: int, rng: random.Random) -> None:
    out = make_run(tmp, "ckpt-src", 3)
    path = out / "checkpoint.pt"
    raw = path.read_bytes()
    state = torch.load(path, weights_only=True)
    expected = train.content_checksum(state)
    damaged = tmp / "damaged.pt"
    offsets = sorted(set(list(range(0, len(raw), max(1, len(raw) // n_offsets))) +
                         [rng.randrange(len(raw)) for _ in range(n_offsets // 3)]))
    # and inside every stored tensor of the model and the optimiser
    for tensor in [*state["model"].values(), *(v for s in state["optimizer"]["state"].values() for v in s.values())]:
        needle = tensor.contiguous().reshape(-1).view(torch.uint8).numpy().tobytes()
        at = raw.find(needle) if len(needle) >= 8 else -1
        if at >= 0:
            offsets.append(at + rng.randrange(len(needle)))
    for offset in offsets:
        flipped = bytearray(raw)
        flipped[offset] ^= 1 << rng.randrange(8)
        damaged.write_bytes(bytes(flipped))
        outcome, detail = judge_load(damaged, expected)
        record("checkpoint", outcome, f"flip at {offset}/{len(raw)}", detail)
    for length in sorted(set([0, 1, 10, 100, 1000, len(raw) - 1, len(raw) - 22, len(raw) // 2] +
                             [rng.randrange(len(raw)) for _ in range(30)])):
        damaged.write_bytes(raw[:length])
        outcome, detail = judge_load(damaged, expected)
        record("checkpoint", outcome, f"truncated to {length}", detail)
    for name, blob in (("garbage-appended", raw + os.urandom(100)),
                       ("zeros-in-middle", raw[:5000] + bytes(2000) + raw[7000:]),
                       ("random", os.urandom(len(raw))), ("text", b"not a checkpoint\n"), ("doubled", raw + raw)):
        damaged.write_bytes(blob)
        outcome, detail = judge_load(damaged, expected)
        record("checkpoint", outcome, name, detail)
    # foreign files that torch.load would open: code to run, another program's tensors, an old format
    foreign = tmp / "foreign.pt"
    for name, obj in (("class", {"format": train.CHECKPOINT_FORMAT, "x": Counter()}),
                      ("plain-tensors", {"weight": torch.zeros(3)}),
                      ("list", [1, 2, 3]),
                      ("altered-without-checksum", {**state, "step": 99}),
                      ("missing-keys", {"format": train.CHECKPOINT_FORMAT, "checksum": None})):
        torch.save(obj, foreign)
        outcome, detail = judge_load(foreign, expected)
        record("checkpoint", outcome, f"foreign {name}", detail)
    # through --resume and sample.py, a damaged checkpoint is one line on the command line
    for i in range(12):
        run = make_run(tmp, f"ckpt-cli{i}", 2) if i == 0 else tmp / "ckpt-cli0"
        ck = run / "checkpoint.pt"
        blob = bytearray(ck.read_bytes() if i == 0 else orig)
        if i == 0:
            orig = bytes(blob)
        at = rng.randrange(len(blob))
        blob[at] ^= 0xFF
        ck.write_bytes(bytes(blob))
        loaded_ok = judge_load(ck, train.content_checksum(torch.load(io.BytesIO(orig), weights_only=True)))
        if loaded_ok[0] == "right":
            record("checkpoint", "right", f"cli flip {at} (harmless)")
            continue
        code, err = run_main(train.main, ["--data", str(TEXT), "--out-dir", str(run), *TINY, "--resume",
                                          "--max-steps", "3"])
        outcome, detail = judge_cli(code, err, "train.py", [str(ck)], True)
        record("checkpoint", outcome, f"resume with flip at {at}", detail)
        code, err = run_main(sample.main, ["--checkpoint", str(ck), "--prompt", "The ", "--device", "cpu",
                                           "--length", "4"])
        outcome, detail = judge_cli(code, err, "sample.py", [str(ck)], True)
        record("checkpoint", outcome, f"sample with flip at {at}", detail)


# ---------------------------------------------------------------------------------------------
# kill -9


def final_weights(path: Path) -> dict:
    return train.load_checkpoint(path)["model"]


def attack_kill(tmp: Path, attempts: int, rng: random.Random) -> None:
    steps = 40
    args = [*TINY, "--max-steps", str(steps), "--ckpt-every", "1", "--log-every", "1"]
    ref = make_run(tmp, "kill-ref", steps, "--ckpt-every", "1", "--log-every", "1")
    reference = final_weights(ref / "checkpoint.pt")
    start = time.perf_counter()
    proc = run_process(["--data", str(TEXT), "--out-dir", str(tmp / "kill-timing"), *args])
    full_time = time.perf_counter() - start
    assert proc.returncode == 0, proc.stderr
    for i in range(attempts):
        out = tmp / f"kill{i}"
        shutil.rmtree(out, ignore_errors=True)
        p = subprocess.Popen([sys.executable, str(REPO / "train.py"), "--data", str(TEXT), "--out-dir", str(out),
                              *args], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL, env=ENV, cwd=str(REPO))
        time.sleep(rng.uniform(0.3, 1.0) * full_time)
        p.send_signal(signal.SIGKILL)
        p.wait()
        what = f"SIGKILL at {i}"
        ck = out / "checkpoint.pt"
        if ck.exists():
            try:
                step = train.load_checkpoint(ck)["step"]
            except train.TrainError as e:
                record("kill", "silent", what, f"the checkpoint left by a kill does not load: {e}")
                continue
            what += f" (checkpoint at step {step})"
            code, err = run_main(train.main, ["--data", str(TEXT), "--out-dir", str(out), *args, "--resume"])
        else:
            what += " (before the first checkpoint)"
            shutil.rmtree(out, ignore_errors=True)
            code, err = run_main(train.main, ["--data", str(TEXT), "--out-dir", str(out), *args])
        record_resumed(code, err, what, ck, reference)


def record_resumed(code, err, what, ck, reference) -> None:
    """A killed run resumed: right when its final weights equal a run never killed."""
    if code != 0:
        record("kill", "unclear", what, f"resume failed: exit {code}: {err[-800:]}")
        return
    got = final_weights(ck)
    same = all(torch.equal(got[k], reference[k]) for k in reference)
    record("kill", "right" if same else "silent", what,
           "" if same else "resumed weights differ from a run never killed")


def attack_kill_in_write(tmp: Path, attempts: int, rng: random.Random) -> None:
    """SIGKILL inside the n-th checkpoint write, after a random fraction of its bytes reached the disk."""
    steps = 12
    args = [*TINY, "--max-steps", str(steps), "--ckpt-every", "2", "--log-every", "1"]
    reference = final_weights(make_run(tmp, "killw-ref", steps, "--ckpt-every", "2", "--log-every", "1")
                              / "checkpoint.pt")
    driver = tmp / "die_in_write.py"
    driver.write_text(textwrap.dedent(f"""
        import os, signal, sys
        sys.path.insert(0, {str(REPO)!r})
        import train
        from gateloop_hybrid.training import checkpoints
        nth, fraction = int(sys.argv[1]), float(sys.argv[2])
        real, calls = checkpoints.write_all, []
        def die_in_write(f, data):
            calls.append(1)
            if len(calls) < nth:
                return real(f, data)
            f.write(bytes(data[: int(len(data) * fraction)]))
            f.flush()
            os.fsync(f.fileno())
            os.kill(os.getpid(), signal.SIGKILL)
        checkpoints.write_all = die_in_write
        sys.exit(train.main(sys.argv[3:]))
    """))
    for i in range(attempts):
        nth, fraction = rng.randint(1, steps // 2), rng.choice([0.0, 0.001, rng.random(), 0.999, 1.0])
        out = tmp / f"killw{i}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, str(driver), str(nth), str(fraction), "--data", str(TEXT),
                               "--out-dir", str(out), *args], capture_output=True, text=True, env=ENV, timeout=300)
        what = f"SIGKILL in checkpoint write {nth} after {fraction:.3f} of it"
        if proc.returncode != -signal.SIGKILL:
            record("kill", "unclear", what, f"the driver did not die: {proc.returncode} {proc.stderr[-500:]}")
            continue
        ck = out / "checkpoint.pt"
        held = None
        if ck.exists():
            try:
                held = train.load_checkpoint(ck)["step"]
            except train.TrainError as e:
                record("kill", "silent", what, f"the checkpoint left by the kill does not load: {e}")
                continue
        if held != (2 * (nth - 1) if nth > 1 else None):
            record("kill", "silent", what, f"the checkpoint holds step {held}, not the previous one")
            continue
        resume = ["--resume"] if held is not None else []
        if not resume:
            shutil.rmtree(out, ignore_errors=True)
        code, err = run_main(train.main, ["--data", str(TEXT), "--out-dir", str(out), *args, *resume])
        record_resumed(code, err, what, ck, reference)


# ---------------------------------------------------------------------------------------------
# full disk, read-only folders


def can_mount() -> bool:
    if os.geteuid() != 0 or not shutil.which("mount"):
        return False
    probe = Path(tempfile.mkdtemp())
    mount = subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(probe)], capture_output=True)
    ok = mount.returncode == 0
    if ok:
        subprocess.run(["umount", str(probe)], check=True)
    probe.rmdir()
    return ok


@contextlib.contextmanager
def tmpfs(size: int, readonly: bool = False):
    where = Path(tempfile.mkdtemp(prefix="attack-tmpfs-"))
    opts = f"size={size}" + (",ro" if readonly else "")
    subprocess.run(["mount", "-t", "tmpfs", "-o", opts, "tmpfs", str(where)], check=True)
    try:
        yield where
    finally:
        while subprocess.run(["umount", "-l", str(where)], capture_output=True).returncode == 0:
            pass  # stacked mounts: take them all off
        with contextlib.suppress(OSError):
            where.rmdir()


def fill(folder: Path, leave: int) -> Path:
    """Write a filler file until only `leave` bytes are free on folder's file system."""
    filler = folder / "filler"
    with open(filler, "wb") as f:
        with contextlib.suppress(OSError):
            while True:
                f.write(b"\0" * 65536)
                f.flush()
    free = shutil.disk_usage(folder).free
    with open(filler, "r+b") as f:
        f.truncate(max(0, filler.stat().st_size - leave + free))
    return filler


def ckpt_size() -> int:
    return (make_run(Path(tempfile.mkdtemp()), "size", 1) / "checkpoint.pt").stat().st_size


def judge_failed_write(code, err, out: Path, held_step) -> tuple[str, str]:
    # ("temporary directory": torch's own, when every temporary folder refuses a file)
    outcome, detail = judge_cli(code, err, "train.py", ["checkpoint", "metrics", "--out-dir", "temporary directory"],
                                True)
    if outcome != "clear":
        return outcome, detail
    ck = out / "checkpoint.pt"
    if held_step is None:
        return "clear", detail
    try:
        step = train.load_checkpoint(ck)["step"]
    except train.TrainError as e:
        return "silent", f"the previous checkpoint did not survive: {e}"
    if step < held_step:
        return "silent", f"checkpoint went back from step {held_step} to {step}"
    return "clear", detail


def attack_disk(tmp: Path, mount_ok: bool, rng: random.Random) -> None:
    size = ckpt_size()
    # simulated ENOSPC/EDQUOT/EIO at the n-th checkpoint write, in-process
    real = checkpoints.write_all
    for nth in (1, 2, 3, 5):
        for err_no in (errno.ENOSPC, errno.EDQUOT, errno.EIO, errno.EROFS):
            calls = []

            def failing(f, data, nth=nth, err_no=err_no):
                calls.append(1)
                if len(calls) < nth:
                    return real(f, data)
                f.write(bytes(data[: len(data) // 3]))
                raise OSError(err_no, os.strerror(err_no))
            checkpoints.write_all = failing
            out = tmp / f"enospc{nth}-{err_no}"
            shutil.rmtree(out, ignore_errors=True)
            try:
                code, err = run_main(train.main, ["--data", str(TEXT), "--out-dir", str(out), *TINY,
                                                  "--max-steps", "6", "--ckpt-every", "1"])
            finally:
                checkpoints.write_all = real
            outcome, detail = judge_failed_write(code, err, out, nth - 1 if nth > 1 else None)
            if outcome == "clear" and (out / ".checkpoint.pt.partial").exists():
                outcome, detail = "unclear", "a partial file was left behind"
            record("disk", outcome, f"simulated {errno.errorcode[err_no]} at write {nth}", detail)
    # a real file-size limit (EFBIG from the kernel) at several sizes
    for limit in (0, 1000, size // 2, size - 1, 2 * size):
        driver = tmp / "fsize.py"
        driver.write_text(textwrap.dedent(f"""
            import resource, signal, sys
            sys.path.insert(0, {str(REPO)!r})
            signal.signal(signal.SIGXFSZ, signal.SIG_IGN)
            resource.setrlimit(resource.RLIMIT_FSIZE, ({limit}, {limit}))
            import train
            sys.exit(train.main(sys.argv[1:]))
        """))
        out = tmp / f"fsize{limit}"
        shutil.rmtree(out, ignore_errors=True)
        proc = subprocess.run([sys.executable, str(driver), "--data", str(TEXT), "--out-dir", str(out), *TINY,
                               "--max-steps", "3", "--ckpt-every", "1"], capture_output=True, text=True, env=ENV,
                              timeout=300)
        if limit >= 2 * size:
            outcome, detail = judge_cli(proc.returncode, proc.stderr, "train.py", [], False)
        else:
            outcome, detail = judge_failed_write(proc.returncode, proc.stderr, out, None)
        record("disk", outcome, f"RLIMIT_FSIZE {limit}", detail)
    if not mount_ok:
        return
    # a real full disk: too small from the start, or filled up by another writer during the run
    for fs_size in (64 << 10, size // 2, size + 4096, 2 * size - 4096):
        with tmpfs(fs_size) as fs:
            out = fs / "run"
            code, err = run_main(train.main, ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", "3"])
            outcome, detail = judge_cli(code, err, "train.py", ["--out-dir"], True)
            record("disk", outcome, f"tmpfs of {fs_size} bytes from the start", detail)
    # filled up by another writer while the run goes on: the next checkpoint or metrics write fails
    for leave in (0, 512, 4096, size // 4, size // 2, size - 4096, size + 8192, 2 * size):
        for when in ("metrics", "checkpoint"):
            with tmpfs(4 * size + (1 << 20)) as fs:
                out = fs / "run"
                make = ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--ckpt-every", "5"]
                make += ["--log-every", "1"] if when == "metrics" else ["--log-every", "1000000"]
                proc = subprocess.Popen([sys.executable, str(REPO / "train.py"), *make, "--max-steps", "400"],
                                        stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=ENV,
                                        cwd=str(REPO))
                deadline = time.time() + 120
                while not (out / "checkpoint.pt").exists() and time.time() < deadline and proc.poll() is None:
                    time.sleep(0.02)
                filler = fill(fs, leave)
                try:
                    _, err = proc.communicate(timeout=300)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    record("disk", "unclear", f"full tmpfs ({leave}, {when}): hung")
                    continue
                if proc.returncode == 0:
                    try:
                        ok = train.load_checkpoint(out / "checkpoint.pt")["step"] == 400
                    except train.TrainError:
                        ok = False
                    outcome, detail = ("right", "") if ok else ("silent", "exit 0 without a whole checkpoint")
                else:
                    outcome, detail = judge_failed_write(proc.returncode, err, out, 5)
                record("disk", outcome, f"filled during the run, {leave} bytes left, {when} records", detail)
                if outcome in ("clear", "right"):  # space again: the run resumes
                    filler.unlink()
                    code, err = run_main(train.main, [*make, "--resume", "--max-steps", "405"])
                    record("disk", "right" if code == 0 else "unclear", f"resume after freeing ({leave}, {when})",
                           err if code else "")


def attack_readonly(tmp: Path, mount_ok: bool) -> None:
    blocker = tmp / "a-file"
    blocker.write_text("")
    cases = [("out-dir under a file", ["--out-dir", str(blocker / "run")], ["--out-dir"]),
             ("out-dir is a file", ["--out-dir", str(blocker)], ["--out-dir"]),
             ("metrics is a folder", ["--out-dir", str(tmp / "m1"), "--metrics", str(tmp)], ["metrics"]),
             ("metrics under a file", ["--out-dir", str(tmp / "m2"), "--metrics", str(blocker / "m.jsonl")],
              ["metrics"]),
             ("metrics is the data", ["--out-dir", str(tmp / "m4"), "--metrics", str(tmp / "data-copy.txt")],
              ["--metrics"])]
    shutil.copy(TEXT, tmp / "data-copy.txt")  # a copy: if the attack wins, the repo's text survives
    for what, argv, names in cases:
        code, err = run_main(train.main, ["--data", str(tmp / "data-copy.txt"), *TINY, "--max-steps", "1", *argv])
        outcome, detail = judge_cli(code, err, "train.py", names, True)
        record("readonly", outcome, what, detail)
    if not mount_ok:
        return
    with tmpfs(1 << 20, readonly=True) as fs:
        for what, argv, names in [("read-only out-dir", ["--out-dir", str(fs / "run")], ["--out-dir"]),
                                  ("read-only out-dir root", ["--out-dir", str(fs)], ["--out-dir"]),
                                  ("read-only metrics",
                                   ["--out-dir", str(tmp / "m3"), "--metrics", str(fs / "m.jsonl")], ["metrics"])]:
            code, err = run_main(train.main, ["--data", str(TEXT), *TINY, "--max-steps", "1", *argv])
            outcome, detail = judge_cli(code, err, "train.py", names, True)
            record("readonly", outcome, what, detail)
    # remounted read-only in the middle of a run (by a driver that does it after the 2nd checkpoint)
    for nth in (1, 2, 3):
        with tmpfs(8 << 20) as fs:
            out = fs / "run"
            driver = tmp / "remount.py"
            driver.write_text(textwrap.dedent(f"""
                import subprocess, sys
                sys.path.insert(0, {str(REPO)!r})
                import train
                from gateloop_hybrid.training import checkpoints
                real = checkpoints.save_checkpoint
                calls = []
                def save_then_remount(*args, **kwargs):
                    calls.append(1)
                    if len(calls) == {nth}:  # a read-only mount on top; open files stay writable
                        subprocess.run(["mount", "--bind", {str(fs)!r}, {str(fs)!r}], check=True)
                        subprocess.run(["mount", "-o", "remount,bind,ro", {str(fs)!r}], check=True)
                    return real(*args, **kwargs)
                checkpoints.save_checkpoint = save_then_remount
                sys.exit(train.main(sys.argv[1:]))
            """))
            proc = subprocess.run([sys.executable, str(driver), "--data", str(TEXT), "--out-dir", str(out), *TINY,
                                   "--max-steps", "5", "--ckpt-every", "1", "--log-every", "1"],
                                  capture_output=True, text=True, env=ENV, timeout=300)
            outcome, detail = judge_failed_write(proc.returncode, proc.stderr, out, nth - 1 if nth > 1 else None)
            record("readonly", outcome, f"remounted read-only before checkpoint {nth}", detail)


# ---------------------------------------------------------------------------------------------
# sample.py


def attack_sample(tmp: Path) -> None:
    ck = make_run(tmp, "sample-src", 2) / "checkpoint.pt"
    base = ["--checkpoint", str(ck), "--prompt", "The ", "--device", "cpu", "--length", "5"]
    cases = [
        (["--checkpoint", str(tmp / "nope.pt"), "--prompt", "x"], "--checkpoint", True),
        (["--checkpoint", str(tmp), "--prompt", "x", "--device", "cpu"], str(tmp), True),
        (["--checkpoint", str(TEXT), "--prompt", "x", "--device", "cpu"], str(TEXT), True),
        ([*base, "--prompt", ""], "--prompt", True),
        ([*base, "--length", "-1"], "--length", True), ([*base, "--length", "x"], "--length", True),
        ([*base, "--length", "0"], "", False), ([*base, "--temperature", "nan"], "--temperature", True),
        ([*base, "--temperature", "inf"], "--temperature", True),
        ([*base, "--temperature", "-1"], "--temperature", True),
        ([*base, "--temperature", "1e-45"], "", False), ([*base, "--temperature", "0"], "", False),
        ([*base, "--top-k", "0"], "--top-k", True), ([*base, "--top-k", "-3"], "--top-k", True),
        ([*base, "--top-k", "1"], "", False), ([*base, "--top-k", "300"], "", False),
        ([*base, "--top-k", "none"], "", False), ([*base, "--seed", "-1"], "--seed", True),
        ([*base, "--device", "cuda:7"], "--device", True), ([*base, "--device", "banana"], "--device", True),
        ([*base, "--scan-backend", "nope"], "--scan-backend", True), ([*base, "--threads", "0"], "--threads", True),
        ([*base, "--prompt", "\u00e9\u4e2d\U0001f600"], "", False), ([*base, "--bf16"], "", False),
        ([*base, "--prompt", "x" * 3000], "", False),
    ]
    for argv, name, expect_error in cases:
        code, err = run_main(sample.main, argv)
        outcome, detail = judge_cli(code, err, "sample.py", [name] if name else [], expect_error)
        record("sample", outcome, " ".join(argv[-2:]), detail)
    for entry in (["sample.py"], ["train.py", "sample"]):
        proc = run_process([*entry[1:], "--checkpoint", str(tmp / "missing.pt"), "--prompt", "x"], script=entry[0])
        outcome, detail = judge_cli(proc.returncode, proc.stderr, "sample.py", ["--checkpoint"], True)
        if outcome == "clear" and len(error_lines(proc.stderr)) != 1:
            outcome = "unclear"
        record("sample", outcome, f"{' '.join(entry)} with a missing checkpoint (process)", detail)


# ---------------------------------------------------------------------------------------------
# generate and the layers


def judge_call(fn, expect_error: bool, names: list[str], check=None) -> tuple[str, str]:
    try:
        result = fn()
    except (ValueError, TypeError) as e:
        msg = str(e)
        if not expect_error:
            return "unclear", f"refused a valid call: {type(e).__name__}: {msg}"
        if "\n" in msg or (names and not any(n in msg for n in names)):
            return "unclear", f"{type(e).__name__}: {msg}"
        return "clear", msg
    except BaseException:  # noqa: BLE001
        return "unclear", traceback.format_exc()
    if expect_error:
        return "silent", f"accepted: {getattr(result, 'shape', result)}"
    if check is not None:
        problem = check(result)
        if problem:
            return "silent", problem
    return "right", ""


def attack_generate(rng: random.Random, n: int) -> None:
    torch.manual_seed(0)
    models = {
        "gateloop": Transformer(dim=16, num_tokens=29, depth=2, gate_loop_heads=4, scan_backend="torch").eval(),
        "attention": Transformer(dim=16, num_tokens=29, depth=2, use_gate_looped_attn=False, heads=2,
                                 dim_head=8).eval(),
    }
    temps = [0, 0.0, 1.0, 0.7, 5.0, 1e-45, 1e-300, 5e-324, 1e30, float("nan"), float("inf"), -1.0, -0.0, "1", None,
             True]
    top_ks = [None, 1, 2, 28, 29, 30, 10**9, 0, -1, 2.0, True, "2"]
    num = [0, 1, 3, -1, 2.0, True, "3"]
    prompts = {
        "ok": lambda: torch.randint(0, 29, (3, 4)), "one-token": lambda: torch.randint(0, 29, (2, 1)),
        "int32": lambda: torch.randint(0, 29, (2, 3), dtype=torch.int32),
        "batch0": lambda: torch.zeros(0, 3, dtype=torch.long),
        "uint8": lambda: torch.randint(0, 29, (2, 3), dtype=torch.uint8),
        "int16": lambda: torch.randint(0, 29, (2, 3), dtype=torch.int16),
        "1d": lambda: torch.randint(0, 29, (4,)), "3d": lambda: torch.randint(0, 29, (1, 2, 3)),
        "float": lambda: torch.rand(2, 3), "empty-seq": lambda: torch.zeros(2, 0, dtype=torch.long),
        "too-big-id": lambda: torch.full((1, 3), 29), "negative-id": lambda: torch.full((1, 3), -1),
        "list": lambda: [[1, 2, 3]],
    }
    valid_prompts = {"ok", "one-token", "int32", "batch0", "uint8", "int16"}
    cases = [(m, p, t, k, nt) for m in models for p in ["ok"] for t in temps[:9] for k in [None, 2] for nt in [3]]
    while len(cases) < n:
        cases.append((rng.choice(list(models)), rng.choice(list(prompts)), rng.choice(temps), rng.choice(top_ks),
                      rng.choice(num)))
    for model_name, prompt_name, temp, k, nt in cases:
        model = models[model_name]
        prompt = prompts[prompt_name]()
        bad = []
        if prompt_name not in valid_prompts:
            bad.append("prompt_ids")
        if isinstance(nt, bool) or not isinstance(nt, int) or nt < 0:
            bad.append("num_tokens")
        if (isinstance(temp, bool) or not isinstance(temp, (int, float)) or temp != temp or temp < 0
                or temp == float("inf")):
            bad.append("temperature")
        if k is not None and (isinstance(k, bool) or not isinstance(k, int) or k < 1):
            bad.append("top_k")

        def check(out, model=model, prompt=prompt, temp=temp, k=k, nt=nt):
            if out.shape != (prompt.shape[0], nt) or out.dtype != prompt.dtype:
                return f"shape {tuple(out.shape)} {out.dtype}"
            if out.numel() and (int(out.min()) < 0 or int(out.max()) >= 29):
                return "token outside the vocabulary"
            if out.numel() and k is not None:
                with torch.no_grad():
                    logits = model(prompt.long())[:, -1]
                kth = logits.topk(min(k, 29), dim=-1).values[:, -1:]
                if not bool((logits.gather(1, out[:, :1].long()) >= kth).all()):
                    return f"a first token outside the top {k}"
            if out.numel() and temp == 0 or (isinstance(temp, float) and 0 < temp < 1e-30):
                greedy = model.generate(prompt, nt, temperature=0.0)
                if not torch.equal(out, greedy):
                    return f"temperature {temp} is not greedy"
            return None
        outcome, detail = judge_call(lambda: model.generate(prompt, nt, temperature=temp, top_k=k), bool(bad), bad,
                                     check)
        record("generate", outcome, f"{model_name} prompt={prompt_name} t={temp!r} k={k!r} n={nt!r}", detail)
    # ties: exactly k distinct tokens, also from bf16-rounded logits
    from gateloop_hybrid.generation import sample
    seeds = torch.arange(4096)
    for k in (1, 2, 3, 5, 16):
        for logits, name in ((torch.zeros(4096, 16), "equal"),
                             (torch.linspace(1, 1.01, 16).to(torch.bfloat16).float().expand(4096, 16), "bf16")):
            got = sample(logits, seeds, torch.zeros_like(seeds), 1.0, k).unique().numel()
            record("generate", "right" if got == k else "silent", f"top_k={k} ties ({name})",
                   "" if got == k else f"{got} distinct tokens")


def attack_layers(rng: random.Random, n: int) -> None:
    torch.manual_seed(0)
    D = 16
    layers = {
        "gateloop": GateLoopedAttention(D, heads=4, scan_backend="torch"),
        "attention": CausalFullAttention(D, dim_head=4, heads=2),
        "simple": SimpleGateLoopLayer(D, scan_backend="torch"),
        "rmsnorm": RMSNorm(D),
    }
    shapes = [(2, 5, D), (1, 1, D), (0, 3, D), (5, D), (D,), (), (2, 2, 5, D), (2, 5, 8), (2, 5, D + 1), (2, 0, D),
              (3, 7, D)]
    dtypes = [torch.float32, torch.float64, torch.bfloat16, torch.int64, torch.bool]
    cases = [(lname, s, dt) for lname in layers for s in shapes for dt in dtypes[:1]]
    while len(cases) < n:
        cases.append((rng.choice(list(layers)), rng.choice(shapes), rng.choice(dtypes)))
    for lname, shape, dtype in cases:
        layer = layers[lname]
        x = torch.zeros(shape, dtype=dtype) if dtype in (torch.int64, torch.bool) else torch.randn(shape, dtype=dtype)
        valid = dtype.is_floating_point and len(shape) >= 1 and shape[-1] == D
        if lname != "rmsnorm":
            valid = valid and len(shape) == 3 and (shape[1] >= 1 or lname == "attention")
        if lname == "simple" or lname == "gateloop":
            valid = valid and shape[1:2] != (0,)

        def run(layer=layer, x=x):
            with torch.no_grad():
                return layer.to(x.dtype if x.dtype.is_floating_point else torch.float32)(x)

        def check(out, x=x):
            if out.shape != x.shape:
                return f"output shape {tuple(out.shape)} for input {tuple(x.shape)}"
            if not bool(torch.isfinite(out.float()).all()):
                return "non-finite output"
            return None
        outcome, detail = judge_call(run, not valid, ["x"], check)
        record("layers", outcome, f"{lname} {tuple(shape)} {dtype}", detail)
    for layer in layers.values():
        layer.float()
    # caches: another batch size, another model's cache, wrong types
    models = {
        "gateloop": Transformer(dim=D, num_tokens=29, depth=2, gate_loop_heads=4, scan_backend="torch").eval(),
        "attention": Transformer(dim=D, num_tokens=29, depth=2, use_gate_looped_attn=False, heads=2, dim_head=8).eval(),
    }
    ids = torch.randint(0, 29, (2, 5))
    with torch.no_grad():
        caches = {name: m(ids, return_cache=True)[1] for name, m in models.items()}
    for mname, model in models.items():
        for cname, cache in caches.items():
            for b in (1, 2, 3):
                for transform in ("as-is", "drop-layer", "tensor", "none-entries", "swap-kv", "transpose", "bf16"):
                    c = list(cache)
                    if transform == "drop-layer":
                        c = c[:1]
                    elif transform == "tensor":
                        c = c[0] if isinstance(c[0], torch.Tensor) else c[0][0]
                    elif transform == "none-entries":
                        c = [None, None]
                    elif transform == "swap-kv" and cname == "attention":
                        c = [(v, k) for k, v in c]
                    elif transform == "transpose":
                        c = [e.transpose(-1, -2) if isinstance(e, torch.Tensor) else (e[0].transpose(-1, -2), e[1])
                             for e in c]
                    elif transform == "bf16":
                        c = [e.to(torch.bfloat16) if isinstance(e, torch.Tensor) and not e.is_complex() else
                             (tuple(t.to(torch.bfloat16) for t in e) if isinstance(e, tuple) else e) for e in c]
                    new = torch.randint(0, 29, (b, 1))
                    valid = (mname == cname and b == 2 and transform in ("as-is", "swap-kv", "bf16")
                             and not (transform == "transpose" and mname == "gateloop"))
                    if transform == "none-entries":
                        valid = mname == "attention" and False  # None per layer is "no cache" for that layer
                    if transform == "transpose" and cname == "gateloop":
                        valid = mname == cname and b == 2  # a square state of the right shape: allowed

                    def step(model=model, c=c, new=new):
                        with torch.no_grad():
                            return model(new, cache=c, return_cache=True)[0]

                    def check(out, b=b):
                        if out.shape != (b, 1, 29) or not bool(torch.isfinite(out).all()):
                            return f"logits {tuple(out.shape)}"
                        return None
                    if transform == "none-entries":
                        # [None, None] means "no cache for either layer": a fresh start, which is right
                        outcome, detail = judge_call(step, False, ["cache"], check)
                    else:
                        outcome, detail = judge_call(step, not valid, ["cache"], check)
                    record("layers", outcome, f"{mname} model, {cname} cache, batch {b}, {transform}", detail)
    # token ids of every integer type (and some that are not), in and out of range
    for mname, model in models.items():
        for dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8, torch.bool, torch.float32):
            for lo, hi in ((0, 29), (28, 29), (29, 30), (-1, 0)):
                if dtype in (torch.uint8, torch.bool) and lo < 0:
                    continue
                ids = torch.randint(lo, hi, (2, 4)).to(dtype)
                valid = dtype not in (torch.bool, torch.float32) and 0 <= lo and hi <= 29

                def fwd(model=model, ids=ids):
                    with torch.no_grad():
                        return model(ids)

                def same_as_long(out, model=model, ids=ids):
                    with torch.no_grad():
                        return None if torch.equal(out, model(ids.long())) else "other logits than int64 ids"
                outcome, detail = judge_call(fwd, not valid, ["x", "token ids"], same_as_long)
                record("layers", outcome, f"{mname} ids {dtype} in [{lo}, {hi})", detail)
    # the loss on too-short sequences
    for mname, model in models.items():
        for shape in ((2, 1), (0, 5), (1, 2), (3, 0)):
            valid = shape[0] >= 1 and shape[1] >= 2
            outcome, detail = judge_call(lambda model=model, shape=shape: model(torch.zeros(shape, dtype=torch.long),
                                                                                  return_loss=True),
                                         not valid, ["x", "return_loss", "seq"],
                                         lambda loss: None if bool(torch.isfinite(loss)) else "non-finite loss")
            record("layers", outcome, f"{mname} return_loss on {shape}", detail)


# ---------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tmp(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("attack-train")


@pytest.fixture(scope="module")
def rng() -> random.Random:
    return random.Random(0)


MOUNT_OK = None


def mount_ok() -> bool:
    global MOUNT_OK
    if MOUNT_OK is None:
        MOUNT_OK = can_mount()
    return MOUNT_OK


CATEGORIES = {
    "flags": lambda tmp, rng: attack_flags(60, rng, tmp),
    "data": lambda tmp, rng: attack_data(tmp),
    "checkpoint": lambda tmp, rng: attack_checkpoint(tmp, 120, rng),
    "kill": lambda tmp, rng: (attack_kill(tmp, 4, rng), attack_kill_in_write(tmp, 4, rng)),
    "disk": lambda tmp, rng: attack_disk(tmp, mount_ok(), rng),
    "readonly": lambda tmp, rng: attack_readonly(tmp, mount_ok()),
    "sample": lambda tmp, rng: attack_sample(tmp),
    "generate": lambda tmp, rng: attack_generate(rng, 150),
    "layers": lambda tmp, rng: attack_layers(rng, 120),
}


@pytest.mark.parametrize("category", list(CATEGORIES))
def test_attack(category, tmp, rng, batch):
    CATEGORIES[category](tmp, rng)
    batch.check()
