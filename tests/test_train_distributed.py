"""fastpair-train under torchrun on CPU (2 ranks, gloo): one writer, plain checkpoints, the global batch,
resume across a restart and across world sizes, errors that stop every rank (never a hang)."""

from __future__ import annotations

import json
import os
import shutil
import socket
import subprocess
import sys

import pytest
import torch
import torch.distributed as dist

pytest.importorskip("sklearn")
from fastpair.training import config, experiment, objectives  # noqa: E402
from helpers import write_small_npz  # noqa: E402

pytestmark = pytest.mark.skipif(not (dist.is_available() and dist.is_gloo_available()),
                                reason="needs torch.distributed with gloo")

# 96 train samples: 48 per rank, 3 steps of 16 per rank; a single process with batch 32 takes the same 3
# global batches. SGD without dropout, so that the two runs can be compared weight for weight.
TINY = ["--device", "cpu", "--width", "16", "--layers", "1", "--seed", "3", "--dropout", "0", "--optimizer", "sgd",
        "--lr", "0.05"]
TIMEOUT = 180  # seconds for one launch; a hang fails the test instead of blocking it
ENV = dict(os.environ, OMP_NUM_THREADS="1")


@pytest.fixture(scope="module")
def tiny_npz(tmp_path_factory):
    """The small .npz of tests/helpers.py; one train sample has no audio (a masked modality)."""
    return write_small_npz(tmp_path_factory.mktemp("data") / "tiny.npz", seed=1, no_audio=5)


def torchrun(*args, timeout=TIMEOUT):
    """``torchrun --standalone --nproc-per-node 2 -m fastpair.training.train ARGS`` (a free port each time)."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "-m", "fastpair.training.train", *map(str, args)]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=timeout, env=ENV)


def launch_ranks(argvs, timeout=TIMEOUT):
    """Start one process per argv with the environment torchrun gives its ranks, but without torchrun (which
    stops the other ranks as soon as one fails): every rank's own exit status and stderr."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    procs = []
    for rank, argv in enumerate(argvs):
        env = dict(ENV, WORLD_SIZE=str(len(argvs)), RANK=str(rank), LOCAL_RANK=str(rank), MASTER_ADDR="127.0.0.1",
                   MASTER_PORT=str(port))
        procs.append(subprocess.Popen([sys.executable, "-m", "fastpair.training.train", *map(str, argv)], env=env,
                                      stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True))
    results = []
    try:
        for proc in procs:
            out, err = proc.communicate(timeout=timeout)
            results.append((proc.returncode, out, err))
    except subprocess.TimeoutExpired:
        pytest.fail(f"a rank did not finish in {timeout} s (a hang)")
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
    return results


def check_ok(result):
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


@pytest.fixture(scope="module")
def dist_run(tiny_npz, tmp_path_factory):
    """One epoch of fastpair-train under torchrun with both baselines: (run directory, completed process)."""
    out = tmp_path_factory.mktemp("dist") / "run"
    result = torchrun("--data", tiny_npz, "--out", out, "--epochs", "1", "--batch-size", "16", *TINY)
    check_ok(result)
    return out, result


def test_rank0_alone_writes_plain_checkpoints(dist_run, tiny_npz):
    out, result = dist_run
    assert result.stdout.count("[pairwise_nce] epoch") == 1 and result.stdout.count("data: npz") == 1
    assert "2 ranks (gloo), batch 16 per rank, 32 in all" in result.stdout
    for run in (out, out / "supervised"):
        header, *log = read_jsonl(run / "log.jsonl")
        assert "data" in header and [r["epoch"] for r in log] == [1]
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and len(ckpt["rng"]["ranks"]) == 2
    assert not any(k.startswith("module.") for k in ckpt["model"])
    cfg, _ = config.parse_config(["--data", tiny_npz, *TINY])
    from fastpair.training.data import load

    assert ckpt["model"].keys() == objectives.build(cfg, load(tiny_npz), "pairwise_nce").state_dict().keys()
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["encoder"] for r in rows} == {"pairwise_nce", "random_init", "supervised"} and len(rows) == 21
    assert not list(out.rglob("*.tmp*"))  # atomic writes left nothing behind
    assert experiment.probe_main(["--run", str(out)]) == 0  # fastpair-probe reads a torchrun run


