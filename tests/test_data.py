"""fastpair.training.data: the real layouts (written small in tmp_path), hygiene, the restricted unpickler, errors,
and the synthetic set."""

from __future__ import annotations

import os
import pickle

import numpy as np
import pytest
import torch
from fastpair.training import data
from fastpair.training.data import MODALITIES, SPLITS, DataError
from fastpair.training.synthetic import make_synthetic

MULT_DIMS = {"text": 300, "audio": 74, "vision": 35}
SIZES = {"train": 12, "valid": 5, "test": 7}


def _features(rng, n, t, dims, pad_last=2, dtype=np.float32):
    """(N, T, F) per modality; sample 0 has its last ``pad_last`` steps zero-padded (MulT style)."""
    x = {m: rng.normal(loc=1.0, size=(n, t, f)).astype(dtype) for m, f in dims.items()}
    for m in x:
        x[m][0, t - pad_last:] = 0.0
    return x


def _mult(rng, labels: str, t=6) -> dict:
    out = {}
    for s, n in SIZES.items():
        d = _features(rng, n, t, MULT_DIMS)
        if labels == "iemocap":
            cls = rng.integers(4, size=n)
            lab = np.zeros((n, 4, 2), np.float32)
            lab[:, :, 0] = 1.0
            lab[np.arange(n), cls] = [0.0, 1.0]
            d["labels"] = lab
        else:
            d["labels"] = rng.uniform(-3, 3, size=(n, 1, 1)).astype(np.float32)
        d["id"] = np.array([f"{s}_{i}" for i in range(n)])
        out[s] = d
    return out


def _mmsa(rng, t=(5, 8, 6), dims=(16, 5, 7)) -> dict:
    out = {}
    for s, n in SIZES.items():
        d = {m: rng.normal(size=(n, tm, f)).astype(np.float32) for m, tm, f in zip(MODALITIES, t, dims)}
        d["text_bert"] = rng.integers(0, 100, size=(n, 3, t[0])).astype(np.float32)
        d["audio_lengths"] = [int(v) for v in rng.integers(1, t[1] + 1, size=n)]  # a list, as MMSA writes them
        d["vision_lengths"] = rng.integers(1, t[2] + 1, size=n)
        d["vision_lengths"][0] = 0  # a sample without vision
        d["vision_lengths"][1] = t[2] + 3  # longer than the array: all steps valid
        d["regression_labels"] = rng.uniform(-3, 3, size=n).astype(np.float32)
        d["classification_labels"] = rng.integers(3, size=n)
        d["raw_text"] = np.array([f"utterance {i}" for i in range(n)], dtype=object)
        d["id"] = np.array([f"video_{i}$_$0" for i in range(n)], dtype=object)
        out[s] = d
    return out


def _dump(path, obj, protocol=pickle.HIGHEST_PROTOCOL):
    path.write_bytes(pickle.dumps(obj, protocol=protocol))
    return str(path)


def _npz(path, raw, labels_key="labels"):
    flat = {f"{s}/{k}": v for s, d in raw.items() for k, v in d.items() if k in (*MODALITIES, labels_key)}
    with open(path, "wb") as fh:
        np.savez(fh, **flat)
    return str(path)


def _check_common(d: data.MERData, raw: dict, label_key: str):
    assert set(d.splits) == set(SPLITS)
    assert set(d.nonfinite) == {f"{s}/{m}" for s in SPLITS for m in MODALITIES}
    for s in SPLITS:
        sp = d.splits[s]
        n = len(raw[s][label_key])
        assert sp.y.shape == (n,)
        for m in MODALITIES:
            assert sp.x[m].dtype == np.float32 and sp.x[m].shape == raw[s][m].shape
            assert sp.mask[m].dtype == np.bool_ and sp.mask[m].shape == raw[s][m].shape[:2]
            assert np.isfinite(sp.x[m]).all()
            assert not sp.x[m][~sp.mask[m]].any(), f"{s}/{m}: padding steps are not 0"
    assert d.dims == {m: raw["train"][m].shape[-1] for m in MODALITIES}


# --------------------------------------------------------------------------------------------------- layouts

