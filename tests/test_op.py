"""The op layer (fastpair/op.py): one table, one op shape, eager and compiled dispatch; and the one-program paths
for small batches (kernels/small.py, infonce_small.py, sigmoid_small.py) against the tiled kernels they stand
in for."""

from __future__ import annotations

import pytest
import torch
from helpers import case_inputs, case_kwargs, device_for, make_embeddings, on, triton_runs

from fastpair import gram_nce, op, pairwise_nce, pairwise_sigmoid
from fastpair.call import describe

LOSSES = {"nce": pairwise_nce, "sigmoid": pairwise_sigmoid, "gram": gram_nce}


@pytest.mark.parametrize("objective,backend", sorted(op.TABLE))
def test_every_table_entry_is_an_op(objective, backend):
    if backend == "triton" and not triton_runs():
        pytest.skip("Triton is not available here")
    zs = make_embeddings(3, 4, 5)
    call = describe(zs, temperature=0.1, weights=None, mask=None, normalize=True, return_stats=False,
                    backend="torch", block_size=None)
    import dataclasses

    assert callable(op.resolve(dataclasses.replace(call, objective=objective, backend=backend)))


@pytest.mark.parametrize("objective", ["nce", "sigmoid", "gram"])
def test_fullgraph_compile_on_the_torch_backend(objective):
    """A training step that calls the loss compiles as one graph on the torch backend (the registered op with
    its fake kernel), with the eager loss and gradients, a learnable temperature included."""
    torch._dynamo.reset()
    enc = torch.nn.ModuleList([torch.nn.Linear(8, 16) for _ in range(3)])
    inputs = [torch.randn(24, 8, generator=torch.Generator().manual_seed(k)) for k in range(3)]
    t = torch.tensor(0.1, requires_grad=True)
    mask = torch.ones(3, 24, dtype=torch.bool)
    mask[1, :3] = False

    def step(*xs):
        return LOSSES[objective](*[e(x) for e, x in zip(enc, xs)], temperature=t, mask=mask, backend="torch")

    eager = step(*inputs)
    eager.backward()
    expected = [p.grad.clone() for p in enc.parameters()] + [t.grad.clone()]
    enc.zero_grad()
    t.grad = None
    loss = torch.compile(step, fullgraph=True)(*inputs)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip([p.grad for p in enc.parameters()] + [t.grad], expected):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_double_backward_is_refused(backend):
    zs = on(make_embeddings(3, 8, 4), backend)
    loss = pairwise_nce(*zs, backend=backend)
    with pytest.raises(RuntimeError, match="differentiated once, not twice"):
        torch.autograd.grad(loss, zs[0], create_graph=True)


def test_gradients_scale_with_the_incoming_gradient(backend):
    """The op's gradients are computed in its forward; the backward scales them by dL/dloss."""
    zs = on(make_embeddings(3, 9, 5, seed=3), backend)
    t = torch.tensor(0.2, device=zs[0].device, requires_grad=True)
    pairwise_nce(*zs, temperature=t, backend=backend).backward()
    once = [z.grad.clone() for z in zs] + [t.grad.clone()]
    for z in zs:
        z.grad = None
    t.grad = None
    (pairwise_nce(*zs, temperature=t, backend=backend) * -2.5).backward()
    for a, b in zip([z.grad for z in zs] + [t.grad], once):
        torch.testing.assert_close(a, -2.5 * b, rtol=1e-6, atol=1e-8)


def test_retained_graph_backward_twice_accumulates(backend):
    zs = on(make_embeddings(2, 6, 4, seed=4), backend)
    loss = pairwise_nce(*zs, backend=backend)
    loss.backward(retain_graph=True)
    once = zs[0].grad.clone()
    loss.backward()
    torch.testing.assert_close(zs[0].grad, 2 * once)


CASES = [{}, {"mask": True}, {"ids": "labels", "label_smoothing": 0.1}, {"normalize": False},
         {"pairs": [(0, 1), (2, 0)]}, {"weights": [1.0, 0.0, 2.0]}]


SMALL = ["nce", "sigmoid", "gram"]  # the objectives with a one-program path
GRAM_CASES = CASES[:3]  # GRAM has no pair weights or topologies and always normalizes


def _learnable(objective, temperature, device):
    """The parameters of a learnable call: the temperature, and the sigmoid's bias."""
    params = {"temperature": torch.tensor(temperature, device=device, requires_grad=True)}
    if objective == "sigmoid":
        params["bias"] = torch.tensor(-2.0, device=device, requires_grad=True)
    return params


def _small_cases():
    """(objective, case) of every call the one-program paths are compared with the tiled kernels on."""
    cases = [(o, c) for o in ("nce", "sigmoid") for c in CASES]
    return cases + [("gram", c) for c in GRAM_CASES]


