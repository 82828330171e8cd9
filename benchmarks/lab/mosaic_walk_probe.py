"""Lab probe: the Mosaic GPU scan kernels natively in JAX on a GPU. Correctness against the float64
reference at small sizes, then per-call time of forward and backward walks for several block
sizes and time-chunk counts. Usage: python benchmarks/lab/mosaic_walk_probe.py [out.json]"""
import json, sys, time
import numpy as np
import jax, jax.numpy as jnp
import torch
from gateloop_hybrid.kernels import mosaic_scan as ms, walk
from gateloop_hybrid.scan.reference import scan_reference, scan_reference_vjp

rng = np.random.default_rng(0)
out = {"jax": jax.__version__, "device": str(jax.devices()[0]), "correct": [], "timing": []}


def pairs(z):
    return np.stack([z.real, z.imag], -1).astype(np.float32) if np.iscomplexobj(z) else z.astype(np.float32)


def unpairs(v, c):
    v = np.asarray(v, np.float64)
    return v[..., 0] + 1j * v[..., 1] if c else v


def walks(B, N, F, G, R, ca, cx, h0, rev, chunks, block):
    common = dict(B=B, N=N, F=F, G=G, R=R, complex_a=ca, complex_x=cx, reverse=rev, chunks=chunks, block=block)
    cplx = ca or cx
    fw = ms.Walk(**common, complex_init=cplx and h0, complex_h0=False, has_init=h0, has_h0=False, backward=False)
    bw = ms.Walk(**common, complex_init=cplx, complex_h0=cplx and h0, has_init=True, has_h0=h0, backward=True)
    return fw, bw


def check(B, N, F, G, R, ca, cx, h0, rev, chunks, block):
    mag = rng.uniform(0.5, 0.99, (B, N, G))
    a = mag * np.exp(1j * rng.uniform(-3, 3, (B, N, G))) if ca else mag
    x = rng.normal(size=(B, N, F)) + (1j * rng.normal(size=(B, N, F)) if cx else 0)
    hh = (rng.normal(size=(B, F)) + (1j * rng.normal(size=(B, F)) if ca or cx else 0)) if h0 else None
    cplx = ca or cx
    idx = (np.arange(F) // R) % G
    T = lambda z: None if z is None else torch.from_numpy(np.asarray(z))
    h_ref, hl_ref = scan_reference(T(a[:, :, idx]), T(x), T(hh), rev)
    gh = rng.normal(size=(B, N, F)) + (1j * rng.normal(size=(B, N, F)) if cplx else 0)
    gl = rng.normal(size=(B, F)) + (1j * rng.normal(size=(B, F)) if cplx else 0)
    da_ref, dx_ref, dh0_ref = scan_reference_vjp(T(a[:, :, idx]), T(x), T(hh), h_ref, T(gh), T(gl), rev)
    fw, bw = walks(B, N, F, G, R, ca, cx, h0, rev, chunks, block)
    f = jax.jit(ms.walk_kernel(fw, (jnp.float32, jnp.float32)))
    h, hl = f(pairs(a), pairs(x), *([pairs(hh)] if h0 else []))
    b = jax.jit(ms.walk_kernel(bw, (jnp.float32, jnp.float32, jnp.float32)))
    outs = b(pairs(a), pairs(gh), pairs(h_ref.numpy()), pairs(gl), *([pairs(hh)] if h0 else []))
    da = unpairs(outs[1], ca)
    da_g = np.zeros((B, N, G), da.dtype); da_rg = np.zeros((B, N, G), da_ref.numpy().dtype)
    np.add.at(da_g.transpose(2, 0, 1), idx, da.transpose(2, 0, 1))
    np.add.at(da_rg.transpose(2, 0, 1), idx, da_ref.numpy().transpose(2, 0, 1))
    rel = lambda g, w: float(np.linalg.norm(g - w) / max(np.linalg.norm(w), 1e-30))
    errs = {"h": rel(unpairs(h, cplx), h_ref.numpy()), "h_last": rel(unpairs(hl, cplx), hl_ref.numpy()),
            "dx": rel(unpairs(outs[0], cx), dx_ref.numpy()), "da": rel(da_g, da_rg)}
    if h0:
        errs["dh0"] = rel(unpairs(outs[2], ca or cx), dh0_ref.numpy())
    return errs


def per_call_ms(fn, args, reps=30):
    r = fn(*args); jax.block_until_ready(r)
    t0 = time.perf_counter()
    for _ in range(reps):
        r = fn(*args)
    jax.block_until_ready(r)
    return (time.perf_counter() - t0) / reps * 1e3


for c in [(2, 1000, 256, 256, 1, False, False, True, True, 5, 32), (1, 777, 128, 128, 1, True, True, True, False, 3, 16)]:
    try:
        e = check(*c)
        out["correct"].append({"case": c, "errors": e, "ok": max(e.values()) < 1e-4})
    except Exception as ex:
        out["correct"].append({"case": c, "error": f"{type(ex).__name__}: {str(ex)[:400]}"})
    print(out["correct"][-1], flush=True)

for (B, N, F) in [(4, 4096, 1024), (1, 65536, 512), (16, 1024, 1024)]:
    for cplx in (False, True):
        floor_fwd = 3 * B * N * F * (8 if cplx else 4) / 4.2e12 * 1e3
        a = jnp.asarray(rng.uniform(0.5, 0.99, (B, N, F, 2) if cplx else (B, N, F)), jnp.float32)
        x = jnp.asarray(rng.normal(size=a.shape), jnp.float32)
        auto, auto_block = walk.choose_walk(B, N, F, cplx)
        variants = {(auto, auto_block), (auto, 2 * auto_block), (walk.fit_chunks(N, 2 * auto), auto_block)}
        for chunks, block in sorted(variants):
            fw, bw = walks(B, N, F, F, 1, cplx, cplx, False, False, chunks, block)
            row = {"B": B, "N": N, "F": F, "complex": cplx, "chunks": chunks, "block": block,
                   "auto": (auto, auto_block), "floor_fwd_ms": floor_fwd}
            try:
                f = jax.jit(ms.walk_kernel(fw, (jnp.float32, jnp.float32)))
                row["fwd_ms"] = per_call_ms(f, (a, x))
                b = jax.jit(ms.walk_kernel(bw, (jnp.float32, jnp.float32)))
                row["bwd_ms"] = per_call_ms(b, (a, x, x, x[:, 0]))
            except Exception as ex:
                row["error"] = f"{type(ex).__name__}: {str(ex)[:300]}"
            out["timing"].append(row)
            print(row, flush=True)
if len(sys.argv) > 1:
    json.dump(out, open(sys.argv[1], "w"), indent=1)
