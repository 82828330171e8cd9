"""The decode step's operations: how many compute ops (leaf aten calls other than views and
allocations) one eager decode step and draw run, per model, and the most frequent. On a GPU each
is a kernel launch, so in a captured step without torch.compile their count sets a floor on the
step's time (a few microseconds each).

    python benchmarks/lab/decode_step_ops.py                  # dim 512, depth 6, batch 1, on the CPU
    python benchmarks/lab/decode_step_ops.py --device cuda --compile   # kernels of Inductor's step
"""

from __future__ import annotations

import argparse
import collections
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))   # generate_speed

import torch  # noqa: E402
from torch.profiler import ProfilerActivity, profile  # noqa: E402

import generate_speed  # noqa: E402
from gateloop_hybrid.generation import DecodeState, Decoder  # noqa: E402

# leaf ops that launch no kernel (views, metadata, allocation)
NO_KERNEL = {"aten::view", "aten::as_strided", "aten::reshape", "aten::unsqueeze", "aten::squeeze", "aten::t",
             "aten::transpose", "aten::expand", "aten::select", "aten::slice", "aten::unflatten", "aten::permute",
             "aten::_reshape_alias", "aten::alias", "aten::detach", "aten::lift_fresh", "aten::empty",
             "aten::empty_strided", "aten::resolve_conj", "aten::resolve_neg", "aten::_unsafe_view", "aten::split",
             "aten::chunk", "aten::narrow", "aten::view_as_real", "aten::view_as_complex", "aten::real",
             "aten::imag", "aten::flatten", "aten::contiguous", "aten::result_type", "aten::empty_like"}


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", default=",".join(generate_speed.MODELS))
    p.add_argument("--dim", type=int, default=512)
    p.add_argument("--depth", type=int, default=6)
    p.add_argument("--batch", type=int, default=1)
    p.add_argument("--compile", action="store_true", help="count the device kernels of the compiled step (CUDA)")
    args = p.parse_args(argv)
    device = torch.device(args.device)
    dtype = torch.bfloat16 if device.type == "cuda" else torch.float32
    for kind in args.models.split(","):
        model = generate_speed.build(kind, args.dim, args.depth, device, dtype)
        state = DecodeState(model, args.batch, 600)
        state.position.fill_(512)
        decoder = Decoder(model, state, torch.arange(args.batch, device=device), temperature=1.0, top_k=50,
                          capture=False, compile=args.compile)
        tokens = torch.randint(0, 256, (args.batch,), device=device)
        active = torch.ones(args.batch, dtype=torch.bool, device=device)
        activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
        with torch.no_grad():
            for _ in range(3):
                decoder(tokens, active)
            with profile(activities=activities) as prof:
                decoder(tokens, active)
        if device.type == "cuda":
            names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            what = "device kernels"
        else:
            ops = [e for e in prof.events() if e.name.startswith("aten::")]
            names = [e.name for e in ops if e.name not in NO_KERNEL
                     and not any(c.name.startswith("aten::") for c in e.cpu_children)]
            what = "leaf compute ops"
        common = ", ".join(f"{n.removeprefix('aten::')} {c}" for n, c in collections.Counter(names).most_common(8))
        print(f"{kind:14s} {len(names):4d} {what} per step; most frequent: {common}")


if __name__ == "__main__":
    main()
