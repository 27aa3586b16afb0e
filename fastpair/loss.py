"""Public entry point of the modality-pairwise InfoNCE loss: validate once, then dispatch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import distributed
from ._torch_backend import pairwise_nce_torch
from .call import describe

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def pairwise_nce(
    *embeddings: torch.Tensor,
    temperature: float | Sequence[float] | torch.Tensor = 0.07,
    weights: Sequence[float] | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalize: bool = True,
    backend: str = "auto",
    group: ProcessGroup | None = None,
    return_stats: bool = False,
    block_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Symmetric InfoNCE loss of every modality pair, without materializing any N x N matrix.

    Args:
        *embeddings: M >= 2 tensors of shape (N, D), one per modality (e.g. text, audio, vision), same
            N, D, dtype (float32, float16, bfloat16 or float64) and device; any strides.
        temperature: float, 0-d tensor, or 1-d tensor with one entry per pair (P = M(M-1)/2). A tensor
            that requires grad receives dL/dt (learnable shared or per-pair temperature).
        weights: optional sequence (or 1-d tensor) of P non-negative numbers, not all zero.
        mask: optional bool tensor (M, N); ``mask[m, i] = False`` marks modality m of sample i as missing:
            it takes part in no pair and gets a zero gradient.
        normalize: L2-normalize every embedding first (cosine similarities), as CLIP does.
        backend: "auto" (Triton kernels for CUDA tensors when available, else "torch"), "torch" (exact
            pure PyTorch, any device) or "triton".
        group: a torch.distributed process group of W ranks: negatives from every rank. Each rank passes
            its local batch (sizes may differ; D, M, dtype and backend may not); every modality is
            all-gathered with autograd, this rank's samples are scored against the whole batch in both
            directions of every pair, and the result is W times this rank's share of the global loss: the
            mean over ranks is the loss of the concatenated batch (ranks in order), and under
            DistributedDataParallel the averaged gradients are the single-process ones. Statistics are
            the global batch's. What is communicated, and when: ``fastpair.distributed``. A bad input on
            any rank raises on every rank. World size 1: the plain loss.
        return_stats: also return ``{"pair_losses": (P,), "pair_accuracy": (P, 2)}`` (detached, float32):
            per-pair losses and top-1 in-batch retrieval accuracy x->y, y->x (0 for a pair with no valid sample).
        block_size: rows per block of the torch backend (default: about 2^21 logits per block).

    Pairs are ``itertools.combinations(range(M), 2)``. For pair (p, q) over its valid samples V (n = |V|),
    with x, y the normalized z_p, z_q and S_ij = <x_i, y_j> / t_pq:

        L_pq = 1/(2n) sum_{i in V} [(logsumexp_j S_ij - S_ii) + (logsumexp_j S_ji - S_ii)]
        loss = sum_pq w_pq L_pq / sum_pq w_pq      (over pairs with n > 0; 0 if there is none)

    Returns:
        The loss, a 0-d tensor: float64 for float64 inputs, float32 otherwise; or (loss, stats).
    """
    world = 1 if group is None else distributed.world_size(group)
    try:
        call, error = describe(embeddings, temperature, weights, mask, normalize, return_stats, backend,
                               block_size), None
    except (ValueError, TypeError, RuntimeError) as err:
        if world == 1:
            raise
        call, error = None, err
    if world > 1:  # every rank learns whether every rank's input is valid before any rank waits in a collective
        embeddings, call = distributed.gather_call(group, embeddings, call, error)

    if call.backend == "triton":
        from .kernels.ops import pairwise_nce_triton

        loss, pair_losses, accuracy = pairwise_nce_triton(list(embeddings), call)
    else:
        loss, pair_losses, accuracy = pairwise_nce_torch(embeddings, call)
    if return_stats:
        return loss, {"pair_losses": pair_losses, "pair_accuracy": accuracy}
    return loss
