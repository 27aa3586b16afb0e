"""Independent spec tests for the InfoNCE loss family (DESIGN.md: "The loss", "The loss family", "Public API").

Everything here is derived from the specification alone: a float64 materialized reference of the family
(logits S over the valid set V, row and column terms with positives P(i) by ids and label smoothing eps,
L_pq, the weighted mean over pairs with n > 0), compared against `fastpair.pairwise_nce` and
`fastpair.PairwiseNCE` on the torch backend (and a small subset on the triton backend, which runs in Triton's
interpreter on CPU tensors), plus input validation and the identities the family must satisfy.
The sigmoid objective is not tested here.
"""

from __future__ import annotations

import importlib.util
import itertools
import math

import pytest
import torch
import torch.nn.functional as F
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


def make_temperature(kind, num_pairs, dtype):
    if kind == "float":
        return 0.1
    if kind == "0d":
        return torch.tensor(0.07, dtype=dtype, requires_grad=True)
    if kind == "1d":
        vals = torch.linspace(0.05, 0.3, num_pairs, dtype=F64)
        return vals.to(dtype).requires_grad_(True)
    raise AssertionError(kind)


# ----------------------------------------------------------------------------------------------------------
# The float64 materialized reference, straight from the spec's formulas
# ----------------------------------------------------------------------------------------------------------


def reference(zs, temperature=0.07, weights=None, mask=None, normalize=True, pairs=None, ids=None,
              label_smoothing=0.0):
    """zs: float64 tensors (N, D); temperature: float or float64 tensor (0-d or one entry per pair).

    Returns (loss, pair_losses (P,), pair_accuracy (P, 2)); loss is differentiable w.r.t. zs and temperature.
    """
    M = len(zs)
    N = zs[0].shape[0]
    eps = float(label_smoothing)
    if pairs is None:
        pairs = list(itertools.combinations(range(M), 2))
    P = len(pairs)
    if weights is None:
        weights = [1.0] * P
    if ids is None:
        ids = torch.arange(N)
    if mask is None:
        mask = torch.ones(M, N, dtype=torch.bool)

    numerator = zs[0].new_zeros(())
    denominator = 0.0
    pair_losses = []
    accuracy = torch.zeros(P, 2, dtype=F64)
    for k, (p, q) in enumerate(pairs):
        if isinstance(temperature, torch.Tensor):
            t = temperature if temperature.dim() == 0 else temperature[k]
        else:
            t = float(temperature)
        S, g = pair_logits(zs[p], zs[q], mask[p] & mask[q], ids, t, normalize)
        n = g.numel()
        if n == 0:
            pair_losses.append(zs[0].new_zeros(()))
            continue
        total = S.new_zeros(())
        for i in range(n):
            positives = g == g[i]  # P(i) = {j in V : ids[j] == ids[i]}, holds i
            row = S[i, :]
            col = S[:, i]
            row_term = torch.logsumexp(row, 0) - (1 - eps) * row[positives].mean() - eps * row.mean()
            col_term = torch.logsumexp(col, 0) - (1 - eps) * col[positives].mean() - eps * col.mean()
            total = total + row_term + col_term
        L = total / (2 * n)
        pair_losses.append(L)
        with torch.no_grad():
            accuracy[k] = retrieval_accuracy(S, g)
        numerator = numerator + float(weights[k]) * L
        denominator += float(weights[k])
    if denominator == 0:
        loss = sum(z.sum() for z in zs) * 0.0
        if isinstance(temperature, torch.Tensor):
            loss = loss + temperature.sum() * 0.0
    else:
        loss = numerator / denominator
    return loss, torch.stack([pl.detach() for pl in pair_losses]), accuracy


# ----------------------------------------------------------------------------------------------------------
# Helpers
# ----------------------------------------------------------------------------------------------------------


def triton_available():
    return importlib.util.find_spec("triton") is not None


