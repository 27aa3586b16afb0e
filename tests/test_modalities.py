"""The training kit on any set of modalities: names from the data, sequence and vector features, encoders by
option, pair topologies, two temporal crops per clip (--views 2), real data, and every bad argument of both
CLIs."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

pytest.importorskip("sklearn")
from fastpair.training import config, data, experiment, modalities, objectives, train  # noqa: E402
from fastpair.training.cancer import write_cancer  # noqa: E402
from fastpair.training.digits import write_digits  # noqa: E402
from fastpair.training.world import World  # noqa: E402

from fastpair import PairwiseNCE  # noqa: E402

TINY = ["--device", "cpu", "--width", "16", "--layers", "1", "--batch-size", "16", "--seed", "1"]
SIZES = {"train": 96, "valid": 32, "test": 48}


def four_modality_arrays(seed=0) -> dict[str, np.ndarray]:
    """words (N, 6, 5), sound (N, 8, 3) with lengths, gaze (N, 7, 4) and pose (N, 9) vectors: each modality a
    noisy view of a class-dependent code, some samples without sound or pose."""
    rng = np.random.default_rng(seed)
    code = rng.normal(size=(3, 16))
    out = {}
    for split, n in SIZES.items():
        y = rng.integers(0, 3, size=n)
        z = code[y] + 0.5 * rng.normal(size=(n, 16))
        for name, shape in (("words", (6, 5)), ("sound", (8, 3)), ("gaze", (7, 4)), ("pose", (9,))):
            w = rng.normal(size=(16, int(np.prod(shape))))
            out[f"{split}/{name}"] = ((z @ w).reshape(n, *shape) + 0.3 * rng.normal(size=(n, *shape))).astype(
                np.float32)
        lengths = rng.integers(2, 9, size=n)
        out[f"{split}/sound"][np.arange(8) >= lengths[:, None]] = 0.0
        out[f"{split}/sound_lengths"] = lengths
        out[f"{split}/sound"][:3] = 0.0  # no sound at all: a missing modality
        out[f"{split}/sound_lengths"][:3] = 0
        out[f"{split}/pose"][3:5] = 0.0  # a missing vector
        out[f"{split}/labels"] = y
    return out


@pytest.fixture(scope="module")
def four_npz(tmp_path_factory):
    path = tmp_path_factory.mktemp("data") / "four.npz"
    np.savez(path, **four_modality_arrays())
    return str(path)


def run_main(*argv):
    return experiment.main([str(a) for a in argv])


def read_jsonl(path):
    with open(path) as f:
        return [json.loads(line) for line in f if line.strip()]


# ------------------------------------------------------------------------------------------------- the data

def test_names_kinds_and_masks_come_from_the_file(four_npz):
    d = data.load(four_npz)
    assert d.modalities == ("words", "sound", "gaze", "pose")
    assert d.dims == {"words": 5, "sound": 3, "gaze": 4, "pose": 9}
    assert [d.is_sequence(m) for m in d.modalities] == [True, True, True, False]
    train = d.splits["train"]
    assert train.x["pose"].shape == (96, 9) and train.mask["pose"].shape == (96,)
    assert not train.mask["pose"][3:5].any() and train.mask["pose"][5:].all()
    assert not train.mask["sound"][:3].any()
    lengths = four_modality_arrays()["train/sound_lengths"]
    assert (train.mask["sound"].sum(axis=1)[3:] == lengths[3:]).all()
    # standardized with train statistics over the valid entries; padding and missing vectors are 0
    present = train.x["pose"][train.mask["pose"]]
    np.testing.assert_allclose(present.mean(axis=0), 0.0, atol=1e-5)
    assert (train.x["pose"][3:5] == 0).all() and (train.x["sound"][~train.mask["sound"]] == 0).all()


def _npz(tmp_path, arrays, name="bad.npz"):
    path = tmp_path / name
    np.savez(path, **arrays)
    return str(path)


def _without(arrays, *names):
    return {k: v for k, v in arrays.items() if k.split("/")[1] not in names}


BAD_FILES = {
    "one_modality": (lambda a: _without(a, "sound", "gaze", "pose", "sound_lengths"), "at least 2 modalities"),
    "bad_name": (lambda a: {**a, **{f"{s}/two-words": a[f"{s}/pose"] for s in SIZES}}, "two-words"),
    "reserved_name": (lambda a: {**a, **{f"{s}/pose_mask": a[f"{s}/pose"] for s in SIZES}}, "reserved"),
    "four_axes": (lambda a: {**a, "train/pose": a["train/pose"][:, :, None, None]}, "(N, F) vectors"),
    "vector_then_sequence": (lambda a: {**a, "valid/pose": a["valid/pose"][:, None, :]}, "train/pose is (N, F)"),
    "other_features": (lambda a: {**a, "test/words": a["test/words"][..., :4]}, "5 features"),
    "missing_in_a_split": (lambda a: {k: v for k, v in a.items() if k != "valid/gaze"}, "valid/gaze"),
    "empty_split": (lambda a: {k: v[:0] if k.startswith("test/") else v for k, v in a.items()}, "needs samples"),
    "no_time_steps": (lambda a: {**a, "train/words": a["train/words"][:, :0]}, "time steps"),
    "no_features": (lambda a: {**a, "train/pose": a["train/pose"][:, :0]}, "features"),
}


@pytest.mark.parametrize("case", list(BAD_FILES))
def test_bad_files_are_named(case, tmp_path):
    make, words = BAD_FILES[case]
    with pytest.raises(data.DataError, match=None) as err:
        data.load(_npz(tmp_path, make(four_modality_arrays())))
    assert words in str(err.value) and "\n" not in str(err.value)


# ------------------------------------------------------------------------------------ encoders and topologies

def _cfg(*argv):
    return config.parse_config([str(a) for a in argv])[0]


def test_encoders_by_role_by_kind_and_by_option(four_npz):
    d = data.load(four_npz)
    got = modalities.of(_cfg("--data", four_npz), d)
    assert got.kinds == {"words": "transformer", "sound": "transformer", "gaze": "transformer", "pose": "mlp"}
    assert got.pairs is None and got.pair_names()[:2] == ["words-sound", "words-gaze"]
    chosen = modalities.of(_cfg("--encoder", "sound=gru", "--encoder", "gaze=tcn,words=mlp"), d)
    assert chosen.kinds == {"words": "mlp", "sound": "gru", "gaze": "tcn", "pose": "mlp"}
    mer = data.load("synthetic")
    assert modalities.of(_cfg(), mer).kinds == {"text": "transformer", "audio": "tcn", "vision": "gru"}


def test_pair_topologies(four_npz):
    d = data.load(four_npz)
    anchor = modalities.of(_cfg("--pairs", "anchor:pose"), d)
    assert anchor.pairs == [(3, 0), (3, 1), (3, 2)] and anchor.pair_names() == ["pose-words", "pose-sound",
                                                                                 "pose-gaze"]
    listed = modalities.of(_cfg("--pairs", "gaze-words,sound-pose"), d)
    assert listed.pairs == [(2, 0), (1, 3)]


@pytest.mark.parametrize("argv, words", [
    (["--pairs", "anchor:face"], "no modality 'face'"),
    (["--pairs", "words-words"], "with itself"),
    (["--pairs", "words-pose,pose-words"], "twice"),
    (["--encoder", "pose=gru"], "(N, F) vectors"),
    (["--encoder", "face=mlp"], "no modality 'face'"),
])
def test_options_against_the_data(argv, words, four_npz):
    with pytest.raises(config.TrainError) as err:
        modalities.of(_cfg(*argv), data.load(four_npz))
    assert words in str(err.value)


# --------------------------------------------------------------------------------------------- two views

def _two_view_batch(four_npz, world=None, epoch=0, step=0, crop=3):
    """(the two-view batch of a step, the clips it holds, the data)."""
    cfg = _cfg("--data", four_npz, "--views", "2", "--crop-length", crop, *TINY)
    d = data.load(four_npz)
    batches = train.Batches(cfg, d, objectives.build(cfg, d, "pairwise_nce"), world or World())
    order = batches.order(epoch)
    clips = order[step * batches.size:(step + 1) * batches.size]
    return batches.batch(order, step, torch.device("cpu"), epoch), clips, d


def test_two_views_are_crops_of_their_clip(four_npz):
    batch, idx, d = _two_view_batch(four_npz)
    b = len(idx)
    assert batch["ids"].tolist() == idx.tolist() * 2 and len(batch["y"]) == 2 * b
    full = data.to_tensors(d.splits["train"])
    for r in range(2 * b):
        clip = int(batch["ids"][r])
        assert batch["y"][r] == full["y"][clip]
        torch.testing.assert_close(batch["pose"][r], full["pose"][clip], rtol=0, atol=0)  # a vector: whole
        for m in ("words", "sound", "gaze"):
            crop, keep = batch[m][r], batch[m + "_mask"][r]
            assert crop.shape[0] == 3
            if not keep.any():
                assert not full[m + "_mask"][clip].any() or crop.abs().sum() == 0
                continue
            # the valid steps of the crop are consecutive steps of the clip, in order
            series, valid = full[m][clip], full[m + "_mask"][clip]
            starts = [s for s in range(series.shape[0]) if torch.equal(series[s], crop[0])]
            assert any(all(not keep[k] or (s + k < series.shape[0] and valid[s + k]
                                           and torch.equal(series[s + k], crop[k])) for k in range(3))
                       for s in starts), (m, r)


def test_a_crop_longer_than_the_time_axis_is_the_time_axis(four_npz):
    batch, _, d = _two_view_batch(four_npz, crop=1500)
    assert all(batch[m].shape[1] == d.splits["train"].x[m].shape[1] for m in ("words", "sound", "gaze"))


def test_two_views_are_drawn_from_seed_epoch_step_and_rank(four_npz):
    a, _, _ = _two_view_batch(four_npz)
    again, _, _ = _two_view_batch(four_npz)
    later, _, _ = _two_view_batch(four_npz, epoch=1)
    assert all(torch.equal(a[k], again[k]) for k in a)
    assert not torch.equal(a["ids"], later["ids"])
    ranks = [_two_view_batch(four_npz, world=World(rank=r, size=2))[0]["ids"] for r in (0, 1)]
    assert not set(ranks[0].tolist()) & set(ranks[1].tolist())  # the loss gathers ids: no clip on both ranks


def test_two_view_ids_give_the_positives_of_a_clip(four_npz):
    """pairwise_nce with the batch's ids equals the definition written out for one pair: each crop's positives
    are both crops of its clip in the other modality, every other crop a negative."""
    batch, _, _ = _two_view_batch(four_npz)
    g = torch.Generator().manual_seed(0)
    x, y = (torch.randn(len(batch["ids"]), 8, generator=g, dtype=torch.float64) for _ in range(2))
    loss = PairwiseNCE(2, temperature=0.1, learn_temperature=False)(x, y, ids=batch["ids"])
    s = torch.nn.functional.normalize(x, dim=1) @ torch.nn.functional.normalize(y, dim=1).T / 0.1
    same = batch["ids"][:, None] == batch["ids"][None, :]
    assert same.sum(dim=1).eq(2).all()  # exactly the two crops of the clip
    rows = torch.logsumexp(s, dim=1) - (s * same).sum(dim=1) / 2
    cols = torch.logsumexp(s, dim=0) - (s * same).sum(dim=0) / 2
    torch.testing.assert_close(loss, (rows.mean() + cols.mean()) / 2)


# ------------------------------------------------------------------------------------------------ end to end

def test_four_modalities_vector_anchor_and_two_views_end_to_end(four_npz, tmp_path, capsys):
    out = tmp_path / "run"
    assert run_main("--data", four_npz, "--out", out, "--epochs", "2", "--pairs", "anchor:pose",
                    "--encoder", "sound=gru", "--views", "2", "--crop-length", "4", "--label-smoothing", "0.1",
                    "--baselines", "random_init", *TINY) == 0
    printed = capsys.readouterr().out
    assert "modalities: words (6x5, transformer), sound (8x3, gru), gaze (7x4, transformer), pose (9, mlp)" in printed
    _, *log = read_jsonl(out / "log.jsonl")
    assert set(log[-1]["valid_pair_loss"]) == {"pose-words", "pose-sound", "pose-gaze"}
    best = torch.load(out / "best.pt", weights_only=True)["model"]
    assert any(k.startswith("encoder.encoders.sound.rnn") for k in best)
    assert any(k.startswith("encoder.encoders.pose.body") for k in best)
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 2 * 15  # M = 4: every subset, for pairwise_nce and random_init
    assert rows[-1]["modalities"] == ["words", "sound", "gaze", "pose"]
    assert all(np.isfinite(r["metrics"]["accuracy"]) for r in rows)
    os.unlink(out / "results.json")
    assert experiment.probe_main(["--run", str(out)]) == 0
    assert json.loads((out / "results.json").read_text())["rows"] == rows


def test_real_data_shipped_with_scikit_learn_end_to_end(tmp_path):
    """scikit-learn's handwritten digits (real scans, not generated here) as four quadrant modalities."""
    path = str(tmp_path / "digits.npz")
    write_digits(path)
    d = data.load(path)
    assert d.modalities == ("top_left", "top_right", "bottom_left", "bottom_right") and d.classes == [
        str(k) for k in range(10)]
    assert {s: len(sp.y) for s, sp in d.splits.items()} == {"train": 1078, "valid": 359, "test": 360}
    out = tmp_path / "run"
    assert run_main("--data", path, "--out", out, "--epochs", "1", "--baselines", "", *TINY) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 15
    # ten classes: chance is 10%; a linear probe on all four quadrants' features reads the digit
    assert rows[-1]["metrics"]["accuracy"] > 0.6


