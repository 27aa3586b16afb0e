"""Internals of the Triton backend: its two forward paths and several-panel backward against each other and
the reference, the custom ops' registration, and the autotuner's candidate filter."""

from __future__ import annotations

import pytest
import torch
from helpers import assert_close, check_against_reference, device_for, make_embeddings, on, randn, small

from fastpair import pairwise_nce, pairwise_sigmoid
from fastpair.reference import pairwise_nce_reference

pytestmark = pytest.mark.usefixtures("tiled")  # the tiled kernels at every N (not the one-program path)


@pytest.mark.parametrize("normalize", [True, False])
def test_triton_backward_with_several_panels_per_pair(normalize, monkeypatch, triton_only):
    """The W-panel + GEMM backward split into several row panels per pair gives the reference's gradients."""
    from fastpair.kernels import launch

    n = small(70, "triton")
    zs = make_embeddings(3, n, 20, seed=20)
    mask = torch.rand(3, n, generator=torch.Generator().manual_seed(2)) > 0.2
    monkeypatch.setattr(launch, "PANEL_BYTES", 16 * n * 4)  # panels of 16 rows: several per pair
    t = torch.tensor([0.05, 0.1, 0.003])
    check_against_reference([(z.detach() * (1.0 if normalize else 0.3)).requires_grad_() for z in zs], "triton",
                            temperature=t.tolist(), learnable=True, mask=mask, normalize=normalize)


def test_triton_atomic_and_deterministic_paths_agree(deterministic_algorithms, triton_only):
    """The fast path (column sums by atomics) and the atomic-free path compute the same loss and gradients."""
    zs = on(make_embeddings(3, small(100, "triton"), 24, seed=19), "triton")
    mask = torch.rand(3, zs[0].shape[0], generator=torch.Generator().manual_seed(1)).to(zs[0].device) > 0.2
    out = []
    for deterministic in (True, False):
        torch.use_deterministic_algorithms(deterministic)
        for z in zs:
            z.grad = None
        loss = pairwise_nce(*zs, temperature=0.05, mask=mask, backend="triton")
        loss.backward()
        out.append([loss.detach().clone()] + [z.grad.clone() for z in zs])
    for a, b in zip(*out):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("temperature", [[0.05, 0.1, 0.2], [0.05, 0.1, 0.003]], ids=["bounded", "one-unbounded"])
@pytest.mark.parametrize("masked", [False, True])
def test_triton_temperature_tensor_decides_its_bound_on_the_device(temperature, masked, monkeypatch, triton_only):
    """A temperature tensor is never read on the host: the kernels take the fast path when a device flag
    says every 1/t <= 60, the online two-direction statistics otherwise (return_stats off: the path the flag
    decides). Loss and gradients match the float64 reference, and, bounded, the numeric temperature's path."""
    from fastpair.kernels import launch

    flags = []
    forward = launch.forward

    def spy(staged, *args, **kwargs):
        swept = forward(staged, *args, **kwargs)
        flags.append((swept.on_device, None if staged.flag is None else int(staged.flag)))
        return swept

    monkeypatch.setattr(launch, "forward", spy)
    n = small(48, "triton")
    zs = on(make_embeddings(3, n, 12, seed=23), "triton")
    mask = (torch.rand(3, n, generator=torch.Generator().manual_seed(4)) > 0.25).to(zs[0].device) if masked else None
    t = torch.tensor(temperature, device=zs[0].device, requires_grad=True)
    loss = pairwise_nce(*zs, temperature=t, mask=mask, backend="triton")
    loss.backward()
    assert flags == [(True, int(max(1.0 / v for v in temperature) <= 60))]
    refs = [z.detach().cpu().double().requires_grad_() for z in zs]
    t_ref = torch.tensor(temperature, dtype=torch.float64, requires_grad=True)
    expected = pairwise_nce_reference(*refs, temperature=t_ref, mask=None if mask is None else mask.cpu())
    expected.backward()
    scale = 0.01 / min(temperature) if min(temperature) < 0.01 else 1.0
    assert_close(loss, expected, scale=scale, name="loss")
    for k, (z, r) in enumerate(zip(zs, refs)):
        assert_close(z.grad, r.grad, scale=scale, name=f"grad of embedding {k}", magnitude=1.0 / (0.05 * n))
    assert_close(t.grad, t_ref.grad, scale=scale, name="grad of the temperature")
    if max(1.0 / v for v in temperature) <= 60:  # the host's bound gives the same fast path
        numbers = [z.detach().requires_grad_() for z in zs]
        same = pairwise_nce(*numbers, temperature=temperature, mask=mask, backend="triton")
        same.backward()
        torch.testing.assert_close(loss, same, rtol=1e-6, atol=1e-7)
        for z, w in zip(zs, numbers):
            torch.testing.assert_close(z.grad, w.grad, rtol=1e-5, atol=1e-7)
        assert flags[1:] == [(False, None)]  # numbers: the host decides, one direction per pair


