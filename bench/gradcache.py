"""GradCache's memory and time: the paper's encoders (and an MLP) at batch 256 ... 8192, chunked and not.

    python -m bench.gradcache [--device cpu|cuda] [--batches 256 1024 4096 8192] [--chunk 256] [--repeats 3]
                              [--out bench/results]

Encoders as fastpair-train builds them (``fastpair.training.models``, width 128, 2 layers): "paper" is a
Transformer for text (20 steps x 300 features), a TCN for audio (20 x 74) and a bidirectional GRU for vision
(20 x 35), each with its 512 -> 1024 -> 512 projection head and dropout; "mlp" is the MLP encoder on vectors of
the same feature sizes. Loss: ``PairwiseNCE(3)`` with a learnable temperature. One step = forward, loss,
backward (``GradCache(..., chunk_size)`` or the plain step), float32.

Each (encoders, batch, chunked) runs in a fresh process (glibc told to return freed blocks above 64 KiB:
``CHILD_ENV``). Memory: after the inputs and the model exist and a warm-up step at batch 32 has run (parameter
gradients allocated, thread pools up), the CPU's peak-RSS mark is reset and one full step runs; "growth" is VmHWM
over VmRSS before it (CUDA: max_memory_allocated over memory_allocated). "activations" is the growth less the
embeddings and their gradients (2 x 3 x N x 512 fp32, which any step holds): the encoders' activations and the
loss's temporaries. Time, in another fresh process with glibc as it is: after the warm-up and one step at the
batch, the median of ``repeats`` steps, per sample. Writes OUT/gradcache-<device>-<date>.{json,md,png}. The goal
(CPU): at batch 8192 with chunks of 256, activations within 1.2x those of the plain step at batch 256, and at most
1.5x the plain step's time per sample (at the same batch: ``goal``).
"""

from __future__ import annotations

import argparse
import datetime
import json
import os
import statistics
import subprocess
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
OUT = os.path.join(ROOT, "bench", "results")
DIMS = {"text": 300, "audio": 74, "vision": 35}
WARMUP = 32  # the warm-up step's batch: small, so that the memory it frees and the heap keeps is small too
# In the children, glibc returns every allocation above 64 KiB to the system when it is freed (a fixed mmap
# threshold: by default the threshold grows with the blocks freed, and the heap then keeps memory that VmRSS
# counts as in use), so that the peak-RSS growth of a step is its own.
CHILD_ENV = {"MALLOC_MMAP_THRESHOLD_": "65536"}
STEPS, FEAT = 20, 512


def _encoders(kind: str, device):
    """Three per-modality callables (x, mask) -> (n, 512): an encoder, dropout and the projection head."""
    import torch
    from fastpair.training.models import MultimodalEncoder

    torch.manual_seed(0)
    kinds = {m: ("mlp" if kind == "mlp" else k) for m, k in zip(DIMS, ("transformer", "tcn", "gru"))}
    model = MultimodalEncoder(DIMS, kinds).to(device).train()

    def encoder(m):
        return lambda x, mask: model.heads[m](model.drop(model.encoders[m](x, mask)))

    return model, [encoder(m) for m in DIMS]


def _inputs(kind: str, n: int, device):
    import torch

    g = torch.Generator().manual_seed(1)
    if kind == "mlp":
        return [(torch.randn(n, f, generator=g).to(device), torch.ones(n, dtype=torch.bool, device=device))
                for f in DIMS.values()]
    return [(torch.randn(n, STEPS, f, generator=g).to(device), torch.ones(n, STEPS, dtype=torch.bool, device=device))
            for f in DIMS.values()]


def _step(encoders, loss_fn, inputs, chunk: int | None):
    from fastpair import GradCache

    if chunk:
        return lambda: GradCache(encoders, loss_fn, chunk)(*inputs)

    def plain():
        loss = loss_fn(*(e(*x) for e, x in zip(encoders, inputs)))
        loss.backward()
        return loss.detach()

    return plain


