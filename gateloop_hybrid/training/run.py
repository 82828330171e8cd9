"""One invocation of training as an object: the model, optimiser, data sampler and counters, and
the steps that act on them (a training step, validation, a sample, a checkpoint). ``Run`` trains
the torch model (one process, or a rank under torchrun with DDP or FSDP2); ``JaxRun`` the same
model in pure JAX, with the same data stream, metrics and checkpoints."""

from __future__ import annotations

import dataclasses
import math
import random
import time
from pathlib import Path

import torch

from . import checkpoints, distributed
from .checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_NAME, rng_state, set_rng_state
from .config import TrainConfig
from .data import Sampler, decode, fingerprint, load_splits, resolve_data_path
from .devices import autocast, check_device, jax_device, peak_memory, seeded_rng, set_threads
from .errors import CheckpointError, ConfigError, DivergedError


def build_model(model_kwargs: dict) -> torch.nn.Module:
    """The package's Transformer from plain keyword arguments (those of TrainConfig.model_kwargs)."""
    from gateloop_hybrid import Transformer  # here, so that --help and data errors need only torch

    return Transformer(**model_kwargs)


def resolved_scan_backend(cfg: TrainConfig, device: torch.device) -> str | None:
    """The scan backend a GateLoop model will use on `device` ("auto" resolved); None for attention."""
    if cfg.attention:
        return None
    from gateloop_hybrid.scan import resolve_backend

    try:
        return resolve_backend(cfg.scan_backend, device)
    except (ValueError, ImportError) as e:
        raise ConfigError(f"--scan-backend {cfg.scan_backend}: {e}") from None


@torch.no_grad()
def evaluate(model, val: torch.Tensor, cfg: TrainConfig, device: torch.device, world=None) -> float:
    """Mean validation loss in nats over the same cfg.val_batches micro-batches every time.

    With several ranks (``world``), each evaluates its rows of the same global micro-batches and
    the ranks' means are averaged: every rank gets the loss one process would compute with
    --batch-size x ranks. Call it on every rank."""
    rank, size = (world.rank, world.size) if world is not None else (0, 1)
    sampler = Sampler(val, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1, rank=rank, world_size=size)
    was_training = model.training
    model.eval()
    total = 0.0
    for _ in range(cfg.val_batches):
        batch = sampler.next().to(device, non_blocking=True)
        with autocast(device, cfg.bf16):
            total += model(batch, return_loss=True).float().item()
    model.train(was_training)
    if world is not None and world.distributed:
        return distributed.mean(world, total / cfg.val_batches, device)
    return total / cfg.val_batches


def val_prime(val: torch.Tensor, cfg: TrainConfig, step: int) -> torch.Tensor:
    """(1, prime_len) validation bytes that prime the sample at `step`."""
    g = torch.Generator().manual_seed(cfg.seed * 1_000_003 + step)
    start = int(torch.randint(0, len(val) - cfg.prime_len, (1,), generator=g))
    return val[start:start + cfg.prime_len].long()[None]


def sample_from_val(model, val: torch.Tensor, cfg: TrainConfig, device: torch.device, step: int) -> tuple[str, str]:
    """(prime, continuation) of the sample at `step`: cfg.gen_len bytes after a validation prime."""
    prime = val_prime(val, cfg, step).to(device)
    was_training = model.training
    model.eval()
    with seeded_rng(device, cfg.seed + step), autocast(device, cfg.bf16):
        out = model.generate(prime, cfg.gen_len, temperature=cfg.temperature, top_k=cfg.top_k)
    model.train(was_training)
    return decode(prime[0].tolist()), decode(out[0].tolist())


