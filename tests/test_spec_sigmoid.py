"""Independent spec tests for the sigmoid objective (DESIGN.md: "The loss", "The loss family" -> "Sigmoid",
"Public API" -> pairwise_sigmoid and PairwiseSigmoid).

Everything here is derived from the specification alone: a float64 materialized reference of the sigmoid
objective (per pair: valid set V from the mask, normalized embeddings unless normalize=False,
S_ij = <x_i, y_j> / t_pq, z_ij = +1 where ids match and -1 elsewhere,
L_pq = -(1/n) sum_{i,j in V} log sigmoid(z_ij (S_ij + b_pq)), the weighted mean over pairs with n > 0, 0 if none),
compared against `fastpair.pairwise_sigmoid` and `fastpair.PairwiseSigmoid` on the torch backend (and a small
subset on the triton backend, which runs in Triton's interpreter on CPU tensors), plus SigLIP's own formula for
M = 2, identities of the objective, and input validation. Distributed behaviour is not tested here.
"""

from __future__ import annotations

import itertools
import math

import pytest
import torch
from helpers import open_clip_loss
from spec_inputs import (
    BAD_PAIRS,
    F64,
    N_BAD,
    RTOL,
    assert_near,
    make_embeddings,
    make_ids,
    make_mask,
    pair_logits,
    retrieval_accuracy,
    skip_if_triton_missing,
)

import fastpair

# ----------------------------------------------------------------------------------------------------------
# Inputs
# ----------------------------------------------------------------------------------------------------------


def make_extreme_embeddings(M, N, D, dtype, seed):
    """Embeddings whose cosines reach +-1 off and on the diagonal: in the first quarter of the rows every
    modality m >= 1 is the negation of modality 0 (positives with cosine -1 in the pairs (0, m)); in the second
    quarter row i of modality m >= 1 copies row i + 1 of modality 0 (negatives with cosine +1). With t = 0.01
    and b = -50 or +50 the logits z (S + b) reach -150, where a naive log(sigmoid(.)) is -inf in float32."""
    g = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=g, dtype=F64)
    out = [x.clone()]
    q = N // 4
    for m in range(1, M):
        z = x + 0.3 * torch.randn(N, D, generator=g, dtype=F64)
        z[:q] = -x[:q] * (1.0 + 0.5 * m)
        z[q:2 * q] = x[q + 1:2 * q + 1]
        out.append(z)
    return [z.to(dtype) for z in out]


def make_param(kind, value, num_pairs, dtype, spread):
    """kind: "float" (a Python float), "const" (a 0-d tensor without grad), "0d" (learnable 0-d tensor) or
    "1d" (learnable, one entry per pair: value + linspace(0, spread))."""
    if kind == "float":
        return float(value)
    if kind == "const":
        return torch.tensor(value, dtype=dtype)
    if kind == "0d":
        return torch.tensor(value, dtype=dtype, requires_grad=True)
    if kind == "1d":
        vals = value + torch.linspace(0.0, spread, num_pairs, dtype=F64)
        return vals.to(dtype).requires_grad_(True)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------------------
# The float64 materialized reference, straight from the spec's formulas
# ----------------------------------------------------------------------------------------------------------


def log_sigmoid(u):
    """log sigmoid(u), finite for every finite u (and so are its gradients): -log(1 + e^-u) for u >= 0,
    u - log(1 + e^u) for u < 0; each branch only ever exponentiates a non-positive number."""
    pos = -torch.log1p(torch.exp(-u.clamp(min=0)))
    neg = u - torch.log1p(torch.exp(u.clamp(max=0)))
    return torch.where(u >= 0, pos, neg)


def _per_pair(value, k):
    if isinstance(value, torch.Tensor):
        return value if value.dim() == 0 else value[k]
    return float(value)


def reference(zs, temperature=0.1, bias=-10.0, weights=None, mask=None, normalize=True, pairs=None, ids=None):
    """zs: float64 tensors (N, D); temperature and bias: float or float64 tensor (0-d or one entry per pair).

    Returns (loss, pair_losses (P,), pair_accuracy (P, 2), scales); loss is differentiable w.r.t. zs,
    temperature and bias. scales["bias"] and scales["temperature"] are the weighted sums of the absolute values
    of the terms of dL/db and dL/dt (the natural magnitude of those gradients, for tolerances).
    """
    M = len(zs)
    N = zs[0].shape[0]
    if pairs is None:
        pairs = list(itertools.combinations(range(M), 2))
    P = len(pairs)
    if weights is None:
        weights = [1.0] * P
    if ids is None:
        ids = torch.arange(N)
    if mask is None:
        mask = torch.ones(M, N, dtype=torch.bool)

    valid = [(mask[p] & mask[q]).sum().item() > 0 for p, q in pairs]
    W = sum(float(w) for w, ok in zip(weights, valid) if ok)

    numerator = zs[0].new_zeros(())
    pair_losses = []
    accuracy = torch.zeros(P, 2, dtype=F64)
    scales = {"bias": 0.0, "temperature": 0.0}
    for k, (p, q) in enumerate(pairs):
        t = _per_pair(temperature, k)
        b = _per_pair(bias, k)
        S, g = pair_logits(zs[p], zs[q], mask[p] & mask[q], ids, t, normalize)
        n = g.numel()
        if n == 0:
            pair_losses.append(zs[0].new_zeros(()))
            continue
        same = g[:, None] == g[None, :]
        Z = torch.where(same, 1.0, -1.0).to(F64)
        L = -log_sigmoid(Z * (S + b)).sum() / n
        pair_losses.append(L)
        with torch.no_grad():
            accuracy[k] = retrieval_accuracy(S, g)
            if W > 0:
                dS = torch.sigmoid(-Z * (S + b)) / n  # |dL_pq/dS_ij|
                tt = float(t)
                scales["bias"] += float(weights[k]) / W * dS.sum().item()
                scales["temperature"] += float(weights[k]) / W * (dS * S.abs()).sum().item() / tt
        numerator = numerator + float(weights[k]) * L
    if W == 0:
        loss = sum(z.sum() for z in zs) * 0.0
        for v in (temperature, bias):
            if isinstance(v, torch.Tensor):
                loss = loss + v.sum() * 0.0
    else:
        loss = numerator / W
    return loss, torch.stack([pl.detach() for pl in pair_losses]), accuracy, scales


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def call(*zs, backend="torch", **kwargs):
    """fastpair.pairwise_sigmoid with return_stats=True; on the triton backend, skips only when a RuntimeError
    says Triton is missing."""
    try:
        return fastpair.pairwise_sigmoid(*zs, backend=backend, return_stats=True, **kwargs)
    except RuntimeError as e:
        skip_if_triton_missing(e, backend)
        raise


