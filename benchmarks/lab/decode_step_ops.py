"""The decode step's operations: how many compute ops (leaf aten calls other than views and
allocations) one eager decode step and draw run, per model, and the most frequent. On a GPU each
is a kernel launch, so in a captured step without torch.compile their count sets a floor on the
step's time (a few microseconds each).

    python benchmarks/lab/decode_step_ops.py                  # dim 512, depth 6, batch 1, on the CPU
    python benchmarks/lab/decode_step_ops.py --compile        # Inductor's step: its fused kernels and the rest
    python benchmarks/lab/decode_step_ops.py --device cuda --compile   # the device kernels of that step
"""

from __future__ import annotations

import argparse
import collections
import re
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
             "aten::imag", "aten::flatten", "aten::contiguous", "aten::result_type", "aten::empty_like",
             "aten::view_as_real", "aten::view_as_complex"}


def inductor_calls(decoder, *args) -> list[str]:
    """The calls in the ``call`` function of the code Inductor generates for the step: its fused
    kernels, the library kernels (matmuls) and any aten op it falls back to."""
    from torch._inductor.utils import run_and_get_code
    _, codes = run_and_get_code(decoder, *args)
    names = []
    for code in codes:
        body = code[code.index("def call("):]
        for line in body.splitlines()[1:]:
            if line.strip().startswith("return "):
                break
            m = re.search(r"\b(cpp_fused\w*|triton_\w+\.run|extern_kernels\.\w+|torch\.ops\.aten\.\w+)\(", line)
            if m:
                name = m.group(1)
                names.append("fused" if name.startswith(("cpp_fused", "triton_")) else name)
    return names


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
            if args.compile and device.type == "cpu":
                names = inductor_calls(decoder, tokens, active)
                common = ", ".join(f"{n} {c}" for n, c in collections.Counter(names).most_common(8))
                print(f"{kind:14s} {len(names):4d} kernel calls in Inductor's step; {common}")
                continue
            for _ in range(3):
                decoder(tokens, active)
            with profile(activities=activities) as prof:
                decoder(tokens, active)
        if device.type == "cuda":
            names = [e.name for e in prof.events() if e.device_type == torch.autograd.DeviceType.CUDA]
            what = "device kernels"
        else:
            leaves = [e.name for e in prof.events() if not any(c.name.startswith(("aten::", "graph_"))
                                                               for c in e.cpu_children)]
            names = [n.split("_cpp_fused")[0] + "_fused" if n.startswith("graph_") else n for n in leaves
                     if n.startswith("graph_") or (n.startswith("aten::") and n not in NO_KERNEL)]
            what = "leaf compute ops"
        common = ", ".join(f"{n.removeprefix('aten::')} {c}" for n, c in collections.Counter(names).most_common(8))
        print(f"{kind:14s} {len(names):4d} {what} per step; most frequent: {common}")


if __name__ == "__main__":
    main()
