"""The sigmoid objective's Triton op (fastpair.op): small batches in one fused program (sigmoid_small), every
other batch through the tiled kernels' custom ops (sigmoid_ops.py: the sweep, the gradient panels, cuBLAS)."""

from __future__ import annotations

from fastpair.call import Call
from fastpair.op import Needs, Result, through_autograd

from . import sigmoid_small, small
from .sigmoid_ops import pairwise_sigmoid_triton

_tiled = through_autograd(pairwise_sigmoid_triton)


def sigmoid_op(call: Call, zs, needs: Needs) -> Result:
    if small.takes(call, zs):
        return sigmoid_small.sigmoid_op(call, zs, needs)
    return _tiled(call, zs, needs)
