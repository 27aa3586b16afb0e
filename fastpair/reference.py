"""The materialized formula of docs/design.md: the tests' oracle and the benchmark's plain-PyTorch baseline.

``pairwise_nce_reference(..., upcast=True)`` computes in float64 (the oracle);
``upcast=False`` keeps the input dtype and is exactly "plain PyTorch": logits as an N x N matrix and
F.cross_entropy in both directions. Memory is O(N^2) per pair; use it only for checking and baselines.
"""

from __future__ import annotations

import itertools

import torch
import torch.nn.functional as F


def pairwise_nce_reference(
    *embeddings: torch.Tensor,
    temperature=0.07,
    weights=None,
    mask: torch.Tensor | None = None,
    normalize: bool = True,
    upcast: bool = True,
    return_stats: bool = False,
    pairs=None,
    ids: torch.Tensor | None = None,
    label_smoothing: float = 0.0,
):
    """The loss of docs/design.md, materialized. With ids or label smoothing, each direction is
    F.cross_entropy against the target matrix T (T_ij = (1 - eps) [ids_i == ids_j] / |P(i)| + eps / n, a
    distribution over the valid columns); without, against the diagonal, as plain PyTorch would."""
    pairs = list(pairs) if pairs is not None else list(itertools.combinations(range(len(embeddings)), 2))
    dtype = torch.float64 if upcast else embeddings[0].dtype
    zs = [z.to(dtype) for z in embeddings]
    xs = [F.normalize(z, dim=1, eps=1e-12) for z in zs] if normalize else zs
    if isinstance(temperature, torch.Tensor):
        temps = temperature.to(dtype).reshape(-1).expand(len(pairs))
    elif isinstance(temperature, (list, tuple)):
        temps = [float(t) for t in temperature]
    else:
        temps = [float(temperature)] * len(pairs)
    ws = [float(w) for w in weights] if weights is not None else [1.0] * len(pairs)

    losses, accs, used = [], [], []
    for k, (p, q) in enumerate(pairs):
        x, y = xs[p], xs[q]
        pair_ids = ids
        if mask is not None:
            valid = mask[p] & mask[q]
            x, y = x[valid], y[valid]
            pair_ids = None if ids is None else ids[valid]
        n = x.shape[0]
        if n == 0:
            losses.append(zs[0].new_zeros(()))
            accs.append([0.0, 0.0])
            used.append(0.0)
            continue
        logits = x @ y.T / temps[k]
        same = torch.eye(n, dtype=torch.bool, device=x.device) if pair_ids is None else \
            pair_ids[:, None] == pair_ids[None, :]
        if pair_ids is None and label_smoothing == 0.0:
            labels = torch.arange(n, device=x.device)
            losses.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        else:
            target = (1.0 - label_smoothing) * same.to(dtype) / same.sum(dim=1, keepdim=True) + label_smoothing / n
            losses.append((F.cross_entropy(logits, target) + F.cross_entropy(logits.T, target.T)) / 2)
        if return_stats:  # only when asked: an argmax pass and a host sync are no part of the loss
            with torch.no_grad():
                rows = same.gather(1, logits.argmax(1)[:, None]).squeeze(1)
                cols = same.gather(0, logits.argmax(0)[None, :]).squeeze(0)
                accs.append([rows.double().mean().item(), cols.double().mean().item()])
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


def clip_loss_reference(image: torch.Tensor, text: torch.Tensor, logit_scale: float) -> torch.Tensor:
    """CLIP's symmetric loss as open_clip's ClipLoss computes it (normalized features, one process)."""
    image, text = F.normalize(image, dim=-1), F.normalize(text, dim=-1)
    logits_per_image = logit_scale * image @ text.T
    logits_per_text = logit_scale * text @ image.T
    labels = torch.arange(image.shape[0], device=image.device)
    return (F.cross_entropy(logits_per_image, labels) + F.cross_entropy(logits_per_text, labels)) / 2