def grad_or_zero(t):
    return torch.zeros_like(t) if t.grad is None else t.grad


def to64(v):
    if isinstance(v, torch.Tensor):
        v64 = v.detach().to(F64)
        return v64.requires_grad_(True) if v.requires_grad else v64
    return v


def check_stats(stats, ref_pl, ref_acc, P, dtype):
    pl, acc = stats["pair_losses"], stats["pair_accuracy"]
    assert pl.shape == (P,) and acc.shape == (P, 2)
    assert pl.dtype == torch.float32 and acc.dtype == torch.float32
    assert not pl.requires_grad and not acc.requires_grad
    # float32 statistics: compare with float32 rounding even for float64 inputs
    assert_near(pl, ref_pl, max(RTOL[dtype], 1e-6), "pair_losses")
    assert_near(acc, ref_acc, 1e-6, "pair_accuracy")


def run_and_compare(case, dtype, backend="torch", seed=0):
    M, N, D = case["M"], case["N"], case.get("D", 8)
    pairs = case.get("pairs")
    P = len(pairs) if pairs is not None else M * (M - 1) // 2
    normalize = case.get("normalize", True)
    if case.get("extreme"):
        zs = make_extreme_embeddings(M, N, D, dtype, seed)
    else:
        zs = make_embeddings(M, N, D, dtype, seed, scale=1.0 if normalize else 0.3)
    zs = [z.requires_grad_(True) for z in zs]
    ids = make_ids(case.get("ids"), N, seed)
    mask = make_mask(case.get("mask"), M, N, seed)
    weights = case.get("weights")
    t0, b0 = case.get("t", 0.1), case.get("b", -10.0)
    temperature = make_param(case.get("temp", "float"), t0, P, dtype, spread=2 * t0)
    bias = make_param(case.get("bias", "float"), b0, P, dtype, spread=6.0)

    loss, stats = call(*zs, temperature=temperature, bias=bias, weights=weights, mask=mask, normalize=normalize,
                       pairs=pairs, ids=ids, backend=backend)
    assert loss.dim() == 0
    assert loss.dtype == dtype, f"loss dtype {loss.dtype} for {dtype} inputs"
    assert loss.requires_grad
    loss.backward()

    zs64 = [z.detach().to(F64).requires_grad_(True) for z in zs]
    t64, b64 = to64(temperature), to64(bias)
    ref_loss, ref_pl, ref_acc, scales = reference(zs64, temperature=t64, bias=b64, weights=weights, mask=mask,
                                                  normalize=normalize, pairs=pairs, ids=ids)
    ref_loss.backward()

    rtol = RTOL[dtype]
    assert_near(loss, ref_loss, rtol, "loss", scale=abs(ref_loss.item()))
    ref_grads = [grad_or_zero(z) for z in zs64]
    gscale = max(gz.abs().max().item() for gz in ref_grads)
    for m, (z, gz) in enumerate(zip(zs, ref_grads)):
        got = grad_or_zero(z)
        assert got.dtype == dtype, f"grad dtype {got.dtype} for {dtype} inputs"
        assert_near(got, gz, rtol, f"dL/dz_{m}", scale=gscale)
        if mask is not None:
            missing = ~mask[m]
            assert (got[missing] == 0).all(), f"missing entries of modality {m} got a nonzero gradient"
    for name, v, v64 in (("temperature", temperature, t64), ("bias", bias, b64)):
        if isinstance(v, torch.Tensor) and v.requires_grad:
            got_g = grad_or_zero(v)
            assert got_g.shape == v.shape, f"dL/d{name} shape {tuple(got_g.shape)}"
            ref_g = grad_or_zero(v64)
            scale = max(ref_g.abs().max().item(), scales[name])
            assert_near(got_g, ref_g, rtol, f"dL/d{name}", scale=scale)
    check_stats(stats, ref_pl, ref_acc, P, dtype)
    return loss, stats


# ----------------------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------------------

