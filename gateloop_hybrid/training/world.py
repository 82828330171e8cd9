"""The ranks of a run: starting this process's place among them (one process, or a rank of a
torchrun launch), agreeing on the configuration and data before the first step, raising an error
that one rank meets on all of them, and leaving together."""

from __future__ import annotations

import dataclasses
import os

import torch

from . import distributed
from .config import PER_RANK, TrainConfig, flag_name
from .data import describe_fingerprint
from .devices import check_device
from .errors import ConfigError, TrainError, every_rank


def start_world(cfg: TrainConfig, env=os.environ):
    """(World, device) of this process. Not under torchrun: one process on --device. Under torchrun:
    join the process group (NCCL for CUDA, gloo for the CPU) on this rank's device, cuda:LOCAL_RANK.
    ConfigError when torchrun's environment is incomplete or contradicts itself (its variables named,
    printed by every process, since its rank is in doubt)."""
    try:
        distributed.check_launch_env(env)
    except ValueError as e:
        error = ConfigError(f"torchrun's environment: {e}")
        error.rank = None
        raise error from None
    if cfg.framework == "jax":  # JAX picks its own device (devices.jax_device); torch's side stays on the CPU
        if distributed.launched(env):
            raise ConfigError("--framework jax trains in one process; run it without torchrun")
        return distributed.World(), torch.device("cpu")
    device = check_device(cfg.device)
    if not distributed.launched(env):
        if cfg.fsdp:
            raise ConfigError("--fsdp shards the model across the ranks of a torchrun launch "
                              "(torchrun --nproc_per_node N train.py --fsdp ...); this is one process")
        return distributed.World(), device
    try:
        return distributed.start(device, env)
    except ValueError as e:
        if "init_process_group" not in str(e) and "rendezvous" not in str(e):
            raise ConfigError(f"--device {cfg.device}: {e}") from None
        failure = e
    except RuntimeError as e:
        failure = e
    names = " ".join(f"{name}={env.get(name)}" for name in ("WORLD_SIZE", "RANK", "MASTER_ADDR", "MASTER_PORT"))
    first = (str(failure).strip().splitlines() or [type(failure).__name__])[0][:160]
    error = ConfigError(f"torch.distributed could not start ({names}): {first}")
    error.rank = None
    raise error


def stop_world(world, finished: bool = False) -> None:
    distributed.stop(world, finished)


def on_main(world, fn, elsewhere=None):
    """fn() on rank 0, and `elsewhere` on the other ranks; a TrainError that fn raises is raised
    on every rank, so that all stop together (one process: fn())."""
    result, error = elsewhere, None
    if world.main:
        try:
            result = fn()
        except TrainError as e:
            if not world.distributed:
                raise
            error = e
    error = distributed.from_main(world, error)
    if error is not None:
        raise every_rank(error) from None
    return result


def run_facts(cfg: TrainConfig, fingerprint: dict | None, state: dict | None) -> dict:
    """What the ranks must agree on: every flag of the resolved config but those of PER_RANK, the
    data (by its fingerprint) and the checkpoint a resume starts from (by its checksum and step)."""
    facts = {k: v for k, v in dataclasses.asdict(cfg).items() if k not in PER_RANK}
    facts["data"] = fingerprint
    facts["checkpoint"] = None if state is None else dict(step=state["step"], checksum=state.get("checksum"))
    return facts


def disagreement(all_facts: list[dict]) -> str | None:
    """One line naming every fact on which a rank differs from rank 0, with the ranks' values;
    None when all agree."""
    reference = all_facts[0]
    parts = []
    for key in reference:
        differ = [(r, facts.get(key)) for r, facts in enumerate(all_facts) if facts.get(key) != reference[key]]
        if not differ:
            continue
        values = ", ".join(f"rank {r}: {show(key, v)}" for r, v in [(0, reference[key]), *differ])
        parts.append(f"{flag_name(key) if key != 'checkpoint' else 'the checkpoint resumed'} ({values})")
    if not parts:
        return None
    return f"ranks disagree on {', '.join(parts)}; start every rank with the same flags, data and checkpoint"


def show(key: str, value) -> str:
    if key == "data" and isinstance(value, dict):
        return describe_fingerprint(value)
    if key == "checkpoint":
        return "none" if value is None else f"step {value['step']}, {str(value['checksum'])[:19]}"
    return str(value)


def agree(world, error: TrainError | None, facts: dict | None) -> None:
    """Before the first step, on every rank: share each rank's error (or None) and facts
    (``run_facts``). The first rank's error, or a disagreement, is raised on every rank alike, so
    that all exit together: a rank's error printed by it and by rank 0, a disagreement by every
    rank. One process raises its own error."""
    if not world.distributed:
        if error is not None:
            raise error
        return
    shared = distributed.gather(world, (error, facts))
    for rank, (e, _) in enumerate(shared):
        if e is not None:
            raise every_rank(e, origin=rank) from None
    message = disagreement([f for _, f in shared])
    if message is not None:
        # every rank prints it: ranks launched apart (on several machines) each log why they stopped
        error = every_rank(ConfigError(message))
        error.said_by_each_rank = True
        raise error
