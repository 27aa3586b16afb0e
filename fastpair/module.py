"""PairwiseNCE: pairwise_nce with a learnable (shared or per-pair) temperature, as an nn.Module."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .call import check_backend, check_label_smoothing, check_pairs, check_temperatures, check_weights
from .loss import pairwise_nce

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class PairwiseNCE(nn.Module):
    """Holds log(t) and calls :func:`fastpair.pairwise_nce`.

    The temperature is t = exp(log_temperature), clamped so that 1/t <= max_logit_scale (CLIP's clamp of
    its logit scale at 100). Under DistributedDataParallel keep this module inside the wrapped model, so
    that every rank holds the same temperature.
    """

    def __init__(
        self,
        num_modalities: int,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        per_pair_temperature: bool = False,
        weights: Sequence[float] | None = None,
        max_logit_scale: float = 100.0,
        normalize: bool = True,
        pairs: Sequence[tuple[int, int]] | None = None,
        label_smoothing: float = 0.0,
        backend: str = "auto",
    ) -> None:
        super().__init__()
        if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 2:
            raise ValueError(f"num_modalities must be an int >= 2, got {num_modalities!r}")
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        check_temperatures([float(temperature)])
        if not (isinstance(max_logit_scale, (int, float)) and max_logit_scale > 0):
            raise ValueError(f"max_logit_scale must be a number > 0, got {max_logit_scale!r}")
        check_backend(backend)
        self.num_modalities = num_modalities
        self.pairs = check_pairs(pairs, num_modalities)
        self.num_pairs = len(self.pairs)
        self.label_smoothing = check_label_smoothing(label_smoothing)
        self.max_logit_scale = float(max_logit_scale)
        self.normalize = normalize
        self.backend = backend
        if weights is not None and not isinstance(weights, torch.Tensor):
            weights = [float(w) for w in weights]  # any iterable of numbers (a list, a NumPy array)
        self.weights = None if weights is None else check_weights(weights, self.num_pairs)
        shape = (self.num_pairs,) if per_pair_temperature else ()
        init = torch.full(shape, math.log(temperature))
        if learn_temperature:
            self.log_temperature = nn.Parameter(init)
        else:
            self.register_buffer("log_temperature", init)

    @property
    def temperature(self) -> torch.Tensor:
        min_log_t = -math.log(self.max_logit_scale)
        return self.log_temperature.clamp(min=min_log_t).exp()

    def forward(
        self,
        *embeddings: torch.Tensor,
        mask: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        group: ProcessGroup | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return pairwise_nce(
            *embeddings,
            temperature=self.temperature,
            weights=self.weights,
            mask=mask,
            normalize=self.normalize,
            pairs=self.pairs,
            ids=ids,
            label_smoothing=self.label_smoothing,
            backend=self.backend,
            group=group,
            return_stats=return_stats,
        )

    def extra_repr(self) -> str:
        return (f"num_modalities={self.num_modalities}, pairs={list(self.pairs)}, "
                f"temperature_shape={tuple(self.log_temperature.shape)}, max_logit_scale={self.max_logit_scale}, "
                f"label_smoothing={self.label_smoothing}, backend={self.backend!r}")