def test_global_batch_equals_single_process(dist_run, tiny_npz, tmp_path):
    """2 ranks x 16 take the steps a single process takes with 32 (same samples, gradients up to rounding)."""
    out, _ = dist_run
    single = tmp_path / "single"
    assert experiment.main(["--data", tiny_npz, "--out", str(single), "--epochs", "1", "--batch-size", "32",
                       "--baselines", "supervised", *TINY]) == 0
    for name in ("checkpoint.pt", "supervised/checkpoint.pt"):
        a = torch.load(single / name, weights_only=True)["model"]
        b = torch.load(out / name, weights_only=True)["model"]
        for k in a:
            torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5 * float(a[k].abs().max()) + 1e-7,
                                       msg=lambda m, k=k, name=name: f"{name} {k}: {m}")


def test_chunked_global_batch_equals_single_process(dist_run, tiny_npz, tmp_path):
    """2 ranks x 16 in chunks of 5 (fastpair.GradCache, the ranks' gradients averaged in one all-reduce) take
    the steps of 2 ranks x 16 in whole batches, and so of a single process with 32."""
    out = tmp_path / "chunked"
    result = torchrun("--data", tiny_npz, "--out", out, "--epochs", "1", "--batch-size", "16", "--chunk-size", "5",
                      "--baselines", "", *TINY)
    check_ok(result)
    assert "batch 16 per rank in chunks of 5, 32 in all" in result.stdout
    whole, _ = dist_run
    a = torch.load(whole / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(out / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5 * float(a[k].abs().max()) + 1e-7,
                                   msg=lambda m, k=k: f"{k}: {m}")


def test_resume_under_torchrun_then_single_process(dist_run, tiny_npz, tmp_path):
    out = tmp_path / "run"
    shutil.copytree(dist_run[0], out)
    result = torchrun("--data", tiny_npz, "--out", out, "--epochs", "2", "--batch-size", "16", "--resume", *TINY)
    check_ok(result)
    assert result.stdout.count("[pairwise_nce] resumed at epoch 1 of 2") == 1
    for run in (out, out / "supervised"):
        assert [r.get("epoch") for r in read_jsonl(run / "log.jsonl")] == [None, 1, 2]
    assert torch.load(out / "checkpoint.pt", weights_only=True)["state"]["epoch"] == 2
    # the checkpoint of 2 ranks continues in a single process (another world size: the global batch changes)
    assert experiment.main(["--data", tiny_npz, "--out", str(out), "--epochs", "3", "--batch-size", "16", "--resume",
                       *TINY]) == 0
    for run in (out, out / "supervised"):
        assert [r.get("epoch") for r in read_jsonl(run / "log.jsonl")] == [None, 1, 2, 3]


def test_bad_argument_under_torchrun_fails_fast(tmp_path):
    result = torchrun("--out", tmp_path / "x", "--epochs", "0", timeout=90)
    errors = {line for line in result.stderr.splitlines() if line.startswith("fastpair-train: error:")}
    assert result.returncode != 0 and errors == {"fastpair-train: error: --epochs must be >= 1, got 0"}, \
        result.stderr[-3000:]


def assert_every_rank_failed(results, *words):
    for status, _, err in results:
        lines = err.strip().splitlines()
        assert status == 2 and len(lines) == 1, err[-3000:]
        assert lines[0].startswith("fastpair-train: error: rank 1") and all(w in lines[0] for w in words), lines


def test_an_error_on_one_rank_stops_every_rank(tiny_npz, tmp_path):
    """Rank 1 cannot read its data after the process group started: both ranks exit 2 with the same line."""
    args = ["--out", tmp_path / "x", "--epochs", "1", "--baselines", "", *TINY]
    results = launch_ranks([["--data", tiny_npz, *args], ["--data", tmp_path / "missing.npz", *args]])
    assert_every_rank_failed(results, "missing.npz")
    assert not (tmp_path / "x" / "log.jsonl").exists()


def test_ranks_must_agree_on_options_and_checkpoint(dist_run, tiny_npz, tmp_path):
    args = ["--data", tiny_npz, "--epochs", "2", *TINY]
    results = launch_ranks([["--out", tmp_path / "a", "--batch-size", "16", *args],
                            ["--out", tmp_path / "a", "--batch-size", "8", *args]])
    assert_every_rank_failed(results, "other options", "'batch_size': (16, 8)")
    # --resume where rank 1 does not see rank 0's checkpoint (several nodes without a shared --out)
    run = tmp_path / "run"
    shutil.copytree(dist_run[0], run)
    results = launch_ranks([["--out", run, "--batch-size", "16", "--resume", *args],
                            ["--out", tmp_path / "elsewhere", "--batch-size", "16", "--resume", *args]])
    assert_every_rank_failed(results, "does not see it", "shared filesystem")
    assert [r.get("epoch") for r in read_jsonl(run / "log.jsonl")] == [None, 1]
