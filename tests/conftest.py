"""Fixtures shared by the test modules, and the threads of pytest-xdist's workers."""

import os

# pytest-xdist's workers share the machine's cores: each gets its share of intra-op threads (one
# each for 2 workers on 2 cores), for torch and for XLA, whose threads would otherwise spin against
# the other worker's. Set before torch and JAX start; the tests' subprocesses inherit it.
WORKER_THREADS = None
if os.environ.get("PYTEST_XDIST_WORKER"):
    WORKER_THREADS = max(1, (os.cpu_count() or 1) // int(os.environ.get("PYTEST_XDIST_WORKER_COUNT", "1")))
    os.environ["OMP_NUM_THREADS"] = str(WORKER_THREADS)
    if WORKER_THREADS == 1:
        os.environ["XLA_FLAGS"] = " ".join(filter(None, [
            os.environ.get("XLA_FLAGS"), "--xla_cpu_multi_thread_eigen=false", "intra_op_parallelism_threads=1"]))

import pytest  # noqa: E402
import torch  # noqa: E402

if WORKER_THREADS is not None:
    torch.set_num_threads(WORKER_THREADS)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one intra-op thread, and far faster on a busy machine. Modules
    that want it name it in their pytestmark."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