CASES = [
    dict(name="m2_plain", M=2, N=16),
    dict(name="m2_defaults_ids_arange", M=2, N=12, ids="arange", temp="const", bias="const"),
    dict(name="m2_learn_t_b_0d", M=2, N=20, temp="0d", bias="0d"),
    dict(name="m2_groups_t0d_b1d", M=2, N=24, ids="groups", temp="0d", bias="1d", b=-5.0),
    dict(name="m2_reversed_mask_1d", M=2, N=20, D=6, pairs=[(1, 0)], ids="groups", mask="random", temp="1d",
         bias="1d", b=-3.0),
    dict(name="m3_default_0d", M=3, N=20, temp="0d", bias="0d"),
    dict(name="m3_sparse_ids_1d", M=3, N=30, ids="sparse", temp="1d", bias="1d", t=0.05, b=-8.0),
    dict(name="m3_reversed_mask_weights", M=3, N=24, pairs=[(1, 0), (2, 1), (2, 0)], ids="groups", mask="random",
         weights=[1.0, 0.0, 2.0], temp="1d", bias="1d", b=-6.0),
    dict(name="m3_one_pair_nonorm", M=3, N=18, pairs=[(2, 0)], ids="groups", normalize=False, temp="0d", bias="0d",
         b=-1.0),
    dict(name="m3_empty_pairs", M=3, N=16, ids="groups", mask="drop_last", weights=[1.0, 2.0, 3.0], temp="1d",
         bias="1d"),
    dict(name="m3_zero_total_weight", M=3, N=12, ids="groups", mask="drop_last", weights=[0.0, 1.0, 1.0],
         temp="0d", bias="1d"),
    dict(name="m3_all_missing", M=3, N=10, mask="all_missing", temp="1d", bias="0d"),
    dict(name="m3_one_valid_sample", M=3, N=14, ids="groups", mask="one_valid", temp="1d", bias="1d"),
    dict(name="m3_all_same_id", M=3, N=12, ids="same", temp="0d", bias="0d", b=2.0),
    dict(name="m3_ids_int32", M=3, N=14, ids="arange32", mask="random", temp="0d", bias="1d"),
    dict(name="m4_default_mask_weights", M=4, N=32, ids="groups", mask="random", weights=[1.0, 0.0, 0.5, 2.0, 1.0, 3.0],
         temp="1d", bias="1d", b=-4.0),
    dict(name="m4_anchor", M=4, N=28, pairs=[(0, 1), (0, 2), (0, 3)], ids="groups", mask="random",
         weights=[1.0, 0.0, 2.5], temp="1d", bias="1d", b=-7.0),
    dict(name="m4_custom_nonorm", M=4, N=24, pairs=[(3, 1), (0, 2), (2, 3), (1, 0)], ids="sparse", mask="random",
         weights=[0.5, 1.0, 2.0, 0.0], normalize=False, temp="1d", bias="1d", t=0.2, b=-2.0),
    dict(name="m4_single_pair_unused_modalities", M=4, N=20, pairs=[(2, 1)], ids="groups", temp="0d", bias="0d"),
    # extreme logits: t = 0.01, |b| = 50; z (S + b) reaches -150
    dict(name="m2_extreme_bneg50", M=2, N=16, extreme=True, temp="0d", bias="0d", t=0.01, b=-50.0),
    dict(name="m2_extreme_bpos50", M=2, N=16, extreme=True, temp="0d", bias="0d", t=0.01, b=50.0),
    dict(name="m3_extreme_bneg50_1d_groups_mask", M=3, N=20, extreme=True, ids="groups", mask="random", temp="float",
         bias="1d", t=0.01, b=-50.0),
    dict(name="m3_extreme_floats", M=3, N=16, extreme=True, temp="float", bias="float", t=0.01, b=50.0),
    dict(name="m4_extreme_custom", M=4, N=16, extreme=True, pairs=[(1, 0), (0, 3), (2, 1)],
         weights=[1.0, 2.0, 0.5], temp="1d", bias="0d", t=0.01, b=50.0),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_reference_torch(case, dtype):
    run_and_compare(case, dtype, backend="torch", seed=len(case["name"]))


TRITON_CASES = [
    dict(name="m2_groups_learn_t_b", M=2, N=24, ids="groups", temp="0d", bias="0d", b=-5.0),
    dict(name="m3_reversed_mask_weights_1d", M=3, N=20, pairs=[(1, 0), (2, 1), (2, 0)], ids="groups", mask="random",
         weights=[1.0, 0.0, 2.0], temp="1d", bias="1d", b=-6.0),
    dict(name="m3_empty_pairs", M=3, N=16, ids="sparse", mask="drop_last", weights=[1.0, 2.0, 3.0], temp="1d",
         bias="0d"),
    dict(name="m4_custom_nonorm", M=4, N=16, pairs=[(3, 1), (0, 2), (2, 3), (1, 0)], ids="groups", mask="random",
         weights=[0.5, 1.0, 2.0, 0.0], normalize=False, temp="1d", bias="1d", t=0.2, b=-2.0),
    dict(name="m2_extreme_bpos50", M=2, N=16, extreme=True, temp="0d", bias="0d", t=0.01, b=50.0),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c["name"] for c in TRITON_CASES])
def test_matches_reference_triton(case):
    run_and_compare(case, torch.float32, backend="triton", seed=7)


def test_triton_refuses_float64():
    """'float64 goes to the torch backend under "auto", and is a TypeError under an explicit "triton"'."""
    zs = make_embeddings(2, 8, 4, F64, seed=1)
    try:
        fastpair.pairwise_sigmoid(*zs, backend="triton")
    except TypeError:
        return
    except RuntimeError as e:
        skip_if_triton_missing(e, "triton")
        raise
    pytest.fail("float64 inputs with backend='triton' did not raise TypeError")


def test_auto_backend_on_cpu_matches_reference():
    zs = make_embeddings(3, 14, 8, torch.float32, seed=2)
    loss = fastpair.pairwise_sigmoid(*zs, temperature=0.1, bias=-10.0)
    ref = reference([z.to(F64) for z in zs])[0]
    assert_near(loss, ref, 1e-5, "loss", scale=abs(ref.item()))


def test_defaults_are_t_0p1_and_b_minus_10():
    zs = make_embeddings(3, 12, 8, F64, seed=4)
    loss = fastpair.pairwise_sigmoid(*zs, backend="torch")
    assert isinstance(loss, torch.Tensor) and loss.dim() == 0, "return_stats=False returns the loss alone"
    ref = reference(zs, temperature=0.1, bias=-10.0)[0]
    assert_near(loss, ref, 1e-9, "loss", scale=abs(ref.item()))


def test_any_strides():
    """'any strides': transposed and column-sliced views give the same loss and gradients."""
    M, N, D = 3, 14, 6
    zs = make_embeddings(M, N, D, F64, seed=6)
    bases = [z.T.contiguous().requires_grad_(True) for z in zs[:2]]  # (D, N): pass .T
    wide = torch.cat([zs[2], torch.randn(N, 3, dtype=F64)], dim=1).requires_grad_(True)  # pass [:, :D]
    views = [bases[0].T, bases[1].T, wide[:, :D]]
    assert not views[0].is_contiguous() and not views[2].is_contiguous()
    kw = dict(temperature=0.2, bias=-3.0, ids=make_ids("groups", N, 6))
    loss, _ = call(*views, **kw)
    loss.backward()
    zs64 = [z.clone().requires_grad_(True) for z in zs]
    ref = reference(zs64, **kw)[0]
    ref.backward()
    assert_near(loss, ref, 1e-9, "loss", scale=abs(ref.item()))
    assert_near(bases[0].grad.T, zs64[0].grad, 1e-9, "dL/dz_0")
    assert_near(bases[1].grad.T, zs64[1].grad, 1e-9, "dL/dz_1")
    assert_near(wide.grad[:, :D], zs64[2].grad, 1e-9, "dL/dz_2")
    assert (wide.grad[:, D:] == 0).all()