def test_breast_cancer_views_end_to_end_with_gram(tmp_path):
    """scikit-learn's breast cancer set as three summaries of the same nuclei, trained with --objective gram
    around the "worst" view; the split is the digits' 60/20/20 and depends on the seed alone."""
    path = str(tmp_path / "cancer.npz")
    arrays = write_cancer(path, seed=3)
    d = data.load(path)
    assert d.modalities == ("mean", "error", "worst") and d.classes == ["0", "1"]
    assert {s: len(sp.y) for s, sp in d.splits.items()} == {"train": 341, "valid": 114, "test": 114}
    again = write_cancer(str(tmp_path / "again.npz"), seed=3)
    assert all((arrays[k] == again[k]).all() for k in arrays)
    out = tmp_path / "run"
    assert run_main("--data", path, "--out", out, "--epochs", "1", "--objective", "gram", "--anchor", "worst",
                    "--baselines", "", *TINY) == 0
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert len(rows) == 7 and {r["encoder"] for r in rows} == {"gram_nce"}
    assert rows[-1]["metrics"]["accuracy"] > 0.7  # 63% of the aspirates are benign: above the majority class


# ---------------------------------------------------------------------------------------------- bad arguments

BAD_TRAIN = [
    (["--epochs", "0"], "--epochs"),
    (["--batch-size", "1"], "--batch-size"),
    (["--optimizer", "lbfgs"], "adamw or sgd"),
    (["--baselines", "oracle"], "random_init"),
    (["--objective", "triplet"], "nce, sigmoid or gram"),
    (["--bias", "nan"], "--bias"),
    (["--data", "/nonexistent/file.pkl"], "file.pkl"),
    (["--views", "3"], "--views"),
    (["--crop-length", "-1"], "--crop-length"),
    (["--label-smoothing", "1.0"], "--label-smoothing"),
    (["--label-smoothing", "0.1", "--objective", "sigmoid"], "--objective nce"),
    (["--pairs", "words"], "--pairs"),
    (["--pairs", "anchor:"], "--pairs"),
    (["--pairs", "anchor:face"], "no modality 'face'"),
    (["--pairs", "words-words"], "with itself"),
    (["--encoder", "pose"], "--encoder"),
    (["--encoder", "pose=cnn"], "--encoder"),
    (["--encoder", "pose=mlp", "--encoder", "pose=mlp"], "twice"),
    (["--encoder", "pose=transformer"], "(N, F) vectors"),
    (["--out", "/proc/forbidden"], "cannot create the folder"),
    (["--out", "/proc/self"], "cannot write in the folder"),
    (["--out", "{file}"], "cannot create the folder"),
    (["--out", "{file}/below"], "cannot create the folder"),
    (["--data", "{file}"], "not a supported file"),
    (["--config", "/nonexistent.json"], "cannot read the config file"),
    (["--config", '{config:views="2"}'], "views must be int"),
    (["--config", "{config:lr=true}"], "lr must be float"),
]


