"""Global negatives across ranks: what ``pairwise_nce(..., group=pg)`` communicates, and when.

Every rank passes its local batch (N_r samples; sizes may differ). For a world size W > 1, one call does:

1. ``exchange``: one all_gather of a small int64 header per rank (valid input?, N_r, D, M, dtype, mask?,
   backend, ids?, the pairs' checksum, label smoothing's bits, a checksum of normalize, return_stats, the
   weights and numeric temperatures: everything that decides which collectives run). Every rank then
   checks every header, so an input that is bad on one rank, or any of these that differs between ranks,
   raise the same kind of error on every rank instead of leaving the others waiting in a collective. The
   header is copied to the host (one small sync per call).
2. ``gather``: each modality is all-gathered (padded to the largest N_r) into the global batch
   (N = sum N_r rows, ranks in order), with autograd; the mask and the ids likewise, without (ids are
   then compared across the whole global batch). The backward of the
   gather sums every rank's gradient of this rank's rows (reduce-scatter on NCCL, all-reduce elsewhere),
   in fp32 (float64 for float64 inputs).
3. The backend computes the rows of the global similarity matrix S that belong to this rank's samples
   (rows [offset, offset + N_r)) against all N columns, for both directions of every pair, and returns
   W times its local terms' share of the global loss. Column statistics need every rank's rows: the torch
   backend all-reduces the (P, N) column sums (or log-sum-exps), the Triton backend all-reduces them
   (fast path) or all-gathers the (P, N_r) row statistics of the reverse direction (deterministic path).
   With ``return_stats``, per-pair sums are all-reduced too, so the stats are the global batch's.

Memory per rank is O(N * D) (the gathered embeddings and their gradient) plus O(P * N) statistics;
nothing is O(N^2). Communication per step: the embeddings (M * N * D elements, twice counting the
backward) and O(P * N) statistics. The mean of the ranks' losses is the single-process loss of the
concatenated batch; each rank's embeddings receive W times their single-process gradient, so that
DistributedDataParallel's averaging gives the single-process parameter gradients.
"""

from __future__ import annotations

import dataclasses
import struct
import zlib
from dataclasses import dataclass

import torch
import torch.distributed as dist

from .call import FLOAT_DTYPES as _DTYPES  # the header's dtype codes are positions in this tuple

# Header fields, one int64 each: ok, N_r, D, M, dtype code, has mask, backend code (0 torch, 1 triton),
# has ids, crc32 of the pairs, the bits of label_smoothing as a float64, crc32 of the other options that
# decide which collectives run (objective, normalize, return_stats, weights, numeric temperatures and biases
# or their tensors' shapes)
_HEADER = 11
_AGREED = (("embedding dimension D", 2), ("number of modalities M", 3), ("dtype", 4),
           ("backend (torch or triton)", 6), ("ids (all ranks or none)", 7), ("pairs, in the same order", 8),
           ("label_smoothing", 9), ("loss, normalize, return_stats, weights, temperature and bias", 10))


@dataclass(frozen=True, eq=False)
class Shard:
    """This rank's place in the global batch: rows [offset, offset + sizes[rank]) of sum(sizes)."""

    group: object
    rank: int
    sizes: tuple[int, ...]
    masked: bool  # some rank passed a mask (then every rank takes part in gathering one)

    @property
    def world(self) -> int:
        return len(self.sizes)

    @property
    def offset(self) -> int:
        return sum(self.sizes[: self.rank])

    @property
    def rows(self) -> int:
        return self.sizes[self.rank]


def world_size(group) -> int:
    if not (dist.is_available() and dist.is_initialized()):
        raise ValueError("group was given but torch.distributed is not initialized (call init_process_group first)")
    return dist.get_world_size(group)


