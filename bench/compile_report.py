"""The compile report's Markdown and one-paragraph summary, from bench/compile.py's JSON."""

from __future__ import annotations

import collections
import statistics

PRECISIONS = ("16-bit", "tf32", "tf32x3", "ieee")
TENSOR_CORES = ("16-bit", "tf32", "tf32x3")  # dots on tensor cores; "ieee" (asked for) runs on FMA units
SMALL_TILE_KERNELS = ("nce_small_kernel", "sigmoid_small_kernel", "gram_small_kernel")  # one program, N <= 64
DOT_KERNELS = ("fwd_kernel", "grad_panel_kernel", "gram_fwd_kernel", "gram_grad_kernel",
               *SMALL_TILE_KERNELS)  # those with a tl.dot


def has_tensor_cores(r: dict, prefix: str) -> bool:
    """Whether a compilation issues the arch's tensor-core instructions (SASS prefix). The one-program kernels
    may take mma.sync (HMMA) on sm_90a too: wgmma needs 64-row tiles per warpgroup, which BLOCK_N <= 32 lacks."""
    if _mma_count(r, prefix):
        return True
    return r["job"]["kernel"] in SMALL_TILE_KERNELS and _mma_count(r, "HMMA") > 0


def rows(data: dict) -> list[dict]:
    """The records with their variant's kernel, label, precision and flags merged into "job"."""
    out = []
    for r in data["records"]:
        v = data["variants"][r["job"]["variant"]]
        out.append(dict(r, job=dict(r["job"], kernel=v["kernel"], label=v["label"], precision=v["precision"],
                                    flags=v["flags"])))
    return out


def _config(c: dict) -> str:
    if not c:
        return "own tiles"
    return f"{c['BLOCK_M']}x{c['BLOCK_N']}x{c['BLOCK_K']} w{c['num_warps']} s{c['num_stages']}"


def _spills(r: dict) -> int:
    return r.get("spill_stores", 0) + r.get("spill_loads", 0)


def _mma_count(r: dict, prefix: str = "") -> int:
    """Tensor-core instructions of a compilation (of the arch's kind, with its SASS prefix)."""
    return sum(n for op, n in r.get("mma", {}).items() if op.startswith(prefix))


def tallies(data: dict) -> dict:
    """Per arch: compilations, failures, spilling compilations, dot kernels without tensor-core instructions
    (precisions that should have them), shared memory above the per-block limit, launches that fit no SM."""
    out = {}
    for arch, info in data["meta"]["arch_info"].items():
        rs = [r for r in rows(data) if r["job"]["arch"] == arch]
        ok = [r for r in rs if r["ok"]]
        dots = [r for r in ok if r["job"]["precision"] in TENSOR_CORES
                and r["job"]["kernel"] in DOT_KERNELS]
        out[arch] = dict(
            gpu=info["gpu"], compilations=len(rs), failures=len(rs) - len(ok),
            spilling=sum(1 for r in ok if _spills(r)), max_spill=max((_spills(r) for r in ok), default=0),
            without_mma=sum(1 for r in dots if not has_tensor_cores(r, info.get("mma", ""))),
            over_shared=sum(1 for r in ok if r["shared"] > info["shared_per_block"]),
            unlaunchable=sum(1 for r in ok if r["occupancy"]["blocks"] < 1),
        )
    return out


def summary(data: dict) -> str:
    meta = data["meta"]
    lines = [f"{len(data['records'])} compilations of {meta['variants']} launch variants ({meta['subset']}), "
             f"triton {meta['triton']}, {meta['seconds']:.0f} s on {meta['workers']} processes"]
    for arch, t in tallies(data).items():
        lines.append(f"  {arch} ({t['gpu']}): {t['compilations']} compiled, {t['failures']} failed, "
                     f"{t['spilling']} spilling (most {t['max_spill']} B), {t['without_mma']} dot kernels without "
                     f"tensor cores, {t['over_shared']} over shared memory, {t['unlaunchable']} fitting no SM")
    return "\n".join(lines)


