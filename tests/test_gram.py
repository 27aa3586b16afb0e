"""gram_nce and GramNCE: GRAM's volume loss against its materialized float64 formula, its identities and its
bad inputs. (Two ranks: tests/test_distributed.py; costs: tests/test_costs.py.)"""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from helpers import assert_close, condition_scale, device_for, make_embeddings, triton_runs

from fastpair import GramNCE, gram_nce, pairwise_nce
from fastpair.reference import gram_nce_reference
from fastpair.volumes import det_adj

CASES = {
    "plain": dict(),
    "cold": dict(temperature=0.004),  # 1/t above the bound: the online logsumexp variant
    "warm": dict(temperature=0.7),
    "ids": dict(ids="ids"),
    "smoothing": dict(label_smoothing=0.15),
    "ids-smoothing-cold": dict(ids="ids", label_smoothing=0.1, temperature=0.005),
    "mask": dict(mask="mask"),
    "mask-ids-cold": dict(mask="mask", ids="ids", temperature=0.003),
    "anchor-last": dict(anchor=-1),
}


def _kwargs(case: str, m: int, n: int) -> dict:
    kw = dict(CASES[case])
    if kw.get("ids") == "ids":
        kw["ids"] = torch.randint(0, max(2, n // 3), (n,), generator=torch.Generator().manual_seed(3))
    if kw.get("mask") == "mask":
        mask = torch.rand(m, n, generator=torch.Generator().manual_seed(4)) > 0.2
        mask[:, :2] = True
        kw["mask"] = mask
    if kw.get("anchor") == -1:
        kw["anchor"] = m - 1
    return kw


def _check(zs, kw, block_size=None, dtype=torch.float64, learnable=False, backend="torch"):
    """Loss, both directions' statistics and every gradient (the temperature's too) against the reference."""
    t = torch.tensor(kw.pop("temperature", 0.07), dtype=torch.float64)
    device = device_for(backend)
    leaves = [z.detach().clone().to(device).requires_grad_() for z in zs]
    t_here = t.clone().to(device).requires_grad_() if learnable else float(t)
    on_device = {k: v.to(device) if isinstance(v, torch.Tensor) else v for k, v in kw.items()}
    loss, stats = gram_nce(*leaves, temperature=t_here, block_size=block_size, return_stats=True, backend=backend,
                           **on_device)
    t_ref = t.clone().requires_grad_() if learnable else float(t)
    ref_leaves = [z.detach().clone().requires_grad_() for z in zs]
    ref, ref_stats = gram_nce_reference(*ref_leaves, temperature=t_ref, return_stats=True, **kw)
    assert loss.dtype == (torch.float64 if dtype == torch.float64 else torch.float32)
    (loss + 0.0).backward()
    ref.backward()
    scale = condition_scale(float(t))
    assert_close(loss, ref, dtype=dtype, scale=scale, name="loss")
    for k, (a, b) in enumerate(zip(leaves, ref_leaves)):
        assert_close(a.grad, b.grad.to(a.dtype), dtype=dtype, scale=scale, name=f"grad {k}",
                     magnitude=float(b.grad.abs().max()))
    if learnable:
        assert_close(t_here.grad, t_ref.grad, dtype=dtype, scale=scale, name="dL/dt")
    assert_close(stats["direction_losses"], ref_stats["direction_losses"], scale=scale, name="direction losses")
    torch.testing.assert_close(stats["direction_accuracy"].cpu(), ref_stats["direction_accuracy"])


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("m", [2, 3, 4])
def test_matches_the_materialized_formula(case, m):
    """Every case, M = 2..4, blocks of 5 rows (ids and masked samples across blocks), learnable t."""
    n = 23
    zs = make_embeddings(m, n, 6, seed=m, dtype=torch.float64)
    _check(zs, _kwargs(case, m, n), block_size=5, learnable=True)


def _path(path: str, monkeypatch):
    """"small": the one-program kernel (kernels/gram_small.py) where N allows; "tiled": the tiled kernels."""
    if not triton_runs():
        pytest.skip("Triton is not available here")
    if path == "tiled":
        from fastpair.kernels import small

        monkeypatch.setattr(small, "MAX_N", 0)


@pytest.mark.parametrize("case", sorted(CASES))
@pytest.mark.parametrize("m", [2, 3, 4])
@pytest.mark.parametrize("path", ["small", "tiled"])
def test_triton_kernels_match_the_materialized_formula(case, m, path, monkeypatch):
    """The Triton kernels (k = 1, 2, 3) in float32, every case, a learnable t: to float32's rounding; the tiled
    kernels with N spanning two tiles and a partial one (the interpreter on CPU, or a GPU), the one program
    (its closed-form adjugates and dL/dC_j) at N = 30 (padded to 32 rows)."""
    _path(path, monkeypatch)
    n = 30 if path == "small" else 70 if torch.cuda.is_available() else 33
    zs = make_embeddings(m, n, 20, seed=30 + m, dtype=torch.float64)
    _check([z.float() for z in zs], _kwargs(case, m, n), dtype=torch.float32, learnable=True, backend="triton")


def test_triton_backward_in_several_panels(monkeypatch):
    """Panels of 64 rows (launch.PANEL_BYTES): the row loop of a large batch, at N = 150."""
    if not triton_runs():
        pytest.skip("Triton is not available here")
    from fastpair.kernels import launch

    monkeypatch.setattr(launch, "PANEL_BYTES", 64 * 150 * 4 * 2)
    zs = make_embeddings(3, 150, 8, seed=40, dtype=torch.float64)
    kw = dict(_kwargs("mask-ids-cold", 3, 150), temperature=0.05)  # 1/t = 333 would amplify fp32's rounding
    _check([z.float() for z in zs], kw, dtype=torch.float32, learnable=True, backend="triton")


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("path", ["small", "tiled"])
def test_triton_kernels_in_16_bit(dtype, path, monkeypatch):
    """16-bit inputs: 16-bit operands, fp32 accumulation and volumes, the gradients in the inputs' dtype: the
    loss and the gradients to 16-bit rounding (2^-8 relative, amplified by 1/t)."""
    _path(path, monkeypatch)
    device = device_for("triton")
    zs = [z.to(dtype) for z in make_embeddings(3, 40, 24, seed=50, requires_grad=False)]
    leaves = [z.clone().to(device).requires_grad_() for z in zs]
    loss = gram_nce(*leaves, backend="triton", ids=torch.arange(40, device=device) // 2)
    loss.backward()
    ref_leaves = [z.double().requires_grad_() for z in zs]
    ref = gram_nce_reference(*ref_leaves, ids=torch.arange(40) // 2)
    ref.backward()
    assert loss.dtype == torch.float32 and abs(loss.item() - ref.item()) < 5e-3 * abs(ref.item())
    for a, b in zip(leaves, ref_leaves):
        assert a.grad.dtype == dtype
        err = (a.grad.double().cpu() - b.grad).abs().max() / b.grad.abs().max()
        assert err < 2e-2, float(err)


@pytest.mark.parametrize("m", [5, 6])
def test_larger_tuples(m):
    """k = 4, 5: the adjugate by cofactors of minors."""
    zs = make_embeddings(m, 12, 8, seed=10 + m, dtype=torch.float64)
    _check(zs, _kwargs("mask-ids-cold", m, 12), block_size=4)


def test_float32_and_low_precision_inputs():
    """float32 computes in float32, to its rounding; bf16 and fp16 inputs compute in float32 and return
    their gradients in their own dtype."""
    zs = make_embeddings(3, 64, 16, seed=5, dtype=torch.float64)
    _check([z.float() for z in zs], _kwargs("ids", 3, 64), block_size=16, dtype=torch.float32, learnable=True)
    for dtype in (torch.bfloat16, torch.float16):
        low = [z.detach().to(dtype).requires_grad_() for z in zs]
        loss = gram_nce(*low)
        loss.backward()
        assert loss.dtype == torch.float32 and all(z.grad.dtype == dtype for z in low)
        ref = gram_nce_reference(*(z.detach().double() for z in low))
        assert abs(loss.item() - ref.item()) < 1e-5 * max(1.0, abs(ref.item()))


@pytest.mark.parametrize("near_zero", [False, True])
def test_gradcheck_float64(near_zero):
    """Finite differences, with masks, ids, smoothing and a learnable t; near_zero puts tuples at V close to
    0 (each sample's three modalities nearly parallel, so det G is tiny: the eps_v region)."""
    n, m = 7, 3
    zs = make_embeddings(m, n, 4, seed=20, dtype=torch.float64)
    if near_zero:
        base = zs[0].detach()
        zs = [(base + 1e-3 * z.detach()).requires_grad_() for z in zs]
    t = torch.tensor(0.3, dtype=torch.float64, requires_grad=True)
    mask = torch.ones(m, n, dtype=torch.bool)
    mask[1, 2] = False
    ids = torch.tensor([0, 0, 1, 1, 2, 2, 3])

    def fn(t, *zs):
        return gram_nce(*zs, temperature=t, anchor=1, ids=ids, label_smoothing=0.1, mask=mask, block_size=3)

    assert torch.autograd.gradcheck(fn, (t, *zs), eps=1e-7 if near_zero else 1e-6, atol=1e-5, rtol=1e-4)


def test_two_modalities_are_infonce_on_the_volume_logit():
    """k = 1: V = sqrt(1 - s^2 + eps_v), and the loss is InfoNCE (F.cross_entropy both ways) on -V / t."""
    x, y = make_embeddings(2, 20, 5, seed=6, dtype=torch.float64)
    t = 0.1
    s = F.normalize(x, dim=1) @ F.normalize(y, dim=1).T
    logits = -torch.sqrt(1.0 - s**2 + 1e-8) / t
    labels = torch.arange(20)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_close(gram_nce(x, y, temperature=t), expected, dtype=torch.float64)


def test_three_modalities_written_out():
    """k = 2: det G = 1 + 2 c s1 s2 - s1^2 - s2^2 - c^2 with c = <x_o1,j, x_o2,j> (DESIGN.md)."""
    a, b, c = (F.normalize(z.detach(), dim=1) for z in make_embeddings(3, 9, 4, seed=7, dtype=torch.float64))
    s1, s2, cc = a @ b.T, a @ c.T, (b * c).sum(dim=1)[None, :]
    det = 1 + 2 * cc * s1 * s2 - s1**2 - s2**2 - cc**2
    logits = -torch.sqrt(det.clamp(min=0) + 1e-8) / 0.07
    labels = torch.arange(9)
    expected = (F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2
    assert_close(gram_nce(a, b, c), expected, dtype=torch.float64)


def test_permuting_the_other_modalities_leaves_the_loss_unchanged():
    """The volume of a set of vectors does not depend on their order; only the anchor is special."""
    zs = make_embeddings(4, 15, 6, seed=8, dtype=torch.float64)
    base = gram_nce(*zs, anchor=1)
    for order in ([1, 0, 2, 3], [3, 1, 2, 0], [2, 3, 1, 0]):
        permuted = [zs[i] for i in order]
        assert_close(gram_nce(*permuted, anchor=order.index(1)), base, dtype=torch.float64)
    assert abs(gram_nce(*zs, anchor=0).item() - base.item()) > 1e-6  # the anchor matters


def test_unique_ids_equal_no_ids():
    zs = make_embeddings(3, 18, 5, seed=9, dtype=torch.float64)
    plain = gram_nce(*zs, label_smoothing=0.1)
    assert_close(gram_nce(*zs, ids=torch.arange(18), label_smoothing=0.1), plain, dtype=torch.float64)


def test_single_valid_sample_is_exactly_zero():
    zs = make_embeddings(3, 1, 4, seed=11)
    loss = gram_nce(*zs)
    loss.backward()
    assert float(loss) == 0.0 and all(float(z.grad.abs().max()) == 0.0 for z in zs)
    zs = make_embeddings(3, 6, 4, seed=12)
    mask = torch.zeros(3, 6, dtype=torch.bool)
    mask[:, 4] = True
    assert float(gram_nce(*zs, mask=mask)) == 0.0


def test_missing_modalities_get_no_gradient_and_change_nothing():
    """A sample without all M modalities takes no part: its embeddings get a zero gradient, and the loss is
    that of the batch without it."""
    zs = make_embeddings(3, 12, 5, seed=13, dtype=torch.float64)
    mask = torch.ones(3, 12, dtype=torch.bool)
    mask[2, 3] = mask[0, 7] = False
    loss = gram_nce(*zs, mask=mask)
    loss.backward()
    keep = mask.all(dim=0)
    assert_close(loss, gram_nce(*(z.detach()[keep] for z in zs)), dtype=torch.float64)
    for z in zs:
        assert float(z.grad[~keep].abs().max()) == 0.0


def test_aligned_tuples_score_best():
    """Each sample's modalities built from one shared vector: the positives have the smallest volumes, so
    top-1 retrieval is perfect both ways and the loss is below that of independent embeddings (about log N).
    (Not far below: a column whose two other modalities nearly coincide spans a small volume with any anchor,
    so the negatives of an aligned batch are small too.)"""
    base = make_embeddings(1, 32, 16, seed=14, requires_grad=False)[0]
    zs = [base + 0.05 * e for e in make_embeddings(3, 32, 16, seed=15, requires_grad=False)]
    loss, stats = gram_nce(*zs, return_stats=True)
    assert stats["direction_accuracy"].tolist() == [1.0, 1.0]
    independent, stats = gram_nce(*make_embeddings(3, 32, 16, seed=16, requires_grad=False), return_stats=True)
    assert float(loss) < float(independent) and float(stats["direction_accuracy"].max()) < 0.5


def test_adjugate_is_det_times_inverse():
    """det_adj's closed forms and cofactors against det C C^-1 for invertible C, k = 1..5."""
    for k in range(1, 6):
        x = torch.randn(7, k, k + 3, dtype=torch.float64, generator=torch.Generator().manual_seed(k))
        c = x @ x.transpose(1, 2)
        det, adj = det_adj(c)
        assert_close(det, torch.linalg.det(c), dtype=torch.float64, name=f"det k={k}")
        assert_close(adj, torch.linalg.det(c)[:, None, None] * torch.linalg.inv(c), dtype=torch.float64,
                     name=f"adj k={k}")


def test_module_learns_its_temperature():
    zs = make_embeddings(3, 10, 4, seed=16)
    module = GramNCE(3, anchor=2, temperature=0.1)
    loss, stats = module(*zs, return_stats=True)
    loss.backward()
    assert module.log_temperature.grad is not None and set(stats) == {"direction_losses", "direction_accuracy"}
    expected = gram_nce(*(z.detach() for z in zs), anchor=2, temperature=0.1)
    assert_close(loss, expected)
    assert math.isclose(float(module.temperature), 0.1, rel_tol=1e-6)
    fixed = GramNCE(3, learn_temperature=False)
    assert "log_temperature" in dict(fixed.named_buffers()) and not list(fixed.parameters())


@pytest.mark.parametrize("call, error, words", [
    (lambda z: gram_nce(z[0]), ValueError, "at least 2"),
    (lambda z: gram_nce(*z, anchor=3), ValueError, "anchor must be the index"),
    (lambda z: gram_nce(*z, anchor=-1), ValueError, "anchor must be the index"),
    (lambda z: gram_nce(*z, anchor=True), ValueError, "anchor must be the index"),
    (lambda z: gram_nce(*z, normalize=False), ValueError, "normalize=True"),
    (lambda z: gram_nce(*z, temperature=0.0), ValueError, "temperature must be finite and > 0"),
    (lambda z: gram_nce(*z, temperature=torch.ones(2)), ValueError, "one entry per pair (1)"),
    (lambda z: gram_nce(*z, mask=torch.ones(2, 4, dtype=torch.bool)), ValueError, "mask must have shape"),
    (lambda z: gram_nce(*z, ids=torch.zeros(3, dtype=torch.long)), ValueError, "ids must have shape"),
    (lambda z: gram_nce(*z, label_smoothing=1.0), ValueError, "label_smoothing"),
    (lambda z: gram_nce(*z, z[0], z[1], backend="triton"), (ValueError, RuntimeError), "at most 4 modalities|"
     "needs Triton|CUDA tensors"),
    (lambda z: gram_nce(*z, backend="cuda"), ValueError, "backend must be one of"),
    (lambda z: GramNCE(3, anchor=3), ValueError, "anchor must be an int"),
    (lambda z: GramNCE(1), ValueError, "num_modalities must be an int >= 2"),
    (lambda z: GramNCE(3)(z[0], z[1]), ValueError, "takes 3 embeddings"),
])
def test_bad_inputs_say_what_was_expected(call, error, words):
    zs = make_embeddings(3, 4, 3, seed=17)
    with pytest.raises(error, match=words.replace("(", r"\(").replace(")", r"\)")):
        call(zs)


def test_meta_tensors_propagate_shapes():
    zs = [torch.empty(8, 4, device="meta", requires_grad=True) for _ in range(3)]
    loss, stats = gram_nce(*zs, return_stats=True)
    assert loss.shape == () and stats["direction_losses"].shape == (2,)


def test_costs_no_n_by_n_tensor_is_held_beyond_a_block():
    """The forward saves O(N) for the backward, whatever the batch: nothing N x N survives the call."""
    n = 600
    zs = make_embeddings(3, n, 8, seed=18)
    saved = []

    def pack(t):
        saved.append(t.numel())
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        gram_nce(*zs, block_size=64)
    assert saved and max(saved) <= n * 8


def test_same_as_pairwise_machinery_where_it_must_be():
    """Sanity link to the pairwise loss: with M = 2 both rank the same candidates when every similarity is
    positive (V decreases as |s| grows), so top-1 retrievals agree on an aligned batch."""
    base = make_embeddings(1, 24, 12, seed=19, requires_grad=False)[0].abs()
    x, y = base + 0.1 * torch.rand(24, 12), base + 0.1 * torch.rand(24, 12)
    _, gram_stats = gram_nce(x, y, return_stats=True)
    _, pair_stats = pairwise_nce(x, y, return_stats=True)
    assert gram_stats["direction_accuracy"].tolist() == pair_stats["pair_accuracy"][0].tolist()
