"""PairwiseNCE and PairwiseSigmoid: the losses with learnable (shared or per-pair) parameters, as nn.Modules."""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import TYPE_CHECKING

import torch
from torch import nn

from .call import (
    check_backend,
    check_biases,
    check_label_smoothing,
    check_pairs,
    check_temperatures,
    check_weights,
)
from .loss import pairwise_nce, pairwise_sigmoid

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class _PairwiseLoss(nn.Module):
    """What both modules share: the pairs, weights and flags, and a learnable log-temperature. The
    temperature is t = exp(log_temperature), clamped so that 1/t <= max_logit_scale (CLIP's clamp of its
    logit scale at 100). Under DistributedDataParallel keep the module inside the wrapped model, so that
    every rank holds the same parameters."""

    def __init__(self, num_modalities: int, temperature: float, learn_temperature: bool, per_pair: bool,
                 weights, max_logit_scale: float, normalize: bool, pairs, backend: str) -> None:
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
        self.max_logit_scale = float(max_logit_scale)
        self.normalize = normalize
        self.backend = backend
        if weights is not None and not isinstance(weights, torch.Tensor):
            weights = [float(w) for w in weights]  # any iterable of numbers (a list, a NumPy array)
        self.weights = None if weights is None else check_weights(weights, self.num_pairs)
        self._parameter("log_temperature", torch.full(self._shape(per_pair), math.log(temperature)), learn_temperature)

    def _shape(self, per_pair: bool) -> tuple[int, ...]:
        return (self.num_pairs,) if per_pair else ()

    def _parameter(self, name: str, init: torch.Tensor, learn: bool) -> None:
        """A learnable parameter, or a buffer (saved with the module, never trained)."""
        if learn:
            setattr(self, name, nn.Parameter(init))
        else:
            self.register_buffer(name, init)

    @property
    def temperature(self) -> torch.Tensor:
        return self.log_temperature.clamp(min=-math.log(self.max_logit_scale)).exp()

    def forward(
        self,
        *embeddings: torch.Tensor,
        mask: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        group: ProcessGroup | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return self._loss(*embeddings, temperature=self.temperature, weights=self.weights, mask=mask,
                          normalize=self.normalize, pairs=self.pairs, ids=ids, backend=self.backend, group=group,
                          return_stats=return_stats, **self._arguments())

    def _arguments(self) -> dict:
        """The loss's own arguments beyond the shared ones."""
        return {}

    def extra_repr(self) -> str:
        extra = "".join(f", {k}={v}" for k, v in self._arguments().items() if not isinstance(v, torch.Tensor))
        return (f"num_modalities={self.num_modalities}, pairs={list(self.pairs)}, "
                f"parameter_shape={tuple(self.log_temperature.shape)}, max_logit_scale={self.max_logit_scale}"
                f"{extra}, backend={self.backend!r}")


class PairwiseNCE(_PairwiseLoss):
    """Holds log(t) and calls :func:`fastpair.pairwise_nce` (per_pair_temperature: one t per pair)."""

    _loss = staticmethod(pairwise_nce)

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
        super().__init__(num_modalities, temperature, learn_temperature, per_pair_temperature, weights,
                         max_logit_scale, normalize, pairs, backend)
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def _arguments(self) -> dict:
        return {"label_smoothing": self.label_smoothing}


class PairwiseSigmoid(_PairwiseLoss):
    """Holds log(t) and b and calls :func:`fastpair.pairwise_sigmoid` (SigLIP's initialization: 1/t = 10,
    b = -10); per_pair makes t and b one per pair."""

    _loss = staticmethod(pairwise_sigmoid)

    def __init__(
        self,
        num_modalities: int,
        temperature: float = 0.1,
        bias: float = -10.0,
        learn_temperature: bool = True,
        learn_bias: bool = True,
        per_pair: bool = False,
        weights: Sequence[float] | None = None,
        max_logit_scale: float = 100.0,
        normalize: bool = True,
        pairs: Sequence[tuple[int, int]] | None = None,
        backend: str = "auto",
    ) -> None:
        super().__init__(num_modalities, temperature, learn_temperature, per_pair, weights, max_logit_scale,
                         normalize, pairs, backend)
        if isinstance(bias, bool) or not isinstance(bias, (int, float)):
            raise ValueError(f"bias must be a finite number, got {bias!r}")
        check_biases([float(bias)])
        self._parameter("bias", torch.full(self._shape(per_pair), float(bias)), learn_bias)

    def _arguments(self) -> dict:
        return {"bias": self.bias}
