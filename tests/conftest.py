"""Test session setup (Triton interpreter, cuBLAS determinism, a fresh compile cache) and fixtures; helpers
for the tests themselves live in helpers.py."""

from __future__ import annotations

import os
import shutil
import tempfile

import torch

# Without a GPU the Triton kernels run in Triton's interpreter, which must be chosen before they are imported.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")
# torch.use_deterministic_algorithms(True) refuses cuBLAS without this (the Triton backward calls cuBLAS).
os.environ.setdefault("CUBLAS_WORKSPACE_CONFIG", ":4096:8")
# A fresh torch.compile cache per test session: PyTorch's on-disk caches key a compiled step on its forward
# graph, so a cached backward can outlive a change to a custom op's autograd formula (seen here).
_INDUCTOR_DIR = None
if "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    _INDUCTOR_DIR = os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="fastpair-inductor-")

import pytest  # noqa: E402
from helpers import triton_runs  # noqa: E402


@pytest.fixture
def triton_only():
    """For tests of the Triton backend alone: skipped where it cannot run."""
    if not triton_runs():
        pytest.skip("Triton is not available here")


@pytest.fixture
def tiled(monkeypatch):
    """The Triton calls of every objective take the tiled kernels at every N (kernels/small.py: N <= 64 takes one
    program otherwise): for the tests of the sweep, the panels and their bounds at interpreter-sized batches."""
    if triton_runs():
        from fastpair.kernels import small

        monkeypatch.setattr(small, "MAX_N", 0)


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Every loss test runs on both backends; triton on CPU runs in the interpreter (small shapes only)."""
    if request.param == "triton" and not triton_runs():
        pytest.skip("Triton is not available here")
    return request.param


@pytest.fixture
def deterministic_algorithms():
    before = torch.are_deterministic_algorithms_enabled()
    torch.use_deterministic_algorithms(True)
    yield
    torch.use_deterministic_algorithms(before)


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def pytest_sessionfinish(session, exitstatus):
    if _INDUCTOR_DIR is not None:
        shutil.rmtree(_INDUCTOR_DIR, ignore_errors=True)


def pytest_collection_modifyitems(config, items):
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA device")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)
