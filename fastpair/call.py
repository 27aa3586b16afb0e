"""One validated call: the public functions turn their arguments into a frozen `Call` that every backend
consumes. Nothing downstream re-checks an argument; the one value that cannot be checked here without a
host sync, a temperature given as a tensor, is read and checked once, by `read_temperatures`, where the
backend needs it on the host (inside its custom op or its eager region, so that a compiled step keeps
its graph).
"""

from __future__ import annotations

import dataclasses
import itertools
import math
import numbers
import sys
import warnings
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import torch

from . import kernels as _kernels
from .targets import identity_targets

if TYPE_CHECKING:
    from .distributed import Shard

BACKENDS = ("auto", "torch", "triton")
FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)
_TRITON = _kernels.available()  # decided once at import (no import work inside a compiled region)


def modality_pairs(num_modalities: int) -> list[tuple[int, int]]:
    """The pairs in the order every backend and statistic uses: itertools.combinations(range(M), 2)."""
    return list(itertools.combinations(range(num_modalities), 2))


@dataclass(frozen=True, eq=False)
class PerPair:
    """A per-pair parameter (the temperature t, the sigmoid's bias b): host numbers (`values`, checked) or
    a 0-d / (P,) tensor (`tensor`, values unread)."""

    name: str  # "temperature" or "bias"
    values: tuple[float, ...] | None
    tensor: torch.Tensor | None
    shape: tuple[int, ...]  # () or (P,): the shape its gradient takes

    @property
    def learnable(self) -> bool:
        return self.tensor is not None and self.tensor.requires_grad

    def host_values(self, num_pairs: int) -> tuple[float, ...]:
        """The P values on the host; a tensor's are read (one small sync) and checked here."""
        return self.values if self.values is not None else tuple(read_per_pair(self.name, self.tensor, num_pairs))


@dataclass(frozen=True, eq=False)
class Call:
    """Everything a backend needs besides the embeddings, checked. `shard` is set under a process group
    (fastpair.distributed): the embeddings and the mask are then the gathered global batch."""

    pairs: tuple[tuple[int, int], ...]  # (p, q): p is the "x" side; GRAM: (anchor, o) per other modality
    temperature: PerPair
    weights: tuple[float, ...]
    mask: torch.Tensor | None
    ids: torch.Tensor | None  # (N,) int: equal ids are positives of each other; None: each sample alone
    label_smoothing: float
    normalize: bool
    return_stats: bool
    backend: str  # "torch" or "triton": resolved from "auto"
    block_size: int | None  # rows per block of the torch backend (None: its default)
    objective: str = "nce"  # "nce" (pairwise_nce), "sigmoid" (pairwise_sigmoid) or "gram" (gram_nce)
    bias: PerPair | None = None  # the sigmoid's b per pair
    shard: Shard | None = None  # this rank's rows of the gathered batch; None without a process group

    @property
    def identity_targets(self) -> bool:
        """Each row's target is its own column alone (no ids, no smoothing): the loss of section 1."""
        return identity_targets(self.ids, self.label_smoothing)

    @property
    def world(self) -> int:
        return 1 if self.shard is None else self.shard.world

    def rows(self, n: int) -> tuple[int, int]:
        """The row range [r0, r1) of S this process computes: all N, or its rank's share of the batch."""
        if self.shard is None:
            return 0, n
        return self.shard.offset, self.shard.offset + self.shard.rows


def describe(embeddings, *, temperature, weights, mask, normalize, return_stats, backend, block_size, pairs=None,
             ids=None, label_smoothing=0.0, objective="nce", bias=None) -> Call:
    """Check one call of pairwise_nce (objective "nce") or pairwise_sigmoid ("sigmoid", with a bias); raise
    ValueError/TypeError (RuntimeError: Triton missing) that says what was expected."""
    check_embeddings(embeddings)
    num_modalities = len(embeddings)
    pairs = check_pairs(pairs, num_modalities)
    z = embeddings[0]
    temperature = _per_pair("temperature", temperature, len(pairs))
    bias = None if objective == "nce" else _per_pair("bias", bias, len(pairs))
    weights = tuple(check_weights(weights, len(pairs)))
    if mask is not None:
        _check_mask(mask, num_modalities, z.shape[0], z.device)
    if ids is not None:
        _check_ids(ids, z.shape[0], z.device)
    label_smoothing = check_label_smoothing(label_smoothing)
    _check_flag("normalize", normalize)
    _check_flag("return_stats", return_stats)
    check_backend(backend)
    _check_block_size(block_size)
    return Call(pairs=pairs, temperature=temperature, weights=weights, mask=mask, ids=ids,
                label_smoothing=label_smoothing, normalize=normalize, return_stats=return_stats,
                backend=_resolve_backend(backend, z), block_size=block_size, objective=objective, bias=bias)


