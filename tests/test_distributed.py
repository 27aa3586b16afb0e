"""Global negatives across ranks: 2 gloo processes against the single-process loss on the whole batch.

Every case checks the contract of docs/design.md: the mean of the ranks' losses is the single-process loss of
the concatenated batch (ranks in order); each rank's embeddings get W times their single-process gradient;
the mean of the ranks' temperature gradients is the single-process one; statistics are the global batch's.
"""

from __future__ import annotations

import gc
import tempfile
import time

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from helpers import assert_close, condition_scale, randn, triton_runs

from fastpair import PairwiseNCE, gram_nce, pairwise_nce, pairwise_sigmoid

pytestmark = pytest.mark.skipif(not dist.is_available(), reason="torch.distributed is not available")

WORLD = 2


def run_ranks(fn, *args, timeout=240.0):
    """fn(rank, *args) in WORLD gloo processes; a worker's exception fails the test, a hang times out."""
    with tempfile.TemporaryDirectory() as tmp:
        ctx = mp.start_processes(_entry, args=(fn, f"{tmp}/init", args), nprocs=WORLD, join=False,
                                 start_method="spawn")
        deadline = time.monotonic() + timeout
        while not ctx.join(timeout=1.0):
            if time.monotonic() > deadline:
                for p in ctx.processes:
                    p.kill()
                pytest.fail(f"{fn.__name__}: the ranks did not finish within {timeout:.0f} s (a hang?)")


def _entry(rank, fn, init_file, args):
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank, world_size=WORLD)
    try:
        fn(rank, *args)
    finally:
        # Collect reference cycles (e.g. a caught exception's traceback and its frames) that still hold the
        # process group: a gloo group whose last reference dies after destroy_process_group, at interpreter
        # exit, can abort the process ("terminate called without an active exception").
        gc.collect()
        dist.destroy_process_group()


def _split(sizes, rank):
    start = sum(sizes[:rank])
    return slice(start, start + sizes[rank])


def _mean_over_ranks(t: torch.Tensor) -> torch.Tensor:
    t = t.detach().clone()
    dist.all_reduce(t)
    return t / WORLD


# (name, sizes per rank, M, D, keyword arguments); temperature "learn" / "per_pair" make a tensor that
# requires grad; mask=True draws a random mask with some samples missing modalities.
CASES = [
    ("equal", (6, 6), 3, 8, dict(temperature=0.07)),
    ("unequal-mask-stats", (5, 8), 3, 8, dict(temperature="per_pair", weights=[1.0, 2.0, 0.5], mask=True,
                                              return_stats=True, block_size=3)),
    ("row-blocks", (21, 14), 3, 8, dict(temperature=0.07, mask=True, block_size=4)),  # ranks start mid-block
    ("learned-stats", (7, 4), 3, 5, dict(temperature="learn", return_stats=True)),
    ("unnormalized", (4, 7), 3, 6, dict(temperature=0.5, normalize=False, mask=True)),
    ("cold", (6, 5), 3, 8, dict(temperature=0.005, mask=True, block_size=2)),
    ("two-modalities", (3, 9), 2, 4, dict(temperature=0.1)),
    ("four-modalities", (5, 5), 4, 4, dict(temperature="per_pair", mask=True)),
    # the loss family: ids compared across the global batch (a group spans both ranks), smoothing, topology
    ("ids-smoothing-stats", (6, 7), 3, 8, dict(temperature="per_pair", ids=True, label_smoothing=0.1, mask=True,
                                               return_stats=True, block_size=3)),
    ("anchor-ids", (5, 4), 4, 5, dict(temperature="learn", pairs=[(0, 1), (0, 2), (3, 0)], ids=True)),
    ("smoothing-unnormalized", (4, 6), 3, 6, dict(temperature=0.5, label_smoothing=0.2, normalize=False)),
]
# pairwise_sigmoid: bias "learn" / "per_pair" like the temperature
SIGMOID_CASES = [
    ("sigmoid-equal", (6, 6), 3, 8, dict(temperature=0.1, bias=-2.0)),
    ("sigmoid-learned-mask-stats", (5, 8), 3, 8, dict(temperature="per_pair", bias="per_pair", weights=[1.0, 2.0, 0.5],
                                                      mask=True, return_stats=True, block_size=3)),
    ("sigmoid-ids-anchor", (5, 4), 4, 5, dict(temperature="learn", bias="learn", pairs=[(0, 1), (0, 2), (3, 0)],
                                              ids=True)),
    ("sigmoid-unnormalized", (4, 7), 3, 6, dict(temperature=0.5, bias=-1.0, normalize=False, mask=True)),
]