def call(*zs, backend="torch", **kwargs):
    """fastpair.pairwise_nce with return_stats=True; skips on the triton backend when Triton is missing."""
    if backend == "triton" and not triton_available():
        pytest.skip("Triton is not installed")
    try:
        return fastpair.pairwise_nce(*zs, backend=backend, return_stats=True, **kwargs)
    except RuntimeError as e:
        skip_if_triton_missing(e, backend)
        raise


def grad_or_zero(t, like):
    return torch.zeros_like(like) if t.grad is None else t.grad


def run_and_compare(case, dtype, backend="torch", seed=0):
    M, N, D = case["M"], case["N"], case.get("D", 8)
    pairs = case.get("pairs")
    P = len(pairs) if pairs is not None else M * (M - 1) // 2
    normalize = case.get("normalize", True)
    zs = make_embeddings(M, N, D, dtype, seed, scale=1.0 if normalize else 0.3)
    zs = [z.requires_grad_(True) for z in zs]
    ids = make_ids(case.get("ids"), N, seed)
    mask = make_mask(case.get("mask"), M, N, seed)
    weights = case.get("weights")
    eps = case.get("eps", 0.0)
    temperature = make_temperature(case.get("temp", "float"), P, dtype)

    loss, stats = call(*zs, temperature=temperature, weights=weights, mask=mask, normalize=normalize,
                       pairs=pairs, ids=ids, label_smoothing=eps, backend=backend)
    assert loss.dim() == 0
    assert loss.dtype == dtype, f"loss dtype {loss.dtype} for {dtype} inputs"
    assert loss.requires_grad
    loss.backward()

    zs64 = [z.detach().to(F64).requires_grad_(True) for z in zs]
    t64 = temperature.detach().to(F64).requires_grad_(True) if isinstance(temperature, torch.Tensor) else temperature
    ref_loss, ref_pl, ref_acc = reference(zs64, temperature=t64, weights=weights, mask=mask, normalize=normalize,
                                          pairs=pairs, ids=ids, label_smoothing=eps)
    ref_loss.backward()

    rtol = RTOL[dtype]
    assert_near(loss, ref_loss, rtol, "loss", scale=abs(ref_loss.item()))
    ref_grads = [grad_or_zero(z, z) for z in zs64]
    gscale = max(gz.abs().max().item() for gz in ref_grads)
    for m, (z, gz) in enumerate(zip(zs, ref_grads)):
        got = grad_or_zero(z, z)
        assert got.dtype == dtype, f"grad dtype {got.dtype} for {dtype} inputs"
        assert_near(got, gz, rtol, f"dL/dz_{m}", scale=gscale)
        if mask is not None:
            missing = ~mask[m]
            assert (got[missing] == 0).all(), f"missing entries of modality {m} got a nonzero gradient"
    if isinstance(temperature, torch.Tensor):
        ref_tg = grad_or_zero(t64, t64)
        got_tg = grad_or_zero(temperature, temperature)
        assert got_tg.shape == temperature.shape
        tmin = t64.detach().min().item()
        tscale = max(ref_tg.abs().max().item(), abs(ref_loss.item()) / tmin)
        assert_near(got_tg, ref_tg, rtol, "dL/dtemperature", scale=tscale)

    check_stats(stats, ref_pl, ref_acc, P, dtype)


def check_stats(stats, ref_pl, ref_acc, P, dtype):
    pl, acc = stats["pair_losses"], stats["pair_accuracy"]
    assert pl.shape == (P,) and acc.shape == (P, 2)
    assert pl.dtype == torch.float32 and acc.dtype == torch.float32
    assert not pl.requires_grad and not acc.requires_grad
    # float32 statistics: compare with float32 rounding even for float64 inputs
    rtol = max(RTOL[dtype], 1e-6)
    assert_near(pl, ref_pl, rtol, "pair_losses")
    assert_near(acc, ref_acc, 1e-6, "pair_accuracy")


# ----------------------------------------------------------------------------------------------------------
# Against the reference
# ----------------------------------------------------------------------------------------------------------

