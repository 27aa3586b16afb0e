"""pairwise_nce against the float64 materialized reference: values, gradients, statistics."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import check_against_reference, device_for, make_embeddings, on, open_clip_loss, randn, small

from fastpair import modality_pairs, pairwise_nce
from fastpair.reference import clip_loss_reference, pairwise_nce_reference


@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("n", [1, 2, 5, 129])
@pytest.mark.parametrize("d", [1, 3, 100])
def test_shapes(m, n, d, backend):
    n = small(n, backend)
    check_against_reference(make_embeddings(m, n, d, seed=n + d), backend)


@pytest.mark.parametrize("temperature", [0.001, 0.01, 0.07, 1.0, 100.0])
@pytest.mark.parametrize("normalize", [True, False])
def test_temperatures(temperature, normalize, backend):
    zs = make_embeddings(3, 37, 8, seed=1)
    if not normalize:  # keep unnormalized logits in a sane range: |S| ~ |z|^2 / t
        zs = [(z.detach() * 0.3).requires_grad_() for z in zs]
    check_against_reference(zs, backend, temperature=temperature, normalize=normalize, block_size=16)


@pytest.mark.parametrize("block_size", [1, 3, 16, 64, 1000])
def test_block_sizes_agree(block_size):
    check_against_reference(make_embeddings(3, 50, 7, seed=2), block_size=block_size)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
@pytest.mark.parametrize("temperature", [0.05, [0.05, 0.1, 0.2], 0.002])
def test_learnable_temperature(dtype, temperature, backend):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 runs on the torch backend only")
    zs = make_embeddings(3, 40, 6, seed=3, dtype=dtype)
    check_against_reference(zs, backend, temperature=temperature, learnable=True, block_size=16)


def test_per_pair_temperature_is_not_summed():
    zs = make_embeddings(3, 30, 5, seed=4)
    t = torch.tensor([0.05, 0.1, 0.2], requires_grad=True)
    pairwise_nce(*zs, temperature=t).backward()
    assert t.grad.shape == (3,)
    assert len(set(t.grad.tolist())) == 3


@pytest.mark.parametrize("m", [3, 4])
def test_weights(m, backend):
    num_pairs = m * (m - 1) // 2
    weights = [float(k % 3) for k in range(num_pairs)]  # includes zero weights
    weights[0] = 0.5
    check_against_reference(make_embeddings(m, 33, 4, seed=5), backend, weights=weights, block_size=8)


@pytest.mark.parametrize("temperature", [0.07, 0.001])
@pytest.mark.parametrize("normalize", [True, False])
def test_mask(temperature, normalize, backend):
    n = small(61, backend)
    zs = make_embeddings(3, n, 6, seed=6)
    mask = torch.rand(3, n, generator=torch.Generator().manual_seed(0)) > 0.3
    mask[:, 7] = torch.tensor([True, False, False])  # sample 7 misses two modalities
    _, _, zs = check_against_reference(zs, backend, temperature=temperature, mask=mask, normalize=normalize,
                                       block_size=16)
    mask = mask.to(zs[0].device)
    assert torch.all(zs[0].grad[7] == 0) and torch.all(zs[1].grad[7] == 0) and torch.all(zs[2].grad[7] == 0)
    missing = ~mask
    for k in range(3):
        assert torch.all(zs[k].grad[missing[k]] == 0)


def test_mask_pair_without_valid_sample(backend):
    zs = make_embeddings(3, 20, 5, seed=7)
    mask = torch.ones(3, 20, dtype=torch.bool)
    mask[1, :10] = False
    mask[2, 10:] = False  # pair (audio, vision) has no valid sample
    loss, stats, _ = check_against_reference(zs, backend, mask=mask, block_size=8)
    assert stats["pair_losses"][2] == 0 and torch.all(stats["pair_accuracy"][2] == 0)
    # the loss is the mean over the two pairs that have samples
    assert torch.allclose(loss, stats["pair_losses"][:2].mean(), atol=1e-6)


def test_mask_everything_missing_gives_zero_loss_and_zero_grads(backend):
    zs = on(make_embeddings(2, 6, 3, seed=8), backend)
    mask = torch.zeros(2, 6, dtype=torch.bool, device=zs[0].device)
    t = torch.tensor(0.1, requires_grad=True)
    loss, stats = pairwise_nce(*zs, temperature=t, mask=mask, return_stats=True, backend=backend)
    loss.backward()
    assert loss.item() == 0.0
    assert all(torch.all(z.grad == 0) for z in zs)
    assert t.grad.item() == 0.0
    assert torch.all(stats["pair_accuracy"] == 0)


def test_zero_vectors(backend):
    zs = make_embeddings(3, 9, 4, seed=9)
    with torch.no_grad():
        zs[0][3] = 0.0
        zs[2][5] = 0.0
    check_against_reference(zs, backend)


def test_non_contiguous_inputs(backend):
    dev = device_for(backend)
    views = [randn(12, 20, seed=10 + k, device=dev).T.requires_grad_() for k in range(3)]  # transposed leaves
    assert not views[0].is_contiguous()
    loss = pairwise_nce(*views, backend=backend)
    loss.backward()
    dense = [v.detach().contiguous().requires_grad_() for v in views]
    expected = pairwise_nce(*dense, backend=backend)
    expected.backward()
    assert torch.allclose(loss, expected, atol=1e-6)
    for v, c in zip(views, dense):
        assert torch.allclose(v.grad, c.grad, atol=1e-6)
    strided = [randn(40, 12, seed=k, device=dev)[::2, ::3] for k in range(3)]  # non-leaf strided views
    check_against_reference([s.clone().requires_grad_() for s in strided], backend)


def test_stats_on_easy_batch_are_perfect(backend):
    x = torch.eye(8, device=device_for(backend))
    loss, stats = pairwise_nce(x, x.clone(), x.clone(), temperature=0.1, return_stats=True, backend=backend)
    assert torch.all(stats["pair_accuracy"] == 1.0)
    assert stats["pair_losses"].shape == (3,)


def test_deterministic(backend, deterministic_algorithms):
    """Under torch.use_deterministic_algorithms(True) two runs agree bitwise (the torch backend always does)."""
    zs = on(make_embeddings(3, small(300, backend), 16, seed=11), backend)
    results = []
    for _ in range(2):
        for z in zs:
            z.grad = None
        loss = pairwise_nce(*zs, temperature=0.05, block_size=64, backend=backend)
        loss.backward()
        results.append([loss.detach().clone()] + [z.grad.clone() for z in zs])
    for a, b in zip(*results):
        assert torch.equal(a, b)


def test_pairs_order(backend):
    assert modality_pairs(3) == [(0, 1), (0, 2), (1, 2)]
    zs = on(make_embeddings(3, 16, 4, seed=12, requires_grad=False), backend)
    _, stats = pairwise_nce(*zs, return_stats=True, backend=backend)
    for k, (p, q) in enumerate(modality_pairs(3)):
        alone = pairwise_nce(zs[p], zs[q], backend=backend)
        assert torch.allclose(stats["pair_losses"][k], alone, atol=1e-6)


@pytest.mark.parametrize("n", [1, 7, 64])
def test_two_modalities_equal_clip(n, backend):
    image, text = on(make_embeddings(2, n, 10, seed=13, requires_grad=False), backend)
    ours = pairwise_nce(image, text, temperature=0.07, backend=backend)
    assert torch.allclose(ours, clip_loss_reference(image, text, 1 / 0.07), atol=1e-5)


@pytest.mark.parametrize("temperature", [0.07, 0.01])
def test_two_modalities_equal_open_clip(temperature, backend):
    """open_clip's ClipLoss on normalized features with logit_scale = 1/t: loss and gradients."""
    peer = open_clip_loss().ClipLoss()
    image, text = on(make_embeddings(2, small(33, backend), 16, seed=14), backend)
    ours = pairwise_nce(image, text, temperature=temperature, backend=backend)
    ours_grads = torch.autograd.grad(ours, (image, text))
    expected = peer(F.normalize(image, dim=-1), F.normalize(text, dim=-1), 1 / temperature)
    torch.testing.assert_close(ours, expected, rtol=1e-5, atol=1e-5)
    for g, e in zip(ours_grads, torch.autograd.grad(expected, (image, text))):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("temperature,mask", [(0.1, False), (0.003, False), (0.1, True)])
