"""What a GPU compiler makes of every Triton kernel, without a GPU: the compile report.

    python -m bench.compile [--subset full|ci] [--arch sm_80 sm_90a sm_100a] [--jobs 2] [--out bench/results]
                            [--json PATH [--with-cases]]

Every launch the host code makes (captured from the real launchers: bench/launches.py) is compiled at every
tile configuration the autotuner and its pruning can pick, for A100 (sm_80), H100 (sm_90a) and B200
(sm_100a), by Triton's own compiler and the ptxas its wheel ships. Per compilation: registers per thread,
spill stores and loads (ptxas -v), shared memory and tensor memory (Triton's metadata), tensor-core
instructions and their shape (the SASS from cuobjdump, the PTX), the operand buffers of the software
pipeline and how they are filled (cp.async or TMA), theoretical occupancy, compile time.

--subset ci is what `make test` holds to budgets (tests/test_compile_budgets.py), in a few minutes: on sm_90a
every variant at its riskiest configuration and each kernel's plain variant at every configuration; on
sm_80 and sm_100a the riskiest variants (`ci_jobs`). The full report writes OUT/compile-<date>.{json,md}.
"""

from __future__ import annotations

import argparse
import collections
import concurrent.futures
import contextlib
import datetime
import hashlib
import io
import json
import multiprocessing
import os
import re
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass

from fastpair.kernels import small

from bench import compile_report, launches

OUT = os.path.join(os.path.dirname(os.path.abspath(__file__)), "results")


@dataclass(frozen=True)
class Arch:
    """A compile target and the per-SM resources occupancy is computed from (CUDA programming guide,
    compute capabilities table)."""

    name: str
    capability: int
    gpu: str
    shared_per_block: int  # the most shared memory one block may opt in to
    shared_per_sm: int
    mma: str  # the SASS mnemonic prefix of its tensor-core instructions as Triton uses them
    tmem_columns: int = 0  # tensor memory per SM (Blackwell), in 32-bit columns of 128 lanes
    registers_per_sm: int = 65536
    max_warps_per_sm: int = 64
    max_blocks_per_sm: int = 32


ARCHES = {
    "sm_80": Arch("sm_80", 80, "A100", 163 * 1024, 164 * 1024, "HMMA"),
    "sm_90a": Arch("sm_90a", 90, "H100", 227 * 1024, 228 * 1024, "HGMMA"),
    "sm_100a": Arch("sm_100a", 100, "B200", 227 * 1024, 228 * 1024, "UTC", 512),  # tcgen05: UTCHMMA, UTCQMMA, ...
}
DOT_KERNELS = compile_report.DOT_KERNELS


@dataclass(frozen=True)
class Job:
    variant: launches.Variant
    config: tuple  # ((name, value), ...): BLOCK_M/N/K, num_warps, num_stages; () for an untuned kernel
    arch: str


def variant_id(v: launches.Variant) -> str:
    return hashlib.sha1(repr((v.kernel, v.signature, v.constexprs, v.attrs)).encode()).hexdigest()[:8]


def precision_class(v: launches.Variant) -> str:
    """"16-bit", "tf32", "tf32x3" or "ieee" (fp32 on FMA units); the input-gradient kernel, which has no dot,
    by its dtype."""
    if v.dtype != "fp32":
        return "16-bit"
    return v.flags.get("INPUT_PRECISION", "fp32")


# ---- compiling one job (in a worker process) ----------------------------------------------------------

def _worker_init(cache_dir: str) -> None:
    os.environ["TRITON_CACHE_DIR"] = cache_dir
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    from triton import knobs

    knobs.compilation.always_compile = True  # a real compile time, and ptxas's log, every time
    knobs.nvidia.dump_ptxas_log = True  # ptxas -v is printed to stdout: registers and spills


