"""The loss family (docs/design.md): pair topologies, positives by id, label smoothing, on both backends,
against the float64 reference and through the identities that define them."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    assert_close,
    case_inputs,
    case_kwargs,
    check_against_reference,
    device_for,
    make_embeddings,
    on,
    randn,
    small,
)
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpair import PairwiseNCE, pairwise_nce
from fastpair.reference import pairwise_nce_reference
from fastpair.targets import group_labels


def clip_ids(n: int, views: int = 2) -> torch.Tensor:
    """Two (or more) crops of every clip: samples k * views .. k * views + views - 1 share an id."""
    return torch.arange(n) // views


def label_ids(n: int, classes: int, seed: int) -> torch.Tensor:
    return torch.randint(0, classes, (n,), generator=torch.Generator().manual_seed(seed))


CASES = {
    "ids": dict(ids="clips"),
    "labels": dict(ids="labels"),
    "smoothing": dict(label_smoothing=0.1),
    "ids-smoothing": dict(ids="labels", label_smoothing=0.3),
    "anchor": dict(pairs=[(0, 1), (0, 2)], ids="clips"),
    "reversed-pairs": dict(pairs=[(2, 0), (1, 2)], label_smoothing=0.2),
    "ids-mask": dict(ids="labels", mask=True),
    "all-mask-weights": dict(ids="labels", label_smoothing=0.1, mask=True, weights=[0.5, 0.0, 2.0]),
    "unnormalized": dict(ids="clips", label_smoothing=0.05, normalize=False),
}


def _kwargs(case: str, n: int, m: int = 3):
    return case_kwargs(CASES[case], n, m)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("learnable", [False, True])
def test_matches_reference(case, learnable, backend):
    n = small(45, backend)
    kw = _kwargs(case, n)
    zs, temperature = case_inputs(kw, n, seed=31)
    check_against_reference(zs, backend, temperature=temperature, learnable=learnable, block_size=16, **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_block_sizes_and_dtypes(dtype):
    """Small blocks, so that an id group spans several of them; float64 to the reference's precision."""
    n = 50
    kw = _kwargs("all-mask-weights", n)
    zs = make_embeddings(3, n, 5, seed=32, dtype=dtype)
    check_against_reference(zs, "torch", temperature=[0.05, 0.1, 0.2], learnable=True, block_size=7, **kw)


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(normalize):
    zs = make_embeddings(3, 8, 3, seed=33, dtype=torch.float64)
    if not normalize:
        zs = [(z.detach() * 0.3).requires_grad_() for z in zs]
    t = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 2] = mask[2, 5] = False
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])

    def fn(t, *zs):
        return pairwise_nce(*zs, temperature=t, pairs=[(1, 0), (0, 2)], ids=ids, label_smoothing=0.15, mask=mask,
                            normalize=normalize, block_size=3)

    assert torch.autograd.gradcheck(fn, (t, *zs), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_unique_ids_without_smoothing_equal_the_plain_call(backend):
    zs = on(make_embeddings(3, small(40, backend), 8, seed=34), backend)
    mask = (torch.rand(3, zs[0].shape[0], generator=torch.Generator().manual_seed(1)) > 0.2).to(zs[0].device)
    t = torch.tensor([0.05, 0.1, 0.2], device=zs[0].device)
    ids = torch.randperm(zs[0].shape[0], generator=torch.Generator().manual_seed(2)).to(zs[0].device)
    plain, plain_stats = pairwise_nce(*zs, temperature=t, mask=mask, backend=backend, return_stats=True)
    grads = torch.autograd.grad(plain, zs)
    with_ids, stats = pairwise_nce(*zs, temperature=t, mask=mask, ids=ids, backend=backend, return_stats=True)
    assert_close(with_ids, plain, name="loss with unique ids")
    for m, (a, b) in enumerate(zip(torch.autograd.grad(with_ids, zs), grads)):
        assert_close(a, b, name=f"grad {m} with unique ids", magnitude=b.abs().max().item())
    torch.testing.assert_close(stats["pair_accuracy"], plain_stats["pair_accuracy"], rtol=0, atol=0)


@pytest.mark.parametrize("eps", [0.1, 0.5])
def test_two_modalities_with_smoothing_equal_cross_entropy(eps, backend):
    x, y = on(make_embeddings(2, small(33, backend), 10, seed=35, requires_grad=False), backend)
    ours = pairwise_nce(x, y, temperature=0.07, label_smoothing=eps, backend=backend)
    logits = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T / 0.07
    labels = torch.arange(x.shape[0], device=x.device)
    expected = (F.cross_entropy(logits, labels, label_smoothing=eps)
                + F.cross_entropy(logits.T, labels, label_smoothing=eps)) / 2
    assert_close(ours, expected, name="loss")


def test_anchor_topology_is_the_weighted_mean_of_its_pairs(backend):
    zs = on(make_embeddings(4, small(30, backend), 6, seed=36, requires_grad=False), backend)
    pairs, weights = [(0, 1), (0, 2), (0, 3)], [1.0, 2.0, 0.5]
    ids = clip_ids(zs[0].shape[0]).to(zs[0].device)
    whole = pairwise_nce(*zs, pairs=pairs, weights=weights, ids=ids, label_smoothing=0.1, backend=backend)
    alone = [pairwise_nce(zs[p], zs[q], ids=ids, label_smoothing=0.1, backend=backend) for p, q in pairs]
    expected = sum(w * a for w, a in zip(weights, alone)) / sum(weights)
    assert_close(whole, expected, name="anchor topology")


def test_a_pair_and_its_reverse_give_the_same_loss(backend):
    zs = on(make_embeddings(3, small(25, backend), 6, seed=37, requires_grad=False), backend)
    ids = label_ids(zs[0].shape[0], 3, seed=1).to(zs[0].device)
    a = pairwise_nce(*zs, pairs=[(0, 1), (2, 1)], ids=ids, label_smoothing=0.2, backend=backend)
    b = pairwise_nce(*zs, pairs=[(1, 0), (1, 2)], ids=ids, label_smoothing=0.2, backend=backend)
    assert_close(a, b, name="reversed pairs")


@settings(max_examples=25, deadline=None)
@given(seed=st.integers(0, 2**16), n=st.integers(1, 30), classes=st.integers(1, 8), eps=st.floats(0.0, 0.9),
       masked=st.booleans())
def test_relabelling_ids_leaves_the_loss_unchanged(seed, n, classes, eps, masked):
    g = torch.Generator().manual_seed(seed)
    zs = [torch.randn(n, 5, generator=g, dtype=torch.float64) for _ in range(3)]
    ids = torch.randint(0, classes, (n,), generator=g)
    bijection = torch.randperm(classes, generator=g) * 7919 - 10**12  # any injective map of the labels
    mask = torch.rand(3, n, generator=g) > 0.3 if masked else None
    a = pairwise_nce(*zs, ids=ids, label_smoothing=eps, mask=mask, temperature=0.1)
    b = pairwise_nce(*zs, ids=bijection[ids], label_smoothing=eps, mask=mask, temperature=0.1)
    ref = pairwise_nce_reference(*zs, ids=ids, label_smoothing=eps, mask=mask, temperature=0.1)
    assert_close(a, b, torch.float64, name="relabelled ids")
    assert_close(a, ref, torch.float64, name="reference")


@settings(max_examples=25, deadline=None)
@given(ids=st.lists(st.integers(-(2**40), 2**40), min_size=1, max_size=40))
def test_group_labels_name_each_distinct_id_once(ids):
    ids = torch.tensor(ids)
    labels = group_labels(ids)
    assert torch.equal(labels[:, None] == labels[None, :], ids[:, None] == ids[None, :])
    assert labels.min() == 0 and labels.max() == len(set(ids.tolist())) - 1


def test_stats_count_a_positive_as_a_hit(backend):
    """Two identical crops per clip: the argmax may land on the other crop, which is a hit with ids."""
    base = torch.eye(8, device=on([torch.zeros(1)], backend)[0].device)
    z = base.repeat_interleave(2, dim=0)  # rows 2k and 2k+1 identical
    ids = clip_ids(16).to(z.device)
    _, stats = pairwise_nce(z, z.clone(), temperature=0.1, ids=ids, return_stats=True, backend=backend)
    assert torch.all(stats["pair_accuracy"] == 1.0)


def test_module_passes_pairs_smoothing_and_ids():
    module = PairwiseNCE(3, temperature=0.1, per_pair_temperature=True, pairs=[(0, 1), (0, 2)], label_smoothing=0.1)
    assert module.log_temperature.shape == (2,)
    zs = make_embeddings(3, 12, 4, seed=38)
    ids = clip_ids(12)
    loss = module(*zs, ids=ids)
    loss.backward()
    expected = pairwise_nce(*zs, temperature=torch.full((2,), 0.1), pairs=[(0, 1), (0, 2)], ids=ids,
                            label_smoothing=0.1)
    assert_close(loss, expected, name="module loss")
    assert module.log_temperature.grad.shape == (2,)
    with pytest.raises(ValueError, match="label_smoothing"):
        PairwiseNCE(3, label_smoothing=1.0)
    with pytest.raises(ValueError, match="itself"):
        PairwiseNCE(3, pairs=[(1, 1)])


def test_compiled_step_with_ids_and_smoothing_keeps_one_graph(triton_only):
    """The Triton path stays a pair of custom ops with the family's arguments: fullgraph=True compiles."""
    torch._dynamo.reset()
    dev = device_for("triton")
    enc = torch.nn.ModuleList([torch.nn.Linear(8, 16) for _ in range(3)]).to(dev)
    xs = [randn(24, 8, seed=k, device=dev) for k in range(3)]
    ids = clip_ids(24).to(dev)
    t = torch.tensor([0.1, 0.2], device=dev, requires_grad=True)

    def step(*xs):
        return pairwise_nce(*[e(x) for e, x in zip(enc, xs)], temperature=t, pairs=[(0, 1), (2, 0)], ids=ids,
                            label_smoothing=0.1, backend="triton")

    eager = step(*xs)
    eager.backward()
    grads = [p.grad.clone() for p in enc.parameters()] + [t.grad.clone()]
    enc.zero_grad()
    t.grad = None
    loss = torch.compile(step, fullgraph=True)(*xs)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip([p.grad for p in enc.parameters()] + [t.grad], grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)