def test_mult_iemocap(tmp_path, capsys):
    rng = np.random.default_rng(0)
    raw = _mult(rng, "iemocap")
    raw["train"]["audio"][1, 0, 3] = -np.inf  # MulT's MOSEI has -inf audio values
    raw["train"]["audio"][2, 1, :2] = np.nan
    raw["test"]["vision"][3, 2, 4] = np.inf
    raw["valid"]["labels"][0] = 0.0  # no present bit: argmax -> neutral
    raw["valid"]["labels"][1, :, 1] = [0, 1, 1, 0]  # happy and sad: argmax -> the first, happy
    d = data.load(_dump(tmp_path / "any_name.bin", raw), seed=0)
    _check_common(d, raw, "labels")
    assert (d.name, d.task, d.classes) == ("iemocap", "multiclass", ["neutral", "happy", "sad", "angry"])
    assert d.source.endswith("any_name.bin")
    for s in SPLITS:
        assert d.splits[s].y.dtype == np.int64
        expect = raw[s]["labels"][:, :, 1].argmax(1)
        np.testing.assert_array_equal(d.splits[s].y, expect)
        for m in MODALITIES:  # sample 0 is zero-padded on its last 2 of 6 steps, the others are not
            np.testing.assert_array_equal(d.splits[s].mask[m][0], [True] * 4 + [False] * 2)
            assert d.splits[s].mask[m][1:].all()
    assert d.splits["valid"].y[0] == 0 and d.splits["valid"].y[1] == 1
    assert d.nonfinite["train/audio"] == 3 and d.nonfinite["test/vision"] == 1
    assert sum(d.nonfinite.values()) == 4
    err = capsys.readouterr().err
    assert "train/audio: 3" in err and "test/vision: 1" in err
    assert "no or several present" in err


def test_nonfinite_become_zero_before_standardization(tmp_path):
    """A NaN step is data (masked in), its value is 0 before standardization: -mean/std after it."""
    rng = np.random.default_rng(1)
    raw = _mult(rng, "sentiment")
    raw["train"]["text"][3, 2, :] = np.nan
    d = data.load(_dump(tmp_path / "m.pkl", raw))
    assert d.splits["train"].mask["text"][3, 2]
    text = raw["train"]["text"].copy()
    text[3, 2, :] = 0.0
    valid = text[d.splits["train"].mask["text"]]
    expect = (0.0 - valid.mean(0)) / valid.std(0)
    np.testing.assert_allclose(d.splits["train"].x["text"][3, 2], expect, rtol=1e-4, atol=1e-4)


def test_mult_sentiment(tmp_path):
    raw = _mult(np.random.default_rng(2), "sentiment")
    d = data.load(_dump(tmp_path / "mosi_like", raw, protocol=2))
    _check_common(d, raw, "labels")
    assert (d.name, d.task, d.classes) == ("mult-sentiment", "regression", None)
    for s in SPLITS:
        assert d.splits[s].y.dtype == np.float32
        np.testing.assert_array_equal(d.splits[s].y, raw[s]["labels"].reshape(-1))
    assert not any(d.nonfinite.values())


def test_mmsa_with_lengths(tmp_path):
    raw = _mmsa(np.random.default_rng(3))
    raw["train"]["text"][2, 3:] = 0.0  # no text lengths: zero steps are padding
    d = data.load(_dump(tmp_path / "unaligned_50.pkl", raw))
    _check_common(d, raw, "regression_labels")
    assert (d.name, d.task, d.classes) == ("mmsa", "regression", None)
    for s in SPLITS:
        sp = d.splits[s]
        np.testing.assert_array_equal(sp.y, raw[s]["regression_labels"])
        steps = np.arange(raw[s]["audio"].shape[1])
        np.testing.assert_array_equal(sp.mask["audio"], steps < np.array(raw[s]["audio_lengths"])[:, None])
        assert not sp.mask["vision"][0].any(), "length 0: a missing modality"
        assert not sp.x["vision"][0].any()
        assert sp.mask["vision"][1].all(), "a length beyond T keeps every step"
    np.testing.assert_array_equal(d.splits["train"].mask["text"][2], [True] * 3 + [False] * 2)


@pytest.mark.parametrize("task", ["multiclass", "regression"])
def test_npz(tmp_path, task):
    rng = np.random.default_rng(4)
    raw = {}
    for s, n in SIZES.items():
        raw[s] = _features(rng, n, 9, {"text": 11, "audio": 3, "vision": 1}, dtype=np.float64)
        raw[s]["labels"] = rng.integers(5, size=n) if task == "multiclass" else rng.normal(size=n)
    raw["train"]["labels"][0] = 4  # the class count comes from the largest id
    raw["valid"]["vision"][2, 4, 0] = np.nan
    raw["valid"]["audio"][1, 1, 1] = 1e300  # beyond float32: inf after the cast, then 0 (counted)
    d = data.load(_npz(tmp_path / "feats.pkl", raw))  # the name says pickle, the bytes say npz
    _check_common(d, raw, "labels")
    assert d.name == "npz" and d.task == task
    assert d.nonfinite["valid/vision"] == 1 and d.nonfinite["valid/audio"] == 1
    for s in SPLITS:
        y = d.splits[s].y
        if task == "multiclass":
            assert y.dtype == np.int64 and d.classes == ["0", "1", "2", "3", "4"]
        else:
            assert y.dtype == np.float32 and d.classes is None
        np.testing.assert_allclose(y, raw[s]["labels"], rtol=1e-6)


