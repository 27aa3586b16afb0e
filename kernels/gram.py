"""GRAM's Triton op (fastpair.op): small batches in one fused program (gram_small.takes), every other batch through
the tiled kernels (gram_ops.py: both sweeps, the gradient panels, cuBLAS)."""

from __future__ import annotations

from fastpair.call import Call
from fastpair.op import Needs, Result, through_autograd

from . import gram_small
from .gram_ops import gram_nce_triton

_tiled = through_autograd(gram_nce_triton)


def gram_op(call: Call, zs, needs: Needs) -> Result:
    if gram_small.takes(call, zs):
        return gram_small.gram_op(call, zs, needs)
    return _tiled(call, zs, needs)
