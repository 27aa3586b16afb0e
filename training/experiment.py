"""The paper's experiment, ``fastpair-train``: label-free training, the baselines, the fusion probe.

    fastpair-train [--data synthetic|PATH] [--out DIR] [--epochs N] [--batch-size B] [--lr X] [--seed S]
                   [--device auto|cpu|cuda] [--resume] [--config FILE] [--transductive] [...]
    torchrun --nproc-per-node K -m fastpair.training.train [the same options]   # K ranks, B per rank
    fastpair-probe --run DIR [--data PATH]   # the probe again, on a finished run

1. Train an encoder and a projection head per modality of the data (``fastpair.training.modalities``:
   ``--encoder``, ``--pairs``) with pairwise_nce (learnable temperature; ``--label-smoothing``; or, with
   ``--objective sigmoid``, pairwise_sigmoid with a learnable temperature and bias) on the train split, no
   labels (``--transductive``: also on valid and test, as the authors' code did; ``--views 2``: two crops of
   every clip per step, ``fastpair.training.views``). Every epoch
   DIR/checkpoint.pt holds the full state and DIR/best.pt the model with the lowest validation loss
   (``fastpair.training.train``, ``fastpair.training.checkpoint``).
2. Baselines with the same architecture and seed: ``random_init`` (the untrained encoders) and
   ``supervised`` (encoders + a linear head on the fused features, trained with the labels for the same
   budget, in DIR/supervised/) (``fastpair.training.objectives``).
3. The fusion probe (``fastpair.training.probe``) on the frozen 512-d features of each encoder:
   DIR/results.json, DIR/results.png and the table on the terminal.

Options: ``fastpair.training.config``; under torchrun: ``fastpair.training.world``. A bad argument, data file
or run directory ends the command with one line ``fastpair-train: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import time

import torch
import torch.distributed as dist

from . import data as data_mod
from . import modalities
from .checkpoint import load_checkpoint, output_folder
from .config import Config, TrainError, baselines, parse_config, parser
from .data import DataError, to_tensors
from .models import MultimodalEncoder
from .objectives import LABEL_FREE, Objective, build
from .runlog import summary_writer
from .train import fit, take
from .world import World, agreed, check_same_run, device_of, process_group, torchrun_world

ENCODER_NAMES = ("pairwise_nce", "pairwise_sigmoid", "random_init", "supervised")  # the order of the results


def train_and_probe(argv) -> None:
    """fastpair-train's body: the data, the encoders of every objective and baseline, then the probe."""
    cfg, resume = parse_config(argv)  # argument errors: before any process group, on every rank alike
    launch = torchrun_world()
    if cfg.tensorboard:
        summary_writer()
    with process_group(cfg, launch) as world:
        data = load_data(cfg, resume, world)
        models = train_encoders(cfg, data, resume)
    # every rank has left the process group (rank 0 wrote every checkpoint before the last collective);
    # the probe runs on rank 0 alone, with no collective to time out while it fits
    if not world.main:
        return
    run_probe(cfg, data, models, cfg.out)
    print(f"wrote {os.path.join(cfg.out, 'results.json')} and results.png")


def load_data(cfg: Config, resume: bool, world: World):
    """The data set on every rank (the ranks checked to agree on it and on the options), described by rank 0."""
    with agreed(world):
        if world.main:
            output_folder(cfg.out)
        # the other ranks load the same data quietly (rank 0 reports NaN/inf counts and warnings)
        with contextlib.nullcontext() if world.main else contextlib.redirect_stderr(io.StringIO()):
            data = data_mod.load(cfg.data, seed=cfg.data_seed)
    check_same_run(cfg, resume, data, world)
    mods = modalities.of(cfg, data)  # --pairs and --encoder against the data's modalities: every rank, early
    ranks = ""
    if world.size > 1:
        ranks = (f"; {world.size} ranks ({dist.get_backend()}), batch {cfg.batch_size} per rank, "
                 f"{world.size * cfg.batch_size} in all")
    if world.main:
        print(f"data: {data.name} ({data.source}), task {data.task}, "
              + ", ".join(f"{s} {len(sp.y)}" for s, sp in data.splits.items())
              + f"; device {device_of(cfg)}{ranks}")
        shapes = {m: "x".join(map(str, data.splits["train"].x[m].shape[1:])) for m in mods.names}
        print("modalities: " + ", ".join(f"{m} ({shapes[m]}, {mods.kinds[m]})" for m in mods.names)
              + "; pairs: " + ", ".join(mods.pair_names()))
    return data