def _fill(argv, tmp_path):
    """{file}: a plain file; {config:K=V}: a JSON config file {K: V}, V written in JSON."""
    file = tmp_path / "a_file"
    file.write_text("not a folder")
    out = []
    for a in argv:
        if a.startswith("{config:"):
            key, _, value = a[len("{config:"):-1].partition("=")
            path = tmp_path / "config.json"
            path.write_text(json.dumps({key: json.loads(value)}))
            a = str(path)
        out.append(a.replace("{file}", str(file)))
    return out


@pytest.mark.parametrize("argv, words", BAD_TRAIN)
def test_every_bad_train_argument_gives_one_line(argv, words, four_npz, tmp_path, capsys):
    argv = _fill(argv, tmp_path)
    for option, default in (("--data", four_npz), ("--out", tmp_path / "x"), ("--epochs", "1")):
        if option not in argv:
            argv += [option, default]
    assert run_main(*TINY, *argv) == 2  # argv last: its options win
    err = capsys.readouterr().err.strip()
    assert words in err and err.startswith("fastpair-train: error:") and len(err.splitlines()) == 1


@pytest.fixture(scope="module")
def finished_run(four_npz, tmp_path_factory):
    out = tmp_path_factory.mktemp("runs") / "done"
    assert run_main("--data", four_npz, "--out", out, "--epochs", "1", "--baselines", "", *TINY) == 0
    return out


