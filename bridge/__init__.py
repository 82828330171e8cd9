"""bridge: JAX functions as torch ops, with zero-copy DLPack exchange. Knows nothing of GateLoop.

    from bridge import jax2torch, to_jax, to_torch
    from bridge import MosaicKernel      # one Pallas Mosaic GPU kernel launched on torch tensors
"""

from .convert import SUPPORTED_DTYPES, to_jax, to_torch
from .function import DoubleBackwardError, JaxFunction, jax2torch
from .mosaic import MosaicKernel

__all__ = ["jax2torch", "JaxFunction", "DoubleBackwardError", "MosaicKernel", "to_jax", "to_torch",
           "SUPPORTED_DTYPES"]
