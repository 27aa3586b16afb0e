"""CUDA graphs (GPU only): a step of the Triton loss has no host sync, so its forward and backward can be
captured once and replayed, by hand (torch.cuda.graph) or by torch.compile(mode="reduce-overhead"). The
counts behind it are CPU tests (test_costs.py); these check the capture itself on a GPU."""

from __future__ import annotations

import pytest
import torch
from helpers import randn

from fastpair import PairwiseNCE, pairwise_nce, pairwise_sigmoid

pytestmark = pytest.mark.gpu
N, D = 256, 64


def _params(objective, learnable):
    kw = {"temperature": torch.tensor(0.07, device="cuda", requires_grad=True) if learnable else 0.07}
    if objective == "sigmoid":
        kw["bias"] = torch.tensor(-10.0, device="cuda", requires_grad=True) if learnable else -10.0
    return kw


@pytest.mark.parametrize("objective", ["nce", "sigmoid"])
@pytest.mark.parametrize("learnable", [False, True], ids=["numbers", "tensors"])
def test_forward_and_backward_replay_as_a_cuda_graph(objective, learnable):
    """Captured once, replayed on new inputs copied into the captured ones: the eager step's loss and
    gradients (for the embeddings and any learnable parameter)."""
    fn = pairwise_nce if objective == "nce" else pairwise_sigmoid
    zs = [randn(N, D, seed=k, device="cuda").requires_grad_() for k in range(3)]
    kw = _params(objective, learnable)
    leaves = zs + [v for v in kw.values() if isinstance(v, torch.Tensor)]
    side = torch.cuda.Stream()
    side.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(side):  # warm-up off the capture: compilation, autotuning, cached tables
        for _ in range(2):
            fn(*zs, **kw, backend="triton").backward()
    torch.cuda.current_stream().wait_stream(side)
    for leaf in leaves:
        leaf.grad = None
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        loss = fn(*zs, **kw, backend="triton")
        loss.backward()
    new = [randn(N, D, seed=10 + k, device="cuda") for k in range(3)]
    with torch.no_grad():
        for z, v in zip(zs, new):
            z.copy_(v)
    graph.replay()
    torch.cuda.synchronize()

    eager = [v.clone().requires_grad_() for v in new]
    eager_kw = {key: v.detach().clone().requires_grad_() if isinstance(v, torch.Tensor) else v
                for key, v in kw.items()}
    expected = fn(*eager, **eager_kw, backend="triton")
    expected.backward()
    torch.testing.assert_close(loss, expected, rtol=1e-5, atol=1e-6)
    for z, e in zip(zs, eager):
        torch.testing.assert_close(z.grad, e.grad, rtol=1e-4, atol=1e-6)
    for key, v in kw.items():
        if isinstance(v, torch.Tensor):
            torch.testing.assert_close(v.grad, eager_kw[key].grad, rtol=1e-4, atol=1e-6)


def test_reduce_overhead_training_step_uses_cuda_graphs():
    """torch.compile(mode="reduce-overhead") of encoders + PairwiseNCE (a learnable temperature): no
    cudagraph skip (a CPU tensor or a host sync in the graph would cause one), and the eager losses."""
    from torch._dynamo.utils import counters

    torch._dynamo.reset()
    counters.clear()
    torch.manual_seed(0)
    enc = torch.nn.ModuleList([torch.nn.Linear(D, D) for _ in range(3)]).cuda()
    loss_fn = PairwiseNCE(3, backend="triton").cuda()
    twin = PairwiseNCE(3, backend="triton").cuda()

    def step(*xs):
        return loss_fn(*[e(x) for e, x in zip(enc, xs)])

    compiled = torch.compile(step, mode="reduce-overhead", fullgraph=True)
    for k in range(4):  # cudagraph trees warm up, record, then replay
        xs = [randn(N, D, seed=100 * k + m, device="cuda") for m in range(3)]
        loss = compiled(*xs)
        loss.backward()
        with torch.no_grad():
            expected = twin(*[e(x) for e, x in zip(enc, xs)])
        torch.testing.assert_close(loss.detach(), expected, rtol=1e-5, atol=1e-6)
        enc.zero_grad(set_to_none=True)
        loss_fn.zero_grad(set_to_none=True)
    assert counters["inductor"]["cudagraph_skips"] == 0, dict(counters["inductor"])
