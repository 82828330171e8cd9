"""Character-level language modelling with the GateLoop Transformer: the machinery behind train.py
and sample.py (and the gateloop-train and gateloop-sample commands).

    config       TrainConfig, its command line, presets and range checks
    devices      the torch device, threads, autocast, JAX's device, peak memory
    data         reading, splitting, the sampler of training windows, the data's fingerprint
    checkpoints  atomic, checksummed checkpoints and the RNG states in them
    resume       merging a checkpoint's config with the command line, checking its data
    metrics      metrics.jsonl (and TensorBoard, wandb); the memorizing watch
    distributed  torch.distributed under torchrun: DDP, FSDP2, the collectives a run uses
    world        this process among the ranks: start, agree before the first step, stop
    run          Run and JaxRun: one invocation's model, optimiser, steps and checkpoints
    loop         train(): the checks before the first step, then the training loop
    cli          train_main and sample_main, the command lines

Everything that stops a run is a TrainError (errors), printed by the command lines as one line.
"""

from .checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_NAME, content_checksum, load_checkpoint, save_checkpoint
from .cli import build_sample_parser, sample, sample_main, train_main
from .config import (DEMO_TEXT, NOT_RESUMED, NUM_TOKENS, PER_RANK, PRESETS, RESUME_FIXED, TrainConfig, apply_preset,
                     build_train_parser, check_config, parse_train_args)
from .data import Sampler, decode, fingerprint, printable, read_bytes, resolve_data_path, split_data
from .devices import check_device, default_threads, set_threads
from .errors import CheckpointError, ConfigError, DataError, DivergedError, OutputError, TrainError, os_reason
from .loop import train
from .run import JaxRun, Run, build_model, evaluate, resolved_scan_backend

__all__ = [
    "CHECKPOINT_FORMAT", "CHECKPOINT_NAME", "content_checksum", "load_checkpoint", "save_checkpoint",
    "build_sample_parser", "sample", "sample_main", "train_main",
    "DEMO_TEXT", "NOT_RESUMED", "NUM_TOKENS", "PER_RANK", "PRESETS", "RESUME_FIXED", "TrainConfig", "apply_preset",
    "build_train_parser", "check_config", "parse_train_args",
    "Sampler", "decode", "fingerprint", "printable", "read_bytes", "resolve_data_path", "split_data",
    "check_device", "default_threads", "set_threads",
    "CheckpointError", "ConfigError", "DataError", "DivergedError", "OutputError", "TrainError", "os_reason",
    "train", "JaxRun", "Run", "build_model", "evaluate", "resolved_scan_backend",
]
