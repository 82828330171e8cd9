"""GateLoop's gates from their pre-activations, as every torch path needs them.

    a = sigmoid(|z|) exp(i arg z)       one complex gate per head and step, z given as (re, im)

``gates`` gives a itself (the composed mixer scans it); ``log_gates`` gives log|a| and arg a (the
chunked form works with cumulative sums of both). The fused kernels compute the same gates on
chip (kernels/mosaic_mixer.py); the JAX model has its twin in jax/gate_loop.py.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor


def gate_preactivation(z: Tensor, frac_gradient: float = 1.0, ablate_complex: bool = False) -> Tensor:
    """(..., 2) gate pre-activations as (...) complex (float32 or wider), with only frac_gradient
    of their gradient passed back (the values unchanged) and, with ablate_complex, no imaginary part."""
    z = z * frac_gradient + z.detach() * (1 - frac_gradient)
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()  # complex needs float32 or wider
    z = torch.view_as_complex(z)
    return z.real + 0.0j if ablate_complex else z


def gates(z: Tensor, frac_gradient: float = 1.0, ablate_complex: bool = False,
          ablate_state_transition: bool = False) -> Tensor:
    """Complex gates a = sigmoid(|z|) exp(i arg z) from (..., 2) pre-activations, as (...) complex
    (float32 or wider)."""
    z = gate_preactivation(z, frac_gradient, ablate_complex)
    if ablate_state_transition:
        return torch.ones_like(z.real) + 0.0j
    # sigmoid on the magnitude, identity on the phase
    return torch.polar(z.abs().sigmoid(), z.angle())


def gate_parts(z: Tensor, ablate_complex: bool = False,
               ablate_state_transition: bool = False) -> tuple[Tensor, Tensor]:
    """The real and imaginary parts of ``gates`` (no gradient scaling), by the same formula,
    sigmoid(|z|) (cos arg z, sin arg z), in real arithmetic only: a compiled decode step fuses it
    with the state's update, where complex operations would each stay a kernel of their own."""
    if z.dtype in (torch.float16, torch.bfloat16):
        z = z.float()
    re, im = z.unbind(-1)
    if ablate_complex:
        im = torch.zeros_like(im)
    if ablate_state_transition:
        return torch.ones_like(re), torch.zeros_like(re)
    magnitude = torch.hypot(re, im).sigmoid()
    angle = torch.atan2(im, re)
    return magnitude * torch.cos(angle), magnitude * torch.sin(angle)


def log_gates(z: Tensor, frac_gradient: float = 1.0, ablate_complex: bool = False,
              ablate_state_transition: bool = False) -> tuple[Tensor, Tensor]:
    """log|a| and arg a of the gates a = sigmoid(|z|) exp(i arg z), from (..., 2) pre-activations
    (as ``gates``, which returns a itself); float32 or wider."""
    z = gate_preactivation(z, frac_gradient, ablate_complex)
    if ablate_state_transition:
        zero = torch.zeros_like(z.real)
        return zero, zero
    return F.logsigmoid(z.abs()), z.angle()
