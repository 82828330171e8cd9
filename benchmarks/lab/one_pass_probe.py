"""Lab probe: the Mosaic GPU scan walks cut into time chunks, as two kernels (summary, then
finish) against one kernel whose chunks exchange their summaries through grid-wide counters
(walk.ONE_PASS). Runs benchmarks/scan_speed.py's pallas row twice in one process, the walks'
form switched between, with its error column against the float64 reference.

    python benchmarks/lab/one_pass_probe.py OUT_DIR [scan_speed flags]

Default flags: --shapes 4x4096x1024,1x65536x512,16x1024x1024 --dtypes float32,complex64.
Writes OUT_DIR/two_pass.json and OUT_DIR/one_pass.json."""
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import scan_speed  # noqa: E402
from gateloop_hybrid.kernels import walk  # noqa: E402
from gateloop_hybrid.ops import mosaic as mosaic_op  # noqa: E402

out = Path(sys.argv[1])
out.mkdir(parents=True, exist_ok=True)
flags = sys.argv[2:] or ["--shapes", "4x4096x1024,1x65536x512,16x1024x1024", "--dtypes", "float32,complex64"]
for one_pass in (False, True):
    walk.ONE_PASS = one_pass
    mosaic_op._PLANS.clear()        # plans hold the walks chosen when they were made
    name = "one_pass" if one_pass else "two_pass"
    print(f"=== {name}", flush=True)
    scan_speed.main(["--backends", "pallas", "--isolate", "no", "--host", "no", "--no-progress",
                     "--json", str(out / f"{name}.json"), *flags])
