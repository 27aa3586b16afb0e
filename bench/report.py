"""Turn a pytest-benchmark JSON of bench/ into results: a condensed JSON, a Markdown table and a plot.

    python -m bench.report RAW.json [--out bench/results] [--update-readme]

Writes OUT/<device>-<date>.json/.md/.png. Ratios are of medians measured in the same run; TFLOP/s count
the 12-GEMM floor's FLOPs (4 * 2 N^2 D per pair) for every provider, so they compare like for like.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

PROVIDER_ORDER = ["fastpair-torch", "torch-compile", "plain-pytorch", "gemm-floor"]
README_START, README_END = "<!-- bench:cpu:start -->", "<!-- bench:cpu:end -->"
# DESIGN.md's CPU goals: (N, D, numerator, denominator, bound)
GOALS = [
    (4096, 128, "fastpair-torch", "plain-pytorch", 0.5),
    (4096, 128, "fastpair-torch", "gemm-floor", 1.2),
    (4096, 128, "fastpair-torch", "torch-compile", 1.15),
]
MEMORY_GOAL = (16384, 128, "fastpair-torch", 160.0)


def load(path: str) -> dict:
    with open(path) as f:
        raw = json.load(f)
    rows, meta = [], {}
    for bench in raw["benchmarks"]:
        info = bench["extra_info"]
        meta = {k: info[k] for k in ("device", "threads", "torch", "fastpair", "date", "dtype", "m", "mode")}
        stats = bench["stats"]
        rows.append({
            "n": info["n"], "d": info["d"], "provider": info["provider"],
            "median_ms": stats["median"] * 1e3, "iqr_ms": stats["iqr"] * 1e3, "rounds": stats["rounds"],
            "tflops": info["flops"] / stats["median"] / 1e12, "peak_growth_mib": info.get("peak_growth_mib"),
        })
    return {"meta": meta, "rows": rows}


def by_shape(rows):
    table = defaultdict(dict)
    for r in rows:
        table[(r["n"], r["d"])][r["provider"]] = r
    return dict(sorted(table.items()))


def ratios(table):
    out = []
    for (n, d), prov in table.items():
        fp = prov.get("fastpair-torch")
        if not fp:
            continue
        entry = {"n": n, "d": d}
        for other in ("gemm-floor", "torch-compile", "plain-pytorch"):
            if other in prov:
                entry[f"vs_{other}"] = round(fp["median_ms"] / prov[other]["median_ms"], 3)
        out.append(entry)
    return out


def goal_lines(table):
    lines = []
    for n, d, num, den, bound in GOALS:
        prov = table.get((n, d), {})
        if num in prov and den in prov:
            r = prov[num]["median_ms"] / prov[den]["median_ms"]
            verdict = "met" if r <= bound else "NOT met"
            lines.append(f"- N={n} D={d}: {num} / {den} = {r:.2f}x (goal <= {bound}x): {verdict}")
    n, d, provider, bound = MEMORY_GOAL
    row = table.get((n, d), {}).get(provider)
    if row and row["peak_growth_mib"] is not None:
        mem = row["peak_growth_mib"]
        lines.append(f"- N={n} D={d}: {provider} peak memory growth {mem:.0f} MiB (goal <= {bound:.0f} MiB): "
                     f"{'met' if mem <= bound else 'NOT met'}")
    return lines


def _fmt(x, spec):
    return "-" if x is None else format(x, spec)


def markdown(result) -> str:
    meta, table = result["meta"], by_shape(result["rows"])
    head = (f"{meta['device']}, {meta['threads']} threads, torch {meta['torch']}, fastpair {meta['fastpair']}, "
            f"{meta['date']}; M={meta['m']}, {meta['dtype']}, fwd+bwd, medians")
    lines = [head, "",
             "| N | D | floor ms | fastpair ms | compile ms | plain ms | fastpair / floor | fastpair / compile "
             "| fastpair / plain | fastpair TFLOP/s | peak MiB fastpair / compile / plain |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (n, d), prov in table.items():
        def ms(p, prov=prov):
            return prov[p]["median_ms"] if p in prov else None

        def mem(p, prov=prov):
            return _fmt(prov[p]["peak_growth_mib"], ".0f") if p in prov else "-"

        fp = ms("fastpair-torch")
        rel = [(fp / ms(p)) if fp and ms(p) else None for p in ("gemm-floor", "torch-compile", "plain-pytorch")]
        tflops = prov["fastpair-torch"]["tflops"] if "fastpair-torch" in prov else None
        lines.append(
            f"| {n} | {d} | {_fmt(ms('gemm-floor'), '.1f')} | {_fmt(fp, '.1f')} | {_fmt(ms('torch-compile'), '.1f')} "
            f"| {_fmt(ms('plain-pytorch'), '.1f')} | {_fmt(rel[0], '.2f')}x | {_fmt(rel[1], '.2f')}x "
            f"| {_fmt(rel[2], '.2f')}x | {_fmt(tflops, '.3f')} "
            f"| {mem('fastpair-torch')} / {mem('torch-compile')} / {mem('plain-pytorch')} |"
        )
    goals = goal_lines(table)
    if goals:
        lines += ["", "Goals (DESIGN.md):", *goals]
    return "\n".join(lines) + "\n"


def plot(result, path: str) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    table = by_shape(result["rows"])
    dims = sorted({d for _, d in table})
    fig, axes = plt.subplots(2, len(dims), figsize=(5 * len(dims), 7), squeeze=False)
    for col, d in enumerate(dims):
        for provider in PROVIDER_ORDER:
            pts = [(n, prov[provider]) for (n, dd), prov in table.items() if dd == d and provider in prov]
            if not pts:
                continue
            ns = [n for n, _ in pts]
            axes[0][col].plot(ns, [r["median_ms"] for _, r in pts], marker="o", label=provider)
            mems = [(n, r["peak_growth_mib"]) for n, r in pts if r["peak_growth_mib"] is not None]
            if mems:
                axes[1][col].plot([n for n, _ in mems], [max(m, 1.0) for _, m in mems], marker="o", label=provider)
        for row, ylabel in ((0, "fwd+bwd time (ms)"), (1, "peak memory growth (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=8)
        axes[0][col].set_title(f"M=3, D={d}")
    meta = result["meta"]
    fig.suptitle(f"fastpair CPU benchmark: {meta['device']}, {meta['threads']} threads, {meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def write_results(stem: str, result: dict, markdown_fn, plot_fn) -> str:
    """Write stem.json, stem.md and stem.png; return the Markdown (shared by the CPU and GPU reports)."""
    os.makedirs(os.path.dirname(stem), exist_ok=True)
    with open(stem + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown_fn(result)
    with open(stem + ".md", "w") as f:
        f.write(md)
    plot_fn(result, stem + ".png")
    print(md)
    print(f"wrote {stem}.json, .md, .png")
    return md


def update_readme(md: str, readme: str) -> None:
    with open(readme) as f:
        text = f.read()
    if README_START not in text or README_END not in text:
        raise SystemExit(f"{readme} has no {README_START} ... {README_END} block to update")
    before, rest = text.split(README_START, 1)
    _, after = rest.split(README_END, 1)
    with open(readme, "w") as f:
        f.write(before + README_START + "\n" + md + README_END + after)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("raw", help="pytest-benchmark JSON (--benchmark-json)")
    parser.add_argument("--out", default=os.path.join(os.path.dirname(__file__), "results"))
    parser.add_argument("--update-readme", action="store_true", help="replace README.md's CPU results block")
    args = parser.parse_args(argv)

    result = load(args.raw)
    result["ratios"] = ratios(by_shape(result["rows"]))
    result["goals"] = goal_lines(by_shape(result["rows"]))
    meta = result["meta"]
    md = write_results(os.path.join(args.out, f"cpu-{slug(meta['device'])}-{meta['date']}"), result, markdown, plot)
    if args.update_readme:
        update_readme(md, os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "README.md"))
        print("updated README.md")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