def compile_job(job: Job) -> dict:
    """Compile one job and read what the compiler decided; a failure is a record with its error."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    v, arch = job.variant, ARCHES[job.arch]
    config = dict(job.config)
    constexprs = dict(v.constexprs)
    options = {k: constexprs.pop(k, config.pop(k, None)) for k in ("num_warps", "num_stages", "maxnreg")}
    options = {k: val for k, val in options.items() if val is not None}  # an untuned launch's own, or Triton's
    constexprs.update(config)
    constexprs = {_path(launches.KERNELS[v.kernel], name): value for name, value in constexprs.items()}
    attrs = {tuple(path): [list(a) for a in at] for path, at in v.attrs}
    record = dict(job=_job_fields(job), ok=False)
    log = io.StringIO()
    start = time.perf_counter()
    try:
        with contextlib.redirect_stdout(log):
            kernel = triton.compile(ASTSource(launches.KERNELS[v.kernel], dict(v.signature), constexprs, attrs),
                                    target=GPUTarget("cuda", arch.capability, 32), options=options)
    except Exception as err:  # noqa: BLE001 - a compile failure is a result of the report
        record["error"] = f"{type(err).__name__}: {str(err)[-2000:]}"
        return record
    record["compile_s"] = round(time.perf_counter() - start, 3)
    record.update(ok=True, **_resources(kernel, log.getvalue(), arch))
    return record


def _path(fn, name: str) -> tuple:
    """A constexpr's argument path, from its name ("argument", or "argument.index" inside a tuple argument)."""
    first, *rest = name.split(".")
    return (fn.arg_names.index(first), *map(int, rest))


def _job_fields(job: Job) -> dict:
    return dict(arch=job.arch, variant=variant_id(job.variant), config=dict(job.config))


def describe(v: launches.Variant, cases: list) -> dict:
    """A variant as the report lists it: its kernel, label, precision class, constexprs, and the API calls
    that launch it (how many, and the first three)."""
    return dict(kernel=v.kernel, label=v.label, precision=precision_class(v), flags=dict(v.constexprs),
                cases=len(cases), examples=[c.label for c in cases[:3]])


def _resources(kernel, ptxas_log: str, arch: Arch) -> dict:
    spills = re.findall(r"(\d+) bytes spill stores, (\d+) bytes spill loads", ptxas_log)
    registers = re.findall(r"Used (\d+) registers", ptxas_log)
    stack = re.findall(r"(\d+) bytes stack frame", ptxas_log)
    if not (spills and registers):
        raise RuntimeError(f"no ptxas resource line in its log: {ptxas_log[-500:]!r}")
    regs, shared = int(registers[-1]), int(kernel.metadata.shared)
    sass = _sass(kernel.asm["cubin"])
    ptx, ttgir = kernel.asm["ptx"], kernel.asm["ttgir"]
    return dict(
        registers=regs, spill_stores=int(spills[-1][0]), spill_loads=int(spills[-1][1]),
        stack=int(stack[-1]) if stack else 0, shared=shared, tmem=_tmem(kernel),
        mma=_count(sass, r"\b((?:HMMA|HGMMA|UTC\w*MMA|IMMA|QMMA|OMMA)\S*)"),
        mma_ptx=sorted(set(re.findall(r"\b((?:mma\.sync|wgmma\.mma_async|tcgen05\.mma)[\w.:]*)", ptx))),
        ffma=sum(_count(sass, r"\b(FFMA\S*)").values()),
        local_memory_ops=sum(_count(sass, r"\b((?:LDL|STL)\S*)").values()),
        buffers=_buffers(ttgir), loads=_load_kind(ptx),
        occupancy=occupancy(arch, regs, shared, kernel.metadata.num_warps, _tmem(kernel)),
    )


def _tmem(kernel) -> int:
    return int(getattr(kernel.metadata, "tmem_size", 0) or 0)


def _sass(cubin: bytes) -> str:
    import triton

    tool = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin") as f:
        f.write(cubin)
        f.flush()
        return subprocess.run([tool, "-sass", f.name], capture_output=True, text=True, check=True).stdout


def _count(text: str, pattern: str) -> dict:
    """Static instruction counts (mnemonic with modifiers -> count) of the SASS lines matching pattern."""
    counts = collections.Counter()
    for line in text.splitlines():
        if not re.match(r"\s*/\*[0-9a-f]{4}\*/", line):
            continue
        found = re.search(pattern, line.split(";")[0])
        if found:
            counts[found.group(1)] += 1
    return dict(sorted(counts.items()))


