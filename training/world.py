"""fastpair-train under torchrun: the ranks, the process group, agreement between ranks, RNG streams.

``torchrun --nproc-per-node K -m fastpair.training.train [options]`` (also multi-node with ``--nnodes`` /
``--rdzv-*``) is detected from WORLD_SIZE > 1 with RANK and LOCAL_RANK set. A plain process is rank 0 of 1,
and every function here is then a no-op or the identity.

- Process group: NCCL with one GPU per process (cuda:LOCAL_RANK) when the run's device is CUDA, gloo on
  CPU; destroyed at the end, also when a rank raises. The model is wrapped in DistributedDataParallel and
  pairwise_nce gets ``group=`` the default group: embeddings are all-gathered, so every sample has the
  whole global batch as negatives, and the averaged gradients are those of the concatenated batch.
- Batches: ``--batch-size`` B is per rank; the global batch, and so the number of negatives per sample, is
  W x B (W ranks). A DistributedSampler (shuffled per epoch with set_epoch, seed from --seed, drop_last)
  deals each rank n // W training samples, B at a time. Its permutation is the one a single process uses,
  so step i's global batch is the set of samples a single-process run with --batch-size W x B sees at
  step i (the loss does not depend on their order); dropout differs (each rank has its own RNG stream).
- Validation: rank 0 alone evaluates the whole valid split in batches of B (the numbers a single process
  with --batch-size B reports for the same weights, comparable across world sizes) and broadcasts the
  loss, so every rank takes the same early-stopping decision.
- Files: rank 0 alone writes log.jsonl, checkpoint.pt, best.pt, results.json/.png and prints; the other
  ranks stay quiet (no progress bar). A write that fails on rank 0 fails every rank. ``model`` in a
  checkpoint is the plain state_dict (no DDP "module." prefix): checkpoints of single-process and
  torchrun runs are interchangeable and ``fastpair-probe`` reads both. After training every rank leaves
  the process group; rank 0 runs the probe, the others exit 0.
- Errors: argument errors are found before the process group starts (every rank prints the same
  ``fastpair-train: error: ...`` line and exits 2); errors after it (data, run directory, checkpoint,
  ranks started with other options or seeing other data) are agreed on: every rank raises the first
  failing rank's message, so none waits for a rank that left. (torchrun stops a node's other ranks as
  soon as one exits non-zero, so some may be stopped before they print.) A crash or bug on one rank is
  torchrun's to handle: the others fail in their next collective (at once with gloo; with NCCL at the
  latest after the process group's timeout).
- ``--resume``: every rank reads DIR/checkpoint.pt, so on several nodes --out must be a shared
  filesystem (a rank that cannot see rank 0's checkpoint stops every rank with an error saying so). The
  checkpoint holds every rank's RNG state. With the same world size a resumed run continues with the
  same weights, optimizer, schedule, early-stopping state, data order and per-rank dropout RNG as the
  interrupted one; on CPU that ends with bitwise the weights of an uninterrupted run (README: checked by
  hand, not by a test), which GPUs do not promise (NCCL reductions and CUDA kernels need not be bitwise
  reproducible). Since --resume without a checkpoint starts afresh, ``torchrun --max-restarts N ...
  --resume`` restarts a failed job from its last finished epoch. A different world size (or a
  single-process run resumed under torchrun, and back) works too: the schedule continues from the
  finished epochs (step = epoch x the new steps per epoch), ranks the saved run did not have start fresh
  RNG streams, and the global batch becomes the new W x B (the resume line says so). The other options
  must be those of the run, --batch-size too.
"""

from __future__ import annotations

import contextlib
import dataclasses
import gc
import inspect
import os
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from .config import Config, TrainError
from .data import DataError