def test_bfloat16_inputs_give_float32_loss_and_bfloat16_grads():
    """'The loss is returned in float32 for 16-bit inputs; gradients come back in the input dtype.'"""
    zs = [z.requires_grad_(True) for z in make_embeddings(3, 16, 8, torch.bfloat16, seed=8)]
    loss, stats = call(*zs, temperature=0.1, bias=-5.0)
    assert loss.dtype == torch.float32
    loss.backward()
    assert all(z.grad is not None and z.grad.dtype == torch.bfloat16 for z in zs)
    zs64 = [z.detach().to(F64).requires_grad_(True) for z in zs]
    ref, ref_pl, _, _ = reference(zs64, temperature=0.1, bias=-5.0)
    ref.backward()
    assert_near(loss, ref, 5e-2, "loss (bf16)", scale=abs(ref.item()))
    gscale = max(z.grad.abs().max().item() for z in zs64)
    for m, (z, z64) in enumerate(zip(zs, zs64)):
        assert_near(z.grad, z64.grad, 1e-1, f"dL/dz_{m} (bf16)", scale=gscale)
    assert stats["pair_losses"].dtype == torch.float32
    assert_near(stats["pair_losses"], ref_pl, 5e-2, "pair_losses (bf16)")


# ----------------------------------------------------------------------------------------------------------
# M = 2 is SigLIP
# ----------------------------------------------------------------------------------------------------------


def siglip_loss(image_features, text_features, logit_scale, logit_bias):
    """SigLIP's loss as open_clip states it on one device: logits = scale * I T^T + bias, labels = 2 eye - 1,
    -sum(logsigmoid(labels * logits)) / N (features already normalized)."""
    N = image_features.shape[0]
    logits = logit_scale * image_features @ text_features.T + logit_bias
    labels = 2 * torch.eye(N, dtype=logits.dtype) - 1
    return -log_sigmoid(labels * logits).sum() / N


@pytest.mark.parametrize("normalize", [True, False], ids=["normalize", "raw"])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("t,b", [(0.1, -10.0), (0.05, -3.0), (0.01, 50.0)])
def test_two_modalities_equal_siglip(t, b, dtype, normalize):
    N = 20
    a, c = make_embeddings(2, N, 8, dtype, seed=13, scale=1.0 if normalize else 0.4)
    a.requires_grad_(True)
    c.requires_grad_(True)
    tt = torch.tensor(t, dtype=dtype, requires_grad=True)
    bb = torch.tensor(b, dtype=dtype, requires_grad=True)
    loss, _ = call(a, c, temperature=tt, bias=bb, normalize=normalize)
    loss.backward()

    a64 = a.detach().to(F64).requires_grad_(True)
    c64 = c.detach().to(F64).requires_grad_(True)
    t64 = torch.tensor(t, dtype=F64, requires_grad=True)
    b64 = torch.tensor(b, dtype=F64, requires_grad=True)
    fa, fc = (a64 / a64.norm(dim=1, keepdim=True), c64 / c64.norm(dim=1, keepdim=True)) if normalize else (a64, c64)
    expected = siglip_loss(fa, fc, 1.0 / t64, b64)
    expected.backward()
    ref, _, _, scales = reference([a64.detach(), c64.detach()], temperature=t, bias=b, normalize=normalize)
    assert_near(ref, expected, 1e-12, "this file's reference vs SigLIP's formula", scale=abs(expected.item()))
    rtol = RTOL[dtype]
    assert_near(loss, expected, rtol, "loss", scale=abs(expected.item()))
    gscale = max(a64.grad.abs().max().item(), c64.grad.abs().max().item())
    assert_near(a.grad, a64.grad, rtol, "dL/da", scale=gscale)
    assert_near(c.grad, c64.grad, rtol, "dL/dc", scale=gscale)
    assert_near(bb.grad, b64.grad, rtol, "dL/db", scale=max(abs(b64.grad.item()), scales["bias"]))
    assert_near(tt.grad, t64.grad, rtol, "dL/dt", scale=max(abs(t64.grad.item()), scales["temperature"]))


@pytest.mark.parametrize("t,b", [(0.1, -10.0), (0.02, 5.0)])
def test_two_modalities_equal_open_clip_siglip(t, b):
    peer = open_clip_loss()  # the installed open_clip's loss module (skips where it is not installed)
    N = 18
    a, c = make_embeddings(2, N, 8, torch.float32, seed=17)
    a.requires_grad_(True)
    c.requires_grad_(True)
    loss, _ = call(a, c, temperature=t, bias=b)
    loss.backward()

    a2 = a.detach().clone().requires_grad_(True)
    c2 = c.detach().clone().requires_grad_(True)
    fa = a2 / a2.norm(dim=1, keepdim=True)
    fc = c2 / c2.norm(dim=1, keepdim=True)
    expected = peer.SigLipLoss()(fa, fc, logit_scale=torch.tensor(1.0 / t), logit_bias=torch.tensor(b))
    if isinstance(expected, dict):
        expected = sum(expected.values())
    expected.backward()
    assert_near(loss, expected, 1e-5, "loss vs open_clip", scale=abs(expected.item()))
    gscale = max(a2.grad.abs().max().item(), c2.grad.abs().max().item())
    assert_near(a.grad, a2.grad, 1e-5, "dL/da vs open_clip", scale=gscale)
    assert_near(c.grad, c2.grad, 1e-5, "dL/dc vs open_clip", scale=gscale)


# ----------------------------------------------------------------------------------------------------------
# Identities and statistics
# ----------------------------------------------------------------------------------------------------------


def _run(zs, **kwargs):
    zs = [z.detach().clone().requires_grad_(True) for z in zs]
    loss, stats = call(*zs, **kwargs)
    loss.backward()
    return loss.detach(), [grad_or_zero(z) for z in zs], stats


