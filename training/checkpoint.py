"""A training run's checkpoints: atomic writes, loading, and ``--resume``.

DIR/checkpoint.pt, written every epoch, holds the full state: {"model": the objective's state_dict (never a
DistributedDataParallel "module." prefix), "optimizer", "scheduler": {"kind", "step", "steps_per_epoch"},
"config", "state": {"epoch", "step", "best", "bad_epochs", "stopped"}, "rng": {"torch", "cuda"} (plus
"ranks", every rank's, under torchrun), "world_size"}. DIR/best.pt holds {"model", "epoch", "config",
"valid_loss"} of the epoch with the lowest validation loss. Both are plain dicts of tensors and numbers
(``torch.load(..., weights_only=True)`` reads them), written to a temporary file and renamed, so a run killed
at any moment leaves the previous epoch's checkpoint intact. Every file of a run (these, results.json/.png,
digits.npz: all through ``atomic_write``) is created like ``open(path, "w")`` creates one: mode 0666 less the
umask, as log.jsonl is.

A run starts in a new or empty --out (``claim_folder``): an earlier run there is continued only with --resume
and replaced only with --overwrite, never by accident.

``--resume`` continues from DIR/checkpoint.pt and, on CPU, ends with bitwise the weights of a run never
interrupted: the data order of an epoch comes from (seed, epoch) and the dropout RNG is saved.
"""

from __future__ import annotations

import dataclasses
import math
import os
import secrets
import shutil
import tempfile
from dataclasses import dataclass

import torch

from .config import Config, TrainError
from .world import World, agreed, restore_rng

# options a resumed run may change: the total, where it runs, the logging, where its folder is, and the chunks
# the encoders run in (the same gradients; a run that ran out of memory continues with smaller ones)
RESUMABLE_CHANGES = ("epochs", "device", "tensorboard", "out", "chunk_size")
# what fastpair-train writes in --out: what --overwrite deletes (a stale supervised/ would be probed as the new
# run's baseline, a stale tensorboard/ plotted with its curves)
RUN_FILES = ("checkpoint.pt", "best.pt", "log.jsonl", "results.json", "results.png", "supervised", "tensorboard")


@dataclass
class TrainState:
    """What a resumed run needs besides the tensors: finished epochs, optimizer steps, early stopping."""

    epoch: int = 0
    step: int = 0
    best: float = math.inf  # the lowest validation loss so far
    bad_epochs: int = 0  # epochs since it was reached
    stopped: bool = False


def output_folder(path: str, option: str = "--out") -> None:
    """Create the folder ``path`` (and its parents) if needed and check that files can be written in it, so
    that a folder that cannot be created or written is a TrainError before any work, not a traceback after."""
    try:
        os.makedirs(path, exist_ok=True)
    except OSError as e:
        raise TrainError(f"{option} {path}: cannot create the folder ({e.strerror or e})") from None
    try:
        with tempfile.TemporaryFile(dir=path):
            pass
    except OSError as e:
        raise TrainError(f"{option} {path}: cannot write in the folder ({e.strerror or e})") from None


def claim_folder(path: str, resume: bool, overwrite: bool) -> None:
    """Let a run start in the existing folder ``path`` (--out): with --resume always (it continues the run
    there, or starts afresh where there is no checkpoint); with --overwrite after deleting the files of the run
    there (``RUN_FILES``; other files stay); otherwise only if it is empty. Any file counts, not only a run's:
    a folder of other things is no place to write a run in unasked."""
    if resume:
        return
    if overwrite:
        for name in RUN_FILES:
            target = os.path.join(path, name)
            if os.path.isdir(target) and not os.path.islink(target):
                shutil.rmtree(target)
            elif os.path.lexists(target):
                os.unlink(target)
        return
    entries = sorted(os.listdir(path))
    if entries:
        shown = ", ".join(entries[:3]) + (", ..." if len(entries) > 3 else "")
        raise TrainError(f"--out {path} is not empty (it holds {shown}): pass --resume to continue the run in it, "
                         f"--overwrite to replace it, or another --out")