def measure(kind: str, n: int, chunk: int | None, repeats: int, device: str) -> dict:
    """One configuration, in this process: with repeats = 0 the peak growth of one step (MiB), else the median
    time per sample of ``repeats`` steps after a warm-up."""
    import torch

    from fastpair import PairwiseNCE

    dev = torch.device(device)
    _, encoders = _encoders(kind, dev)
    loss_fn = PairwiseNCE(3).to(dev)
    small = _inputs(kind, min(n, WARMUP), dev)
    _step(encoders, loss_fn, small, chunk)()  # warm-up: gradients allocated, thread pools up
    del small
    step = _step(encoders, loss_fn, _inputs(kind, n, dev), chunk)
    out = dict(encoders=kind, batch=n, chunk=chunk, threads=torch.get_num_threads())
    if not repeats:
        growth = _peak_growth(step, dev)
        embeddings = 2 * len(DIMS) * n * FEAT * 4 / 2**20
        return dict(out, growth_mib=round(growth, 1), activations_mib=round(growth - embeddings, 1))
    step()  # the first step at this batch: the allocator's and the thread pools' first touch
    times = []
    for _ in range(repeats):
        if dev.type == "cuda":
            torch.cuda.synchronize()
        start = time.perf_counter()
        step()
        if dev.type == "cuda":
            torch.cuda.synchronize()
        times.append(time.perf_counter() - start)
    median = statistics.median(times)
    return dict(out, step_s=round(median, 4), ms_per_sample=round(1000 * median / n, 4), repeats=repeats)


def _peak_growth(step, dev) -> float:
    from bench.memory import cpu_step_growth, cuda_peak_mib

    return cuda_peak_mib(step) if dev.type == "cuda" else cpu_step_growth(step)


def run(device: str, batches, chunk: int, repeats: int) -> list[dict]:
    """Every configuration in two fresh processes: its memory (glibc returning freed blocks, CHILD_ENV), then
    its time (glibc as it is: returning every block costs time)."""
    rows = []
    for kind in ("paper", "mlp"):
        for n in batches:
            for c in (None, chunk) if n > chunk else (None,):
                row = {}
                for r, env in ((0, CHILD_ENV), (repeats, {})):
                    cmd = [sys.executable, "-m", "bench.gradcache", "--one", kind, str(n), str(c or 0), str(r),
                           "--device", device]
                    done = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, env={**os.environ, **env})
                    if done.returncode != 0:
                        raise RuntimeError(f"{' '.join(cmd)} failed: {done.stderr[-800:]}")
                    row.update(json.loads(done.stdout.strip().splitlines()[-1]))
                rows.append(row)
                print(row, file=sys.stderr, flush=True)
    return rows


def goal(rows: list[dict], chunk: int) -> list[str]:
    """The CPU goal, per encoder set: batch 8192 in chunks of 256 against the plain step, its activations
    against those of a plain batch of 256 (the chunk), its time per sample against the plain step's at the
    same batch (what chunking costs; the plain step at 256 is shown too: the loss's N x N work per sample grows
    with N whether or not the encoders are chunked)."""
    def row(kind, n, c):
        return next((r for r in rows if r["encoders"] == kind and r["batch"] == n and r["chunk"] == c), None)

    lines = []
    for kind in ("paper", "mlp"):
        big, same, small = row(kind, 8192, chunk), row(kind, 8192, None), row(kind, chunk, None)
        if not (big and small):
            continue
        mem = big["activations_mib"] / max(small["activations_mib"], 1e-9)
        line = (f"{kind}: batch 8192 in chunks of {chunk}: activations {mem:.2f}x those of a plain batch of {chunk} "
                f"(goal <= 1.2x: {'met' if mem <= 1.2 else 'NOT met'})")
        if same:
            ratio = big["ms_per_sample"] / same["ms_per_sample"]
            line += (f"; time per sample {ratio:.2f}x the plain step at batch 8192 (goal <= 1.5x: "
                     f"{'met' if ratio <= 1.5 else 'NOT met'})")
        line += f", {big['ms_per_sample'] / small['ms_per_sample']:.2f}x the plain step at batch {chunk}"
        lines.append(line)
    return lines