def test_accuracy_hit_is_by_id_not_by_position():
    """A hit when the argmax shares the row's id: row 0's argmax is sample 1, which shares its id."""
    e = torch.eye(4, dtype=F64)
    x = e.clone()
    y = e[[1, 0, 3, 2]].clone()
    ids = torch.tensor([5, 5, 1, 2])
    _, stats = call(x, y, ids=ids)
    assert torch.equal(stats["pair_accuracy"], torch.tensor([[0.5, 0.5]], dtype=torch.float32))
    _, stats = call(x, y)
    assert torch.equal(stats["pair_accuracy"], torch.tensor([[0.0, 0.0]], dtype=torch.float32))
    # the retrieval directions differ: x -> y (rows) first, then y -> x (columns)
    y2 = torch.tensor([[1.0, 0.0, 0.0], [0.9, 0.1, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    x2 = torch.tensor([[1.0, 0.0, 0.0], [1.0, 0.05, 0.0], [0.0, 0.0, 1.0]], dtype=F64)
    # rows (x -> y): x_0 -> y_0 hit, x_1 -> y_0 miss, x_2 -> y_2 hit; columns (y -> x): all three hit
    ref = reference([x2, y2])[2]
    assert ref[0, 0] != ref[0, 1], "precondition: the two directions differ on this input"
    _, s_fwd = call(x2, y2, pairs=[(0, 1)])
    _, s_rev = call(x2, y2, pairs=[(1, 0)])
    assert_near(s_fwd["pair_accuracy"], ref, 1e-7, "accuracy (0, 1)")
    assert_near(s_rev["pair_accuracy"], ref[:, [1, 0]], 1e-7, "accuracy (1, 0): (p, q) makes p the x side")


def test_pair_without_valid_samples_reports_zero():
    M, N = 3, 10
    zs = make_embeddings(M, N, 4, torch.float32, seed=19)
    mask = make_mask("drop_last", M, N, 19)
    _, stats = call(*zs, mask=mask)
    assert torch.equal(stats["pair_losses"][1:], torch.zeros(2))
    assert torch.equal(stats["pair_accuracy"][1:], torch.zeros(2, 2))
    assert stats["pair_losses"][0] > 0


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_reversing_pairs_keeps_loss_and_swaps_accuracy(dtype):
    M, N = 3, 20
    zs = make_embeddings(M, N, 8, dtype, seed=21)
    ids = make_ids("groups", N, seed=21)
    mask = make_mask("random", M, N, seed=21)
    pairs = [(0, 1), (0, 2), (1, 2)]
    kw = dict(temperature=torch.tensor([0.1, 0.2, 0.05], dtype=dtype), bias=torch.tensor([-10.0, -2.0, 1.0],
              dtype=dtype), weights=[1.0, 2.0, 0.5], mask=mask, ids=ids)
    l0, g0, s0 = _run(zs, pairs=pairs, **kw)
    l1, g1, s1 = _run(zs, pairs=[(q, p) for p, q in pairs], **kw)
    l2, g2, s2 = _run(zs, pairs=None, **kw)  # the default is combinations(range(M), 2)
    rtol = RTOL[dtype]
    assert_near(l1, l0, rtol, "loss (reversed)")
    assert_near(l2, l0, rtol, "loss (default pairs)")
    gscale = max(g.abs().max().item() for g in g0)
    for a, b, c in zip(g0, g1, g2):
        assert_near(b, a, rtol, "grad (reversed)", scale=gscale)
        assert_near(c, a, rtol, "grad (default pairs)", scale=gscale)
    assert_near(s1["pair_losses"], s0["pair_losses"], 1e-6, "pair_losses")
    assert_near(s1["pair_accuracy"], s0["pair_accuracy"][:, [1, 0]], 1e-7, "pair_accuracy (reversed)")
    assert_near(s2["pair_accuracy"], s0["pair_accuracy"], 1e-7, "pair_accuracy (default pairs)")


def test_pair_order_is_followed_by_per_pair_arguments_and_stats():
    M, N = 4, 18
    zs = make_embeddings(M, N, 8, F64, seed=31)
    ids = make_ids("groups", N, seed=31)
    pairs = [(0, 1), (2, 3), (1, 3)]
    temps = [0.05, 0.1, 0.4]
    biases = [-8.0, -1.0, 3.0]
    weights = [1.0, 2.0, 3.0]
    perm = [2, 0, 1]
    l0, _, s0 = _run(zs, pairs=pairs, temperature=torch.tensor(temps, dtype=F64), bias=torch.tensor(biases, dtype=F64),
                     weights=weights, ids=ids)
    l1, _, s1 = _run(zs, pairs=[pairs[k] for k in perm], temperature=torch.tensor([temps[k] for k in perm], dtype=F64),
                     bias=torch.tensor([biases[k] for k in perm], dtype=F64), weights=[weights[k] for k in perm],
                     ids=ids)
    assert_near(l1, l0, 1e-9, "loss")
    assert_near(s1["pair_losses"], s0["pair_losses"][perm], 1e-6, "pair_losses")
    assert_near(s1["pair_accuracy"], s0["pair_accuracy"][perm], 1e-7, "pair_accuracy")


def test_ids_arange_equals_plain_call():
    M, N = 3, 16
    zs = make_embeddings(M, N, 8, F64, seed=11)
    mask = make_mask("random", M, N, seed=11)
    kw = dict(temperature=0.1, bias=-4.0, mask=mask, pairs=[(2, 0), (0, 1), (1, 2)])
    l0, g0, s0 = _run(zs, **kw)
    for ids in (torch.arange(N), torch.arange(N, dtype=torch.int32)):
        l1, g1, s1 = _run(zs, ids=ids, **kw)
        assert_near(l1, l0, 1e-9, "loss")
        for a, b in zip(g1, g0):
            assert_near(a, b, 1e-9, "grad")
        assert_near(s1["pair_losses"], s0["pair_losses"], 1e-6, "pair_losses")
        assert_near(s1["pair_accuracy"], s0["pair_accuracy"], 1e-7, "pair_accuracy")


def test_relabelling_ids_injectively_leaves_loss_unchanged():
    M, N = 3, 18
    zs = make_embeddings(M, N, 8, F64, seed=9)
    ids = make_ids("groups", N, seed=9)
    mask = make_mask("random", M, N, seed=9)
    kw = dict(temperature=0.1, bias=-5.0, mask=mask, pairs=[(1, 0), (1, 2)], weights=[1.0, 3.0])
    l0, g0, s0 = _run(zs, ids=ids, **kw)
    for new_ids in (ids * 7919 + 13, -3 * ids - 5, ids * 1_000_003 + 2**40, (ids * 101 + 7).to(torch.int32)):
        l1, g1, s1 = _run(zs, ids=new_ids, **kw)
        assert_near(l1, l0, 1e-9, "loss")
        for a, b in zip(g1, g0):
            assert_near(a, b, 1e-9, "grad")
        assert_near(s1["pair_accuracy"], s0["pair_accuracy"], 1e-7, "pair_accuracy")
    ref = reference(zs, ids=ids, **kw)[0]
    assert_near(l0, ref, 1e-9, "loss vs reference", scale=abs(ref.item()))


def test_extreme_logits_are_finite_and_exact_in_float32():
    """'numerically safe log-sigmoid for any logit': a positive with cosine -1 at t = 0.01, b = -50 has
    z (S + b) = -150, whose log-sigmoid is -150 (a naive log(sigmoid) gives -inf in float32)."""
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]])
    y = torch.tensor([[-1.0, 0.0], [0.0, 1.0]])
    x.requires_grad_(True)
    loss, stats = call(x, y, temperature=0.01, bias=-50.0)
    # pairs (i, j): (0,0) positive S=-100 -> 150; (1,1) positive S=100 -> log(1+e^-50); off-diagonal S=0,
    # negatives -> -log sigmoid(50) = log(1+e^-50)
    expected = (150.0 + 3 * math.log1p(math.exp(-50.0))) / 2
    assert torch.isfinite(loss)
    assert abs(loss.item() - expected) <= 1e-5 * expected
    loss.backward()
    assert torch.isfinite(x.grad).all()


