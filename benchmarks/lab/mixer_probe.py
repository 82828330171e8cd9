"""The fused GateLoop mixer against its composition, and its kernels' walk choices (H200 lab).

    python benchmarks/lab/mixer_probe.py [--shapes 4x4096x512,1x16384x512,4x4096x1024]

For each (B, N, H) in bf16: forward and forward+backward of gate_loop_mixer on the fused kernels
(states stored, and recomputed in backward) and on the composition (torch ops around the pallas
scan), against the memory floor of the fused forward (read qkv and z, write y) and backward
(read qkv, z, dy and the states, write dqkv and dz). Then the fused kernels with other
(forward, backward) block sizes. Then, for each (B, N, D) of --simple-shapes, SimpleGateLoopLayer's
real-gate mixer (simple_gate_loop_mixer) fused against its composition (gate_loop_scan[pallas]),
and the whole SimpleGateLoopLayer against the seed's.
"""

import argparse

import torch

import harness
from gateloop_hybrid.mixer import gate_loop_mixer
from gateloop_hybrid.ops import mosaic as mosaic_op

HBM_TBPS = 4.2      # measured copy bandwidth on the H200 (docs/results.md)


def timed(fn):
    _, times, _ = harness.measure(fn, harness.device_wait(torch.device("cuda")), reps=20, budget_s=1.0,
                                  target_rep_s=0.02)
    return harness.stats(times)["median_ms"]


def main():
    p = argparse.ArgumentParser()
    p.add_argument("--shapes", default="4x4096x512,1x16384x512,4x4096x1024")
    p.add_argument("--blocks", default="8/8,16/8,16/16,32/16,8/4")
    p.add_argument("--simple-shapes", default="1x65536x512,4x4096x512",
                   help="(B, N, D) for the real-gate mixer; empty to skip")
    args = p.parse_args()
    print("\n".join(harness.header(harness.environment(torch.device("cuda")))))
    for shape in filter(None, args.shapes.split(",")):
        B, N, H = map(int, shape.split("x"))
        g = torch.Generator(device="cuda").manual_seed(0)
        qkv = torch.randn(B, N, 3 * H, device="cuda", generator=g).bfloat16().requires_grad_()
        z = torch.randn(B, N, 2 * H, device="cuda", generator=g).bfloat16().requires_grad_()
        dy = torch.randn(B, N, H, device="cuda", generator=g).bfloat16()
        el = B * N * H
        floor_f = el * (5 * 2 + 2) / HBM_TBPS / 1e9
        floor_b = el * (5 * 2 + 2 + 8 + 5 * 2) / HBM_TBPS / 1e9
        print(f"\nB={B} N={N} H={H} bf16; floor fwd {floor_f:.3f} ms, bwd (states stored) {floor_b:.3f} ms")

        def run(backend, recompute, grad):
            def f():
                with torch.set_grad_enabled(grad):
                    y, _ = gate_loop_mixer(qkv, z, heads=H, frac_gradient=0.9, recompute=recompute,
                                           backend=backend)
                if grad:
                    torch.autograd.grad(y, (qkv, z), dy)
                return y
            return f
        y_fused = run("auto", True, False)()
        y_comp = _composed(qkv, z, H, False)
        err = ((y_fused.float() - y_comp.float()).norm() / y_comp.float().norm()).item()
        print(f"fused vs composition: rel err {err:.2e}")
        rows = (("fused, states stored", run("auto", False, False), run("auto", False, True)),
                ("fused, states recomputed", run("auto", True, False), run("auto", True, True)),
                ("composition, pallas scan", lambda: _composed(qkv, z, H, False),
                 lambda: _composed(qkv, z, H, True, dy)))
        for name, fwd, fb in rows:
            print(f"{name:>28}: fwd {timed(fwd):.3f} ms, fwd+bwd {timed(fb):.3f} ms")
        for blocks in filter(None, args.blocks.split(",")):
            bf, bb = map(int, blocks.split("/"))
            for recompute in (False, True):
                plan = mosaic_op._MixerPlan(qkv, z, None, 0.9, recompute, blocks={False: bf, True: bb})

                def fb():
                    y, _ = mosaic_op._MosaicMixer.apply(qkv, z, None, 0.9, recompute, plan)
                    torch.autograd.grad(y, (qkv, z), dy)

                def f():
                    with torch.no_grad():
                        return plan.forward(qkv, z, None, train=False)[0]
                print(f"   blocks fwd {bf:>2} bwd {bb:>2} {'recompute' if recompute else 'stored':>9} "
                      f"(chunks {plan.infer.chunks}/{plan.bwd.chunks}): fwd {timed(f):.3f} ms, fwd+bwd {timed(fb):.3f} ms")
    for shape in filter(None, args.simple_shapes.split(",")):
        simple_rows(*map(int, shape.split("x")))
    for shape in filter(None, args.simple_shapes.split(",")):
        simple_layer_rows(*map(int, shape.split("x")))


