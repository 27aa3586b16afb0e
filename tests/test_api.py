"""Every bad input named in docs/design.md gets a ValueError/TypeError that says what was expected."""

from __future__ import annotations

import pytest
import torch
from helpers import make_embeddings

from fastpair import PairwiseNCE, pairwise_nce

Z = make_embeddings(3, 8, 4, requires_grad=False)


def _bad_cases():
    z = Z
    return [
        # (args, kwargs, error type, words the message must contain)
        ((z[0],), {}, ValueError, "at least 2"),
        ((), {}, ValueError, "at least 2"),
        ((z[0], z[1].numpy()), {}, TypeError, "torch.Tensor"),
        ((z[0], z[1][:, :, None]), {}, ValueError, "2-d"),
        ((z[0][0], z[1][0]), {}, ValueError, "2-d"),
        ((z[0], z[1][:5]), {}, ValueError, "same shape"),
        ((z[0], z[1][:, :3]), {}, ValueError, "same shape"),
        ((z[0], z[1].double()), {}, TypeError, "one dtype"),
        ((z[0].long(), z[1].long()), {}, TypeError, "float32"),
        ((z[0].bool(), z[1].bool()), {}, TypeError, "float32"),
        ((z[0][:0], z[1][:0]), {}, ValueError, "empty"),
        ((z[0][:, :0], z[1][:, :0]), {}, ValueError, "D = 0"),
        ((z[0], z[1]), {"temperature": 0.0}, ValueError, "> 0"),
        ((z[0], z[1]), {"temperature": -1.0}, ValueError, "> 0"),
        ((z[0], z[1]), {"temperature": float("nan")}, ValueError, "finite"),
        ((z[0], z[1]), {"temperature": float("inf")}, ValueError, "finite"),
        ((z[0], z[1]), {"temperature": "0.1"}, TypeError, "number"),
        ((z[0], z[1]), {"temperature": True}, TypeError, "bool"),
        ((*z,), {"temperature": torch.tensor([0.1, 0.2])}, ValueError, "one entry per pair (3)"),
        ((*z,), {"temperature": torch.ones(3, 1)}, ValueError, "one entry per pair"),
        ((*z,), {"temperature": torch.tensor([0.1, -0.2, 0.3])}, ValueError, "> 0"),
        ((*z,), {"temperature": torch.tensor(1, dtype=torch.int64)}, TypeError, "floating point"),
        ((*z,), {"weights": [1.0, 2.0]}, ValueError, "one entry per pair (3 pairs)"),
        ((*z,), {"weights": [1.0, -1.0, 1.0]}, ValueError, "non-negative"),
        ((*z,), {"weights": [0.0, 0.0, 0.0]}, ValueError, "not all be zero"),
        ((*z,), {"weights": 1.0}, TypeError, "one number per pair"),
        ((*z,), {"weights": ["a", 1, 1]}, TypeError, "numbers"),
        ((*z,), {"mask": torch.ones(3, 8)}, TypeError, "torch.bool"),
        ((*z,), {"mask": torch.ones(2, 8, dtype=torch.bool)}, ValueError, "(M, N) = (3, 8)"),
        ((*z,), {"mask": torch.ones(3, 7, dtype=torch.bool)}, ValueError, "(M, N) = (3, 8)"),
        ((*z,), {"mask": [[True] * 8] * 3}, TypeError, "bool tensor"),
        ((*z,), {"backend": "cuda"}, ValueError, "backend must be one of"),
        ((*z,), {"normalize": 1}, TypeError, "normalize"),
        ((*z,), {"return_stats": "yes"}, TypeError, "return_stats"),
        ((*z,), {"block_size": 0}, ValueError, "block_size"),
        ((*z,), {"group": object()}, ValueError, "not initialized"),
        # the loss family
        ((*z,), {"pairs": [(0, 3)]}, ValueError, "out of range"),
        ((*z,), {"pairs": [(0, -1)]}, ValueError, "out of range"),
        ((*z,), {"pairs": [(1, 1)]}, ValueError, "with itself"),
        ((*z,), {"pairs": [(0, 1), (1, 0)]}, ValueError, "each pair once"),
        ((*z,), {"pairs": [(0, 2), (1, 2), (0, 2)]}, ValueError, "entries 0 and 2"),
        ((*z,), {"pairs": []}, ValueError, "must not be empty"),
        ((*z,), {"pairs": "01"}, TypeError, "list of (p, q)"),
        ((*z,), {"pairs": [(0, 1.0)]}, TypeError, "entry 0"),
        ((*z,), {"pairs": [(0, 1, 2)]}, TypeError, "entry 0"),
        ((*z,), {"pairs": [(0, 1)], "temperature": torch.tensor([0.1, 0.2])}, ValueError, "one entry per pair (1)"),
        ((*z,), {"pairs": [(0, 1), (0, 2)], "weights": [1.0, 1.0, 1.0]}, ValueError, "one entry per pair (2 pairs)"),
        ((*z,), {"ids": torch.zeros(7, dtype=torch.int64)}, ValueError, "(N,) = (8,)"),
        ((*z,), {"ids": torch.zeros(8, 1, dtype=torch.int64)}, ValueError, "(N,) = (8,)"),
        ((*z,), {"ids": torch.zeros(8)}, TypeError, "torch.int32 or torch.int64"),
        ((*z,), {"ids": [0] * 8}, TypeError, "int32 or int64 tensor"),
        ((*z,), {"ids": torch.zeros(8, dtype=torch.int64, device="meta")}, ValueError, "device"),
        ((*z,), {"label_smoothing": 1.0}, ValueError, "[0, 1)"),
        ((*z,), {"label_smoothing": -0.1}, ValueError, "[0, 1)"),
        ((*z,), {"label_smoothing": float("nan")}, ValueError, "finite"),
        ((*z,), {"label_smoothing": "0.1"}, TypeError, "label_smoothing"),
        ((*z,), {"label_smoothing": True}, TypeError, "label_smoothing"),
    ]


