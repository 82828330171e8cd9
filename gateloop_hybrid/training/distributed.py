"""Training on several processes (torchrun): the torch.distributed pieces of a run, in one place.

    torchrun --nproc_per_node N train.py ...           # DistributedDataParallel, one GPU per rank
    torchrun --nproc_per_node N train.py --fsdp ...    # FSDP2 (torch.distributed.fsdp.fully_shard)

One process is one rank. torchrun says which through its environment (RANK, LOCAL_RANK,
WORLD_SIZE, LOCAL_WORLD_SIZE); without WORLD_SIZE there is one process and nothing here starts.
A rank on CUDA uses cuda:LOCAL_RANK and NCCL; on the CPU, gloo: the backend follows the device.

Checkpoints hold full, unsharded state in the single-process form (``nn.Module.state_dict`` keys
without a ``module.`` prefix, ``Optimizer.state_dict`` with integer parameter ids), so a checkpoint
written by N ranks, with or without FSDP, loads into M ranks or one process. ``full_state`` gathers
that form (with FSDP2 through ``torch.distributed.checkpoint.state_dict``, onto the CPU of rank 0)
and ``load_full_state`` scatters it back.

Every rank runs the same collectives in the same order: the functions below that communicate
(``mean``, ``any_rank``, ``from_main``, ``gather``, ``barrier``) are called on every rank or on none.
"""

from __future__ import annotations

import dataclasses
import os
from typing import Mapping

import torch
from torch import nn


@dataclasses.dataclass(frozen=True)
class World:
    """Where this process stands: its rank among ``size``, and the device and backend it uses.
    ``World()`` is one process with no process group."""

    rank: int = 0
    local_rank: int = 0
    size: int = 1
    local_size: int = 1
    backend: str | None = None      # "nccl" or "gloo" once the process group is up; None: one process

    @property
    def main(self) -> bool:
        """Rank 0: the one that writes checkpoints, metrics and the progress bar."""
        return self.rank == 0

    @property
    def distributed(self) -> bool:
        return self.backend is not None


def launched(env: Mapping[str, str] = os.environ) -> bool:
    """Whether torchrun (or another launcher that sets WORLD_SIZE) started this process."""
    return "WORLD_SIZE" in env


RENDEZVOUS = ("MASTER_ADDR", "MASTER_PORT")  # what torch.distributed's env:// start needs besides the ranks


def check_launch_env(env: Mapping[str, str] = os.environ) -> None:
    """ValueError, naming the variables and their values, when the environment is not one torchrun
    sets up: a rank without WORLD_SIZE, ranks out of range, or no rendezvous address."""
    if not launched(env):
        stray = [f"{name}={env[name]}" for name in ("RANK", "LOCAL_RANK") if name in env]
        if stray:
            raise ValueError(f"{' and '.join(stray)} {'is' if len(stray) == 1 else 'are'} set but WORLD_SIZE is not: "
                             "start the ranks with torchrun (which sets all of them), or unset "
                             f"{' and '.join(s.split('=')[0] for s in stray)} to train in one process")
        return
    rank, _, size, _ = ranks_from_env(env)
    missing = [name for name in RENDEZVOUS if not env.get(name)]
    if missing:
        raise ValueError(f"{' and '.join(missing)} {'is' if len(missing) == 1 else 'are'} not set (WORLD_SIZE={size}, "
                         f"RANK={rank}): the ranks cannot find each other; start them with torchrun")


