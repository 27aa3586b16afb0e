"""Two views of every clip (``--views 2``, the authors' protocol): two random temporal crops per modality.

A batch of B clips becomes one of 2B rows, the first crop of every clip and then the second, with
``batch["ids"]`` the clips' sample indices twice: ``pairwise_nce(..., ids=)`` then treats both crops of a clip
as positives of each other across modalities (row i of modality p against row j of modality q is a positive
iff ids[i] == ids[j]), and every other clip's crops as negatives. The indices are the data set's, so ids
stay unique across torchrun's ranks, which the loss gathers.

A crop of a sequence is a window of L steps (``--crop-length``, at most the time axis T; 0 means half of T,
rounded up), its start uniform over the clip's valid span: from the first valid step to the last start that
keeps the window inside the span (the first valid step when the clip is shorter than L, the window then
running past its end onto padding, and past T: padding too). A crop without a valid step leaves that
modality missing in that view (the loss's mask). A vector modality has no time axis: both views hold it whole.
"""

from __future__ import annotations

import torch


def window_starts(mask: torch.Tensor, length: int, generator: torch.Generator) -> torch.Tensor:
    """(B,) start steps of one random window of ``length`` per row of mask (B, T), within each valid span."""
    steps = mask.shape[1]
    t = torch.arange(steps, device=mask.device)
    first = torch.where(mask, t, steps).amin(dim=1).clamp(max=steps - 1)
    last = torch.where(mask, t, -1).amax(dim=1).clamp(min=0)
    choices = (last - length + 1 - first).clamp(min=0) + 1  # starts first .. max(first, last - L + 1)
    u = torch.rand(mask.shape[0], generator=generator).to(mask.device)
    return first + (u * choices).long().clamp(max=choices - 1)


def crop(x: torch.Tensor, mask: torch.Tensor, length: int, generator: torch.Generator):
    """One random window per row: x (B, T, F), mask (B, T) -> (B, L, F), (B, L)."""
    idx = window_starts(mask, length, generator)[:, None] + torch.arange(length, device=x.device)
    inside = idx < x.shape[1]
    idx = idx.clamp(max=x.shape[1] - 1)
    xs = torch.gather(x, 1, idx[..., None].expand(-1, -1, x.shape[2]))
    ms = torch.gather(mask, 1, idx) & inside
    return xs * ms[..., None].to(xs.dtype), ms


def two_views(batch: dict[str, torch.Tensor], ids: torch.Tensor, modalities, crop_length: int,
              generator: torch.Generator) -> dict[str, torch.Tensor]:
    """The batch of 2B rows described above, ``ids`` (B,) the clips' sample indices."""
    out = {"y": batch["y"].repeat(2), "ids": ids.to(batch["y"].device).repeat(2)}
    for m in modalities:
        x, mask = batch[m], batch[m + "_mask"]
        if x.ndim == 2:
            out[m], out[m + "_mask"] = x.repeat(2, 1), mask.repeat(2)
            continue
        length = min(crop_length or (x.shape[1] + 1) // 2, x.shape[1])
        crops = [crop(x, mask, length, generator) for _ in range(2)]
        out[m] = torch.cat([c[0] for c in crops])
        out[m + "_mask"] = torch.cat([c[1] for c in crops])
    return out