GRAM_TRITON_MAX_K = 3  # the kernels hold the k similarity tiles of a tile in registers: M <= 4


def describe_gram(embeddings, *, anchor, temperature, mask, ids, label_smoothing, normalize, return_stats, backend,
                  block_size) -> Call:
    """Check one call of gram_nce: the Call of objective "gram", whose pairs are (anchor, o) for the other
    modalities o in index order (k = M - 1 of them) and whose temperature has one value (P = 1)."""
    check_embeddings(embeddings)
    num_modalities = len(embeddings)
    if isinstance(anchor, bool) or not isinstance(anchor, numbers.Integral) or not 0 <= anchor < num_modalities:
        raise ValueError(f"anchor must be the index of one of the {num_modalities} embeddings, an int in "
                         f"[0, {num_modalities}), got {anchor!r}")
    anchor = int(anchor)
    _check_flag("normalize", normalize)
    if not normalize:
        raise ValueError("gram_nce needs normalize=True: the volume is that of unit vectors (the Gram matrix's "
                         "diagonal is 1); pass the raw embeddings and let it normalize them")
    z = embeddings[0]
    pairs = tuple((anchor, o) for o in range(num_modalities) if o != anchor)
    if mask is not None:
        _check_mask(mask, num_modalities, z.shape[0], z.device)
    if ids is not None:
        _check_ids(ids, z.shape[0], z.device)
    _check_flag("return_stats", return_stats)
    check_backend(backend)
    _check_block_size(block_size)
    resolved = _resolve_backend(backend, z)
    if resolved == "triton" and len(pairs) > GRAM_TRITON_MAX_K:
        if backend == "triton":
            raise ValueError(f"gram_nce's Triton kernels take at most {GRAM_TRITON_MAX_K + 1} modalities, got "
                             f"{num_modalities}; backend='torch' (which 'auto' picks for them) takes any number")
        resolved = "torch"
    return Call(pairs=pairs, temperature=_per_pair("temperature", temperature, 1), weights=(1.0,) * len(pairs),
                mask=mask, ids=ids, label_smoothing=check_label_smoothing(label_smoothing), normalize=True,
                return_stats=return_stats, backend=resolved, block_size=block_size, objective="gram")


def gram_directions(call: Call) -> Call:
    """The call the epilogue sees for GRAM: two term sets of one term per valid sample and weight 1, the
    anchor -> tuples direction (rows) and tuples -> anchor (columns), over the samples whose M modalities are
    all present. With ``directions=1`` the epilogue's loss is then their mean, as InfoNCE's is."""
    mask = None if call.mask is None else call.mask.all(dim=0, keepdim=True)
    return dataclasses.replace(call, pairs=((0, 0), (0, 0)), weights=(1.0, 1.0), mask=mask)


def _check_block_size(block_size) -> None:
    if block_size is not None and (isinstance(block_size, bool) or not isinstance(block_size, int) or block_size < 1):
        raise ValueError(f"block_size must be a positive int, got {block_size!r}")


