"""The benchmark's providers, one set for CPU and GPU: each computes M=3 pairwise InfoNCE one way.

Every provider gets the same inputs (M leaf tensors of shape (N, D)) and its timed unit is one forward +
backward. Baselines come from fastpair.reference (the tests' oracle), not re-written here. Peers are
optional imports: one that does not import is returned as skipped with the reason, never replaced.

    fastpair-torch       the blocked PyTorch backend (cpu, cuda)
    fastpair-torch-ids   the same with positives by id: two crops of every clip (ids = arange(N) // 2) (cpu)
    fastpair-torch-smooth  the same with label_smoothing=0.1 (cpu)
    fastpair-triton      the Triton kernels, fast path (cuda)
    fastpair-triton-det  the same under torch.use_deterministic_algorithms(True): atomic-free (cuda)
    fastpair-triton-ids, fastpair-triton-smooth  the Triton kernels with ids / label smoothing (cuda)
    plain-pytorch        materialized N x N logits + F.cross_entropy both ways, input dtype (cpu, cuda)
    torch-compile        torch.compile of plain-pytorch, default options, one compiled function (cpu, cuda)
    open_clip-x3         open_clip ClipLoss once per pair (cpu, cuda)
  the sigmoid objective (pairwise_sigmoid, t = 0.1, b = -10, SigLIP's initialization):
    fastpair-torch-sigmoid / fastpair-triton-sigmoid  the blocked PyTorch backend (cpu) / the kernels (cuda)
    plain-sigmoid        materialized N x N logits + F.logsigmoid, input dtype (cpu, cuda)
    compile-sigmoid      torch.compile of plain-sigmoid (cpu, cuda)
    open_clip-siglip-x3  open_clip SigLipLoss once per pair (cpu, cuda)
    siglip_kernel-x3     siglip-kernel's fused_siglip_loss once per pair (cuda; where it installs)
    inf_cl-x6            Inf-CL cal_inf_loss once per direction of each pair; D a multiple of 128 (cuda)
    memeff-x3            memeff MemoryEfficientCLIPLoss(stable=False) once per pair (cuda)
    gemm-floor           the 12 N x N x D matmuls any exact O(N*D)-memory method needs (fastpair.flops),
                         with torch.matmul: per pair S = X Y^T, S again, dX = G Y, dY = G^T X (cpu, cuda)
"""

from __future__ import annotations

import functools
import importlib.util
import math
import os
from collections.abc import Callable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from fastpair import gram_nce, modality_pairs, pairwise_nce, pairwise_sigmoid
from fastpair.reference import gram_nce_reference, pairwise_nce_reference, pairwise_sigmoid_reference

TEMPERATURE = 0.07
SIGMOID_TEMPERATURE, SIGMOID_BIAS = 0.1, -10.0
M = 3
PAIRS = modality_pairs(M)
FLOOR = "gemm-floor"


@dataclass(frozen=True)
class Provider:
    name: str
    devices: tuple[str, ...]
    loss: Callable | None  # zs -> scalar loss; None for the floor, which computes no loss
    deterministic: bool = False  # run under torch.use_deterministic_algorithms(True)
    compiles: bool = False  # compiles per shape, so its warm-up must be at the measured shape

    def step(self, zs) -> Callable[[], None]:
        """The timed unit on zs: forward + backward (for the floor, its 12 GEMMs)."""
        if self.loss is None:
            return gemm_floor(zs)

        def full():
            for z in zs:
                z.grad = None
            self.loss(zs).backward()

        return full


def make_inputs(n: int, d: int, m: int = M, dtype=torch.float32, device="cpu", seed: int = 0):
    g = torch.Generator(device=device).manual_seed(seed)
    return [torch.randn(n, d, generator=g, device=device, dtype=dtype).requires_grad_() for _ in range(m)]


def gemm_floor(zs) -> Callable[[], None]:
    """The floor's 12 GEMMs on zs's values; G stands for the N x N gradient of the logits (any values)."""
    xs = [z.detach() for z in zs]
    g = torch.randn(xs[0].shape[0], xs[0].shape[0], dtype=xs[0].dtype, device=xs[0].device)

    def floor():
        for p, q in PAIRS:
            torch.matmul(xs[p], xs[q].T)
            torch.matmul(xs[p], xs[q].T)
            torch.matmul(g, xs[q])
            torch.matmul(g.T, xs[p])

    return floor


