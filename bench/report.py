"""The benchmark's report, for CPU and CUDA runs alike: result JSON -> JSON, Markdown tables and a plot.

    python -m bench.report RESULT.json [--out bench/results/raw] [--update-docs]

bench/run.py calls publish() at the end of a run; this command re-renders a result file, also one
written before 2026-11-27 (the CPU report of pytest-benchmark runs, bench/gpu.py's GPU report). It writes
OUT/<device-slug>-<date>.{json,md,png}; OUT defaults to the scratch folder bench/results/raw so that a
committed result is only rewritten when asked.

Markdown: per dtype one headline table, a row per shape: the floor, the headline provider (fastpair-torch
on CPU, fastpair-triton on CUDA), torch-compile and plain-pytorch in ms, the headline's ratios to the
other three (medians of the same run), its TFLOP/s and the peak memory growth; when the run has other
providers, a table per dtype and D of every provider's time (x floor) and one of its peak memory; then
the N = 2^20 check, skipped providers and failures. TFLOP/s count the floor's FLOPs
(fastpair.flops.flop_count) for every provider, so they compare like for like. --update-docs replaces
docs/benchmarks.md's CPU block (between its bench:cpu markers) with the Markdown of a CPU run.
"""

from __future__ import annotations

import argparse
import json
import os
import re
from collections import defaultdict

from fastpair.flops import flop_count

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
FLOOR = "gemm-floor"
# Per device and objective: (ours, (its torch.compile baseline, its plain baseline), label in the table)
HEADLINES = {
    "cpu": [("fastpair-torch", ("torch-compile", "plain-pytorch"), "fastpair"),
            ("fastpair-torch-sigmoid", ("compile-sigmoid", "plain-sigmoid"), "sigmoid")],
    "cuda": [("fastpair-triton", ("torch-compile", "plain-pytorch"), "fastpair-triton"),
             ("fastpair-triton-sigmoid", ("compile-sigmoid", "plain-sigmoid"), "sigmoid")],
}
# Digits: CPU steps take tens of ms to seconds, CUDA steps from below one ms
FORMAT = {"cpu": {"ms": ".1f", "tflops": ".3f"}, "cuda": {"ms": ".2f", "tflops": ".1f"}}
BLOCK_START, BLOCK_END = "<!-- bench:cpu:start -->", "<!-- bench:cpu:end -->"
RESULTS_PAGE = os.path.join("docs", "benchmarks.md")
# The goals of docs/design.md per device: (N, D, numerator, denominator, bound) and (N, D, provider, MiB)
GOALS = {"cpu": [(4096, 128, "fastpair-torch", "plain-pytorch", 0.5),
                 (4096, 128, "fastpair-torch", "gemm-floor", 1.2),
                 (4096, 128, "fastpair-torch", "torch-compile", 1.15),
                 (4096, 128, "fastpair-torch-ids", "fastpair-torch", 1.1),
                 (4096, 128, "fastpair-torch-smooth", "fastpair-torch", 1.1),
                 (4096, 128, "fastpair-torch-sigmoid", "plain-sigmoid", 0.5),
                 (4096, 128, "fastpair-torch-sigmoid", "gemm-floor", 1.0),
                 (4096, 128, "fastpair-torch-gram", "plain-gram", 0.5),
                 (4096, 128, "fastpair-torch-gram", "fastpair-torch", 1.2)]}
MEMORY_GOALS = {"cpu": [(16384, 128, "fastpair-torch", 160.0)]}


def load(path: str) -> dict:
    with open(path) as f:
        return normalize(json.load(f))


def normalize(result: dict) -> dict:
    """Today's schema from any result file: rows with full_ms and peak_mib, meta with kind and timer.
    Older CPU files had median_ms, peak_growth_mib and the dtype in meta; older GPU files held the
    N = 2^20 check as a row."""
    meta = dict(result["meta"])
    meta.setdefault("kind", "cpu" if "threads" in meta else "cuda")
    meta.setdefault("m", 3)
    meta.setdefault("timer", "medians" if meta["kind"] == "cpu" else "medians of triton.testing.do_bench")
    rows, largest = [], result.get("largest")
    for r in result["rows"]:
        if "largest" in r:
            largest = r
            continue
        r = dict(r)
        r.setdefault("dtype", meta.get("dtype", "float32"))
        if "median_ms" in r:
            r["full_ms"] = r.pop("median_ms")
        if "peak_growth_mib" in r:
            r["peak_mib"] = r.pop("peak_growth_mib")
        rows.append(r)
    out = dict(result, meta=meta, rows=rows, skipped=result.get("skipped", {}), failed=result.get("failed", {}))
    if largest:
        out["largest"] = largest
    return out


