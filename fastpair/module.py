"""PairwiseNCE, PairwiseSigmoid and GramNCE: the losses with learnable (shared or per-pair) parameters, as
nn.Modules."""

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
from .loss import gram_nce, pairwise_nce, pairwise_sigmoid

if TYPE_CHECKING:
    from torch.distributed import ProcessGroup


class _TemperatureLoss(nn.Module):
    """What every loss module holds: M, the backend, and a learnable log-temperature (a parameter, or a buffer
    saved with the module). The temperature is t = exp(log_temperature), clamped so that 1/t <=
    max_logit_scale (CLIP's clamp of its logit scale at 100). Under DistributedDataParallel keep the module
    inside the wrapped model, so that every rank holds the same parameters."""

    def __init__(self, num_modalities: int, temperature: float, learn_temperature: bool, shape: tuple[int, ...],
                 max_logit_scale: float, backend: str) -> None:
        super().__init__()
        if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
            raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
        check_temperatures([float(temperature)])
        if not (isinstance(max_logit_scale, (int, float)) and max_logit_scale > 0):
            raise ValueError(f"max_logit_scale must be a number > 0, got {max_logit_scale!r}")
        check_backend(backend)
        self.num_modalities, self.backend = num_modalities, backend
        self.max_logit_scale = float(max_logit_scale)
        self._parameter("log_temperature", torch.full(shape, math.log(temperature)), learn_temperature)

    def _parameter(self, name: str, init: torch.Tensor, learn: bool) -> None:
        """A learnable parameter, or a buffer (saved with the module, never trained)."""
        if learn:
            setattr(self, name, nn.Parameter(init))
        else:
            self.register_buffer(name, init)

    @property
    def temperature(self) -> torch.Tensor:
        """t = exp(log_temperature), clamped to t >= 1 / max_logit_scale: 0-d, or (P,) per pair."""
        return self.log_temperature.clamp(min=-math.log(self.max_logit_scale)).exp()

    def _check_count(self, embeddings) -> None:
        if len(embeddings) != self.num_modalities:
            raise ValueError(f"{type(self).__name__}(num_modalities={self.num_modalities}) takes "
                             f"{self.num_modalities} embeddings, one per modality, got {len(embeddings)}")


def _check_num_modalities(num_modalities) -> None:
    if isinstance(num_modalities, bool) or not isinstance(num_modalities, int) or num_modalities < 2:
        raise ValueError(f"num_modalities must be an int >= 2, got {num_modalities!r}")


