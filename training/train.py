"""The training loop of fastpair-train: ``fit`` one objective on a data set, with validation, early stopping,
checkpoints and ``--resume`` (``fastpair.training.checkpoint``), on one process or on torchrun's ranks
(``fastpair.training.world``).

One epoch, in nanoGPT's order: for each full batch, set the learning rate (a one-epoch linear warmup, then
per-step cosine to lr/10, or x0.9 every 5 epochs), forward and backward (bf16 autocast on CUDA), clip the
gradient norm, step, zero the gradients; then evaluate on the valid split, keep DIR/best.pt if the loss is the
lowest so far, log, checkpoint, and stop after ``--patience`` epochs without a better one.

``python -m fastpair.training.train`` (and so ``torchrun ... -m fastpair.training.train``) is fastpair-train:
``fastpair.training.cli`` has the command line, ``fastpair.training.experiment`` the whole experiment (training,
baselines, probe). Progress on stderr: ``fastpair.training.progress``.
"""

from __future__ import annotations

import math
import os
import time

import torch
from torch import nn

from .checkpoint import TrainState, load_checkpoint, output_folder, restore, save_best, save_checkpoint
from .config import Config, TrainError
from .data import to_tensors
from .objectives import Objective, build
from .progress import track
from .runlog import RunLog
from .views import two_views
from .world import (
    World,
    agreed,
    average_gradients,
    current_world,
    device_of,
    distribute,
    from_rank0,
    global_mean,
    quiet,
    rng_states,
    seed_rank,
)


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


def autocast(device: torch.device):
    """bf16 on CUDA, off on CPU (fp32)."""
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


def take(tensors: dict[str, torch.Tensor], idx: torch.Tensor, device: torch.device) -> dict[str, torch.Tensor]:
    return {k: v[idx].to(device, non_blocking=True) for k, v in tensors.items()}


def concat(parts: list[dict[str, torch.Tensor]]) -> dict[str, torch.Tensor]:
    """Splits with the same feature sizes stacked along N (pad the time axis to the longest). One split is
    returned as it is: the training data stays held once, in the arrays the data set loaded."""
    if len(parts) == 1:
        return parts[0]
    out = {}
    for k in parts[0]:
        ts = [p[k] for p in parts]
        if ts[0].ndim >= 2:
            t_max = max(t.shape[1] for t in ts)
            ts = [nn.functional.pad(t, (0, 0, 0, t_max - t.shape[1]) if t.ndim == 3 else (0, t_max - t.shape[1]))
                  for t in ts]
        out[k] = torch.cat(ts)
    return out


class Batches:
    """This rank's training batches: the train split (with --transductive also valid and test, for an
    objective that uses no labels), an epoch's permutation from (seed, epoch) alone, full batches only (the
    contrastive task keeps its difficulty). Under torchrun a DistributedSampler deals each rank n // W
    samples from the permutation a single process uses. With --views 2 (label-free objectives) each batch
    of B clips becomes 2B crops (``fastpair.training.views``), drawn from (seed, epoch, step, rank) alone so
    that a resumed run crops as the interrupted one would have."""

    def __init__(self, cfg: Config, data, objective: Objective, world: World):
        self.splits = ["train"] + (["valid", "test"] if cfg.transductive and not objective.uses_labels else [])
        self.tensors = concat([to_tensors(data.splits[s]) for s in self.splits])
        n = len(self.tensors["y"])
        if world.size > 1 and n // world.size < 2:
            raise TrainError(f"{n} training samples cannot make a batch of 2 on each of {world.size} ranks")
        per_rank = n // world.size  # the DistributedSampler's share (drop_last); n for a single process
        self.n, self.seed = n, cfg.seed
        self.views = cfg.views if not objective.uses_labels else 1
        self.crop_length, self.modalities, self.rank = cfg.crop_length, data.modalities, world.rank
        self.size = min(cfg.batch_size, per_rank)
        self.per_epoch = per_rank // self.size
        self.sampler = None
        if world.size > 1:
            from torch.utils.data import DistributedSampler

            self.sampler = DistributedSampler(range(n), num_replicas=world.size, rank=world.rank, shuffle=True,
                                              seed=cfg.seed * 1_000_003, drop_last=True)

    def order(self, epoch: int) -> torch.Tensor:
        if self.sampler is None:
            return torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1_000_003 + epoch))
        self.sampler.set_epoch(epoch)
        return torch.tensor(list(self.sampler), dtype=torch.long)

    def batch(self, order: torch.Tensor, i: int, device: torch.device, epoch: int = 0) -> dict[str, torch.Tensor]:
        idx = order[i * self.size:(i + 1) * self.size]
        batch = take(self.tensors, idx, device)
        if self.views == 1:
            return batch
        key = ((self.seed * 1_000_003 + epoch) * 1_000_003 + i) * 1_009 + self.rank
        gen = torch.Generator().manual_seed(key % (1 << 63))
        return two_views(batch, idx, self.modalities, self.crop_length, gen)


@torch.no_grad()
def evaluate(model: Objective, tensors, batch_size: int, device, progress: bool = False) -> dict:
    """{"loss": the mean loss over fixed batches of the split, and the objective's summary of its statistics
    averaged the same way}; ``progress``: shown on stderr (``fastpair.training.progress``)."""
    model.eval()
    n = len(tensors["y"])
    total, sums, count = 0.0, {}, 0
    starts = range(0, n, batch_size)
    for start in track(starts, len(starts), f"[{model.name}] validation", "batches", enabled=progress):
        idx = torch.arange(start, min(n, start + batch_size))
        if len(idx) < 2 and n >= 2:
            continue  # a contrastive batch of one sample carries no negatives
        with autocast(device):
            loss, stats = model.validation(take(tensors, idx, device))
        total += loss.item() * len(idx)
        for key, value in stats.items():
            sums[key] = sums.get(key, 0.0) + value.cpu() * len(idx)
        count += len(idx)
    return {"loss": total / max(count, 1), **model.summary({k: v / max(count, 1) for k, v in sums.items()})}


