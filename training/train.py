"""Label-free training with pairwise_nce, the baselines, and the fusion probe: ``fastpair-train``.

    fastpair-train [--data synthetic|PATH] [--out DIR] [--epochs N] [--batch-size B] [--lr X] [--seed S]
                   [--device auto|cpu|cuda] [--resume] [--config FILE] [--transductive] [...]
    torchrun --nproc-per-node K -m fastpair.training.train [the same options]   # K ranks, B per rank

1. Train the three encoders and their projection heads with pairwise_nce (learnable temperature) on the
   train split, no labels (``--transductive``: also on valid and test, as the authors' code did). Every
   epoch DIR/checkpoint.pt holds the full state and DIR/best.pt the model with the lowest validation loss.
2. Baselines with the same architecture and seed: ``random_init`` (the untrained encoders) and
   ``supervised`` (encoders + a linear head on the fused features, trained with the labels for the same
   budget, in DIR/supervised/).
3. The fusion probe (``fastpair.training.probe``) on the frozen 512-d features of each encoder:
   DIR/results.json, DIR/results.png and the table on the terminal.

Checkpoints are plain dicts of tensors and numbers (``torch.load(..., weights_only=True)`` reads them),
written to a temporary file and renamed, so a run killed at any moment leaves the previous epoch's
checkpoint intact; ``--resume`` continues from it and, on CPU, ends with bitwise the weights of a run
never interrupted (the data order of an epoch comes from (seed, epoch), the dropout RNG is saved).

Under torchrun (``torchrun --nproc-per-node K -m fastpair.training.train ...``, also multi-node with
``--nnodes``/``--rdzv-*``), detected from WORLD_SIZE > 1 with RANK and LOCAL_RANK set:

- Process group: NCCL with one GPU per process (cuda:LOCAL_RANK) when the run's device is CUDA, gloo on
  CPU; destroyed at the end, also when a rank raises. The model is wrapped in DistributedDataParallel and
  pairwise_nce gets ``group=`` the default group: embeddings are all-gathered, so every sample has the
  whole global batch as negatives, and the averaged gradients are those of the concatenated batch.
- Batches: ``--batch-size`` B is per rank; the global batch, and so the number of negatives per sample, is
  W x B (W ranks). A DistributedSampler (shuffled per epoch with set_epoch, seed from --seed,
  drop_last) deals each rank n // W training samples, B at a time. Its permutation is the one a single
  process uses, so step i's global batch is the set of samples a single-process run with --batch-size
  W x B sees at step i (the loss does not depend on their order); dropout differs (each rank has its own
  RNG stream).
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
  interrupted one; measured on CPU with 2 gloo ranks, a job whose rank 1 was killed (SIGKILL) in epoch 3
  and resumed ended with bitwise the weights of an uninterrupted one, which is not promised on GPUs
  (NCCL reductions and CUDA kernels need not be bitwise reproducible). Since --resume without a
  checkpoint starts afresh, ``torchrun --max-restarts N ... --resume`` restarts a failed job from its
  last finished epoch. A different world size (or a single-process run resumed under torchrun, and
  back) works too: the schedule continues from the finished epochs (step = epoch x the new steps per
  epoch), ranks the saved run did not have start fresh RNG streams, and the global batch becomes the
  new W x B (the resume line says so). The other options must be those of the run, --batch-size too.
"""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import gc
import inspect
import io
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
import torch.distributed as dist
from torch import nn

from fastpair import PairwiseNCE, modality_pairs

from .data import MODALITIES, atomic_write
from .models import MultimodalEncoder, present

ENCODER_NAMES = ("pairwise_nce", "random_init", "supervised")


@dataclass
class Config:
    data: str = "synthetic"  # "synthetic" or a feature file (MulT / MMSA pickle, .npz)
    out: str = "runs/fastpair"
    epochs: int = 40  # the total, also when resuming
    batch_size: int = 128
    lr: float = 1e-3
    optimizer: str = "adamw"  # or "sgd" (the paper: momentum 0.9)
    weight_decay: float = 0.01  # on weight matrices only (the paper's SGD used 1e-3)
    schedule: str = "cosine"  # per-step cosine to lr/10 after a one-epoch warmup; or "step" (x0.9 / 5 epochs)
    grad_clip: float = 1.0
    patience: int = 10  # early stopping: epochs without a better validation loss
    temperature: float = 0.07  # initial; learned
    width: int = 128  # encoder width (the paper's text Transformer: 300)
    layers: int = 2
    dropout: float = 0.1
    seed: int = 0
    data_seed: int = 0  # the synthetic dataset's seed (the same data for every training seed)
    device: str = "auto"  # auto | cpu | cuda
    transductive: bool = False  # label-free training also on valid and test (the authors' setting)
    baselines: str = "random_init,supervised"  # comma-separated subset; "" for none
    tensorboard: bool = False