def train_encoders(cfg: Config, data, resume: bool) -> dict[str, Objective]:
    """The label-free objective's encoders (DIR) and the baselines': random_init, supervised (DIR/supervised)."""
    label_free = LABEL_FREE[cfg.objective]
    models = {label_free: fit(cfg, data, label_free, cfg.out, resume)}
    if "random_init" in baselines(cfg):
        models["random_init"] = build(cfg, data, label_free)  # the label-free model's initial weights, untrained
    if "supervised" in baselines(cfg):
        models["supervised"] = fit(cfg, data, "supervised", os.path.join(cfg.out, "supervised"), resume)
    return models


def probe_run(argv) -> None:
    p = parser("fastpair-probe", "Re-run the fusion probe on a trained run directory.")
    p.add_argument("--run", required=True, help="the --out folder of a fastpair-train run")
    p.add_argument("--data", help="the feature file (default: the run's own --data)")
    args = p.parse_args(argv)
    best = os.path.join(args.run, "best.pt")
    if not os.path.exists(best):
        raise TrainError(f"{best}: no such file (is {args.run} the --out folder of a fastpair-train run?)")
    output_folder(args.run, "--run")  # the results go there
    saved = load_checkpoint(best)
    cfg = Config(**{**saved["config"], **({"data": args.data} if getattr(args, "data", None) else {})})
    data = data_mod.load(cfg.data, seed=cfg.data_seed)
    models, label_free = {}, LABEL_FREE[cfg.objective]
    for name, path in ((label_free, best), ("supervised", os.path.join(args.run, "supervised", "best.pt"))):
        if os.path.exists(path):
            models[name] = build(cfg, data, name)
            try:
                models[name].load_state_dict(load_checkpoint(path)["model"])
            except RuntimeError as err:  # other modalities or feature sizes than the run was trained on
                raise TrainError(f"{path} does not fit --data {cfg.data} (modalities {', '.join(data.modalities)}, "
                                 f"features {data.dims}): {str(err).splitlines()[0]}") from None
    if "random_init" in baselines(cfg):
        models["random_init"] = build(cfg, data, label_free)
    run_probe(cfg, data, dict(sorted(models.items(), key=lambda kv: ENCODER_NAMES.index(kv[0]))), args.run)


@torch.no_grad()
def extract(encoder: MultimodalEncoder, tensors, device, batch_size: int = 256) -> dict:
    """Frozen 512-d features of one split: {modality: (N, 512) float32 numpy}, in the data's order."""
    encoder.eval()
    n = len(tensors["y"])
    chunks = {m: [] for m in encoder.modalities}
    for start in range(0, n, batch_size):
        feats = encoder.features(take(tensors, torch.arange(start, min(n, start + batch_size)), device))
        for m in encoder.modalities:
            chunks[m].append(feats[m].float().cpu())
    return {m: torch.cat(chunks[m]).numpy() for m in encoder.modalities}


def run_probe(cfg: Config, data, models: dict[str, Objective], out_dir: str, log=print) -> list[dict]:
    """Probe every encoder on every modality subset; writes results.json/.png, prints the table."""
    from . import probe  # scikit-learn: imported once the train extra is known to be there

    device = device_of(cfg)
    tensors = {s: to_tensors(data.splits[s]) for s in ("train", "valid", "test")}
    labels = {s: data.splits[s].y for s in tensors}
    rows = []
    for name, model in models.items():
        start = time.perf_counter()
        feats = {s: extract(model.encoder.to(device), tensors[s], device) for s in tensors}
        try:
            found = probe.probe(feats, labels, data.task, data.classes, dataset=data.name, seed=cfg.seed)
        except ValueError as err:  # data the probe cannot score (one class in train, every score 0, ...)
            raise TrainError(f"the probe cannot run on {data.source}: {err}") from None
        rows += [{"encoder": name, **row} for row in found]
        log(f"[probe] {name}: {time.perf_counter() - start:.1f} s")
    probe.write_results(out_dir, data.name, data.task, rows)
    print(probe.format_table(rows, data.task))
    return rows


# ---------------------------------------------------------------------------------------------- entry points

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
    try:
        _require_train_extra(prog)
        body(argv)
    except (TrainError, DataError) as err:
        print(f"{prog}: error: {err}", file=sys.stderr)
        return 2
    return 0


def main(argv=None) -> int:
    """``fastpair-train``: train, run the baselines and the probe. Returns the exit status."""
    return _run("fastpair-train", train_and_probe, argv)


def probe_main(argv=None) -> int:
    """``fastpair-probe --run DIR [--data PATH]``."""
    return _run("fastpair-probe", probe_run, argv)


if __name__ == "__main__":
    raise SystemExit(main())
