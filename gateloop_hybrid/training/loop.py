"""The training loop: ``train(cfg, given)`` checks everything it can before the first step (flags,
device, data, the ranks' agreement, output folder, disk space), then trains, validates, samples and
checkpoints as the flags say, with a progress bar and metrics, and stops with a TrainError in one
line when something goes wrong."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import os
import shutil
import sys
import tempfile
from pathlib import Path

import torch

from . import distributed
from .checkpoints import CHECKPOINT_NAME
from .config import TrainConfig, apply_preset, check_config
from .data import fingerprint, printable, resolve_data_path
from .errors import CheckpointError, ConfigError, DataError, DivergedError, OutputError, TrainError, every_rank, os_reason
from .metrics import MemorizingWatch, Metrics, NoMetrics
from .resume import check_resumed_data, resolve_config
from .run import JaxRun, Run
from .world import agree, on_main, run_facts, start_world, stop_world


def check_output(out_dir: Path, ckpt_path: Path, ckpt_bytes: int) -> None:
    """Make sure the checkpoint can be written before training for it: the folder exists (or can
    be made) and takes a file, and the disk has room for two checkpoints (the old one stays whole
    until the new one is written beside it), counting a checkpoint already there as one of the two."""
    try:
        out_dir.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise OutputError(f"--out-dir {out_dir}: cannot create the folder: {os_reason(e)}") from None
    try:
        fd, probe = tempfile.mkstemp(dir=out_dir, prefix=".write-test-")
        try:
            os.write(fd, b"x")
        finally:
            os.close(fd)
            os.unlink(probe)
    except OSError as e:
        raise OutputError(f"--out-dir {out_dir}: cannot write there: {os_reason(e)}") from None
    existing = ckpt_path.stat().st_size if ckpt_path.is_file() else 0
    need = 2 * max(ckpt_bytes, existing) - existing
    free = shutil.disk_usage(out_dir).free
    if free < need:
        raise OutputError(f"--out-dir {out_dir}: {free / 2**20:.1f} MiB free on its disk; a checkpoint takes about "
                          f"{max(ckpt_bytes, existing) / 2**20:.1f} MiB and replacing one safely needs "
                          f"{need / 2**20:.1f} MiB more. Free some space or choose another --out-dir")


def summary_line(run: Run, state: dict | None) -> str:
    """The line a run prints as it starts: model, size, device, data, steps, output folder."""
    cfg = run.cfg
    model = "attention" if cfg.attention else f"GateLoop (scan {run.scan_backend})"
    if cfg.layer_pattern is not None:
        model = f"hybrid {cfg.layer_pattern} (g GateLoop, a attention, m simple GateLoop + attention; scan {run.scan_backend})"
    if cfg.framework != "torch":
        model = f"{model} in {cfg.framework}"
    where, name = run.device_info()
    device = f"{where}, {run.threads} thread{'s' * (run.threads != 1)}" if where.endswith("cpu") else (
        f"{where} ({name})" if name else where)
    where = f"resuming at step {run.step} of {cfg.max_steps}" if state is not None else f"{cfg.max_steps} steps"
    if run.world.distributed:
        device = (f"{run.world.size} ranks ({'FSDP2' if run.sharded else 'DDP'}, --batch-size {cfg.batch_size} each), "
                  f"rank 0 on {device}")
    return (f"train.py: {model}, {run.n_params:,} parameters, on {device}; data {run.data_path} "
            f"({len(run.train_data):,} train / {len(run.val_data):,} val bytes); {where}, "
            f"{run.tokens_per_step:,} tokens a step; out {cfg.out_dir}")


def train(cfg: TrainConfig, given: set[str] = frozenset()) -> dict:
    """Run training as configured; `given` names the flags typed on the command line (they
    override a resumed checkpoint's config). Returns {"step", "reason", "losses": {step: loss},
    "val": {step: bpc}, "checkpoint"}.

    Checks what it can before the first step (flags, device, data, output folder, disk space) and
    raises a TrainError subclass, with a one-line message naming the flag or file, when anything is wrong.

    Under torchrun, call it on every rank: each trains its share of every batch (see
    gateloop_hybrid.training.distributed) and returns the same losses; rank 0 alone writes. The ranks
    first agree on their flags, data and checkpoint, and all stop with one line naming what differs.
    """
    try:
        cfg = apply_preset(cfg, given)
        # a resumed config is checked once merged with the checkpoint's; ranks check theirs together,
        # once they can talk, so that a flag out of range on one rank stops all of them
        if not cfg.resume and not distributed.launched():
            check_config(cfg)
        world, device = start_world(cfg)
    except ConfigError as e:  # the same flags on every rank
        raise every_rank(e) from None
    finished = False
    try:
        result = run_training(cfg, given, world, device)
        finished = True
        return result
    except TrainError as e:
        if not hasattr(e, "rank"):
            e.rank = world.rank
        raise
    finally:
        stop_world(world, finished)


def run_training(cfg: TrainConfig, given: set[str], world, device: torch.device) -> dict:
    """train() once the process knows its place among the ranks."""
    from tqdm import tqdm

    error = facts = state = data_fp = None
    notes = []
    try:
        if world.distributed and not cfg.resume:
            check_config(cfg)
        cfg, state = resolve_config(cfg, given, world.size)
        data_fp = fingerprint(resolve_data_path(cfg.data))
        if state is not None:
            notes.append(check_resumed_data(cfg, state, data_fp, Path(cfg.out_dir) / CHECKPOINT_NAME))
        facts = run_facts(cfg, data_fp, state)
    except (ConfigError, DataError, CheckpointError) as e:
        error = e
    agree(world, error, facts)  # every rank, before anything else talks across ranks
    if state is not None and state["step"] >= cfg.max_steps:
        if world.main:
            print(f"train.py: --resume: {Path(cfg.out_dir) / CHECKPOINT_NAME} is at step {state['step']}, and "
                  f"--max-steps is {cfg.max_steps}: nothing to train (pass a larger --max-steps to go on)",
                  file=sys.stderr)
        return dict(losses={}, val={}, step=state["step"], reason="already_done",
                    checkpoint=str(Path(cfg.out_dir) / CHECKPOINT_NAME))
    try:
        run = (JaxRun(cfg, state, world, data_fingerprint=data_fp) if cfg.framework == "jax"
               else Run(cfg, state, world, device, data_fingerprint=data_fp))
    except (ConfigError, DataError) as e:
        raise every_rank(e) from None
    notes = [n for n in notes if n]
    if not any(n.startswith("--allow-data-change") for n in notes):  # else it said the data changed already
        notes += run.data_warnings
    on_main(world, lambda: check_output(Path(cfg.out_dir), run.ckpt_path, run.checkpoint_bytes()))
    metrics = on_main(world, lambda: Metrics(cfg, Path(cfg.metrics), append=state is not None), NoMetrics())
    device = run.device
    device_str, device_name = run.device_info()
    metrics.log("start", step=run.step, resumed=state is not None, config=dataclasses.asdict(cfg),
                params=run.n_params, scan_backend=run.scan_backend, device=device_str, threads=run.threads,
                device_name=device_name,
                data=str(run.data_path), train_bytes=len(run.train_data), val_bytes=len(run.val_data),
                torch=torch.__version__, python=sys.version.split()[0],
                ranks=world.size, parallel=("fsdp2" if run.sharded else "ddp") if world.distributed else None)
    if world.main:
        for note in notes:
            print(f"train.py: warning: {note}", file=sys.stderr, flush=True)
        print(summary_line(run, state), file=sys.stderr, flush=True)
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)

    bar = tqdm(total=cfg.max_steps, initial=run.step, desc="attention" if cfg.attention else "gateloop",
               dynamic_ncols=True, file=sys.stderr, disable=not world.main)
    say = bar.write if world.main else (lambda text: None)
    watch = MemorizingWatch(len(run.train_data))
    since_val = []  # training losses since the last validation

    def validate():
        record = run.validate()
        metrics.log("val", **record)
        say(f"step {run.step}: validation {record['bpc']:.4f} bits per character")
        train_bpc = sum(since_val) / len(since_val) / math.log(2) if since_val else None
        since_val.clear()
        note = watch.see(run.step, record["bpc"], train_bpc)
        if note is not None:
            say(note)
        return run.step

    def held() -> str:
        if run.last_ckpt_step is None:
            return "no checkpoint written"
        return f"{run.ckpt_path} holds step {run.last_ckpt_step}"

    last_val = None
    reason = "max_steps"
    run.model.train()
    try:
        while run.step < cfg.max_steps:
            if cfg.time_budget is not None and distributed.any_rank(world, run.wall() >= cfg.time_budget, device):
                reason = "time_budget"
                break
            loss, tokens_per_s = run.train_step()
            if not math.isfinite(loss):
                raise DivergedError(f"the training loss is {loss} at step {run.step}; stopped without saving these "
                                    f"weights ({held()}). Try a lower --lr or --clip")
            since_val.append(loss)
            bar.update(1)
            bar.set_postfix(loss=f"{loss:.3f}", tok_s=f"{tokens_per_s:,.0f}", refresh=False)
            step = run.step
            if step % cfg.log_every == 0:
                metrics.log("train", **run.train_record())
            if cfg.val_every and step % cfg.val_every == 0:
                last_val = validate()
            if cfg.sample_every and step % cfg.sample_every == 0 and (world.main or run.samples_on_every_rank):
                record = run.sample()
                metrics.log("sample", **record)
                say(f"--- step {step} sample ---\n{printable(record['prime'])}\n>>>\n"
                    f"{printable(record['text'])}\n")
            if cfg.ckpt_every and step % cfg.ckpt_every == 0:
                run.checkpoint()
        if last_val != run.step:
            validate()
        if run.last_ckpt_step != run.step:
            run.checkpoint()
    except KeyboardInterrupt:
        bar.close()
        if world.main:
            print(f"\ntrain.py: interrupted at step {run.step}; last checkpoint: "
                  f"{held() if run.last_ckpt_step is not None else 'none written'}", file=sys.stderr)
        log_end(metrics, run, "interrupted")
        raise
    except TrainError as e:
        bar.close()
        log_end(metrics, run, type(e).__name__, error=str(e))
        raise
    bar.close()
    metrics.log("end", **run.end_record(reason))
    metrics.close()
    return dict(run.results, step=run.step, reason=reason, checkpoint=str(run.ckpt_path))


def log_end(metrics, run: Run, reason: str, **extra) -> None:
    """The end record of a run that stops on an error; a metrics file that cannot take it is let be."""
    with contextlib.suppress(TrainError):
        metrics.log("end", **run.end_record(reason), **extra)
    metrics.close()
