"""pairwise_sigmoid (SigLIP's loss for every modality pair) on both backends, against the float64 reference."""

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
    open_clip_loss,
    randn,
    small,
)

from fastpair import PairwiseSigmoid, pairwise_sigmoid
from fastpair.reference import pairwise_sigmoid_reference, siglip_loss_reference

CASES = {
    "plain": dict(),
    "bias-per-pair": dict(bias=[-10.0, -2.0, 1.0]),
    "mask-weights": dict(mask=True, weights=[0.5, 0.0, 2.0]),
    "clips": dict(ids="clips", bias=-1.0),
    "labels-mask": dict(ids="labels", mask=True, bias=[-3.0, 0.0, 2.0]),
    "anchor": dict(pairs=[(0, 1), (0, 2)], bias=[-4.0, -1.0]),
    "reversed-ids": dict(pairs=[(2, 0), (1, 2)], ids="clips", bias=-0.5),
    "unnormalized": dict(normalize=False, ids="labels", bias=-1.0),
}


def _kwargs(case: str, n: int, m: int = 3) -> dict:
    return case_kwargs(CASES[case], n, m, mask_seed=6)


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("learnable", [False, True])
def test_matches_reference(case, learnable, backend):
    n = small(45, backend)
    kw = _kwargs(case, n)
    zs, temperature = case_inputs(kw, n, seed=41)
    if learnable and not isinstance(kw.get("bias", -10.0), list):
        kw["bias"] = [kw.get("bias", -10.0)] * len(temperature)  # a (P,) bias tensor that learns
    check_against_reference(zs, backend, temperature=temperature, learnable=learnable, block_size=16,
                            objective="sigmoid", **kw)


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
def test_torch_backend_block_sizes_and_dtypes(dtype):
    kw = _kwargs("labels-mask", 50)
    zs = make_embeddings(3, 50, 5, seed=42, dtype=dtype)
    check_against_reference(zs, "torch", temperature=[0.05, 0.1, 0.2], learnable=True, block_size=7,
                            objective="sigmoid", **kw)


@pytest.mark.parametrize("temperature,bias", [(0.001, 0.0), (0.01, -60.0), (0.5, 40.0), (100.0, -10.0)])
def test_extreme_logits_stay_exact(temperature, bias, backend):
    """softplus and sigmoid of S + b in (-1000, 1000) neither overflow nor lose the small terms."""
    zs = make_embeddings(3, small(30, backend), 8, seed=43)
    check_against_reference(zs, backend, temperature=temperature, bias=bias, objective="sigmoid")


@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(normalize):
    zs = make_embeddings(3, 8, 3, seed=44, dtype=torch.float64)
    if not normalize:
        zs = [(z.detach() * 0.3).requires_grad_() for z in zs]
    t = torch.tensor([0.2, 0.3], dtype=torch.float64, requires_grad=True)
    b = torch.tensor([-1.0, 0.5], dtype=torch.float64, requires_grad=True)
    mask = torch.ones(3, 8, dtype=torch.bool)
    mask[1, 2] = mask[2, 5] = False
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 2, 3])

    def fn(t, b, *zs):
        return pairwise_sigmoid(*zs, temperature=t, bias=b, pairs=[(1, 0), (0, 2)], ids=ids, mask=mask,
                                normalize=normalize, block_size=3)

    assert torch.autograd.gradcheck(fn, (t, b, *zs), eps=1e-6, atol=1e-5, rtol=1e-4)


@pytest.mark.parametrize("n", [1, 7, 40])
def test_two_modalities_equal_siglip(n, backend):
    """M = 2 is open_clip's SigLipLoss on one device (logit_scale = 1/t, logit_bias = b), loss and grads."""
    image, text = on(make_embeddings(2, small(n, backend), 10, seed=45), backend)
    ours = pairwise_sigmoid(image, text, temperature=0.1, bias=-10.0, backend=backend)
    grads = torch.autograd.grad(ours, (image, text))
    expected = siglip_loss_reference(image, text, 10.0, -10.0)
    assert_close(ours, expected, name="loss")
    for g, e in zip(grads, torch.autograd.grad(expected, (image, text))):
        assert_close(g, e, name="grad", magnitude=e.abs().max().item())


