"""Inputs and checks shared by the spec tests (test_spec_family.py, test_spec_sigmoid.py): written, like them,
from DESIGN.md alone, and independent of fastpair's own test helpers and reference."""

from __future__ import annotations

import re

import pytest
import torch

F64 = torch.float64
RTOL = {torch.float64: 1e-9, torch.float32: 1e-5}


def make_embeddings(M, N, D, dtype, seed, scale=1.0):
    """M correlated (N, D) embeddings (a shared component plus per-modality noise): retrieval has hits and
    misses, positives have clearly larger logits than most negatives."""
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(N, D, generator=g, dtype=F64)
    return [((base + 0.9 * torch.randn(N, D, generator=g, dtype=F64)) * scale).to(dtype) for _ in range(M)]


def make_ids(kind, N, seed):
    g = torch.Generator().manual_seed(seed + 1000)
    if kind is None:
        return None
    if kind == "groups":  # several samples per id, small contiguous labels
        return torch.randint(0, max(2, N // 3), (N,), generator=g)
    if kind == "sparse":  # several samples per id, large non-contiguous labels
        G = max(2, N // 4)
        table = torch.randperm(1000, generator=g)[:G] * 37
        return table[torch.randint(0, G, (N,), generator=g)]
    if kind == "same":  # every sample is a positive of every other
        return torch.zeros(N, dtype=torch.int64)
    if kind == "arange":
        return torch.arange(N)
    if kind == "arange32":
        return torch.arange(N, dtype=torch.int32)
    raise AssertionError(kind)


def make_mask(kind, M, N, seed):
    g = torch.Generator().manual_seed(seed + 2000)
    if kind is None:
        return None
    mask = torch.ones(M, N, dtype=torch.bool)
    if kind == "random":  # missing modalities here and there
        mask = torch.rand(M, N, generator=g) < 0.75
        mask[:, 0] = False  # a sample with no modality at all
        mask[0, 1] = True  # a sample with only modality 0
        mask[1:, 1] = False
    elif kind == "drop_last":  # the last modality is missing everywhere: its pairs have n = 0
        mask[M - 1] = False
    elif kind == "one_valid":  # modality 1 present for sample 0 only: its pairs have n = 1
        mask[1, 1:] = False
    elif kind == "all_missing":  # no pair has a valid sample
        mask[:] = False
    else:
        raise AssertionError(kind)
    return mask


def pair_logits(x, y, valid, ids, t, normalize):
    """The logits of one pair over its valid set V = {i : valid[i]}: S = <x_i, y_j> / t for i, j in V (rows
    L2-normalized first unless normalize=False), and the ids of V."""
    V = torch.nonzero(valid).flatten()
    x, y = x[V], y[V]
    if normalize:
        x = x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)
        y = y / y.norm(dim=1, keepdim=True).clamp_min(1e-12)
    return (x @ y.T) / t, ids[V]


def retrieval_accuracy(S, g):
    """(x -> y, y -> x): the share of rows whose highest logit is a positive (same id), and of columns."""
    return torch.stack([(g[S.argmax(dim=1)] == g).to(F64).mean(), (g[S.argmax(dim=0)] == g).to(F64).mean()])


MISSING = re.compile(r"(missing|not (installed|available|importable|found)|unavailable|cannot import|no module)",
                     re.IGNORECASE)


def assert_near(actual, expected, rtol, what, scale=None):
    """max |actual - expected| <= rtol * (scale + 1e-2), scale defaulting to max |expected|."""
    a = torch.as_tensor(actual).detach().to(F64).cpu()
    e = torch.as_tensor(expected).detach().to(F64).cpu()
    assert a.shape == e.shape, f"{what}: shape {tuple(a.shape)} != expected {tuple(e.shape)}"
    assert torch.isfinite(a).all(), f"{what}: non-finite values {a}"
    if scale is None:
        scale = e.abs().max().item() if e.numel() else 0.0
    err = (a - e).abs().max().item() if e.numel() else 0.0
    tol = rtol * (scale + 1e-2)
    assert err <= tol, f"{what}: max abs error {err:.3e} > {tol:.3e}\nactual={a}\nexpected={e}"


# Topologies every API must refuse: a modality paired with itself, out of range, an unordered pair twice, none
BAD_PAIRS = {
    "p_equals_q": [(0, 1), (1, 1)],
    "index_too_large": [(0, 3)],
    "index_negative": [(-1, 0)],
    "twice_same_order": [(0, 1), (1, 2), (0, 1)],
    "twice_reversed": [(0, 1), (1, 0)],
    "twice_reversed_later": [(0, 2), (1, 2), (2, 1)],
    "empty": [],
}
N_BAD = 10  # the batch size of the bad-ids tests


def skip_if_triton_missing(error: RuntimeError, backend: str) -> None:
    """On the triton backend, skip when the error says Triton is missing (anything else is a failure)."""
    if backend == "triton" and "triton" in str(error).lower() and MISSING.search(str(error)):
        pytest.skip(f"Triton is missing: {error}")