def markdown(meta: dict, rows: list[dict], chunk: int) -> str:
    out = [f"# GradCache: memory and time, {meta['device']}, {meta['date']}", "",
           f"{meta['cpu']}, torch {meta['torch']}, fastpair {meta['fastpair']}, commit {meta['commit']}; "
           f"`python -m bench.gradcache` (bench/gradcache.py says how it measures). float32, PairwiseNCE(3).", "",
           "| encoders | batch | chunk | peak growth MiB | activations MiB | step s | ms per sample |",
           "|---|---:|---:|---:|---:|---:|---:|"]
    for r in rows:
        out.append(f"| {r['encoders']} | {r['batch']} | {r['chunk'] or 'none'} | {r['growth_mib']} | "
                   f"{r['activations_mib']} | {r['step_s']} | {r['ms_per_sample']} |")
    return "\n".join(out + ["", "Goal (CPU):", ""] + [f"- {line}" for line in goal(rows, chunk)]) + "\n"


def plot(rows: list[dict], path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(10, 4))
    for kind, style in (("paper", "-"), ("mlp", "--")):
        for chunked in (False, True):
            pts = [r for r in rows if r["encoders"] == kind and (r["chunk"] is not None) == chunked]
            label = f"{kind}, {'chunks of ' + str(pts[0]['chunk']) if chunked and pts else 'plain'}"
            if pts:
                axes[0].plot([r["batch"] for r in pts], [r["activations_mib"] for r in pts], style, marker="o",
                             label=label)
                axes[1].plot([r["batch"] for r in pts], [r["ms_per_sample"] for r in pts], style, marker="o",
                             label=label)
    axes[0].set_yscale("log", base=2)  # from the MLP's tens of MiB to the paper's GiBs
    for ax, title in zip(axes, ("activations above inputs and embeddings (MiB)", "time per sample (ms)")):
        ax.set_xscale("log", base=2)
        ax.set_xlabel("batch")
        ax.set_title(title)
        ax.legend(fontsize=8)
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def _meta(device: str) -> dict:
    import torch

    import fastpair
    from bench.provenance import commit, cpu_name

    return dict(device=device if device == "cpu" else torch.cuda.get_device_name(), cpu=cpu_name(),
                torch=torch.__version__, fastpair=fastpair.__version__, commit=commit(),
                date=datetime.date.today().isoformat(), threads=torch.get_num_threads())


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda"))
    parser.add_argument("--batches", type=int, nargs="+", default=[256, 1024, 4096, 8192])
    parser.add_argument("--chunk", type=int, default=256)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--out", default=OUT)
    parser.add_argument("--one", nargs=4, metavar=("ENCODERS", "BATCH", "CHUNK", "REPEATS"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.one:  # a child process: one configuration, one JSON line
        kind, n, chunk, repeats = args.one[0], int(args.one[1]), int(args.one[2]), int(args.one[3])
        print(json.dumps(measure(kind, n, chunk or None, repeats, args.device)))
        return 0
    rows = run(args.device, args.batches, args.chunk, args.repeats)
    meta = _meta(args.device)
    slug = "cpu" if args.device == "cpu" else meta["device"].lower().replace(" ", "-")
    stem = os.path.join(args.out, f"gradcache-{slug}-{meta['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(dict(meta=meta, chunk=args.chunk, rows=rows), f, indent=1)
    with open(stem + ".md", "w") as f:
        f.write(markdown(meta, rows, args.chunk))
    plot(rows, stem + ".png")
    print("\n".join(goal(rows, args.chunk)))
    print(f"wrote {stem}.json, .md and .png")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
