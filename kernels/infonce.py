"""The InfoNCE objective's Triton op (fastpair.op): small batches in one fused program (infonce_small), every
other batch through the tiled kernels' custom ops (ops.py: the sweep, the gradient panels, cuBLAS)."""

from __future__ import annotations

from fastpair.call import Call
from fastpair.op import Needs, Result, through_autograd

from . import infonce_small, small
from .ops import pairwise_nce_triton

_tiled = through_autograd(pairwise_nce_triton)


def nce_op(call: Call, zs, needs: Needs) -> Result:
    if small.takes(call, zs):
        return infonce_small.nce_op(call, zs, needs)
    return _tiled(call, zs, needs)