class TrainError(ValueError):
    """A bad argument or run directory: one line on stderr, exit status 2."""


# ----------------------------------------------------------------------------------------------------
# Command line and configuration

def _parser(prog: str, doc: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=doc.split("\n\n")[0],
                                   argument_default=argparse.SUPPRESS)


def parse_config(argv) -> tuple[Config, bool]:
    """Config from dataclass defaults < ``--config FILE`` (JSON or TOML) < explicit options."""
    p = _parser("fastpair-train", __doc__)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true")
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--config", help="a JSON or TOML file of the options above (names with underscores)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume", False)
    values = read_config_file(args.pop("config")) if "config" in args else {}
    values.update(args)
    try:
        cfg = Config(**values)
    except TypeError as err:
        raise TrainError(f"config: {err}") from None
    check_config(cfg)
    return cfg, resume


def read_config_file(path: str) -> dict:
    try:
        with open(path, "rb") as f:
            raw = f.read()
        if path.endswith(".toml"):
            try:
                import tomllib
            except ImportError:  # Python 3.10
                raise TrainError(f"{path}: TOML config files need Python 3.11+; use JSON") from None
            values = tomllib.loads(raw.decode())
        else:
            values = json.loads(raw)
    except (OSError, ValueError) as err:
        raise TrainError(f"{path}: cannot read the config file ({err})") from None
    if not isinstance(values, dict):
        raise TrainError(f"{path}: a table of options expected, got {type(values).__name__}")
    names = {f.name for f in dataclasses.fields(Config)}
    unknown = sorted(set(values) - names)
    if unknown:
        raise TrainError(f"{path}: unknown options {unknown}; known: {sorted(names)}")
    return values


def check_config(cfg: Config) -> None:
    def need(ok, what):
        if not ok:
            raise TrainError(what)

    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 2, f"--batch-size must be >= 2 (a contrastive batch), got {cfg.batch_size}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a finite number > 0, got {cfg.lr}")
    need(cfg.optimizer in ("adamw", "sgd"), f"--optimizer must be adamw or sgd, got {cfg.optimizer!r}")
    need(cfg.schedule in ("cosine", "step"), f"--schedule must be cosine or step, got {cfg.schedule!r}")
    need(cfg.device in ("auto", "cpu", "cuda"), f"--device must be auto, cpu or cuda, got {cfg.device!r}")
    need(cfg.device != "cuda" or torch.cuda.is_available(), "--device cuda: no CUDA device is available")
    need(cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}")
    need(cfg.width >= 2 and cfg.width % 4 == 0, f"--width must be a multiple of 4 (4 heads), got {cfg.width}")
    need(cfg.layers >= 1 and cfg.patience >= 1, "--layers and --patience must be >= 1")
    bad = set(baselines(cfg)) - {"random_init", "supervised"}
    need(not bad, f"--baselines: random_init and/or supervised expected, got {sorted(bad)}")


def baselines(cfg: Config) -> list[str]:
    return [b.strip() for b in cfg.baselines.split(",") if b.strip()]


def device_of(cfg: Config) -> torch.device:
    """cpu or cuda; under torchrun (process group started) a rank's own GPU, cuda:LOCAL_RANK."""
    if not (cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())):
        return torch.device("cpu")
    world = current_world()
    return torch.device("cuda", world.local_rank) if world.size > 1 else torch.device("cuda")


# ----------------------------------------------------------------------------------------------------
# Distributed (torchrun)

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
    # new ranks read the addresses of the processes they replace and never connect (seen with gloo, torch 2.13).
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
    from .data import DataError

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


def _quiet(*args, **kwargs) -> None:
    """``log`` of the ranks other than 0."""


def rng_state(device: torch.device) -> dict:
    """This process's RNG state: the CPU generator and, on CUDA, the generator of this rank's GPU."""
    return {"torch": torch.get_rng_state(),
            "cuda": torch.cuda.get_rng_state(device) if device.type == "cuda" else None}


