"""Character-level language modelling with the GateLoop Transformer, in the enwik8 format.

Bytes are tokens (256 of them). Train, validate in bits per character, sample with the cached
incremental decoding, and checkpoint so that a run can be resumed exactly:

    python train.py --preset demo                          # a small model on CPU in about a minute
    python sample.py --checkpoint runs/demo/checkpoint.pt --prompt "ABSURDITY, n. "
    python train.py --data enwik8.zip                      # GateLoop, the seed's sizes
    python train.py --data enwik8.zip --attention          # softmax-attention baseline
    python train.py --data enwik8.zip --resume             # continue <out-dir>/checkpoint.pt
    python sample.py --checkpoint runs/gateloop/checkpoint.pt --prompt "The "

`python train.py --help` lists every training flag; `python sample.py --help` the sampling ones
(`python train.py sample ...` is the same as `python sample.py ...`). Installed, the same commands
are `gateloop-train` and `gateloop-sample`.

This file is the command line only; the machinery is gateloop_hybrid.training (config, data,
checkpoints, the loop, torchrun), whose public names it re-exports for scripts that import train.
Everything that stops a run is a `TrainError`, printed as one line with its `exit_code` (2 for a
bad flag or bad data, 1 otherwise).
"""

from __future__ import annotations

import sys

from gateloop_hybrid.training import *  # noqa: F401,F403 - the API, for scripts that `import train`
from gateloop_hybrid.training import train_main

main = train_main

if __name__ == "__main__":
    sys.exit(main())