def _new_file(path: str) -> tuple[int, str]:
    """A new, empty temporary file next to ``path``, open for writing: (fd, its path). Created with mode 0666
    and so, by the kernel, 0666 less the umask (tempfile.mkstemp's 0600 would make every run file private, unlike
    log.jsonl; reading the umask instead would need os.umask, which sets it: a race with other threads)."""
    folder, name = os.path.split(path)
    for _ in range(100):
        tmp = os.path.join(folder, f".{name}.{secrets.token_hex(6)}.tmp")
        try:
            return os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0), 0o666), tmp
        except FileExistsError:  # a name another writer drew: draw again
            continue
    raise FileExistsError(f"no free temporary name next to {path}")


def atomic_write(path: str, write) -> None:
    """Call ``write(f)`` on a binary temporary file next to ``path``, fsync, then rename it over ``path``:
    a reader (or a run killed at any moment) sees the old file or the new one, never a part. The file gets
    the mode ``open`` would give it (0666 less the umask)."""
    path = os.path.abspath(path)
    fd, tmp = _new_file(path)
    try:
        with os.fdopen(fd, "wb") as f:
            write(f)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def atomic_save(obj, path: str) -> None:
    """torch.save through a temporary file in the same directory, renamed over ``path``."""
    atomic_write(path, lambda f: torch.save(obj, f))


def load_checkpoint(path: str) -> dict:
    try:
        return torch.load(path, map_location="cpu", weights_only=True)
    except Exception as err:  # noqa: BLE001 - a damaged file of any kind: one clear line
        raise TrainError(f"{path}: not a readable fastpair checkpoint ({type(err).__name__}: {err})") from None


def epochs_of(folder: str) -> dict:
    """{"trained": the epochs finished (folder/checkpoint.pt), "best": the epoch of folder/best.pt's weights,
    the ones probed}; None for a file that is not there (a run copied without its checkpoint.pt)."""
    ckpt, best = os.path.join(folder, "checkpoint.pt"), os.path.join(folder, "best.pt")
    return {"trained": int(load_checkpoint(ckpt)["state"]["epoch"]) if os.path.exists(ckpt) else None,
            "best": int(load_checkpoint(best)["epoch"]) if os.path.exists(best) else None}


def save_best(path: str, model, cfg: Config, state: TrainState, valid_loss: float) -> None:
    atomic_save({"model": model.state_dict(), "epoch": state.epoch, "config": dataclasses.asdict(cfg),
                 "valid_loss": valid_loss}, path)


def save_checkpoint(path: str, model, optimizer, cfg: Config, state: TrainState, steps_per_epoch: int, rng: dict,
                    world: World) -> None:
    atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),
                 "scheduler": {"kind": cfg.schedule, "step": state.step, "steps_per_epoch": steps_per_epoch},
                 "config": dataclasses.asdict(cfg), "state": dataclasses.asdict(state), "rng": rng,
                 "world_size": world.size}, path)


def restore(path: str, cfg: Config, model, optimizer, steps_per_epoch: int, device: torch.device,
            world: World) -> tuple[TrainState, int]:
    """Load DIR/checkpoint.pt into the model, the optimizer and this rank's RNG (every rank calls it, every
    rank reads the file); returns the training state and the world size that saved it. A checkpoint of
    other options, or one this rank does not see, stops every rank."""
    with agreed(world):
        if not os.path.exists(path):
            raise TrainError(f"{path}: rank 0 resumes from it but this rank does not see it (on several "
                             f"nodes --out must be on a shared filesystem)")
        ckpt = load_checkpoint(path)
        saved = {k: v for k, v in ckpt["config"].items() if k not in RESUMABLE_CHANGES}
        now = {k: v for k, v in dataclasses.asdict(cfg).items() if k in saved}
        if saved != now:
            diff = {k: (saved[k], now[k]) for k in saved if saved[k] != now.get(k)}
            raise TrainError(f"{path}: --resume needs the arguments of the run; differing (saved, now): {diff}")
    model.load_state_dict(ckpt["model"])
    optimizer.load_state_dict(ckpt["optimizer"])
    state = TrainState(**ckpt["state"])
    if ckpt["scheduler"]["steps_per_epoch"] != steps_per_epoch:  # another world size: the same epoch
        state.step = state.epoch * steps_per_epoch
    restore_rng(ckpt["rng"], cfg.seed, state.epoch, device, world)
    return state, int(ckpt.get("world_size", 1))