def test_one_array_under_two_keys_is_standardized_once(tmp_path):
    raw = _mult(np.random.default_rng(13), "iemocap")
    raw["valid"]["audio"] = raw["train"]["audio"][:5]  # a view: pickled as its own array
    raw["test"] = raw["valid"]  # one object twice: the unpickler hands back one dict with the same arrays
    d = data.load(_dump(tmp_path / "alias.pkl", raw))
    np.testing.assert_array_equal(d.splits["test"].x["text"], d.splits["valid"].x["text"])
    np.testing.assert_array_equal(d.splits["valid"].x["audio"], d.splits["train"].x["audio"][:5])


def test_pickle_named_npz_is_read_as_pickle(tmp_path):
    raw = _mult(np.random.default_rng(5), "iemocap")
    assert data.load(_dump(tmp_path / "data.npz", raw)).name == "iemocap"


def test_a_text_file_named_npz_is_not_a_valid_npz(tmp_path):
    """Neither a zip nor a pickle, named .npz: said to be no .npz, not a "truncated pickle" the user never wrote."""
    (tmp_path / "notes.npz").write_text("hello, not an archive\n")
    with pytest.raises(DataError) as info:
        data.load(str(tmp_path / "notes.npz"))
    message = str(info.value)
    assert message.startswith(f"{tmp_path / 'notes.npz'}: not a valid .npz (zip) file") and "b'hello, n'" in message
    assert "pickle (" not in message and "\n" not in message


# --------------------------------------------------------------------------------------------- standardization

def test_standardization(tmp_path):
    rng = np.random.default_rng(6)
    raw = {}
    for s, n in SIZES.items():
        raw[s] = {m: rng.normal(loc=5.0, scale=3.0, size=(n, 8, 4)).astype(np.float32) for m in MODALITIES}
        raw[s]["audio"][:, :, 2] = 7.0  # zero variance
        raw[s]["labels"] = rng.integers(2, size=n)
        raw[s]["audio_lengths"] = rng.integers(0, 9, size=n)
        raw[s]["audio"][np.arange(8) >= raw[s]["audio_lengths"][:, None]] = 123.0  # garbage in the padding
    raw["valid"]["text"] = raw["train"]["text"][:5] + 10.0  # valid is shifted: train statistics apply to it
    d = data.load(_dump(tmp_path / "s.pkl", raw))
    train = d.splits["train"]
    for m in MODALITIES:
        valid = train.x[m][train.mask[m]]
        np.testing.assert_allclose(valid.mean(0), 0.0, atol=1e-5, err_msg=m)
        expect = [0.0 if (m, f) == ("audio", 2) else 1.0 for f in range(4)]  # a constant feature becomes 0
        np.testing.assert_allclose(valid.std(0), expect, atol=1e-4, err_msg=m)
    # padding garbage is ignored by the statistics and zeroed; a length 0 sample has no valid step
    np.testing.assert_array_equal(train.mask["audio"], np.arange(8) < raw["train"]["audio_lengths"][:, None])
    assert not train.x["audio"][~train.mask["audio"]].any()
    assert all(np.isfinite(d.splits[s].x[m]).all() for s in SPLITS for m in MODALITIES)
    shift = 10.0 / raw["train"]["text"].reshape(-1, 4).std(0)
    np.testing.assert_allclose(d.splits["valid"].x["text"] - train.x["text"][:5], np.broadcast_to(shift, (5, 8, 4)),
                               rtol=1e-4, atol=1e-4)


# -------------------------------------------------------------------------------------------------- safety

class _Hostile:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return os.system, (f"touch {self.marker}",)


class _HostileEval:
    def __init__(self, marker):
        self.marker = marker

    def __reduce__(self):
        return eval, (f"open({str(self.marker)!r}, 'w')",)


