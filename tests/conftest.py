"""Shared helpers: seeded inputs, one tolerance table and a comparison that says where and by how much."""

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

# Per compute dtype: (rtol, atol relative to the largest reference magnitude). 16-bit inputs are compared
# against PyTorch's own same-dtype error instead (see assert_within_torch_error).
TOLERANCE = {
    torch.float64: (1e-9, 1e-10),
    torch.float32: (2e-5, 2e-6),
}


def randn(*shape, seed=0, dtype=torch.float32, device="cpu"):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64).to(dtype=dtype, device=device)


def make_embeddings(m, n, d, seed=0, dtype=torch.float32, device="cpu", requires_grad=True):
    return [randn(n, d, seed=seed * 100 + k, dtype=dtype, device=device).requires_grad_(requires_grad)
            for k in range(m)]


def assert_close(actual, expected, dtype=torch.float32, scale=1.0, name="value", magnitude=1.0):
    """|actual - expected| <= atol * scale * max(max|expected|, magnitude) + rtol * |expected|, elementwise.

    scale widens the tolerance where the problem is ill-conditioned (e.g. 1/t = 1000 amplifies input
    rounding of the logits by 1000); magnitude is the quantity's natural size where the exact value may
    be 0 (a gradient's is 1/(t n): rounding of the logits leaves about eps * |S| / (t n) even there).
    """
    rtol, atol = TOLERANCE[dtype]
    actual = actual.detach().to("cpu", torch.float64)
    expected = expected.detach().to("cpu", torch.float64)
    assert actual.shape == expected.shape, f"{name}: shape {tuple(actual.shape)} != {tuple(expected.shape)}"
    assert torch.isfinite(actual).all(), f"{name}: non-finite values at {torch.nonzero(~torch.isfinite(actual))[:5]}"
    ref = expected.abs().max().clamp_min(magnitude) if expected.numel() else torch.tensor(magnitude)
    bound = atol * scale * ref + rtol * scale * expected.abs()
    err = (actual - expected).abs()
    bad = err > bound
    if bad.any():
        idx = torch.nonzero(bad)[:5].tolist()
        worst = int(torch.argmax(err - bound))
        raise AssertionError(
            f"{name}: {int(bad.sum())} of {err.numel()} elements off; first at {idx}; worst flat index {worst}: "
            f"actual {actual.flatten()[worst].item():.10g}, expected {expected.flatten()[worst].item():.10g}, "
            f"|diff| {err.flatten()[worst].item():.3g} > bound {bound.flatten()[worst].item():.3g}"
        )


def condition_scale(temperature) -> float:
    """How much 1/t amplifies rounding of the logits (1 for t >= 0.01)."""
    t = min(temperature) if isinstance(temperature, (list, tuple)) else float(temperature)
    return max(1.0, 0.01 / t)


def write_small_npz(path, seed=0, nan_at=None, no_audio=None) -> str:
    """A small multiclass .npz in the documented layout (train 96, valid 48, test 48; 3 classes; text 12,
    audio 7, vision 5 features over 6 steps): the class shifts a feature of every modality. nan_at: an
    index into train/audio set to NaN; no_audio: a train sample whose audio is all zeros (missing)."""
    import numpy as np

    rng = np.random.default_rng(seed)
    arrays = {}
    for split, n in (("train", 96), ("valid", 48), ("test", 48)):
        y = rng.integers(0, 3, n)
        for m, f in (("text", 12), ("audio", 7), ("vision", 5)):
            x = rng.normal(size=(n, 6, f)).astype(np.float32)
            x[:, :, 0] += 2.0 * y[:, None]
            if (split, m) == ("train", "audio"):
                if nan_at is not None:
                    x[nan_at] = np.nan
                if no_audio is not None:
                    x[no_audio] = 0.0
            arrays[f"{split}/{m}"] = x
        arrays[f"{split}/labels"] = y
    np.savez(path, **arrays)
    return str(path)


def triton_runs() -> bool:
    from fastpair.kernels import available, interpreter

    return available() and (torch.cuda.is_available() or interpreter())


@pytest.fixture
def triton_only():
    """For tests of the Triton backend alone: skipped where it cannot run."""
    if not triton_runs():
        pytest.skip("Triton is not available here")


@pytest.fixture(params=["torch", "triton"])
def backend(request):
    """Every loss test runs on both backends; triton on CPU runs in the interpreter (small shapes only)."""
    if request.param == "triton" and not triton_runs():
        pytest.skip("Triton is not available here")
    return request.param


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


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
