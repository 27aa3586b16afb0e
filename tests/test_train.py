"""The training kit end to end on CPU: CLI, checkpoints, resume after kill -9, probe, errors."""

from __future__ import annotations

import json
import math
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

pytest.importorskip("sklearn")
from fastpair.training import checkpoint, config, experiment, objectives, train  # noqa: E402
from fastpair.training.models import MultimodalEncoder, masked_mean, present  # noqa: E402
from helpers import write_small_npz  # noqa: E402

TINY = ["--device", "cpu", "--width", "16", "--layers", "1", "--batch-size", "32", "--seed", "3"]


@pytest.fixture(scope="module")
def small_npz(tmp_path_factory):
    """The small .npz of tests/helpers.py; one NaN in train/audio (set to 0 and counted in the log)."""
    return write_small_npz(tmp_path_factory.mktemp("data") / "small.npz", seed=0, nan_at=(0, 0, 1))


def run_main(*argv):
    return experiment.main([str(a) for a in argv])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


def test_train_and_probe_smoke(small_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main("--data", small_npz, "--out", out, "--epochs", "2", *TINY) == 0
    printed = capsys.readouterr().out
    ckpt = torch.load(out / "checkpoint.pt", weights_only=True)  # plain containers and tensors only
    assert set(ckpt) >= {"model", "optimizer", "scheduler", "config", "state", "rng"}
    assert ckpt["state"]["epoch"] == 2 and ckpt["config"]["epochs"] == 2
    assert any(k.startswith("encoder.encoders.text") for k in ckpt["model"])
    best = torch.load(out / "best.pt", weights_only=True)
    assert "model" in best and (out / "supervised" / "best.pt").exists()
    header, *log = read_jsonl(out / "log.jsonl")
    assert header["data"] == "npz" and header["nonfinite_set_to_0"] == {
        f"{s}/{m}": int((s, m) == ("train", "audio")) for s in ("train", "valid", "test")
        for m in ("text", "audio", "vision")}
    assert [r["epoch"] for r in log] == [1, 2]
    for key in ("train_loss", "valid_loss", "valid_pair_loss", "valid_pair_accuracy", "temperature",
                "samples_per_s", "lr"):
        assert key in log[0]
    assert set(log[0]["valid_pair_loss"]) == {"text-audio", "text-vision", "audio-vision"}
    results = json.loads((out / "results.json").read_text())
    assert results["dataset"] == "npz" and results["task"] == "multiclass"
    rows = results["rows"]
    assert len(rows) == 3 * 7
    assert {r["encoder"] for r in rows} == {"pairwise_nce", "random_init", "supervised"}
    assert all(0.0 <= r["metrics"]["accuracy"] <= 1.0 for r in rows)
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert "pairwise_nce" in printed and "supervised" in printed

    # fastpair-probe on the finished run gives the same table (same frozen features, same fits)
    os.unlink(out / "results.json")
    assert experiment.probe_main(["--run", str(out)]) == 0
    again = json.loads((out / "results.json").read_text())
    assert again["rows"] == rows


def test_sigmoid_objective_trains_and_probes(small_npz, tmp_path):
    """--objective sigmoid: pairwise_sigmoid with a learnable temperature and bias, then the probe, and
    fastpair-probe finds the run's objective in its checkpoint."""
    out = tmp_path / "run"
    assert run_main("--data", small_npz, "--out", out, "--epochs", "2", "--objective", "sigmoid", "--temperature",
                    "0.1", "--bias", "-5", "--baselines", "random_init", *TINY) == 0
    best = torch.load(out / "best.pt", weights_only=True)
    assert {"loss.log_temperature", "loss.bias"} <= set(best["model"]) and best["config"]["objective"] == "sigmoid"
    _, *log = read_jsonl(out / "log.jsonl")
    assert "bias" in log[0] and log[0]["bias"] != -5.0  # learned
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["encoder"] for r in rows} == {"pairwise_sigmoid", "random_init"}
    os.unlink(out / "results.json")
    assert experiment.probe_main(["--run", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_gram_objective_trains_and_probes(small_npz, tmp_path, capsys):
    """--objective gram --anchor NAME: gram_nce with a learnable temperature around the named anchor, both
    directions' validation losses and accuracies in the log, the probe; an unknown anchor is a clear error."""
    out = tmp_path / "run"
    anchor = "audio"
    assert run_main("--data", small_npz, "--out", out, "--epochs", "2", "--objective", "gram", "--anchor", anchor,
                    "--label-smoothing", "0.05", "--baselines", "random_init", *TINY) == 0
    best = torch.load(out / "best.pt", weights_only=True)
    assert "loss.log_temperature" in best["model"] and best["config"]["anchor"] == anchor
    _, *log = read_jsonl(out / "log.jsonl")
    assert set(log[0]["valid_direction_accuracy"]) == {f"{anchor}->tuples", f"tuples->{anchor}"}
    assert log[0]["temperature"] != 0.07  # learned
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert {r["encoder"] for r in rows} == {"gram_nce", "random_init"}
    assert run_main("--data", small_npz, "--out", tmp_path / "bad", "--objective", "gram", "--anchor", "smell",
                    *TINY) == 2
    assert "--anchor: the data has no modality 'smell'" in capsys.readouterr().err


def test_default_synthetic_run_starts(tmp_path):
    """The default data (synthetic) through one short epoch, no baselines (the full run is `make train`)."""
    out = tmp_path / "syn"
    assert run_main("--out", out, "--epochs", "1", "--baselines", "", *TINY) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 7 and rows[-1]["modalities"] == ["text", "audio", "vision"]


def _train_cmd(data, out, epochs):
    return [sys.executable, "-m", "fastpair.training.train", "--data", data, "--out", str(out), "--epochs",
            str(epochs), "--baselines", "", *TINY]


def _weights(path):
    return torch.load(path, weights_only=True)["model"]


@pytest.mark.gpu
def test_cuda_training_step_runs(small_npz, tmp_path):
    """The CUDA path of the loop: bf16 autocast, the Triton loss (backend auto), checkpoints readable on CPU."""
    out = tmp_path / "cuda"
    argv = [a for a in TINY if a not in ("--device", "cpu")]
    assert run_main("--data", small_npz, "--out", out, "--epochs", "2", "--device", "cuda", "--baselines", "",
                    *argv) == 0
    log = read_jsonl(out / "log.jsonl")[1:]
    assert [r["epoch"] for r in log] == [1, 2] and all(math.isfinite(r["train_loss"]) for r in log)
    model = torch.load(out / "best.pt", weights_only=True, map_location="cpu")["model"]
    assert all(torch.isfinite(v).all() for v in model.values() if v.is_floating_point())


def test_resume_after_kill_is_bitwise_exact(small_npz, tmp_path):
    """kill -9 a run (mid-epoch or mid-write), resume it: the final weights equal an uninterrupted run's."""
    env = dict(os.environ, OMP_NUM_THREADS="1")
    full = tmp_path / "full"
    subprocess.run(_train_cmd(small_npz, full, 6), check=True, env=env, capture_output=True)

    cut = tmp_path / "cut"
    proc = subprocess.Popen(_train_cmd(small_npz, cut, 6), env=env, stdout=subprocess.DEVNULL,
                            stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if (cut / "checkpoint.pt").exists() and torch.load(cut / "checkpoint.pt", weights_only=True)["state"][
                "epoch"] >= 2:
            break
        time.sleep(0.005)
    time.sleep(0.05)  # somewhere in epoch 3 (or in the middle of writing its checkpoint)
    if proc.poll() is not None:
        pytest.fail("the run finished before it could be killed; the test needs a longer run")
    os.kill(proc.pid, signal.SIGKILL)
    proc.wait()
    interrupted_at = torch.load(cut / "checkpoint.pt", weights_only=True)["state"]["epoch"]
    assert 2 <= interrupted_at < 6

    done = subprocess.run(_train_cmd(small_npz, cut, 6) + ["--resume"], env=env, capture_output=True, text=True)
    assert done.returncode == 0, done.stderr
    a, b = _weights(full / "checkpoint.pt"), _weights(cut / "checkpoint.pt")
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k
    assert torch.equal(_weights(full / "best.pt")["encoder.heads.text.0.weight"],
                       _weights(cut / "best.pt")["encoder.heads.text.0.weight"])
    assert [r.get("epoch") for r in read_jsonl(cut / "log.jsonl")] == [None, *range(1, 7)]


def test_atomic_save_keeps_the_old_file(tmp_path, monkeypatch):
    path = str(tmp_path / "checkpoint.pt")
    checkpoint.atomic_save({"model": {"w": torch.ones(3)}}, path)

    def broken_save(obj, f):
        f.write(b"partial")
        raise KeyboardInterrupt  # interrupted in the middle of writing

    monkeypatch.setattr(torch, "save", broken_save)
    with pytest.raises(KeyboardInterrupt):
        checkpoint.atomic_save({"model": {"w": torch.zeros(3)}}, path)
    assert torch.equal(torch.load(path, weights_only=True)["model"]["w"], torch.ones(3))
    assert os.listdir(tmp_path) == ["checkpoint.pt"]  # no temporary file left behind


def test_resume_with_other_arguments_is_refused(small_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main("--data", small_npz, "--out", out, "--epochs", "1", "--baselines", "", *TINY) == 0
    capsys.readouterr()
    status = run_main("--data", small_npz, "--out", out, "--epochs", "2", "--baselines", "", "--lr", "0.5",
                      "--resume", *TINY)
    err = capsys.readouterr().err
    errors = [line for line in err.splitlines() if line.startswith("fastpair-train: error:")]
    assert status == 2 and len(errors) == 1 and "'lr': (0.001, 0.5)" in errors[0], err


def test_resume_continues_to_the_new_total(small_npz, tmp_path):
    out = tmp_path / "run"
    assert run_main("--data", small_npz, "--out", out, "--epochs", "1", "--baselines", "", *TINY) == 0
    assert run_main("--data", small_npz, "--out", out, "--epochs", "2", "--baselines", "", "--resume",
                    *TINY) == 0
    assert [r.get("epoch") for r in read_jsonl(out / "log.jsonl")] == [None, 1, 2]


def test_config_file_and_overrides(tmp_path):
    path = tmp_path / "cfg.json"
    path.write_text(json.dumps({"lr": 0.01, "epochs": 7, "width": 32}))
    cfg, resume = config.parse_config(["--config", str(path), "--epochs", "3"])
    assert (cfg.lr, cfg.epochs, cfg.width, resume) == (0.01, 3, 32, False)
    toml = tmp_path / "cfg.toml"
    toml.write_text('optimizer = "sgd"\ntransductive = true\n')
    cfg, _ = config.parse_config(["--config", str(toml), "--resume"])
    assert cfg.optimizer == "sgd" and cfg.transductive
    path.write_text(json.dumps({"learning_rate": 0.01}))
    with pytest.raises(config.TrainError, match="unknown options"):
        config.parse_config(["--config", str(path)])


def test_missing_train_extra_is_named(monkeypatch, capsys, tmp_path):
    import builtins

    real_import = builtins.__import__

    def no_sklearn(name, *args, **kwargs):
        if name == "sklearn" or name.startswith("sklearn."):
            raise ImportError("No module named 'sklearn'")
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_sklearn)
    assert experiment.main(["--out", str(tmp_path)]) == 2
    assert "pip install 'fastpair[train]'" in capsys.readouterr().err


def test_missing_tensorboard_is_named(monkeypatch, capsys, tmp_path):
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)  # import now raises ImportError
    assert experiment.main(["--out", str(tmp_path), "--tensorboard", *TINY]) == 2
    err = capsys.readouterr().err.strip()
    assert err == "fastpair-train: error: --tensorboard needs the tensorboard package: pip install tensorboard"


def test_learning_rate_schedules():
    cfg = config.Config(epochs=10, lr=1.0)
    lrs = [train.learning_rate(cfg, s, 10) for s in range(100)]
    assert lrs[0] == pytest.approx(0.1) and lrs[9] == pytest.approx(1.0)  # one-epoch linear warmup
    assert lrs[-1] == pytest.approx(0.1, abs=0.02) and all(a >= b for a, b in zip(lrs[10:], lrs[11:]))
    step = config.Config(epochs=10, lr=1.0, schedule="step")
    assert train.learning_rate(step, 49, 10) == 1.0 and train.learning_rate(step, 50, 10) == pytest.approx(0.9)


def test_encoders_handle_missing_modalities():
    torch.manual_seed(0)
    dims = {"text": 12, "audio": 7, "vision": 5}
    batch = {m: torch.randn(4, 6, f) for m, f in dims.items()}
    for m in dims:
        batch[m + "_mask"] = torch.ones(4, 6, dtype=torch.bool)
    batch["text_mask"][1] = False  # sample 1 has no text
    batch["audio_mask"][2, 3:] = False  # sample 2 has 3 audio and 4 vision steps
    batch["vision_mask"][2, 4:] = False
    model = MultimodalEncoder(dims, {"text": "transformer", "audio": "tcn", "vision": "gru"}, width=16, layers=1).eval()
    feats = model.features(batch)
    assert all(f.shape == (4, 512) and torch.isfinite(f).all() for f in feats.values())
    assert present(batch, dims).tolist() == [[True, False, True, True], [True] * 4, [True] * 4]
    # padding does not change a sample's feature: cut sample 2's audio and vision to their valid steps
    short = {k: v[2:3, :3] if k.startswith("audio") else v[2:3, :4] if k.startswith("vision") else v[2:3]
             for k, v in batch.items()}
    for m in ("audio", "vision"):
        torch.testing.assert_close(model.features(short)[m], feats[m][2:3], rtol=1e-5, atol=1e-5)
    h = torch.arange(12.0).reshape(1, 4, 3)
    torch.testing.assert_close(masked_mean(h, torch.tensor([[True, False, True, False]])),
                               torch.tensor([[3.0, 4.0, 5.0]]))


def test_objectives_share_the_initial_encoders_and_one_interface(small_npz):
    """random_init is pairwise_nce's encoders as built; supervised starts from the same weights; the loop
    calls every objective the same way, and only a label-free one trains on valid and test (--transductive)."""
    from fastpair.training.data import load, to_tensors
    from fastpair.training.world import World

    cfg, _ = config.parse_config(["--data", small_npz, "--transductive", *TINY])
    data = load(small_npz)
    models = {name: objectives.build(cfg, data, name).eval() for name in ("pairwise_nce", "supervised")}
    first, second = (m.encoder.state_dict() for m in models.values())
    assert first.keys() == second.keys() and all(torch.equal(first[k], second[k]) for k in first)
    batch = to_tensors(data.splits["valid"])
    summaries = {}
    for name, model in models.items():
        loss, stats = model.validation(batch)
        assert loss.ndim == 0 and torch.isfinite(loss), name
        torch.testing.assert_close(model(batch), loss)  # eval mode: the training loss of the same batch
        summaries[name] = model.summary(stats)
    assert set(summaries["pairwise_nce"]) == {"valid_pair_loss", "valid_pair_accuracy", "temperature"}
    assert summaries["supervised"] == {}
    assert train.Batches(cfg, data, models["pairwise_nce"], World()).splits == ["train", "valid", "test"]
    assert train.Batches(cfg, data, models["supervised"], World()).splits == ["train"]


def test_chunked_steps_are_the_whole_batch_steps(small_npz, tmp_path, capsys):
    """--chunk-size runs the encoders on chunks (fastpair.GradCache) with the same gradients: without dropout
    and with SGD, an epoch in chunks of 7 ends with the weights of the same epoch in whole batches of 32; the
    log and the console say the batch and the chunk."""
    base = ["--data", small_npz, "--epochs", "1", "--baselines", "", "--dropout", "0", "--optimizer", "sgd",
            "--lr", "0.05", *TINY]
    assert run_main(*base, "--out", tmp_path / "whole") == 0
    assert run_main(*base, "--out", tmp_path / "chunks", "--chunk-size", "7") == 0
    assert "batch 32 in chunks of 7" in capsys.readouterr().out
    a = torch.load(tmp_path / "whole" / "checkpoint.pt", weights_only=True)["model"]
    b = torch.load(tmp_path / "chunks" / "checkpoint.pt", weights_only=True)["model"]
    for k in a:
        torch.testing.assert_close(b[k], a[k], rtol=0, atol=1e-5 * float(a[k].abs().max()) + 1e-7,
                                   msg=lambda m, k=k: f"{k}: {m}")
    first = read_jsonl(tmp_path / "chunks" / "log.jsonl")[0]
    assert first["batch_size"] == 32 and first["chunk_size"] == 7


def test_a_run_resumes_with_other_chunks(small_npz, tmp_path):
    """Chunks change no gradient: a run stopped for lack of memory resumes with smaller ones."""
    out = tmp_path / "run"
    base = ["--data", small_npz, "--out", out, "--baselines", "", *TINY]
    assert run_main(*base, "--epochs", "1", "--chunk-size", "16") == 0
    assert run_main(*base, "--epochs", "2", "--chunk-size", "8", "--resume") == 0
    assert [r["epoch"] for r in read_jsonl(out / "log.jsonl")[1:]] == [1, 2]