@pytest.mark.parametrize("args,kwargs,error,words", _bad_cases())
def test_bad_input(args, kwargs, error, words):
    with pytest.raises(error) as info:
        pairwise_nce(*args, **kwargs)
    assert words in str(info.value), str(info.value)


def test_triton_backend_refuses_float64():
    with pytest.raises(TypeError, match="float64 runs on backend='torch'"):
        pairwise_nce(*[z.double() for z in Z], backend="triton")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    import fastpair.kernels

    monkeypatch.setattr(fastpair.kernels, "interpreter", lambda: False)
    with pytest.raises(ValueError, match="needs CUDA tensors"):
        pairwise_nce(*Z, backend="triton")


def test_auto_backend_runs_on_cpu():
    assert torch.isfinite(pairwise_nce(*Z, backend="auto"))


def test_accepted_forms_of_temperature_and_weights():
    base = pairwise_nce(*Z, temperature=0.1)
    assert torch.equal(pairwise_nce(*Z, temperature=torch.tensor(0.1)), base)
    assert torch.allclose(pairwise_nce(*Z, temperature=torch.full((3,), 0.1)), base)
    assert torch.allclose(pairwise_nce(*Z, temperature=0.1, weights=(2, 2, 2)), base)
    assert torch.allclose(pairwise_nce(*Z, temperature=0.1, weights=torch.tensor([1.0, 1.0, 1.0])), base)


def test_module_learns_temperature():
    module = PairwiseNCE(3, temperature=0.07)
    zs = make_embeddings(3, 16, 4)
    loss = module(*zs)
    loss.backward()
    assert module.log_temperature.grad is not None and module.log_temperature.grad.shape == ()
    assert torch.allclose(module.temperature, torch.tensor(0.07))
    assert torch.allclose(loss, pairwise_nce(*zs, temperature=0.07), atol=1e-6)


def test_module_per_pair_and_clamp():
    module = PairwiseNCE(3, temperature=0.001, per_pair_temperature=True, max_logit_scale=100.0)
    assert module.log_temperature.shape == (3,)
    assert torch.allclose(module.temperature, torch.full((3,), 0.01))  # 1/t clamped to 100
    zs = make_embeddings(3, 16, 4)
    loss, stats = module(*zs, mask=torch.ones(3, 16, dtype=torch.bool), return_stats=True)
    loss.backward()
    assert torch.all(module.log_temperature.grad == 0)  # clamped: no gradient, as CLIP's clamp
    assert stats["pair_losses"].shape == (3,)


def test_module_fixed_temperature_is_a_buffer():
    module = PairwiseNCE(2, temperature=0.1, learn_temperature=False)
    assert len(list(module.parameters())) == 0
    assert "log_temperature" in dict(module.named_buffers())