# ----------------------------------------------------------------------------------------------------------
# PairwiseSigmoid
# ----------------------------------------------------------------------------------------------------------


def _trainable(module):
    return [p for p in module.parameters() if p.requires_grad]


def _split_params(module, t_init, b_init):
    """The learnable bias holds b_init; the learnable temperature is a log-temperature (log t, or SigLIP's
    log(1/t)). Returns (temperature_param, sign, bias_param) with t = exp(sign * param)."""
    t_param = b_param = None
    sign = 0
    for p in _trainable(module):
        v = p.detach().to(F64)
        if torch.allclose(v, torch.full_like(v, b_init)):
            b_param = p
        elif torch.allclose(v, torch.full_like(v, math.log(t_init)), rtol=1e-6, atol=1e-6):
            t_param, sign = p, 1
        elif torch.allclose(v, torch.full_like(v, -math.log(t_init)), rtol=1e-6, atol=1e-6):
            t_param, sign = p, -1
    return t_param, sign, b_param


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared", "per_pair"])
def test_module_parameters_and_siglip_initialization(per_pair):
    pairs = [(0, 2), (1, 2)]
    P = len(pairs)
    module = fastpair.PairwiseSigmoid(3, per_pair=per_pair, pairs=pairs)
    params = _trainable(module)
    assert len(params) == 2, "a learnable temperature and a learnable bias"
    t_param, sign, b_param = _split_params(module, 0.1, -10.0)
    assert b_param is not None, "SigLIP's initialization: b = -10"
    assert t_param is not None, "SigLIP's initialization: 1/t = 10, held as a log-temperature"
    numel = P if per_pair else 1
    assert t_param.numel() == numel and b_param.numel() == numel
    # without pairs, per_pair means one entry per combinations(range(M), 2)
    module4 = fastpair.PairwiseSigmoid(4, per_pair=per_pair)
    assert sorted(p.numel() for p in _trainable(module4)) == [6 if per_pair else 1] * 2


@pytest.mark.parametrize("learn_t,learn_b", [(False, True), (True, False), (False, False)])
def test_module_learn_flags(learn_t, learn_b):
    M, N = 3, 12
    module = fastpair.PairwiseSigmoid(M, temperature=0.2, bias=-5.0, learn_temperature=learn_t, learn_bias=learn_b,
                                      backend="torch")
    assert len(_trainable(module)) == int(learn_t) + int(learn_b)
    t_param, _, b_param = _split_params(module, 0.2, -5.0)
    assert (t_param is not None) == learn_t and (b_param is not None) == learn_b
    zs = make_embeddings(M, N, 8, torch.float32, seed=23)
    loss = module(*zs)
    ref = reference([z.to(F64) for z in zs], temperature=0.2, bias=-5.0)[0]
    assert_near(loss, ref, 1e-5, "loss", scale=abs(ref.item()))
    # what is not learned is held as a buffer (moves with the module, saved in its state_dict)
    fixed = int(not learn_t) + int(not learn_b)
    assert sum(v.numel() for v in module.buffers()) >= fixed, "fixed temperature/bias are buffers"
    assert len(module.state_dict()) >= 2, "temperature and bias are both in the state_dict"


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared", "per_pair"])
def test_module_matches_reference(per_pair):
    M, N, t, b = 3, 24, 0.2, -5.0
    pairs = [(2, 0), (1, 2)]
    weights = [1.0, 2.0]
    module = fastpair.PairwiseSigmoid(M, temperature=t, bias=b, per_pair=per_pair, pairs=pairs, weights=weights,
                                      backend="torch")
    t_param, sign, b_param = _split_params(module, t, b)
    assert t_param is not None and b_param is not None
    zs = [z.requires_grad_(True) for z in make_embeddings(M, N, 8, torch.float32, seed=41)]
    ids = make_ids("groups", N, seed=41)
    mask = make_mask("random", M, N, seed=41)
    loss, stats = module(*zs, mask=mask, ids=ids, return_stats=True)
    loss.backward()

    zs64 = [z.detach().to(F64).requires_grad_(True) for z in zs]
    shape = (len(pairs),) if per_pair else ()
    t64 = torch.full(shape, t, dtype=F64, requires_grad=True)
    b64 = torch.full(shape, b, dtype=F64, requires_grad=True)
    ref_loss, ref_pl, ref_acc, scales = reference(zs64, temperature=t64, bias=b64, mask=mask, pairs=pairs, ids=ids,
                                                  weights=weights)
    ref_loss.backward()
    rtol = RTOL[torch.float32]
    assert_near(loss, ref_loss, rtol, "loss", scale=abs(ref_loss.item()))
    gscale = max(z.grad.abs().max().item() for z in zs64)
    for m, (z, z64) in enumerate(zip(zs, zs64)):
        assert_near(z.grad, z64.grad, rtol, f"dL/dz_{m}", scale=gscale)
    check_stats(stats, ref_pl, ref_acc, len(pairs), torch.float32)
    assert_near(b_param.grad, b64.grad.reshape(b_param.shape), rtol, "dL/dbias", scale=max(scales["bias"], 1.0))
    # t = exp(sign * param): dL/dparam = sign * t * dL/dt
    expected = (sign * t * t64.grad).reshape(t_param.shape)
    assert_near(t_param.grad, expected, rtol, "dL/dlog_t", scale=max(t * scales["temperature"], 1.0))