@pytest.mark.parametrize("cls", [_Hostile, _HostileEval])
def test_hostile_pickle_is_refused_and_never_run(tmp_path, cls):
    marker = tmp_path / "pwned"
    raw = _mult(np.random.default_rng(7), "iemocap")
    raw["train"]["id"] = cls(marker)
    path = _dump(tmp_path / "evil.pkl", raw)
    with pytest.raises(DataError, match=r"evil\.pkl.*refused.*(system|eval)"):
        data.load(path)
    assert not marker.exists()


def _swap_numpy_module_names(blob: bytes) -> bytes:
    """A protocol-2 pickle (GLOBAL lines, no length prefixes) rewritten with the other numpy major's names."""
    if b"numpy._core" in blob:
        return blob.replace(b"numpy._core", b"numpy.core")
    return blob.replace(b"numpy.core", b"numpy._core")


@pytest.mark.parametrize("protocol", [2, 4, 5])
def test_numpy_module_names_of_both_majors(tmp_path, protocol):
    raw = _mult(np.random.default_rng(8), "iemocap")
    raw["train"]["scalar"] = np.float64(2.5)  # numpy scalars: multiarray.scalar
    blob = pickle.dumps(raw, protocol=protocol)
    blobs = [blob]
    if protocol == 2:
        other = _swap_numpy_module_names(blob)
        assert other != blob
        blobs.append(other)
    for i, b in enumerate(blobs):
        path = tmp_path / f"p{i}.pkl"
        path.write_bytes(b)
        d = data.load(str(path))
        np.testing.assert_array_equal(d.splits["test"].y, raw["test"]["labels"][:, :, 1].argmax(1))


# -------------------------------------------------------------------------------------------------- errors

def _corrupt(raw, how):
    if how == "mismatched_n":
        raw["train"]["audio"] = raw["train"]["audio"][:-1]
        return r"train/audio"
    if how == "labels_n":
        raw["valid"]["labels"] = raw["valid"]["labels"][:-2]
        return r"valid/labels"
    if how == "missing_split":
        del raw["test"]
        return r"'test'"
    if how == "missing_key":
        del raw["valid"]["vision"]
        return r"valid/vision"
    if how == "wrong_ndim":
        raw["test"]["text"] = raw["test"]["text"][:, 0]
        return r"test/text.*\(N, T, F\)"
    if how == "feature_mismatch":
        raw["test"]["audio"] = raw["test"]["audio"][..., :-1]
        return r"test/audio.*features"
    if how == "bad_labels":
        raw["train"]["labels"] = np.zeros((len(raw["train"]["labels"]), 3, 2))
        return r"train/labels"
    if how == "no_labels":
        for s in SPLITS:
            del raw[s]["labels"]
        return r"supported"
    raise AssertionError(how)


@pytest.mark.parametrize("how", ["mismatched_n", "labels_n", "missing_split", "missing_key", "wrong_ndim",
                                 "feature_mismatch", "bad_labels", "no_labels"])
def test_inconsistent_files(tmp_path, how):
    raw = _mult(np.random.default_rng(9), "iemocap")
    key = _corrupt(raw, how)
    path = _dump(tmp_path / f"{how}.pkl", raw)
    with pytest.raises(DataError, match=rf"{how}\.pkl.*{key}") as info:
        data.load(path)
    assert "\n" not in str(info.value)


