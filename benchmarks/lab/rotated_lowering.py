"""Lower each wide-head kernel (kernels/mosaic_rotated.py) for CUDA at a few keys, under Lane
and Warpgroup semantics, and report which lower; with --dump DIR, the module each one hands to
Warpgroup layout inference is written there as MLIR text (for the failing ones, what to read).
On a machine without a GPU, JAX lowers for sm_90.

    python benchmarks/lab/rotated_lowering.py --semantics lane,warpgroup --dump /tmp/mlir
"""

from __future__ import annotations

import argparse
import functools
import sys
import time
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
from jax.experimental.pallas import mosaic_gpu as plgpu  # noqa: E402

from gateloop_hybrid.kernels import mosaic_rotated as kern  # noqa: E402
from gateloop_hybrid.kernels import walk as walks  # noqa: E402


def structs(key: kern.RotatedKey, kernel: str):
    B, N, H, d, S = key.B, key.N, key.H, key.d, key.segments
    qkv = jax.ShapeDtypeStruct((B, N, 3 * H, d), jnp.dtype(key.dtype))
    x = jax.ShapeDtypeStruct((B, N, H, d), jnp.dtype(key.dtype))
    row = jax.ShapeDtypeStruct((B, H, N), jnp.float32)
    G = jax.ShapeDtypeStruct((B, H, N // kern.C, d), jnp.float32)
    state = jax.ShapeDtypeStruct((B, H, S, 2, d, d), jnp.float32)
    extra = (state,) if key.has_state else ()
    return {
        "summary": (qkv, row, row, G),
        "forward": (qkv, row, row, row, G, *extra),
        "backward_q": (qkv, x, row, row, row, G, *extra),
        "summary_back": (qkv, x, row, row, G),
        "backward_kv": (qkv, x, row, row, row, G, *extra),
    }[kernel]


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--dump", type=Path)
    p.add_argument("--widths", default="64,128")
    p.add_argument("--kernels", default="summary,forward,backward_q,summary_back,backward_kv")
    p.add_argument("--semantics", default="lane,warpgroup")
    p.add_argument("--grouped", default="false", help="comma list of false, true: RotatedKey.grouped")
    p.add_argument("--stages", type=int, default=2, help="RotatedKey.stages: chunks in flight per walk")
    args = p.parse_args(argv)
    current = {}
    if args.dump:
        args.dump.mkdir(parents=True, exist_ok=True)
        from jax.experimental.mosaic.gpu import layout_inference
        original = layout_inference.infer_layout

        def dumping(module, *a, **kw):
            (args.dump / f"{current['name']}.mlir").write_text(str(module))
            return original(module, *a, **kw)
        layout_inference.infer_layout = dumping
        import jax.experimental.mosaic.gpu as mgpu
        import jax.experimental.mosaic.gpu.core as core
        mgpu.infer_layout = dumping            # the name Pallas's lowering calls (jax 0.10)
        if getattr(core, "layout_inference", None) is not None:
            core.layout_inference.infer_layout = dumping
    print(f"jax {jax.__version__}, devices {jax.devices()}")
    semantics = {"lane": plgpu.LoweringSemantics.Lane, "warpgroup": plgpu.LoweringSemantics.Warpgroup}
    cases = [(sem, grouped == "true", d, has_state, name) for sem in args.semantics.split(",")
             for grouped in args.grouped.split(",") for d in map(int, args.widths.split(","))
             for has_state in (False, True) for name in args.kernels.split(",")
             if not (has_state and name.startswith("summary"))]
    for sem, grouped, d, has_state, name in cases:
        kern.SEMANTICS = semantics[sem]
        key = kern.RotatedKey(B=2, N=4 * kern.C, H=2, d=d, block_v=kern.choose_block_v(d),
                              has_state=has_state, dtype="bfloat16", segments=2, grouped=grouped,
                              stages=args.stages)
        current["name"] = f"{name}_{sem}_d{d}_state{int(has_state)}" + ("_grouped" if grouped else "")
        fn = functools.partial(kern.launch, key=walks.key_fields(key), kernel=name)
        t0 = time.perf_counter()
        try:
            jax.jit(fn).trace(*structs(key, name)).lower(lowering_platforms=("cuda",))
            result = "ok"
        except Exception as e:  # noqa: BLE001 - a probe reports every failure and goes on
            result = f"FAILED {type(e).__name__}: {str(e)[:300]}"
            if args.dump:
                (args.dump / f"{current['name']}.err").write_text(traceback.format_exc())
        print(f"{sem:9s} {'grouped' if grouped else 'one-by-one':10s} {name:13s} d={d:3d} state={has_state!s:5s} "
              f"{time.perf_counter() - t0:6.1f} s  {result}",
              flush=True)

if __name__ == "__main__":
    main()
