"""Metrics: <out-dir>/metrics.jsonl, one JSON object per line, plus TensorBoard and Weights & Biases
when asked for; and the watch that says on the console when validation rises while the training
loss falls (the model memorizing its training text)."""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import json
import os
from pathlib import Path

from .errors import ConfigError, OutputError, os_reason


class Metrics:
    """JSON lines, one object per record, plus TensorBoard / wandb when asked for.

    Records ("kind"): "start" (config, parameter count, device, versions), "train" (step, loss,
    bpc, tokens_per_s, peak memory), "val" (step, loss, bpc), "sample" (step, prime, text),
    "end" (step, reason). After a resume the file is appended to, so a step can appear twice
    (from the dead run and the resumed one): the later line wins.
    """

    def __init__(self, cfg, path: Path, append: bool):
        self.tb = self.wandb = None
        if cfg.tensorboard:
            require("tensorboard", "--tensorboard")
            from torch.utils.tensorboard import SummaryWriter

            self.tb = SummaryWriter(log_dir=str(Path(cfg.out_dir) / "tb"))
        if cfg.wandb:
            wandb = require("wandb", "--wandb")
            self.wandb = wandb.init(project=cfg.wandb_project, config=dataclasses.asdict(cfg))
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            torn = append and path.is_file() and path.stat().st_size > 0 and last_byte(path) != b"\n"
            self.file = open(path, "a" if append else "w", encoding="utf-8")
            if torn:  # a line cut short by a crash: end it, so the next record starts on its own line
                self.file.write("\n")
        except OSError as e:
            raise OutputError(f"cannot write the metrics file {path}: {os_reason(e)}") from None

    def log(self, kind: str, **record) -> None:
        try:
            self.file.write(json.dumps(dict(kind=kind, **record)) + "\n")
            self.file.flush()
        except OSError as e:
            raise OutputError(f"cannot write the metrics file {self.path}: {os_reason(e)}") from None
        step = record.get("step")
        scalars = {f"{kind}/{k}": v for k, v in record.items()
                   if k != "step" and isinstance(v, (int, float)) and not isinstance(v, bool)}
        if self.tb is not None and step is not None:
            for k, v in scalars.items():
                self.tb.add_scalar(k, v, step)
            if kind == "sample":
                self.tb.add_text("sample", record["prime"] + " >>> " + record["text"], step)
        if self.wandb is not None and step is not None and scalars:
            self.wandb.log(scalars, step=step)

    def close(self) -> None:
        with contextlib.suppress(OSError):  # a failed flush was reported by log() already
            self.file.close()
        if self.tb is not None:
            self.tb.close()
        if self.wandb is not None:
            self.wandb.finish()


class NoMetrics:
    """The metrics of a rank other than 0, which writes none."""

    def log(self, kind: str, **record) -> None:
        pass

    def close(self) -> None:
        pass


def last_byte(path: Path) -> bytes:
    with open(path, "rb") as f:
        f.seek(-1, os.SEEK_END)
        return f.read(1)


def require(module: str, flag: str):
    """Import an optional package that a flag needs, or ConfigError naming both."""
    try:
        return importlib.import_module(module)
    except ImportError as e:
        raise ConfigError(f"{flag} needs the {module} package, which is not installed "
                          f"({e}); pip install {module}, or drop {flag}") from None


class MemorizingWatch:
    """Notices validation rising while the training loss falls, between one validation and the next.

    ``see(step, val_bpc, train_bpc)`` at each validation, with the mean training loss (in bits
    per character) since the previous one; it returns a line to print the first time validation
    went up (by more than RISE) while training went down, and None otherwise. A model that does this is learning its
    training text by heart rather than the language: more data, a smaller model or fewer steps help.
    """

    RISE = 0.02  # a relative rise of validation that is more than the noise of its few batches

    def __init__(self, train_bytes: int):
        self.train_bytes = train_bytes
        self.last = None  # (val_bpc, train_bpc) at the previous validation
        self.said = False

    def see(self, step: int, val_bpc: float, train_bpc: float | None) -> str | None:
        last, self.last = self.last, (val_bpc, train_bpc)
        if self.said or last is None or train_bpc is None or last[1] is None:
            return None
        if val_bpc > last[0] * (1 + self.RISE) and train_bpc < last[1]:
            self.said = True
            return (f"step {step}: validation rising while training loss falls ({last[0]:.2f} -> {val_bpc:.2f} "
                    f"against {last[1]:.2f} -> {train_bpc:.2f} bits per character): the model is memorizing its "
                    f"{size_words(self.train_bytes)} of training text")
        return None


def size_words(n: int) -> str:
    """A size in bytes in a few characters: 44 KB, 90 MB."""
    for unit, scale in (("GB", 10**9), ("MB", 10**6), ("KB", 10**3)):
        if n >= scale:
            return f"{n / scale:.0f} {unit}"
    return f"{n} bytes"
