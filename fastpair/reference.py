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
):
    pairs = list(itertools.combinations(range(len(embeddings)), 2))
    dtype = torch.float64 if upcast else embeddings[0].dtype
    zs = [z.to(dtype) for z in embeddings]
    xs = [F.normalize(z, dim=1, eps=1e-12) for z in zs] if normalize else zs
    if isinstance(temperature, torch.Tensor):
        temps = temperature.to(dtype).reshape(-1).expand(len(pairs))
    else:
        temps = [float(temperature)] * len(pairs)
    ws = [float(w) for w in weights] if weights is not None else [1.0] * len(pairs)

    losses, accs, used = [], [], []
    for k, (p, q) in enumerate(pairs):
        x, y = xs[p], xs[q]
        if mask is not None:
            valid = mask[p] & mask[q]
            x, y = x[valid], y[valid]
        n = x.shape[0]
        if n == 0:
            losses.append(zs[0].new_zeros(()))
            accs.append([0.0, 0.0])
            used.append(0.0)
            continue
        logits = x @ y.T / temps[k]
        labels = torch.arange(n, device=x.device)
        losses.append((F.cross_entropy(logits, labels) + F.cross_entropy(logits.T, labels)) / 2)
        if return_stats:  # only when asked: an argmax pass and a host sync are no part of the loss
            with torch.no_grad():
                accs.append([(logits.argmax(1) == labels).double().mean().item(),
                             (logits.argmax(0) == labels).double().mean().item()])
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