@pytest.mark.parametrize("objective,case", _small_cases(),
                         ids=[f"{o}-{str(sorted(c)) or 'plain'}" for o, c in _small_cases()])
@pytest.mark.parametrize("learnable", [False, True])
def test_small_path_matches_the_tiled_kernels(objective, case, learnable, monkeypatch, triton_only):
    """The one-program path and the tiled kernels give the same loss, gradients and statistics (GRAM's against
    the float64 formula at every k and case: tests/test_gram.py)."""
    from fastpair.kernels import small

    n = 24
    kw = case_kwargs(case, n)
    if objective == "sigmoid":
        kw.pop("label_smoothing", None)
    zs, temperature = case_inputs(kw, n, seed=7)
    if objective == "gram":
        temperature = 0.1
    zs = on(zs, "triton")
    kw = {k: v.to(zs[0].device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    outputs = []
    for max_n in (small.MAX_N, 0):
        monkeypatch.setattr(small, "MAX_N", max_n)
        leaves = [z.detach().requires_grad_() for z in zs]
        params = _learnable(objective, temperature, zs[0].device) if learnable else {"temperature": temperature}
        loss, stats = LOSSES[objective](*leaves, backend="triton", return_stats=True, **params, **kw)
        loss.backward()
        outputs.append([loss, *(stats[k] for k in sorted(stats)), *(z.grad for z in leaves)]
                       + [p.grad for p in params.values() if isinstance(p, torch.Tensor)])
    for a, b in zip(*outputs):
        torch.testing.assert_close(a, b, rtol=2e-5, atol=2e-6)


@pytest.mark.parametrize("objective", SMALL)
def test_small_path_is_one_launch_and_the_same_bits_every_run(objective, triton_only):
    from costs import measure

    zs = on(make_embeddings(3, 20, 12, seed=8), "triton")
    params = _learnable(objective, 0.1, zs[0].device)

    def step():
        loss = LOSSES[objective](*zs, backend="triton", **params)
        loss.backward()
        return [loss.detach().clone()] + [x.grad.clone() for x in (*zs, *params.values())]

    first = step()
    for x in (*zs, *params.values()):
        x.grad = None
    costs, second = measure(step)
    assert costs.launches == 1
    assert all(torch.equal(a, b) for a, b in zip(first, second))


@pytest.mark.parametrize("m,n,launches", [(3, 64, 1), (4, 32, 1), (4, 33, 3)])
def test_gram_small_path_rows(m, n, launches, triton_only):
    """GRAM's one program takes N <= 64, and N <= 32 for k = 3 (kernels/gram_small.MAX_N_K3: at 64 rows it spills
    on sm_100a); above, the tiled kernels (two sweeps and one gradient panel here)."""
    from costs import measure

    zs = on(make_embeddings(m, n, 8, seed=9), "triton")
    costs, _ = measure(lambda: gram_nce(*zs, backend="triton").backward())
    assert costs.launches == launches, costs


BAD_PARAMETERS = [("nce", "temperature", v) for v in (-0.1, 0.0, float("inf"), float("nan"))] + [
    ("sigmoid", "temperature", 0.0), ("sigmoid", "bias", float("inf")), ("sigmoid", "bias", float("nan")),
    ("gram", "temperature", -0.1), ("gram", "temperature", float("nan"))]


@pytest.mark.parametrize("objective,name,bad", BAD_PARAMETERS)
def test_small_path_invalid_parameter_tensor_gives_nan(objective, name, bad, triton_only):
    zs = on(make_embeddings(3, 16, 8, seed=24), "triton")
    value = {"temperature": 0.1, "bias": -1.0}[name]
    values = [bad] if objective == "gram" else [value, bad, value]  # GRAM: one temperature
    params = {name: torch.tensor(values, device=device_for("triton"))}
    loss, stats = LOSSES[objective](*zs, backend="triton", return_stats=True, **params)
    losses = stats["direction_losses" if objective == "gram" else "pair_losses"]
    assert torch.isnan(loss) and torch.isnan(losses).all()


def test_small_path_rows_follow_the_compile_report(triton_only):
    """The one program holds 64 rows except where the compile report found it spilling: IEEE fp32, and GPUs
    before Hopper (32 rows there)."""
    from fastpair.kernels import small

    assert small.max_block(80) == small.max_block(89) == 32 and small.max_block(90) == small.max_block(100) == 64
    z = torch.zeros(64, 8)
    matmul = torch.backends.cuda.matmul
    before = matmul.fp32_precision
    try:
        matmul.fp32_precision = "ieee"
        assert small.max_rows(z) == 32 and small.max_rows(z.half()) == 64
        matmul.fp32_precision = "none"
        assert small.max_rows(z) == 64
    finally:
        matmul.fp32_precision = before
