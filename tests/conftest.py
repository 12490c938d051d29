"""Test-suite setup: without CUDA, Triton kernels run in the CPU interpreter.

TRITON_INTERPRET must be set before triton.jit decorates the kernels, so it is set here, before any test
module imports sga.kernels.
"""
import atexit
import os
import shutil
import tempfile

import pytest
import torch

if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

# The fused linear loss caches the CPU GEMM route it measures (sga.kernels.cpu_routes) in the user's cache folder:
# the suite (and the processes it starts, which inherit the environment) writes to a folder of its own instead.
_ROUTE_CACHE_DIR = tempfile.mkdtemp(prefix="sga-test-routes-")
atexit.register(shutil.rmtree, _ROUTE_CACHE_DIR, ignore_errors=True)
os.environ["SGA_CPU_ROUTE_CACHE"] = os.path.join(_ROUTE_CACHE_DIR, "cpu-routes.json")

# Tiny models are all per-op overhead, and two intra-op threads collapse when other processes share the two
# cores (10-20x slower, measured here): one thread for the whole suite.
torch.set_num_threads(1)


@pytest.fixture(autouse=True)
def _seeded_global_rng():
    """Each test starts from the same global RNG state, whatever ran before it: a failure seen in one run (a
    subset, another order) is the failure every run sees."""
    torch.manual_seed(0)


@pytest.fixture(scope="module")
def tokenizer():
    """The byte-level tiny tokenizer of sga.models (no download)."""
    from sga.models import tiny_tokenizer

    return tiny_tokenizer()


def pytest_collection_modifyitems(config, items):
    skip_cuda = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "cuda" in item.keywords and not torch.cuda.is_available():
            item.add_marker(skip_cuda)
