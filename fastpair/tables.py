"""Small device-side tables shared by the backends and the epilogue."""

from __future__ import annotations

import functools

import torch


@functools.lru_cache(maxsize=512)
def constant(values: tuple, dtype: torch.dtype, device: str) -> torch.Tensor:
    """A small constant table on the device, made once: torch.tensor(..., device="cuda") copies from
    pageable memory and so waits for the GPU, which would serialize the host and the device every call.
    Callers must not write to it."""
    return torch.tensor(values, dtype=dtype, device=device)


def pair_valid(mask: torch.Tensor, pairs) -> torch.Tensor:
    """(P, N) bool: sample i takes part in pair (p, q) when both of its modalities are present."""
    return torch.stack([mask[p] & mask[q] for p, q in pairs])