# gram_nce: the anchor's rows of the gathered batch against every rank's tuples
GRAM_CASES = [
    ("gram-equal", (6, 6), 3, 8, dict(temperature=0.07)),
    ("gram-learned-mask-stats", (5, 8), 3, 8, dict(temperature="learn", mask=True, return_stats=True, block_size=3)),
    ("gram-ids-smoothing-anchor", (6, 7), 4, 6, dict(temperature=0.1, anchor=2, ids=True, label_smoothing=0.1,
                                                     block_size=4, return_stats=True)),
    ("gram-cold-two", (4, 7), 2, 5, dict(temperature=0.005, mask=True, block_size=2)),
]
LOSSES = {"nce": (pairwise_nce, CASES), "sigmoid": (pairwise_sigmoid, SIGMOID_CASES), "gram": (gram_nce, GRAM_CASES)}


def _inputs(sizes, m, d, kwargs, seed, dtype, device):
    n = sum(sizes)
    zs = [randn(n, d, seed=seed * 10 + k, dtype=dtype, device=device) for k in range(m)]
    kw = dict(kwargs)
    num_pairs = len(kw["pairs"]) if "pairs" in kw else m * (m - 1) // 2
    for key, single, low, high in (("temperature", 0.1, 0.05, 0.2), ("bias", -2.0, -3.0, 0.5)):
        if kw.get(key) == "learn":
            kw[key] = torch.tensor(single, dtype=torch.float64, device=device)
        elif kw.get(key) == "per_pair":
            kw[key] = torch.linspace(low, high, num_pairs, dtype=torch.float64, device=device)
    if kw.get("mask"):
        g = torch.Generator().manual_seed(seed + 7)
        mask = torch.rand(m, n, generator=g) > 0.25
        mask[:, 0] = True  # at least one full sample
        kw["mask"] = mask.to(device)
    if kw.get("ids"):
        kw["ids"] = torch.randint(0, 4, (n,), generator=torch.Generator().manual_seed(seed + 8)).to(device)
    return zs, kw


def _learnable(kw: dict) -> dict:
    """Fresh leaves for the tensor temperature and bias of kw (so that each run has its own gradients)."""
    return {key: v.clone().requires_grad_() for key, v in kw.items()
            if key in ("temperature", "bias") and isinstance(v, torch.Tensor)}


def _compare(rank, backend, dtype, deterministic, objective="nce"):
    torch.use_deterministic_algorithms(deterministic)
    if backend == "triton":  # a sharded call takes the tiled kernels: so does the single-process one it is held to
        from fastpair.kernels import small  # (the one program against them and the float64 formula: test_op, test_gram)

        small.MAX_N = 0
    loss_fn, cases = LOSSES[objective]
    for seed, (name, sizes, m, d, kwargs) in enumerate(cases):
        if dtype == torch.float64 and backend == "triton":
            continue
        # Triton on a GPU machine: both ranks on the one GPU, CUDA tensors over gloo (NCCL needs a GPU per rank)
        device = "cuda" if backend == "triton" and torch.cuda.is_available() else "cpu"
        zs, kw = _inputs(sizes, m, d, kwargs, seed, dtype, device)
        t = kw.get("temperature")
        learn = isinstance(t, torch.Tensor)

        # single process, whole batch
        full = [z.clone().requires_grad_() for z in zs]
        params_full = _learnable(kw)
        out = loss_fn(*full, **{**kw, **params_full}, backend=backend)
        loss, stats = out if kw.get("return_stats") else (out, None)
        loss.backward()

        # this rank's share
        rows = _split(sizes, rank)
        local = [z[rows].clone().requires_grad_() for z in zs]
        params_local = _learnable(kw)
        local_kw = {**kw, **params_local}
        if "mask" in kw:
            local_kw["mask"] = kw["mask"][:, rows].contiguous()
        if "ids" in kw:
            local_kw["ids"] = kw["ids"][rows].contiguous()
        out = loss_fn(*local, **local_kw, backend=backend, group=dist.group.WORLD)
        dloss, dstats = out if kw.get("return_stats") else (out, None)
        dloss.backward()

        where = f"{backend} {dtype} {name} rank {rank}"
        scale = 1.0 if learn else condition_scale(t)
        assert_close(_mean_over_ranks(dloss), loss, dtype=dtype, scale=scale, name=f"{where}: mean loss")
        for k, (a, b) in enumerate(zip(local, full)):
            assert_close(a.grad, WORLD * b.grad[rows], dtype=dtype, scale=scale, name=f"{where}: grad {k}",
                         magnitude=WORLD * b.grad.abs().max().item())
        for key, param in params_local.items():
            assert_close(_mean_over_ranks(param.grad), params_full[key].grad, dtype=dtype, name=f"{where}: d/d{key}")
        if stats is not None:
            assert dstats.keys() == stats.keys()
            for key in stats:
                assert_close(dstats[key], stats[key], name=f"{where}: {key}")


