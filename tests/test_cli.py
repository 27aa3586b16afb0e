"""fastpair-train and fastpair-probe as a user meets them: --help and option errors without torch, help texts,
no abbreviations, progress off a terminal, a run folder never replaced unasked, what the probe wrote, the
provenance in results.json, file modes under the umask, and a complete message for a checkpoint that does not
fit the data."""

from __future__ import annotations

import argparse
import contextlib
import dataclasses
import io
import json
import os
import shutil
import stat
import subprocess
import sys
from datetime import datetime
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from fastpair.training import checkpoint, cli, config, progress  # noqa: E402
from fastpair.training.models import ENCODERS, MultimodalEncoder, input_features  # noqa: E402
from fastpair.training.names import ENCODER_KINDS  # noqa: E402
from helpers import write_small_npz  # noqa: E402

import fastpair  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TINY = ["--device", "cpu", "--width", "16", "--layers", "1", "--batch-size", "32", "--seed", "3"]
UMASK = 0o027  # neither the common 0o022 nor what mkstemp gives (0o600): the mode shows which one applied


def main(*argv) -> int:
    return cli.main([str(a) for a in argv])


def error_line(err: str, prog: str = "fastpair-train") -> str:
    """The one line of an error: exactly one line on stderr, ``PROG: error: ...``."""
    lines = err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"{prog}: error: "), err
    return lines[0]


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    return write_small_npz(tmp_path_factory.mktemp("data") / "small.npz", seed=0)


@pytest.fixture(scope="module")
def run(small_npz, tmp_path_factory):
    """A finished two-epoch run with the random_init baseline, made off a terminal with a progress line for
    every step (interval 0) and under the umask UMASK: its folder, stdout, stderr and command line."""
    out = tmp_path_factory.mktemp("runs") / "run"
    argv = ["--data", small_npz, "--out", str(out), "--epochs", "2", "--baselines", "random_init", *TINY]
    stdout, stderr = io.StringIO(), io.StringIO()
    before = os.umask(UMASK)
    try:
        with pytest.MonkeyPatch.context() as mp, contextlib.redirect_stdout(stdout), \
                contextlib.redirect_stderr(stderr):
            mp.setattr(progress, "INTERVAL_S", 0.0)
            status = cli.main(argv)
    finally:
        os.umask(before)
    assert status == 0, stderr.getvalue()[-3000:]
    return SimpleNamespace(out=out, stdout=stdout.getvalue(), stderr=stderr.getvalue(), argv=argv)


@pytest.fixture
def run_copy(run, tmp_path):
    """A copy of the finished run, for tests that change it."""
    return Path(shutil.copytree(run.out, tmp_path / "run"))


# ------------------------------------------------------------------------------- the command line without torch

# A fresh interpreter runs the console function and reports its exit status and whether torch got imported. It
# starts in the checkout, so that it tests these files and not an installed copy of them.
PROBE_TORCH = """
import sys
from fastpair.training import cli
try:
    status = cli.{function}({argv!r})
except SystemExit as exit:
    status = exit.code
print("STATUS", status, "torch" in sys.modules)
"""


def run_console(function: str, argv: list[str]) -> tuple[int, bool, str, str]:
    code = PROBE_TORCH.format(function=function, argv=argv)
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr[-3000:]
    *printed, last = done.stdout.strip().splitlines()
    _, status, torch_imported = last.split()
    return int(status), torch_imported == "True", "\n".join(printed), done.stderr


