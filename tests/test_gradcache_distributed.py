"""GradCache under DistributedDataParallel with global negatives: 2 gloo processes on CPU.

Each rank runs GradCache on its local batch with DDP-wrapped encoders, a DDP-wrapped loss module and the
loss's group= (every rank's samples are every sample's negatives). The averaged parameter gradients must equal
the single-process gradients of the plain step on the concatenated batch (ranks in order), and each
encoder's gradients must be all-reduced once per step (no_sync for every chunk's backward but the last).
"""

from __future__ import annotations

import pytest
import torch
import torch.distributed as dist
from helpers import assert_close
from test_distributed import WORLD, run_ranks
from torch import nn
from torch.nn.parallel import DistributedDataParallel as DDP

from fastpair import GradCache, PairwiseNCE, PairwiseSigmoid

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

SIZES = (10, 7)  # unequal local batches, in chunks of 4: 3 and 2 chunks
D = 6


def _encoders():
    torch.manual_seed(21)  # every rank and the single-process reference start from the same weights
    return [nn.Sequential(nn.Linear(D, 12), nn.Tanh(), nn.Linear(12, 8)).double() for _ in range(3)]


def _batch():
    g = torch.Generator().manual_seed(4)
    n = sum(SIZES)
    xs = [torch.randn(n, D, generator=g, dtype=torch.float64) for _ in range(3)]
    mask = torch.rand(3, n, generator=g) > 0.2
    mask[:, 0] = True
    ids = (torch.arange(n) + 1) // 2  # pairs of positives; samples 9 and 10 are one, across the two ranks
    return xs, mask, ids


def _grads(modules):
    return [p.grad.detach().clone() for m in modules for p in m.parameters()]


def _step(rank, objective):
    loss_cls = {"nce": PairwiseNCE, "sigmoid": PairwiseSigmoid}[objective]
    xs, mask, ids = _batch()

    # single process: the plain step on the whole batch
    encoders, loss_fn = _encoders(), loss_cls(3).double()
    loss_fn(*(e(x) for e, x in zip(encoders, xs)), mask=mask, ids=ids).backward()
    expected = _grads(encoders + [loss_fn])

    # this rank: GradCache on its rows, DDP encoders and loss, negatives from both ranks
    start = sum(SIZES[:rank])
    rows = slice(start, start + SIZES[rank])
    wrapped = [DDP(e) for e in _encoders()]
    loss_ddp = DDP(loss_cls(3).double())
    calls = [0] * 3
    for k, e in enumerate(wrapped):
        e.register_comm_hook(k, _counting_allreduce(calls))
    GradCache(wrapped, loss_ddp, 4)(*(x[rows] for x in xs), mask=mask[:, rows], ids=ids[rows],
                                    group=dist.group.WORLD)
    got = _grads([e.module for e in wrapped] + [loss_ddp.module])
    for k, (g, r) in enumerate(zip(got, expected)):
        assert_close(g, r, torch.float64, name=f"rank {rank}, gradient of parameter {k}",
                     magnitude=float(r.abs().max()))
    # one all-reduce per encoder and step: its (single) bucket, after the last chunk's backward only
    assert calls == [1, 1, 1], calls


def _counting_allreduce(calls):
    def hook(index, bucket):
        calls[index] += 1
        tensor = bucket.buffer() / dist.get_world_size()
        return dist.all_reduce(tensor, async_op=True).get_future().then(lambda fut: fut.value()[0])

    return hook


@pytest.mark.slow
@pytest.mark.parametrize("objective", ["nce", "sigmoid"])
def test_two_ranks_equal_one_process(objective):
    assert WORLD == 2
    run_ranks(_step, objective)