def fit(cfg: Config, data, objective: str, out_dir: str, resume: bool, log=print) -> Objective:
    """Train ``objective`` ("pairwise_nce", "pairwise_sigmoid", "gram_nce" or "supervised", see
    ``fastpair.training.objectives``) and return the model with its best-validation weights (DIR/best.pt).

    Under a started process group (torchrun) every rank calls it with the same arguments and data: the
    model is wrapped in DistributedDataParallel, each rank trains on its share of the samples, rank 0 alone
    evaluates, writes and logs (``fastpair.training.world``); rank 0 returns the best-validation weights,
    the other ranks the last ones."""
    # setup: the ranks, the run directory, the model, its optimizer and this rank's batches
    world = current_world()
    log = log if world.main else quiet
    with agreed(world):
        if world.main:
            output_folder(out_dir)
    device = device_of(cfg)
    ckpt_path, best_path = os.path.join(out_dir, "checkpoint.pt"), os.path.join(out_dir, "best.pt")
    model = build(cfg, data, objective).to(device)
    optimizer = make_optimizer(cfg, model)
    batches = Batches(cfg, data, model, world)
    valid = to_tensors(data.splits["valid"])
    if not world.main:
        seed_rank(cfg.seed, world)  # its own dropout stream (rank 0 keeps a single process's)
    run_log = RunLog(out_dir, model.name, cfg.epochs)

    # checkpoint: rank 0 decides whether there is one to resume from; every rank then reads it
    state = TrainState()
    if from_rank0(bool(resume and os.path.exists(ckpt_path)), world):
        state, saved_world = restore(ckpt_path, cfg, model, optimizer, batches.per_epoch, device, world)
        with agreed(world):
            if world.main:
                run_log.keep_until(state.epoch)
        log(f"[{model.name}] resumed at epoch {state.epoch} of {cfg.epochs}"
            + (f" (saved by {saved_world} rank(s), now {world.size}: global batch {world.size * batches.size})"
               if saved_world != world.size else ""))
    else:
        with agreed(world):
            if world.main:
                run_log.start(data, batches.splits, batches.size, 0 if model.uses_labels else cfg.chunk_size)
    with agreed(world):
        if cfg.tensorboard and world.main:
            run_log.open_tensorboard(out_dir)

    chunked = bool(cfg.chunk_size) and not model.uses_labels  # --chunk-size: the label-free objectives
    net, group = distribute(model, device, world, model.unused_parameters, wrap=not chunked)

    while state.epoch < cfg.epochs and not state.stopped:
        net.train()
        order = batches.order(state.epoch)
        start, seen, train_loss = time.perf_counter(), 0, 0.0
        for i in track(range(batches.per_epoch), batches.per_epoch, f"[{model.name}] epoch {state.epoch + 1}/"
                       f"{cfg.epochs}", "steps", enabled=world.main):
            lr = learning_rate(cfg, state.step, batches.per_epoch)  # the schedule is per step (warmup, decay)
            for param_group in optimizer.param_groups:
                param_group["lr"] = lr
            batch = batches.batch(order, i, device, state.epoch)
            if chunked:  # forward and backward in chunks of the encoders; the ranks' gradients averaged here
                with autocast(device):
                    loss = model.step_in_chunks(batch, cfg.chunk_size, group)
                average_gradients(model, world)
            else:
                with autocast(device):  # forward: the objective's loss of this rank's batch
                    loss = net(batch, group=group)
                loss.backward()  # under DDP the gradients are averaged over the ranks: the global batch's
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # one bad batch cannot throw the model far
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)  # None, not 0: a parameter with no gradient is not decayed
            state.step += 1
            train_loss += loss.item()
            seen += batches.size
        seconds = time.perf_counter() - start
        train_loss, seen = global_mean(train_loss, seen, device, world)  # the global batch's loss, every sample
        rng = rng_states(device, world)  # every rank's generators, for the checkpoint

        # evaluate on rank 0; every rank takes its loss, so every rank takes the same early-stopping decision
        val = evaluate(model, valid, batches.size, device, progress=True) if world.main else None
        val_loss = from_rank0(val["loss"] if world.main else None, world)
        state.epoch += 1
        improved = val_loss < state.best
        state.best, state.bad_epochs = (val_loss, 0) if improved else (state.best, state.bad_epochs + 1)
        state.stopped = state.bad_epochs >= cfg.patience

        with agreed(world):  # rank 0 writes best.pt, the log line, then the checkpoint; a failure stops every rank
            if world.main:
                if improved:
                    save_best(best_path, model, cfg, state, val_loss)
                record = {"epoch": state.epoch, "train_loss": train_loss / max(batches.per_epoch, 1),
                          "valid_loss": val_loss, "lr": lr, "samples_per_s": seen / max(seconds, 1e-9),
                          "best": improved, **{k: v for k, v in val.items() if k != "loss"}}
                log(run_log.epoch(record))
                save_checkpoint(ckpt_path, model, optimizer, cfg, state, batches.per_epoch, rng, world)
        if state.stopped:
            log(f"[{model.name}] early stop: no better validation loss in {cfg.patience} epochs")
    run_log.close()
    if world.main and os.path.exists(best_path):
        model.load_state_dict(load_checkpoint(best_path)["model"])
    return model


if __name__ == "__main__":  # torchrun -m fastpair.training.train: fastpair-train's command line
    from .cli import main

    raise SystemExit(main())