@pytest.mark.parametrize("function, argv, status, words", [
    ("main", ["--help"], 0, "usage: fastpair-train"),
    ("probe_main", ["--help"], 0, "usage: fastpair-probe"),
    ("main", ["--epochs", "0"], 2, "fastpair-train: error: --epochs must be >= 1, got 0"),
    ("main", ["--optimizer", "lbfgs"], 2, "fastpair-train: error: --optimizer must be adamw or sgd, got 'lbfgs'"),
    ("main", ["--views", "3"], 2, "--views must be 1 or 2"),
    ("main", ["--encoder", "text=cnn"], 2, "--encoder: NAME=KIND with KIND one of transformer, tcn, gru, mlp"),
    ("main", ["--epochs", "x"], 2, "argument --epochs: invalid int value: 'x'"),
    ("main", ["--no-such-option"], 2, "unrecognized arguments: --no-such-option"),
    ("main", ["--resume", "--overwrite"], 2, "--overwrite: not allowed with argument --resume"),
    ("probe_main", [], 2, "fastpair-probe: error: the following arguments are required: --run"),
    ("main", ["--anchor", "text"], 2, "--anchor applies to --objective gram"),
    ("main", ["--objective", "gram", "--pairs", "anchor:text"], 2, "--pairs applies to the pairwise objectives"),
    ("main", ["--objective", "sigmoid", "--label-smoothing", "0.1"], 2, "--label-smoothing applies to"),
])
def test_help_and_option_errors_come_before_torch(function, argv, status, words):
    """--help and every option error are answered before torch is imported (it takes seconds); an error is one
    line on stderr, exit status 2."""
    got, torch_imported, out, err = run_console(function, argv)
    assert (got, torch_imported) == (status, False), err
    if status == 0:
        assert words in out
    else:
        assert words in error_line(err, "fastpair-" + ("train" if function == "main" else "probe"))


def test_console_scripts_are_the_torch_free_command_lines():
    tomllib = pytest.importorskip("tomllib")  # Python 3.11+
    scripts = tomllib.loads((ROOT / "pyproject.toml").read_text())["project"]["scripts"]
    assert scripts == {"fastpair-train": "fastpair.training.cli:main",
                       "fastpair-probe": "fastpair.training.cli:probe_main"}


def test_device_cuda_without_cuda_is_still_an_option_error(monkeypatch, tmp_path, capsys):
    """The one check that needs torch moved out of the parser, not away."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert main("--device", "cuda", "--out", tmp_path / "x") == 2
    assert error_line(capsys.readouterr().err) == "fastpair-train: error: --device cuda: no CUDA device is available"
    assert not (tmp_path / "x").exists()  # refused before anything was made


def test_encoder_kinds_are_named_once():
    assert tuple(ENCODERS) == ENCODER_KINDS


# ------------------------------------------------------------------------------------------------------- --help

def test_every_option_has_a_help_text_with_its_default_and_choices():
    actions = {a.dest: a for a in config.train_parser()._actions}
    for f in dataclasses.fields(config.Config):
        action = actions[f.name]
        assert action.help and action.help.split(" (default: ")[0], f.name
        shown = {True: "on", False: "off", "": "none"}.get(f.default, f.default) if f.type in ("bool", "str") \
            else f.default
        assert action.help.endswith(f"(default: {shown})"), (f.name, action.help)
        assert action.default is argparse.SUPPRESS, f.name  # no argparse default: --config FILE still counts
        if f.metadata["choices"]:
            assert action.metavar == "{" + ",".join(map(str, f.metadata["choices"])) + "}", f.name
    assert all(actions[name].help for name in ("resume", "overwrite", "config"))


def test_help_shows_defaults_and_choices(capsys):
    with pytest.raises(SystemExit) as done:
        cli.main(["--help"])
    assert done.value.code == 0
    text = " ".join(capsys.readouterr().out.split())  # the help as words, whatever argparse's line breaks
    for option, default in (("--optimizer {adamw,sgd}", "adamw"), ("--objective {nce,sigmoid,gram}", "nce"),
                            ("--schedule {cosine,step}", "cosine"), ("--device {auto,cpu,cuda}", "auto"),
                            ("--views {1,2}", "1"), ("--epochs N", "40"), ("--batch-size B", "128"),
                            ("--data synthetic|PATH", "synthetic"), ("--transductive", "off")):
        assert f" {option} " in text, option  # the option's line (the usage line has "[--option ...]")
        own_help = text.split(f" {option} ", 1)[1]
        assert own_help.split("(default: ", 1)[1].split(")")[0] == default, (option, own_help[:200])


def test_defaults_in_the_help_keep_the_precedence(tmp_path):
    """dataclass defaults < --config FILE < explicit options: an option left out does not reset the file's."""
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"epochs": 7, "optimizer": "sgd", "width": 32}))
    command = config.parse_command(["--config", str(path), "--width", "64"])
    assert (command.cfg.epochs, command.cfg.optimizer, command.cfg.width, command.cfg.lr) == (7, "sgd", 64, 1e-3)
    assert (command.resume, command.overwrite) == (False, False)


