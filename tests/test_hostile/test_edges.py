"""Hostile inputs at the edges: causality of the chunked (wide-head) form under non-finite and
overflowing values, non-bool options, out-of-range fractions, the JAX twin's inputs, an empty batch
to the Mosaic kernels, hybrid stacks (patterns, decoding, caches), and train.py's command line
under torchrun-like launches, swapped or edited data, odd devices and files, crafted checkpoints
and a damaged launch environment.

train.py and sample.py run as processes here (their command line is the interface under test).
"""
from __future__ import annotations

import json
import math
import os
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

import hostile_tally

pytestmark = [pytest.mark.hostile, pytest.mark.usefixtures("one_torch_thread")]

REPO = Path(__file__).resolve().parents[2]
TEXT = REPO / "tests" / "data" / "devils_dictionary.txt"
TINY = ["--dim", "32", "--depth", "2", "--gate-loop-heads", "8", "--scan-backend", "torch", "--seq-len", "32",
        "--batch-size", "4", "--grad-accum", "1", "--lr", "3e-3", "--val-batches", "2", "--prime-len", "16",
        "--gen-len", "8", "--device", "cpu", "--threads", "1", "--val-every", "0", "--sample-every", "0"]
LAUNCH_VARS = ("RANK", "WORLD_SIZE", "LOCAL_RANK", "LOCAL_WORLD_SIZE", "MASTER_ADDR", "MASTER_PORT",
               "GROUP_RANK", "ROLE_RANK", "TORCHELASTIC_RUN_ID")
CLEAR_TYPES = (TypeError, ValueError, NotImplementedError, RuntimeError)


def call(label: str, fn, expect: tuple[type, ...] | None = None, names: tuple[str, ...] = (),
         avoid: tuple[str, ...] = ()) -> None:
    """One attempt at a Python call: with ``expect`` it must raise one of those types with a
    one-line message holding every one of ``names`` and none of ``avoid``; without, ``fn`` runs
    its own checks and returns a problem (a string) or None."""
    try:
        problem = fn()
    except Exception as e:     # noqa: BLE001 - classifying every failure is the point
        msg = f"{type(e).__name__}: {e}"
        if expect is None:
            hostile_tally.record(label, "unclear", "unexpected error: " + msg[:600])
        elif not isinstance(e, expect):
            hostile_tally.record(label, "unclear", f"expected {'/'.join(t.__name__ for t in expect)}: {msg[:600]}")
        elif any(n.lower() not in str(e).lower() for n in names) or any(a in str(e) for a in avoid):
            hostile_tally.record(label, "unclear", f"message should name {names}, not {avoid}: {msg[:600]}")
        else:
            hostile_tally.record(label, "refused clearly")
        return
    if expect is not None:
        hostile_tally.record(label, "silent wrong", f"no error, expected {'/'.join(t.__name__ for t in expect)}")
    elif problem:
        hostile_tally.record(label, "silent wrong", problem)
    else:
        hostile_tally.record(label, "right")


# ---- causality of the chunked form -------------------------------------------------------------


def _chunk() -> int:
    from gateloop_hybrid import routing
    return routing.CHUNK


def _differs(got: torch.Tensor, want: torch.Tensor, upto: int) -> str | None:
    """None if got[:, :upto] is bit-identical to want[:, :upto], else what differs."""
    g, w = got[:, :upto].detach(), want[:, :upto].detach()
    if torch.equal(g, w):
        return None
    bad = (g != w) & ~(g.isnan() & w.isnan())
    t = int(bad.nonzero()[0, 1]) if bad.any() else -1
    return (f"outputs before t={upto} changed: first at t={t}, {int((~g.isfinite()).sum())} non-finite, "
            f"max |diff| {float((g - w).abs().nan_to_num(float('inf')).max()):.3g}")