def gather_call(group, embeddings, call, error: Exception | None):
    """Under a group of W > 1 ranks: agree on every rank's input (raise on every rank if any is bad), then
    return the gathered global batch (with autograd) and the call with the global mask and this rank's Shard."""
    shard = exchange(group, embeddings, call, error)
    embeddings = [_GatherWithGrad.apply(shard, z) for z in embeddings]
    mask = call.mask
    if shard.masked:
        mask = gather_mask(mask, len(embeddings), shard, embeddings[0].device)
    ids = None if call.ids is None else gather_rows(shard, call.ids.to(torch.int64))  # one dtype on every rank
    return embeddings, dataclasses.replace(call, mask=mask, ids=ids, shard=shard)


def comm_device(group, tensors=()) -> torch.device:
    """Where this group's collectives take their tensors: CUDA for NCCL, the CPU otherwise."""
    if dist.get_backend(group) == "nccl":
        for t in tensors:
            if isinstance(t, torch.Tensor) and t.is_cuda:
                return t.device
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


def _crc(value) -> int:
    return zlib.crc32(repr(value).encode())


def exchange(group, embeddings, call, error: Exception | None) -> Shard:
    """Share every rank's header, check them all; raise on every rank if any rank's input is bad."""
    rank, world = dist.get_rank(group), dist.get_world_size(group)
    header = [0] * _HEADER
    if error is None:
        z = embeddings[0]
        eps_bits = struct.unpack("<q", struct.pack("<d", call.label_smoothing))[0]
        options = (call.objective, call.normalize, call.return_stats, call.weights,
                   *(p.values if p.values is not None else p.shape for p in (call.temperature, call.bias) if p))
        header = [1, z.shape[0], z.shape[1], len(embeddings), _DTYPES.index(z.dtype), int(call.mask is not None),
                  int(call.backend == "triton"), int(call.ids is not None), _crc(call.pairs), eps_bits,
                  _crc(options)]
    device = comm_device(group, embeddings)
    mine = torch.tensor(header, dtype=torch.int64, device=device)
    everyone = [torch.empty_like(mine) for _ in range(world)]
    dist.all_gather(everyone, mine, group=group)
    rows = [h.tolist() for h in everyone]
    bad = [r for r, h in enumerate(rows) if h[0] == 0]
    if error is not None:
        raise error
    if bad:
        raise ValueError(f"pairwise_nce(group=...): the input on rank(s) {bad} is invalid (their error says why); "
                         f"every rank stops so that none waits in a collective")
    for name, i in _AGREED:
        values = [h[i] for h in rows]
        if len(set(values)) > 1:
            shown = [str(_DTYPES[v]) for v in values] if i == 4 else values
            if i == 9:
                shown = [struct.unpack("<d", struct.pack("<q", v))[0] for v in values]
            if i in (8, 10):
                shown = f"checksums {shown}"
            raise ValueError(f"pairwise_nce(group=...): every rank must pass the same {name}; per rank: {shown}")
    return Shard(group=group, rank=rank, sizes=tuple(h[1] for h in rows), masked=any(h[5] for h in rows))


# ----------------------------------------------------------------------------------------------------
# Merges: how each statistic of every rank's rows combines into the whole batch's.

def all_reduce(shard: Shard, tensor: torch.Tensor, op=None) -> torch.Tensor:
    """All-reduce in place on this group (a sum unless `op` says otherwise); returns the tensor."""
    dist.all_reduce(tensor, op=dist.ReduceOp.SUM if op is None else op, group=shard.group)
    return tensor


def merge_column_log2sumexp2(shard: Shard, c: torch.Tensor) -> torch.Tensor:
    """log2 sum 2^c over ranks, elementwise, through the max (all -inf stays -inf)."""
    m = all_reduce(shard, c.clone(), dist.ReduceOp.MAX)
    m = torch.where(torch.isfinite(m), m, torch.zeros_like(m))
    return all_reduce(shard, torch.exp2(c - m)).log2() + m