# ----------------------------------------------------------------------------------------------------
# Files: atomic writes, checkpoints

def atomic_save(obj, path: str) -> None:
    """torch.save through a temporary file in the same directory, renamed over ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file of any kind: one clear line
        raise TrainError(f"{path}: not a readable fastpair checkpoint ({type(err).__name__}: {err})") from None


# ----------------------------------------------------------------------------------------------------
# Model and objectives

class Objective(nn.Module):
    """The encoders plus what the loss needs: PairwiseNCE's temperature, or the supervised linear head on
    the fused (concatenated) features. ``model`` in a checkpoint is this module's state_dict."""

    def __init__(self, cfg: Config, dims: dict[str, int], kind: str, num_outputs: int = 1):
        super().__init__()
        self.kind = kind
        self.encoder = MultimodalEncoder(dims, width=cfg.width, layers=cfg.layers, dropout=cfg.dropout)
        if kind == "pairwise_nce":
            self.loss = PairwiseNCE(len(MODALITIES), temperature=cfg.temperature)
        else:
            self.head = nn.Linear(len(MODALITIES) * 512, num_outputs)

    def forward(self, batch: dict[str, torch.Tensor], task: str, stats: bool = False, group=None):
        """The batch loss, and per-pair statistics for pairwise_nce when ``stats``. With ``group`` (a
        process group of W ranks, each passing its local batch) pairwise_nce takes its negatives from every
        rank's batch and returns W times this rank's share of the global loss (DistributedDataParallel's
        averaging then gives the gradients of the concatenated batch); the supervised loss is local (its
        mean over equal local batches is the global mean)."""
        if self.kind == "pairwise_nce":
            z = self.encoder(batch)
            out = self.loss(*(z[m].float() for m in MODALITIES), mask=present(batch), group=group,
                            return_stats=stats)
            return out if stats else (out, None)
        fused = torch.cat([f.float() for f in self.encoder.features(batch).values()], dim=1)
        pred = self.head(fused)
        if task == "multiclass":
            return nn.functional.cross_entropy(pred, batch["y"]), None
        return nn.functional.l1_loss(pred.squeeze(1), batch["y"]), None  # MulT's regression loss


def build(cfg: Config, data, kind: str) -> Objective:
    """The same initial encoder weights for every kind: the seed is set right before construction."""
    torch.manual_seed(cfg.seed)
    outputs = len(data.classes) if data.task == "multiclass" else 1
    return Objective(cfg, data.dims, kind, outputs)


def learning_rate(cfg: Config, step: int, steps_per_epoch: int) -> float:
    if cfg.schedule == "step":
        return cfg.lr * 0.9 ** (step // (5 * steps_per_epoch))
    warmup, total = steps_per_epoch, cfg.epochs * steps_per_epoch
    if step < warmup:
        return cfg.lr * (step + 1) / warmup
    progress = min(1.0, (step - warmup) / max(1, total - warmup))
    return cfg.lr * (0.1 + 0.9 * 0.5 * (1.0 + math.cos(math.pi * progress)))


def make_optimizer(cfg: Config, model: nn.Module) -> torch.optim.Optimizer:
    # weight decay on matrices only (nanoGPT): not on biases, norms or the log-temperature
    decay = [p for p in model.parameters() if p.ndim >= 2]
    rest = [p for p in model.parameters() if p.ndim < 2]
    groups = [{"params": decay, "weight_decay": cfg.weight_decay}, {"params": rest, "weight_decay": 0.0}]
    if cfg.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=cfg.lr, momentum=0.9)
    return torch.optim.AdamW(groups, lr=cfg.lr)


