"""Peak memory of a MOSEI-sized fastpair-train run: is the data held once?

    python -m bench.train_memory [--out bench/results] [--keep DIR]
    python -m bench.train_memory --write FILE      (the data alone; what the measurement runs first)

Writes a synthetic .npz the size of MulT's MOSEI file (random features, which is all memory depends on):
train / valid / test 16326 / 1871 / 4659 clips, text (50, 300), audio (50, 74), vision (50, 35), sentiment
scores in [-3, 3]; about 1.9 GB of float32 features. Then runs, in a child process,

    fastpair-train --data FILE --epochs 1 --batch-size 326 --baselines "" --device cpu

(326 clips per batch: 50 training steps; validation, checkpoints, and the probe on all 22856 clips), and
reports the child's own peak resident memory (getrusage(RUSAGE_SELF).ru_maxrss, read in the child) next to
the size of the features and to the peak of a child that only imports torch and fastpair, into
OUT/train-memory-<device>-<date>.json/.md.
Each is a child of this small process (the data is written by a child too): a child forked from a process
holding the data would count the parent's pages in its own peak until it execs.
The data is held once when the peak stays near features + interpreter + the model's working memory (a
copy per epoch, per objective or per split concatenation would add a multiple of 1.9 GB).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import platform
import subprocess
import sys
import tempfile

import numpy as np

SPLITS = {"train": 16326, "valid": 1871, "test": 4659}  # MulT's MOSEI
SHAPES = {"text": (50, 300), "audio": (50, 74), "vision": (50, 35)}
BATCH = 326  # 16326 // 326 = 50 steps
OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


def write_mosei_sized(path: str, seed: int = 0) -> int:
    """The .npz described above (call it in a child process); returns the bytes of its feature arrays."""
    rng = np.random.default_rng(seed)
    arrays, total = {}, 0
    for split, n in SPLITS.items():
        for m, shape in SHAPES.items():
            arrays[f"{split}/{m}"] = rng.standard_normal((n, *shape), dtype=np.float32)
            total += arrays[f"{split}/{m}"].nbytes
        arrays[f"{split}/labels"] = rng.uniform(-3, 3, size=n).astype(np.float32)
    np.savez(path, **arrays)
    return total


# Run in the child: its own peak resident memory (RUSAGE_SELF), printed last on stderr, whatever the module does.
_CHILD = """import resource, runpy, sys
module, sys.argv = sys.argv[1], sys.argv[1:]
try:
    import torch, fastpair, fastpair.training.experiment
    if module != "-":
        runpy.run_module(module, run_name="__main__", alter_sys=True)
finally:
    print("peak_kib", resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, file=sys.stderr)
"""


def child_peak_mib(module: str, argv: list[str]) -> tuple[float, float]:
    """(peak RSS in MiB, seconds) of ``python -m module argv`` in a child process (module "-": imports only)."""
    start = datetime.datetime.now()
    done = subprocess.run([sys.executable, "-c", _CHILD, module, *argv], stdout=subprocess.DEVNULL,
                          stderr=subprocess.PIPE, text=True)
    if done.returncode != 0:
        raise RuntimeError(f"{module} failed: {done.stderr.strip()[-600:]}")
    peak_kib = int(done.stderr.strip().splitlines()[-1].split()[-1])
    return peak_kib / 1024, (datetime.datetime.now() - start).total_seconds()


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m bench.train_memory", description=__doc__.splitlines()[0])
    p.add_argument("--out", default=OUT, help="where the .json and .md go")
    p.add_argument("--keep", help="a folder for the .npz and the run (default: a temporary one, removed)")
    p.add_argument("--write", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if args.write:
        print(write_mosei_sized(args.write))
        return 0
    with tempfile.TemporaryDirectory() as tmp:
        work = args.keep or tmp
        os.makedirs(work, exist_ok=True)
        data = os.path.join(work, "mosei_sized.npz")
        feature_bytes = int(subprocess.run([sys.executable, "-m", "bench.train_memory", "--write", data], check=True,
                                           capture_output=True, text=True).stdout.split()[-1])
        idle, _ = child_peak_mib("-", [])
        peak, seconds = child_peak_mib("fastpair.training.train", ["--data", data, "--out",
                                        os.path.join(work, "run"), "--epochs", "1", "--batch-size", str(BATCH),
                                        "--baselines", "", "--device", "cpu"])
    result = {"date": datetime.date.today().isoformat(), "machine": platform.processor() or platform.machine(),
              "cpus": os.cpu_count(), "clips": SPLITS, "shapes": SHAPES, "steps": SPLITS["train"] // BATCH,
              "features_mib": feature_bytes / 2**20, "interpreter_mib": idle, "peak_rss_mib": peak,
              "seconds": seconds}
    os.makedirs(args.out, exist_ok=True)
    stem = os.path.join(args.out, f"train-memory-cpu-{result['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=2)
    lines = [f"MOSEI-sized fastpair-train run ({sum(SPLITS.values())} clips, {result['steps']} steps of {BATCH}, "
             f"then the probe), {result['date']}, {result['cpus']} CPUs:",
             f"- features: {result['features_mib']:.0f} MiB (float32)",
             f"- interpreter with torch and fastpair imported: {idle:.0f} MiB",
             f"- peak RSS of the run: {peak:.0f} MiB = features + {peak - result['features_mib'] - idle:.0f} MiB "
             f"beyond the interpreter ({seconds:.0f} s)"]
    with open(stem + ".md", "w") as f:
        f.write("\n".join(lines) + "\n")
    print("\n".join(lines))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
