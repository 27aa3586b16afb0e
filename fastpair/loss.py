"""Public entry point: validation and dispatch of the modality-pairwise InfoNCE loss."""

from __future__ import annotations

import itertools
import math
import numbers
from collections.abc import Sequence

import torch

from . import _torch_backend
from . import kernels as _kernels
from ._torch_backend import PairwiseNCEFunction, Plan

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def modality_pairs(num_modalities: int) -> list[tuple[int, int]]:
    """The pairs in the order every backend and statistic uses: itertools.combinations(range(M), 2)."""
    return list(itertools.combinations(range(num_modalities), 2))


def _check_embeddings(embeddings) -> None:
    if len(embeddings) < 2:
        raise ValueError(f"pairwise_nce needs at least 2 modality embeddings, got {len(embeddings)}")
    for m, z in enumerate(embeddings):
        if not isinstance(z, torch.Tensor):
            raise TypeError(f"embedding {m} must be a torch.Tensor of shape (N, D), got {type(z).__name__}")
        if z.dim() != 2:
            raise ValueError(f"embedding {m} must be 2-d (N, D), got shape {tuple(z.shape)}")
        if z.dtype not in FLOAT_DTYPES:
            raise TypeError(f"embedding {m} must be float32, float16, bfloat16 or float64, got {z.dtype}")
    first = embeddings[0]
    for m, z in enumerate(embeddings[1:], start=1):
        if z.shape != first.shape:
            raise ValueError(
                f"all embeddings must have the same shape (N, D); embedding 0 is {tuple(first.shape)}, "
                f"embedding {m} is {tuple(z.shape)}"
            )
        if z.dtype != first.dtype:
            raise TypeError(
                f"all embeddings must share one dtype; embedding 0 is {first.dtype}, embedding {m} is {z.dtype}"
            )
        if z.device != first.device:
            raise ValueError(
                f"all embeddings must be on one device; embedding 0 is on {first.device}, embedding {m} on {z.device}"
            )
    n, d = first.shape
    if n == 0:
        raise ValueError("the batch is empty (N = 0); pairwise_nce needs at least one sample")
    if d == 0:
        raise ValueError("the embedding dimension is 0 (D = 0); pairwise_nce needs D >= 1")


def tensor_values(value: torch.Tensor, count: int) -> list[float]:
    """A small parameter tensor's values on the host (one sync), repeated to `count` if it is 0-d."""
    values = value.detach().to("cpu", torch.float64).reshape(-1).tolist()
    return values * (count if value.dim() == 0 else 1)


def check_temperatures(temps: list[float]) -> None:
    for t in temps:
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temps if len(set(temps)) > 1 else t}")


