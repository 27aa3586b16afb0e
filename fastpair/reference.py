"""The materialized formulas of docs/design.md: the tests' oracle and the benchmark's plain-PyTorch baselines.

``pairwise_nce_reference(..., upcast=True)`` and ``pairwise_sigmoid_reference`` compute in float64 (the
oracle); ``upcast=False`` keeps the input dtype and is exactly "plain PyTorch": logits as an N x N matrix
per pair, then F.cross_entropy in both directions, or F.logsigmoid of the signed logits. Memory is O(N^2)
per pair; use them only for checking and baselines.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def pairwise_nce_reference(*embeddings: torch.Tensor, temperature=0.07, weights=None, mask=None,
                           normalize: bool = True, upcast: bool = True, return_stats: bool = False, pairs=None,
                           ids: torch.Tensor | None = None, label_smoothing: float = 0.0):
    """The InfoNCE loss family. With ids or label smoothing, each direction is F.cross_entropy against the
    target matrix T (T_ij = (1 - eps) [ids_i == ids_j] / |P(i)| + eps / n, a distribution over the valid
    columns); without, against the diagonal, as plain PyTorch would."""

    def pair_loss(logits, same, k):
        return sum(_directions(logits, same, label_smoothing)) / 2

    return _pairwise(embeddings, pair_loss, temperature, weights, mask, normalize, upcast, return_stats, pairs, ids)


def _directions(logits, same, label_smoothing: float) -> tuple[torch.Tensor, torch.Tensor]:
    """InfoNCE's two directions, rows and columns: F.cross_entropy against the diagonal, or against the target
    matrix T (T_ij = (1 - eps) [ids_i == ids_j] / |P(i)| + eps / n) with ids or label smoothing."""
    n, dtype = logits.shape[0], logits.dtype
    if same is None and label_smoothing == 0.0:
        labels = torch.arange(n, device=logits.device)
        return F.cross_entropy(logits, labels), F.cross_entropy(logits.T, labels)
    if same is None:
        same = torch.eye(n, dtype=torch.bool, device=logits.device)
    target = (1.0 - label_smoothing) * same.to(dtype) / same.sum(dim=1, keepdim=True) + label_smoothing / n
    return F.cross_entropy(logits, target), F.cross_entropy(logits.T, target.T)


def gram_nce_reference(*embeddings: torch.Tensor, anchor: int = 0, temperature=0.07, mask=None,
                       ids: torch.Tensor | None = None, label_smoothing: float = 0.0, upcast: bool = True,
                       return_stats: bool = False, eps_v: float = 1e-8):
    """GRAM's volume loss as its public code computes it: for every (anchor row i, column j) the (k+1) x (k+1)
    Gram matrix of (x_a,i, x_o1,j, ..., x_ok,j) materialized from the similarity matrices (an
    N x N x (k+1) x (k+1) tensor), its determinant by torch.linalg.det, V = sqrt(max(det, 0) + eps_v),
    logits -V / t, InfoNCE both ways over the samples with every modality present.
    Stats: {"direction_losses": (2,), "direction_accuracy": (2,)}."""
    dtype = torch.float64 if upcast else embeddings[0].dtype
    xs = [F.normalize(z.to(dtype), dim=1, eps=1e-12) for z in embeddings]
    if mask is not None:
        valid = mask.all(dim=0)
        xs = [x[valid] for x in xs]
        ids = None if ids is None else ids[valid]
    n = xs[0].shape[0]
    if n == 0:
        loss = sum(0.0 * z.sum() for z in embeddings).to(dtype)
        zeros = torch.zeros(2, dtype=torch.float32)
        return (loss, {"direction_losses": zeros, "direction_accuracy": zeros}) if return_stats else loss
    a, others = xs[anchor], [x for m, x in enumerate(xs) if m != anchor]
    k = len(others)
    g = a.new_empty(n, n, k + 1, k + 1)
    g[:, :, 0, 0] = (a * a).sum(dim=1)[:, None]
    for l, x in enumerate(others, start=1):
        g[:, :, 0, l] = g[:, :, l, 0] = a @ x.T
        for m, y in enumerate(others[l - 1:], start=l):
            g[:, :, l, m] = g[:, :, m, l] = (x * y).sum(dim=1)[None, :]
    volume = torch.sqrt(torch.linalg.det(g).clamp(min=0.0) + eps_v)
    t = temperature.to(dtype) if isinstance(temperature, torch.Tensor) else float(temperature)
    logits = -volume / t
    same = None if ids is None else ids[:, None] == ids[None, :]
    rows, cols = _directions(logits, same, label_smoothing)
    loss = (rows + cols) / 2
    if not return_stats:
        return loss
    return loss, {"direction_losses": torch.stack([rows, cols]).detach().float(),
                  "direction_accuracy": torch.tensor(_accuracy(logits, same), dtype=torch.float32)}


def pairwise_sigmoid_reference(*embeddings: torch.Tensor, temperature=0.1, bias=-10.0, weights=None, mask=None,
                               normalize: bool = True, upcast: bool = True, return_stats: bool = False, pairs=None,
                               ids: torch.Tensor | None = None):
    """SigLIP's loss per pair: -(1/n) sum_ij log sigmoid(z_ij (S_ij + b)), z = +1 for positives, -1 else."""
    num_pairs = len(_pair_list(embeddings, pairs))

    def pair_loss(logits, same, k):
        n = logits.shape[0]
        if same is None:
            same = torch.eye(n, dtype=torch.bool, device=logits.device)
        b = _per_pair_values(bias, num_pairs, logits.dtype)[k]
        signs = same.to(logits.dtype) * 2.0 - 1.0
        return -F.logsigmoid(signs * (logits + b)).sum() / n

    return _pairwise(embeddings, pair_loss, temperature, weights, mask, normalize, upcast, return_stats, pairs, ids)