@pytest.mark.parametrize("objective", ["nce", "sigmoid", "gram"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_torch_backend_matches_single_process(dtype, objective):
    run_ranks(_compare, "torch", dtype, False, objective)


def _interpreter() -> bool:
    from fastpair.kernels import interpreter

    return triton_runs() and interpreter()


# In Triton's interpreter on CPU tensors, or with CUDA tensors on one GPU shared by both gloo ranks.
@pytest.mark.skipif(not (_interpreter() or (triton_runs() and torch.cuda.is_available())),
                    reason="needs Triton: a CUDA device, or its interpreter (TRITON_INTERPRET=1)")
@pytest.mark.parametrize("objective, deterministic", [("nce", False), ("nce", True), ("sigmoid", False),
                                                      ("sigmoid", True), ("gram", False)],
                         ids=["nce-fast-path", "nce-deterministic", "sigmoid-fast-path", "sigmoid-deterministic",
                              "gram"])  # GRAM's kernels have one path, free of atomics
def test_triton_backend_matches_single_process(deterministic, objective):
    run_ranks(_compare, "triton", torch.float32, deterministic, objective)


def _low_precision_and_compile(rank):
    sizes = (4, 7)
    rows = _split(sizes, rank)
    for dtype in (torch.bfloat16, torch.float16):
        zs = [randn(sum(sizes), 8, seed=k, dtype=dtype) for k in range(3)]
        full = [z.clone().requires_grad_() for z in zs]
        pairwise_nce(*full).backward()
        local = [z[rows].clone().requires_grad_() for z in zs]
        loss = pairwise_nce(*local, group=dist.group.WORLD)
        loss.backward()
        assert loss.dtype == torch.float32 and local[0].grad.dtype == dtype
        assert_close(_mean_over_ranks(loss), pairwise_nce(*zs), name=f"{dtype} mean loss")
        for a, b in zip(local, full):  # the same fp32 math; the ranks' fp32 sums are rounded once, like b's
            torch.testing.assert_close(a.grad.float(), WORLD * b.grad[rows].float(), rtol=2**-7, atol=1e-3)
    # a compiled training step with a process group (graph breaks around the collectives)
    torch.manual_seed(0)  # the same weights on every rank
    lin = torch.nn.Linear(8, 8)
    xs = [randn(sum(sizes), 8, seed=20 + k) for k in range(3)]
    single = pairwise_nce(*(lin(x) for x in xs))
    step = torch.compile(lambda inputs: pairwise_nce(*(lin(x) for x in inputs), group=dist.group.WORLD))
    loss = step([x[rows] for x in xs])
    loss.backward()
    assert_close(_mean_over_ranks(loss), single, name="compiled mean loss")
    grad = _mean_over_ranks(lin.weight.grad)
    lin.weight.grad = None
    single.backward()
    assert_close(grad, lin.weight.grad, name="compiled step: mean weight gradient", magnitude=1e-3)
    torch._dynamo.reset()  # drop compiled frames (and the process group they reference) before the group goes


def test_low_precision_and_compiled_step():
    run_ranks(_low_precision_and_compile)


class _Towers(torch.nn.Module):
    """Three linear encoders and a PairwiseNCE with a learnable temperature."""

    def __init__(self):
        super().__init__()
        self.enc = torch.nn.ModuleList([torch.nn.Linear(6, 5) for _ in range(3)])
        self.loss = PairwiseNCE(3, temperature=0.1, backend="torch")

    def forward(self, xs, mask, group=None):
        return self.loss(*(e(x) for e, x in zip(self.enc, xs)), mask=mask, group=group)


def _ddp(rank):
    """Parameter gradients under DistributedDataParallel equal the single-process ones."""
    torch.manual_seed(0)
    single = _Towers()
    model = _Towers()
    model.load_state_dict(single.state_dict())
    ddp = torch.nn.parallel.DistributedDataParallel(model)
    sizes = (5, 7)
    xs = [randn(sum(sizes), 6, seed=40 + k) for k in range(3)]
    mask = torch.rand(3, sum(sizes), generator=torch.Generator().manual_seed(9)) > 0.2
    rows = _split(sizes, rank)
    single(xs, mask).backward()
    ddp([x[rows] for x in xs], mask[:, rows].contiguous(), dist.group.WORLD).backward()  # DDP averages
    for (name, p), (_, q) in zip(model.named_parameters(), single.named_parameters()):
        assert_close(p.grad, q.grad, name=f"rank {rank}: {name}", magnitude=q.grad.abs().max().item())


def test_ddp_parameter_gradients_match_single_process():
    run_ranks(_ddp)


def _errors(rank):
    z = [randn(4, 8, seed=k) for k in range(3)]
    # an invalid input on rank 1 only: rank 1 gets its own error, rank 0 a ValueError naming rank 1
    bad_mask = torch.ones(3, 4, dtype=torch.int64) if rank == 1 else None
    with pytest.raises((TypeError, ValueError)) as err:
        pairwise_nce(*z, mask=bad_mask, group=dist.group.WORLD)
    expected = "mask must have dtype torch.bool" if rank == 1 else "rank(s) [1] is invalid"
    assert expected in str(err.value), str(err.value)
    # different D per rank: the same clear error on both
    z = [randn(4, 8 + rank, seed=k) for k in range(3)]
    with pytest.raises(ValueError, match="same embedding dimension D; per rank: \\[8, 9\\]"):
        pairwise_nce(*z, group=dist.group.WORLD)
    # arguments every rank must share: label smoothing, pairs, ids on all ranks or none
    for kw, words in ((dict(label_smoothing=0.1 * rank), "same label_smoothing; per rank: [0.0, 0.1]"),
                      (dict(pairs=[(0, 1)] if rank else [(0, 2)]), "same pairs"),
                      (dict(ids=torch.arange(4) if rank else None), "same ids (all ranks or none)"),
                      (dict(weights=[1.0, 1.0, float(rank)]), "same loss, normalize, return_stats, weights"),
                      (dict(return_stats=bool(rank)), "same loss, normalize, return_stats, weights")):
        z = [randn(4, 8, seed=k) for k in range(3)]
        with pytest.raises(ValueError) as err:
            pairwise_nce(*z, group=dist.group.WORLD, **kw)
        assert words in str(err.value), str(err.value)
    # ids of different integer dtypes on different ranks compare as int64
    z = [randn(4, 8, seed=k) for k in range(3)]
    ids = torch.arange(4, dtype=torch.int32 if rank else torch.int64)
    assert torch.isfinite(pairwise_nce(*z, ids=ids, group=dist.group.WORLD))
    # and the group still works afterwards (nothing was left half-communicated)
    z = [randn(3 + rank, 8, seed=k) for k in range(3)]
    assert torch.isfinite(pairwise_nce(*z, group=dist.group.WORLD))


def test_bad_input_on_one_rank_is_an_error_on_every_rank():
    run_ranks(_errors, timeout=120.0)


def test_world_size_one_group_is_the_plain_loss():
    with tempfile.TemporaryDirectory() as tmp:
        dist.init_process_group("gloo", init_method=f"file://{tmp}/init", rank=0, world_size=1)
        try:
            zs = [randn(8, 4, seed=k) for k in range(3)]
            assert torch.equal(pairwise_nce(*zs, group=dist.group.WORLD), pairwise_nce(*zs))
        finally:
            dist.destroy_process_group()