def _host_values(name: str, value, count: int, allow_scalar: bool, read_tensor: bool = True):
    """Read a float, a sequence or a small tensor into host floats; returns (values, tensor shape).
    With read_tensor=False a tensor's type and shape are checked but its values are not read (None)."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.dim() == 0 and allow_scalar:
            shape: tuple[int, ...] = ()
        elif value.dim() == 1 and value.numel() == count:
            shape = (count,)
        else:
            expected = "a 0-d tensor or " if allow_scalar else ""
            raise ValueError(f"{name} must be {expected}a 1-d tensor with one entry per pair ({count}), "
                             f"got shape {tuple(value.shape)}")
        if not read_tensor:
            return None, shape
        return tensor_values(value, count), shape
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got bool")
    if isinstance(value, numbers.Real):
        if not allow_scalar:
            raise TypeError(f"{name} must be a sequence with one number per pair ({count}), got a single number")
        return [float(value)] * count, ()
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != count:
            raise ValueError(f"{name} must have one entry per pair ({count} pairs), got {len(value)}")
        out = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (numbers.Real, torch.Tensor)):
                raise TypeError(f"{name} entries must be numbers, got {type(item).__name__}")
            out.append(float(item))
        return out, (count,)
    raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got {type(value).__name__}")


def _check_mask(mask, num_modalities: int, n: int, device: torch.device) -> None:
    if not isinstance(mask, torch.Tensor):
        raise TypeError(
            f"mask must be a bool tensor of shape (M, N) = ({num_modalities}, {n}), got {type(mask).__name__}"
        )
    if mask.dtype != torch.bool:
        raise TypeError(f"mask must have dtype torch.bool, got {mask.dtype}")
    if tuple(mask.shape) != (num_modalities, n):
        raise ValueError(f"mask must have shape (M, N) = ({num_modalities}, {n}), got {tuple(mask.shape)}")
    if mask.device != device:
        raise ValueError(f"mask must be on the embeddings' device {device}, got {mask.device}")


def _world_size(group) -> int:
    import torch.distributed as dist

    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized (call init_process_group first)")
    return dist.get_world_size(group)


_TRITON = _kernels.available()  # decided once at import (no import work inside a compiled region)


def _check_triton(z: torch.Tensor) -> None:
    if z.dtype == torch.float64:
        raise TypeError("backend='triton' takes float32, float16 or bfloat16 inputs; float64 runs on "
                        "backend='torch' (which backend='auto' picks for it)")
    if not _TRITON:
        raise RuntimeError("backend='triton' needs Triton, which is not importable here; use backend='torch'")
    if z.device.type != "cuda" and not _kernels.interpreter():
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU "
                         f"tensors), got tensors on {z.device}; use backend='torch' or 'auto'")


def _check_call(embeddings, temperature, weights, mask, normalize, return_stats, backend, block_size):
    """Validate one call; returns (host temperatures or None, temperature shape, weights, use_triton)."""
    _check_embeddings(embeddings)
    num_modalities = len(embeddings)
    n, _ = embeddings[0].shape
    device = embeddings[0].device
    num_pairs = len(modality_pairs(num_modalities))

    # A temperature tensor's values are read (and checked) by the backend: the Triton path does it inside
    # its custom op, so that a torch.compile'd step traces through this function without a graph break.
    temps, temp_shape = _host_values("temperature", temperature, num_pairs, allow_scalar=True, read_tensor=False)
    if isinstance(temperature, torch.Tensor) and not temperature.is_floating_point():
        raise TypeError(f"temperature tensor must be floating point, got {temperature.dtype}")
    if temps is not None:
        check_temperatures(temps)

    if weights is None:
        ws = [1.0] * num_pairs
    else:
        ws, _ = _host_values("weights", weights, num_pairs, allow_scalar=False)
        if any(not math.isfinite(w) or w < 0 for w in ws):
            raise ValueError(f"weights must be finite and non-negative, got {ws}")
        if not any(w > 0 for w in ws):
            raise ValueError(f"weights must not all be zero, got {ws}")

    if mask is not None:
        _check_mask(mask, num_modalities, n, device)
    if not isinstance(normalize, bool):
        raise TypeError(f"normalize must be a bool, got {type(normalize).__name__}")
    if not isinstance(return_stats, bool):
        raise TypeError(f"return_stats must be a bool, got {type(return_stats).__name__}")
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")

    use_triton = backend == "triton"
    if use_triton:
        _check_triton(embeddings[0])
    elif backend == "auto" and device.type == "cuda" and embeddings[0].dtype != torch.float64:
        use_triton = _TRITON
    return temps, temp_shape, ws, use_triton


def pairwise_nce(
    *embeddings: torch.Tensor,
    temperature=0.07,
    weights=None,
    mask: torch.Tensor | None = None,
    normalize: bool = True,
    backend: str = "auto",
    group=None,
    return_stats: bool = False,
    block_size: int | None = None,
):
    r"""Symmetric InfoNCE loss of every modality pair, without materializing any N x N matrix.

    Args:
        *embeddings: M >= 2 tensors of shape (N, D), one per modality (e.g. text, audio, vision), same
            N, D, dtype (float32, float16, bfloat16 or float64) and device; any strides.
        temperature: float, 0-d tensor, or 1-d tensor with one entry per pair (P = M(M-1)/2). A tensor
            that requires grad receives dL/dt (learnable shared or per-pair temperature).
        weights: optional sequence (or 1-d tensor) of P non-negative numbers, not all zero.
        mask: optional bool tensor (M, N); ``mask[m, i] = False`` marks modality m of sample i as missing:
            it takes part in no pair and gets a zero gradient.
        normalize: L2-normalize every embedding first (cosine similarities), as CLIP does.
        backend: "auto" (Triton kernels for CUDA tensors when available, else "torch"), "torch" (exact
            pure PyTorch, any device) or "triton".
        group: a torch.distributed process group of W ranks: negatives from every rank. Each rank passes
            its local batch (sizes may differ; D, M, dtype and backend may not); every modality is
            all-gathered with autograd, this rank's samples are scored against the whole batch in both
            directions of every pair, and the result is W times this rank's share of the global loss: the
            mean over ranks is the loss of the concatenated batch (ranks in order), and under
            DistributedDataParallel the averaged gradients are the single-process ones. Statistics are
            the global batch's. What is communicated, and when: ``fastpair.distributed``. A bad input on
            any rank raises on every rank. World size 1: the plain loss.
        return_stats: also return ``{"pair_losses": (P,), "pair_accuracy": (P, 2)}`` (detached, float32):
            per-pair losses and top-1 in-batch retrieval accuracy x->y, y->x (0 for a pair with no valid sample).
        block_size: rows per block of the torch backend (default: about 2^21 logits per block).

    Pairs are ``itertools.combinations(range(M), 2)``. For pair (p, q) over its valid samples V (n = |V|),
    with x, y the normalized z_p, z_q and S_ij = <x_i, y_j> / t_pq:

        L_pq = 1/(2n) sum_{i in V} [(logsumexp_j S_ij - S_ii) + (logsumexp_j S_ji - S_ii)]
        loss = sum_pq w_pq L_pq / sum_pq w_pq      (over pairs with n > 0; 0 if there is none)

    Returns:
        The loss, a 0-d tensor: float64 for float64 inputs, float32 otherwise; or (loss, stats).
    """
    world = 1 if group is None else _world_size(group)
    error, shard = None, None
    try:
        temps, temp_shape, ws, use_triton = _check_call(
            embeddings, temperature, weights, mask, normalize, return_stats, backend, block_size)
    except (ValueError, TypeError, RuntimeError) as err:
        if world == 1:
            raise
        error, use_triton = err, False
    if world > 1:  # every rank learns whether every rank's input is valid before any rank waits in a collective
        from . import distributed

        shard = distributed.exchange(group, embeddings, mask, use_triton, error)
        embeddings = [distributed.gather_with_grad(z, shard) for z in embeddings]
        mask = distributed.gather_mask(mask, len(embeddings), shard, embeddings[0].device) if shard.masked else None
    num_pairs = len(ws)
    pairs = modality_pairs(len(embeddings))

    if use_triton:
        from .kernels.pairwise_nce import pairwise_nce_triton

        loss, pair_losses, accuracy = pairwise_nce_triton(
            list(embeddings), temperature if temps is None else temps, num_pairs, ws, mask, normalize, return_stats,
            shard,
        )
    else:
        loss, pair_losses, accuracy = _torch_path(
            embeddings, temperature, temps, temp_shape, pairs, ws, mask, normalize, return_stats, block_size, shard
        )
    if return_stats:
        return loss, {"pair_losses": pair_losses, "pair_accuracy": accuracy}
    return loss


@torch.compiler.disable  # runs eagerly inside a compiled step: a host-side plan and a blocked Python loop
def _torch_path(embeddings, temperature, temps, temp_shape, pairs, ws, mask, normalize, return_stats, block_size,
                shard):
    if temps is None:
        temps = tensor_values(temperature, len(pairs))
        check_temperatures(temps)
    temp_tensor = temperature if isinstance(temperature, torch.Tensor) and temperature.requires_grad else None
    plan = Plan(
        pairs=tuple(pairs),
        scales=tuple(1.0 / t for t in temps),
        weights=tuple(ws),
        normalize=normalize,
        return_stats=return_stats,
        block=block_size or _torch_backend.default_block(embeddings[0].shape[0]),
        temperature_shape=temp_shape if temp_tensor is not None else None,
        shard=shard,
    )
    return PairwiseNCEFunction.apply(plan, temp_tensor, mask, *embeddings)