# ------------------------------------------------------------------------------------------------ abbreviations

def test_abbreviated_options_are_refused(tmp_path, capsys):
    """--epoch is no --epochs (argparse would take a unique prefix), --dat no --data."""
    assert main("--epoch", "0") == 2
    assert "unrecognized arguments: --epoch 0" in error_line(capsys.readouterr().err)
    assert cli.probe_main(["--run", str(tmp_path), "--dat", "synthetic"]) == 2
    assert "unrecognized arguments: --dat synthetic" in error_line(capsys.readouterr().err, "fastpair-probe")


# ----------------------------------------------------------------------------------------------------- progress

def test_progress_lines_off_a_terminal(run):
    """Off a terminal: plain lines (here one per step: interval 0), never a carriage return; the probe: one line
    per fit, encoders x subsets."""
    err = run.stderr
    assert "\r" not in err
    for epoch in (1, 2):  # 96 train samples in batches of 32; 48 valid samples
        assert f"[pairwise_nce] epoch {epoch}/2: 3/3 steps" in err
    assert err.count("[pairwise_nce] validation: 2/2 batches") == 2
    fits = [line for line in err.splitlines() if line.startswith("[probe] ")]
    assert len(fits) == 2 * 7
    assert fits[3].startswith("[probe] pairwise_nce TA: 4/14 fits") and fits[-1].startswith(
        "[probe] random_init TAV: 14/14 fits")


class Clock:
    def __init__(self, times):
        self.times = iter(times)

    def __call__(self):
        return next(self.times)


def test_progress_lines_are_spaced_by_the_interval():
    stream = io.StringIO()
    # the clock: at the start, then at each update
    bar = progress.Progress(4, "[x] epoch 1/1", "steps", interval=30, stream=stream, clock=Clock([0, 10, 31, 40, 62]))
    for _ in range(4):
        bar.update()
    assert stream.getvalue().splitlines() == ["[x] epoch 1/1: 2/4 steps (31 s, ~31 s left)",
                                              "[x] epoch 1/1: 4/4 steps (62 s)"]


def test_progress_is_a_bar_on_a_terminal():
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    stream = Terminal()
    bar = progress.Progress(3, "[x] validation", "batches", stream=stream)
    for _ in range(3):
        bar.update()
    bar.close()
    assert bar.bar is not None and "\r" in stream.getvalue()
    quiet = progress.Progress(3, "[x]", "steps", interval=0, enabled=False, stream=stream)
    quiet.update()
    assert quiet.bar is None  # torchrun's other ranks


# --------------------------------------------------------------------------------------------- the run folder

def test_a_run_is_not_replaced_unasked(run, capsys):
    before = {p.name: p.read_bytes() for p in run.out.iterdir() if p.is_file()}
    assert main(*run.argv) == 2
    line = error_line(capsys.readouterr().err)
    assert f"--out {run.out} is not empty" in line and "--resume" in line and "--overwrite" in line
    assert {p.name: p.read_bytes() for p in run.out.iterdir() if p.is_file()} == before


def test_overwrite_replaces_the_run_and_keeps_other_files(run, run_copy, small_npz):
    (run_copy / "supervised").mkdir()  # a baseline of the earlier run: would be probed with the new one
    (run_copy / "supervised" / "best.pt").write_bytes(b"stale")
    (run_copy / "notes.txt").write_text("mine")
    assert main("--data", small_npz, "--out", run_copy, "--epochs", "1", "--baselines", "", "--overwrite",
                *TINY) == 0
    assert not (run_copy / "supervised").exists() and (run_copy / "notes.txt").read_text() == "mine"
    with open(run_copy / "log.jsonl") as f:
        assert [json.loads(line).get("epoch") for line in f] == [None, 1]
    assert {r["encoder"] for r in json.loads((run_copy / "results.json").read_text())["rows"]} == {"pairwise_nce"}


def test_an_empty_out_folder_is_fine(small_npz, tmp_path):
    (tmp_path / "empty").mkdir()
    assert main("--data", small_npz, "--out", tmp_path / "empty", "--epochs", "1", "--baselines", "", *TINY) == 0