def check_pairs(pairs, num_modalities: int) -> tuple[tuple[int, int], ...]:
    """A non-empty sequence of (p, q), 0 <= p, q < M, p != q, each unordered pair once (None: all of them)."""
    if pairs is None:
        return tuple(modality_pairs(num_modalities))
    expected = f"a list of (p, q) modality index pairs with 0 <= p, q < {num_modalities} and p != q"
    if isinstance(pairs, (str, bytes, torch.Tensor)) or not isinstance(pairs, Iterable):
        raise TypeError(f"pairs must be {expected}, got {type(pairs).__name__}")
    pairs = list(pairs)  # any iterable: a list, itertools.combinations(...), a NumPy array of rows
    if len(pairs) == 0:
        raise ValueError(f"pairs must not be empty: expected {expected}")
    out, seen = [], {}
    for k, entry in enumerate(pairs):
        pair = tuple(entry) if isinstance(entry, Iterable) and not isinstance(entry, (str, bytes)) else (entry,)
        if len(pair) != 2 or any(isinstance(i, bool) or not isinstance(i, numbers.Integral) for i in pair):
            raise TypeError(f"pairs must be {expected}; entry {k} is {entry!r}")
        p, q = int(pair[0]), int(pair[1])
        if not (0 <= p < num_modalities and 0 <= q < num_modalities):
            raise ValueError(f"pairs must be {expected}; entry {k} is ({p}, {q}), out of range")
        if p == q:
            raise ValueError(f"pairs must be {expected}; entry {k} pairs modality {p} with itself")
        key = (min(p, q), max(p, q))
        if key in seen:
            raise ValueError(f"pairs must hold each pair once (a pair and its reverse are the same pair); "
                             f"entries {seen[key]} and {k} are both {key}")
        seen[key] = k
        out.append((p, q))
    return tuple(out)


def check_label_smoothing(value) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"label_smoothing must be a number in [0, 1), got {type(value).__name__}")
    value = float(value) + 0.0  # -0.0 becomes 0.0 (ranks compare its bits)
    if not (math.isfinite(value) and 0.0 <= value < 1.0):
        raise ValueError(f"label_smoothing must be finite and in [0, 1), got {value}")
    return value


def _check_ids(ids, n: int, device: torch.device) -> None:
    if not isinstance(ids, torch.Tensor):
        raise TypeError(f"ids must be an int32 or int64 tensor of shape (N,) = ({n},), got {type(ids).__name__}")
    if ids.dtype not in (torch.int32, torch.int64):
        raise TypeError(f"ids must have dtype torch.int32 or torch.int64, got {ids.dtype}")
    if tuple(ids.shape) != (n,):
        raise ValueError(f"ids must have shape (N,) = ({n},), got {tuple(ids.shape)}")
    if ids.device != device:
        raise ValueError(f"ids must be on the embeddings' device {device}, got {ids.device}")


def check_embeddings(embeddings) -> None:
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


# A temperature above this is a logit scale passed by mistake: published contrastive temperatures lie in
# [0.01, 1] (CLIP starts at 0.07 and clamps at 0.01, SigLIP starts at 0.1, SimCLR and MoCo use 0.07-0.5),
# while CLIP's logit scale exp(logit_scale) is 14.3 at initialization and up to 100, SigLIP's 10. At t > 5 the
# logits of unit vectors span less than e^0.4 from best to worst: a near-uniform softmax that cannot learn.
LOGIT_SCALE_LIKE = 5.0
_warned = {"logit scale": False}


def check_temperatures(temps) -> None:
    for t in temps:
        if not (math.isfinite(t) and t > 0):
            raise ValueError(f"temperature must be finite and > 0, got {temps if len(set(temps)) > 1 else t}")
    if max(temps) > LOGIT_SCALE_LIKE and not _warned["logit scale"]:
        _warned["logit scale"] = True
        warnings.warn(f"temperature {max(temps):g} looks like a logit scale: fastpair takes the temperature "
                      f"t = 1 / logit_scale (open_clip's logit_scale.exp() of 14.3 is t = 0.07, of 100 is t = 0.01); "
                      f"at t > {LOGIT_SCALE_LIKE:g} the softmax over unit vectors is nearly uniform (warned once)",
                      UserWarning, stacklevel=_outside_fastpair())


def _outside_fastpair() -> int:
    """The warnings stacklevel of the innermost caller outside the fastpair package, for its caller."""
    frame, level = sys._getframe(1), 1
    while frame is not None and frame.f_globals.get("__name__", "").startswith("fastpair"):
        frame, level = frame.f_back, level + 1
    return level


def check_biases(biases) -> None:
    if not all(math.isfinite(b) for b in biases):
        raise ValueError(f"bias must be finite, got {biases if len(set(biases)) > 1 else biases[0]}")


_CHECKS = {"temperature": check_temperatures, "bias": check_biases}