def _fastpair(backend: str, ids: bool = False, label_smoothing: float = 0.0) -> Callable:
    def loss(zs):
        clips = _clip_ids(zs[0].shape[0], zs[0].device) if ids else None
        return pairwise_nce(*zs, temperature=TEMPERATURE, ids=clips, label_smoothing=label_smoothing, backend=backend)

    return loss


def _learned_temperature() -> Callable:
    """A temperature tensor that learns, as PairwiseNCE's: the Triton path decides its bound on the device
    (both directions launched, half of them skipping their sweep when bounded) instead of on the host."""
    temperatures = {}

    def loss(zs):
        device = zs[0].device
        if device not in temperatures:
            temperatures[device] = torch.tensor(TEMPERATURE, device=device, requires_grad=True)
        return pairwise_nce(*zs, temperature=temperatures[device], backend="triton")

    return loss


@functools.lru_cache(maxsize=8)
def _clip_ids(n: int, device) -> torch.Tensor:
    """Two crops of every clip: samples 2k and 2k + 1 share id k (made once per shape, as a data loader would)."""
    return torch.arange(n, device=device) // 2


def _plain(zs):
    return pairwise_nce_reference(*zs, temperature=TEMPERATURE, upcast=False)


def _plain_sigmoid(zs):
    return pairwise_sigmoid_reference(*zs, temperature=SIGMOID_TEMPERATURE, bias=SIGMOID_BIAS, upcast=False)


def _compiled(plain=_plain) -> Callable:
    compiled = torch.compile(lambda *z: plain(list(z)))
    return lambda zs: compiled(*zs)


def _sigmoid(backend: str) -> Callable:
    return lambda zs: pairwise_sigmoid(*zs, temperature=SIGMOID_TEMPERATURE, bias=SIGMOID_BIAS, backend=backend)


def _gram(backend: str) -> Callable:
    """GRAM's volume loss of the three modalities at once, the first as the anchor (one term, not three pairs)."""
    return lambda zs: gram_nce(*zs, temperature=TEMPERATURE, backend=backend)


def _plain_gram(zs):
    """GRAM's formula as its public code computes it: the N x N x 3 x 3 Gram tensor, torch.linalg.det."""
    return gram_nce_reference(*zs, temperature=TEMPERATURE, upcast=False)


def _open_clip_losses():
    """open_clip's loss module. Where the package does not import (its __init__ needs a torchvision built for
    this very torch, which CPU builds of torch lack), the module file alone: it needs torch only."""
    try:
        from open_clip import loss
    except (ImportError, RuntimeError):
        spec = importlib.util.find_spec("open_clip")
        if spec is None:
            raise
        path = os.path.join(list(spec.submodule_search_locations)[0], "loss.py")
        loss = importlib.util.module_from_spec(importlib.util.spec_from_file_location("_open_clip_loss", path))
        loss.__spec__.loader.exec_module(loss)
    return loss


def _open_clip_siglip() -> Callable:
    siglip = _open_clip_losses().SigLipLoss()

    def loss(zs):
        xs = [F.normalize(z, dim=-1) for z in zs]
        return sum(siglip(xs[p], xs[q], 1.0 / SIGMOID_TEMPERATURE, SIGMOID_BIAS) for p, q in PAIRS) / len(PAIRS)

    return loss


def _siglip_kernel() -> Callable:
    from siglip_kernel import fused_siglip_loss

    def loss(zs):
        xs = [F.normalize(z, dim=-1) for z in zs]
        log_scale = torch.tensor(math.log(1.0 / SIGMOID_TEMPERATURE), device=xs[0].device)
        bias = torch.tensor(SIGMOID_BIAS, device=xs[0].device)
        return sum(fused_siglip_loss(xs[p], xs[q], log_scale, bias) for p, q in PAIRS) / len(PAIRS)

    return loss


def _open_clip() -> Callable:
    clip = _open_clip_losses().ClipLoss()

    def loss(zs):
        xs = [F.normalize(z, dim=-1) for z in zs]
        return sum(clip(xs[p], xs[q], 1.0 / TEMPERATURE) for p, q in PAIRS) / len(PAIRS)

    return loss