class _PairwiseLoss(_TemperatureLoss):
    """What both pairwise modules share: the pairs, weights and flags, and the temperature, shared or one per
    pair."""

    def __init__(self, num_modalities: int, temperature: float, learn_temperature: bool, per_pair: bool,
                 weights, max_logit_scale: float, normalize: bool, pairs, backend: str) -> None:
        _check_num_modalities(num_modalities)
        pairs = check_pairs(pairs, num_modalities)
        super().__init__(num_modalities, temperature, learn_temperature, (len(pairs),) if per_pair else (),
                         max_logit_scale, backend)
        self.pairs, self.num_pairs = pairs, len(pairs)
        self.normalize = normalize
        if weights is not None and not isinstance(weights, torch.Tensor):
            weights = [float(w) for w in weights]  # any iterable of numbers (a list, a NumPy array)
        self.weights = None if weights is None else check_weights(weights, self.num_pairs)

    def _shape(self, per_pair: bool) -> tuple[int, ...]:
        return (self.num_pairs,) if per_pair else ()

    def forward(
        self,
        *embeddings: torch.Tensor,
        mask: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        group: ProcessGroup | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of these embeddings with the module's parameters.

        Args:
            *embeddings: ``num_modalities`` tensors (N, D), one per modality, in the order the pairs index.
            mask: optional bool (M, N); False where modality m of sample i is missing.
            ids: optional int32/int64 (N,); samples with equal ids are positives of each other.
            group: a torch.distributed process group: negatives from every rank (see ``pairwise_nce``).
            return_stats: also return ``{"pair_losses": (P,), "pair_accuracy": (P, 2)}``.

        Returns:
            The 0-d loss, or ``(loss, stats)``.
        """
        self._check_count(embeddings)
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
    """``fastpair.pairwise_nce`` with a learnable temperature, as an ``nn.Module``.

    The module holds ``log_temperature`` (a parameter, or a buffer when not learned); the temperature is
    ``t = exp(log_temperature)``, clamped to ``t >= 1 / max_logit_scale`` as CLIP clamps its logit scale.
    open_clip's ``ClipLoss`` with ``logit_scale`` corresponds to ``t = 1 / logit_scale.exp()``: its
    initialization ``log(1 / 0.07)`` is ``temperature=0.07`` here, its clamp at 100 is ``max_logit_scale=100``.

    Args:
        num_modalities: M >= 2, the number of embeddings ``forward`` takes.
        temperature: the initial t > 0 (a number; 0.07 as CLIP). A value above 5 is warned about once: it
            is likely a logit scale, whose inverse is meant.
        learn_temperature: learn t (a parameter); False keeps it fixed (a buffer, saved with the module).
        per_pair_temperature: one t per pair instead of one shared.
        weights: optional non-negative weight per pair (not all zero); the loss is the weighted mean.
        max_logit_scale: the largest 1/t the clamp allows (CLIP: 100).
        normalize: L2-normalize the embeddings first (cosine similarities), as CLIP does.
        pairs: the contrasted pairs (p, q) (default: every pair, ``itertools.combinations(range(M), 2)``).
        label_smoothing: eps in [0, 1), as ``F.cross_entropy(label_smoothing=eps)``.
        backend: "auto", "torch" or "triton" (see ``fastpair.pairwise_nce``).

    Under DistributedDataParallel keep the module inside the wrapped model (or all-reduce its gradients) so
    that every rank holds the same temperature.

    Example:
        ```python
        loss_fn = PairwiseNCE(3)             # text, audio, vision; learnable t from 0.07
        loss = loss_fn(text, audio, vision)  # each (N, D)
        loss.backward()
        ```
    """

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
    """``fastpair.pairwise_sigmoid`` with a learnable temperature and bias, as an ``nn.Module``.

    The module holds ``log_temperature`` and ``bias`` (parameters, or buffers when not learned); ``t =
    exp(log_temperature)`` is clamped to ``t >= 1 / max_logit_scale``. open_clip's ``SigLipLoss`` with
    ``logit_scale`` and ``logit_bias`` corresponds to ``t = 1 / logit_scale.exp()`` and ``bias =
    logit_bias``: SigLIP's initialization (``logit_scale = log 10``, ``logit_bias = -10``) is the default here.

    Args:
        num_modalities: M >= 2, the number of embeddings ``forward`` takes.
        temperature: the initial t > 0 (0.1 as SigLIP). A value above 5 is warned about once (a logit scale?).
        bias: the initial b, finite (-10 as SigLIP).
        learn_temperature: learn t (a parameter); False keeps it fixed (a buffer).
        learn_bias: learn b (a parameter); False keeps it fixed (a buffer).
        per_pair: one t and one b per pair instead of one shared.
        weights: optional non-negative weight per pair (not all zero); the loss is the weighted mean.
        max_logit_scale: the largest 1/t the clamp allows.
        normalize: L2-normalize the embeddings first, as SigLIP does.
        pairs: the contrasted pairs (p, q) (default: every pair).
        backend: "auto", "torch" or "triton" (see ``fastpair.pairwise_sigmoid``).
    """

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


class GramNCE(_TemperatureLoss):
    """``fastpair.gram_nce`` with a learnable temperature, as an ``nn.Module``.

    The module holds ``log_temperature`` (a parameter, or a buffer when not learned); ``t =
    exp(log_temperature)`` is clamped to ``t >= 1 / max_logit_scale``. GRAM's own training initializes
    1/t at 1/0.07 as CLIP does, the default here.

    Args:
        num_modalities: M >= 2, the number of embeddings ``forward`` takes.
        anchor: the index of the anchor modality; the others form the tuples.
        temperature: the initial t > 0 (a number). A value above 5 is warned about once (a logit scale?).
        learn_temperature: learn t (a parameter); False keeps it fixed (a buffer, saved with the module).
        max_logit_scale: the largest 1/t the clamp allows (CLIP: 100).
        label_smoothing: eps in [0, 1), as ``F.cross_entropy(label_smoothing=eps)``.
        backend: "auto", "torch" or "triton" (see ``fastpair.gram_nce``).

    Example:
        ```python
        loss_fn = GramNCE(3, anchor=0)       # text as the anchor of (audio, vision) tuples
        loss = loss_fn(text, audio, vision)  # each (N, D)
        ```
    """

    def __init__(
        self,
        num_modalities: int,
        anchor: int = 0,
        temperature: float = 0.07,
        learn_temperature: bool = True,
        max_logit_scale: float = 100.0,
        label_smoothing: float = 0.0,
        backend: str = "auto",
    ) -> None:
        _check_num_modalities(num_modalities)
        if isinstance(anchor, bool) or not isinstance(anchor, int) or not 0 <= anchor < num_modalities:
            raise ValueError(f"anchor must be an int in [0, {num_modalities}), got {anchor!r}")
        super().__init__(num_modalities, temperature, learn_temperature, (), max_logit_scale, backend)
        self.anchor = anchor
        self.label_smoothing = check_label_smoothing(label_smoothing)

    def forward(
        self,
        *embeddings: torch.Tensor,
        mask: torch.Tensor | None = None,
        ids: torch.Tensor | None = None,
        group: ProcessGroup | None = None,
        return_stats: bool = False,
    ) -> torch.Tensor | tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """The loss of these embeddings with the module's temperature (arguments as ``gram_nce``'s).

        Returns:
            The 0-d loss, or ``(loss, {"direction_losses": (2,), "direction_accuracy": (2,)})``.
        """
        self._check_count(embeddings)
        return gram_nce(*embeddings, anchor=self.anchor, temperature=self.temperature, mask=mask, ids=ids,
                        label_smoothing=self.label_smoothing, backend=self.backend, group=group,
                        return_stats=return_stats)

    def extra_repr(self) -> str:
        return (f"num_modalities={self.num_modalities}, anchor={self.anchor}, max_logit_scale="
                f"{self.max_logit_scale}, label_smoothing={self.label_smoothing}, backend={self.backend!r}")
