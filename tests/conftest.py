"""Fixtures shared by the test modules, and the threads of pytest-xdist's workers."""

import os
import shutil
import tempfile

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
    # and so many processes for Inductor's C++ builds: one compiles in the worker itself, where a
    # pool of one per core would start its own processes (and importing torch in each) to contend
    # for the same cores
    os.environ.setdefault("TORCHINDUCTOR_COMPILE_THREADS", str(WORKER_THREADS))

# One JAX compilation cache for the whole run, the workers' and their subprocesses': a program
# compiled once (the kernels' self-tests run in the worker and again in a fresh process, say) is
# loaded the next time instead of compiled again. Made by the first process, removed at its end.
_OWN_JAX_CACHE = None
if "JAX_COMPILATION_CACHE_DIR" not in os.environ:
    _OWN_JAX_CACHE = tempfile.mkdtemp(prefix="gateloop-tests-jax-cache-")
    os.environ.update(JAX_COMPILATION_CACHE_DIR=_OWN_JAX_CACHE, JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0.2")

import pytest  # noqa: E402
import torch  # noqa: E402

if WORKER_THREADS is not None:
    torch.set_num_threads(WORKER_THREADS)


def pytest_unconfigure(config):
    if _OWN_JAX_CACHE is not None:
        shutil.rmtree(_OWN_JAX_CACHE, ignore_errors=True)


@pytest.fixture(scope="module")
def one_torch_thread():
    """Tiny models train faster on one intra-op thread, and far faster on a busy machine. Modules
    that want it name it in their pytestmark."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)