def _inf_cl() -> Callable:
    from inf_cl import cal_inf_loss

    def one_way(x, y, head):
        return cal_inf_loss(x, y, scale=1.0 / TEMPERATURE, head_dim=head)

    def loss(zs):
        d = zs[0].shape[1]
        head = 256 if d % 256 == 0 else 128 if d % 128 == 0 else None
        if head is None:
            raise ValueError("inf-cl needs D a multiple of 128 or 256")
        xs = [F.normalize(z, dim=-1) for z in zs]
        return sum(one_way(xs[p], xs[q], head) + one_way(xs[q], xs[p], head) for p, q in PAIRS) / (2 * len(PAIRS))

    return loss


def _memeff() -> Callable:
    from memeff import MemoryEfficientCLIPLoss

    mem = MemoryEfficientCLIPLoss(temperature=TEMPERATURE, stable=False)
    return lambda zs: sum(mem(zs[p], zs[q]) for p, q in PAIRS) / len(PAIRS)


BOTH, CPU, CUDA = ("cpu", "cuda"), ("cpu",), ("cuda",)
# name, devices, builder of the loss (None: the floor), flags. The order is the run order on every device
# (on CPU: floor, fastpair, compile, plain).
_SPECS = [
    (FLOOR, BOTH, None, {}),
    ("fastpair-triton", CUDA, lambda: _fastpair("triton"), {}),
    ("fastpair-triton-det", CUDA, lambda: _fastpair("triton"), {"deterministic": True}),
    ("fastpair-triton-learned-t", CUDA, _learned_temperature, {}),
    ("fastpair-triton-ids", CUDA, lambda: _fastpair("triton", ids=True), {}),
    ("fastpair-triton-smooth", CUDA, lambda: _fastpair("triton", label_smoothing=0.1), {}),
    ("fastpair-torch", BOTH, lambda: _fastpair("torch"), {}),
    ("fastpair-torch-ids", CPU, lambda: _fastpair("torch", ids=True), {}),
    ("fastpair-torch-smooth", CPU, lambda: _fastpair("torch", label_smoothing=0.1), {}),
    ("torch-compile", BOTH, _compiled, {"compiles": True}),
    ("plain-pytorch", BOTH, lambda: _plain, {}),
    ("open_clip-x3", BOTH, _open_clip, {}),
    ("inf_cl-x6", CUDA, _inf_cl, {}),
    ("memeff-x3", CUDA, _memeff, {}),
    ("fastpair-triton-sigmoid", CUDA, lambda: _sigmoid("triton"), {}),
    ("fastpair-torch-sigmoid", CPU, lambda: _sigmoid("torch"), {}),
    ("compile-sigmoid", BOTH, lambda: _compiled(_plain_sigmoid), {"compiles": True}),
    ("plain-sigmoid", BOTH, lambda: _plain_sigmoid, {}),
    ("open_clip-siglip-x3", BOTH, _open_clip_siglip, {}),
    ("siglip_kernel-x3", CUDA, _siglip_kernel, {}),
    ("fastpair-triton-gram", CUDA, lambda: _gram("triton"), {}),
    ("fastpair-torch-gram", BOTH, lambda: _gram("torch"), {}),
    ("plain-gram", BOTH, lambda: _plain_gram, {}),
]
NAMES = [name for name, *_ in _SPECS]


def for_device(device: str, only=None) -> tuple[list[Provider], dict[str, str]]:
    """The providers that run on device (all, or those named in only; the floor always), in run order,
    and {name: reason} for those that cannot run here (a peer that does not import)."""
    runnable, skipped = [], {}
    for name, devices, build, flags in _SPECS:
        if device not in devices or (only and name not in only and name != FLOOR):
            continue
        try:
            loss = None if build is None else build()
        except Exception as err:  # noqa: BLE001 - any import failure means "not usable here"
            skipped[name] = repr(err)
            continue
        runnable.append(Provider(name, devices, loss, **flags))
    return runnable, skipped


def get(name: str, device: str) -> Provider:
    found, skipped = for_device(device, only=[name])
    match = [p for p in found if p.name == name]
    if not match:
        raise SystemExit(f"provider {name} does not run on {device}: {skipped.get(name, 'not one of its devices')}")
    return match[0]