def ranks_from_env(env: Mapping[str, str] = os.environ) -> tuple[int, int, int, int]:
    """(rank, local_rank, world_size, local_world_size) from torchrun's environment; ValueError
    naming the variable when one is missing or out of range."""
    values = {}
    for name, default in (("WORLD_SIZE", None), ("RANK", None), ("LOCAL_RANK", None), ("LOCAL_WORLD_SIZE", "")):
        text = env.get(name, default)
        if text is None:
            raise ValueError(f"{name} is not set, though WORLD_SIZE is: start the processes with torchrun")
        if text == "":
            values[name] = None
            continue
        try:
            values[name] = int(text)
        except ValueError:
            raise ValueError(f"{name}={text!r} is not an integer") from None
    size, rank, local_rank = values["WORLD_SIZE"], values["RANK"], values["LOCAL_RANK"]
    local_size = values["LOCAL_WORLD_SIZE"] or size
    if size < 1:
        raise ValueError(f"WORLD_SIZE={size}: need at least 1")
    if not 0 <= rank < size:
        raise ValueError(f"RANK={rank} and WORLD_SIZE={size}: need 0 <= RANK < WORLD_SIZE")
    if not 0 <= local_rank < local_size:
        raise ValueError(f"LOCAL_RANK={local_rank} and LOCAL_WORLD_SIZE={local_size}: need 0 <= LOCAL_RANK < "
                         "LOCAL_WORLD_SIZE")
    return rank, local_rank, size, local_size


def rank_device(device: torch.device, local_rank: int, local_size: int, gpus: int) -> torch.device:
    """The device of the rank with this local rank: cuda:LOCAL_RANK for a CUDA run, the CPU for a
    CPU run. ValueError when the machine has fewer GPUs than ranks (NCCL takes one GPU per rank),
    or when ``device`` names one GPU for all ranks."""
    if device.type != "cuda":
        return device
    if device.index is not None and local_size > 1:
        raise ValueError(f"{device} names one GPU, and {local_size} ranks run on this machine, each on its "
                         "own GPU (cuda:LOCAL_RANK): pass cuda (or auto)")
    if local_size > gpus:
        raise ValueError(f"{local_size} ranks run on this machine but it has {gpus} GPU(s); NCCL needs one GPU "
                         "per rank: start at most that many (torchrun --nproc_per_node), or train on cpu")
    return torch.device("cuda", local_rank if device.index is None else device.index)


def backend_for(device: torch.device) -> str:
    """NCCL for CUDA ranks, gloo for the CPU."""
    return "nccl" if device.type == "cuda" else "gloo"


def start(device: torch.device, env: Mapping[str, str] = os.environ) -> tuple[World, torch.device]:
    """Join the process group torchrun set up: (this rank's World, its device). ``device`` is the
    device asked for (cuda, or cpu); a CUDA rank gets cuda:LOCAL_RANK and makes it torch's
    current device."""
    import torch.distributed as dist

    rank, local_rank, size, local_size = ranks_from_env(env)
    gpus = torch.cuda.device_count() if device.type == "cuda" else 0
    device = rank_device(device, local_rank, local_size, gpus)
    backend = backend_for(device)
    if device.type == "cuda":
        torch.cuda.set_device(device)
    if not dist.is_initialized():
        dist.init_process_group(backend, **(dict(device_id=device) if device.type == "cuda" else {}))
    return World(rank, local_rank, size, local_size, backend), device


def stop(world: World, finished: bool = False) -> None:
    """Leave the process group. ``finished``: every rank ended the run normally, and they wait for
    each other before leaving, so that none tears the group down while another still uses it.
    Otherwise no barrier: a rank that stops on an error of its own leaves at once, and torchrun then
    stops the others (a barrier would wait for ranks that never come)."""
    import torch.distributed as dist

    if world.distributed and dist.is_initialized():
        if finished:
            dist.barrier()
            _all_out_of_the_barrier(world)
        dist.destroy_process_group()