def markdown(data: dict) -> str:
    meta = data["meta"]
    out = [f"# Compile report, {meta['date']} (commit {meta['commit']})", "",
           f"Triton {meta['triton']}, torch {meta['torch']}, fastpair {meta['fastpair']}: every launch the host code "
           f"makes ({meta['variants']} variants, captured from the launchers over the API's options) at every tile "
           f"configuration the autotuner can pick, compiled for {', '.join(meta['arches'])} without a GPU "
           f"(`python -m bench.compile`, {meta['seconds']:.0f} s on {meta['workers']} processes). Registers and "
           "spills from ptxas -v, MMA instructions from the SASS, occupancy computed from registers and shared "
           "memory per block (theoretical: resident warps of the 64 an SM holds).", "", "## Budgets", "",
           "| arch | GPU | compiled | failed | spilling | most spill bytes | dot kernels without MMA (16-bit, "
           "TF32, 3xTF32) | over shared memory | fitting no SM |", "|---|---|---:|---:|---:|---:|---:|---:|---:|"]
    for arch, t in tallies(data).items():
        out.append(f"| {arch} | {t['gpu']} | {t['compilations']} | {t['failures']} | {t['spilling']} | "
                   f"{t['max_spill']} | {t['without_mma']} | {t['over_shared']} | {t['unlaunchable']} |")
    out += ["", "## Per kernel, precision and configuration", "",
            "Ranges over the flag variants (mask, statistics, temperature kinds, objective, ...).", "",
            "| arch | kernel | precision | tiles | variants | registers | spill bytes (max) | MMA per variant "
            "| buffers | loads | occupancy (warps/SM) | shared KiB | TMEM columns | compile s (median) |",
            "|---|---|---|---|---:|---|---:|---|---:|---|---|---:|---:|---:|"]
    groups = collections.defaultdict(list)
    for r in rows(data):
        if r["ok"]:
            j = r["job"]
            groups[(j["arch"], j["kernel"], j["precision"], _config(j["config"]))].append(r)
    for (arch, kernel, precision, tiles), rs in sorted(groups.items()):
        regs = sorted({r["registers"] for r in rs})
        mma = collections.Counter(k for r in rs for k in r["mma"])
        mma_text = ", ".join(f"{k}" for k, _ in mma.most_common(2)) or "none"
        occ = sorted({r["occupancy"]["warps"] for r in rs})
        out.append(
            f"| {arch} | {kernel.removesuffix('_kernel')} | {precision} | {tiles} | {len(rs)} | "
            f"{regs[0]}-{regs[-1]} | {max(_spills(r) for r in rs)} | {mma_text} | "
            f"{max(r['buffers'] for r in rs)} | {'/'.join(sorted({r['loads'] for r in rs}))} | "
            f"{occ[0]}-{occ[-1]} | {max(r['shared'] for r in rs) / 1024:.0f} | {max(r['tmem'] for r in rs)} | "
            f"{statistics.median(r['compile_s'] for r in rs):.2f} |")
    out += _spill_list(data) + _failures(data) + _cold_start(data)
    return "\n".join(out) + "\n"


def _spill_list(data: dict) -> list[str]:
    rs = sorted((r for r in rows(data) if r["ok"] and _spills(r)), key=lambda r: -_spills(r))
    out = ["", "## Compilations that spill", ""]
    if not rs:
        return out + ["None."]
    out += ["| arch | variant | tiles | registers | spill stores / loads (bytes per thread) |",
            "|---|---|---|---:|---|"]
    for r in rs[:60]:
        out.append(f"| {r['job']['arch']} | {r['job']['label']} | {_config(r['job']['config'])} | {r['registers']} | "
                   f"{r['spill_stores']} / {r['spill_loads']} |")
    if len(rs) > 60:
        out.append(f"| ... | {len(rs) - 60} more in the JSON | | | |")
    return out


def _failures(data: dict) -> list[str]:
    rs = [r for r in rows(data) if not r["ok"]]
    if not rs:
        return []
    out = ["", "## Failed compilations", ""]
    for r in rs[:20]:
        out.append(f"- {r['job']['arch']} {r['job']['label']} {_config(r['job']['config'])}: "
                   f"{r['error'].splitlines()[0][:200]}")
    return out


def _cold_start(data: dict) -> list[str]:
    """What compilation costs a process's first calls: per arch, kernel and precision, the compile time of
    one configuration, and of every configuration one launch variant may compile (the autotuner compiles
    each candidate it times; the worst variant shown)."""
    out = ["", "## Cold start", "",
           "A process compiles each kernel variant it launches once per tile configuration it tries: one "
           "configuration at N <= 2048 and above 2^17, every candidate it keeps in between (kernels/tuning.py), "
           "then times them. Compile times are this machine's (one CPU core per compilation, 2-core AMD EPYC); "
           "the timing runs on the GPU come on top.", "",
           "| arch | kernel | precision | configurations a variant may try | compile s, one configuration | "
           "compile s, all of a variant's (worst variant) |", "|---|---|---|---:|---:|---:|"]
    per = collections.defaultdict(lambda: collections.defaultdict(list))
    for r in rows(data):
        if r["ok"]:
            j = r["job"]
            per[(j["arch"], j["kernel"], j["precision"])][j["variant"]].append(r["compile_s"])
    for (arch, kernel, precision), variants in sorted(per.items()):
        singles = [t for times in variants.values() for t in times]
        out.append(f"| {arch} | {kernel.removesuffix('_kernel')} | {precision} | "
                   f"{max(len(v) for v in variants.values())} | {statistics.median(singles):.2f} "
                   f"(at most {max(singles):.2f}) | {max(sum(v) for v in variants.values()):.1f} |")
    return out