@pytest.mark.parametrize("temperature,bias", [(0.1, -10.0), (0.05, 3.0)])
def test_two_modalities_equal_open_clip(temperature, bias, backend):
    """open_clip's SigLipLoss on normalized features, logit_scale = 1/t, logit_bias = b: loss and gradients."""
    peer = open_clip_loss().SigLipLoss()
    image, text = on(make_embeddings(2, small(33, backend), 16, seed=46), backend)
    ours = pairwise_sigmoid(image, text, temperature=temperature, bias=bias, backend=backend)
    ours_grads = torch.autograd.grad(ours, (image, text))
    expected = peer(F.normalize(image, dim=-1), F.normalize(text, dim=-1), 1 / temperature, bias)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(ours_grads, torch.autograd.grad(expected, (image, text))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


def test_fast_and_deterministic_paths_agree(deterministic_algorithms, triton_only):
    zs = on(make_embeddings(3, small(40, "triton"), 12, seed=47), "triton")
    out = []
    for deterministic in (True, False):
        torch.use_deterministic_algorithms(deterministic)
        for z in zs:
            z.grad = None
        loss = pairwise_sigmoid(*zs, temperature=0.1, bias=-2.0, backend="triton")
        loss.backward()
        out.append([loss.detach().clone()] + [z.grad.clone() for z in zs])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_torch_error(dtype, backend):
    """Error vs float64 is at most 2x PyTorch's own same-dtype error (plus a small atol)."""
    zs64 = make_embeddings(3, small(64, backend), 32, seed=48, dtype=torch.float64)
    zs = [z.detach().to(dtype).to(device_for(backend)).requires_grad_() for z in zs64]
    exact = [z.detach().cpu().double().requires_grad_() for z in zs]
    ref = pairwise_sigmoid_reference(*exact, temperature=0.1, bias=-5.0)
    ref.backward()
    ours = pairwise_sigmoid(*zs, temperature=0.1, bias=-5.0, backend=backend)
    ours.backward()
    same = [z.detach().clone().requires_grad_() for z in zs]
    torch_loss = pairwise_sigmoid_reference(*same, temperature=0.1, bias=-5.0, upcast=False)
    torch_loss.backward()
    assert ours.dtype == torch.float32
    assert (ours.double().cpu() - ref).abs() <= 2 * (torch_loss.double().cpu() - ref).abs() + 1e-5 * ref.abs()
    for z, s, e in zip(zs, same, exact):
        assert z.grad.dtype == dtype
        ours_err = (z.grad.double().cpu() - e.grad).abs().max()
        torch_err = (s.grad.double().cpu() - e.grad).abs().max()
        assert ours_err <= 2 * torch_err + 1e-5 * e.grad.abs().max(), (ours_err, torch_err)


def test_module_learns_temperature_and_bias():
    module = PairwiseSigmoid(3, per_pair=True, pairs=[(0, 1), (0, 2)])
    assert module.log_temperature.shape == (2,) and module.bias.shape == (2,)
    assert torch.allclose(module.temperature, torch.full((2,), 0.1)) and torch.all(module.bias == -10.0)
    zs = make_embeddings(3, 12, 4, seed=49)
    ids = torch.arange(12) // 3
    loss, stats = module(*zs, ids=ids, return_stats=True)
    loss.backward()
    expected = pairwise_sigmoid(*zs, temperature=torch.full((2,), 0.1), bias=torch.full((2,), -10.0),
                                pairs=[(0, 1), (0, 2)], ids=ids)
    assert_close(loss, expected, name="module loss")
    assert module.log_temperature.grad.shape == (2,) and module.bias.grad.shape == (2,)
    assert stats["pair_accuracy"].shape == (2, 2)
    fixed = PairwiseSigmoid(2, learn_temperature=False, learn_bias=False)
    assert len(list(fixed.parameters())) == 0
    assert {"log_temperature", "bias"} <= set(dict(fixed.named_buffers()))


@pytest.mark.parametrize(
    "kwargs,error,words",
    [({"bias": float("nan")}, ValueError, "bias must be finite"),
     ({"bias": float("inf")}, ValueError, "bias must be finite"),
     ({"bias": torch.tensor([0.0, float("nan"), 1.0])}, ValueError, "bias must be finite"),
     ({"bias": torch.tensor([0.0, 1.0])}, ValueError, "one entry per pair (3)"),
     ({"bias": torch.zeros(3, 1)}, ValueError, "one entry per pair (3)"),
     ({"bias": torch.tensor(1, dtype=torch.int64)}, TypeError, "floating point"),
     ({"bias": "-10"}, TypeError, "bias must be a number"),
     ({"bias": [1.0, 2.0]}, ValueError, "one entry per pair (3 pairs)"),
     ({"temperature": 0.0}, ValueError, "> 0"),
     ({"pairs": [(0, 0)]}, ValueError, "itself"),
     ({"ids": torch.zeros(5)}, TypeError, "int64"),
     ({"label_smoothing": 0.1}, TypeError, "label_smoothing")],
)
def test_bad_input(kwargs, error, words):
    zs = make_embeddings(3, 8, 4, requires_grad=False)
    with pytest.raises(error) as info:
        pairwise_sigmoid(*zs, **kwargs)
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("kwargs", [{"bias": float("nan")}, {"bias": "x"}, {"num_modalities": 1},
                                    {"temperature": -1.0}, {"pairs": []}, {"backend": "x"}])
def test_module_bad_arguments(kwargs):
    with pytest.raises((ValueError, TypeError)):
        PairwiseSigmoid(**{"num_modalities": 3, **kwargs})


def test_compiled_step_keeps_one_graph(triton_only):
    """The Triton path is a pair of custom ops: a training step compiles with fullgraph=True."""
    torch._dynamo.reset()
    dev = device_for("triton")
    enc = torch.nn.ModuleList([torch.nn.Linear(8, 16) for _ in range(3)]).to(dev)
    xs = [randn(24, 8, seed=k, device=dev) for k in range(3)]
    loss_fn = PairwiseSigmoid(3, per_pair=True, backend="triton").to(dev)

    def step(*xs):
        return loss_fn(*[e(x) for e, x in zip(enc, xs)], ids=torch.arange(24, device=dev) // 2)

    eager = step(*xs)
    eager.backward()
    params = list(enc.parameters()) + list(loss_fn.parameters())
    grads = [p.grad.clone() for p in params]
    for p in params:
        p.grad = None
    loss = torch.compile(step, fullgraph=True)(*xs)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(params, grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("with_ids", [False, True])
def test_custom_ops_pass_opcheck(with_ids, triton_only):
    from fastpair.kernels import sigmoid_ops

    dev = device_for("triton")
    zs = [randn(20, 8, seed=k, device=dev).requires_grad_() for k in range(3)]
    t = torch.tensor([0.05, 0.1, 0.2], device=dev, requires_grad=True)
    b = torch.tensor([-1.0, 0.0, 2.0], device=dev, requires_grad=True)
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(3)).to(dev) > 0.2
    ids = torch.arange(20, device=dev) // 3 if with_ids else None
    torch.library.opcheck(sigmoid_ops.pairwise_sigmoid_fwd,
                          (zs, t, [], b, [], mask, [1.0, 2.0, 0.5], True, False, [], 0, "", [0, 1, 0, 2, 1, 2], ids),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))
