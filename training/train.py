"""Label-free training with pairwise_nce, the baselines, and the fusion probe: ``fastpair-train``.

    fastpair-train [--data synthetic|PATH] [--out DIR] [--epochs N] [--batch-size B] [--lr X] [--seed S]
                   [--device auto|cpu|cuda] [--resume] [--config FILE] [--transductive] [...]

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
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
import os
import sys
import time
from dataclasses import dataclass

import torch
from torch import nn

from fastpair import PairwiseNCE, modality_pairs

from .data import atomic_write
from .models import MODALITIES, MultimodalEncoder, present

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
    return torch.device("cuda" if cfg.device == "cuda" or (cfg.device == "auto" and torch.cuda.is_available())
                        else "cpu")


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

    def forward(self, batch: dict[str, torch.Tensor], task: str, stats: bool = False):
        """The batch loss, and per-pair statistics for pairwise_nce when ``stats``."""
        if self.kind == "pairwise_nce":
            z = self.encoder(batch)
            out = self.loss(*(z[m].float() for m in MODALITIES), mask=present(batch), return_stats=stats)
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


def fit(cfg: Config, data, kind: str, out_dir: str, resume: bool, log=print) -> Objective:
    """Train one objective; returns the model with its best-validation weights (DIR/best.pt)."""
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
    batch_size = min(cfg.batch_size, n)
    steps_per_epoch = n // batch_size  # full batches only: the contrastive task keeps its difficulty
    state = dict(epoch=0, step=0, best=math.inf, bad_epochs=0, stopped=False)

    if resume and os.path.exists(ckpt_path):
        ckpt = load_checkpoint(ckpt_path)
        saved = {k: v for k, v in ckpt["config"].items() if k not in ("epochs", "device", "tensorboard", "out")}
        now = {k: v for k, v in dataclasses.asdict(cfg).items() if k in saved}
        if saved != now:
            diff = {k: (saved[k], now[k]) for k in saved if saved[k] != now.get(k)}
            raise TrainError(f"{ckpt_path}: --resume needs the arguments of the run; differing (saved, now): {diff}")
        model.load_state_dict(ckpt["model"])
        optimizer.load_state_dict(ckpt["optimizer"])
        state.update(ckpt["state"])
        torch.set_rng_state(ckpt["rng"]["torch"])
        if torch.cuda.is_available() and ckpt["rng"].get("cuda") is not None:
            torch.cuda.set_rng_state_all(ckpt["rng"]["cuda"])
        rewrite_log(log_path, state["epoch"])
        log(f"[{kind}] resumed at epoch {state['epoch']} of {cfg.epochs}")
    else:  # a fresh run: the log starts with the data it saw (a log of an earlier run here would mislead)
        with open(log_path, "w") as f:
            f.write(json.dumps({"data": data.name, "source": data.source, "task": data.task,
                                "samples": {s: len(sp.y) for s, sp in data.splits.items()},
                                "train_splits": splits, "nonfinite_set_to_0": data.nonfinite}) + "\n")

    writer = None
    if cfg.tensorboard:
        try:
            from torch.utils.tensorboard import SummaryWriter
        except ImportError:
            raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
        writer = SummaryWriter(os.path.join(out_dir, "tensorboard"))

    def autocast():  # bf16 on CUDA, off on CPU (fp32)
        return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")

    from tqdm import tqdm

    while state["epoch"] < cfg.epochs and not state["stopped"]:
        epoch = state["epoch"]
        model.train()
        order = torch.randperm(n, generator=torch.Generator().manual_seed(cfg.seed * 1_000_003 + epoch))
        start, seen, train_loss = time.perf_counter(), 0, 0.0
        for i in tqdm(range(steps_per_epoch), desc=f"{kind} epoch {epoch + 1}/{cfg.epochs}", leave=False,
                      disable=None, file=sys.stderr):
            lr = learning_rate(cfg, state["step"], steps_per_epoch)  # 1. set the learning rate
            for group in optimizer.param_groups:
                group["lr"] = lr
            batch = take(train, order[i * batch_size:(i + 1) * batch_size], device)
            with autocast():  # 2. forward, backward
                loss, _ = model(batch, data.task)
            loss.backward()
            nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)  # 3. clip
            optimizer.step()  # 4. step, zero the gradients
            optimizer.zero_grad(set_to_none=True)
            state["step"] += 1
            train_loss += loss.item()
            seen += batch_size
        seconds = time.perf_counter() - start
        val = evaluate(model, valid, data.task, batch_size, device, autocast)  # 5. evaluate
        state["epoch"] = epoch + 1
        improved = val["loss"] < state["best"]
        if improved:
            state["best"], state["bad_epochs"] = val["loss"], 0
            atomic_save({"model": model.state_dict(), "epoch": state["epoch"], "config": dataclasses.asdict(cfg),
                         "valid_loss": val["loss"]}, best_path)
        else:
            state["bad_epochs"] += 1
        state["stopped"] = state["bad_epochs"] >= cfg.patience  # 6. early stopping
        record = {"epoch": state["epoch"], "train_loss": train_loss / max(steps_per_epoch, 1),
                  "valid_loss": val["loss"], "lr": lr, "samples_per_s": seen / max(seconds, 1e-9),
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
            f"valid {val['loss']:.4f}{' *' if improved else '  '}  "
            + (f"t {record['temperature']:.4f}  " if kind == "pairwise_nce" else "")
            + f"{record['samples_per_s']:.0f} samples/s")
        rng = {"torch": torch.get_rng_state(),
               "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else None}
        atomic_save({"model": model.state_dict(), "optimizer": optimizer.state_dict(),  # 8. checkpoint
                     "scheduler": {"kind": cfg.schedule, "step": state["step"], "steps_per_epoch": steps_per_epoch},
                     "config": dataclasses.asdict(cfg), "state": dict(state), "rng": rng}, ckpt_path)
        if state["stopped"]:
            log(f"[{kind}] early stop: no better validation loss in {cfg.patience} epochs")
    if writer is not None:
        writer.close()
    if os.path.exists(best_path):
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

    cfg, resume = parse_config(argv)
    os.makedirs(cfg.out, exist_ok=True)
    data = data_mod.load(cfg.data, seed=cfg.data_seed)
    print(f"data: {data.name} ({data.source}), task {data.task}, "
          + ", ".join(f"{s} {len(sp.y)}" for s, sp in data.splits.items())
          + f"; device {device_of(cfg)}")
    models = {"pairwise_nce": fit(cfg, data, "pairwise_nce", cfg.out, resume)}
    if "random_init" in baselines(cfg):
        models["random_init"] = build(cfg, data, "pairwise_nce")
    if "supervised" in baselines(cfg):
        models["supervised"] = fit(cfg, data, "supervised", os.path.join(cfg.out, "supervised"), resume)
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
