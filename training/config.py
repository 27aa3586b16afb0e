"""fastpair-train's options: the Config dataclass, its command line and ``--config FILE``, and their checks.

Precedence: the dataclass defaults < ``--config FILE`` (JSON or TOML, option names with underscores) <
explicit options. A bad value is a :class:`TrainError`: one line on stderr, exit status 2, found before any
process group starts (so every torchrun rank prints the same line).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass

import torch

from .models import ENCODERS

DESCRIPTION = ("Label-free training with pairwise_nce (or pairwise_sigmoid), the baselines, and the fusion probe: "
               "``fastpair-train``.")
BASELINES = ("random_init", "supervised")


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
    objective: str = "nce"  # the label-free loss: "nce" (pairwise_nce, the paper's) or "sigmoid" (pairwise_sigmoid)
    temperature: float = 0.07  # initial; learned (SigLIP initializes the sigmoid objective at 0.1)
    bias: float = -10.0  # the sigmoid objective's initial b; learned
    pairs: str = "all"  # the loss's pairs: "all", "anchor:NAME" (NAME with every other) or "A-B,C-D"
    label_smoothing: float = 0.0  # pairwise_nce's, in [0, 1)
    views: int = 1  # 2: two random temporal crops of every clip per step, positives by clip (the authors')
    crop_length: int = 0  # steps per crop with --views 2; 0: half of each modality's time axis
    encoder: str = ""  # per modality "NAME=transformer|tcn|gru|mlp", comma-separated; the rest by default
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


def parser(prog: str, description: str) -> argparse.ArgumentParser:
    """An option left out is absent from the parsed namespace (not set to a default): the layers above apply."""
    return argparse.ArgumentParser(prog=prog, description=description, argument_default=argparse.SUPPRESS)


def parse_config(argv) -> tuple[Config, bool]:
    """Config from dataclass defaults < ``--config FILE`` (JSON or TOML) < explicit options; and --resume."""
    p = parser("fastpair-train", DESCRIPTION)
    for f in dataclasses.fields(Config):
        flag = "--" + f.name.replace("_", "-")
        if f.type == "bool":
            p.add_argument(flag, action="store_true")
        elif f.name == "encoder":  # repeatable: --encoder text=gru --encoder pose=mlp
            p.add_argument(flag, action="append", metavar="NAME=KIND")
        else:
            p.add_argument(flag, type={"int": int, "float": float}.get(f.type, str))
    p.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint")
    p.add_argument("--config", help="a JSON or TOML file of the options above (names with underscores)")
    args = vars(p.parse_args(argv))
    resume = args.pop("resume", False)
    values = read_config_file(args.pop("config")) if "config" in args else {}
    if "encoder" in args:
        args["encoder"] = ",".join(args["encoder"])
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
    if isinstance(values.get("encoder"), list) and all(isinstance(e, str) for e in values["encoder"]):
        values["encoder"] = ",".join(values["encoder"])  # the repeatable --encoder, as a list
    for f in dataclasses.fields(Config):
        value = values.get(f.name)
        kinds = {"int": (int,), "float": (int, float), "bool": (bool,), "str": (str,)}[f.type]
        if f.name in values and (not isinstance(value, kinds) or (isinstance(value, bool) and f.type != "bool")):
            raise TrainError(f"{path}: {f.name} must be {f.type}, got {value!r}")
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
    need(cfg.objective in ("nce", "sigmoid"), f"--objective must be nce or sigmoid, got {cfg.objective!r}")
    need(cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}")
    need(math.isfinite(cfg.bias), f"--bias must be a finite number, got {cfg.bias}")
    need(0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.label_smoothing == 0.0 or cfg.objective == "nce",
         "--label-smoothing applies to --objective nce (the sigmoid objective has none)")
    need(cfg.views in (1, 2), f"--views must be 1 or 2, got {cfg.views}")
    need(cfg.crop_length >= 0, f"--crop-length must be >= 0 (0: half of each time axis), got {cfg.crop_length}")
    pair_spec(cfg.pairs)
    encoder_spec(cfg.encoder)
    need(cfg.width >= 2 and cfg.width % 4 == 0, f"--width must be a multiple of 4 (4 heads), got {cfg.width}")
    need(cfg.layers >= 1 and cfg.patience >= 1, "--layers and --patience must be >= 1")
    bad = set(baselines(cfg)) - set(BASELINES)
    need(not bad, f"--baselines: random_init and/or supervised expected, got {sorted(bad)}")


def baselines(cfg: Config) -> list[str]:
    return [b.strip() for b in cfg.baselines.split(",") if b.strip()]


def pair_spec(text: str) -> str | list[tuple[str, str]]:
    """--pairs: "all"; "anchor:NAME" -> NAME; "A-B,C-D" -> [("A", "B"), ("C", "D")] (names checked against the
    data later, by ``fastpair.training.modalities``)."""
    if text == "all":
        return "all"
    if text.startswith("anchor:") and text[len("anchor:"):]:
        return text[len("anchor:"):]
    pairs = [tuple(item.split("-")) for item in text.split(",")]
    if not all(len(p) == 2 and all(p) for p in pairs):
        raise TrainError(f"--pairs: 'all', 'anchor:NAME' or 'A-B,C-D' (modality names) expected, got {text!r}")
    return pairs


def encoder_spec(text: str) -> dict[str, str]:
    """--encoder "NAME=KIND,..." -> {NAME: KIND} (KIND one of ENCODERS; names checked against the data later)."""
    kinds: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, kind = item.partition("=")
        if not eq or not name or kind not in ENCODERS:
            raise TrainError(f"--encoder: NAME=KIND with KIND one of {', '.join(ENCODERS)} expected, got {item!r}")
        if name in kinds:
            raise TrainError(f"--encoder: {name} is given twice")
        kinds[name] = kind
    return kinds