def _all_out_of_the_barrier(world: World, env: Mapping[str, str] = os.environ) -> None:
    """Wait, through the launcher's key-value store, until every rank has returned from the last
    barrier. A rank that returns from a gloo barrier may still have the barrier's last message on
    its way to a peer, and tearing the group down then closes the connection under it: "barrier
    followed by context destruction causes some participants to fail" (an open report in
    pytorch/gloo). On a loaded 2-core machine a CPU rank was seen to abort at exit that way
    ("terminate called without an active exception", about one launch in a hundred). Once every
    rank is out, no message is in flight. Rank 0 leaves last, in case it hosts the store."""
    import datetime

    import torch.distributed as dist

    run = f"gateloop_hybrid/{env.get('TORCHELASTIC_RUN_ID', '')}/{env.get('TORCHELASTIC_RESTART_COUNT', '0')}"
    try:
        store = dist.TCPStore(env["MASTER_ADDR"], int(env["MASTER_PORT"]), is_master=False,
                              timeout=datetime.timedelta(seconds=60))
        store.set(f"{run}/out/{world.rank}", "1")
        store.wait([f"{run}/out/{rank}" for rank in range(world.size)])
        store.set(f"{run}/left/{world.rank}", "1")
        if world.rank == 0:
            store.wait([f"{run}/left/{rank}" for rank in range(world.size)])
    except (RuntimeError, OSError, KeyError, ValueError):
        pass        # best effort: a launcher that is gone (killed) leaves nothing to wait for


# ----------------------------------------------------------------------------------------------
# the model on several ranks


def wrap(model: nn.Module, world: World, device: torch.device, *, fsdp: bool, units=()) -> nn.Module:
    """The model as the ranks train it: DistributedDataParallel, or with ``fsdp`` FSDP2 sharding
    each module of ``units`` (e.g. the transformer's blocks) and then the root. One process: the
    model itself. Build the optimiser after this, over the returned model's parameters."""
    if not world.distributed:
        return model
    if fsdp:
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import fully_shard

        mesh = init_device_mesh(device.type, (world.size,))
        for unit in units:
            fully_shard(unit, mesh=mesh)
        fully_shard(model, mesh=mesh)
        return model
    from torch.nn.parallel import DistributedDataParallel

    return DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None)


def unwrap(model: nn.Module) -> nn.Module:
    """The model without its DistributedDataParallel wrapper (FSDP2 shards in place: unchanged)."""
    from torch.nn.parallel import DistributedDataParallel

    return model.module if isinstance(model, DistributedDataParallel) else model


def is_sharded(model: nn.Module) -> bool:
    """Whether FSDP2 shards the model's parameters."""
    from torch.distributed.tensor import DTensor

    return any(isinstance(p, DTensor) for p in model.parameters())


def no_sync(model: nn.Module, sync: bool):
    """A context in which backward leaves gradients unsynchronised when ``sync`` is False (the
    micro-batches before the last of a step): DDP's ``no_sync``, FSDP2's
    ``set_requires_gradient_sync``. Gradients are the same either way; this saves communication."""
    import contextlib

    if sync:
        return contextlib.nullcontext()
    if hasattr(model, "no_sync"):
        return model.no_sync()
    if hasattr(model, "set_requires_gradient_sync"):
        @contextlib.contextmanager
        def unsynced():
            model.set_requires_gradient_sync(False)
            try:
                yield
            finally:
                model.set_requires_gradient_sync(True)
        return unsynced()
    return contextlib.nullcontext()


def local_values(t: torch.Tensor) -> torch.Tensor:
    """The part of ``t`` this rank holds (its shard under FSDP2; all of it otherwise)."""
    return t.to_local() if hasattr(t, "to_local") else t


def full_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> tuple[dict, dict]:
    """(model state dict, optimiser state dict), full and on the CPU, in the single-process form;
    complete on rank 0 (other ranks may get empty dicts). A collective under FSDP2: call it on
    every rank."""
    if not is_sharded(model):
        return unwrap(model).state_dict(), optimizer.state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_optimizer_state_dict

    model_state = full_weights(model)
    optim_state = get_optimizer_state_dict(model, optimizer,
                                           options=StateDictOptions(full_state_dict=True, cpu_offload=True))
    if not model_state:        # a rank other than 0
        return {}, {}
    return model_state, optimizer_state_by_index(optim_state, parameter_names(model))


