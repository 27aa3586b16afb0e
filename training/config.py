"""fastpair-train's options: the Config dataclass, its command line and ``--config FILE``, and their checks.

Precedence: the dataclass defaults < ``--config FILE`` (JSON or TOML, option names with underscores) <
explicit options. A bad value is a :class:`TrainError`: one line on stderr, exit status 2, found before any
process group starts (so every torchrun rank prints the same line).

Torch-free (the standard library and ``names`` only): ``fastpair.training.cli`` parses and checks the options
here before torch is imported, so ``--help`` and a bad option answer at once. The one check that needs torch,
``--device cuda`` without a CUDA device, is ``world.check_device``, made before the data is loaded.

Each option's help text and, for a fixed set of values, its choices live in its field's metadata (``option``).
``--help`` shows the dataclass default written into the help text, not given to argparse: the parser has
``argument_default=SUPPRESS`` so that an option left out stays absent and the --config file's value holds.
The choices are checked by ``check_config``, not by argparse's ``choices=``, so that a value from the command
line and one from a --config file get the same one-line error. Abbreviated options are refused
(``allow_abbrev=False``: ``--epoch 1`` is no ``--epochs``), and argparse's own errors are TrainErrors too.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import math
from dataclasses import dataclass, field

from .names import ENCODER_KINDS

DESCRIPTION = ("Label-free training with pairwise_nce (or pairwise_sigmoid, gram_nce), the baselines, and the fusion "
               "probe. Options: the defaults below < --config FILE < the options given.")
BASELINES = ("random_init", "supervised")


def option(default, help: str, choices: tuple = (), metavar: str | None = None):
    """A Config field with its --help text and, for a fixed set of values, its choices."""
    return field(default=default, metadata={"help": help, "choices": choices, "metavar": metavar})


@dataclass
class Config:
    data: str = option("synthetic", "'synthetic' (built in, no download) or a feature file: a MulT or MMSA "
                       "pickle, or an .npz", metavar="synthetic|PATH")
    out: str = option("runs/fastpair", "the run folder: checkpoints, log.jsonl, results.json/.png; new or empty "
                      "unless --resume or --overwrite", metavar="DIR")
    epochs: int = option(40, "epochs in all, also when resuming", metavar="N")
    batch_size: int = option(128, "samples per step (per rank under torchrun), the negatives of each sample",
                             metavar="B")
    chunk_size: int = option(0, "run the encoders on chunks of this many samples (gradient caching, "
                             "fastpair.GradCache): batches larger than their activations fit in memory, with the "
                             "same gradients; 0: whole batches; label-free objectives only", metavar="C")
    lr: float = option(1e-3, "the peak learning rate", metavar="X")
    optimizer: str = option("adamw", "sgd: with momentum 0.9 (the paper's)", choices=("adamw", "sgd"))
    weight_decay: float = option(0.01, "on weight matrices only (the paper's SGD used 1e-3)", metavar="X")
    schedule: str = option("cosine", "cosine: a one-epoch linear warmup, then per-step cosine to lr/10; step: "
                           "x0.9 every 5 epochs", choices=("cosine", "step"))
    grad_clip: float = option(1.0, "the largest gradient norm of a step", metavar="X")
    patience: int = option(10, "early stopping: epochs without a better validation loss", metavar="N")
    objective: str = option("nce", "the label-free loss: nce (pairwise_nce, the paper's), sigmoid "
                            "(pairwise_sigmoid) or gram (gram_nce: all modalities at once)",
                            choices=("nce", "sigmoid", "gram"))
    anchor: str = option("", "--objective gram's anchor modality, whose samples are contrasted with the tuples "
                         "of the others; default: the data's first", metavar="NAME")
    temperature: float = option(0.07, "the initial temperature, learned (SigLIP starts the sigmoid objective at "
                                "0.1)", metavar="T")
    bias: float = option(-10.0, "the sigmoid objective's initial bias b, learned", metavar="B")
    pairs: str = option("all", "the loss's modality pairs: all, anchor:NAME (NAME with every other) or A-B,C-D",
                        metavar="SPEC")
    label_smoothing: float = option(0.0, "pairwise_nce's or gram_nce's label smoothing, in [0, 1)", metavar="X")
    views: int = option(1, "2: two random temporal crops of every clip per step, positives by clip (the "
                        "authors')", choices=(1, 2))
    crop_length: int = option(0, "time steps per crop with --views 2; 0: half of each modality's time axis",
                              metavar="N")
    encoder: str = option("", f"one modality's encoder, repeatable; KIND: {', '.join(ENCODER_KINDS)}; the others "
                          "by role (text transformer, audio tcn, vision gru, another sequence transformer, a "
                          "vector mlp)", metavar="NAME=KIND")
    width: int = option(128, "encoder width, a multiple of 4 (the paper's text Transformer: 300)", metavar="N")
    layers: int = option(2, "encoder layers", metavar="N")
    dropout: float = option(0.1, "in the encoders and before the projection heads", metavar="P")
    seed: int = option(0, "the training seed: weights, data order, dropout", metavar="S")
    data_seed: int = option(0, "the synthetic data's seed (the same data for every training seed)", metavar="S")
    device: str = option("auto", "auto: cuda where available, else cpu", choices=("auto", "cpu", "cuda"))
    transductive: bool = option(False, "label-free training also on valid and test (the authors' setting)")
    baselines: str = option("random_init,supervised", "a comma-separated subset of random_init, supervised; '' "
                            "for none", metavar="LIST")
    tensorboard: bool = option(False, "also log to DIR/tensorboard")


@dataclass
class Command:
    """fastpair-train's parsed command line: the options, and how to treat a --out that holds a run."""

    cfg: Config
    resume: bool = False  # continue the run in --out from its checkpoint
    overwrite: bool = False  # delete the run in --out and start afresh


