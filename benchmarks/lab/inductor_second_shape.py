"""Which Inductor setting lets a second attention model compile at another shape (CUDA, bf16).

    python benchmarks/lab/inductor_second_shape.py

torch 2.11 fails the second compile with an AssertionError in
torch/_inductor/tiling_utils.get_pw_red_splits once automatic dynamic shapes turn on
(pytorch/pytorch#181563). Each setting runs in its own process, all at once: the default, two
Inductor switches that skip the failing analysis, and static shapes (dynamic=False). Prints one
line per setting: passed, or the error's last line.
"""
from __future__ import annotations

import os
import subprocess
import sys

CASE = r'''
import sys, torch
from gateloop_hybrid import Transformer
dynamic = None if sys.argv[1] == "auto" else False
for shape in ((4, 4097), (64, 257)):
    torch.manual_seed(0)
    model = Transformer(dim=128, num_tokens=256, depth=2, use_gate_looped_attn=False, heads=2,
                        dim_head=64, ff_mult=5).cuda()
    ids = torch.randint(0, 256, shape, device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        got = torch.compile(model, dynamic=dynamic)(ids, return_loss=True)
        want = model(ids, return_loss=True)
    got.backward()
    assert torch.allclose(got.float(), want.float(), rtol=2e-2), (got, want)
'''

SETTINGS = {
    "default": ({}, "auto"),
    "TORCHINDUCTOR_COALESCE_TILING_ANALYSIS=0": ({"TORCHINDUCTOR_COALESCE_TILING_ANALYSIS": "0"}, "auto"),
    "TORCHINDUCTOR_LOOP_REINDEXING_AFTER_FUSION=0": ({"TORCHINDUCTOR_LOOP_REINDEXING_AFTER_FUSION": "0"}, "auto"),
    "torch.compile(dynamic=False)": ({}, "static"),
}


def main():
    procs = {name: subprocess.Popen([sys.executable, "-c", CASE, mode], env={**os.environ, **env},
                                    stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
             for name, (env, mode) in SETTINGS.items()}
    for name, proc in procs.items():
        out, _ = proc.communicate()
        lines = [line for line in out.splitlines() if line.strip()]
        print(f"{name:46} {'passed' if proc.returncode == 0 else 'FAILED: ' + (lines[-1] if lines else '?')}")


if __name__ == "__main__":
    main()