BAD_VALUES = {"inf": math.inf, "-inf": -math.inf, "nan": math.nan}
BAD_AT = (64, 100, 140)     # the bad token's position; outputs in the chunks before its chunk are checked


def test_wide_head_layer_causality_under_nonfinite_inputs(batch):
    """GateLoopedAttention with d = 4 and d = 8 features per head (the chunked form): an inf or
    NaN in x at t must not change any output in the chunks before t's chunk."""
    from gateloop_hybrid import GateLoopedAttention
    chunk, n = _chunk(), 150
    for d, backend in [(4, "torch"), (8, "torch"), (4, "auto"), (8, "auto")]:
        torch.manual_seed(0)
        layer = GateLoopedAttention(16, heads=16 // d, scan_backend=backend).eval()
        x = torch.randn(2, n, 16)
        with torch.no_grad():
            clean = layer(x)
        for (name, value), t in [(nv, t) for nv in BAD_VALUES.items() for t in BAD_AT]:
            def attempt(layer=layer, x=x, clean=clean, value=value, t=t):
                bad = x.clone()
                bad[0, t, 3] = value
                with torch.no_grad():
                    return _differs(layer(bad), clean, t // chunk * chunk)
            call(f"GateLoopedAttention d={d} {backend}: {name} in x at t={t} of {n}", attempt)
    batch.check()


def test_wide_head_mixer_causality(batch):
    """gate_loop_mixer(heads=2): an inf or NaN in v (or q, k, the gate pre-activation) at t leaves
    the chunks before t's chunk unchanged; finite q and k whose q . k overflows at t leave every
    output before t unchanged, in float16, bfloat16 and float32."""
    from gateloop_hybrid import gate_loop_mixer
    chunk, n, heads, d = _chunk(), 150, 2, 8
    g = torch.Generator().manual_seed(0)
    qkv = torch.randn(2, n, 3 * heads * d, generator=g)
    z = torch.randn(2, n, 2 * heads, generator=g)
    for backend in ("torch", "auto"):
        clean, _ = gate_loop_mixer(qkv, z, heads=heads, backend=backend)
        for (name, value), t, where in [(nv, t, w) for nv in BAD_VALUES.items() for t in BAD_AT
                                        for w in ("q", "k", "v", "z")]:
            def attempt(value=value, t=t, where=where, clean=clean, backend=backend):
                bq, bz = qkv.clone(), z.clone()
                if where == "z":
                    bz[0, t, 1] = value
                else:
                    bq[0, t, "qkv".index(where) * heads * d + 2] = value
                return _differs(gate_loop_mixer(bq, bz, heads=heads, backend=backend)[0], clean, t // chunk * chunk)
            call(f"gate_loop_mixer heads=2 {backend}: {name} in {where} at t={t} of {n}", attempt)
        for dtype, huge in [(torch.float16, 6e4), (torch.bfloat16, 1e20), (torch.float32, 1e20)]:
            low = qkv.to(dtype)
            ref, _ = gate_loop_mixer(low, z, heads=heads, backend=backend)
            for t in (5, 63, 64, 100, 149):
                def attempt(low=low, ref=ref, t=t, huge=huge, backend=backend):
                    bq = low.clone()
                    bq[:, t, : 2 * heads * d] = huge        # q and k at t: finite, q . k overflows
                    return _differs(gate_loop_mixer(bq, z, heads=heads, backend=backend)[0], ref, t)
                call(f"gate_loop_mixer heads=2 {backend} {dtype}: q . k overflows at t={t}", attempt)
    batch.check()


def test_jax_wide_heads_causality(batch):
    """The JAX twin's GateLoopedAttention with wide heads: the same causality under inf and NaN."""
    pytest.importorskip("equinox")
    import jax
    import jax.numpy as jnp

    import gateloop_hybrid.jax as glj
    chunk, n = _chunk(), 150
    for d in (4, 8):
        layer = glj.GateLoopedAttention(16, heads=16 // d, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (2, n, 16))
        clean = torch.from_numpy(jax.device_get(layer(x)).copy())
        for (name, value), t in [(nv, t) for nv in BAD_VALUES.items() for t in BAD_AT]:
            def attempt(layer=layer, x=x, clean=clean, value=value, t=t):
                got = torch.from_numpy(jax.device_get(layer(x.at[0, t, 3].set(value))).copy())
                return _differs(got, clean, t // chunk * chunk)
            call(f"jax GateLoopedAttention d={d}: {name} in x at t={t} of {n}", attempt)
        for t in (5, 100):
            def overflow(layer=layer, x=x, clean=clean, t=t):
                got = torch.from_numpy(jax.device_get(layer(x.at[:, t].set(jnp.float32(1e19)))).copy())
                return _differs(got, clean, t)
            call(f"jax GateLoopedAttention d={d}: huge finite x at t={t}", overflow)
    batch.check()


# ---- options that are not bools, fractions out of range ----------------------------------------


NOT_BOOLS = ["False", "no", "", 1.0, [True]]     # (0, 1 and numpy bools are left to the code)


def test_non_bool_options_refused(batch):
    from gateloop_hybrid import GateLoopedAttention, gate_loop_mixer
    from gateloop_hybrid.scan import gate_loop_scan
    a, x = torch.rand(2, 5, 3), torch.randn(2, 5, 3)
    for backend in ("loop", "torch", "heinsen", "jax", "auto"):
        for value in NOT_BOOLS:
            call(f"gate_loop_scan[{backend}] reverse={value!r}",
                 lambda value=value, backend=backend: gate_loop_scan(a, x, reverse=value, backend=backend),
                 (TypeError,), ("reverse",))
    qkv, z = torch.randn(1, 6, 3 * 2 * 4), torch.randn(1, 6, 4)
    for option in ("ablate_complex", "ablate_state_transition", "recompute"):
        for value in NOT_BOOLS:
            call(f"gate_loop_mixer {option}={value!r}",
                 lambda option=option, value=value: gate_loop_mixer(qkv, z, heads=2, **{option: value}),
                 (TypeError,), (option,))
    for value in NOT_BOOLS:
        call(f"GateLoopedAttention(checkpoint_gate_looped_attn={value!r})",
             lambda value=value: GateLoopedAttention(8, heads=2, checkpoint_gate_looped_attn=value),
             (TypeError,), ("checkpoint_gate_looped_attn",))
        layer = GateLoopedAttention(8, heads=2)
        for option in ("ablate_complex", "ablate_state_transition", "return_cache"):
            call(f"GateLoopedAttention.forward({option}={value!r})",
                 lambda layer=layer, option=option, value=value: layer(torch.randn(1, 4, 8), **{option: value}),
                 (TypeError,), (option,))
    batch.check()


def test_frac_gradient_out_of_range_refused(batch):
    from gateloop_hybrid import GateLoopedAttention, Transformer
    for value in (math.nan, math.inf, -math.inf, -0.1, 1.5, 2):
        call(f"GateLoopedAttention(frac_gradient_state_transition={value})",
             lambda value=value: GateLoopedAttention(8, heads=2, frac_gradient_state_transition=value),
             (ValueError,), ("frac_gradient_state_transition",))
        call(f"Transformer(frac_gradient_state_transition={value})",
             lambda value=value: Transformer(dim=8, num_tokens=10, depth=1, frac_gradient_state_transition=value),
             (ValueError,), ("frac_gradient_state_transition",))
    for value in (0.0, 0.5, 1.0, 1):
        def accepted(value=value):
            out = GateLoopedAttention(8, heads=2, frac_gradient_state_transition=value)(torch.randn(1, 3, 8))
            return None if bool(out.isfinite().all()) else "non-finite output"
        call(f"GateLoopedAttention(frac_gradient_state_transition={value}) accepted", accepted)
    batch.check()


# ---- hybrid stacks ----------------------------------------------------------------------------


def test_hybrid_stacks(batch):
    from gateloop_hybrid import Transformer
    from gateloop_hybrid.generation import DecodeState, decode_step, prefill
    kw = dict(dim=16, num_tokens=11, depth=2, heads=2, dim_head=8, scan_backend="torch")
    for value, error in (("G", ValueError), ("g a", ValueError), (" g", ValueError), ("gx", ValueError),
                         ("", ValueError), ("gag", ValueError), ("gggg", ValueError), (123, TypeError),
                         (b"g", TypeError), (["g", "a"], TypeError), (True, TypeError)):
        call(f"Transformer(layer_pattern={value!r})", lambda value=value: Transformer(**kw, layer_pattern=value),
             (error,), ("layer_pattern",))
    call("Transformer(layer_pattern='ga', use_gate_looped_attn=False)",
         lambda: Transformer(**kw, layer_pattern="ga", use_gate_looped_attn=False), (ValueError,), ("layer_pattern",))
    ids = torch.randint(0, 11, (2, 7), generator=torch.Generator().manual_seed(0))
    for pattern in ("g", "a", "m", "ga", "am", "mg"):
        def decodes(pattern=pattern):
            torch.manual_seed(0)
            model = Transformer(**kw, layer_pattern=pattern).eval()
            with torch.no_grad():
                full = model(ids)
                state = DecodeState(model, 2, 7)
                steps = [prefill(model, ids[:, :3], state)]
                steps += [decode_step(model, ids[:, t], state) for t in range(3, 7)]
            err = float((torch.stack(steps, 1) - full[:, 2:7]).abs().max())
            return None if err < 1e-5 else f"decoded logits differ from the forward's by {err:.2e}"
        call(f"layer_pattern={pattern!r}: decoding equals the forward", decodes)
    model = Transformer(**kw, layer_pattern="m")
    layer = model.layers[0][0].fn
    x = torch.randn(2, 3, 16)
    _, good = layer(x, return_cache=True)
    for label, cache, error, names in (
            ("a GateLoop state", torch.zeros(2, 2, 8, 8, dtype=torch.complex64), TypeError, ("cache",)),
            ("(k, v) alone", good[1], TypeError, ("cache",)),
            ("the simple state for another batch", (torch.zeros(3, 16), good[1]), ValueError, ("cache",)),
            ("(k, v) of another width", (good[0], (good[1][0][..., :4], good[1][1][..., :4])), ValueError, ("cache",)),
            ("a list of three", [good[0], good[1], good[1]], TypeError, ("cache",))):
        call(f"AugmentedAttention cache={label}", lambda cache=cache: layer(x, cache=cache), (error,), names)
    for value in ("yes", 1, None):
        call(f"generate(compile={value!r})", lambda value=value: model.generate(ids[:, :3], 2, compile=value),
             (TypeError,), ("compile",))
    batch.check()


# ---- the JAX twin's inputs ---------------------------------------------------------------------


def test_jax_twin_inputs(batch):
    pytest.importorskip("equinox")
    import jax
    import jax.numpy as jnp
    import numpy as np

    import gateloop_hybrid.jax as glj
    from gateloop_hybrid import Transformer
    for d in (1, 4):
        layer = glj.GateLoopedAttention(8, heads=8 // d, key=jax.random.key(0))
        x = jax.random.normal(jax.random.key(1), (2, 3, 8))
        _, state = layer(x, return_cache=True)
        for name, cache in [("real float32", jnp.real(state)), ("abs", jnp.abs(state)),
                            ("float64 numpy", np.asarray(jnp.real(state), dtype=np.float64))]:
            call(f"jax GateLoopedAttention d={d} with a {name} cache",
                 lambda layer=layer, x=x, cache=cache: layer(x, cache=cache),
                 (TypeError, ValueError), ("cache", "complex"))
        call(f"jax GateLoopedAttention d={d} with its own complex cache",
             lambda layer=layer, x=x, state=state: None if bool(jnp.isfinite(layer(x, cache=state)).all())
             else "non-finite output")
    torch.manual_seed(0)
    kwargs = dict(dim=16, num_tokens=29, depth=1, gate_loop_heads=4)
    sd = Transformer(**kwargs).state_dict()
    for key in [k for k in sd if sd[k].is_floating_point()][:3]:
        for dtype in (torch.complex64, torch.complex128):
            bad = dict(sd, **{key: sd[key].to(dtype)})
            call(f"from_torch_state_dict with {key} as {dtype}",
                 lambda bad=bad: glj.from_torch_state_dict(bad, **kwargs),
                 (TypeError, ValueError), (key, "complex"), ("hypot",))
    model = glj.from_torch_state_dict(sd, **kwargs)
    for dtype in (torch.int64, torch.int32, torch.uint8):
        ids = torch.randint(0, 29, (2, 5)).to(dtype)
        call(f"jax Transformer given torch {dtype} token ids", lambda ids=ids: model(ids),
             (TypeError, ValueError), ("torch",), ("Cannot interpret",))
    call("jax Transformer given numpy int64 token ids",
         lambda: None if model(np.zeros((2, 5), np.int64)).shape == (2, 5, 29) else "wrong shape")
    batch.check()


# ---- Mosaic kernels on an empty batch ----------------------------------------------------------


def test_mosaic_empty_batch(batch):
    """The Mosaic GPU scan (interpret mode on a CPU) on an empty batch: an empty result of the
    right shapes, or a ValueError naming the batch."""
    pytest.importorskip("absl")
    from gateloop_hybrid.ops import mosaic as mosaic_op
    for shape, cplx in [((0, 8, 128), False), ((0, 8, 128), True), ((0, 1, 2, 128), False)]:
        label = f"Mosaic scan (interpret mode) on an empty batch {shape} complex={cplx}"
        a, x = torch.rand(shape) * 0.5 + 0.4, torch.randn(shape)
        if cplx:
            a, x = torch.polar(a, torch.rand(shape)), x.to(torch.complex64)
        try:
            h, last = mosaic_op.scan_mosaic(a, x)
        except ValueError as e:
            ok = "batch" in str(e).lower() or "empty" in str(e).lower()
            hostile_tally.record(label, "refused clearly" if ok else "unclear", f"ValueError: {e}")
            continue
        except Exception as e:      # noqa: BLE001
            hostile_tally.record(label, "unclear", f"{type(e).__name__}: {e}")
            continue
        right = tuple(h.shape) == shape and tuple(last.shape) == (0, *shape[2:])
        hostile_tally.record(label, "right" if right else "silent wrong", f"shapes {tuple(h.shape)} {tuple(last.shape)}")
    batch.check()


# ---- train.py's command line as a process ------------------------------------------------------


def _env(**extra) -> dict:
    env = {k: v for k, v in os.environ.items() if k not in LAUNCH_VARS}
    env.update(OMP_NUM_THREADS="1", PYTHONIOENCODING="utf-8", **extra)
    return env


def cli(argv, *, script="train.py", env=None, timeout=240, stdin=subprocess.DEVNULL):
    """(exit code, stderr) of ``python script argv``; a hang past ``timeout`` is (None, ...)."""
    try:
        proc = subprocess.run([sys.executable, str(REPO / script), *argv], capture_output=True, text=True,
                              timeout=timeout, env=env or _env(), cwd=REPO, stdin=stdin)
    except subprocess.TimeoutExpired as e:
        return None, f"hung for {timeout} s: {(e.stderr or b'')[-800:]!r}"
    return proc.returncode, proc.stderr


def judge_refusal(label: str, code, err: str, prog: str, names: tuple[str, ...], avoid: tuple[str, ...] = ()):
    """A command line that must stop: nonzero exit, no traceback, its last line ``prog: ...``
    naming each of names and none of avoid."""
    lines = [s.strip() for s in err.replace("\r", "\n").splitlines() if s.strip()]
    last = lines[-1] if lines else ""
    if code is None:
        return hostile_tally.record(label, "unclear", err)
    if code == 0:
        return hostile_tally.record(label, "silent wrong", f"exit 0 where a refusal was due: {err[-800:]}")
    if "Traceback" in err or not last.startswith(f"{prog}: "):
        return hostile_tally.record(label, "unclear", f"exit {code}: {err[-1200:]}")
    if any(n not in last for n in names) or any(a.lower() in last.lower() for a in avoid):
        return hostile_tally.record(label, "unclear", f"the line should name {names} and not {avoid}: {last}")
    return hostile_tally.record(label, "refused clearly")


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("edges")


@pytest.fixture(scope="module")
def trained(work) -> Path:
    """A 2-step run on a copy of the text (its checkpoint is what the resume cases start from)."""
    data = work / "text.txt"
    data.write_bytes(TEXT.read_bytes())
    code, err = cli(["--data", str(data), "--out-dir", str(work / "run"), *TINY, "--max-steps", "2"])
    assert code == 0, err[-2000:]
    return work


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


RANK_FLAGS = {   # flag: (rank 0's value, rank 1's value)
    "--lr": ("3e-3", "1e-3"), "--seq-len": ("32", "16"), "--seed": ("0", "1"), "--data": (None, None),
    "--scan-backend": ("torch", "heinsen"), "--val-every": ("0", "1"), "--max-steps": ("2", "3"),
}


def test_ranks_with_different_flags(batch, work):
    """Two ranks (gloo, CPU; the environment torchrun sets) whose command lines differ in one flag:
    every rank must stop with one line naming the flag, not train on different settings or hang."""
    other = work / "other.txt"
    other.write_bytes(TEXT.read_bytes()[::-1])
    for flag, values in RANK_FLAGS.items():
        if flag == "--data":
            values = (str(TEXT), str(other))
        out = work / f"ranks{flag}"
        port = _free_port()
        procs = []
        for rank, value in enumerate(values):
            base = ["--data", str(TEXT), "--out-dir", str(out), *TINY, "--max-steps", "2"]
            env = _env(RANK=str(rank), LOCAL_RANK=str(rank), WORLD_SIZE="2", LOCAL_WORLD_SIZE="2",
                       MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
            procs.append(subprocess.Popen([sys.executable, str(REPO / "train.py"), *base, flag, value],
                                          stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True, env=env,
                                          cwd=REPO))
        results = []
        deadline = time.time() + 240
        for p in procs:
            try:
                _, err = p.communicate(timeout=max(1, deadline - time.time()))
                results.append((p.returncode, err))
            except subprocess.TimeoutExpired:
                p.kill()
                results.append((None, "hung"))
        for rank, (code, err) in enumerate(results):
            judge_refusal(f"2 ranks differing in {flag} ({values[0]} / {values[1]}): rank {rank}", code, err,
                          "train.py", (flag,))
    batch.check()


def test_resume_on_other_data(batch, trained):
    """--resume with another file of the same length, or the same file edited in place: refused
    in one line naming --data, not trained on other text."""
    data, out = trained / "text.txt", trained / "run"
    raw = data.read_bytes()
    swapped = trained / "swapped.txt"
    swapped.write_bytes(raw[len(raw) // 2:] + raw[: len(raw) // 2])
    code, err = cli(["--data", str(swapped), "--out-dir", str(out), *TINY, "--max-steps", "3", "--resume"])
    judge_refusal("--resume on another file of the same length", code, err, "train.py", ("--data",))
    edited = bytearray(raw)
    edited[len(raw) // 3] ^= 0x20
    work_copy = trained / "edited-run"
    subprocess.run(["cp", "-r", str(out), str(work_copy)], check=True)
    data.write_bytes(bytes(edited))
    try:
        code, err = cli(["--data", str(data), "--out-dir", str(work_copy), *TINY, "--max-steps", "3", "--resume"])
    finally:
        data.write_bytes(raw)
    judge_refusal("--resume on the same file edited in place", code, err, "train.py", ("--data",))
    batch.check()


def test_odd_devices_and_files(batch, work):
    code, err = cli(["--data", str(TEXT), "--out-dir", str(work / "meta"), *[a if a != "cpu" else "meta" for a in TINY],
                     "--max-steps", "1"])
    judge_refusal("--device meta", code, err, "train.py", ("--device",))
    fifo = work / "fifo"
    os.mkfifo(fifo)
    for name in ("/dev/null", "/dev/zero", str(fifo)):
        code, err = cli(["--data", name, "--out-dir", str(work / "odd"), *TINY, "--max-steps", "1"], timeout=90)
        judge_refusal(f"--data {name}", code, err, "train.py", ("--data",), ("no such file",))
    batch.check()


def test_crafted_checkpoints(batch, trained):
    """A checkpoint whose checksum is right but whose config is a list, or whose step is a string:
    --resume and sample.py stop with one line naming the file."""
    import train
    src = trained / "run" / "checkpoint.pt"
    state = torch.load(src, map_location="cpu", weights_only=True)
    crafted = {"config is a list": dict(state, config=list(state["config"].items())),
               "config is a string": dict(state, config="dim=32"),
               "step is a string": dict(state, step="2"),
               "step is negative": dict(state, step=-5),
               "model is a list": dict(state, model=list(state["model"].values()))}
    for name, bad in crafted.items():
        run = trained / f"crafted-{name.replace(' ', '-')}"
        run.mkdir()
        bad = dict(bad, checksum=None)
        bad["checksum"] = train.content_checksum(bad)
        torch.save(bad, run / "checkpoint.pt")
        code, err = cli(["--data", str(trained / "text.txt"), "--out-dir", str(run), *TINY, "--max-steps", "3",
                         "--resume"])
        judge_refusal(f"--resume from a checkpoint whose {name}", code, err, "train.py", ("checkpoint",))
        code, err = cli(["--checkpoint", str(run / "checkpoint.pt"), "--prompt", "The ", "--device", "cpu",
                         "--length", "4"], script="sample.py")
        judge_refusal(f"sample.py from a checkpoint whose {name}", code, err, "sample.py", ("checkpoint",))
    batch.check()


LAUNCH_ENVS = [   # (environment, what the line must name: the variables and the bad values)
    (dict(RANK="2", WORLD_SIZE="2", LOCAL_RANK="0"), ("RANK", "WORLD_SIZE", "2")),
    (dict(RANK="0", LOCAL_RANK="0"), ("RANK", "WORLD_SIZE")),
    (dict(RANK="-1", WORLD_SIZE="2", LOCAL_RANK="0"), ("RANK", "-1")),
    (dict(RANK="0", WORLD_SIZE="0", LOCAL_RANK="0"), ("WORLD_SIZE", "0")),
    (dict(RANK="0", WORLD_SIZE="two", LOCAL_RANK="0"), ("WORLD_SIZE", "two")),
    (dict(RANK="1", WORLD_SIZE="2", LOCAL_RANK="5", LOCAL_WORLD_SIZE="2"), ("LOCAL_RANK", "5")),
]


def test_damaged_launch_environment(batch, work):
    for env, names in LAUNCH_ENVS:
        env = dict(env, MASTER_ADDR="127.0.0.1", MASTER_PORT=str(_free_port()))
        code, err = cli(["--data", str(TEXT), "--out-dir", str(work / "env"), *TINY, "--max-steps", "1"],
                        env=_env(**env), timeout=120)
        judge_refusal(f"launch environment {json.dumps(env)}", code, err, "train.py", names)
    batch.check()