class TrainError(ValueError):
    """A bad argument or run directory: one line on stderr, exit status 2."""


class _Parser(argparse.ArgumentParser):
    """argparse without abbreviations, and with its errors as TrainErrors: one line, like every error of the
    command lines (argparse would print the whole usage of some 30 options first)."""

    def error(self, message: str):
        raise TrainError(f"{message} (see {self.prog} --help)")


def parser(prog: str, description: str, epilog: str | None = None) -> argparse.ArgumentParser:
    """An option left out is absent from the parsed namespace (not set to a default): the layers above apply."""
    return _Parser(prog=prog, description=description, epilog=epilog, argument_default=argparse.SUPPRESS,
                   allow_abbrev=False)


def flag(name: str) -> str:
    """A Config field's option: "batch_size" -> "--batch-size"."""
    return "--" + name.replace("_", "-")


def _help(f: dataclasses.Field) -> str:
    """The field's help text with its default ('%' doubled: argparse formats help texts with %)."""
    default = {True: "on", False: "off", "": "none"}.get(f.default, f.default) if f.type in ("bool", "str") \
        else f.default
    return f"{f.metadata['help']} (default: {default})".replace("%", "%%")


def train_parser() -> argparse.ArgumentParser:
    """fastpair-train's parser: an option per Config field, then --resume / --overwrite and --config."""
    p = parser("fastpair-train", DESCRIPTION)
    for f in dataclasses.fields(Config):
        choices = f.metadata["choices"]
        metavar = "{" + ",".join(map(str, choices)) + "}" if choices else f.metadata["metavar"]
        if f.type == "bool":
            p.add_argument(flag(f.name), action="store_true", help=_help(f))
        elif f.name == "encoder":  # repeatable: --encoder text=gru --encoder pose=mlp
            p.add_argument(flag(f.name), action="append", metavar=metavar, help=_help(f))
        else:
            p.add_argument(flag(f.name), type={"int": int, "float": float}.get(f.type, str), metavar=metavar,
                           help=_help(f))
    start = p.add_mutually_exclusive_group()
    start.add_argument("--resume", action="store_true", help="continue the run in --out from its checkpoint "
                       "(afresh where it has none)")
    start.add_argument("--overwrite", action="store_true", help="delete the run in --out (its checkpoints, logs, "
                       "results, supervised/ and tensorboard/; other files stay) and start afresh")
    p.add_argument("--config", metavar="FILE", help="a JSON or TOML file of the options above (names with "
                   "underscores); the options given on the command line win")
    return p