@pytest.mark.parametrize(
    "kwargs,error",
    [({"num_modalities": 1}, ValueError), ({"num_modalities": 3, "temperature": 0}, ValueError),
     ({"num_modalities": 3, "weights": [1, 2]}, ValueError), ({"num_modalities": 3, "backend": "x"}, ValueError),
     ({"num_modalities": 3, "max_logit_scale": -1}, ValueError),
     ({"num_modalities": 3, "pairs": [(0, 3)]}, ValueError), ({"num_modalities": 3, "pairs": []}, ValueError),
     ({"num_modalities": 3, "label_smoothing": -0.5}, ValueError),
     ({"num_modalities": 3, "pairs": [(0, 1)], "weights": [1, 2]}, ValueError)],
)
def test_module_bad_arguments(kwargs, error):
    with pytest.raises(error):
        PairwiseNCE(**kwargs)


@pytest.mark.parametrize("count", [2, 4])
def test_module_takes_exactly_num_modalities_embeddings(count):
    """Before: 4 embeddings silently dropped the 4th (zero gradient), 2 blamed a pair list nobody passed."""
    module = PairwiseNCE(3)
    with pytest.raises(ValueError, match=r"PairwiseNCE\(num_modalities=3\) takes 3 embeddings.*got " + str(count)):
        module(*make_embeddings(count, 8, 4))


@pytest.mark.parametrize("cls", ["PairwiseNCE", "PairwiseSigmoid"])
def test_modules_document_every_argument(cls):
    """help() shows what each constructor and forward argument means, and the logit-scale correspondence."""
    import inspect

    import fastpair

    module = getattr(fastpair, cls)
    for name in list(inspect.signature(module.__init__).parameters)[1:]:
        assert f"{name}:" in module.__doc__, f"{cls} does not document {name}"
    for name in list(inspect.signature(module.forward).parameters)[1:]:
        assert name in module.forward.__doc__, f"{cls}.forward does not document {name}"
    assert "logit_scale" in module.__doc__


def test_a_logit_scale_passed_as_temperature_warns_once(monkeypatch):
    """CLIP's logit scale (14.3 at initialization) passed as t gives a near-uniform loss: say so, once."""
    from fastpair import call

    monkeypatch.setitem(call._warned, "logit scale", False)
    with pytest.warns(UserWarning, match="looks like a logit scale.*t = 1 / logit_scale") as record:
        pairwise_nce(*Z, temperature=14.3)
    assert record[0].filename == __file__  # it points at the caller's line
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("error")
        pairwise_nce(*Z, temperature=14.3)  # once only
        pairwise_nce(*Z, temperature=1.0)  # a plausible temperature is quiet


@pytest.mark.parametrize("learnable", [False, True])
def test_one_sample_gives_exactly_zero(backend, learnable):
    """N = 1 (or a pair with one valid sample): the only candidate is the positive, so the loss and every
    gradient are exactly 0 (before: -2.4e-7, the rounding of logsumexp - S_ii)."""
    from helpers import on

    zs = on(make_embeddings(3, 1, 16, seed=3), backend)
    t = torch.tensor(0.05, device=zs[0].device, requires_grad=True) if learnable else 0.05
    loss = pairwise_nce(*zs, temperature=t, backend=backend)
    loss.backward()
    assert loss.item() == 0.0 and all(torch.count_nonzero(z.grad) == 0 for z in zs)
    if learnable:
        assert t.grad.item() == 0.0
    zs = on(make_embeddings(3, 6, 16, seed=4), backend)
    mask = torch.ones(3, 6, dtype=torch.bool)
    mask[1, 1:] = False  # modality 1 present in sample 0 only: pairs (0, 1) and (1, 2) have one sample
    _, stats = pairwise_nce(*zs, mask=mask.to(zs[0].device), backend=backend, return_stats=True)
    assert stats["pair_losses"][0].item() == 0.0 and stats["pair_losses"][2].item() == 0.0
    assert stats["pair_losses"][1].item() > 0


def test_meta_tensors_propagate_shapes():
    """Meta tensors (shape propagation, FLOP counting) give a meta loss and meta statistics of the right
    shapes, and a backward that reaches the inputs (before: an error inside torch.amp)."""
    zs = [torch.empty(5, 8, device="meta", requires_grad=True) for _ in range(3)]
    loss, stats = pairwise_nce(*zs, return_stats=True)
    assert loss.device.type == "meta" and loss.shape == () and loss.dtype == torch.float32
    assert stats["pair_losses"].shape == (3,) and stats["pair_accuracy"].shape == (3, 2)
    loss.backward()
    assert all(z.grad.shape == (5, 8) and z.grad.device.type == "meta" for z in zs)
    from fastpair import pairwise_sigmoid

    assert pairwise_sigmoid(*[z.detach().double() for z in zs]).dtype == torch.float64