def test_truncated_and_unknown_files(tmp_path):
    raw = _mult(np.random.default_rng(10), "sentiment")
    blob = pickle.dumps(raw, protocol=4)
    (tmp_path / "cut.pkl").write_bytes(blob[: len(blob) // 2])
    with pytest.raises(DataError, match=r"cut\.pkl.*truncated"):
        data.load(str(tmp_path / "cut.pkl"))
    npz = (tmp_path / "n.npz")
    _npz(npz, raw)
    (tmp_path / "cut.npz").write_bytes(npz.read_bytes()[:300])
    with pytest.raises(DataError, match=r"cut\.npz"):
        data.load(str(tmp_path / "cut.npz"))
    with pytest.raises(DataError, match=r"list\.pkl.*supported"):
        data.load(_dump(tmp_path / "list.pkl", [1, 2, 3]))
    (tmp_path / "text.txt").write_text("hello, not a pickle\n")
    with pytest.raises(DataError, match=r"text\.txt.*supported"):
        data.load(str(tmp_path / "text.txt"))
    with pytest.raises(DataError, match=r"nope\.pkl"):
        data.load(str(tmp_path / "nope.pkl"))
    assert issubclass(DataError, ValueError)


def test_npz_refuses_object_arrays(tmp_path):
    raw = _mult(np.random.default_rng(11), "sentiment")
    flat = {f"{s}/{k}": v for s, d in raw.items() for k, v in d.items() if k in (*MODALITIES, "labels")}
    flat["train/labels"] = np.array([object()] * len(raw["train"]["labels"]), dtype=object)
    with open(tmp_path / "obj.npz", "wb") as fh:
        np.savez(fh, **flat)
    with pytest.raises(DataError, match=r"obj\.npz"):
        data.load(str(tmp_path / "obj.npz"))


# ------------------------------------------------------------------------------------------- synthetic data

@pytest.fixture(scope="module")
def synthetic():
    return data.load("synthetic", seed=0)


def test_synthetic_shapes(synthetic):
    d = synthetic
    assert (d.name, d.task, d.source) == ("synthetic", "multiclass", "synthetic(seed=0)")
    assert d.classes == ["neutral", "happy", "sad", "angry"]
    assert d.dims == {"text": 300, "audio": 74, "vision": 35}
    assert {s: len(d.splits[s].y) for s in SPLITS} == {"train": 4000, "valid": 400, "test": 800}
    assert set(d.nonfinite) == {f"{s}/{m}" for s in SPLITS for m in MODALITIES} and not any(d.nonfinite.values())
    for s in SPLITS:
        sp = d.splits[s]
        assert sp.y.dtype == np.int64 and set(np.unique(sp.y)) == {0, 1, 2, 3}
        for m in MODALITIES:
            assert sp.x[m].shape == (len(sp.y), 20, d.dims[m]) and sp.x[m].dtype == np.float32
            assert np.isfinite(sp.x[m]).all() and not sp.x[m][~sp.mask[m]].any()
            assert 5 <= sp.mask[m].sum(1).max() <= 20
    missing = np.mean([~d.splits["train"].mask[m].any(1) for m in MODALITIES], axis=1).sum()
    assert 0.005 < missing < 0.05  # ~2% of samples have one modality missing


def test_synthetic_deterministic(synthetic):
    again = data.load("synthetic", seed=0)
    other = make_synthetic(seed=1, n_train=50, n_valid=10, n_test=10)
    first = make_synthetic(seed=0, n_train=50, n_valid=10, n_test=10)
    for m in MODALITIES:
        np.testing.assert_array_equal(again.splits["test"].x[m], synthetic.splits["test"].x[m])
        assert not np.allclose(first["train"][m], other["train"][m])
    np.testing.assert_array_equal(again.splits["train"].y, synthetic.splits["train"].y)


def test_synthetic_linear_structure():
    """The shared latent is linearly decodable, mean-pooled raw features are not, and fusion beats each modality
    (the properties the probe's story rests on; the default train size, fewer valid and test samples)."""
    sklearn = pytest.importorskip("sklearn.linear_model")
    raw = make_synthetic(seed=3, n_train=4000, n_valid=10, n_test=1000)

    def acc(feats):
        clf = sklearn.LogisticRegression(C=0.1, max_iter=500)
        return clf.fit(feats("train"), raw["train"]["labels"]).score(feats("test"), raw["test"]["labels"])

    def pooled(ms):
        def feats(s):
            out = []
            for m in ms:
                x, n = raw[s][m], np.maximum(raw[s][f"{m}_lengths"], 1)[:, None]
                out.append(x.sum(1) / n / x.reshape(-1, x.shape[-1]).std(0).clip(1e-6))
            return np.hstack(out)
        return feats

    latent = acc(lambda s: raw[s]["latent"])
    single = {m: acc(pooled([m])) for m in MODALITIES}
    fused = acc(pooled(MODALITIES))
    assert latent > 0.85, latent
    assert max(single.values()) < 0.5, single
    assert fused > max(single.values()) + 0.05, (fused, single)


def test_to_tensors(synthetic, tmp_path):
    t = data.to_tensors(synthetic.splits["valid"])
    assert set(t) == {*MODALITIES, *(m + "_mask" for m in MODALITIES), "y"}
    for m in MODALITIES:
        assert t[m].dtype == torch.float32 and t[m].shape == (400, 20, synthetic.dims[m])
        assert t[m + "_mask"].dtype == torch.bool and t[m + "_mask"].shape == (400, 20)
    assert t["y"].dtype == torch.int64 and t["y"].shape == (400,)
    raw = _mult(np.random.default_rng(12), "sentiment")
    assert data.to_tensors(data.load(_dump(tmp_path / "r.pkl", raw)).splits["train"])["y"].dtype == torch.float32
