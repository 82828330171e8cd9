"""Pure-JAX kernels (no torch): what the torch ops in ``gateloop_hybrid.ops`` launch and what the
JAX model (``gateloop_hybrid.jax``) calls.

    walk.py          what every Mosaic GPU walk kernel shares: the walk key (a launch's compile
                     key), the body that walks time, the kernel builder, complex-pair arithmetic
    mosaic_scan.py   the scan h_t = a_t h_{t-1} + x_t as Mosaic GPU kernels (Hopper and newer)
    mosaic_mixer.py  the fused GateLoop mixer with one feature per head, and SimpleGateLoopLayer's
                     real-gate mixer, as Mosaic GPU kernels
    pallas_scan.py   the scan as Triton-lowered Pallas kernels (any CUDA GPU JAX supports)
    jax_scan.py      the scan as jax.lax.associative_scan with a reverse-scan backward

Every scan kernel is checked against ``gateloop_hybrid.scan.reference`` (float64, sequential,
with its own vjp); the mixer kernels against the float64 composition of torch ops they replace
(``gateloop_hybrid.mixer``). The torch side imports these modules only when a kernel runs, so
importing the package needs no JAX.
"""
