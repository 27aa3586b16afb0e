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

Under torchrun: ``fastpair.training.world``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import inspect
import io
import json
import math
import os
import sys
import time

import torch
import torch.distributed as dist
from torch import nn

from fastpair import PairwiseNCE, modality_pairs

from .config import Config, TrainError, baselines, parse_config, parser
from .data import MODALITIES, atomic_write
from .models import MultimodalEncoder, present
from .world import (
    World,
    agreed,
    check_same_run,
    current_world,
    device_of,
    from_rank0,
    process_group,
    quiet,
    rng_state,
    torchrun_world,
)

ENCODER_NAMES = ("pairwise_nce", "random_init", "supervised")


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
        log = quiet
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


def train_and_probe(argv) -> None:
    from . import data as data_mod

    cfg, resume = parse_config(argv)  # argument errors: before any process group, on every rank alike
    launch = torchrun_world()
    if cfg.tensorboard:
        summary_writer()
    with process_group(cfg, launch) as world:
        say = print if world.main else quiet

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

    p = parser("fastpair-probe", "Re-run the fusion probe on a trained run directory.")
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