def _pair_list(embeddings, pairs):
    return list(pairs) if pairs is not None else list(itertools.combinations(range(len(embeddings)), 2))


def _per_pair_values(value, num_pairs: int, dtype):
    """A number, a sequence, or a 0-d / (P,) tensor as P values (tensors keep their autograd graph)."""
    if isinstance(value, torch.Tensor):
        return value.to(dtype).reshape(-1).expand(num_pairs)
    if isinstance(value, (list, tuple)):
        return [float(v) for v in value]
    return [float(value)] * num_pairs


def _pairwise(embeddings, pair_loss, temperature, weights, mask, normalize, upcast, return_stats, pairs, ids):
    """sum_pq w_pq L_pq / sum_pq w_pq over the pairs with valid samples (0 with zero gradients if none),
    with L_pq = pair_loss(logits over the pair's valid samples, [ids_i == ids_j] or None, k)."""
    pairs = _pair_list(embeddings, pairs)
    dtype = torch.float64 if upcast else embeddings[0].dtype
    zs = [z.to(dtype) for z in embeddings]
    xs = [F.normalize(z, dim=1, eps=1e-12) for z in zs] if normalize else zs
    temps = _per_pair_values(temperature, len(pairs), dtype)
    ws = [float(w) for w in weights] if weights is not None else [1.0] * len(pairs)

    losses, accs, used = [], [], []
    for k, (p, q) in enumerate(pairs):
        x, y, pair_ids = xs[p], xs[q], ids
        if mask is not None:
            valid = mask[p] & mask[q]
            x, y = x[valid], y[valid]
            pair_ids = None if ids is None else ids[valid]
        if x.shape[0] == 0:
            losses.append(zs[0].new_zeros(()))
            accs.append([0.0, 0.0])
            used.append(0.0)
            continue
        logits = x @ y.T / temps[k]
        same = None if pair_ids is None else pair_ids[:, None] == pair_ids[None, :]
        losses.append(pair_loss(logits, same, k))
        if return_stats:  # only when asked: an argmax pass and a host sync are no part of the loss
            accs.append(_accuracy(logits, same))
        used.append(ws[k])
    total = sum(used)
    if total == 0:
        loss = sum(0.0 * z.sum() for z in zs)  # zero, with zero gradients
    else:
        loss = sum(w * loss_k for w, loss_k in zip(used, losses)) / total
    if return_stats:
        stats = {
            "pair_losses": torch.stack([loss_k.detach().float() for loss_k in losses]),
            "pair_accuracy": torch.tensor(accs, dtype=torch.float32),
        }
        return loss, stats
    return loss


def _accuracy(logits: torch.Tensor, same) -> list[float]:
    """Top-1 retrieval x->y and y->x: a hit when the argmax is the row itself, or shares its id."""
    with torch.no_grad():
        if same is None:
            same = torch.eye(logits.shape[0], dtype=torch.bool, device=logits.device)
        rows = same.gather(1, logits.argmax(1)[:, None]).squeeze(1)
        cols = same.gather(0, logits.argmax(0)[None, :]).squeeze(0)
        return [rows.double().mean().item(), cols.double().mean().item()]


def clip_loss_reference(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP's symmetric loss as open_clip's ClipLoss computes it (normalized features, one process)."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logit_scale * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2


def siglip_loss_reference(image: torch.Tensor, text: torch.Tensor, logit_scale, logit_bias) -> torch.Tensor:
    """SigLIP's loss as open_clip's SigLipLoss computes it on one device (normalized features): labels
    2I - 1, -sum logsigmoid(labels * logits) / N."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits = logit_scale * image @ text.T + logit_bias
    labels = 2 * torch.eye(image.shape[0], device=image.device, dtype=image.dtype) - 1
    return -F.logsigmoid(labels * logits).sum() / image.shape[0]
