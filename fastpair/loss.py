"""The public loss functions, InfoNCE and sigmoid for every modality pair and GRAM's volume loss of all
modalities at once: validate once, then dispatch."""

from __future__ import annotations

from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch

from . import distributed, op
from .call import describe, describe_gram

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


def pairwise_nce(
    *embeddings: torch.Tensor,
    temperature: float | Sequence[float] | torch.Tensor = 0.07,
    weights: Sequence[float] | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalize: bool = True,
    pairs: Sequence[tuple[int, int]] | None = None,
    ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    backend: str = "auto",
    group: ProcessGroup | None = None,
    return_stats: bool = False,
    block_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""Symmetric InfoNCE loss of every modality pair, without materializing any N x N matrix.

    Args:
        *embeddings: M >= 2 tensors of shape (N, D), one per modality (e.g. text, audio, vision), same
            N, D, dtype (float32, float16, bfloat16 or float64) and device; any strides.
        temperature: float, 0-d tensor, or 1-d tensor with one entry per pair (P pairs), finite and > 0:
            t = 1 / logit_scale (open_clip's ``logit_scale.exp()`` of 14.3 at initialization is t = 0.07;
            a temperature above 5, which can only be a logit scale, is warned about once). A tensor that
            requires grad receives dL/dt (learnable shared or per-pair temperature). Numbers are checked
            here (ValueError); a tensor's values are read on the host only by the torch backend, which
            checks them too: the Triton path never reads them (that would sync with the GPU every step)
            and returns a NaN loss for invalid ones.
        weights: optional sequence (or 1-d tensor) of P non-negative numbers, not all zero.
        mask: optional bool tensor (M, N); ``mask[m, i] = False`` marks modality m of sample i as missing:
            it takes part in no pair and gets a zero gradient.
        normalize: L2-normalize every embedding first (cosine similarities), as CLIP does.
        pairs: which modality pairs are contrasted, a list of (p, q) in the order per-pair arguments and
            statistics follow (default: ``itertools.combinations(range(M), 2)``, P = M(M-1)/2); an anchor
            topology such as ImageBind's is ``[(0, 1), (0, 2), ...]``. Each unordered pair at most once.
        ids: optional int32/int64 tensor (N,): samples with equal ids are positives of each other in every
            pair (several crops of one clip; samples sharing a label). Under a group, the local samples'
            ids, compared across the whole global batch.
        label_smoothing: eps in [0, 1): each row's target is (1 - eps) uniform over its positives plus eps
            uniform over the pair's valid samples, as ``F.cross_entropy(label_smoothing=eps)`` does.
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

    For pair (p, q) over its valid samples V (n = |V|), with x, y the normalized z_p, z_q,
    ``S_ij = <x_i, y_j> / t_pq``, positives P(i) = {j in V : ids_j == ids_i} (by default {i}) and eps:

        l_i  = logsumexp_{j in V} S_ij - (1 - eps) mean_{j in P(i)} S_ij - eps mean_{j in V} S_ij
        l'_j = logsumexp_{i in V} S_ij - (1 - eps) mean_{i in P(j)} S_ij - eps mean_{i in V} S_ij
        L_pq = (sum_{i in V} l_i + sum_{j in V} l'_j) / (2n)
        loss = sum_pq w_pq L_pq / sum_pq w_pq      (over pairs with n > 0; 0 if there is none)

    For M = 2 this is open_clip's ``ClipLoss`` on normalized features with ``logit_scale = 1/t``. A pair
    with a single valid sample contributes exactly 0 (its only candidate is its positive).

    Returns:
        The loss, a 0-d tensor: float64 for float64 inputs, float32 otherwise; or (loss, stats).
    """
    return _run(embeddings, group, return_stats, dict(
        temperature=temperature, weights=weights, mask=mask, normalize=normalize, return_stats=return_stats,
        backend=backend, block_size=block_size, pairs=pairs, ids=ids, label_smoothing=label_smoothing))


def pairwise_sigmoid(
    *embeddings: torch.Tensor,
    temperature: float | Sequence[float] | torch.Tensor = 0.1,
    bias: float | Sequence[float] | torch.Tensor = -10.0,
    weights: Sequence[float] | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    normalize: bool = True,
    pairs: Sequence[tuple[int, int]] | None = None,
    ids: torch.Tensor | None = None,
    backend: str = "auto",
    group: ProcessGroup | None = None,
    return_stats: bool = False,
    block_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""SigLIP's sigmoid loss (Zhai et al. 2023) of every modality pair, without materializing any N x N matrix.

    Each pair (i, j) is a binary decision, positive where the samples match (or share an id), with no
    normalization over the batch. For M = 2 this is open_clip's ``SigLipLoss`` on one device
    (logit_scale = 1/t, logit_bias = b).

    Args:
        *embeddings: M >= 2 tensors (N, D), one per modality, as for ``pairwise_nce``.
        temperature: float, 0-d tensor, or 1-d tensor with one entry per pair: t = 1 / logit_scale, finite
            and > 0 (SigLIP initializes 1/t = 10; a temperature above 5 is warned about once). A tensor that
            requires grad receives dL/dt.
        bias: float, 0-d tensor, or 1-d tensor with one entry per pair: b, finite (open_clip's
            ``logit_bias``; SigLIP initializes b = -10). A tensor that requires grad receives dL/db
            (learnable, shared or per pair). Checked as the temperature is (a NaN loss on the Triton path
            for an invalid tensor).
        weights: optional non-negative weight per pair, not all zero.
        mask: optional bool (M, N); False where modality m of sample i is missing.
        normalize: L2-normalize every embedding first, as SigLIP does.
        pairs: the contrasted pairs (p, q), as for ``pairwise_nce``.
        ids: optional int32/int64 (N,): samples with equal ids are positives (z_ij = +1) of each other.
        backend: "auto", "torch" or "triton", as for ``pairwise_nce``.
        group: a torch.distributed process group: negatives from every rank, as for ``pairwise_nce``.
        return_stats: also return ``{"pair_losses": (P,), "pair_accuracy": (P, 2)}``: per-pair losses and
            top-1 in-batch retrieval accuracy.
        block_size: rows per block of the torch backend.

    For pair (p, q) over its valid samples V (n = |V|), with x, y the normalized z_p, z_q,
    ``S_ij = <x_i, y_j> / t_pq`` and ``z_ij`` = +1 where ids_i == ids_j (by default i == j), -1 elsewhere:

        L_pq = -(1/n) sum_{i in V} sum_{j in V} log sigmoid(z_ij (S_ij + b_pq))
        loss = sum_pq w_pq L_pq / sum_pq w_pq      (over pairs with n > 0; 0 if there is none)

    Returns:
        The loss, a 0-d tensor: float64 for float64 inputs, float32 otherwise; or (loss, stats).
    """
    return _run(embeddings, group, return_stats, dict(
        temperature=temperature, weights=weights, mask=mask, normalize=normalize, return_stats=return_stats,
        backend=backend, block_size=block_size, pairs=pairs, ids=ids, objective="sigmoid", bias=bias))


def gram_nce(
    *embeddings: torch.Tensor,
    anchor: int = 0,
    temperature: float | torch.Tensor = 0.07,
    mask: torch.Tensor | None = None,
    ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
    normalize: bool = True,
    backend: str = "auto",
    group: ProcessGroup | None = None,
    return_stats: bool = False,
    block_size: int | None = None,
) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
    r"""GRAM's volume loss (Cicchetti et al., ICLR 2025) of all modalities at once, never N x N.

    Each anchor sample is contrasted with the tuples of the other modalities' samples, scored by the volume
    of the parallelotope that the k + 1 unit vectors span (small for aligned tuples): the symmetric InfoNCE
    of the anchor against the tuples, on the logit ``-V / t``.

    Args:
        *embeddings: M >= 2 tensors (N, D), one per modality, as for ``pairwise_nce``.
        anchor: the index of the anchor modality (GRAM's text); the others, in index order, form the tuples.
        temperature: float, 0-d tensor or 1-element tensor, finite and > 0; a tensor that requires grad
            receives dL/dt. Checked as ``pairwise_nce``'s.
        mask: optional bool (M, N); a sample takes part when all M of its modalities are present.
        ids: optional int32/int64 (N,): samples with equal ids are positives of each other.
        label_smoothing: eps in [0, 1), as for ``pairwise_nce``.
        normalize: must be True (the volume is that of unit vectors); False raises ValueError.
        backend: "auto" (the Triton kernels for CUDA tensors and M <= 4, else "torch"), "torch" (exact pure
            PyTorch, any device, any M) or "triton" (M <= 4).
        group: a torch.distributed process group: negatives from every rank, as for ``pairwise_nce``.
        return_stats: also return ``{"direction_losses": (2,), "direction_accuracy": (2,)}`` (detached,
            float32): the loss and the top-1 retrieval accuracy of anchor -> tuples and tuples -> anchor.
        block_size: anchor rows per block of the torch backend.

    With the others o_1..o_k (k = M - 1), unit vectors x, s_ij = (<x_a,i, x_ol,j>)_l and C_j the Gram matrix
    of (x_o1,j, ..., x_ok,j), over the valid samples V (n = |V|):

        det G_ij = det C_j - s_ij^T adj(C_j) s_ij      (the Gram determinant of x_a,i, x_o1,j, ..., x_ok,j)
        V_ij = sqrt(max(det G_ij, 0) + 1e-8),   S_ij = -V_ij / t
        loss = (mean_i [logsumexp_j S_ij - S_ii] + mean_j [logsumexp_i S_ij - S_jj]) / 2

    with positives by id and label smoothing as in ``pairwise_nce``. For M = 2, V = sqrt(1 - <x_i, y_j>^2 +
    1e-8). A single valid sample gives exactly 0. Memory O(N (M D + k^2)).

    Returns:
        The loss, a 0-d tensor: float64 for float64 inputs, float32 otherwise; or (loss, stats).
    """
    return _run(embeddings, group, return_stats, dict(
        anchor=anchor, temperature=temperature, mask=mask, ids=ids, label_smoothing=label_smoothing,
        normalize=normalize, return_stats=return_stats, backend=backend, block_size=block_size), describe_gram)


def _run(embeddings, group, return_stats: bool, arguments: dict, describe=describe):
    """Validate once (on every rank under a group), gather across ranks, dispatch to the (objective, backend) op."""
    world = 1 if group is None else distributed.world_size(group)
    try:
        call, error = describe(embeddings, **arguments), None
    except (ValueError, TypeError, RuntimeError) as err:
        if world == 1:
            raise
        call, error = None, err
    if world > 1:  # every rank learns whether every rank's input is valid before any rank waits in a collective
        embeddings, call = distributed.gather_call(group, embeddings, call, error)
    if embeddings[0].device.type == "meta":
        return _shapes_only(embeddings, call, return_stats)

    loss, a, b = op.run(call, embeddings)
    if not return_stats:
        return loss
    names = ("direction_losses", "direction_accuracy") if call.objective == "gram" else ("pair_losses", "pair_accuracy")
    return loss, dict(zip(names, (a, b)))


def _shapes_only(embeddings, call, return_stats: bool):
    """Meta tensors have shapes and no values (shape propagation and FLOP counting, as PyTorch's own losses
    allow them): a meta loss of the result's dtype, connected to the inputs and the parameter tensors for
    autograd, and meta statistics of their shapes."""
    dtype = torch.float64 if embeddings[0].dtype == torch.float64 else torch.float32
    leaves = list(embeddings) + [p.tensor for p in (call.temperature, call.bias) if p is not None and
                                 p.tensor is not None and p.tensor.device.type == "meta"]
    loss = sum(x.sum().to(dtype) for x in leaves) * 0.0
    if not return_stats:
        return loss
    num_pairs = len(call.pairs)
    empty = dict(dtype=torch.float32, device="meta")
    if call.objective == "gram":
        return loss, {"direction_losses": torch.empty(2, **empty), "direction_accuracy": torch.empty(2, **empty)}
    return loss, {"pair_losses": torch.empty(num_pairs, **empty), "pair_accuracy": torch.empty(num_pairs, 2, **empty)}