def test_module_equals_function():
    M, N = 4, 20
    pairs = [(0, 1), (0, 2), (3, 0)]
    module = fastpair.PairwiseSigmoid(M, temperature=0.05, bias=-3.0, pairs=pairs, weights=[1.0, 0.0, 2.0],
                                      normalize=False)
    zs = [z.requires_grad_(True) for z in make_embeddings(M, N, 8, torch.float32, seed=43, scale=0.3)]
    ids = make_ids("sparse", N, seed=43)
    mask = make_mask("random", M, N, seed=43)
    loss, stats = module(*zs, mask=mask, ids=ids, return_stats=True)
    loss.backward()
    zs2 = [z.detach().clone().requires_grad_(True) for z in zs]
    expected, stats2 = call(*zs2, temperature=0.05, bias=-3.0, pairs=pairs, weights=[1.0, 0.0, 2.0], normalize=False,
                            mask=mask, ids=ids)
    expected.backward()
    assert_near(loss, expected, 1e-6, "loss")
    for m, (z, z2) in enumerate(zip(zs, zs2)):
        assert_near(grad_or_zero(z), grad_or_zero(z2), 1e-6, f"dL/dz_{m}")
    assert_near(stats["pair_losses"], stats2["pair_losses"], 1e-6, "pair_losses")
    assert_near(stats["pair_accuracy"], stats2["pair_accuracy"], 1e-7, "pair_accuracy")
    ref = reference([z.detach().to(F64) for z in zs], temperature=0.05, bias=-3.0, pairs=pairs,
                    weights=[1.0, 0.0, 2.0], normalize=False, mask=mask, ids=ids)[0]
    assert_near(loss, ref, 1e-5, "loss vs reference", scale=abs(ref.item()))
    assert not isinstance(module(*zs, mask=mask, ids=ids), tuple), "return_stats defaults to False"


@pytest.mark.parametrize("t_init,max_scale,t_eff", [(0.002, 100.0, 0.01), (0.05, 10.0, 0.1), (0.2, 10.0, 0.2)])
def test_module_clamps_logit_scale(t_init, max_scale, t_eff):
    """'clamped so 1/t <= max_logit_scale, as CLIP does'."""
    M, N = 2, 16
    module = fastpair.PairwiseSigmoid(M, temperature=t_init, bias=-10.0, max_logit_scale=max_scale)
    zs = make_embeddings(M, N, 8, torch.float32, seed=47)
    loss = module(*zs)
    ref = reference([z.to(F64) for z in zs], temperature=t_eff, bias=-10.0)[0]
    assert_near(loss, ref, 1e-5, "loss", scale=abs(ref.item()))


def test_module_clamps_each_pair():
    M, N = 3, 16
    module = fastpair.PairwiseSigmoid(M, temperature=0.1, bias=-4.0, per_pair=True, max_logit_scale=50.0)
    t_param, sign, b_param = _split_params(module, 0.1, -4.0)
    assert t_param is not None and t_param.numel() == 3
    wanted = torch.tensor([0.005, 0.05, 0.5], dtype=F64)  # 1/t = 200 (clamped to 50), 20, 2
    with torch.no_grad():
        t_param.copy_((sign * wanted.log()).reshape(t_param.shape).to(t_param.dtype))
    zs = make_embeddings(M, N, 8, torch.float32, seed=53)
    loss, stats = module(*zs, return_stats=True)
    t_eff = torch.tensor([0.02, 0.05, 0.5], dtype=F64)
    ref, ref_pl, _, _ = reference([z.to(F64) for z in zs], temperature=t_eff, bias=-4.0)
    assert_near(loss, ref, 1e-5, "loss", scale=abs(ref.item()))
    assert_near(stats["pair_losses"], ref_pl, 1e-5, "pair_losses")


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------

ERRORS = (ValueError, TypeError)


def _base(M=3, N=10, D=4, dtype=torch.float32):
    return make_embeddings(M, N, D, dtype, seed=50)


def _raises(match=None, **kwargs):
    zs = kwargs.pop("zs", None)
    zs = _base() if zs is None else zs
    kwargs.setdefault("backend", "torch")
    with pytest.raises(ERRORS, match=match) as info:
        fastpair.pairwise_sigmoid(*zs, **kwargs)
    assert str(info.value), "the message says what was expected"


BAD_EMBEDDINGS = {
    "none": lambda: [],
    "one_modality": lambda: _base(M=1),
    "n_mismatch": lambda: [_base()[0], _base()[1], _base(N=9)[2]],
    "d_mismatch": lambda: [_base()[0], _base(D=5)[1], _base()[2]],
    "dtype_mismatch": lambda: [_base()[0], _base(dtype=F64)[1], _base()[2]],
    "device_mismatch": lambda: [_base()[0], _base()[1], torch.empty(10, 4, device="meta")],
    "one_d": lambda: [z.reshape(-1) for z in _base()],
    "three_d": lambda: [z.reshape(10, 2, 2) for z in _base()],
    "empty_batch": lambda: _base(N=0),
    "integer": lambda: [torch.ones(10, 4, dtype=torch.int64) for _ in range(3)],
}


@pytest.mark.parametrize("kind", list(BAD_EMBEDDINGS), ids=list(BAD_EMBEDDINGS))
def test_bad_embeddings_raise(kind):
    _raises(zs=BAD_EMBEDDINGS[kind]())


