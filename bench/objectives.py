"""The label-free objectives against each other on real data: pairwise InfoNCE, sigmoid and GRAM, with the
untrained and the supervised encoders, probe accuracy on every modality subset over several seeds.

    python -m bench.objectives [--data digits cancer] [--seeds 0 1 2] [--out bench/results]

Data sets shipped with scikit-learn (no download): ``digits`` (fastpair.training.digits: 1,797 images, four
quadrants, 10 classes) and ``cancer`` (fastpair.training.cancer: 569 aspirates, the mean, standard error and
worst of ten nuclear measurements, 2 classes). Per data set and seed s: the .npz with split seed s, then
``fastpair-train --seed s`` three times with the same encoders, epochs and options otherwise (the defaults:
40 epochs at most, early stopping):

    --objective nce                                   pairwise_nce, and the baselines random_init, supervised
    --objective sigmoid --temperature 0.1 --baselines ""      pairwise_sigmoid (SigLIP's initial t)
    --objective gram --baselines ""                   gram_nce, the data's first modality as the anchor

Each run's probe (scikit-learn's logistic regression on the frozen features, fastpair.training.probe) gives
the test accuracy of every modality subset. Writes OUT/objectives-<device>-<date>.{json,md}: per data set,
subset and encoder the mean and the standard deviation over the seeds (ddof 1), and which encoder is best
on average. The runs' folders are temporary.
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results")
WRITERS = {"digits": "fastpair.training.digits", "cancer": "fastpair.training.cancer"}
RUNS = [("nce", []), ("sigmoid", ["--temperature", "0.1", "--baselines", ""]), ("gram", ["--baselines", ""])]
ENCODERS = ("pairwise_nce", "pairwise_sigmoid", "gram_nce", "random_init", "supervised")
TRAIN = "from fastpair.training.cli import main; raise SystemExit(main())"


def run_seed(data: str, seed: int, work: str, extra: list[str]) -> list[dict]:
    """Every objective on data set ``data`` with split and training seed ``seed``: the probe rows of all."""
    path = os.path.join(work, f"{data}-{seed}.npz")
    _check([sys.executable, "-m", WRITERS[data], path, "--seed", str(seed)])
    rows = []
    for objective, options in RUNS:
        out = os.path.join(work, f"{data}-{seed}-{objective}")
        start = time.perf_counter()
        _check([sys.executable, "-c", TRAIN, "--data", path, "--out", out, "--seed", str(seed), "--objective",
                objective, "--device", "cpu", *options, *extra])
        print(f"{data} seed {seed} {objective}: {time.perf_counter() - start:.0f} s", file=sys.stderr, flush=True)
        with open(os.path.join(out, "results.json")) as f:
            rows += json.load(f)["rows"]
    return rows


def _check(cmd: list[str]) -> None:
    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-1500:]}")


def summarize(runs: dict[int, list[dict]]) -> list[dict]:
    """[{modalities, encoder, mean, std, seeds}] of the test accuracy over the seeds, per subset and encoder."""
    by_key: dict[tuple, list[float]] = {}
    for rows in runs.values():
        for r in rows:
            by_key.setdefault((tuple(r["modalities"]), r["encoder"]), []).append(r["metrics"]["accuracy"])
    out = []
    for (mods, encoder), values in by_key.items():
        out.append(dict(modalities=list(mods), encoder=encoder, mean=statistics.fmean(values),
                        std=statistics.stdev(values) if len(values) > 1 else 0.0, seeds=len(values)))
    return out


def markdown(meta: dict, results: dict) -> str:
    lines = [f"# The objectives on real data, {meta['device']}, {meta['date']}", "",
             f"{meta['cpu']}, torch {meta['torch']}, fastpair {meta['fastpair']}, commit {meta['commit']}; "
             f"`python -m bench.objectives --seeds {' '.join(map(str, meta['seeds']))}` (bench/objectives.py says "
             f"how). Test accuracy (%) of the fusion probe, mean ± standard deviation over "
             f"{len(meta['seeds'])} seeds (split and training); the best mean of a row in bold.", ""]
    for data, rows in results.items():
        lines += [f"## {data}", "", "| modalities | " + " | ".join(ENCODERS) + " |",
                  "|---|" + "---:|" * len(ENCODERS)]
        subsets = sorted({tuple(r["modalities"]) for r in rows}, key=lambda m: (len(m), m))
        for mods in subsets:
            cells = {r["encoder"]: r for r in rows if tuple(r["modalities"]) == mods}
            best = max(c["mean"] for c in cells.values())
            lines.append(f"| {' '.join(mods)} | " + " | ".join(_cell(cells.get(e), best) for e in ENCODERS) + " |")
        lines += ["", *verdict(rows), ""]
    return "\n".join(lines)


def _cell(r: dict | None, best: float) -> str:
    if r is None:
        return "-"
    text = f"{100 * r['mean']:.1f} ± {100 * r['std']:.1f}"
    return f"**{text}**" if r["mean"] == best else text


def verdict(rows: list[dict]) -> list[str]:
    """The mean over the subsets per encoder, on all modalities, and how often each encoder is best (a tie
    counts for every encoder in it)."""
    subsets = {tuple(r["modalities"]) for r in rows}
    full = max(subsets, key=len)
    lines = []
    for e in ENCODERS:
        mine = [r for r in rows if r["encoder"] == e]
        if not mine:
            continue
        mean = statistics.fmean(r["mean"] for r in mine)
        at_full = next(r for r in mine if tuple(r["modalities"]) == full)
        wins = sum(r["mean"] == max(o["mean"] for o in rows if o["modalities"] == r["modalities"]) for r in mine)
        lines.append(f"- {e}: mean over the {len(subsets)} subsets {100 * mean:.1f}%; all modalities "
                     f"{100 * at_full['mean']:.1f} ± {100 * at_full['std']:.1f}%; best in {wins} of {len(subsets)}")
    return lines


def _meta(seeds) -> dict:
    import torch

    import fastpair
    from bench.provenance import commit, cpu_name

    return dict(device="cpu", cpu=cpu_name(), torch=torch.__version__, fastpair=fastpair.__version__,
                commit=commit(), date=datetime.date.today().isoformat(), seeds=list(seeds))


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--data", nargs="+", default=list(WRITERS), choices=list(WRITERS))
    parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--train-args", default="", help="more fastpair-train options for every run (a smoke "
                        "run: --train-args='--epochs 1')")
    args = parser.parse_args(argv)
    results, raw = {}, {}
    with tempfile.TemporaryDirectory() as work:
        for data in args.data:
            runs = {s: run_seed(data, s, work, args.train_args.split()) for s in args.seeds}
            raw[data], results[data] = runs, summarize(runs)
    meta = _meta(args.seeds)
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"objectives-cpu-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, train_args=args.train_args, results=results, runs=raw), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(meta, results))
    for data, rows in results.items():
        print(data, *verdict(rows), sep="\n")
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