@pytest.mark.parametrize("objective,params", [
    ("nce", {"temperature": torch.tensor(-0.1)}), ("nce", {"temperature": torch.tensor([0.1, 0.0, 0.1])}),
    ("nce", {"temperature": torch.tensor(float("inf"))}),
    ("sigmoid", {"temperature": torch.tensor(-1.0), "bias": -10.0}),
    ("sigmoid", {"temperature": 0.1, "bias": torch.tensor([0.0, float("inf"), 1.0])}),
])
def test_triton_invalid_parameter_tensor_gives_nan(objective, params, triton_only):
    """Numbers are checked on the host (ValueError); a tensor's values are not read there (a sync), so the
    Triton backend answers an invalid one with a NaN loss and NaN per-pair losses."""
    fn = pairwise_nce if objective == "nce" else pairwise_sigmoid
    zs = on(make_embeddings(3, 16, 8, seed=24), "triton")
    params = {key: v.to(zs[0].device) if isinstance(v, torch.Tensor) else v for key, v in params.items()}
    loss, stats = fn(*zs, **params, backend="triton", return_stats=True)
    assert torch.isnan(loss) and torch.isnan(stats["pair_losses"]).all()
    valid = {key: (0.1 if key == "temperature" else -10.0) if isinstance(v, torch.Tensor) else v
             for key, v in params.items()}
    assert torch.isfinite(fn(*zs, **valid, backend="triton"))


@pytest.mark.parametrize("objective", ["nce", "sigmoid"])
def test_undefined_loss_gradient_gives_no_gradient(objective, triton_only):
    """The ops do not materialize zero gradients for their statistics' outputs (7 fills a step saved), so
    their backward may receive none for the loss too (as gradcheck's undefined-gradient check sends):
    then no input gets one, in the structure torch.library expects."""
    fn = pairwise_nce if objective == "nce" else pairwise_sigmoid
    zs = on(make_embeddings(3, 16, 8, seed=25), "triton")
    t = torch.tensor(0.1, device=zs[0].device, requires_grad=True)
    loss = fn(*zs, temperature=t, backend="triton")
    undefined = torch._C._functions.UndefinedGrad()(loss)
    grads = torch.autograd.grad(undefined, [*zs, t], allow_unused=True, materialize_grads=False, retain_graph=True)
    assert all(g is None for g in grads)
    loss.backward()
    assert all(z.grad is not None and z.grad.abs().sum() > 0 for z in zs) and t.grad is not None