def _table(rows) -> dict:
    """{(dtype, N, D): {provider: row}}, shapes sorted."""
    table = defaultdict(dict)
    for r in rows:
        table[(r["dtype"], r["n"], r["d"])][r["provider"]] = r
    return dict(sorted(table.items()))


def derive(result: dict) -> dict:
    """Add what follows from the measurements: TFLOP/s and x floor per row, the headline's same-run
    ratios, and the goal verdicts."""
    num_pairs = result["meta"]["m"] * (result["meta"]["m"] - 1) // 2
    table = _table(result["rows"])
    for (_, n, d), prov in table.items():
        floor = prov.get(FLOOR, {}).get("full_ms")
        for r in prov.values():
            r["tflops"] = flop_count(n, d, num_pairs) / r["full_ms"] / 1e9
            r["vs_floor"] = r["full_ms"] / floor if floor else None
    result["ratios"] = [
        {"provider": name, "n": n, "d": d, "dtype": dtype,
         **{f"vs_{o}": round(prov[name]["full_ms"] / prov[o]["full_ms"], 3) for o in (FLOOR, *baselines) if o in prov}}
        for name, baselines, _ in HEADLINES[result["meta"]["kind"]]
        for (dtype, n, d), prov in table.items() if name in prov]
    result["goals"] = goal_lines(result["meta"]["kind"], table)
    return result


def goal_lines(kind: str, table: dict) -> list[str]:
    lines = []
    for n, d, num, den, bound in GOALS.get(kind, []):
        prov = table.get(("float32", n, d), {})
        if num in prov and den in prov:
            r = prov[num]["full_ms"] / prov[den]["full_ms"]
            lines.append(f"- N={n} D={d}: {num} / {den} = {r:.2f}x (goal <= {bound}x): "
                         f"{'met' if r <= bound else 'NOT met'}")
    for n, d, provider, bound in MEMORY_GOALS.get(kind, []):
        mem = table.get(("float32", n, d), {}).get(provider, {}).get("peak_mib")
        if mem is not None:
            lines.append(f"- N={n} D={d}: {provider} peak memory growth {mem:.0f} MiB (goal <= {bound:.0f} MiB): "
                         f"{'met' if mem <= bound else 'NOT met'}")
    return lines


def _fmt(x, spec: str) -> str:
    return "-" if x is None else format(x, spec)


def _ratio(x) -> str:
    return "-" if x is None else f"{x:.2f}x"


def _mib(x) -> str:
    return "-" if x is None else f"{x:.0f}"


def _dtypes(rows) -> list[str]:
    return list(dict.fromkeys(r["dtype"] for r in rows))


def header(result: dict) -> str:
    meta, dtypes = result["meta"], _dtypes(result["rows"])
    parts = [meta["device"], f"{meta['threads']} threads" if "threads" in meta else None, f"torch {meta['torch']}",
             f"triton {meta['triton']}" if "triton" in meta else None, f"fastpair {meta['fastpair']}",
             f"commit {meta['commit']}" if meta.get("commit") else None, meta["date"]]
    run = [f"M={meta['m']}", dtypes[0] if len(dtypes) == 1 else None, "fwd+bwd", meta["timer"]]
    return ", ".join(p for p in parts if p) + "; " + ", ".join(p for p in run if p)


