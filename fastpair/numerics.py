"""The numeric constants both backends share."""

from __future__ import annotations

import torch

LOG2E = 1.4426950408889634  # logits are kept in base 2, so every exponential is an exp2
LN2 = 0.6931471805599453
NORM_EPS = 1e-12  # F.normalize's eps: x = z / max(||z||, eps)


def exp_bound(dtype: torch.dtype) -> float:
    """Largest logit scale 1/t for which exp(S), |S| <= 1/t, is safe without a running max.

    float32: exp(+-60) stays within [8.7e-27, 1.2e26], normal numbers, and N * e^60 < 3.4e38 for any
    batch below 2^40. float64: exp(+-600) likewise within its normal range. (The Triton kernels compute
    in float32 for every input dtype.)
    """
    return 600.0 if dtype == torch.float64 else 60.0