def take(tensors: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v[idx].to(device, non_blocking=True) for k, v in tensors.items()}


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Splits with the same feature sizes stacked along N (pad the time axis to the longest)."""
    out = {}
    for k in parts[0]:
        ts = [p[k] for p in parts]
        if ts[0].ndim >= 2:
            t_max = max(t.shape[1] for t in ts)
            ts = [nn.functional.pad(t, (0, 0, 0, t_max - t.shape[1]) if t.ndim == 3 else (0, t_max - t.shape[1]))
                  for t in ts]
        out[k] = torch.cat(ts)
    return out


@torch.no_grad()
def evaluate(model: Objective, tensors, task: str, batch_size: int, device, autocast) -> dict:
    """Mean loss over fixed batches of the split (and, for pairwise_nce, per-pair loss and accuracy)."""
    model.eval()
    n = len(tensors["y"])
    total, pair_loss, pair_acc, count = 0.0, 0.0, 0.0, 0
    for start in range(0, n, batch_size):
        idx = torch.arange(start, min(n, start + batch_size))
        if len(idx) < 2 and n >= 2:
            continue  # a contrastive batch of one sample carries no negatives
        with autocast():
            loss, stats = model(take(tensors, idx, device), task, stats=model.kind == "pairwise_nce")
        total += loss.item() * len(idx)
        if stats is not None:
            pair_loss = pair_loss + stats["pair_losses"].cpu() * len(idx)
            pair_acc = pair_acc + stats["pair_accuracy"].cpu() * len(idx)
        count += len(idx)
    out = {"loss": total / max(count, 1)}
    if model.kind == "pairwise_nce":
        names = [f"{MODALITIES[p]}-{MODALITIES[q]}" for p, q in modality_pairs(len(MODALITIES))]
        out["pair_loss"] = {k: float(v) for k, v in zip(names, pair_loss / max(count, 1))}
        # retrieval top-1 accuracy, both directions averaged
        out["pair_accuracy"] = {k: float(v.mean()) for k, v in zip(names, pair_acc / max(count, 1))}
    return out


def rewrite_log(path: str, last_epoch: int) -> None:
    """Keep the log lines of the epochs a resumed run does not redo (atomically)."""
    if not os.path.exists(path):
        return
    with open(path) as f:
        keep = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch]
    atomic_write(path, lambda f: f.write("".join(keep).encode()))


def summary_writer():
    """TensorBoard's SummaryWriter class, or a TrainError naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


def make_sampler(n: int, cfg: Config, world: World):
    """The training indices of this rank: a DistributedSampler over range(n), reshuffled every epoch
    (``set_epoch``) from the seed of a single-process run's permutation, n // W samples per rank."""
    from torch.utils.data import DistributedSampler

    return DistributedSampler(range(n), num_replicas=world.size, rank=world.rank, shuffle=True,
                              seed=cfg.seed * 1_000_003, drop_last=True)