@pytest.mark.parametrize("normalize", [True, False])
def test_gradcheck_float64(temperature, mask, normalize):
    zs = make_embeddings(3, 6, 3, seed=15, dtype=torch.float64)
    t = torch.tensor([temperature, 2 * temperature, 3 * temperature], dtype=torch.float64, requires_grad=True)
    m = None
    if mask:
        m = torch.ones(3, 6, dtype=torch.bool)
        m[0, 1] = m[2, 4] = m[1, 4] = False
    if not normalize:
        zs = [(z.detach() * 0.2).requires_grad_() for z in zs]

    def fn(t, *zs):
        return pairwise_nce(*zs, temperature=t, mask=m, normalize=normalize, block_size=4)

    assert torch.autograd.gradcheck(fn, (t, *zs), eps=1e-6, atol=1e-5, rtol=1e-4)


def test_compiled_step_with_float_temperature_and_weights_keeps_one_graph(triton_only):
    torch._dynamo.reset()
    dev = device_for("triton")
    enc = torch.nn.ModuleList([torch.nn.Linear(8, 16) for _ in range(3)]).to(dev)
    xs = [randn(24, 8, seed=k, device=dev) for k in range(3)]

    def step(*xs):
        return pairwise_nce(*[e(x) for e, x in zip(enc, xs)], temperature=0.1, weights=[1, 2, 3], backend="triton")

    eager = step(*xs)
    eager.backward()
    grads = [p.grad.clone() for p in enc.parameters()]
    enc.zero_grad()
    loss = torch.compile(step, fullgraph=True)(*xs)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for p, g in zip(enc.parameters(), grads):
        torch.testing.assert_close(p.grad, g, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_within_torch_error(dtype, backend):
    """Error vs float64 is at most 2x PyTorch's own same-dtype error (plus a small atol)."""
    zs64 = make_embeddings(3, small(64, backend), 32, seed=16, dtype=torch.float64)
    zs = [z.detach().to(dtype).to(device_for(backend)).requires_grad_() for z in zs64]
    exact = [z.detach().cpu().double().requires_grad_() for z in zs]  # the rounded inputs, in float64
    ref = pairwise_nce_reference(*exact, temperature=0.07)
    ref.backward()
    ours = pairwise_nce(*zs, temperature=0.07, backend=backend)
    ours.backward()
    same = [z.detach().clone().requires_grad_() for z in zs]
    torch_loss = pairwise_nce_reference(*same, temperature=0.07, upcast=False)
    torch_loss.backward()

    assert ours.dtype == torch.float32
    assert (ours.double().cpu() - ref).abs() <= 2 * (torch_loss.double().cpu() - ref).abs() + 1e-5
    for z, s, e in zip(zs, same, exact):
        assert z.grad.dtype == dtype
        ours_err = (z.grad.double().cpu() - e.grad).abs().max()
        torch_err = (s.grad.double().cpu() - e.grad).abs().max()
        assert ours_err <= 2 * torch_err + 1e-5 * e.grad.abs().max(), (ours_err, torch_err)


def test_autocast_keeps_fp32_statistics(backend):
    zs = on(make_embeddings(3, small(50, backend), 16, seed=17), backend)
    dev = zs[0].device.type
    expected = pairwise_nce(*zs, temperature=0.05, backend=backend)
    with torch.autocast(dev, dtype=torch.bfloat16):
        inside = pairwise_nce(*zs, temperature=0.05, backend=backend)
    assert inside.dtype == torch.float32
    assert torch.equal(inside, expected)  # fp32 inputs are not silently downcast inside the loss

    lin = torch.nn.Linear(16, 16).to(zs[0].device)
    with torch.autocast(dev, dtype=torch.bfloat16):
        feats = [lin(z) for z in zs]
        assert feats[0].dtype == torch.bfloat16
        loss = pairwise_nce(*feats, temperature=0.05, backend=backend)
    loss.backward()
    assert loss.dtype == torch.float32 and lin.weight.grad is not None and torch.isfinite(lin.weight.grad).all()


def test_inside_torch_compile_training_step(backend):
    """A compiled training step gives the eager loss and gradients, as one graph on either backend (the op
    layer's registered op, fastpair/op.py)."""
    torch._dynamo.reset()
    dev = device_for(backend)
    torch.manual_seed(0)
    enc = torch.nn.ModuleList([torch.nn.Linear(8, 16) for _ in range(3)]).to(dev)
    inputs = [randn(32, 8, seed=k, device=dev) for k in range(3)]
    t = torch.tensor(0.1, requires_grad=True, device=dev)
    mask = torch.ones(3, 32, dtype=torch.bool, device=dev)
    mask[1, :4] = False

    def step(*xs):
        feats = [e(x).relu() for e, x in zip(enc, xs)]
        return pairwise_nce(*feats, temperature=t, mask=mask, backend=backend)

    eager = step(*inputs)
    eager.backward()
    eager_grads = [p.grad.clone() for p in enc.parameters()] + [t.grad.clone()]
    enc.zero_grad()
    t.grad = None
    compiled = torch.compile(step, fullgraph=True)
    loss = compiled(*inputs)
    loss.backward()
    torch.testing.assert_close(loss, eager, rtol=1e-5, atol=1e-6)
    for g, e in zip([p.grad for p in enc.parameters()] + [t.grad], eager_grads):
        torch.testing.assert_close(g, e, rtol=1e-4, atol=1e-6)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_cuda_torch_backend(dtype):
    zs = make_embeddings(3, 300, 64, seed=18, device="cuda", dtype=dtype)
    mask = torch.rand(3, 300, device="cuda") > 0.2
    t = torch.tensor([0.05, 0.07, 0.003], device="cuda", requires_grad=True)
    loss = pairwise_nce(*zs, temperature=t, mask=mask, backend="torch", block_size=64)
    loss.backward()
    refs = [z.detach().double().requires_grad_() for z in zs]
    tr = t.detach().double().requires_grad_()
    ref = pairwise_nce_reference(*refs, temperature=tr, mask=mask)
    ref.backward()
    tol = 2e-4 if dtype == torch.float32 else 2e-2
    torch.testing.assert_close(loss.double(), ref, rtol=tol, atol=tol)
    for z, r in zip(zs, refs):
        torch.testing.assert_close(z.grad.double(), r.grad, rtol=tol, atol=tol * r.grad.abs().max().item())


@pytest.mark.gpu
def test_cuda_autocast_torch_backend():
    """The torch backend on CUDA tensors inside torch.autocast: fp32 statistics, same loss as outside."""
    zs = make_embeddings(3, 200, 32, seed=21, device="cuda")
    expected = pairwise_nce(*zs, temperature=0.05, backend="torch")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        inside = pairwise_nce(*zs, temperature=0.05, backend="torch")
        lin = torch.nn.Linear(32, 32).cuda()
        feats = [lin(z) for z in zs]
        mixed = pairwise_nce(*feats, temperature=0.05, backend="torch")
    assert inside.dtype == torch.float32 and mixed.dtype == torch.float32
    torch.testing.assert_close(inside, expected, rtol=1e-6, atol=1e-6)
    mixed.backward()
    assert torch.isfinite(lin.weight.grad).all()
