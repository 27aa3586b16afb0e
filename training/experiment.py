"""The paper's experiment, ``fastpair-train``: label-free training, the baselines, the fusion probe.

    fastpair-train [--data synthetic|PATH] [--out DIR] [--epochs N] [--batch-size B] [--lr X] [--seed S]
                   [--device auto|cpu|cuda] [--resume | --overwrite] [--config FILE] [--transductive] [...]
    torchrun --nproc-per-node K -m fastpair.training.train [the same options]   # K ranks, B per rank
    fastpair-probe --run DIR [--data PATH]   # the probe again, on a finished run

1. Train an encoder and a projection head per modality of the data (``fastpair.training.modalities``:
   ``--encoder``, ``--pairs``) with pairwise_nce (learnable temperature; ``--label-smoothing``; or, with
   ``--objective sigmoid``, pairwise_sigmoid with a learnable temperature and bias; with ``--objective gram``,
   gram_nce with a learnable temperature and ``--anchor``) on the train split, no
   labels (``--transductive``: also on valid and test, as the authors' code did; ``--views 2``: two crops of
   every clip per step, ``fastpair.training.views``). Every epoch
   DIR/checkpoint.pt holds the full state and DIR/best.pt the model with the lowest validation loss
   (``fastpair.training.train``, ``fastpair.training.checkpoint``).
2. Baselines with the same architecture and seed: ``random_init`` (the untrained encoders) and
   ``supervised`` (encoders + a linear head on the fused features, trained with the labels for the same
   budget, in DIR/supervised/) (``fastpair.training.objectives``).
3. The fusion probe (``fastpair.training.probe``) on the frozen 512-d features of each encoder:
   DIR/results.json (with the options, the versions, the device, the date and the epochs trained:
   ``provenance``), DIR/results.png and the table on the terminal; which files it wrote (and replaced).

The command lines: ``fastpair.training.cli`` (options parsed and checked before torch is imported), options:
``fastpair.training.config``; under torchrun: ``fastpair.training.world``. --out must be new or empty unless
``--resume`` or ``--overwrite`` (``checkpoint.claim_folder``). Progress goes to stderr
(``fastpair.training.progress``). A bad argument, data file or run directory ends the command with one line
``fastpair-train: error: ...`` on stderr and exit status 2.
"""

from __future__ import annotations

import contextlib
import dataclasses
import io
import os
import time
from datetime import datetime

import torch
import torch.distributed as dist

from . import data as data_mod
from . import modalities
from .checkpoint import claim_folder, epochs_of, load_checkpoint, output_folder
from .config import Command, Config, TrainError, baselines
from .data import to_tensors
from .models import MultimodalEncoder, input_features
from .objectives import LABEL_FREE, Objective, build
from .progress import Progress
from .runlog import summary_writer
from .train import fit, take
from .world import World, agreed, check_device, check_same_run, device_of, process_group, torchrun_world

# the order of the results
ENCODER_NAMES = ("pairwise_nce", "pairwise_sigmoid", "gram_nce", "random_init", "supervised")


def train_and_probe(command: Command) -> None:
    """fastpair-train's body: the data, the encoders of every objective and baseline, then the probe."""
    cfg = command.cfg
    check_device(cfg)  # the option errors that need torch: before any process group, on every rank alike
    launch = torchrun_world()
    if cfg.tensorboard:
        summary_writer()
    with process_group(cfg, launch) as world:
        data = load_data(cfg, command, world)
        models = train_encoders(cfg, data, command.resume)
    # every rank has left the process group (rank 0 wrote every checkpoint before the last collective);
    # the probe runs on rank 0 alone, with no collective to time out while it fits
    if not world.main:
        return
    run_probe(cfg, data, models, cfg.out)


