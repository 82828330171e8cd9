"""Training the JAX model: Adam with gradient clipping (optax), a jitted step, a jitted loss.

    optimizer = make_optimizer(lr=1e-4, clip=0.5)         # torch.optim.Adam + clip_grad_norm_
    opt_state = optimizer.init(trainable(model))
    step = make_train_step(optimizer)                      # compute_dtype=jnp.bfloat16 for bf16
    model, opt_state, loss = step(model, opt_state, batches)   # batches: (accum, b, n + 1) ids

The step averages the loss and the gradients over the ``accum`` micro-batches (a ``lax.scan``,
so one micro-batch's activations live at a time), as ``(loss / accum).backward()`` per
micro-batch does in torch, then clips and takes one Adam step. ``torch_adam_state`` and
``with_torch_adam_state`` give Adam's moments by torch parameter name, in the form of
``torch.optim.Adam.state_dict()["state"]`` entries, so that checkpoints cross frameworks.

Imports no torch.
"""

from __future__ import annotations

from typing import Optional

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

try:
    import optax
except ImportError as e:  # pragma: no cover - depends on the installation
    raise ImportError(f"gateloop_hybrid.jax.training needs optax: pip install 'gateloop-hybrid[jax]' ({e})") from None

from .convert import named_parameters
from .transformer import Transformer


def make_optimizer(lr: float, clip: float = 0.0) -> optax.GradientTransformation:
    """Adam with torch's defaults (betas 0.9, 0.999, eps 1e-8), after clipping the gradients'
    global norm to ``clip`` (0: no clipping)."""
    adam = optax.adam(lr, b1=0.9, b2=0.999, eps=1e-8)
    return optax.chain(optax.clip_by_global_norm(clip), adam) if clip > 0 else adam


def trainable(model):
    """The model's floating arrays (None elsewhere): what the optimiser updates."""
    return eqx.filter(model, eqx.is_inexact_array)


def cast_floating(model, dtype):
    """The model with every floating array cast to ``dtype`` (the gradient flows back through
    the cast to the original arrays)."""
    return jax.tree_util.tree_map(lambda x: x.astype(dtype) if eqx.is_inexact_array(x) else x, model)


def _loss(model: Transformer, batch, compute_dtype):
    if compute_dtype is not None:
        model = cast_floating(model, compute_dtype)
    return model(batch, return_loss=True)  # in at least float32


def make_loss(compute_dtype=None):
    """A jitted ``loss(model, batch)``: the mean next-token loss of token ids (b, n + 1)."""
    return eqx.filter_jit(lambda model, batch: _loss(model, batch, compute_dtype))


def make_train_step(optimizer: optax.GradientTransformation, compute_dtype: Optional[jnp.dtype] = None):
    """A jitted ``step(model, opt_state, batches) -> (model, opt_state, loss)``.

    Args:
        optimizer: e.g. ``make_optimizer(lr, clip)``; ``opt_state = optimizer.init(trainable(model))``.
        compute_dtype: run the forward and backward in this dtype (``jnp.bfloat16``) with the
            weights, gradients and Adam's moments kept in theirs; None computes in the weights'
            dtype. The scan accumulates in float32 and the loss is taken in float32 either way.

    ``batches`` holds ``accum`` micro-batches of token ids, (accum, b, n + 1); ``loss`` is their
    mean loss before the step. The model and the optimiser state passed in are donated (their
    buffers are reused for the new ones and deleted): use the returned ones.
    """
    def step(model, opt_state, batches):
        return _step(batches, model, opt_state)

    @eqx.filter_jit(donate="all-except-first")  # the model and its state, not the batches
    def _step(batches, model, opt_state):
        params, static = eqx.partition(model, eqx.is_inexact_array)
        value_and_grad = jax.value_and_grad(lambda p, batch: _loss(eqx.combine(p, static), batch, compute_dtype))

        def micro(carry, batch):
            loss_sum, grad_sum = carry
            loss, grads = value_and_grad(params, batch)
            return (loss_sum + loss, jax.tree_util.tree_map(jnp.add, grad_sum, grads)), None

        loss_dtype = jax.eval_shape(value_and_grad, params, batches[0])[0].dtype
        zeros = (jnp.zeros((), loss_dtype), jax.tree_util.tree_map(jnp.zeros_like, params))
        (loss_sum, grad_sum), _ = jax.lax.scan(micro, zeros, batches)
        accum = batches.shape[0]
        grads = jax.tree_util.tree_map(lambda g: g / accum, grad_sum)
        updates, opt_state = optimizer.update(grads, opt_state, params)
        params = optax.apply_updates(params, updates)
        return eqx.combine(params, static), opt_state, loss_sum / accum

    return step


def _is_adam(node) -> bool:
    return isinstance(node, optax.ScaleByAdamState)


def _adam(opt_state) -> optax.ScaleByAdamState:
    found = [s for s in jax.tree_util.tree_leaves(opt_state, is_leaf=_is_adam) if _is_adam(s)]
    if len(found) != 1:
        raise ValueError(f"expected one Adam state in the optimiser state, found {len(found)}")
    return found[0]