def fit(cfg: Config, data, kind: str, out_dir: str, resume: bool, log=print) -> Objective:
    """Train one objective; returns the model with its best-validation weights (DIR/best.pt).

    Under a started process group (torchrun) every rank calls it with the same arguments and data: the
    model is wrapped in DistributedDataParallel, each rank trains on its DistributedSampler share, rank 0
    alone evaluates, writes and logs (see the module docstring); rank 0 returns the best-validation
    weights, the other ranks the last ones."""
    world = current_world()
    main = world.main
    if not main:
        log = _quiet
    with agreed(world):
        if main:
            os.makedirs(out_dir, exist_ok=True)
    device = device_of(cfg)
    ckpt_path, best_path, log_path = (os.path.join(out_dir, f) for f in ("checkpoint.pt", "best.pt", "log.jsonl"))
    model = build(cfg, data, kind).to(device)
    optimizer = make_optimizer(cfg, model)
    splits = ["train"] + (["valid", "test"] if cfg.transductive and kind == "pairwise_nce" else [])
    from .data import to_tensors

    train = concat([to_tensors(data.splits[s]) for s in splits])
    valid = to_tensors(data.splits["valid"])
    n = len(train["y"])
    if world.size > 1 and n // world.size < 2:
        raise TrainError(f"{n} training samples cannot make a batch of 2 on each of {world.size} ranks")
    per_rank = n // world.size  # the DistributedSampler's share (drop_last); n for a single process
    batch_size = min(cfg.batch_size, per_rank)
    steps_per_epoch = per_rank // batch_size  # full batches only: the contrastive task keeps its difficulty
    state = dict(epoch=0, step=0, best=math.inf, bad_epochs=0, stopped=False)
    sampler = None
    if world.size > 1:
        sampler = make_sampler(n, cfg, world)
        if not main:  # its own dropout stream (rank 0 keeps a single process's)
            torch.manual_seed(cfg.seed + 1_000_003 * world.rank)

    # rank 0 decides whether there is a checkpoint to resume from; every rank then reads it
    if from_rank0(bool(resume and os.path.exists(ckpt_path)), world):
        with agreed(world):
            if not os.path.exists(ckpt_path):
                raise TrainError(f"{ckpt_path}: rank 0 resumes from it but this rank does not see it (on several "
                                 f"nodes --out must be on a shared filesystem)")
            ckpt = load_checkpoint(ckpt_path)
            saved = {k: v for k, v in ckpt["config"].items() if k not in ("epochs", "device", "tensorboard", "out")}
            now = {k: v for k, v in dataclasses.asdict(cfg).items() if k in saved}
            if saved != now:
                diff = {k: (saved[k], now[k]) for k in saved if saved[k] != now.get(k)}
                raise TrainError(f"{ckpt_path}: --resume needs the arguments of the run; differing (saved, now): "
                                 f"{diff}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        if ckpt["scheduler"]["steps_per_epoch"] != steps_per_epoch:  # another world size: the same epoch
            state["step"] = state["epoch"] * steps_per_epoch
        rng = ckpt["rng"]
        if world.size == 1:
            torch.set_rng_state(rng["torch"])
            if torch.cuda.is_available() and rng.get("cuda") is not None:
                torch.cuda.set_rng_state_all(rng["cuda"])
        else:
            ranks = rng.get("ranks") or [{"torch": rng["torch"], "cuda": None}]  # a single process's: rank 0's
            if world.rank < len(ranks):
                torch.set_rng_state(ranks[world.rank]["torch"])
                if device.type == "cuda" and ranks[world.rank]["cuda"] is not None:
                    torch.cuda.set_rng_state(ranks[world.rank]["cuda"], device)
            else:  # a rank the saved run did not have: a fresh stream
                torch.manual_seed(cfg.seed + 1_000_003 * world.rank + state["epoch"])
        with agreed(world):
            if main:
                rewrite_log(log_path, state["epoch"])
        saved_world = int(ckpt.get("world_size", 1))
        log(f"[{kind}] resumed at epoch {state['epoch']} of {cfg.epochs}"
            + (f" (saved by {saved_world} rank(s), now {world.size}: global batch {world.size * batch_size})"
               if saved_world != world.size else ""))
    else:  # a fresh run: the log starts with the data it saw (a log of an earlier run here would mislead)
        with agreed(world):
            if main:
                with open(log_path, "w") as f:
                    f.write(json.dumps({"data": data.name, "source": data.source, "task": data.task,
                                        "samples": {s: len(sp.y) for s, sp in data.splits.items()},
                                        "train_splits": splits, "nonfinite_set_to_0": data.nonfinite}) + "\n")

    writer = None
    with agreed(world):
        if cfg.tensorboard and main:
            writer = summary_writer()(os.path.join(out_dir, "tensorboard"))

    def autocast():  # bf16 on CUDA, off on CPU (fp32)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    net, group = model, None  # what the training step calls; evaluation and checkpoints use model itself
    if world.size > 1:
        from torch.nn.parallel import DistributedDataParallel

        # the supervised objective leaves the projection heads unused (their gradients stay None, as in a
        # single process); the buffers (positional table, a fixed temperature) never change: no sync per step
        params = inspect.signature(DistributedDataParallel).parameters
        no_sync = {"forward_sync_buffers" if "forward_sync_buffers" in params else "broadcast_buffers": False}
        net = DistributedDataParallel(model, device_ids=[device.index] if device.type == "cuda" else None,
                                      find_unused_parameters=kind != "pairwise_nce", **no_sync)
        group = dist.group.WORLD

    from tqdm import tqdm

    while state["epoch"] < cfg.epochs and not state["stopped"]:
        epoch = state["epoch"]
        net.train()
        if sampler is None:
            order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        else:
            sampler.set_epoch(epoch)
            order = torch.tensor(list(sampler), dtype=torch.long)
        start, seen, train_loss = time.perf_counter(), 0, 0.0
        for i in tqdm(range(steps_per_epoch), desc=f"{kind} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                      disable=None if main else True, file=sys.stderr):
            lr = learning_rate(cfg, state["step"], steps_per_epoch)  # 1. set the learning rate
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            batch = take(train, order[i * batch_size:(i + 1) * batch_size], device)
            with autocast():  # 2. forward, backward (DDP averages the gradients over the ranks)
                loss, _ = net(batch, data.task, group=group)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # 3. clip
            optimizer.step()  # 4. step, zero the gradients
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            train_loss += loss.item()
            seen += batch_size
        seconds = time.perf_counter() - start
        rngs = None
        if world.size > 1:  # the global batch's mean loss and throughput; every rank's RNG for the checkpoint
            totals = torch.tensor([train_loss, seen], dtype=torch.float64, device=device)
            dist.all_reduce(totals)
            train_loss, seen = totals[0].item() / world.size, int(totals[1].item())
            rngs = [None] * world.size
            dist.all_gather_object(rngs, rng_state(device))
        # 5. evaluate (rank 0; every rank takes its loss, so the same early-stopping decision)
        val = evaluate(model, valid, data.task, batch_size, device, autocast) if main else None
        val_loss = from_rank0(val["loss"] if main else None, world)
        state["epoch"] = epoch + 1
        improved = val_loss < state["best"]
        if improved:
            state["best"], state["bad_epochs"] = val_loss, 0
        else:
            state["bad_epochs"] += 1
        state["stopped"] = state["bad_epochs"] >= cfg.patience  # 6. early stopping

        with agreed(world):  # rank 0 writes best.pt, the log line, the checkpoint; a failure stops every rank
            if main:
                if improved:
                    atomic_save({"model": model.state_dict(), "epoch": state["epoch"],
                                 "config": dataclasses.asdict(cfg), "valid_loss": val_loss}, best_path)
                record = {"epoch": state["epoch"], "train_loss": train_loss / max(steps_per_epoch, 1),
                          "valid_loss": val_loss, "lr": lr, "samples_per_s": seen / max(seconds, 1e-9),
                          "best": improved}
                if kind == "pairwise_nce":
                    record.update(valid_pair_loss=val["pair_loss"], valid_pair_accuracy=val["pair_accuracy"],
                                  temperature=float(model.loss.temperature.detach().float().mean()))
                with open(log_path, "a") as f:  # 7. log
                    f.write(json.dumps(record) + "\n")
                if writer is not None:
                    for key, value in record.items():
                        if isinstance(value, (int, float)) and not isinstance(value, bool):
                            writer.add_scalar(f"{kind}/{key}", value, state["epoch"])
                log(f"[{kind}] epoch {state['epoch']:3d}/{cfg.epochs}  train {record['train_loss']:.4f}  "
                    f"valid {val_loss:.4f}{' *' if improved else '  '}  "
                    + (f"t {record['temperature']:.4f}  " if kind == "pairwise_nce" else "")
                    + f"{record['samples_per_s']:.0f} samples/s")
                if rngs is None:
                    rng = {"torch": torch.get_rng_state(),
                           "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
                else:  # rank 0's in a single process's format (its own GPU only), and every rank's
                    rng = {"torch": rngs[0]["torch"], "cuda": None if rngs[0]["cuda"] is None else [rngs[0]["cuda"]],
                           "ranks": rngs}
                atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),  # 8. checkpoint
                             "scheduler": {"kind": cfg.schedule, "step": state["step"],
                                           "steps_per_epoch": steps_per_epoch},
                             "config": dataclasses.asdict(cfg), "state": dict(state), "rng": rng,
                             "world_size": world.size}, ckpt_path)
        if state["stopped"]:
            log(f"[{kind}] early stop: no better validation loss in {cfg.patience} epochs")
    if writer is not None:
        writer.close()
    if main and os.path.exists(best_path):
        model.load_state_dict(load_checkpoint(best_path)["model"])
    return model