CASES = [
    dict(name="m2_plain", M=2, N=16, temp="float"),
    dict(name="m2_groups_eps0.1_t0d", M=2, N=24, ids="groups", eps=0.1, temp="0d"),
    dict(name="m2_reversed_mask_eps0.5_t1d", M=2, N=20, D=6, pairs=[(1, 0)], ids="groups", eps=0.5, mask="random",
         temp="1d"),
    dict(name="m3_default_t0d", M=3, N=20, temp="0d"),
    dict(name="m3_sparse_ids_eps0.1_t1d", M=3, N=30, ids="sparse", eps=0.1, temp="1d"),
    dict(name="m3_reversed_mask_weights_eps0.5", M=3, N=24, pairs=[(1, 0), (2, 1), (2, 0)], ids="groups", eps=0.5,
         mask="random", weights=[1.0, 0.0, 2.0], temp="1d"),
    dict(name="m3_one_pair_nonorm", M=3, N=18, pairs=[(2, 0)], ids="groups", eps=0.1, normalize=False, temp="0d"),
    dict(name="m3_empty_pairs", M=3, N=16, ids="groups", eps=0.1, mask="drop_last", weights=[1.0, 2.0, 3.0],
         temp="1d"),
    dict(name="m3_zero_total_weight", M=3, N=12, ids="groups", eps=0.1, mask="drop_last", weights=[0.0, 1.0, 1.0],
         temp="0d"),
    dict(name="m3_one_valid_sample", M=3, N=14, ids="groups", eps=0.5, mask="one_valid", temp="1d"),
    dict(name="m3_all_same_id", M=3, N=12, ids="same", eps=0.1, temp="float"),
    dict(name="m4_default_mask_weights", M=4, N=32, ids="groups", eps=0.1, mask="random",
         weights=[1.0, 0.0, 0.5, 2.0, 1.0, 3.0], temp="1d"),
    dict(name="m4_anchor", M=4, N=40, pairs=[(0, 1), (0, 2), (0, 3)], ids="groups", eps=0.5, mask="random",
         weights=[1.0, 0.0, 2.5], temp="1d"),
    dict(name="m4_custom_nonorm", M=4, N=28, pairs=[(3, 1), (0, 2), (2, 3), (1, 0)], ids="sparse", eps=0.1,
         mask="random", weights=[0.5, 1.0, 2.0, 0.0], normalize=False, temp="1d"),
    dict(name="m4_single_pair_unused_modalities", M=4, N=20, pairs=[(2, 1)], ids="groups", temp="0d"),
    dict(name="m4_groups_eps0_mask", M=4, N=24, ids="groups", mask="random", temp="float"),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("case", CASES, ids=[c["name"] for c in CASES])
def test_matches_reference_torch(case, dtype):
    run_and_compare(case, dtype, backend="torch", seed=len(case["name"]))


TRITON_CASES = [
    dict(name="m2_groups_eps0.1_t0d", M=2, N=24, ids="groups", eps=0.1, temp="0d"),
    dict(name="m3_reversed_mask_weights_eps0.5", M=3, N=20, pairs=[(1, 0), (2, 1), (2, 0)], ids="groups", eps=0.5,
         mask="random", weights=[1.0, 0.0, 2.0], temp="1d"),
    dict(name="m3_empty_pairs", M=3, N=16, ids="sparse", eps=0.1, mask="drop_last", weights=[1.0, 2.0, 3.0],
         temp="1d"),
    dict(name="m4_custom_nonorm", M=4, N=20, pairs=[(3, 1), (0, 2), (2, 3), (1, 0)], ids="groups", eps=0.5,
         mask="random", weights=[0.5, 1.0, 2.0, 0.0], normalize=False, temp="1d"),
]


@pytest.mark.parametrize("case", TRITON_CASES, ids=[c["name"] for c in TRITON_CASES])
def test_matches_reference_triton(case):
    run_and_compare(case, torch.float32, backend="triton", seed=7)


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
    # (p, q) makes p the "x" side: reversing the pair swaps the two accuracy columns
    a, b = make_embeddings(2, 12, 4, F64, seed=72)
    ids2 = make_ids("groups", 12, seed=72)
    ref = reference([a, b], ids=ids2)[2]
    assert ref[0, 0] != ref[0, 1], "precondition: the two directions differ on this input"
    _, s_fwd = call(a, b, ids=ids2, pairs=[(0, 1)])
    _, s_rev = call(a, b, ids=ids2, pairs=[(1, 0)])
    assert_near(s_fwd["pair_accuracy"], ref, 1e-7, "accuracy (0, 1)")
    assert_near(s_rev["pair_accuracy"], ref[:, [1, 0]], 1e-7, "accuracy (1, 0)")


# ----------------------------------------------------------------------------------------------------------
# Identities
# ----------------------------------------------------------------------------------------------------------


def _run(zs, **kwargs):
    zs = [z.detach().clone().requires_grad_(True) for z in zs]
    loss, stats = call(*zs, **kwargs)
    loss.backward()
    return loss.detach(), [grad_or_zero(z, z) for z in zs], stats


@pytest.mark.parametrize("eps", [0.0, 0.1])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_ids_arange_equals_plain_call(eps, dtype):
    M, N = 3, 22
    zs = make_embeddings(M, N, 8, dtype, seed=11)
    mask = make_mask("random", M, N, seed=11)
    kw = dict(temperature=0.1, mask=mask, pairs=[(2, 0), (0, 1), (1, 2)], label_smoothing=eps)
    l0, g0, s0 = _run(zs, **kw)
    for ids in (torch.arange(N), torch.arange(N, dtype=torch.int32)):
        l1, g1, s1 = _run(zs, ids=ids, **kw)
        rtol = RTOL[dtype]
        assert_near(l1, l0, rtol, "loss")
        for a, b in zip(g1, g0):
            assert_near(a, b, rtol, "grad")
        assert_near(s1["pair_losses"], s0["pair_losses"], max(rtol, 1e-6), "pair_losses")
        assert_near(s1["pair_accuracy"], s0["pair_accuracy"], 1e-7, "pair_accuracy")


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_two_modalities_equal_cross_entropy_with_label_smoothing(eps, dtype):
    N, t = 25, 0.15
    a, b = make_embeddings(2, N, 8, dtype, seed=3)
    loss, grads, _ = _run([a, b], temperature=t, label_smoothing=eps)

    a64 = a.detach().to(F64).requires_grad_(True)
    b64 = b.detach().to(F64).requires_grad_(True)
    S = F.normalize(a64, dim=1) @ F.normalize(b64, dim=1).T / t
    target = torch.arange(N)
    expected = (F.cross_entropy(S, target, label_smoothing=eps) + F.cross_entropy(S.T, target, label_smoothing=eps))
    expected = expected / 2
    expected.backward()
    rtol = RTOL[dtype]
    assert_near(loss, expected, rtol, "loss", scale=abs(expected.item()))
    gscale = max(a64.grad.abs().max().item(), b64.grad.abs().max().item())
    assert_near(grads[0], a64.grad, rtol, "dL/da", scale=gscale)
    assert_near(grads[1], b64.grad, rtol, "dL/db", scale=gscale)


@pytest.mark.parametrize("eps", [0.0, 0.1, 0.5])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
def test_anchor_topology_is_weighted_mean_of_single_pairs(eps, dtype):
    M, N = 4, 26
    zs = make_embeddings(M, N, 8, dtype, seed=5)
    ids = make_ids("groups", N, seed=5)
    mask = make_mask("random", M, N, seed=5)
    pairs = [(0, 1), (0, 2), (0, 3)]
    weights = [1.0, 0.0, 2.5]
    temps = [0.07, 0.2, 0.12]
    loss, _, stats = _run(zs, temperature=torch.tensor(temps, dtype=dtype), weights=weights, mask=mask, pairs=pairs,
                          ids=ids, label_smoothing=eps)
    single = []
    for k, (p, q) in enumerate(pairs):
        lk, _, sk = _run([zs[p], zs[q]], temperature=temps[k], mask=mask[[p, q]], ids=ids, label_smoothing=eps)
        single.append(lk.to(F64))
        assert_near(stats["pair_losses"][k], sk["pair_losses"][0], max(RTOL[dtype], 1e-6), f"pair_losses[{k}]")
        assert_near(stats["pair_accuracy"][k], sk["pair_accuracy"][0], 1e-7, f"pair_accuracy[{k}]")
    expected = sum(w * lk for w, lk in zip(weights, single)) / sum(weights)
    assert_near(loss, expected, RTOL[dtype], "loss", scale=abs(expected.item()))


RELABELS = {
    "affine": lambda ids: ids * 7919 + 13,
    "negative": lambda ids: -3 * ids - 5,
    "permutation": lambda ids: torch.randperm(int(ids.max()) + 1, generator=torch.Generator().manual_seed(1))[ids],
    "large_int64": lambda ids: ids * 1_000_003 + 2**40,
    "int32": lambda ids: (ids * 101 + 7).to(torch.int32),
}


@pytest.mark.parametrize("relabel", list(RELABELS), ids=list(RELABELS))
@pytest.mark.parametrize("eps", [0.0, 0.1])
def test_relabelling_ids_injectively_leaves_loss_unchanged(relabel, eps):
    M, N = 3, 24
    zs = make_embeddings(M, N, 8, F64, seed=9)
    ids = make_ids("groups", N, seed=9)
    mask = make_mask("random", M, N, seed=9)
    kw = dict(temperature=0.1, mask=mask, pairs=[(1, 0), (1, 2)], label_smoothing=eps, weights=[1.0, 3.0])
    new_ids = RELABELS[relabel](ids)
    # the map really is injective on the ids present
    assert len(set(new_ids.tolist())) == len(set(ids.tolist()))
    l0, g0, s0 = _run(zs, ids=ids, **kw)
    l1, g1, s1 = _run(zs, ids=new_ids, **kw)
    assert_near(l1, l0, 1e-9, "loss")
    for a, b in zip(g1, g0):
        assert_near(a, b, 1e-9, "grad")
    assert_near(s1["pair_losses"], s0["pair_losses"], 1e-6, "pair_losses")
    assert_near(s1["pair_accuracy"], s0["pair_accuracy"], 1e-7, "pair_accuracy")
    # and both equal the reference
    ref = reference([z.to(F64) for z in zs], ids=ids, **kw)
    assert_near(l0, ref[0], 1e-9, "loss vs reference")


@pytest.mark.parametrize("eps", [0.0, 0.5])
def test_reversing_pairs_keeps_loss_and_swaps_accuracy(eps):
    M, N = 3, 20
    zs = make_embeddings(M, N, 8, F64, seed=21)
    ids = make_ids("groups", N, seed=21)
    mask = make_mask("random", M, N, seed=21)
    pairs = [(0, 1), (0, 2), (1, 2)]
    kw = dict(temperature=torch.tensor([0.1, 0.2, 0.3], dtype=F64), weights=[1.0, 2.0, 0.5], mask=mask, ids=ids,
              label_smoothing=eps)
    l0, g0, s0 = _run(zs, pairs=pairs, **kw)
    l1, g1, s1 = _run(zs, pairs=[(q, p) for p, q in pairs], **kw)
    l2, g2, s2 = _run(zs, pairs=None, **kw)  # the default is combinations(range(M), 2)
    assert_near(l1, l0, 1e-9, "loss (reversed)")
    assert_near(l2, l0, 1e-9, "loss (default pairs)")
    for a, b, c in zip(g0, g1, g2):
        assert_near(b, a, 1e-9, "grad (reversed)")
        assert_near(c, a, 1e-9, "grad (default pairs)")
    assert_near(s1["pair_losses"], s0["pair_losses"], 1e-6, "pair_losses")
    assert_near(s1["pair_accuracy"], s0["pair_accuracy"][:, [1, 0]], 1e-7, "pair_accuracy (reversed)")
    assert_near(s2["pair_accuracy"], s0["pair_accuracy"], 1e-7, "pair_accuracy (default pairs)")


def test_pair_order_is_followed_by_per_pair_arguments_and_stats():
    M, N = 4, 18
    zs = make_embeddings(M, N, 8, F64, seed=31)
    ids = make_ids("groups", N, seed=31)
    pairs = [(0, 1), (2, 3), (1, 3)]
    temps = [0.05, 0.1, 0.4]
    weights = [1.0, 2.0, 3.0]
    perm = [2, 0, 1]
    l0, _, s0 = _run(zs, pairs=pairs, temperature=torch.tensor(temps, dtype=F64), weights=weights, ids=ids,
                     label_smoothing=0.1)
    l1, _, s1 = _run(zs, pairs=[pairs[k] for k in perm], temperature=torch.tensor([temps[k] for k in perm], dtype=F64),
                     weights=[weights[k] for k in perm], ids=ids, label_smoothing=0.1)
    assert_near(l1, l0, 1e-9, "loss")
    assert_near(s1["pair_losses"], s0["pair_losses"][perm], 1e-6, "pair_losses")
    assert_near(s1["pair_accuracy"], s0["pair_accuracy"][perm], 1e-7, "pair_accuracy")


# ----------------------------------------------------------------------------------------------------------
# PairwiseNCE
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("per_pair", [False, True], ids=["shared_t", "per_pair_t"])
def test_module_matches_reference(per_pair):
    M, N, t = 3, 24, 0.2
    pairs = [(2, 0), (1, 2)]
    eps = 0.1
    module = fastpair.PairwiseNCE(M, temperature=t, per_pair_temperature=per_pair, pairs=pairs, label_smoothing=eps,
                                  weights=[1.0, 2.0], backend="torch")
    params = [p for p in module.parameters() if p.requires_grad]
    assert len(params) == 1, "one learnable log-temperature"
    assert params[0].numel() == (len(pairs) if per_pair else 1)
    zs = [z.requires_grad_(True) for z in make_embeddings(M, N, 8, torch.float32, seed=41)]
    ids = make_ids("groups", N, seed=41)
    mask = make_mask("random", M, N, seed=41)
    loss, stats = module(*zs, mask=mask, ids=ids, return_stats=True)
    loss.backward()

    zs64 = [z.detach().to(F64).requires_grad_(True) for z in zs]
    t64 = torch.full((len(pairs),) if per_pair else (), t, dtype=F64, requires_grad=True)
    ref_loss, ref_pl, ref_acc = reference(zs64, temperature=t64, mask=mask, pairs=pairs, ids=ids,
                                          label_smoothing=eps, weights=[1.0, 2.0])
    ref_loss.backward()
    rtol = RTOL[torch.float32]
    assert_near(loss, ref_loss, rtol, "loss", scale=abs(ref_loss.item()))
    gscale = max(z.grad.abs().max().item() for z in zs64)
    for m, (z, z64) in enumerate(zip(zs, zs64)):
        assert_near(z.grad, z64.grad, rtol, f"dL/dz_{m}", scale=gscale)
    check_stats(stats, ref_pl, ref_acc, len(pairs), torch.float32)
    # the parameter is log t: dL/dlog t = t dL/dt
    expected = (t64.grad * t).reshape(params[0].shape)
    assert_near(params[0].grad, expected, rtol, "dL/dlog_t", scale=max(expected.abs().max().item(), 1.0))


def test_module_with_ids_equals_function():
    M, N = 4, 20
    pairs = [(0, 1), (0, 2), (0, 3)]
    module = fastpair.PairwiseNCE(M, temperature=0.1, learn_temperature=False, pairs=pairs, label_smoothing=0.5,
                                  backend="torch")
    assert not [p for p in module.parameters() if p.requires_grad]
    zs = make_embeddings(M, N, 8, torch.float32, seed=43)
    ids = make_ids("sparse", N, seed=43)
    loss = module(*zs, ids=ids)
    expected, _ = call(*zs, temperature=0.1, pairs=pairs, ids=ids, label_smoothing=0.5)
    assert_near(loss, expected, 1e-6, "loss")
    ref = reference([z.to(F64) for z in zs], temperature=0.1, pairs=pairs, ids=ids, label_smoothing=0.5)[0]
    assert_near(loss, ref, 1e-5, "loss vs reference", scale=abs(ref.item()))


# ----------------------------------------------------------------------------------------------------------
# Bad input
# ----------------------------------------------------------------------------------------------------------


def _base(M=3, N=10):
    return make_embeddings(M, N, 4, torch.float32, seed=50)


@pytest.mark.parametrize("pairs", list(BAD_PAIRS.values()), ids=list(BAD_PAIRS))
def test_bad_pairs_raise(pairs):
    with pytest.raises((ValueError, TypeError), match="pairs"):
        fastpair.pairwise_nce(*_base(), pairs=pairs, backend="torch")


def test_bad_pairs_raise_in_module():
    for pairs in BAD_PAIRS.values():
        with pytest.raises((ValueError, TypeError), match="pairs"):
            module = fastpair.PairwiseNCE(3, pairs=pairs, backend="torch")
            module(*_base())


BAD_IDS = {
    "too_long": torch.arange(N_BAD + 1),
    "too_short": torch.arange(N_BAD - 1),
    "column": torch.arange(N_BAD).reshape(N_BAD, 1),
    "row": torch.arange(N_BAD).reshape(1, N_BAD),
    "scalar": torch.tensor(3),
    "float32": torch.arange(N_BAD, dtype=torch.float32),
    "float64": torch.arange(N_BAD, dtype=torch.float64),
    "bool": torch.ones(N_BAD, dtype=torch.bool),
    "int16": torch.arange(N_BAD, dtype=torch.int16),
    "uint8": torch.arange(N_BAD, dtype=torch.uint8),
    "wrong_device": torch.arange(N_BAD, device="meta"),
}


@pytest.mark.parametrize("ids", list(BAD_IDS.values()), ids=list(BAD_IDS))
def test_bad_ids_raise(ids):
    with pytest.raises((ValueError, TypeError), match="ids"):
        fastpair.pairwise_nce(*_base(N=N_BAD), ids=ids, backend="torch")


def test_bad_ids_raise_in_module():
    module = fastpair.PairwiseNCE(3, backend="torch")
    for ids in BAD_IDS.values():
        with pytest.raises((ValueError, TypeError), match="ids"):
            module(*_base(N=N_BAD), ids=ids)


BAD_EPS = [-0.1, -1e-9, 1.0, 1.5, math.nan, math.inf, -math.inf]
LS_MSG = r"label[_ ]smoothing"


@pytest.mark.parametrize("eps", BAD_EPS, ids=[str(e) for e in BAD_EPS])
def test_bad_label_smoothing_raises(eps):
    with pytest.raises((ValueError, TypeError), match=LS_MSG):
        fastpair.pairwise_nce(*_base(), label_smoothing=eps, backend="torch")


def test_bad_label_smoothing_raises_in_module():
    for eps in BAD_EPS:
        with pytest.raises((ValueError, TypeError), match=LS_MSG):
            module = fastpair.PairwiseNCE(3, label_smoothing=eps, backend="torch")
            module(*_base())


@pytest.mark.parametrize("eps", [0.0, 0.5, 0.999])
def test_label_smoothing_edges_of_the_interval_are_accepted(eps):
    loss = fastpair.pairwise_nce(*_base(), label_smoothing=eps, backend="torch")
    assert torch.isfinite(loss)