class Run:
    """One invocation of training: the model, optimiser, data sampler and counters, and the
    steps that act on them (a training step, validation, a sample, a checkpoint).

    Under torchrun one Run lives on each rank (``world``, see gateloop_hybrid.training.distributed): every
    rank calls the same methods in the same order, since each may talk to the others; only
    rank 0 writes the checkpoint."""

    WARMUP_STEPS = 10  # steps of each invocation left out of steady_tokens_per_s (JIT, allocator warm-up)

    def __init__(self, cfg: TrainConfig, state: dict | None, world=None, device: torch.device | None = None,
                 data_fingerprint: dict | None = None):
        self.cfg = cfg
        self.world = world if world is not None else distributed.World()
        self.device = device if device is not None else check_device(cfg.device)
        self.data_path = resolve_data_path(cfg.data)
        # what the checkpoints record of the data; the one the ranks agreed on when given
        self.data_fingerprint = data_fingerprint if data_fingerprint is not None else fingerprint(self.data_path)
        self.train_data, self.val_data, self.data_warnings = load_splits(cfg, state, self.data_path)
        self.threads = set_threads(cfg, self.device)
        self.scan_backend = resolved_scan_backend(cfg, self.device)
        torch.manual_seed(cfg.seed)
        random.seed(cfg.seed)
        try:
            model = build_model(cfg.model_kwargs()).to(self.device)
        except (ValueError, TypeError) as e:  # sizes check_config let through but the model refuses
            raise ConfigError(f"the model flags do not fit together: {e}") from None
        # one process: the model itself; under torchrun DDP, or FSDP2 sharding each block
        self.model = distributed.wrap(model, self.world, self.device, fsdp=cfg.fsdp,
                                      units=[part for block in model.layers for part in block])
        self.sharded = distributed.is_sharded(self.model)
        self.optimizer = torch.optim.Adam(self.model.parameters(), lr=cfg.lr)
        self.forward = self.model
        self.graphs = cfg.compile in ("reduce-overhead", "max-autotune")  # CUDA graphs
        if cfg.compile is not None:
            if self.graphs and self.device.type != "cuda":
                raise ConfigError(f"--compile {cfg.compile}: CUDA graphs need a CUDA device, got {self.device}")
            self.forward = torch.compile(self.model, mode=cfg.compile)
        if self.graphs:
            # Gradients a graph's backward hands out live in its memory pool, which the next
            # micro-batch's replay overwrites; kept .grad tensors of our own take them by addition.
            for p in self.model.parameters():
                p.grad = torch.zeros_like(p)
        self.sampler = Sampler(self.train_data, cfg.seq_len, cfg.batch_size, seed=cfg.seed,
                               rank=self.world.rank, world_size=self.world.size)
        self.tokens_per_step = cfg.batch_size * cfg.seq_len * cfg.grad_accum * self.world.size
        self.ckpt_path = Path(cfg.out_dir) / CHECKPOINT_NAME
        self.rank_device = self.device if self.world.distributed else None

        self.step, self.tokens_seen, self.train_time = 0, 0, 0.0
        self.window = self._empty_window()  # the steps since the last train record
        self.last_ckpt_step = None  # the step the checkpoint file holds, None while there is none
        if state is not None:
            try:
                distributed.load_full_state(self.model, self.optimizer, state["model"], state["optimizer"])
                set_rng_state(state["rng"], self.sampler, self.rank_device)
            except (RuntimeError, ValueError, KeyError, TypeError, IndexError) as e:
                raise CheckpointError(f"{self.ckpt_path}: its weights or optimiser state do not fit this model "
                                      f"({type(e).__name__}: {str(e).splitlines()[0][:120]})") from None
            for group in self.optimizer.param_groups:  # --lr given on resume wins over the saved one
                group["lr"] = cfg.lr
            self.step, self.tokens_seen, self.train_time = state["step"], state["tokens_seen"], state["train_time_s"]
            self.window.update(state["log_window"])
            self.last_ckpt_step = self.step
        self.first_step = self.step
        self.steady = dict(tokens=0, time=0.0)  # this invocation, after WARMUP_STEPS
        self.started = time.perf_counter()
        self.results = dict(losses={}, val={})  # what train() returns, for callers and tests

    @staticmethod
    def _empty_window() -> dict:
        return dict(loss=0.0, steps=0, tokens=0, time=0.0)

    @property
    def n_params(self) -> int:
        return sum(p.numel() * (2 if p.is_complex() else 1) for p in self.model.parameters())

    def wall(self) -> float:
        return time.perf_counter() - self.started

    def train_step(self) -> tuple[float, float]:
        """One optimiser step over cfg.grad_accum micro-batches -> (mean loss in nats, tokens/s).
        Under torchrun: the mean over all ranks, and the tokens of all ranks."""
        t0 = time.perf_counter()
        loss_value = distributed.mean(self.world, self._optimiser_step(), self.device)
        dt = time.perf_counter() - t0

        self.step += 1
        self.tokens_seen += self.tokens_per_step
        self.train_time += dt
        for k, v in (("loss", loss_value), ("steps", 1), ("tokens", self.tokens_per_step), ("time", dt)):
            self.window[k] += v
        if self.step - self.first_step > self.WARMUP_STEPS:
            self.steady["tokens"] += self.tokens_per_step
            self.steady["time"] += dt
        self.results["losses"][self.step] = loss_value
        return loss_value, self.tokens_per_step / dt

    def _optimiser_step(self) -> float:
        """Forward, backward and the optimiser on cfg.grad_accum micro-batches; their mean loss."""
        cfg, device = self.cfg, self.device
        loss_sum = torch.zeros((), device=device)
        for i in range(cfg.grad_accum):
            batch = self.sampler.next().to(device, non_blocking=True)  # (b, seq_len + 1)
            if self.graphs:     # a new step: the graphs may reuse the last step's outputs' memory
                torch.compiler.cudagraph_mark_step_begin()
            # ranks exchange gradients once a step, in the last micro-batch's backward
            with distributed.no_sync(self.model, sync=i == cfg.grad_accum - 1):
                with autocast(device, cfg.bf16):
                    loss = self.forward(batch, return_loss=True)
                with torch.autograd.set_multithreading_enabled(not cfg.main_thread_backward):
                    (loss / cfg.grad_accum).backward()
            loss_sum += loss.detach().float()
        if cfg.clip > 0:
            torch.nn.utils.clip_grad_norm_(self.model.parameters(), cfg.clip)
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=not self.graphs)
        return loss_sum.item() / cfg.grad_accum  # synchronises: the step has finished

    def train_record(self) -> dict:
        """The mean loss, tokens/s and peak memory since the last record; starts a new window."""
        w, self.window = self.window, self._empty_window()
        mean = w["loss"] / w["steps"]
        return dict(step=self.step, loss=mean, bpc=mean / math.log(2), tokens_per_s=w["tokens"] / w["time"],
                    tokens=self.tokens_seen, train_time_s=self.train_time, wall_s=self.wall(), lr=self.cfg.lr,
                    **peak_memory(self.device))

    def validate(self) -> dict:
        """Every rank: the validation loss over all ranks (see evaluate)."""
        loss = self._val_loss()
        self.results["val"][self.step] = loss / math.log(2)
        return dict(step=self.step, loss=loss, bpc=loss / math.log(2), tokens=self.tokens_seen,
                    train_time_s=self.train_time, wall_s=self.wall(), **peak_memory(self.device))

    def _val_loss(self) -> float:
        # DDP's wrapper is for training steps; sharded weights need every rank's forward
        model = self.model if self.sharded else distributed.unwrap(self.model)
        return evaluate(model, self.val_data, self.cfg, self.device, self.world)

    @property
    def samples_on_every_rank(self) -> bool:
        """Sharded weights (FSDP2): every rank takes part in gathering them for the sample (rank 0
        then samples alone); otherwise rank 0 samples alone."""
        return self.sharded

    def sample(self) -> dict:
        model = distributed.unwrap(self.model)
        if self.sharded:
            # generation needs the weights whole: every rank gathers them, rank 0 samples from a copy
            weights = distributed.full_weights(self.model)
            if not self.world.main:
                return dict(step=self.step, prime="", text="")
            with torch.random.fork_rng(devices=[self.device] if self.device.type == "cuda" else []):
                model = build_model(self.cfg.model_kwargs())
            model.load_state_dict(weights)
            model.to(self.device)
        prime, text = sample_from_val(model, self.val_data, self.cfg, self.device, self.step)
        return dict(step=self.step, prime=prime, text=text)

    def device_info(self) -> tuple[str, str | None]:
        """(the device the model trains on, its name) for the start record and the summary line."""
        name = torch.cuda.get_device_name(self.device) if self.device.type == "cuda" else None
        return str(self.device), name

    def checkpoint(self) -> None:
        """Write the checkpoint; a failed write raises CheckpointError saying what the file still holds.

        Weights that are no longer finite are never written over a good checkpoint (DivergedError).
        Under torchrun every rank calls it: the full (unsharded) state is gathered, rank 0 writes
        it, and every rank learns how that went, so all stop together if it failed.
        """
        world = self.world
        finite = all(bool(torch.isfinite(distributed.local_values(p)).all()) for p in self.model.parameters())
        if distributed.any_rank(world, not finite, self.device):
            held = ("no checkpoint written" if self.last_ckpt_step is None
                    else f"{self.ckpt_path} holds step {self.last_ckpt_step}")
            raise DivergedError(f"the weights are no longer finite at step {self.step}; stopped without saving "
                                f"them ({held}). Try a lower --lr or --clip")
        model_state, optim_state = distributed.full_state(self.model, self.optimizer)
        error = None
        if world.main:
            state = dict(
                format=CHECKPOINT_FORMAT, step=self.step, config=dataclasses.asdict(self.cfg),
                model=model_state, optimizer=optim_state, rng=rng_state(self.sampler, self.rank_device),
                tokens_seen=self.tokens_seen, train_time_s=self.train_time, log_window=dict(self.window),
                data_len=[len(self.train_data), len(self.val_data)], data_fingerprint=self.data_fingerprint,
            )
            if world.distributed:
                state["world_size"] = world.size
            try:
                checkpoints.save_checkpoint(state, self.ckpt_path)
            except CheckpointError as e:
                held = ("no checkpoint was written before" if self.last_ckpt_step is None
                        else f"{self.ckpt_path.name} still holds step {self.last_ckpt_step}, whole")
                error = CheckpointError(f"step {self.step}: {e}; {held}")
        error = distributed.from_main(world, error)
        if error is not None:
            raise error
        self.last_ckpt_step = self.step

    def checkpoint_bytes(self) -> int:
        """About how large the checkpoint file is: the weights, Adam's two moments, and some slack."""
        weights = sum(p.numel() * p.element_size() for p in self.model.parameters())
        return 3 * weights + (64 << 10)

    def end_record(self, reason: str) -> dict:
        steady = self.steady["tokens"] / self.steady["time"] if self.steady["time"] > 0 else None
        return dict(step=self.step, reason=reason, tokens=self.tokens_seen, train_time_s=self.train_time,
                    wall_s=self.wall(), steady_tokens_per_s=steady, **peak_memory(self.device))


