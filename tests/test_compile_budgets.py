"""Compile budgets: what a GPU compiler makes of the Triton kernels, held without a GPU (bench/compile.py).

The CI subset of the compile report (bench.compile.ci_jobs: on sm_90a every launch variant the API's options
produce, at its riskiest tile configuration, and each kernel's plain variant at all of its configurations;
on sm_80 and sm_100a the variants with the most work per tile) is compiled once per session in a subprocess
(the kernels must be compiled, not interpreted: no TRITON_INTERPRET there) and held to:
- every launch compiles for every arch;
- 0 bytes spilled (stores and loads), for every input precision;
- every kernel with a tl.dot issues the arch's tensor-core instructions (HMMA on sm_80, HGMMA on sm_90a,
  tcgen05's UTC*MMA on sm_100a; the one-program kernels' small tiles may take HMMA on sm_90a) for 16-bit,
  TF32 and 3xTF32 inputs, fp32 included (IEEE fp32, which a user must ask for, runs on the FMA units);
- shared memory within the arch's per-block limit, and at least one block of every compilation fits an SM.
And the capture itself: the launches it records are those the launchers must make (3xTF32 for fp32 under
torch's default, TF32 where allowed, a learnable temperature's dL/dt and device flag).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys

import pytest

from bench.compile_report import DOT_KERNELS, has_tensor_cores, rows

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
TENSOR_CORES = ("16-bit", "tf32", "tf32x3")  # input precisions whose dots must run on tensor cores
MMA = {"sm_80": "HMMA", "sm_90a": "HGMMA", "sm_100a": "UTC"}
SHARED_PER_BLOCK = {"sm_80": 163 * 1024, "sm_90a": 227 * 1024, "sm_100a": 227 * 1024}


def _ptxas_available() -> bool:
    try:
        import triton
    except Exception:  # noqa: BLE001 - Triton missing or broken: nothing to compile
        return False
    return os.path.exists(os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "ptxas"))


@pytest.fixture(scope="module")
def report(tmp_path_factory):
    if not _ptxas_available():
        pytest.skip("Triton's CUDA backend (ptxas) is not installed here")
    import torch

    if torch.cuda.is_available():  # CPU CI holds these on every commit; a GPU session's minutes go to timing
        pytest.skip("compile budgets are checked without a GPU (make test on CPU, make gpu-compile)")
    out = tmp_path_factory.mktemp("compile") / "ci.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    run = subprocess.run([sys.executable, "-m", "bench.compile", "--subset", "ci", "--with-cases", "--json", str(out)],
                         cwd=ROOT,
                         env=env, capture_output=True, text=True, timeout=1800)
    assert run.returncode == 0, run.stderr[-4000:]
    with open(out) as f:
        data = json.load(f)
    data["rows"] = rows(data)
    return data


def _where(record) -> str:
    job = record["job"]
    return f"{job['arch']} {job['label']} {job['config']}"


def test_every_launch_compiles_on_every_arch(report):
    failed = [f"{_where(r)}: {r['error'][:300]}" for r in report["rows"] if not r["ok"]]
    assert not failed, "\n".join(failed)
    assert {r["job"]["arch"] for r in report["rows"]} == set(MMA)


def test_no_spills(report):
    spilled = [f"{_where(r)}: {r['spill_stores']} B stored, {r['spill_loads']} B loaded, {r['registers']} registers"
               for r in report["rows"] if r["ok"] and (r["spill_stores"] or r["spill_loads"])]
    assert not spilled, f"{len(spilled)} compilations spill:\n" + "\n".join(spilled)


def test_dots_run_on_tensor_cores(report):
    """fp32 too: TF32 or 3xTF32 products; never FMA dots unless IEEE fp32 was asked for."""
    dots = [r for r in report["rows"] if r["ok"] and r["job"]["kernel"] in DOT_KERNELS
            and r["job"]["precision"] in TENSOR_CORES]
    assert dots
    missing = [_where(r) for r in dots if not has_tensor_cores(r, MMA[r["job"]["arch"]])]
    assert not missing, "dot kernels without tensor-core instructions:\n" + "\n".join(missing)
    ieee = [r for r in report["rows"] if r["ok"] and r["job"]["precision"] == "ieee"]
    assert ieee and all(not r["mma"] for r in ieee), "IEEE fp32 should use FMA units only (the check's own sanity)"


def test_every_launch_fits_an_sm(report):
    """At least one block of every compilation fits an SM (registers x threads, shared memory): a launch that
    does not fails at run time with "too many resources requested"."""
    unlaunchable = [f"{_where(r)}: {r['registers']} registers, {r['shared']} B shared" for r in report["rows"]
                    if r["ok"] and r["occupancy"]["blocks"] < 1]
    assert not unlaunchable, "\n".join(unlaunchable)


def test_shared_memory_within_the_arch_limit(report):
    over = [f"{_where(r)}: {r['shared']} B" for r in report["rows"]
            if r["ok"] and r["shared"] > SHARED_PER_BLOCK[r["job"]["arch"]]]
    assert not over, "\n".join(over)


def test_subset_covers_every_variant_on_sm90(report):
    """Each launch variant appears at least once on sm_90a, and every kernel and precision on the other arches."""
    records = report["rows"]
    on_90 = {r["job"]["variant"] for r in records if r["job"]["arch"] == "sm_90a"}
    assert len(on_90) == report["meta"]["variants"]
    for arch in ("sm_80", "sm_100a"):
        seen = {(r["job"]["kernel"], r["job"]["precision"]) for r in records if r["job"]["arch"] == arch}
        assert seen == {(r["job"]["kernel"], r["job"]["precision"]) for r in records if r["job"]["arch"] == "sm_90a"}


def _launched(report, case_label: str) -> list[dict]:
    """The sm_90a records of launches the case with this label made (the labels in bench.launches.Case)."""
    ids = set(report["cases"][case_label])
    return [r for r in report["rows"] if r["job"]["arch"] == "sm_90a" and r["job"]["variant"] in ids]


@pytest.mark.parametrize("case,kernel,flags", [
    ("nce fp32/none D=512 t=number", "fwd_kernel", {"INPUT_PRECISION": "tf32x3", "BOUNDED": True}),
    ("nce fp32/tf32 D=512 t=number", "grad_panel_kernel", {"INPUT_PRECISION": "tf32"}),
    ("nce fp32/ieee D=512 t=number", "fwd_kernel", {"INPUT_PRECISION": "ieee"}),
    ("nce bfloat16 D=512 t=learned", "grad_panel_kernel", {"NEEDS_DT": True, "BOUND_ON_DEVICE": True}),
    ("sigmoid bfloat16 D=512 t=learned", "grad_panel_kernel", {"NEEDS_DT": True, "NEEDS_DB": True, "SIGMOID": True}),
    ("nce bfloat16 D=512 t=number stats", "fwd_kernel", {"STATS": True, "ATOMIC_COLS": False}),
    # GRAM: k = M - 1 similarity tiles, both sweep directions, the targets by id, 3xTF32 for fp32
    ("gram fp32/none D=512 t=number ids M=4", "gram_fwd_kernel", {"K": 3, "DIRECTION": 1, "IDENTITY": False,
                                                                   "INPUT_PRECISION": "tf32x3"}),
    ("gram bfloat16 D=512 t=number mask stats M=2", "gram_fwd_kernel", {"K": 1, "DIRECTION": 0, "HAS_MASK": True,
                                                                         "STATS": True}),
    ("gram bfloat16 D=512 t=number", "gram_grad_kernel", {"K": 2, "IDENTITY": True}),
    # the one program: GRAM's own D chunks (kernels/gram_small.chunks), k = M - 1 pairs of one anchor
    ("gram bfloat16 D=512 t=learned mask ids M=4 small N=32", "gram_small_kernel",
     {"NUM_M": 4, "BLOCK_N": 32, "BLOCK_D": 16, "BLOCK_DG": 8, "NEEDS_DT": True, "HAS_MASK": True, "HAS_IDS": True}),
    ("gram fp32/none D=512 t=number M=2 small N=64", "gram_small_kernel",
     {"NUM_M": 2, "BLOCK_N": 64, "BLOCK_D": 16, "INPUT_PRECISION": "tf32x3", "NEEDS_DT": False}),
])
def test_capture_records_what_the_launchers_choose(report, case, kernel, flags):
    """The report compiles what the host code launches: a case's launches carry the flags its options imply."""
    launched = [r for r in _launched(report, case) if r["job"]["kernel"] == kernel]
    assert launched, f"no {kernel} launch recorded for {case!r}"
    assert any(all(r["job"]["flags"].get(k) == v for k, v in flags.items()) for r in launched), \
        [r["job"]["flags"] for r in launched]
