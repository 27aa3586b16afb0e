"""GradCache: a step in chunks gives the gradients of the unchunked step (docs/design.md, "Gradient caching").

The reference is the plain step that computes the same embeddings with autograd (every encoder over its
chunks, in GradCache's order, so that dropout draws the same masks from the same seed), the loss on the whole
batch, and one backward(). Equal to rounding in float64, within the fp32 tolerance in float32; with the
paper's encoders (Transformer, TCN, GRU), an MLP, dropout, masks, ids, both objectives, a learnable
temperature and bias, tuple/list/dict inputs and autocast.
"""

from __future__ import annotations

import contextlib

import pytest
import torch
from fastpair.training.models import GRUEncoder, MLPEncoder, TCNEncoder, TextEncoder
from helpers import assert_close
from torch import nn

from fastpair import GradCache, PairwiseNCE, PairwiseSigmoid, gradcache

N, T, D = 22, 5, 6  # 22 samples in chunks of 8: 8, 8, 6


class Head(nn.Module):
    """An encoder of the training kit and a projection head with dropout: (x, mask) -> (n, 16)."""

    def __init__(self, body):
        super().__init__()
        self.body, self.head = body, nn.Sequential(nn.Dropout(0.2), nn.Linear(12, 16))

    def forward(self, x, mask):
        return self.head(self.body(x, mask))


class DictMLP(nn.Module):
    """Takes keyword inputs, as a tokenizer's dict is passed: (values, weights) -> (n, 16)."""

    def __init__(self):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(D, 20), nn.ReLU(), nn.Dropout(0.3), nn.Linear(20, 16))

    def forward(self, values, weights):
        return self.net(values * weights[:, None])


def _encoders(kinds, dtype):
    torch.manual_seed(11)
    made = []
    for kind in kinds:
        if kind == "dict":
            made.append(DictMLP())
        elif kind == "plain":
            made.append(nn.Sequential(nn.Linear(D, 16), nn.Dropout(0.25), nn.Tanh(), nn.Linear(16, 16)))
        else:
            body = {"transformer": TextEncoder, "tcn": TCNEncoder, "gru": GRUEncoder, "mlp": MLPEncoder}[kind]
            made.append(Head(body(D, 8, 2, 12, 0.2)))
    return [e.to(dtype) for e in made]


def _inputs(kinds, dtype, seed=3):
    g = torch.Generator().manual_seed(seed)
    out = []
    for kind in kinds:
        if kind == "dict":
            out.append({"values": torch.randn(N, D, generator=g, dtype=dtype),
                        "weights": torch.rand(N, generator=g, dtype=dtype) + 0.5})
        elif kind == "plain":
            out.append(torch.randn(N, D, generator=g, dtype=dtype))
        elif kind == "mlp":
            out.append([torch.randn(N, D, generator=g, dtype=dtype), torch.ones(N, dtype=torch.bool)])
        else:
            mask = torch.rand(N, T, generator=g) > 0.25
            mask[:, 0] = True
            out.append((torch.randn(N, T, D, generator=g, dtype=dtype), mask))
    return out


def _call(encoder, x):
    if isinstance(x, torch.Tensor):
        return encoder(x)
    return encoder(**x) if isinstance(x, dict) else encoder(*x)


def _reference(encoders, loss_fn, inputs, chunk, **kw):
    """The plain step: the same embeddings with autograd, the loss, one backward()."""
    embeddings = []
    for encoder, x in zip(encoders, inputs):
        parts = [_call(encoder, gradcache._slice(x, s, min(N, s + chunk))) for s in range(0, N, chunk)]
        embeddings.append(torch.cat(parts))
    result = loss_fn(*embeddings, **kw)
    (result[0] if isinstance(result, tuple) else result).backward()
    return result


def _grads(*modules):
    return [p.grad.clone() if p.grad is not None else None for m in modules for p in m.parameters()]


def _run_both(kinds, loss_cls, dtype, chunk=8, **kw):
    """(GradCache's loss and gradients, the reference's) from the same initial weights and seed."""
    out = []
    for chunked in (True, False):
        encoders = _encoders(kinds, dtype)
        loss_fn = loss_cls(len(kinds)).to(dtype)
        inputs = _inputs(kinds, dtype)
        torch.manual_seed(5)
        for module in (*encoders, loss_fn):
            module.train()
        if chunked:
            result = GradCache(encoders, loss_fn, chunk)(*inputs, **kw)
        else:
            result = _reference(encoders, loss_fn, inputs, chunk, **kw)
        loss = result[0] if isinstance(result, tuple) else result
        out.append((loss.detach(), _grads(*encoders, loss_fn), result, torch.get_rng_state()))
    return out


def _mask(m):
    mask = torch.rand(m, N, generator=torch.Generator().manual_seed(9)) > 0.2
    mask[:, 0] = True
    return mask