BAD_TEMPERATURE = {
    "zero": 0.0,
    "negative": -0.1,
    "nan": math.nan,
    "inf": math.inf,
    "tensor_zero": torch.tensor(0.0),
    "tensor_nan": torch.tensor(math.nan),
    "tensor_1d_negative_entry": torch.tensor([0.1, -0.1, 0.1]),
    "tensor_1d_inf_entry": torch.tensor([0.1, math.inf, 0.1]),
    "wrong_length_2": torch.tensor([0.1, 0.1]),
    "wrong_length_4": torch.tensor([0.1, 0.1, 0.1, 0.1]),
    "wrong_length_1": torch.tensor([0.1]),
    "two_d": torch.full((3, 1), 0.1),
}


@pytest.mark.parametrize("temperature", list(BAD_TEMPERATURE.values()), ids=list(BAD_TEMPERATURE))
def test_bad_temperature_raises(temperature):
    _raises(match="temperature", temperature=temperature)


BAD_BIAS = {
    "nan": math.nan,
    "inf": math.inf,
    "minus_inf": -math.inf,
    "tensor_nan": torch.tensor(math.nan),
    "tensor_inf_requires_grad": torch.tensor(math.inf, requires_grad=True),
    "tensor_1d_nan_entry": torch.tensor([-10.0, math.nan, -10.0]),
    "tensor_1d_inf_entry": torch.tensor([-10.0, -10.0, -math.inf]),
    "wrong_length_2": torch.tensor([-10.0, -10.0]),
    "wrong_length_4": torch.full((4,), -10.0),
    "wrong_length_1": torch.tensor([-10.0]),
    "two_d": torch.full((3, 1), -10.0),
}


@pytest.mark.parametrize("bias", list(BAD_BIAS.values()), ids=list(BAD_BIAS))
def test_bad_bias_raises(bias):
    _raises(match="bias", bias=bias)


def test_per_pair_arguments_follow_custom_pairs_length():
    pairs = [(0, 1), (0, 2)]
    _raises(match="bias", bias=torch.full((3,), -10.0), pairs=pairs)
    _raises(match="temperature", temperature=torch.full((3,), 0.1), pairs=pairs)
    _raises(match="weight", weights=[1.0, 1.0, 1.0], pairs=pairs)
    loss = fastpair.pairwise_sigmoid(*_base(), bias=torch.full((2,), -10.0), temperature=torch.full((2,), 0.1),
                                     weights=[1.0, 2.0], pairs=pairs, backend="torch")
    assert torch.isfinite(loss)


BAD_WEIGHTS = {
    "negative": [1.0, -1.0, 1.0],
    "all_zero": [0.0, 0.0, 0.0],
    "too_short": [1.0, 1.0],
    "too_long": [1.0, 1.0, 1.0, 1.0],
}


@pytest.mark.parametrize("weights", list(BAD_WEIGHTS.values()), ids=list(BAD_WEIGHTS))
def test_bad_weights_raise(weights):
    _raises(match="weight", weights=weights)


BAD_MASK = {
    "too_many_samples": torch.ones(3, 11, dtype=torch.bool),
    "too_few_modalities": torch.ones(2, 10, dtype=torch.bool),
    "one_d": torch.ones(10, dtype=torch.bool),
    "three_d": torch.ones(3, 10, 1, dtype=torch.bool),
    "transposed": torch.ones(10, 3, dtype=torch.bool),
}


@pytest.mark.parametrize("mask", list(BAD_MASK.values()), ids=list(BAD_MASK))
def test_bad_mask_raises(mask):
    _raises(match="mask", mask=mask)


@pytest.mark.parametrize("pairs", list(BAD_PAIRS.values()), ids=list(BAD_PAIRS))
def test_bad_pairs_raise(pairs):
    _raises(match="pair", pairs=pairs)


BAD_IDS = {
    "too_long": torch.arange(N_BAD + 1),
    "too_short": torch.arange(N_BAD - 1),
    "column": torch.arange(N_BAD).reshape(N_BAD, 1),
    "scalar": torch.tensor(3),
    "float32": torch.arange(N_BAD, dtype=torch.float32),
    "float64": torch.arange(N_BAD, dtype=torch.float64),
    "bool": torch.ones(N_BAD, dtype=torch.bool),
    "int16": torch.arange(N_BAD, dtype=torch.int16),
    "wrong_device": torch.arange(N_BAD, device="meta"),
}


@pytest.mark.parametrize("ids", list(BAD_IDS.values()), ids=list(BAD_IDS))
def test_bad_ids_raise(ids):
    _raises(match="ids", ids=ids)


@pytest.mark.parametrize("backend", ["foo", "cuda", "", "Torch"])
def test_unknown_backend_raises(backend):
    _raises(match="backend", backend=backend)


def test_bad_input_raises_in_module():
    zs = _base()
    for pairs in (BAD_PAIRS["p_equals_q"], BAD_PAIRS["twice_reversed"], BAD_PAIRS["empty"]):
        with pytest.raises(ERRORS, match="pair"):
            fastpair.PairwiseSigmoid(3, pairs=pairs, backend="torch")(*zs)
    with pytest.raises(ERRORS, match="bias"):
        fastpair.PairwiseSigmoid(3, bias=math.nan, backend="torch")(*zs)
    with pytest.raises(ERRORS, match="temperature"):
        fastpair.PairwiseSigmoid(3, temperature=0.0, backend="torch")(*zs)
    with pytest.raises(ERRORS, match="temperature"):
        fastpair.PairwiseSigmoid(3, temperature=-1.0, backend="torch")(*zs)
    with pytest.raises(ERRORS, match="weight"):
        fastpair.PairwiseSigmoid(3, weights=[1.0, -1.0, 1.0], backend="torch")(*zs)
    with pytest.raises(ERRORS, match="ids"):
        fastpair.PairwiseSigmoid(3, backend="torch")(*zs, ids=BAD_IDS["float32"])
    with pytest.raises(ERRORS, match="mask"):
        fastpair.PairwiseSigmoid(3, backend="torch")(*zs, mask=BAD_MASK["too_many_samples"])
    with pytest.raises(ERRORS, match="backend"):
        fastpair.PairwiseSigmoid(3, backend="foo")(*zs)