def load_data(cfg: Config, command: Command, world: World):
    """The data set on every rank (the ranks checked to agree on it and on the options), described by rank 0;
    rank 0 first makes sure that --out may take the run (``checkpoint.claim_folder``)."""
    with agreed(world):
        if world.main:
            output_folder(cfg.out)
            claim_folder(cfg.out, command.resume, command.overwrite)
        # the other ranks load the same data quietly (rank 0 reports NaN/inf counts and warnings)
        with contextlib.nullcontext() if world.main else contextlib.redirect_stderr(io.StringIO()):
            data = data_mod.load(cfg.data, seed=cfg.data_seed)
    check_same_run(cfg, command.resume, data, world)
    mods = modalities.of(cfg, data)  # --pairs and --encoder against the data's modalities: every rank, early
    chunks = f" in chunks of {cfg.chunk_size}" if cfg.chunk_size else ""
    ranks = f"; batch {cfg.batch_size}{chunks}"
    if world.size > 1:
        ranks = (f"; {world.size} ranks ({dist.get_backend()}), batch {cfg.batch_size} per rank{chunks}, "
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


def probe_run(args) -> None:
    """fastpair-probe's body (``args``: ``config.parse_probe``'s run and data)."""
    best = os.path.join(args.run, "best.pt")
    if not os.path.exists(best):
        raise TrainError(f"{best}: no such file (is {args.run} the --out folder of a fastpair-train run?)")
    output_folder(args.run, "--run")  # the results go there
    saved = load_checkpoint(best)
    # the run's options; results.json records the data probed and the folder as they are now
    cfg = Config(**{**saved["config"], "out": args.run, **({"data": args.data} if args.data else {})})
    data = data_mod.load(cfg.data, seed=cfg.data_seed)
    models, label_free = {}, LABEL_FREE[cfg.objective]
    for name, path in ((label_free, best), ("supervised", os.path.join(args.run, "supervised", "best.pt"))):
        if os.path.exists(path):
            models[name] = build(cfg, data, name)
            state = load_checkpoint(path)["model"]
            try:
                models[name].load_state_dict(state)
            except RuntimeError:  # other modalities or feature sizes than the run was trained on
                raise TrainError(mismatch(path, state, models[name], saved["config"]["data"], cfg.data,
                                          data.dims)) from None
    if "random_init" in baselines(cfg):
        models["random_init"] = build(cfg, data, label_free)
    run_probe(cfg, data, dict(sorted(models.items(), key=lambda kv: ENCODER_NAMES.index(kv[0]))), args.run)


def mismatch(path: str, state: dict, model: Objective, trained_on: str, data_spec: str, dims: dict) -> str:
    """Why the checkpoint ``path`` does not fit ``model`` (built for the data ``data_spec`` of features
    ``dims``), in one line: the modalities and feature sizes its encoders take against the data's, or, where
    those agree, the weights that differ (other encoder kinds: a modality a sequence in one, a vector in the
    other)."""
    def spell(features):
        return ", ".join(f"{m} ({f})" for m, f in features.items())

    saved = input_features(state)
    head = f"{path} does not fit --data {data_spec}"
    if saved != dims:
        return (f"{head}: the run (trained on {trained_on}) has encoders for the features {spell(saved)}; "
                f"the data has {spell(dims)}")
    now = model.state_dict()
    differ = sorted(k for k in set(now) | set(state)
                    if k not in now or k not in state or now[k].shape != state[k].shape)
    return (f"{head}: the same modalities and feature sizes ({spell(dims)}), but other encoders than the run's "
            f"(trained on {trained_on}): {len(differ)} weights differ" + (f", e.g. {differ[0]}" if differ else ""))


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
    """Probe every encoder on every modality subset (a progress line per fit); writes results.json/.png (saying
    so, and whether they replaced earlier ones), prints the table."""
    from . import probe  # scikit-learn: imported once the train extra is known to be there

    device = device_of(cfg)
    tensors = {s: to_tensors(data.splits[s]) for s in ("train", "valid", "test")}
    labels = {s: data.splits[s].y for s in tensors}
    fits = Progress(len(models) * len(probe.subsets(data.modalities)), "[probe]", "fits", interval=0)
    rows = []
    for name, model in models.items():
        start = time.perf_counter()
        feats = {s: extract(model.encoder.to(device), tensors[s], device) for s in tensors}
        try:
            found = probe.probe(feats, labels, data.task, data.classes, dataset=data.name, seed=cfg.seed,
                                on_fit=lambda subset, name=name: fits.update(
                                    f"{name} {probe.subset_label(subset, data.modalities)}"))
        except ValueError as err:  # data the probe cannot score (one class in train, every score 0, ...)
            raise TrainError(f"the probe cannot run on {data.source}: {err}") from None
        rows += [{"encoder": name, **row} for row in found]
        log(f"[probe] {name}: {time.perf_counter() - start:.1f} s")
    fits.close()
    paths = [os.path.join(out_dir, f"results.{ext}") for ext in ("json", "png")]
    earlier = [os.path.exists(p) for p in paths]
    probe.write_results(out_dir, data.name, data.task, rows, meta=provenance(cfg, models, out_dir, device))
    for path, replaced in zip(paths, earlier):
        log(f"wrote {path}" + (" (replaced the earlier one)" if replaced else ""))
    print(probe.format_table(rows, data.task))
    return rows


def provenance(cfg: Config, models: dict, out_dir: str, device: torch.device) -> dict:
    """results.json's record of how its numbers came about: the options, the versions, the device, the date,
    and per encoder the epochs trained and the epoch of the weights probed (from the checkpoints; 0 for
    random_init)."""
    import sklearn

    from fastpair import __version__

    folders = {LABEL_FREE[cfg.objective]: out_dir, "supervised": os.path.join(out_dir, "supervised")}
    epochs = {name: epochs_of(folders[name]) if name in folders else {"trained": 0, "best": 0} for name in models}
    return {"config": dataclasses.asdict(cfg),
            "versions": {"fastpair": __version__, "torch": torch.__version__, "scikit-learn": sklearn.__version__},
            "device": torch.cuda.get_device_name(device) if device.type == "cuda" else str(device),
            "date": datetime.now().astimezone().isoformat(timespec="seconds"), "epochs": epochs}


# ---------------------------------------------------------------------------------------------- entry points

def require_train_extra(prog: str) -> None:
    missing = []
    for module in ("sklearn", "matplotlib", "tqdm"):
        try:
            __import__(module)
        except ImportError:
            missing.append(module)
    if missing:
        raise TrainError(f"{prog} needs the train extra (missing {', '.join(missing)}): "
                         f"pip install 'fastpair[train]'")


def main(argv=None) -> int:
    """``fastpair-train`` (``fastpair.training.cli.main``). Returns the exit status."""
    from .cli import main

    return main(argv)


def probe_main(argv=None) -> int:
    """``fastpair-probe`` (``fastpair.training.cli.probe_main``). Returns the exit status."""
    from .cli import probe_main

    return probe_main(argv)


if __name__ == "__main__":
    raise SystemExit(main())