@pytest.mark.parametrize("targets", ["identity", "ids-smoothing-anchor"])
def test_custom_ops_pass_opcheck(targets, triton_only):
    """torch.library.opcheck: schema, fake (meta) implementations and autograd registration agree."""
    from fastpair.kernels import ops

    dev = device_for("triton")
    zs = [randn(20, 8, seed=k, device=dev).requires_grad_() for k in range(3)]
    t = torch.tensor([0.05, 0.1, 0.2], device=dev, requires_grad=True)
    mask = torch.rand(3, 20, generator=torch.Generator().manual_seed(3)).to(dev) > 0.2
    pairs, ids, eps = [0, 1, 0, 2, 1, 2], None, 0.0
    if targets != "identity":
        t = t[:2].detach().requires_grad_()
        pairs, ids, eps = [1, 0, 2, 0], torch.arange(20, device=dev) // 3, 0.1
    torch.library.opcheck(ops.pairwise_nce_fwd,
                          (zs, t, [], mask, [1.0, 2.0, 0.5][:len(pairs) // 2], True, False, [], 0, "", pairs, ids, eps),
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_autotune_candidates():
    """The autotuner's candidates and filter (pure host logic, so it is checked on every machine)."""
    from fastpair.kernels import tuning as K

    def tiles(configs):
        return [(c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"], c.kwargs["BLOCK_K"], c.num_stages) for c in configs]

    def lpt(c):
        return K.logits_per_thread(c)

    h100, a100 = 227 * 1024, 163 * 1024
    for c in K.GPU_CONFIGS:  # launchable: the registers it lets ptxas use fit an SM's 64 Ki with all its warps
        assert c.maxnreg <= 255 and 32 * c.num_warps * c.maxnreg <= 65536
    # where the compile report found spills, the offer shrinks: 64 logits a thread at most, 32 for Blackwell
    # panels and 3xTF32, 16 for 3xTF32 with a mask on Ampere; IEEE fp32 (FMA dots) 16-wide K steps
    for family in (8, 9, 10):
        for precision in ("16-bit", "tf32", "tf32x3"):
            for kernel, heavy in (("fwd", False), ("fwd", True), ("panel", False)):
                got = K.offered(kernel, family, precision, heavy)
                assert got and max(map(lpt, got)) <= 64
                if (kernel == "panel" and (family >= 10 or precision == "tf32x3")) or (kernel, heavy) == ("fwd", True):
                    assert max(map(lpt, got)) <= 32
    assert K.offered("fwd", 8, "tf32x3", True) == [K.T16] and K.offered("panel", 9, "ieee", False) == [K.FMA]
    assert K.offered("fwd", 9, "16-bit", False)[0] is K.T64 and K.offered("panel", 8, "tf32", False)[0] is K.T64
    # the launch's flags select the offer: a mask or the sigmoid objective makes a forward heavy
    flags = dict(INPUT_PRECISION="ieee", SIGMOID=False, HAS_MASK=True)
    assert K.offered_for("fwd", 10, 2, flags) == K.offered("fwd", 10, "16-bit", True)
    fp32 = dict(flags, INPUT_PRECISION="tf32x3")
    assert K.offered_for("panel", 10, 4, fp32) == K.offered("panel", 10, "tf32x3", False)

    configs = K.offered("fwd", 9, "16-bit", False)
    # bf16 at the goal shape: every candidate is timed, with its own pipeline depth
    assert tiles(K.keep(configs, 32768, 512, 2, h100)) == tiles(configs)
    # fp32: 32-wide K steps (the same bytes per row), and on an A100 only the stages that fit
    kept = K.keep(configs, 32768, 512, 4, a100)
    assert {c.kwargs["BLOCK_K"] for c in kept} == {32}
    assert all(c.num_stages >= 2 and c.num_stages * (c.kwargs["BLOCK_M"] + c.kwargs["BLOCK_N"]) * 32 * 4 <= a100
               for c in kept)
    # D = 20 pads to 32: no 64-wide K chunks of masked zeros
    assert {bk for _, _, bk, _ in tiles(K.keep(configs, 32768, 32, 2, h100))} == {32}
    # small N: the tile with the fewest rows alone (nothing to time); huge N: the first (best-expected) config
    assert tiles(K.keep(configs, 1024, 512, 2, h100)) == [(64, 64, 64, 4)]
    assert tiles(K.keep(configs, 2**20, 512, 2, h100)) == tiles(configs[:1])
    # a GPU with too little shared memory for any pipeline still gets one (unpipelined) tile
    assert tiles(K.keep(configs, 32768, 512, 4, 16 * 1024)) == [(64, 64, 32, 1)]
    assert K.buckets(1, 1) == (1, 16) and K.buckets(4097, 300) == (8192, 512)


@pytest.mark.gpu
@pytest.mark.parametrize("deterministic", [False, True])
def test_cuda_autotuned_kernels_match_reference(deterministic, deterministic_algorithms):
    """N above SMALL_N, so the autotuner times several configs before the real launch: what the timed runs
    accumulate (atomic column sums on the fast path, per-tile partials of dL/dt) must not leak into the
    result."""
    from fastpair.kernels import tuning as K

    torch.use_deterministic_algorithms(deterministic)
    n = 4096 + 37  # N bucket 8192: a key no other test uses
    zs = make_embeddings(3, n, 96, seed=21, device="cuda")
    t = torch.tensor([0.05, 0.07, 0.1], device="cuda", requires_grad=True)
    K.fwd_tuned.cache.clear()
    K.panel_tuned.cache.clear()
    loss = pairwise_nce(*zs, temperature=t, backend="triton")  # no stats: the atomic path unless deterministic
    loss.backward()
    assert len(K.fwd_tuned.cache) == 1 and len(K.panel_tuned.cache) == 1
    refs = [z.detach().cpu().double().requires_grad_() for z in zs]
    t_ref = t.detach().cpu().double().requires_grad_()
    ref = pairwise_nce_reference(*refs, temperature=t_ref)
    ref.backward()
    assert_close(loss.cpu(), ref, torch.float32, 1.0, "loss")
    for m, (z, r) in enumerate(zip(zs, refs)):
        assert_close(z.grad.cpu(), r.grad, torch.float32, 1.0, f"grad {m}", magnitude=1.0 / (0.05 * n))
    assert_close(t.grad.cpu(), t_ref.grad, torch.float32, 1.0, "grad of temperature")
