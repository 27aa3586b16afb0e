"""Gradient caching (Gao et al. 2021, "Scaling Deep Contrastive Learning Batch Size under Memory Limited
Setup"): a contrastive step whose batch is larger than the encoders' activations fit in memory, with the
gradients of the unchunked step.

The loss needs the whole batch's embeddings (every sample is every other's negative), but only O(N D) of
them: fastpair's losses never hold an N x N matrix. The encoders' activations are what grow with the batch.
So, for embeddings e = f(x; theta) and a loss L(e):

    dL/dtheta = sum over chunks c of (de_c/dtheta)^T (dL/de_c)

1. embed every chunk of ``chunk_size`` samples without autograd (no activations kept), saving each chunk's
   random-number state first;
2. compute L on the whole batch's embeddings as leaves that require grad, and backpropagate it: the loss's
   own parameters (a learnable temperature, a bias) get their gradient, the embeddings get dL/de;
3. run each chunk's encoder again, with autograd and under its saved random state (the same dropout masks as
   in 1., as ``torch.utils.checkpoint`` replays them), and backpropagate dL/de_c through it.

A caller's autocast applies to the forward passes (1., 2. and 3.), not to the backward passes, as PyTorch
recommends for any step.

Peak memory: the embeddings, dL/de, the loss's O(N) statistics and one chunk's activations. Time: one more
forward pass of the encoders. The gradients are those of the step that computed the same embeddings (the
same chunks, in the same order, with the same random draws) with autograd and called backward() once.
BatchNorm in train mode normalizes each chunk with its own statistics, so a model with BatchNorm computes
another function than on the unchunked batch (and updates its running statistics once per chunk in step 1
and again in step 3); LayerNorm, GroupNorm and dropout are exact.

Under DistributedDataParallel: wrap each encoder (so that its forward goes through DDP), pass the loss its
``group=`` for the negatives of every rank, and keep the loss's own parameters identical across ranks
(wrap the loss module in DDP too, or all-reduce its gradients). Every chunk's backward but each encoder's
last runs under ``no_sync()``, so the gradients are all-reduced once per step.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import torch

Inputs = torch.Tensor | Sequence[torch.Tensor] | Mapping[str, torch.Tensor]


class GradCache:
    """One contrastive training step in chunks: the gradients of the whole batch, the memory of a chunk.

    Args:
        encoders: M >= 2 callables, one per modality (usually ``nn.Module``s, DistributedDataParallel or not),
            each mapping its modality's inputs to embeddings (n, D): ``encoder(x)`` for a tensor,
            ``encoder(*x)`` for a tuple or list, ``encoder(**x)`` for a dict (a tokenizer's output).
        loss: a fastpair loss module (``PairwiseNCE``, ``PairwiseSigmoid``) or any callable with
            ``pairwise_nce``'s signature: ``loss(*embeddings, **loss_kwargs)``.
        chunk_size: samples per encoder call (the batch need not be a multiple of it).

    Example:
        ```python
        step = GradCache([image_encoder, text_encoder], PairwiseNCE(2), chunk_size=256)
        loss = step(images, tokens)     # a batch of 8192: 32 chunks of 256 per encoder
        optimizer.step(); optimizer.zero_grad()
        ```
    """

    def __init__(self, encoders: Sequence[Callable], loss: Callable, chunk_size: int) -> None:
        encoders = list(encoders)
        if len(encoders) < 2:
            raise ValueError(f"encoders: at least 2 (one per modality) expected, got {len(encoders)}")
        for m, encoder in enumerate(encoders):
            if not callable(encoder):
                raise TypeError(f"encoders[{m}] must be callable (an nn.Module), got {type(encoder).__name__}")
        if not callable(loss):
            raise TypeError(f"loss must be callable (a fastpair loss module or function), got {type(loss).__name__}")
        if isinstance(chunk_size, bool) or not isinstance(chunk_size, int) or chunk_size < 1:
            raise ValueError(f"chunk_size must be a positive int, got {chunk_size!r}")
        self.encoders, self.loss, self.chunk_size = encoders, loss, chunk_size

    def __call__(self, *inputs: Inputs, **loss_kwargs: Any) -> torch.Tensor | tuple[torch.Tensor, dict]:
        """One full step: embed, the loss and its backward, the encoders' backward chunk by chunk.

        Args:
            *inputs: one per encoder: a tensor, or a tuple, list or dict of tensors, all (N, ...) with the
                same N, split along dim 0.
            **loss_kwargs: passed to the loss (``mask``, ``ids``, ``group``, ``return_stats``, ...).

        Returns:
            The loss, detached; or ``(loss, stats)`` with ``return_stats=True``. Every parameter's ``.grad``
            has the step's gradient added, as ``backward()`` adds it.
        """
        if len(inputs) != len(self.encoders):
            raise ValueError(f"GradCache with {len(self.encoders)} encoders takes {len(self.encoders)} inputs, one "
                             f"per modality, got {len(inputs)}")
        n = _batch_size(inputs)
        spans = [(start, min(n, start + self.chunk_size)) for start in range(0, n, self.chunk_size)]
        embeddings, states = zip(*(self._embed(encoder, x, spans) for encoder, x in zip(self.encoders, inputs)))
        result = self.loss(*embeddings, **loss_kwargs)
        loss = result[0] if isinstance(result, tuple) else result
        with _no_autocast(embeddings):
            loss.backward()
        for encoder, x, e, saved in zip(self.encoders, inputs, embeddings, states):
            self._replay(encoder, x, spans, e.grad, saved)
        if isinstance(result, tuple):
            return (loss.detach(), *result[1:])
        return loss.detach()

    def _embed(self, encoder, x: Inputs, spans) -> tuple[torch.Tensor, list]:
        """(the embeddings of every chunk, concatenated, a leaf that requires grad; each chunk's RNG state)."""
        outs, states = [], []
        for start, stop in spans:
            chunk = _slice(x, start, stop)
            states.append(_rng_state(chunk))
            with torch.no_grad():
                outs.append(_check_output(_call(encoder, chunk), stop - start))
        return torch.cat(outs).requires_grad_(), states

    def _replay(self, encoder, x: Inputs, spans, grad: torch.Tensor | None, states) -> None:
        """Each chunk's forward again under its saved RNG state, and its backward from dL/de of its rows.
        A DistributedDataParallel encoder all-reduces once: every chunk but the last under no_sync()."""
        if grad is None:  # the loss does not depend on this modality (e.g. a pair list without it)
            return
        for k, ((start, stop), state) in enumerate(zip(spans, states)):
            chunk = _slice(x, start, stop)
            last = k == len(spans) - 1
            sync = contextlib.nullcontext() if last or not hasattr(encoder, "no_sync") else encoder.no_sync()
            with sync, _replaying(state):
                out = _check_output(_call(encoder, chunk), stop - start)
                if out.requires_grad:  # a frozen encoder has nothing to learn
                    with _no_autocast([out]):
                        out.backward(grad[start:stop].to(out.dtype))


def _call(encoder, x: Inputs) -> torch.Tensor:
    if isinstance(x, torch.Tensor):
        return encoder(x)
    if isinstance(x, Mapping):
        return encoder(**x)
    return encoder(*x)


def _check_output(out, rows: int) -> torch.Tensor:
    if not isinstance(out, torch.Tensor) or out.dim() != 2 or out.shape[0] != rows:
        shape = tuple(out.shape) if isinstance(out, torch.Tensor) else type(out).__name__
        raise ValueError(f"an encoder must return embeddings (n, D) for a chunk of n = {rows} samples, got {shape}")
    return out


def _tensors(x: Inputs) -> list[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        return [x]
    values = list(x.values()) if isinstance(x, Mapping) else list(x)
    if not values or not all(isinstance(v, torch.Tensor) for v in values):
        raise TypeError("each input must be a tensor, or a non-empty tuple, list or dict of tensors, got "
                        f"{type(x).__name__} of {[type(v).__name__ for v in values]}")
    return values


def _batch_size(inputs) -> int:
    sizes = {t.shape[0] if t.dim() else None for x in inputs for t in _tensors(x)}
    if len(sizes) != 1 or None in sizes or 0 in sizes:
        raise ValueError(f"every input tensor must be (N, ...) with one N >= 1 for all modalities, got N in "
                         f"{sorted(s for s in sizes if s is not None)}{' and 0-d tensors' if None in sizes else ''}")
    return sizes.pop()


def _slice(x: Inputs, start: int, stop: int) -> Inputs:
    if isinstance(x, torch.Tensor):
        return x[start:stop]
    if isinstance(x, Mapping):
        return {k: v[start:stop] for k, v in x.items()}
    return type(x)(v[start:stop] for v in x) if isinstance(x, tuple) else [v[start:stop] for v in x]


def _devices(chunk: Inputs) -> list[torch.device]:
    """The CUDA devices a chunk's tensors live on (whose generators its encoder may draw from)."""
    return sorted({t.device for t in _tensors(chunk) if t.device.type == "cuda"}, key=str)


def _rng_state(chunk: Inputs):
    """The CPU generator's state and the CUDA generators' of the chunk's devices, before its encoder runs."""
    cuda = [(d, torch.cuda.get_rng_state(d)) for d in _devices(chunk)]
    return torch.get_rng_state(), cuda


def _no_autocast(tensors) -> contextlib.ExitStack:
    """Autocast off for a backward pass (the caller's autocast is for the forward passes: a backward under it
    would recast the CPU's backward matmuls, which run in the caller's thread)."""
    stack = contextlib.ExitStack()
    for device_type in sorted({t.device.type for t in tensors}):
        stack.enter_context(torch.autocast(device_type, enabled=False))
    return stack


@contextlib.contextmanager
def _replaying(state):
    """The saved generator states for the replay; afterwards the generators continue where they were, so that
    a step consumes random numbers as one forward pass does."""
    cpu, cuda = state
    with torch.random.fork_rng(devices=[d for d, _ in cuda], device_type="cuda"):
        torch.set_rng_state(cpu)
        for device, s in cuda:
            torch.cuda.set_rng_state(s, device)
        yield