CASES = [  # (encoder kinds, loss class, loss keyword arguments)
    (("transformer", "tcn", "gru"), PairwiseNCE, {}),
    (("transformer", "tcn", "gru"), PairwiseNCE, {"mask": _mask(3), "ids": torch.arange(N) // 2}),
    (("mlp", "plain", "dict"), PairwiseSigmoid, {"mask": _mask(3)}),
    (("gru", "plain"), PairwiseSigmoid, {"ids": torch.arange(N) % 5}),
    (("plain", "dict", "tcn", "mlp"), PairwiseNCE, {"mask": _mask(4)}),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("kinds,loss_cls,kw", CASES, ids=lambda v: getattr(v, "__name__", None))
def test_gradients_equal_the_unchunked_step(kinds, loss_cls, kw, dtype):
    (loss, grads, _, rng), (ref_loss, ref_grads, _, ref_rng) = _run_both(kinds, loss_cls, dtype, **kw)
    assert_close(loss, ref_loss, dtype, name="loss")
    assert len(grads) == len(ref_grads) and all(g is not None for g in grads)
    for k, (g, r) in enumerate(zip(grads, ref_grads)):
        assert_close(g, r, dtype, name=f"gradient of parameter {k}", magnitude=float(r.abs().max()) + 1e-3)
    assert torch.equal(rng, ref_rng)  # the generator continues as after one forward pass


def test_dropout_is_exact_because_the_random_state_is_replayed(monkeypatch):
    """Without the replay of each chunk's random state, the recomputed dropout masks differ from the ones
    behind the cached embeddings, and so do the gradients: the check above can fail."""
    monkeypatch.setattr(gradcache, "_replaying", lambda state: contextlib.nullcontext())
    (_, grads, _, _), (_, ref_grads, _, _) = _run_both(("mlp", "plain"), PairwiseNCE, torch.float64)
    assert any(not torch.allclose(g, r, rtol=1e-6, atol=1e-9) for g, r in zip(grads, ref_grads))


def test_chunks_of_any_size_give_the_whole_batch_gradients():
    """Without randomness the chunking is invisible: chunks of 1, 5 and N give the unchunked gradients."""
    kinds = ("plain", "plain")
    results = []
    for chunk in (1, 5, N):
        encoders = [e.eval() for e in _encoders(kinds, torch.float64)]
        loss_fn = PairwiseNCE(2).double()
        loss = GradCache(encoders, loss_fn, chunk)(*_inputs(kinds, torch.float64))
        results.append((loss, _grads(*encoders, loss_fn)))
    for loss, grads in results[:-1]:
        assert_close(loss, results[-1][0], torch.float64)
        for g, r in zip(grads, results[-1][1]):
            assert_close(g, r, torch.float64, magnitude=float(r.abs().max()))


def test_return_stats_and_accumulation():
    """(loss, stats) with return_stats; the gradients are added to .grad, as backward() adds them."""
    kinds = ("plain", "mlp")
    encoders = [e.eval() for e in _encoders(kinds, torch.float64)]
    loss_fn = PairwiseNCE(2).double()
    step = GradCache(encoders, loss_fn, 7)
    loss, stats = step(*_inputs(kinds, torch.float64), return_stats=True)
    assert loss.shape == () and not loss.requires_grad and stats["pair_accuracy"].shape == (1, 2)
    once = _grads(*encoders, loss_fn)
    step(*_inputs(kinds, torch.float64))
    for g, g1 in zip(_grads(*encoders, loss_fn), once):
        assert_close(g, 2 * g1, torch.float64, magnitude=float(g1.abs().max()))


def test_under_autocast():
    """The caller's autocast applies to the forward passes and the loss: the gradients of the plain step with
    its forward under the same autocast (bf16 on CPU), to bf16's rounding. Not bitwise: in one graph autograd
    sums the chunks' gradients of a weight at its cached bf16 copy, in bf16; GradCache's chunks reach the fp32
    .grad one by one."""
    out = []
    for chunked in (True, False):
        kinds = ("plain", "mlp")
        encoders, loss_fn = _encoders(kinds, torch.float32), PairwiseNCE(2)
        inputs = _inputs(kinds, torch.float32)
        torch.manual_seed(5)
        if chunked:
            with torch.autocast("cpu", dtype=torch.bfloat16):
                loss = GradCache(encoders, loss_fn, 8)(*inputs)
        else:  # forward under autocast, backward after it (PyTorch's recipe)
            with torch.autocast("cpu", dtype=torch.bfloat16):
                parts = [torch.cat([_call(e, gradcache._slice(x, s, min(N, s + 8))) for s in range(0, N, 8)])
                         for e, x in zip(encoders, inputs)]
                loss = loss_fn(*parts)
            loss.backward()
        out.append((loss.detach(), _grads(*encoders, loss_fn)))
    torch.testing.assert_close(out[0][0], out[1][0])
    for g, r in zip(out[0][1], out[1][1]):  # bf16 keeps 8 bits: 2^-8 relative, a few roundings
        torch.testing.assert_close(g, r, rtol=2e-2, atol=1e-2 * float(r.abs().max()))


def test_batchnorm_sees_each_chunk_separately():
    """The documented difference: BatchNorm in train mode normalizes each chunk with its own statistics, so
    the chunked step differs from one that normalizes the whole batch at once (and equals the plain step
    over the same chunks)."""
    def encoders():
        torch.manual_seed(2)
        return [nn.Sequential(nn.Linear(D, 16), nn.BatchNorm1d(16), nn.Linear(16, 16)).double() for _ in range(2)]

    inputs = _inputs(("plain", "plain"), torch.float64)
    chunked, whole, by_chunk = encoders(), encoders(), encoders()
    GradCache(chunked, PairwiseNCE(2).double(), 8)(*inputs)
    PairwiseNCE(2).double()(*(e(x) for e, x in zip(whole, inputs))).backward()
    _reference(by_chunk, PairwiseNCE(2).double(), inputs, 8)
    g, w, b = _grads(*chunked), _grads(*whole), _grads(*by_chunk)
    assert not all(torch.allclose(x, y) for x, y in zip(g, w))
    for x, y in zip(g, b):
        assert_close(x, y, torch.float64, magnitude=float(y.abs().max()))


def test_a_frozen_encoder_and_an_unused_modality():
    """An encoder without trainable parameters is embedded and skipped in the replay; a modality the loss's
    pairs leave out gets zero gradients, as in the plain step."""
    kinds = ("plain", "plain", "plain")
    encoders = [e.eval() for e in _encoders(kinds, torch.float64)]
    for p in encoders[0].parameters():
        p.requires_grad_(False)
    GradCache(encoders, PairwiseNCE(3, pairs=[(0, 1)]).double(), 6)(*_inputs(kinds, torch.float64))
    assert all(p.grad is None for p in encoders[0].parameters())
    assert all(p.grad is not None for p in encoders[1].parameters())
    assert all(p.grad is not None and torch.count_nonzero(p.grad) == 0 for p in encoders[2].parameters())


@pytest.mark.parametrize("build,args,error,words", [
    (lambda: GradCache([nn.Identity()], PairwiseNCE(2), 4), (), ValueError, "at least 2"),
    (lambda: GradCache([nn.Identity(), 3], PairwiseNCE(2), 4), (), TypeError, "encoders[1] must be callable"),
    (lambda: GradCache([nn.Identity()] * 2, "loss", 4), (), TypeError, "loss must be callable"),
    (lambda: GradCache([nn.Identity()] * 2, PairwiseNCE(2), 0), (), ValueError, "chunk_size"),
    (lambda: GradCache([nn.Identity()] * 2, PairwiseNCE(2), True), (), ValueError, "chunk_size"),
    (lambda: GradCache([nn.Identity()] * 2, PairwiseNCE(2), 4), (torch.randn(5, 3),), ValueError, "takes 2 inputs"),
    (lambda: GradCache([nn.Identity()] * 2, PairwiseNCE(2), 4), (torch.randn(5, 3), torch.randn(6, 3)),
     ValueError, "one N"),
    (lambda: GradCache([nn.Identity()] * 2, PairwiseNCE(2), 4), (torch.randn(0, 3), torch.randn(0, 3)),
     ValueError, "N >= 1"),
    (lambda: GradCache([nn.Identity()] * 2, PairwiseNCE(2), 4), (torch.randn(5, 3), [torch.randn(5, 3), "x"]),
     TypeError, "tensors"),
    (lambda: GradCache([nn.Identity()] * 2, PairwiseNCE(2), 4), (torch.randn(5, 3, 2), torch.randn(5, 3, 2)),
     ValueError, "embeddings (n, D)"),
])
def test_bad_arguments(build, args, error, words):
    with pytest.raises(error) as info:
        build()(*args)
    assert words in str(info.value), str(info.value)


@pytest.mark.parametrize("objective", [PairwiseNCE, PairwiseSigmoid])
def test_on_both_backends(objective, backend):
    """The loss's backend (Triton in its interpreter on CPU) does not change what GradCache computes."""
    from helpers import device_for

    device = device_for(backend)
    out = []
    for chunked in (True, False):
        kinds = ("plain", "plain", "plain")
        encoders = [e.to(device) for e in _encoders(kinds, torch.float32)]
        loss_fn = objective(3, backend=backend).to(device)
        inputs = [x.to(device) for x in _inputs(kinds, torch.float32)]
        torch.manual_seed(5)
        kw = {"mask": _mask(3).to(device)}
        loss = GradCache(encoders, loss_fn, 8)(*inputs, **kw) if chunked else _reference(encoders, loss_fn,
                                                                                          inputs, 8, **kw)
        out.append((loss.detach(), _grads(*encoders, loss_fn)))
    assert_close(out[0][0], out[1][0])
    for g, r in zip(out[0][1], out[1][1]):
        assert_close(g, r, magnitude=float(r.abs().max()))