# ----------------------------------------------------------------------------------------------------
# Probe

@torch.no_grad()
def extract(encoder: MultimodalEncoder, tensors, device, batch_size: int = 256) -> dict:
    """Frozen 512-d features of one split: {modality: (N, 512) float32 numpy}."""
    encoder.eval()
    n = len(tensors["y"])
    chunks = {m: [] for m in MODALITIES}
    for start in range(0, n, batch_size):
        feats = encoder.features(take(tensors, torch.arange(start, min(n, start + batch_size)), device))
        for m in MODALITIES:
            chunks[m].append(feats[m].float().cpu())
    return {m: torch.cat(chunks[m]).numpy() for m in MODALITIES}


def run_probe(cfg: Config, data, models: dict[str, Objective], out_dir: str, log=print) -> list[dict]:
    """Probe every encoder on every modality subset; writes results.json/.png, prints the table."""
    from . import probe
    from .data import to_tensors

    device = device_of(cfg)
    tensors = {s: to_tensors(data.splits[s]) for s in ("train", "valid", "test")}
    labels = {s: data.splits[s].y for s in tensors}
    rows = []
    for name, model in models.items():
        start = time.perf_counter()
        feats = {s: extract(model.encoder.to(device), tensors[s], device) for s in tensors}
        for row in probe.probe(feats, labels, data.task, data.classes, dataset=data.name, seed=cfg.seed):
            rows.append({"encoder": name, **row})
        log(f"[probe] {name}: {time.perf_counter() - start:.1f} s")
    probe.write_results(out_dir, data.name, data.task, rows)
    print(probe.format_table(rows, data.task))
    return rows


