"""The config a run goes by: defaults that depend on other flags, and on --resume the checkpoint's
config merged with the flags typed on the command line, the batch size re-divided when the number
of ranks changed, and the data checked against the fingerprint the checkpoint recorded."""

from __future__ import annotations

import dataclasses
from pathlib import Path

from .checkpoints import CHECKPOINT_NAME, load_checkpoint
from .config import NOT_RESUMED, RESUME_FIXED, TrainConfig, check_config, flag_name
from .data import describe_fingerprint, same_data, size_and_hash
from .errors import ConfigError, DataError


def resolve_config(cfg: TrainConfig, given: set[str], world_size: int = 1) -> tuple[TrainConfig, dict | None]:
    """Fill in defaults that depend on other fields; on --resume, merge with the checkpoint's config
    (on ``world_size`` ranks, see ``resume_batch_size``). Returns (config, checkpoint state or None)."""
    if cfg.out_dir is None:
        cfg.out_dir = str(Path("runs") / ("attention" if cfg.attention else "gateloop"))
    ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME
    state = None
    if cfg.resume:
        if not ckpt_path.is_file():
            raise ConfigError(f"--resume: no checkpoint at {ckpt_path}")
        state = load_checkpoint(ckpt_path)
        saved = state["config"]
        saved_ranks = state.get("world_size", 1)
        fixed = RESUME_FIXED
        if saved_ranks != world_size:
            cfg.batch_size = resume_batch_size(cfg, given, saved, saved_ranks, world_size)
            given = given | {"batch_size"}
            fixed = tuple(name for name in RESUME_FIXED if name != "batch_size")
        for name in fixed:
            if name in given and getattr(cfg, name) != saved.get(name):
                raise ConfigError(f"--resume: {flag_name(name)} {getattr(cfg, name)} differs from the checkpoint's "
                                  f"{saved.get(name)}; a resumed run keeps its model, data stream and seed")
        merged = {k: (getattr(cfg, k) if k in given or k in NOT_RESUMED else saved.get(k, getattr(cfg, k)))
                  for k in (f.name for f in dataclasses.fields(TrainConfig))}
        cfg = TrainConfig(**merged)
        check_config(cfg)
    elif ckpt_path.exists():
        raise ConfigError(f"{ckpt_path} exists; pass --resume to continue that run, or choose another --out-dir")
    if cfg.metrics is None:
        cfg.metrics = str(Path(cfg.out_dir) / "metrics.jsonl")
    metrics = Path(cfg.metrics).resolve()
    for what, other in (("the checkpoint", ckpt_path), ("--data", cfg.data)):
        if other is not None and metrics == Path(other).resolve():
            raise ConfigError(f"--metrics {cfg.metrics} is {what}; writing metrics there would destroy it")
    return cfg, state


def resume_batch_size(cfg: TrainConfig, given: set[str], saved: dict, saved_ranks: int, ranks: int) -> int:
    """--batch-size for resuming on ``ranks`` ranks a run that ran on ``saved_ranks``.

    The data stream is the sequence of global micro-batches of --batch-size x ranks windows (see
    Sampler), so that product must stay: a --batch-size typed on the command line must give it,
    and without one it is the checkpoint's product divided by the ranks. ConfigError otherwise.
    """
    rows = saved.get("batch_size", 0) * saved_ranks
    was = f"the checkpoint's run drew {rows} sequences per micro-batch (--batch-size {saved.get('batch_size')} x " \
          f"{saved_ranks} rank{'s' * (saved_ranks != 1)})"
    if "batch_size" in given:
        if cfg.batch_size * ranks != rows:
            fix = f"pass --batch-size {rows // ranks}" if rows % ranks == 0 else \
                f"run on a number of ranks that divides {rows}"
            raise ConfigError(f"--resume: --batch-size {cfg.batch_size} x {ranks} rank{'s' * (ranks != 1)} = "
                              f"{cfg.batch_size * ranks} sequences per micro-batch, but {was}; a resumed run keeps "
                              f"its data stream: {fix}")
        return cfg.batch_size
    if rows % ranks:
        raise ConfigError(f"--resume on {ranks} rank{'s' * (ranks != 1)}: {was}, which {ranks} ranks cannot share "
                          f"evenly; a resumed run keeps its data stream: run on a number of ranks that divides {rows}")
    return rows // ranks


def check_resumed_data(cfg: TrainConfig, state: dict, fp: dict, ckpt_path: Path) -> str | None:
    """Compare --data's fingerprint with the one the checkpoint recorded. Returns a warning to print
    (the checkpoint recorded none; or the data changed and --allow-data-change accepts it), or None;
    raises DataError when the data changed and --allow-data-change is not given."""
    saved = state.get("data_fingerprint")
    if saved is None:
        return (f"{ckpt_path} records no fingerprint of its data (written before checkpoints carried one): "
                f"--data is checked by its split sizes only")
    if same_data(saved, fp):
        return None
    name = cfg.data or fp["path"]
    if saved.get("path") == fp["path"]:
        what = (f"--data {name} has changed since {ckpt_path} was trained on it (then {size_and_hash(saved)}, "
                f"now {size_and_hash(fp)})")
    else:
        what = (f"--data {name} ({size_and_hash(fp)}) is not the data {ckpt_path} was trained on, "
                f"{describe_fingerprint(saved)}")
    if not cfg.allow_data_change:
        raise DataError(f"--resume: {what}; pass --allow-data-change to train on it anyway")
    return f"--allow-data-change: {what}; training goes on with it"