def test_every_bad_probe_argument_gives_one_line(finished_run, tmp_path, capsys, monkeypatch):
    file = tmp_path / "a_file"
    file.write_text("not data")
    cases = [
        (["--run", str(tmp_path / "nothing")], "no such file"),
        (["--run", str(tmp_path)], "no such file"),
        (["--run", str(finished_run), "--data", str(file)], "not a supported file"),
        (["--run", str(finished_run), "--data", str(tmp_path / "missing.npz")], "cannot read"),
        (["--run", str(finished_run), "--data", "synthetic"], "does not fit --data synthetic"),
        (["--run", str(finished_run), "--data", _npz(tmp_path, {**four_modality_arrays(), "train/labels": np.zeros(
            SIZES["train"], dtype=np.int64)}, "one_class.npz")], "the probe cannot run"),
    ]
    for argv, words in cases:
        assert experiment.probe_main(argv) == 2, argv
        err = capsys.readouterr().err.strip()
        assert words in err and err.startswith("fastpair-probe: error:") and len(err.splitlines()) == 1, err
    # a run folder it cannot write in (as root every folder is writable: the file system's refusal is simulated)
    import tempfile

    def refuse(*args, **kwargs):
        raise PermissionError(13, "Permission denied")

    monkeypatch.setattr(tempfile, "TemporaryFile", refuse)
    assert experiment.probe_main(["--run", str(finished_run)]) == 2
    err = capsys.readouterr().err.strip()
    assert "--run" in err and "cannot write in the folder (Permission denied)" in err