def simple_rows(B, N, D):
    from gateloop_hybrid import gate_loop_scan
    from gateloop_hybrid.mixer import _simple_fused_runs, simple_gate_loop_mixer
    g = torch.Generator(device="cuda").manual_seed(0)
    qkva = torch.randn(B, N, 3 * D, device="cuda", generator=g).bfloat16().requires_grad_()
    dy = torch.randn(B, N, D, device="cuda", generator=g).bfloat16()
    el = B * N * D
    print(f"\nreal gates B={B} N={N} D={D} bf16; floor fwd {el * 8 / HBM_TBPS / 1e9:.3f} ms "
          f"(read qkva, write y), bwd {el * 18 / HBM_TBPS / 1e9:.3f} ms (read qkva, dy, states; write dqkva)")

    def composed(qkva):
        q, kv, za = qkva.chunk(3, dim=-1)
        return q * gate_loop_scan(za.sigmoid(), kv, backend="pallas")[0]

    def run(fused, grad):
        def f():
            with torch.set_grad_enabled(grad):
                y = simple_gate_loop_mixer(qkva)[0] if fused else composed(qkva)
            if grad:
                torch.autograd.grad(y, qkva, dy)
            return y
        return f
    y_fused, y_comp = run(True, False)(), run(False, False)()
    fused = _simple_fused_runs(qkva.device)
    if fused:
        print("fused vs composition: rel err "
              f"{((y_fused.float() - y_comp.float()).norm() / y_comp.float().norm()).item():.2e}")
    else:
        print("the fused kernels were not taken (see the self-test's warning)")
    for name, which in (("fused" if fused else "auto (composition)", True), ("composition, pallas scan", False)):
        print(f"{name:>28}: fwd {timed(run(which, False)):.3f} ms, fwd+bwd {timed(run(which, True)):.3f} ms")


def simple_layer_rows(B, N, D):
    """SimpleGateLoopLayer(D), forward+backward (input and weights), against the seed's layer
    (gateloop-transformer, where installed) with the same weights; float32 and bf16 autocast."""
    from gateloop_hybrid import SimpleGateLoopLayer
    ours = SimpleGateLoopLayer(D).cuda()
    layers = {"ours": ours}
    try:
        from gateloop_transformer import SimpleGateLoopLayer as SeedLayer
        seed = SeedLayer(D).cuda()
        seed.load_state_dict(ours.state_dict())
        layers["seed"] = seed
    except ImportError:
        print("gateloop-transformer is not installed: no seed row")
    g = torch.Generator(device="cuda").manual_seed(1)
    x = torch.randn(B, N, D, device="cuda", generator=g).requires_grad_()
    dy = torch.randn(B, N, D, device="cuda", generator=g)
    print(f"\nSimpleGateLoopLayer({D}) on ({B}, {N}, {D}), forward+backward")
    for precision in ("fp32", "bf16"):
        outs = {}
        for name, layer in layers.items():
            def f(layer=layer):
                with torch.autocast("cuda", torch.bfloat16, enabled=precision == "bf16"):
                    y = layer(x)
                torch.autograd.grad(y, [x, *layer.parameters()], dy.to(y.dtype))
                return y
            try:
                outs[name] = f().float()
                print(f"{precision} {name:>5}: fwd+bwd {timed(f):.3f} ms")
            except Exception as e:     # the seed's scan may not run in bf16
                print(f"{precision} {name:>5}: fails, {type(e).__name__}: {str(e)[:120]}")
        if len(outs) == 2:
            err = ((outs["ours"] - outs["seed"]).norm() / outs["seed"].norm()).item()
            print(f"{precision} ours vs seed: rel err {err:.2e}")


def _composed(qkv, z, H, grad, dy=None):
    from gateloop_hybrid.mixer import composed_mixer
    with torch.set_grad_enabled(grad):
        y, _ = composed_mixer(qkv, z, None, heads=H, frac=0.9, backend="pallas")
    if grad:
        torch.autograd.grad(y, (qkv, z), dy)
    return y


if __name__ == "__main__":
    main()