def full_weights(model: nn.Module) -> dict:
    """The model's full state dict on the CPU in the single-process form: complete on rank 0
    (other ranks may get an empty dict). A collective under FSDP2: call it on every rank."""
    if not is_sharded(model):
        return unwrap(model).state_dict()
    from torch.distributed.checkpoint.state_dict import StateDictOptions, get_model_state_dict
    return get_model_state_dict(model, options=StateDictOptions(full_state_dict=True, cpu_offload=True))


def load_full_state(model: nn.Module, optimizer: torch.optim.Optimizer, model_state: dict, optim_state: dict) -> None:
    """Load full single-process state dicts (every rank passes them whole) into the model and its
    optimiser, sharding them where FSDP2 shards the model."""
    if not is_sharded(model):
        unwrap(model).load_state_dict(model_state)
        optimizer.load_state_dict(optim_state)
        return
    from torch.distributed.checkpoint.state_dict import (StateDictOptions, set_model_state_dict,
                                                         set_optimizer_state_dict)

    options = StateDictOptions(full_state_dict=True)
    set_model_state_dict(model, model_state, options=options)
    set_optimizer_state_dict(model, optimizer, optimizer_state_by_name(optim_state, parameter_names(model)),
                             options=options)


def parameter_names(model: nn.Module) -> list[str]:
    """The parameters' names in the order the optimiser was given them (model.parameters())."""
    return [name for name, _ in unwrap(model).named_parameters()]


def optimizer_state_by_index(state: dict, names: list[str]) -> dict:
    """An optimiser state dict keyed by parameter name (torch.distributed.checkpoint's form) ->
    keyed by index into ``names`` (``Optimizer.state_dict``'s form)."""
    index = {name: i for i, name in enumerate(names)}
    try:
        return dict(
            state={index[name]: value for name, value in state["state"].items()},
            param_groups=[dict(group, params=[index[name] for name in group["params"]])
                          for group in state["param_groups"]])
    except KeyError as e:
        raise ValueError(f"the optimiser state names a parameter the model lacks: {e}") from None


def optimizer_state_by_name(state: dict, names: list[str]) -> dict:
    """The inverse of ``optimizer_state_by_index``."""
    try:
        return dict(
            state={names[i]: value for i, value in state["state"].items()},
            param_groups=[dict(group, params=[names[i] for i in group["params"]])
                          for group in state["param_groups"]])
    except (IndexError, TypeError) as e:
        raise ValueError(f"the optimiser state does not fit the model's {len(names)} parameters ({e})") from None


# ----------------------------------------------------------------------------------------------
# agreeing across ranks (each a collective: every rank calls it, or none)


def _value(world: World, value: float, device: torch.device) -> torch.Tensor:
    # NCCL reduces CUDA tensors only; gloo CPU ones
    return torch.tensor([float(value)], dtype=torch.float64, device=device if world.backend == "nccl" else "cpu")


def mean(world: World, value: float | torch.Tensor, device: torch.device) -> float:
    """The mean of ``value`` over the ranks (``value`` itself for one process)."""
    if not world.distributed:
        return float(value)
    import torch.distributed as dist

    t = _value(world, value, device)
    dist.all_reduce(t, op=dist.ReduceOp.SUM)
    return float(t.item()) / world.size


def any_rank(world: World, flag: bool, device: torch.device) -> bool:
    """Whether ``flag`` holds on at least one rank."""
    if not world.distributed:
        return bool(flag)
    import torch.distributed as dist

    t = _value(world, 1.0 if flag else 0.0, device)
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return bool(t.item() > 0)


def from_main(world: World, obj):
    """Rank 0's ``obj`` on every rank (any picklable value, e.g. an exception or None)."""
    if not world.distributed:
        return obj
    import torch.distributed as dist

    box = [obj]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def gather(world: World, obj) -> list:
    """Every rank's ``obj`` (any picklable value), in rank order, on every rank."""
    if not world.distributed:
        return [obj]
    import torch.distributed as dist

    out = [None] * world.size
    dist.all_gather_object(out, obj)
    return out


def barrier(world: World) -> None:
    if world.distributed:
        import torch.distributed as dist

        dist.barrier()