def test_a_sequence_too_long_for_the_transformer_is_refused_before_training(tmp_path):
    rng = np.random.default_rng(0)
    arrays = {}
    for split, n in (("train", 8), ("valid", 4), ("test", 4)):
        steps = 1100 if split == "test" else 16  # only the test split is too long
        arrays[f"{split}/long"] = rng.normal(size=(n, steps, 2)).astype(np.float32)
        arrays[f"{split}/short"] = rng.normal(size=(n, 3)).astype(np.float32)
        arrays[f"{split}/labels"] = np.arange(n) % 2
    d = data.load(_npz(tmp_path, arrays))
    with pytest.raises(config.TrainError, match="long has 1100 time steps"):
        modalities.of(_cfg(), d)
    assert modalities.of(_cfg("--encoder", "long=tcn"), d).kinds["long"] == "tcn"


def test_sigmoid_objective_with_a_pair_list_and_two_views(four_npz, tmp_path):
    out = tmp_path / "run"
    assert run_main("--data", four_npz, "--out", out, "--epochs", "1", "--objective", "sigmoid", "--temperature",
                    "0.1", "--pairs", "words-pose,gaze-sound", "--views", "2", "--baselines", "", *TINY) == 0
    _, *log = read_jsonl(out / "log.jsonl")
    assert list(log[0]["valid_pair_loss"]) == ["words-pose", "gaze-sound"] and "bias" in log[0]
    rows = json.loads((out / "results.json").read_text())["rows"]
    assert [r["encoder"] for r in rows] == ["pairwise_sigmoid"] * 15


def test_a_resumed_two_view_run_ends_with_the_weights_of_an_uninterrupted_one(four_npz, tmp_path):
    """The crops come from (seed, epoch, step, rank) alone and the dropout RNG is in the checkpoint: one epoch,
    then --resume to two, is bitwise the run of two epochs (the step schedule does not depend on the total)."""
    common = ["--data", four_npz, "--views", "2", "--schedule", "step", "--baselines", "", *TINY]
    assert run_main(*common, "--out", tmp_path / "whole", "--epochs", "2") == 0
    assert run_main(*common, "--out", tmp_path / "cut", "--epochs", "1") == 0
    assert run_main(*common, "--out", tmp_path / "cut", "--epochs", "2", "--resume") == 0
    whole, cut = (torch.load(tmp_path / d / "checkpoint.pt", weights_only=True)["model"] for d in ("whole", "cut"))
    assert whole.keys() == cut.keys() and all(torch.equal(whole[k], cut[k]) for k in whole)
