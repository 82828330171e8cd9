"""Continue a prompt with a checkpoint written by train.py, one cached decoding step per new byte.

    python sample.py --checkpoint runs/demo/checkpoint.pt --prompt "ABSURDITY, n. "
    python sample.py --checkpoint runs/gateloop/checkpoint.pt --prompt "The " --length 500 --top-k 10

Prints the prompt and its continuation (control characters as U+FFFD) on stdout, and the time it
took on stderr. Every problem (a missing or damaged checkpoint, a bad flag) is one line on stderr,
with exit code 2 for a bad flag and 1 otherwise. `python train.py sample ...` and, installed,
`gateloop-sample` run this too; the code is gateloop_hybrid.training.cli.
"""

from __future__ import annotations

import sys

from gateloop_hybrid.training.cli import build_sample_parser, check_sample_args, sample, sample_main

build_parser = build_sample_parser
check_args = check_sample_args
main = sample_main

__all__ = ["build_parser", "check_args", "sample", "main"]

if __name__ == "__main__":
    sys.exit(main())