# ------------------------------------------------------------------------------------------------- the results

def test_probe_says_what_it_wrote_and_replaced(run_copy, capsys):
    os.unlink(run_copy / "results.png")
    assert cli.probe_main(["--run", str(run_copy)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert f"wrote {run_copy / 'results.json'} (replaced the earlier one)" in lines
    assert f"wrote {run_copy / 'results.png'}" in lines


def test_results_record_config_versions_device_date_and_epochs(run):
    results = json.loads((run.out / "results.json").read_text())
    assert {"dataset", "task", "rows"} <= set(results)  # what older readers read
    assert results["config"] == dataclasses.asdict(config.parse_command(run.argv).cfg)
    assert results["versions"] == {"fastpair": fastpair.__version__, "torch": torch.__version__,
                                   "scikit-learn": __import__("sklearn").__version__}
    assert results["device"] == "cpu"
    assert datetime.fromisoformat(results["date"]).tzinfo is not None
    best = torch.load(run.out / "best.pt", weights_only=True)["epoch"]
    assert results["epochs"] == {"pairwise_nce": {"trained": 2, "best": best},
                                 "random_init": {"trained": 0, "best": 0}}


def test_run_files_are_created_with_the_umask(run):
    """Every file of the run: 0666 less the umask (the run was made under UMASK), like log.jsonl."""
    modes = {p.name: stat.S_IMODE(p.stat().st_mode) for p in run.out.iterdir()}
    assert modes == dict.fromkeys(["best.pt", "checkpoint.pt", "log.jsonl", "results.json", "results.png"],
                                  0o666 & ~UMASK)


@pytest.mark.parametrize("umask", [0o022, 0o002, 0o077])
def test_atomic_write_creates_files_with_the_umask(tmp_path, umask):
    before = os.umask(umask)
    try:
        checkpoint.atomic_write(str(tmp_path / "a.bin"), lambda f: f.write(b"new"))
        checkpoint.atomic_save({"w": torch.ones(2)}, str(tmp_path / "b.pt"))
    finally:
        os.umask(before)
    assert {p.name: stat.S_IMODE(p.stat().st_mode) for p in tmp_path.iterdir()} == {
        "a.bin": 0o666 & ~umask, "b.pt": 0o666 & ~umask}


# ---------------------------------------------------------------------------- a checkpoint that does not fit

def test_a_checkpoint_of_other_features_says_which(run, capsys):
    assert cli.probe_main(["--run", str(run.out), "--data", "synthetic"]) == 2
    line = error_line(capsys.readouterr().err, "fastpair-probe")
    assert not line.endswith(":")
    assert line == (f"fastpair-probe: error: {run.out / 'best.pt'} does not fit --data synthetic: the run (trained "
                    f"on {run.argv[1]}) has encoders for the features text (12), audio (7), vision (5); the data "
                    f"has text (300), audio (74), vision (35)")


def test_a_checkpoint_of_other_encoders_says_which(run, tmp_path, capsys):
    """The same names and feature sizes, but vision as (N, F) vectors: an MLP where the run had a GRU."""
    with np.load(run.argv[1]) as z:
        arrays = {k: z[k].mean(axis=1) if k.endswith("/vision") else z[k] for k in z.files}
    np.savez(tmp_path / "vectors.npz", **arrays)
    assert cli.probe_main(["--run", str(run.out), "--data", str(tmp_path / "vectors.npz")]) == 2
    line = error_line(capsys.readouterr().err, "fastpair-probe")
    assert "the same modalities and feature sizes (text (12), audio (7), vision (5)), but other encoders" in line
    assert "weights differ, e.g. encoder.encoders.vision." in line and not line.endswith(":")


@pytest.mark.parametrize("kind", ENCODER_KINDS)
def test_input_features_of_every_encoder_kind(kind):
    dims = {"a": 7, "b": 3} if kind != "mlp" else {"a": 9, "b": 1}
    model = MultimodalEncoder(dims, dict.fromkeys(dims, kind), width=8, layers=2)
    assert input_features(model.state_dict(), prefix="encoders.") == dims
