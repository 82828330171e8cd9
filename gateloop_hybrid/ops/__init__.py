"""Torch ops that launch the pure-JAX kernels of ``gateloop_hybrid.kernels``, with their autograd.

    mosaic.py    the Mosaic GPU scan and fused mixers, launched by ``bridge.MosaicKernel`` (no XLA
                 per call), with one plan cache
    bridged.py   the JAX scans (Triton-lowered Pallas, jax.lax.associative_scan) as torch functions
                 through the XLA bridge (``bridge.jax2torch``)
    selftest.py  each kernel against its float64 reference on a small case, run once per device by
                 ``gateloop_hybrid.routing`` before "auto" takes it
"""
