"""Weights between the torch layers and the JAX ones, by the torch state dict's names.

Every JAX module keeps its arrays in torch's layout, in fields named as the torch module's
children; where torch numbers the members of an ``nn.Sequential`` (``to_a.0``) or names a child
otherwise, the JAX module's ``torch_keys`` says so. ``named_parameters`` walks a module (or any
pytree of its structure: gradients, optimiser moments) and yields the torch names, in the order
of the torch model's ``state_dict``.

Nothing here imports torch, except ``to_torch_state_dict``, which returns torch tensors.
"""

from __future__ import annotations

import dataclasses
from collections import OrderedDict

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from .transformer import Transformer


def _torch_keys(module) -> dict:
    keys = getattr(module, "torch_keys", {})
    return keys() if callable(keys) else keys


def _walk(node, prefix: str):
    if isinstance(node, eqx.Module):
        keys = _torch_keys(node)
        for f in dataclasses.fields(node):
            if f.metadata.get("static", False):
                continue
            yield from _walk(getattr(node, f.name), f"{prefix}{keys.get(f.name, f.name)}.")
    elif isinstance(node, (list, tuple)):
        for i, child in enumerate(node):
            yield from _walk(child, f"{prefix}{i}.")
    elif node is not None:
        yield prefix[:-1], node


def named_parameters(tree) -> "OrderedDict[str, object]":
    """{torch state-dict name: leaf} for a JAX module, or a pytree of the same structure.

    The order is that of the torch model's ``state_dict()``. Leaves that are None (a gradient
    filtered out) are left out.
    """
    return OrderedDict(_walk(tree, ""))


def _to_numpy(value, name: str):
    """A torch tensor, NumPy or JAX array as a NumPy array (bfloat16 kept), without importing torch."""
    if type(value).__module__.startswith("torch"):
        value = value.detach().cpu()
        if str(value.dtype) == "torch.bfloat16":  # NumPy has no bfloat16: through float32, exactly
            return np.asarray(value.float().numpy()).astype(jnp.bfloat16)
        return value.numpy()
    if isinstance(value, (np.ndarray, jax.Array)):
        return np.asarray(value)
    raise TypeError(f"state dict entry {name!r} is a {type(value).__name__}, not an array or tensor")


def load_state_dict(module, state_dict):
    """``module`` with every array replaced by the state dict's entry of the same torch name.

    Strict, as torch's ``load_state_dict(strict=True)``: every name must be present, no name may
    be left over, and shapes must match (one ValueError listing what differs). The arrays keep
    the state dict's dtype (float64 stays float64 where JAX's x64 mode is on). ``module`` may be
    a shape-only skeleton from ``equinox.filter_eval_shape``.
    """
    wanted = named_parameters(module)
    missing = [k for k in wanted if k not in state_dict]
    unexpected = [k for k in state_dict if k not in wanted]
    wrong = [f"{k}: {tuple(state_dict[k].shape)} != {tuple(v.shape)}"
             for k, v in wanted.items() if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)]
    if missing or unexpected or wrong:
        parts = [f"{what}: {', '.join(names)}" for what, names in
                 (("missing", missing), ("unexpected", unexpected), ("shape differs", wrong)) if names]
        raise ValueError(f"the state dict does not fit this {type(module).__name__} ({'; '.join(parts)})")
    # copies: a training step donates these buffers, which must not be the caller's memory
    leaves = [jnp.array(_to_numpy(state_dict[k], k)) for k in wanted]
    cplx = [f"{k} ({leaf.dtype})" for k, leaf in zip(wanted, leaves) if jnp.iscomplexobj(leaf)]
    if cplx:
        raise TypeError(f"the state dict holds complex weights ({', '.join(cplx[:4])}"
                        f"{', ...' if len(cplx) > 4 else ''}); every weight of a {type(module).__name__} is real")
    return eqx.tree_at(lambda m: list(named_parameters(m).values()), module, replace=leaves)


def from_torch_state_dict(state_dict, **constructor_kwargs) -> Transformer:
    """The JAX ``Transformer`` holding a torch ``Transformer``'s weights.

    Args:
        state_dict: ``gateloop_hybrid.Transformer(...).state_dict()`` (or gateloop-transformer
            0.2.5's, which has the same names): torch tensors, NumPy or JAX arrays.
        **constructor_kwargs: the torch model's constructor arguments (dim, num_tokens, depth,
            ...). ``scan_backend`` must be one of the JAX model's ("auto", "jax", "pallas").

    Called on integer token ids, the result gives the torch model's logits.
    """
    skeleton = eqx.filter_eval_shape(Transformer, **constructor_kwargs, key=jax.random.key(0))
    return load_state_dict(skeleton, state_dict)


def to_numpy_state_dict(module) -> "OrderedDict[str, np.ndarray]":
    """{torch name: NumPy array (a copy)} of a JAX module, in the torch state dict's order."""
    return OrderedDict((k, np.array(v)) for k, v in named_parameters(module).items())


def to_torch_state_dict(module) -> "OrderedDict[str, object]":
    """The torch state dict of a JAX module: {name: torch.Tensor}, loadable with ``strict=True``
    into the torch layer built with the same constructor arguments (imports torch)."""
    return torch_tensors(to_numpy_state_dict(module))


def torch_tensors(arrays: dict) -> "OrderedDict[str, object]":
    """{name: NumPy array} as {name: torch.Tensor}, bfloat16 included (imports torch)."""
    import torch

    out = OrderedDict()
    for k, v in arrays.items():
        if v.dtype == jnp.bfloat16:
            out[k] = torch.from_numpy(v.astype(np.float32)).to(torch.bfloat16)
        else:
            out[k] = torch.from_numpy(np.ascontiguousarray(v))
    return out