# ----------------------------------------------------------------------------------------------------
# Entry points

def _require_train_extra(prog: str) -> None:
    missing = []
    for module in ("sklearn", "matplotlib", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TrainError(f"{prog} needs the train extra (missing {', '.join(missing)}): "
                         f"pip install 'fastpair[train]'")


def _run(prog: str, body, argv) -> int:
    from .data import DataError

    try:
        _require_train_extra(prog)
        body(argv)
    except (TrainError, DataError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


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


def train_and_probe(argv) -> None:
    from . import data as data_mod

    cfg, resume = parse_config(argv)  # argument errors: before any process group, on every rank alike
    launch = torchrun_world()
    if cfg.tensorboard:
        summary_writer()
    with process_group(cfg, launch) as world:
        say = print if world.main else _quiet

        with agreed(world):
            if world.main:
                os.makedirs(cfg.out, exist_ok=True)
            # the other ranks load the same data quietly (rank 0 reports NaN/inf counts and warnings)
            with contextlib.nullcontext() if world.main else contextlib.redirect_stderr(io.StringIO()):
                data = data_mod.load(cfg.data, seed=cfg.data_seed)
        check_same_run(cfg, resume, data, world)
        ranks = ""
        if world.size > 1:
            ranks = (f"; {world.size} ranks ({dist.get_backend()}), batch {cfg.batch_size} per rank, "
                     f"{world.size * cfg.batch_size} in all")
        say(f"data: {data.name} ({data.source}), task {data.task}, "
            + ", ".join(f"{s} {len(sp.y)}" for s, sp in data.splits.items())
            + f"; device {device_of(cfg)}{ranks}")
        models = {"pairwise_nce": fit(cfg, data, "pairwise_nce", cfg.out, resume)}
        if "random_init" in baselines(cfg):
            models["random_init"] = build(cfg, data, "pairwise_nce")
        if "supervised" in baselines(cfg):
            models["supervised"] = fit(cfg, data, "supervised", os.path.join(cfg.out, "supervised"), resume)
    # every rank has left the process group (rank 0 wrote every checkpoint before the last collective);
    # the probe runs on rank 0 alone, with no collective to time out while it fits
    if not world.main:
        return
    run_probe(cfg, data, models, cfg.out)
    print(f"wrote {os.path.join(cfg.out, 'results.json')} and results.png")


def probe_run(argv) -> None:
    from . import data as data_mod

    p = _parser("fastpair-probe", "Re-run the fusion probe on a trained run directory.")
    p.add_argument("--run", required=True, help="the --out folder of a fastpair-train run")
    p.add_argument("--data", help="the feature file (default: the run's own --data)")
    args = p.parse_args(argv)
    best = os.path.join(args.run, "best.pt")
    if not os.path.exists(best):
        raise TrainError(f"{best}: no such file (is {args.run} the --out folder of a fastpair-train run?)")
    saved = load_checkpoint(best)
    cfg = Config(**{**saved["config"], **({"data": args.data} if getattr(args, "data", None) else {})})
    data = data_mod.load(cfg.data, seed=cfg.data_seed)
    models = {}
    for name, path in (("pairwise_nce", best), ("supervised", os.path.join(args.run, "supervised", "best.pt"))):
        if os.path.exists(path):
            models[name] = build(cfg, data, name)
            models[name].load_state_dict(load_checkpoint(path)["model"])
    if "random_init" in baselines(cfg):
        models["random_init"] = build(cfg, data, "pairwise_nce")
    run_probe(cfg, data, dict(sorted(models.items(), key=lambda kv: ENCODER_NAMES.index(kv[0]))), args.run)


def main(argv=None) -> int:
    """``fastpair-train``: train, run the baselines and the probe. Returns the exit status."""
    return _run("fastpair-train", train_and_probe, argv)


def probe_main(argv=None) -> int:
    """``fastpair-probe --run DIR [--data PATH]``."""
    return _run("fastpair-probe", probe_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