class JaxRun(Run):
    """--framework jax: the model, its training step, validation and samples in pure JAX
    (gateloop_hybrid.jax.training.Trainer); the flags, data stream, initial weights (torch's, from
    --seed), metrics and checkpoints are the torch run's. The torch model and optimiser stay on the
    CPU, as the checkpoint's format: the JAX state is converted from them on start (and resume)
    and into them before each checkpoint, so either framework resumes the other's checkpoints."""

    def __init__(self, cfg: TrainConfig, state: dict | None, world=None, data_fingerprint: dict | None = None):
        try:
            import jax
            import jax.numpy as jnp

            import gateloop_hybrid.jax as glj
            from gateloop_hybrid.jax.training import Trainer
        except ImportError as e:
            raise ConfigError(f"--framework jax: {e}") from None
        self.jax_device = jax_device(jax, cfg.device)
        if not cfg.attention and cfg.scan_backend == "pallas" and self.jax_device.platform != "gpu":
            raise ConfigError(f"--scan-backend pallas runs on a GPU; JAX's device here is {self.jax_device}")
        # the torch side (sampler, the weights in torch's format) on the CPU; its scan never runs
        super().__init__(dataclasses.replace(cfg, device="cpu", scan_backend="torch"), state, world,
                         data_fingerprint=data_fingerprint)
        self.cfg = cfg
        self.scan_backend = None if cfg.attention else ("pallas" if cfg.scan_backend == "pallas" else "jax")
        self.glj = glj
        bf16 = self.jax_device.platform == "gpu" if cfg.bf16 is None else cfg.bf16
        names = distributed.parameter_names(self.model)
        adam = {names[i]: s for i, s in self.optimizer.state_dict()["state"].items()}
        try:
            model = glj.from_torch_state_dict(self.model.state_dict(), **cfg.model_kwargs())
        except ValueError as e:
            raise ConfigError(f"the model flags do not fit together: {e}") from None
        self.trainer = Trainer(model, lr=cfg.lr, clip=cfg.clip, compute_dtype=jnp.bfloat16 if bf16 else None,
                               device=self.jax_device, adam_state=adam)

    def _optimiser_step(self) -> float:
        batches = torch.stack([self.sampler.next() for _ in range(self.cfg.grad_accum)])  # (accum, b, seq_len + 1)
        return self.trainer.step(batches.numpy())

    def _val_loss(self) -> float:
        cfg = self.cfg
        sampler = Sampler(self.val_data, cfg.seq_len, cfg.batch_size, seed=cfg.seed + 1)  # as evaluate()
        return sum(self.trainer.loss(sampler.next().numpy()) for _ in range(cfg.val_batches)) / cfg.val_batches

    def sample(self) -> dict:
        cfg = self.cfg
        prime = val_prime(self.val_data, cfg, self.step)
        try:
            out = self.trainer.generate(prime.numpy(), cfg.gen_len, temperature=cfg.temperature, top_k=cfg.top_k,
                                        seed=cfg.seed + self.step)
        except ValueError as e:  # non-finite logits
            raise DivergedError(f"step {self.step}: {e}") from None
        return dict(step=self.step, prime=decode(prime[0].tolist()), text=decode(out[0].tolist()))

    def checkpoint(self) -> None:
        weights, adam = self.trainer.state_dicts()
        self.model.load_state_dict(self.glj.convert.torch_tensors(weights))
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: torch.as_tensor(v) for k, v in adam[name].items()}
                              for i, name in enumerate(distributed.parameter_names(self.model)) if name in adam}
        self.optimizer.load_state_dict(optimizer)
        super().checkpoint()

    def device_info(self) -> tuple[str, str | None]:
        return f"jax:{self.jax_device.platform}:{self.jax_device.id}", self.jax_device.device_kind


