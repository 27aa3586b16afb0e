"""Shared test helpers: seeded inputs, one tolerance table, a comparison that says where and by how much,
the reference check every loss test runs, and small data files."""

from __future__ import annotations

import importlib.util
import os

import pytest
import torch

from fastpair import pairwise_nce, pairwise_sigmoid
from fastpair.reference import pairwise_nce_reference, pairwise_sigmoid_reference

OBJECTIVES = {"nce": (pairwise_nce, pairwise_nce_reference), "sigmoid": (pairwise_sigmoid, pairwise_sigmoid_reference)}

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


def open_clip_loss():
    """open_clip's loss module (ClipLoss, SigLipLoss), loaded from the installed open_clip_torch by path.

    The module needs torch only; the open_clip package's __init__ also imports torchvision, whose wheels are
    tied to one torch build (none matches the CPU torch of the development machines), so the peer's losses are
    tested without it. Skips where open_clip_torch is not installed."""
    spec = importlib.util.find_spec("open_clip")
    if spec is None or not spec.submodule_search_locations:
        pytest.skip("open_clip_torch is not installed")
    path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
    module_spec = importlib.util.spec_from_file_location("_open_clip_loss", path)
    module = importlib.util.module_from_spec(module_spec)
    module_spec.loader.exec_module(module)
    return module


def triton_runs() -> bool:
    from fastpair.kernels import available, interpreter

    return available() and (torch.cuda.is_available() or interpreter())


def device_for(backend: str) -> str:
    return "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"


def _temperature_arg(temperature, learnable, dtype=torch.float64):
    if not learnable:
        return temperature
    return torch.tensor(temperature, dtype=dtype, requires_grad=True)


def case_kwargs(case: dict, n: int, m: int = 3, mask_seed: int = 5) -> dict:
    """A test case's keyword arguments made concrete: ids "clips" (two crops per clip) or "labels" (4
    classes), mask=True a random mask in which sample 0 has every modality."""
    kw = dict(case)
    if kw.get("ids") == "clips":
        kw["ids"] = torch.arange(n) // 2
    elif kw.get("ids") == "labels":
        kw["ids"] = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(n))
    if kw.pop("mask", False):
        mask = torch.rand(m, n, generator=torch.Generator().manual_seed(mask_seed)) > 0.3
        mask[:, 0] = True
        kw["mask"] = mask
    return kw


def case_inputs(kw: dict, n: int, seed: int):
    """(3 embeddings (n, 6), a temperature per pair of the case) for a case of case_kwargs; unnormalized cases
    get embeddings scaled down so that their logits stay moderate."""
    zs = make_embeddings(3, n, 6, seed=seed)
    if not kw.get("normalize", True):
        zs = [(z.detach() * 0.3).requires_grad_() for z in zs]
    pairs = kw.get("pairs")
    return zs, [0.05, 0.1, 0.2][: len(pairs) if pairs else 3]


def small(n: int, backend: str) -> int:
    """Shapes for the Triton interpreter stay small (it emulates every block op on the CPU)."""
    return min(n, 33) if backend == "triton" and not torch.cuda.is_available() else n


def on(zs, backend):
    """Move leaf embeddings to the backend's device (CUDA for triton when there is a GPU)."""
    dev = device_for(backend)
    return [z.detach().to(dev).requires_grad_(z.requires_grad) for z in zs]


def check_against_reference(zs, backend="torch", temperature=0.07, learnable=False, block_size=None,
                            objective="nce", bias=None, **kw):
    """Run fastpair and the float64 reference on the same inputs; compare loss, grads, dt (and, for the
    sigmoid objective, db) and stats. learnable: the temperature and the bias are tensors that learn."""
    loss_fn, ref_fn = OBJECTIVES[objective]
    dtype = zs[0].dtype
    cdtype = torch.float64 if dtype == torch.float64 else torch.float32
    zs = on(zs, backend)
    kw = {key: (v.to(zs[0].device) if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    if objective == "sigmoid":
        kw["bias"] = -10.0 if bias is None else bias
    params = {"temperature": temperature, **({"bias": kw.pop("bias")} if "bias" in kw else {})}
    ours = {key: _temperature_arg(v, learnable) for key, v in params.items()}
    loss, stats = loss_fn(*zs, **ours, backend=backend, return_stats=True, block_size=block_size, **kw)
    loss.backward()

    refs = [z.detach().cpu().double().requires_grad_() for z in zs]
    theirs = {key: _temperature_arg(v, learnable) for key, v in params.items()}
    kw = {key: (v.cpu() if isinstance(v, torch.Tensor) else v) for key, v in kw.items()}
    ref_loss, ref_stats = ref_fn(*refs, **theirs, return_stats=True, **kw)
    ref_loss.backward()

    scale = condition_scale(temperature if not isinstance(temperature, list) else min(temperature))
    if not kw.get("normalize", True):  # unnormalized logits reach max|z|^2 / t, not 1/t
        scale *= max(1.0, max(r.detach().norm(dim=1).max().item() for r in refs) ** 2)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    assert_close(loss, ref_loss, cdtype, scale, "loss")
    t_min = min(temperature) if isinstance(temperature, list) else temperature
    grad_size = 1.0 / (t_min * zs[0].shape[0])
    for m, (z, r) in enumerate(zip(zs, refs)):
        assert z.grad.dtype == z.dtype
        assert_close(z.grad, r.grad, cdtype, scale, f"grad of embedding {m}", magnitude=grad_size)
    if learnable:
        for key, value in ours.items():
            assert value.grad.shape == value.shape
            assert_close(value.grad, theirs[key].grad, cdtype, scale, f"grad of {key}")
    assert_close(stats["pair_losses"], ref_stats["pair_losses"], torch.float32, scale, "pair_losses")
    assert stats["pair_accuracy"].dtype == torch.float32
    assert stats["pair_losses"].dtype == torch.float32
    assert not stats["pair_losses"].requires_grad
    if zs[0].shape[1] > 1:  # with D = 1 every logit ties with others, and rounding decides the argmax
        torch.testing.assert_close(stats["pair_accuracy"].cpu(), ref_stats["pair_accuracy"], rtol=0, atol=1e-6)
    return loss, stats, zs
