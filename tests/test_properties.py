"""Property tests: invariances the loss must have, on random shapes, temperatures and masks."""

from __future__ import annotations

import torch
from helpers import assert_close
from hypothesis import given, settings
from hypothesis import strategies as st

from fastpair import pairwise_nce
from fastpair.reference import pairwise_nce_reference

SETTINGS = settings(max_examples=25, deadline=None)


def _inputs(seed, m, n, d, dtype=torch.float64):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(n, d, generator=g, dtype=dtype) for _ in range(m)]


@SETTINGS
@given(seed=st.integers(0, 2**16), m=st.integers(2, 4), n=st.integers(1, 40), d=st.integers(1, 9),
       t=st.floats(0.002, 50.0), block=st.integers(1, 48), masked=st.booleans(), normalize=st.booleans())
def test_matches_reference(seed, m, n, d, t, block, masked, normalize):
    zs = _inputs(seed, m, n, d)
    mask = torch.rand(m, n, generator=torch.Generator().manual_seed(seed)) > 0.25 if masked else None
    if not normalize:
        zs = [z * 0.3 for z in zs]
    ours = pairwise_nce(*zs, temperature=t, mask=mask, normalize=normalize, block_size=block)
    ref = pairwise_nce_reference(*zs, temperature=t, mask=mask, normalize=normalize)
    assert_close(ours, ref, torch.float64, name="loss")


@SETTINGS
@given(seed=st.integers(0, 2**16), m=st.integers(2, 4), n=st.integers(1, 40), d=st.integers(1, 9),
       t=st.floats(0.01, 10.0))
def test_permuting_the_batch_leaves_loss_unchanged(seed, m, n, d, t):
    zs = _inputs(seed, m, n, d)
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed + 1))
    a = pairwise_nce(*zs, temperature=t)
    b = pairwise_nce(*[z[perm] for z in zs], temperature=t)
    assert_close(b, a, torch.float64, name="permuted loss")


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 30), d=st.integers(1, 9),
       scales=st.lists(st.floats(1e-3, 1e3), min_size=3, max_size=3))
def test_scaling_embeddings_leaves_normalized_loss_unchanged(seed, n, d, scales):
    zs = _inputs(seed, 3, n, d)
    a = pairwise_nce(*zs, temperature=0.1)
    b = pairwise_nce(*[z * s for z, s in zip(zs, scales)], temperature=0.1)
    assert_close(b, a, torch.float64, name="scaled loss")


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(1, 30), d=st.integers(1, 9), t=st.floats(0.01, 10.0))
def test_two_modality_loss_is_symmetric(seed, n, d, t):
    x, y = _inputs(seed, 2, n, d)
    assert_close(pairwise_nce(y, x, temperature=t), pairwise_nce(x, y, temperature=t), torch.float64, name="swap")


@SETTINGS
@given(seed=st.integers(0, 2**16), n=st.integers(2, 30), d=st.integers(1, 9))
def test_loss_is_bounded_below_by_zero_and_above_by_chance_level_for_equal_inputs(seed, n, d):
    x, y = _inputs(seed, 2, n, d)
    loss = pairwise_nce(x, y, temperature=1.0)
    assert loss >= 0
    same = pairwise_nce(x, x.clone(), temperature=1e-2)  # each sample is its own best match
    assert same <= torch.log(torch.tensor(float(n), dtype=torch.float64)) + 1e-9