def read_per_pair(name: str, tensor: torch.Tensor, num_pairs: int) -> list[float]:
    """A temperature's or bias's tensor: its P values on the host (one small sync), checked."""
    values = tensor.detach().to("cpu", torch.float64).reshape(-1).tolist()
    values = values * (num_pairs if tensor.dim() == 0 else 1)
    _CHECKS[name](values)
    return values


def check_weights(weights, num_pairs: int) -> list[float]:
    """One finite non-negative number per pair, not all zero (None: all 1)."""
    if weights is None:
        return [1.0] * num_pairs
    ws = _host_numbers("weights", weights, num_pairs)
    if any(not math.isfinite(w) or w < 0 for w in ws):
        raise ValueError(f"weights must be finite and non-negative, got {ws}")
    if not any(w > 0 for w in ws):
        raise ValueError(f"weights must not all be zero, got {ws}")
    return ws


def check_backend(backend) -> None:
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {BACKENDS}, got {backend!r}")


def _per_pair(name: str, value, num_pairs: int) -> PerPair:
    """A float, a sequence of P numbers, or a 0-d / (P,) floating-point tensor (its values unread)."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.dim() not in (0, 1) or (value.dim() == 1 and value.numel() != num_pairs):
            raise ValueError(f"{name} must be a 0-d tensor or a 1-d tensor with one entry per pair "
                             f"({num_pairs}), got shape {tuple(value.shape)}")
        if not value.is_floating_point():
            raise TypeError(f"{name} tensor must be floating point, got {value.dtype}")
        return PerPair(name, None, value, tuple(value.shape))
    if isinstance(value, numbers.Real) and not isinstance(value, bool):
        values = [float(value)] * num_pairs
        shape: tuple[int, ...] = ()
    else:
        values, shape = _host_numbers(name, value, num_pairs), (num_pairs,)
    _CHECKS[name](values)
    return PerPair(name, tuple(values), None, shape)


def _host_numbers(name: str, value, count: int) -> list[float]:
    """A sequence or 1-d tensor of `count` numbers, as host floats."""
    if isinstance(value, torch.Tensor):
        if not (value.is_floating_point() or value.dtype in (torch.int32, torch.int64)):
            raise TypeError(f"{name} must be a floating-point tensor, got dtype {value.dtype}")
        if value.dim() != 1 or value.numel() != count:
            raise ValueError(f"{name} must be a 1-d tensor with one entry per pair ({count}), "
                             f"got shape {tuple(value.shape)}")
        return value.detach().to("cpu", torch.float64).tolist()
    if isinstance(value, bool):
        raise TypeError(f"{name} must be a number, a sequence of numbers or a tensor, got bool")
    if isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a sequence with one number per pair ({count}), got a single number")
    if isinstance(value, Sequence) and not isinstance(value, (str, bytes)):
        if len(value) != count:
            raise ValueError(f"{name} must have one entry per pair ({count} pairs), got {len(value)}")
        out = []
        for item in value:
            if isinstance(item, bool) or not isinstance(item, (numbers.Real, torch.Tensor)):
                raise TypeError(f"{name} entries must be numbers, got {type(item).__name__}")
            out.append(float(item))
        return out
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


def _check_flag(name: str, value) -> None:
    if not isinstance(value, bool):
        raise TypeError(f"{name} must be a bool, got {type(value).__name__}")


def _resolve_backend(backend: str, z: torch.Tensor) -> str:
    if backend == "triton":
        _check_triton(z)
        return "triton"
    if backend == "auto" and z.device.type == "cuda" and z.dtype != torch.float64 and _TRITON:
        return "triton"
    return "torch"


def _check_triton(z: torch.Tensor) -> None:
    if z.dtype == torch.float64:
        raise TypeError("backend='triton' takes float32, float16 or bfloat16 inputs; float64 runs on "
                        "backend='torch' (which backend='auto' picks for it)")
    if not _TRITON:
        raise RuntimeError("backend='triton' needs Triton, which is not importable here; use backend='torch'")
    if z.device.type != "cuda" and not _kernels.interpreter():
        raise ValueError(f"backend='triton' needs CUDA tensors (or TRITON_INTERPRET=1 set before import for CPU "
                         f"tensors), got tensors on {z.device}; use backend='torch' or 'auto'")