def headline_table(result: dict, dtype: str, headline) -> list[str]:
    kind = result["meta"]["kind"]
    name, baselines, label = headline
    ms_spec, tflops_spec = FORMAT[kind]["ms"], FORMAT[kind]["tflops"]
    lines = [f"| N | D | floor ms | {label} ms | compile ms | plain ms | {label} / floor | {label} / compile "
             f"| {label} / plain | {label} TFLOP/s | peak MiB {label} / compile / plain |",
             "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    for (dt, n, d), prov in _table(result["rows"]).items():
        if dt != dtype:
            continue
        ms = {p: prov[p]["full_ms"] if p in prov else None for p in (FLOOR, name, *baselines)}
        rel = [ms[name] / ms[p] if ms[name] and ms[p] else None for p in (FLOOR, *baselines)]
        mem = " / ".join(_mib(prov.get(p, {}).get("peak_mib")) for p in (name, *baselines))
        tflops = prov[name]["tflops"] if name in prov else None
        times = " | ".join(_fmt(ms[p], ms_spec) for p in (FLOOR, name, *baselines))
        lines.append(f"| {n} | {d} | {times} | {' | '.join(_ratio(x) for x in rel)} | {_fmt(tflops, tflops_spec)} "
                     f"| {mem} |")
    return lines


def provider_tables(rows: list[dict], dtype: str, d: int, ms_spec: str) -> list[str]:
    """Every provider's full step ms (x floor) over N, then its peak memory, for one dtype and D."""
    rows = [r for r in rows if r["dtype"] == dtype and r["d"] == d]
    names, ns = list(dict.fromkeys(r["provider"] for r in rows)), sorted({r["n"] for r in rows})
    cell = {(r["provider"], r["n"]): r for r in rows}
    head = ["| provider | " + " | ".join(f"N={n}" for n in ns) + " |", "|---|" + "---:|" * len(ns)]

    def timed(r):
        if r is None:
            return "-"
        ratio = "" if r.get("vs_floor") is None or r["provider"] == FLOOR else f" ({r['vs_floor']:.2f}x)"
        return _fmt(r["full_ms"], ms_spec) + ratio

    lines = [f"### {dtype}, D={d}: full step ms (x floor)", "", *head]
    lines += [f"| {p} | " + " | ".join(timed(cell.get((p, n))) for n in ns) + " |" for p in names]
    sized = [r for r in rows if r.get("inputs_grads_mib")]
    biggest = max(sized, key=lambda r: r["n"], default=None)
    note = f" (inputs + grads: {biggest['inputs_grads_mib']:.0f} MiB at N={biggest['n']})" if biggest else ""
    lines += ["", f"Peak memory above the inputs during one step, MiB{note}:", "", *head]
    lines += [f"| {p} | " + " | ".join(_mib((cell.get((p, n)) or {}).get("peak_mib")) for n in ns) + " |"
              for p in names if p != FLOOR]
    return lines + [""]


def latency_table(rows: list[dict], ms_spec: str) -> list[str]:
    """At the latency-bound sizes: each provider's step timed alone (do_bench), in an eager back-to-back loop
    and as a CUDA-graph replay (bench/timing.py); why a step could not be captured, below."""
    rows = [r for r in rows if "loop_ms" in r]
    if not rows:
        return []
    lines = ["### The step at small N: alone, in an eager loop, as a CUDA graph (ms)", "",
             "| dtype | D | N | provider | alone | eager loop | CUDA graph |", "|---|---:|---:|---|---:|---:|---:|"]
    errors = {}
    for r in rows:
        graph = _fmt(r["graph_ms"], ms_spec) if "graph_ms" in r else "not capturable"
        if "graph_error" in r:
            errors.setdefault(r["provider"], r["graph_error"])
        lines.append(f"| {r['dtype']} | {r['d']} | {r['n']} | {r['provider']} | {_fmt(r['full_ms'], ms_spec)} "
                     f"| {_fmt(r['loop_ms'], ms_spec)} | {graph} |")
    lines += ["", *[f"- {p} not capturable: {e}" for p, e in errors.items()]] if errors else []
    return lines + [""]


def largest_line(r: dict) -> str:
    text = f"N = 2^20, D = {r['d']}, bf16, {r['provider']}: {r['largest']}"
    if r["largest"] == "fits":
        text += (f", one full step {r['step_s']:.1f} s (first call, compilation included), "
                 f"{r['total_gib']:.1f} GiB peak on the device")
    return text


def markdown(result: dict) -> str:
    rows, kind = result["rows"], result["meta"]["kind"]
    lines = [header(result), ""]
    if result.get("largest"):
        lines += [largest_line(result["largest"]), ""]
    dtypes, names = _dtypes(rows), {r["provider"] for r in rows}
    headlines = [h for h in HEADLINES[kind] if h[0] in names]
    for headline in headlines:
        for dtype in dtypes:
            if len(dtypes) > 1 or len(headlines) > 1:
                lines += [f"### {dtype}: {headline[0]} against the floor and the baselines", ""]
            lines += [*headline_table(result, dtype, headline), ""]
    if names - {FLOOR, *(p for h in headlines for p in (h[0], *h[1]))}:
        for dtype, d in dict.fromkeys((r["dtype"], r["d"]) for r in rows):
            lines += provider_tables(rows, dtype, d, FORMAT[kind]["ms"])
    lines += latency_table(rows, ".3f")
    if result.get("goals"):
        lines += ["Goals (docs/design.md):", *result["goals"], ""]
    if result["skipped"]:
        lines += ["Skipped (not installed):", *[f"- {k}: {v}" for k, v in result["skipped"].items()], ""]
    if result["failed"]:
        lines += ["Stopped (out of memory or the provider's own limit):",
                  *[f"- {k}: {v}" for k, v in result["failed"].items()], ""]
    return "\n".join(lines).rstrip("\n") + "\n"


def plot(result: dict, path: str) -> None:
    """Per dtype and D a column: fwd+bwd time over N on top, peak memory growth below; log-log."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    rows, meta = result["rows"], result["meta"]
    groups, several = list(dict.fromkeys((r["dtype"], r["d"]) for r in rows)), len(_dtypes(rows)) > 1
    color = {p: f"C{i % 10}" for i, p in enumerate(dict.fromkeys(r["provider"] for r in rows))}  # same in both
    fig, axes = plt.subplots(2, len(groups), figsize=(5 * len(groups), 7), squeeze=False)
    for col, (dtype, d) in enumerate(groups):
        mine = [r for r in rows if r["dtype"] == dtype and r["d"] == d]
        for p in dict.fromkeys(r["provider"] for r in mine):
            pts = sorted((r["n"], r) for r in mine if r["provider"] == p)
            style = dict(marker="o", label=p, color=color[p], linestyle="--" if p == FLOOR else "-")
            axes[0][col].plot([n for n, _ in pts], [r["full_ms"] for _, r in pts], **style)
            mems = [(n, r["peak_mib"]) for n, r in pts if r.get("peak_mib") is not None]
            if mems:
                axes[1][col].plot([n for n, _ in mems], [max(m, 1.0) for _, m in mems], **style)
        for row, ylabel in ((0, "fwd+bwd time (ms)"), (1, "peak memory growth (MiB)")):
            ax = axes[row][col]
            ax.set_xscale("log", base=2)
            ax.set_yscale("log")
            ax.set_xlabel("N (batch)")
            ax.set_ylabel(ylabel)
            ax.grid(True, which="both", alpha=0.3)
            ax.legend(fontsize=7)
        axes[0][col].set_title(f"{dtype}, D={d}, M={meta['m']}" if several else f"M={meta['m']}, D={d}")
    threads = f"{meta['threads']} threads, " if "threads" in meta else ""
    fig.suptitle(f"fastpair {meta['kind'].upper()} benchmark: {meta['device']}, {threads}{meta['date']}", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)


def slug(text: str) -> str:
    return re.sub(r"[^A-Za-z0-9]+", "-", text).strip("-").lower()


def stem(meta: dict) -> str:
    """<device-slug>-<date>; CPU model names get a cpu- prefix."""
    device = ("cpu " if meta["kind"] == "cpu" else "") + meta["device"]
    return f"{slug(device)}-{meta['date']}"


def publish(result: dict, out: str, update_docs: bool = False) -> str:
    """Write out/<stem>.json (first, so a failing plot loses no measurement), .md and .png; return the
    Markdown. With update_docs (CPU runs only), also the CPU block of docs/benchmarks.md."""
    result = derive(normalize(result))
    path = os.path.join(out, stem(result["meta"]))
    os.makedirs(out, exist_ok=True)
    with open(path + ".json", "w") as f:
        json.dump(result, f, indent=1)
    md = markdown(result)
    with open(path + ".md", "w") as f:
        f.write(md)
    plot(result, path + ".png")
    print(md)
    print(f"wrote {path}.json, .md, .png")
    if update_docs:
        if result["meta"]["kind"] != "cpu":
            raise SystemExit(f"{RESULTS_PAGE} holds the CPU table only; not updated")
        write_block(md, os.path.join(ROOT, RESULTS_PAGE))
        print(f"updated {RESULTS_PAGE}")
    return md


def write_block(md: str, page: str) -> None:
    with open(page) as f:
        text = f.read()
    if BLOCK_START not in text or BLOCK_END not in text:
        raise SystemExit(f"{page} has no {BLOCK_START} ... {BLOCK_END} block to update")
    before, rest = text.split(BLOCK_START, 1)
    _, after = rest.split(BLOCK_END, 1)
    with open(page, "w") as f:
        f.write(before + BLOCK_START + "\n" + md + BLOCK_END + after)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("result", help="a result JSON of bench/run.py (or of the reports before it)")
    parser.add_argument("--out", default=os.path.join(ROOT, "bench", "results", "raw"))
    parser.add_argument("--update-docs", action="store_true", help="replace docs/benchmarks.md's CPU results block")
    args = parser.parse_args(argv)
    publish(load(args.result), args.out, update_docs=args.update_docs)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