def parse_command(argv) -> Command:
    """fastpair-train's command line: Config from dataclass defaults < ``--config FILE`` (JSON or TOML) <
    explicit options, checked; and --resume / --overwrite."""
    args = vars(train_parser().parse_args(argv))
    resume, overwrite = args.pop("resume", False), args.pop("overwrite", False)
    values = read_config_file(args.pop("config")) if "config" in args else {}
    if "encoder" in args:
        args["encoder"] = ",".join(args["encoder"])
    values.update(args)
    try:
        cfg = Config(**values)
    except TypeError as err:
        raise TrainError(f"config: {err}") from None
    check_config(cfg)
    return Command(cfg, resume, overwrite)


def parse_config(argv) -> tuple[Config, bool]:
    """(Config, --resume) of a fastpair-train command line (``parse_command``)."""
    command = parse_command(argv)
    return command.cfg, command.resume


def parse_probe(argv) -> argparse.Namespace:
    """fastpair-probe's command line: run, and data (None: the run's own)."""
    p = parser("fastpair-probe", "Re-run the fusion probe on a trained run directory; writes DIR/results.json "
               "and results.png.")
    p.add_argument("--run", required=True, metavar="DIR", help="the --out folder of a fastpair-train run")
    p.add_argument("--data", metavar="synthetic|PATH", help="the data to probe on (default: the run's own --data)")
    args = p.parse_args(argv)
    args.data = getattr(args, "data", None)
    return args


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


def _either(choices) -> str:
    """("a", "b", "c") -> "a, b or c"."""
    words = [str(c) for c in choices]
    return ", ".join(words[:-1]) + " or " + words[-1]


def check_config(cfg: Config) -> None:
    """Every check an option's value allows without the data (names against the data: ``modalities``) and
    without torch (``--device cuda``: ``world.check_device``)."""
    def need(ok, what):
        if not ok:
            raise TrainError(what)

    for f in dataclasses.fields(Config):
        value, choices = getattr(cfg, f.name), f.metadata["choices"]
        if choices:
            need(value in choices, f"{flag(f.name)} must be {_either(choices)}, got {value!r}")
    need(cfg.epochs >= 1, f"--epochs must be >= 1, got {cfg.epochs}")
    need(cfg.batch_size >= 2, f"--batch-size must be >= 2 (a contrastive batch), got {cfg.batch_size}")
    need(cfg.chunk_size >= 0, f"--chunk-size must be >= 0 (0: whole batches), got {cfg.chunk_size}")
    need(cfg.lr > 0 and math.isfinite(cfg.lr), f"--lr must be a finite number > 0, got {cfg.lr}")
    need(cfg.temperature > 0, f"--temperature must be > 0, got {cfg.temperature}")
    need(math.isfinite(cfg.bias), f"--bias must be a finite number, got {cfg.bias}")
    need(0.0 <= cfg.label_smoothing < 1.0, f"--label-smoothing must be in [0, 1), got {cfg.label_smoothing}")
    need(cfg.label_smoothing == 0.0 or cfg.objective in ("nce", "gram"),
         "--label-smoothing applies to --objective nce or gram (the sigmoid objective has none)")
    need(not cfg.anchor or cfg.objective == "gram", "--anchor applies to --objective gram (the pairwise "
         "objectives take --pairs anchor:NAME)")
    need(cfg.pairs == "all" or cfg.objective != "gram", "--pairs applies to the pairwise objectives; --objective "
         "gram scores all modalities at once (its anchor: --anchor)")
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
    """--encoder "NAME=KIND,..." -> {NAME: KIND} (KIND one of ENCODER_KINDS; names checked against the data
    later)."""
    kinds: dict[str, str] = {}
    for item in filter(None, (part.strip() for part in text.split(","))):
        name, eq, kind = item.partition("=")
        if not eq or not name or kind not in ENCODER_KINDS:
            raise TrainError(f"--encoder: NAME=KIND with KIND one of {', '.join(ENCODER_KINDS)} expected, "
                             f"got {item!r}")
        if name in kinds:
            raise TrainError(f"--encoder: {name} is given twice")
        kinds[name] = kind
    return kinds