def merge_first_argmax(shard: Shard, best: torch.Tensor, arg: torch.Tensor) -> torch.Tensor:
    """Per column, the first row (over all ranks, in order) holding the column's maximum."""
    top = all_reduce(shard, best.clone(), dist.ReduceOp.MAX)
    first = torch.where(best == top, arg, torch.full_like(arg, torch.iinfo(arg.dtype).max))
    return all_reduce(shard, first, dist.ReduceOp.MIN)


def gather_rows(shard: Shard, tensor: torch.Tensor) -> torch.Tensor:
    """All ranks' (N_r, ...) tensors concatenated along dim 0 in rank order; no autograd."""
    tensor = tensor.contiguous()
    longest = max(shard.sizes)
    device = comm_device(shard.group, (tensor,))
    padded = tensor.new_zeros((longest, *tensor.shape[1:]), device=device)
    padded[: tensor.shape[0]] = tensor
    parts = [torch.empty_like(padded) for _ in range(shard.world)]
    dist.all_gather(parts, padded, group=shard.group)
    out = torch.cat([p[:n] for p, n in zip(parts, shard.sizes)])
    return out.to(tensor.device)


class _GatherWithGrad(torch.autograd.Function):
    """(N_r, D) on each rank -> (N, D) on every rank; backward: the sum over ranks of this rank's rows."""

    @staticmethod
    def forward(ctx, shard: Shard, z: torch.Tensor):
        ctx.shard = shard
        return gather_rows(shard, z.detach())

    @staticmethod
    def backward(ctx, grad: torch.Tensor):
        shard: Shard = ctx.shard
        longest, world = max(shard.sizes), shard.world
        device = comm_device(shard.group, (grad,))
        dtype = torch.float64 if grad.dtype == torch.float64 else torch.float32  # 16-bit gradients add in fp32
        padded = torch.zeros(world, longest, *grad.shape[1:], dtype=dtype, device=device)
        for r, part in enumerate(grad.split(list(shard.sizes))):
            padded[r, : part.shape[0]] = part
        if dist.get_backend(shard.group) == "nccl":
            mine = torch.empty_like(padded[0])
            dist.reduce_scatter_tensor(mine, padded, group=shard.group)
        else:
            mine = all_reduce(shard, padded)[shard.rank]
        return None, mine[: shard.rows].to(device=grad.device, dtype=grad.dtype)


def gather_mask(mask: torch.Tensor | None, num_modalities: int, shard: Shard, device) -> torch.Tensor:
    """The global (M, N) mask; a rank without a mask contributes all-present rows."""
    if mask is None:
        mask = torch.ones(num_modalities, shard.rows, dtype=torch.bool, device=device)
    gathered = gather_rows(shard, mask.T.to(torch.uint8))  # rows are samples
    return gathered.T.contiguous().bool()


# ----------------------------------------------------------------------------------------------------
# Custom ops take no ProcessGroup argument: an op finds its group by the name c10d registered it under
# (a compiled step keeps the name as a constant of its graph; no reference of ours outlives the call, since
# a gloo group destroyed at exit while still referenced aborts the process).


def op_arguments(shard: Shard | None) -> tuple[list[int], int, str]:
    """(sizes, rank, group name) describing `shard` to a custom op, ([], 0, "") without a group."""
    if shard is None:
        return [], 0, ""
    return list(shard.sizes), shard.rank, shard.group.group_name


def shard_from_op_arguments(sizes: list[int], rank: int, name: str) -> Shard | None:
    if not sizes:
        return None
    group = dist.distributed_c10d._resolve_process_group(name)
    return Shard(group=group, rank=rank, sizes=tuple(sizes), masked=False)


def rows_from_op_arguments(sizes: list[int], rank: int, n: int) -> tuple[int, int]:
    """(first row, number of rows) of S this process computes: all N, or its rank's share of the batch."""
    return (sum(sizes[:rank]), sizes[rank]) if sizes else (0, n)