@dataclass(frozen=True)
class World:
    """This process's place among the ranks of a torchrun job (rank 0 of 1 for a plain process)."""

    rank: int = 0
    size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def torchrun_world() -> World | None:
    """The ranks torchrun describes in the environment, or None for a plain process (or WORLD_SIZE=1)."""
    env = os.environ

    def integer(name, default=None):
        try:
            return int(env.get(name, default))
        except (TypeError, ValueError):
            raise TrainError(f"torchrun environment: {name}={env.get(name)!r} is not an integer") from None

    size = integer("WORLD_SIZE", "1")
    if size <= 1:
        return None
    missing = [k for k in ("RANK", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT") if k not in env]
    if missing:
        raise TrainError(f"WORLD_SIZE={size} is set but {', '.join(missing)} not: start the ranks with torchrun "
                         f"(or unset WORLD_SIZE)")
    world = World(integer("RANK"), size, integer("LOCAL_RANK"))
    if not (0 <= world.rank < size and world.local_rank >= 0):
        raise TrainError(f"torchrun environment: RANK={world.rank} is not in [0, WORLD_SIZE={size})")
    return world


def current_world() -> World:
    """The ranks of the started default process group (rank 0 of 1 when there is none)."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        return World(dist.get_rank(), dist.get_world_size(), int(os.environ.get("LOCAL_RANK", "0")))
    return World()


def check_device(cfg: Config) -> None:
    """--device cuda needs a CUDA device: the one check of an option that needs torch (``config`` is
    torch-free), made on every rank before its process group starts, so every rank prints the same line."""
    if cfg.device == "cuda" and not torch.cuda.is_available():
        raise TrainError("--device cuda: no CUDA device is available")


def device_of(cfg: Config) -> torch.device:
    """cpu or cuda; under torchrun (process group started) a rank's own GPU, cuda:LOCAL_RANK."""
    if not (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    world = current_world()
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device("cuda")


@contextlib.contextmanager
def process_group(cfg: Config, world: World | None):
    """Start the default process group for a torchrun rank (NCCL on CUDA, gloo on CPU) and destroy it on
    the way out, also when the body raises; yields the World (a plain World() without torchrun)."""
    if world is None:
        yield World()
        return
    options = {}
    if device_of(cfg).type == "cuda":
        if world.local_rank >= torch.cuda.device_count():
            raise TrainError(f"LOCAL_RANK={world.local_rank} but this node has {torch.cuda.device_count()} "
                             f"CUDA device(s): start at most that many processes per node (--nproc-per-node)")
        torch.cuda.set_device(world.local_rank)
        options = {"backend": "nccl", "device_id": torch.device("cuda", world.local_rank)}
    # The env:// store, with this attempt's keys under their own prefix: after a restart by torchrun
    # (--max-restarts) the agent's store still holds the previous attempt's keys, and without the prefix the
    # new ranks would read the addresses of the processes they replace and never connect.
    store, _, _ = next(dist.rendezvous("env://", world.rank, world.size))
    store = dist.PrefixStore(f"fastpair/attempt_{os.environ.get('TORCHELASTIC_RESTART_COUNT', '0')}", store)
    dist.init_process_group(options.pop("backend", "gloo"), store=store, rank=world.rank, world_size=world.size,
                            **options)
    try:
        yield current_world()
    finally:
        # reference cycles (a caught exception's traceback, say) may still hold the group: collect them while
        # it exists; a gloo group whose last reference dies at interpreter exit can abort the process
        gc.collect()
        dist.destroy_process_group()


@contextlib.contextmanager
def agreed(world: World):
    """A block every rank runs (a part of it maybe on rank 0 only): if it raises a TrainError, DataError or
    OSError on any rank, every rank raises the same TrainError (the message of the first failing rank),
    so none is left waiting in a collective for a rank that left. A single process is unaffected."""
    if world.size == 1:
        yield
        return
    error = None
    try:
        yield
    except (TrainError, DataError, OSError) as err:
        error = str(err)
    errors = [None] * world.size
    dist.all_gather_object(errors, error)
    failed = [(rank, e) for rank, e in enumerate(errors) if e is not None]
    if failed:
        rank, message = failed[0]
        raise TrainError(message if all(e == message for e in errors) else f"rank {rank}: {message}")


def from_rank0(value, world: World):
    """Rank 0's value (a picklable object) on every rank."""
    if world.size == 1:
        return value
    box = [value]
    dist.broadcast_object_list(box, src=0)
    return box[0]


def quiet(*args, **kwargs) -> None:
    """``log`` of the ranks other than 0."""


def check_same_run(cfg: Config, resume: bool, data, world: World) -> None:
    """Under torchrun every rank must run with the same options (--out may differ) and have loaded the same
    data (sizes compared): else the ranks would take different numbers of steps and wait for each other."""
    if world.size == 1:
        return
    mine = {"options": {**{k: v for k, v in dataclasses.asdict(cfg).items() if k != "out"}, "resume": resume},
            "data": {"name": data.name, "task": data.task, "dims": dict(data.dims),
                     "samples": {s: len(sp.y) for s, sp in data.splits.items()}}}
    everyone = [None] * world.size
    dist.all_gather_object(everyone, mine)
    for rank, theirs in enumerate(everyone):
        for what in ("options", "data"):
            if theirs[what] != everyone[0][what]:
                diff = {k: (everyone[0][what][k], v) for k, v in theirs[what].items() if v != everyone[0][what][k]}
                raise TrainError(f"rank {rank} runs with other {what} than rank 0 (rank 0's, rank {rank}'s: {diff}): "
                                 f"start every rank with the same arguments and --data")


def distribute(model: nn.Module, device: torch.device, world: World, unused_parameters: bool,
               wrap: bool = True):
    """(what the training step calls, the process group for pairwise_nce's negatives): the model itself and
    None in a single process, else the model in DistributedDataParallel and the default group. wrap=False (a
    step in chunks, which calls the encoders directly): the model itself and the default group; the step then
    averages the gradients itself (``average_gradients``)."""
    if world.size == 1:
        return model, None
    if not wrap:
        return model, dist.group.WORLD
    from torch.nn.parallel import DistributedDataParallel

    # the buffers (positional table, a fixed temperature) never change: no sync per step
    params = inspect.signature(DistributedDataParallel).parameters
    no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
    net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                  find_unused_parameters=unused_parameters, **no_sync)
    return net, dist.group.WORLD


def average_gradients(model: nn.Module, world: World) -> None:
    """Every rank's parameter gradients replaced by their mean over the ranks, in one all-reduce (what
    DistributedDataParallel does for a step whose forward did not go through it)."""
    if world.size == 1:
        return
    grads = [p.grad for p in model.parameters() if p.grad is not None]
    flat = torch.cat([g.reshape(-1) for g in grads])
    dist.all_reduce(flat)
    flat /= world.size
    offset = 0
    for g in grads:
        g.copy_(flat[offset:offset + g.numel()].view_as(g))
        offset += g.numel()


def global_mean(total: float, count: int, device: torch.device, world: World) -> tuple[float, int]:
    """(the mean over ranks of ``total``, the sum of ``count``): an epoch's mean loss and samples seen."""
    if world.size == 1:
        return total, count
    totals = torch.tensor([total, count], dtype=torch.float64, device=device)
    dist.all_reduce(totals)
    return totals[0].item() / world.size, int(totals[1].item())


# ---------------------------------------------------------------------------------------------- RNG streams

def seed_rank(seed: int, world: World, epoch: int = 0) -> None:
    """A fresh dropout stream for a rank other than 0 (rank 0 keeps a single process's)."""
    torch.manual_seed(seed + 1_000_003 * world.rank + epoch)


def rng_state(device: torch.device) -> dict:
    """This process's RNG state: the CPU generator and, on CUDA, the generator of this rank's GPU."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


def rng_states(device: torch.device, world: World) -> dict:
    """A checkpoint's "rng" (every rank calls it): a single process's CPU and GPU generators; under torchrun
    rank 0's in that format (its own GPU only) and every rank's under "ranks"."""
    if world.size == 1:
        return {"torch": torch.get_rng_state(),
                "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
    ranks = [None] * world.size
    dist.all_gather_object(ranks, rng_state(device))
    return {"torch": ranks[0]["torch"], "cuda": None if ranks[0]["cuda"] is None else [ranks[0]["cuda"]],
            "ranks": ranks}


def restore_rng(rng: dict, seed: int, epoch: int, device: torch.device, world: World) -> None:
    """Set this rank's generators from a checkpoint's "rng" (of any world size); a rank the saved run did
    not have gets a fresh stream."""
    if world.size == 1:
        torch.set_rng_state(rng["torch"])
        if torch.cuda.is_available() and rng.get("cuda") is not None:
            torch.cuda.set_rng_state_all(rng["cuda"])
        return
    ranks = rng.get("ranks") or [{"torch": rng["torch"], "cuda": None}]  # a single process's: rank 0's
    if world.rank >= len(ranks):
        seed_rank(seed, world, epoch)
        return
    torch.set_rng_state(ranks[world.rank]["torch"])
    if device.type == "cuda" and ranks[world.rank]["cuda"] is not None:
        torch.cuda.set_rng_state(ranks[world.rank]["cuda"], device)