def _buffers(ttgir: str) -> int:
    """The depth of the operand pipeline: the leading dimension of the shared-memory tiles the software
    pipeliner allocated (1 when the loads are not multi-buffered, 0 when nothing is staged)."""
    depths = [int(m) for m in re.findall(r"ttg\.local_alloc\s*:\s*\(\)\s*->\s*!ttg\.memdesc<(\d+)x\d+x\d+x", ttgir)]
    if depths:
        return max(depths)
    return 1 if "ttg.local_alloc" in ttgir else 0


def _load_kind(ptx: str) -> str:
    if "cp.async.bulk.tensor" in ptx:
        return "TMA"
    return "cp.async" if "cp.async" in ptx else "registers"


def occupancy(arch: Arch, registers: int, shared: int, num_warps: int, tmem: int = 0) -> dict:
    """Resident blocks and warps per SM: registers are allocated per warp in units of 256, shared memory per
    block with 1 KiB reserved by the system, tensor memory (Blackwell) in the columns a block allocates."""
    per_warp = -(-registers * 32 // 256) * 256
    limits = {
        "registers": (arch.registers_per_sm // per_warp) // num_warps if per_warp else arch.max_blocks_per_sm,
        "shared memory": arch.shared_per_sm // (shared + 1024),
        "warps": arch.max_warps_per_sm // num_warps,
        "tensor memory": arch.tmem_columns // tmem if tmem else arch.max_blocks_per_sm,
    }
    limit = min(limits, key=limits.get)
    blocks = min(limits[limit], arch.max_blocks_per_sm)
    return dict(blocks=blocks, warps=blocks * num_warps, percent=round(100 * blocks * num_warps
                                                                      / arch.max_warps_per_sm, 1), limit=limit)


# ---- what to compile -------------------------------------------------------------------------------

def _risk(config: tuple) -> tuple:
    """Register pressure of a tile configuration: fp32 logits per thread, then pipeline stages."""
    c = dict(config)
    if not c:
        return (0, 0)
    return (c["BLOCK_M"] * c["BLOCK_N"] / (32 * c["num_warps"]), c["num_stages"])


def full_jobs(found: dict, arches) -> list[Job]:
    """Every variant at every configuration it can be launched with, on every arch."""
    jobs = []
    for name in arches:
        for v in (v for v in found if launches.launchable(v, ARCHES[name].capability)):
            for cfg in launches.configs(v, ARCHES[name].capability, ARCHES[name].shared_per_block):
                jobs.append(Job(v, tuple(sorted(cfg.items())), name))
    return jobs


def ci_jobs(found: dict, arches) -> list[Job]:
    """The subset `make test` compiles: on sm_90a every variant at its riskiest configuration, and every
    kernel's plain variant (fewest flags) per precision at all of its configurations; on the other arches the
    riskiest variants (per kernel and precision, those whose set flags are not a subset of another's: the
    most work per tile) at their riskiest configuration."""
    jobs = []
    for name in arches:
        arch = ARCHES[name]
        classes = collections.defaultdict(list)
        for v in (v for v in found if launches.launchable(v, arch.capability)):
            classes[(v.kernel, precision_class(v))].append(v)
        for members in classes.values():
            on = {v: {k for k, val in v.constexprs if val is True} for v in members}
            maximal = [v for v in members if not any(on[v] < on[o] for o in members)]
            plain = min(members, key=lambda v: (len(on[v]), v.label))
            chosen = members if name == "sm_90a" else maximal
            for v in chosen:
                cfgs = [tuple(sorted(c.items())) for c in launches.configs(v, arch.capability, arch.shared_per_block)]
                jobs.append(Job(v, max(cfgs, key=_risk), name))
            if name == "sm_90a":
                for c in launches.configs(plain, arch.capability, arch.shared_per_block):
                    jobs.append(Job(plain, tuple(sorted(c.items())), name))
    return list(dict.fromkeys(jobs))


def cases(subset: str) -> list:
    """The API calls captured: the full grid, or for CI the grid without the fp16 duplicates of bf16."""
    grid = launches.grid()
    if subset == "ci":  # and of the one-program kernels, the two largest BLOCK_N (before Hopper: 32) in bf16, fp32
        grid = [c for c in grid if (c.dtype != "float16" or c == launches.Case(dtype="float16"))
                and (not c.n or (c.n in (32, small.MAX_N) and c.fp32 == "none"))]
    return grid


def run(subset: str, arches, jobs: int, progress=None, with_cases: bool = False) -> dict:
    """Capture, compile, and return the report's data (JSON-ready): meta, the variants by id, one record per
    compilation, and with_cases the variant ids each captured API call launched (by the call's label)."""
    started = time.perf_counter()
    found = launches.variants(cases(subset))
    # variants that differ only in their D bucket (64 and up) compile alike: one job per compilation
    todo = list({(variant_id(j.variant), j.config, j.arch): j
                 for j in (ci_jobs if subset == "ci" else full_jobs)(found, arches)}.values())
    context = multiprocessing.get_context("spawn")  # fresh workers: no torch state forked mid-import
    records = []
    with tempfile.TemporaryDirectory(prefix="fastpair-compile-") as cache, \
            concurrent.futures.ProcessPoolExecutor(jobs, mp_context=context, initializer=_worker_init,
                                                   initargs=(cache,)) as pool:
        for i, record in enumerate(pool.map(compile_job, todo, chunksize=4)):
            records.append(record)
            if progress and (i + 1) % 50 == 0:
                progress(f"{i + 1}/{len(todo)} compiled")
    described = {}
    for v, c in found.items():  # the cases of variants that compile alike, together
        described.setdefault(variant_id(v), (v, []))[1].extend(c)
    data = dict(meta=_meta(subset, arches, jobs, len(described), time.perf_counter() - started),
                variants={k: describe(v, c) for k, (v, c) in described.items()}, records=records)
    if with_cases:
        calls = collections.defaultdict(list)
        for v, cs in found.items():
            for c in cs:
                calls[c.label].append(variant_id(v))
        data["cases"] = dict(calls)
    return data


def _meta(subset: str, arches, jobs: int, num_variants: int, seconds: float) -> dict:
    import torch
    import triton

    import fastpair

    here = os.path.dirname(os.path.abspath(__file__))
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=here).stdout.strip()
    changed = subprocess.run(["git", "status", "--porcelain", "--", "kernels", "fastpair"], capture_output=True,
                             text=True, cwd=here).stdout.strip()
    commit += " with uncommitted kernel or package changes" if changed else ""
    return dict(date=datetime.date.today().isoformat(), commit=commit, fastpair=fastpair.__version__,
                triton=triton.__version__, torch=torch.__version__, subset=subset, arches=list(arches),
                variants=num_variants, workers=jobs, seconds=round(seconds, 1),
                arch_info={a: dict(gpu=ARCHES[a].gpu, shared_per_block=ARCHES[a].shared_per_block, mma=ARCHES[a].mma)
                           for a in arches})


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--subset", choices=("full", "ci"), default="full")
    parser.add_argument("--arch", nargs="+", choices=tuple(ARCHES), default=list(ARCHES))
    parser.add_argument("--jobs", type=int, default=os.cpu_count() or 1, help="compiler processes")
    parser.add_argument("--out", default=OUT, help="folder of compile-<date>.json and .md (full subset)")
    parser.add_argument("--json", help="write the JSON here instead (no Markdown)")
    parser.add_argument("--with-cases", action="store_true", help="record which variants each API call launched")
    args = parser.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET") == "1":
        parser.error("unset TRITON_INTERPRET: the report compiles the kernels, the interpreter only runs them")
    os.environ.setdefault("TRITON_DEFAULT_FP_FUSION", "1")  # Triton 3.9's default, stated to silence its warning
    data = run(args.subset, args.arch, args.jobs, progress=lambda s: print(s, file=sys.stderr, flush=True),
               with_cases=args.with_cases)
    if args.json:
        with open(args.json, "w") as f:
            json.dump(data, f)
        print(compile_report.summary(data))
        return 0
    stem = os.path.join(args.out, f"compile-{data['meta']['date']}")
    with open(stem + ".json", "w") as f:
        json.dump(data, f, separators=(",", ":"))
    with open(stem + ".md", "w") as f:
        f.write(compile_report.markdown(data))
    print(compile_report.summary(data))
    print(f"wrote {stem}.json and .md")
    return 0


if __name__ == "__main__":
    sys.exit(main())