def torch_adam_state(opt_state) -> dict:
    """Adam's state by torch parameter name: {name: {"step", "exp_avg", "exp_avg_sq"}}, NumPy
    values, as the entries of ``torch.optim.Adam.state_dict()["state"]`` (which are keyed by
    the parameter's index in ``model.parameters()``, the state dict's order)."""
    adam = _adam(opt_state)
    step = np.float32(int(adam.count))
    mu, nu = named_parameters(adam.mu), named_parameters(adam.nu)
    return {name: dict(step=step, exp_avg=np.array(mu[name]), exp_avg_sq=np.array(nu[name])) for name in mu}


def with_torch_adam_state(opt_state, state: dict):
    """``opt_state`` with Adam's moments and step count from ``{name: {"step", "exp_avg",
    "exp_avg_sq"}}`` (torch tensors or arrays, as ``torch_adam_state`` gives). Parameters
    without an entry (torch keeps none for a parameter that never had a gradient) get zero
    moments; the step count is the largest one given."""
    adam = _adam(opt_state)
    names = list(named_parameters(adam.mu))
    unknown = sorted(set(state) - set(names))
    if unknown:
        raise ValueError(f"the optimiser state names parameters this model lacks: {', '.join(unknown)}")

    def moments(tree, key):
        current = named_parameters(tree)
        leaves = []
        for name in names:
            if name in state:
                value = jnp.array(_numpy(state[name][key]), current[name].dtype)  # a copy
                if value.shape != current[name].shape:
                    raise ValueError(f"optimiser state {name}.{key}: shape {value.shape} != {current[name].shape}")
            else:
                value = jnp.zeros_like(current[name])
            leaves.append(value)
        return eqx.tree_at(lambda t: list(named_parameters(t).values()), tree, replace=leaves)

    steps = [int(_numpy(entry["step"])) for entry in state.values()]
    count = jnp.asarray(max(steps, default=0), adam.count.dtype)
    new = optax.ScaleByAdamState(count=count, mu=moments(adam.mu, "exp_avg"), nu=moments(adam.nu, "exp_avg_sq"))
    return jax.tree_util.tree_map(lambda s: new if _is_adam(s) else s, opt_state, is_leaf=_is_adam)


def _numpy(value):
    if type(value).__module__.startswith("torch"):
        return value.detach().cpu().numpy()
    return np.asarray(value)


class Trainer:
    """A model, its optimiser state and the jitted functions that act on them, on one device:
    what ``train.py --framework jax`` drives.

    Args:
        model: the JAX ``Transformer`` (e.g. ``from_torch_state_dict(...)``).
        lr, clip: as ``make_optimizer``.
        compute_dtype: as ``make_train_step`` (``jnp.bfloat16``, or None).
        device: a JAX device for the model, its state and the batches; None keeps JAX's default.
        adam_state: Adam's state by torch name (``with_torch_adam_state``), to resume.

    Batches come in as NumPy (or torch CPU) token ids; losses go out as Python floats.
    """

    def __init__(self, model: Transformer, *, lr: float, clip: float = 0.0, compute_dtype=None,
                 device=None, adam_state: Optional[dict] = None):
        self.device = device
        self.optimizer = make_optimizer(lr, clip)
        opt_state = self.optimizer.init(trainable(model))
        if adam_state:
            opt_state = with_torch_adam_state(opt_state, adam_state)
        self.model, self.opt_state = self._put(model), self._put(opt_state)
        self._step = make_train_step(self.optimizer, compute_dtype)
        self._loss = make_loss(compute_dtype)

    def _put(self, tree):
        return tree if self.device is None else jax.device_put(tree, self.device)

    def step(self, batches) -> float:
        """One optimiser step on token ids (accum, b, n + 1); their mean loss before it."""
        self.model, self.opt_state, loss = self._step(self.model, self.opt_state, self._put(_numpy(batches)))
        return float(loss)

    def loss(self, batch) -> float:
        """The mean next-token loss of token ids (b, n + 1)."""
        return float(self._loss(self.model, self._put(_numpy(batch))))

    def generate(self, prompt_ids, num_tokens: int, *, temperature: float = 1.0,
                 top_k: Optional[int] = None, seed: int = 0) -> np.ndarray:
        """``Transformer.generate`` with the PRNG key made from ``seed``; NumPy (b, num_tokens)."""
        prompt = self._put(_numpy(prompt_ids).astype(np.int32))
        key = jax.random.key(seed % 2**32)
        return np.asarray(self.model.generate(prompt, num_tokens, temperature, top_k, key=key))

    def state_dicts(self) -> tuple[dict, dict]:
        """(the model's arrays, Adam's state), both NumPy by torch parameter name."""
        from .convert import to_numpy_state_dict
        return to_numpy_state_dict(self.model), torch_adam_state(self.opt_state)
