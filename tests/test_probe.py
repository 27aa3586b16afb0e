"""Fusion probe: metrics against hand-computed values, the probe on synthetic features, results files, table."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
from fastpair.training import probe as P

CLASSES = ["neutral", "happy", "sad", "angry"]
SIZES = {"train": 400, "valid": 200, "test": 200}


def synthetic(task: str, d: int = 32, seed: int = 0):
    """Gaussian features where only "text" carries the label (class means, or a linear score)."""
    rng = np.random.default_rng(seed)
    means, w = rng.normal(size=(len(CLASSES), d)), rng.normal(size=d) / math.sqrt(d)
    features, labels = {}, {}
    for split, n in SIZES.items():
        features[split] = {m: rng.normal(size=(n, d)).astype(np.float32) for m in P.MODALITIES}
        if task == "multiclass":
            labels[split] = rng.integers(0, len(CLASSES), n)
            features[split]["text"] += means[labels[split]].astype(np.float32)
        else:
            labels[split] = (features[split]["text"] @ w + 0.1 * rng.normal(size=n)).astype(np.float32)
    return features, labels


def approx(expected, rel=1e-9):
    return pytest.approx(expected, rel=rel, abs=1e-12)


def test_subsets_order():
    assert P.SUBSETS == [("text",), ("audio",), ("vision",), ("text", "audio"), ("text", "vision"),
                         ("audio", "vision"), ("text", "audio", "vision")]
    assert P.subsets(P.MODALITIES) == P.SUBSETS


def spelled(subsets: str) -> list[tuple[str, ...]]:
    """'a b ab' -> [('a',), ('b',), ('a', 'b')]: subsets of one-letter modalities, written by hand."""
    return [tuple(word) for word in subsets.split()]


@pytest.mark.parametrize("names, expected", [
    ("a", "a"),
    ("ba", "b a ba"),  # the given order, not sorted
    ("abc", "a b c ab ac bc abc"),
    ("abcd", "a b c d ab ac ad bc bd cd abc abd acd bcd abcd"),
])
def test_subsets_every_one_up_to_four(names, expected):
    out = P.subsets(list(names))
    assert out == spelled(expected)
    assert len(out) == 2 ** len(names) - 1


def test_subsets_beyond_four_singles_leave_one_out_all():
    assert P.subsets(tuple("abcde")) == spelled("a b c d e bcde acde abde abce abcd abcde")
    names = [f"m{i}" for i in range(8)]
    out = P.subsets(names)
    assert len(out) == 8 + 8 + 1
    assert out[:8] == [(m,) for m in names]
    assert [set(names) - set(s) for s in out[8:16]] == [{m} for m in names]  # without m0 first, then m1, ...
    assert all(list(s) == [m for m in names if m in s] for s in out)  # the given order inside each subset
    assert out[16] == tuple(names)


@pytest.mark.parametrize("bad, match", [
    ([], "at least one modality"),
    ((), "at least one modality"),
    (["text", "audio", "text"], r"distinct, got \['text'\] more than once"),
    ("text", "sequence of names, got the string 'text'"),
    (["text", ""], "non-empty strings"),
    (["text", 3], "non-empty strings"),
])
def test_subsets_rejects_bad_modalities(bad, match):
    with pytest.raises(ValueError, match=match):
        P.subsets(bad)


def test_subset_label():
    assert [P.subset_label(s, P.MODALITIES) for s in P.SUBSETS] == ["T", "A", "V", "TA", "TV", "AV", "TAV"]
    corners = ["top_left", "top_right", "bottom_left", "bottom_right"]
    assert P.subset_label(["top_left", "bottom_right"], corners) == "top_left+bottom_right"
    assert P.subset_label(["bottom_left"], corners) == "bottom_left"
    assert P.subset_label(["Text"], ["Text", "tone"]) == "Text"  # T and t collide: names in full
    assert P.subset_label(["eeg", "Depth"], ["Depth", "eeg"]) == "ED"  # the subset's order, uppercased
    for bad in (["text", "smell"], []):
        with pytest.raises(ValueError, match="must be a non-empty subset of"):
            P.subset_label(bad, P.MODALITIES)


def test_classification_metrics_by_hand():
    y_true, y_pred = np.array([0, 0, 1, 1, 2, 2]), np.array([0, 1, 1, 1, 2, 0])
    m = P.classification_metrics(y_true, y_pred, ["a", "b", "c", "d"], iemocap=True)
    assert m["accuracy"] == approx(4 / 6)
    # per-class F1: a: P=R=1/2 -> 1/2; b: P=2/3, R=1 -> 4/5; c: P=1, R=1/2 -> 2/3; d: absent -> 0 (weight 0).
    assert {c: v["f1"] for c, v in m["per_class"].items()} == approx({"a": 0.5, "b": 0.8, "c": 2 / 3, "d": 0.0})
    assert {c: v["recall"] for c, v in m["per_class"].items()} == approx({"a": 0.5, "b": 1.0, "c": 0.5, "d": 0.0})
    assert m["weighted_f1"] == approx((0.5 + 0.8 + 2 / 3) / 3)
    assert m["balanced_accuracy"] == approx((0.5 + 1.0 + 0.5) / 3)
    # MulT's binary "is it a": truth 110000, pred 100001 -> acc 4/6; F1 positive 1/2 (support 2),
    # negative P=R=3/4 -> 3/4 (support 4); weighted (2 * 1/2 + 4 * 3/4) / 6.
    assert m["iemocap"]["a"] == approx({"accuracy": 4 / 6, "f1": (2 * 0.5 + 4 * 0.75) / 6})
    assert "iemocap" not in P.classification_metrics(y_true, y_pred, ["a", "b", "c"])


def test_classification_metrics_rejects_bad_ids():
    with pytest.raises(ValueError, match="integer ids"):
        P.classification_metrics(np.array([0, 3]), np.array([0, 1]), ["a", "b", "c"])
    with pytest.raises(ValueError, match="equal length"):
        P.classification_metrics(np.array([0, 1]), np.array([0]), ["a", "b"])


def test_regression_metrics_by_hand():
    y_true = np.array([-2.0, 0.0, 0.4, 1.5, 2.6, -3.7])
    y_pred = np.array([-1.0, 0.2, -0.3, 2.5, 4.6, -3.2])
    m = P.regression_metrics(y_true, y_pred)
    # Non-zero Acc-2 drops the true 0: truth > 0 FTTTF, pred > 0 FFTTF -> 4/5. Weighted F1: positive
    # P=1, R=2/3 -> 4/5 (support 3); negative P=2/3, R=1 -> 4/5 (support 2).
    assert m["acc2"] == approx(4 / 5)
    assert m["f1"] == approx(4 / 5)
    # Has-0: truth >= 0 FTTTTF, pred >= 0 FTFTTF -> 5/6.
    assert m["acc2_has0"] == approx(5 / 6)
    # Acc-7, clipped then rounded half to even: truth -2 0 0 2 3 -3, pred -1 0 -0 2 3 -3 -> 5/6 (without the
    # clipping 4.6 -> 5 and -3.7 -> -4 would miss; with half-away-from-zero 2.5 -> 3 would miss).
    assert m["acc7"] == approx(5 / 6)
    assert m["mae"] == approx((1.0 + 0.2 + 0.7 + 1.0 + 2.0 + 0.5) / 6)
    assert m["corr"] == approx(np.corrcoef(y_true, y_pred)[0, 1])


def test_regression_metrics_degenerate_cases():
    y_true = np.array([-1.0, 0.5, 2.0])
    m = P.regression_metrics(y_true, np.full(3, 0.7))  # constant predictions: r undefined -> 0, finite
    assert m["corr"] == 0.0 and all(math.isfinite(v) for v in m.values())
    assert P.regression_metrics(y_true, 2 * y_true)["corr"] == approx(1.0)
    with pytest.raises(ValueError, match="every y_true is 0"):
        P.regression_metrics(np.zeros(4), np.ones(4))
    with pytest.raises(ValueError, match="finite"):
        P.regression_metrics(y_true, np.array([0.0, np.nan, 1.0]))


def test_probe_finds_the_informative_modality():
    features, labels = synthetic("multiclass")
    rows = P.probe(features, labels, "multiclass", CLASSES, dataset="iemocap")
    assert [tuple(r["modalities"]) for r in rows] == P.SUBSETS
    acc = {"".join(m[0] for m in r["modalities"]): r["metrics"]["accuracy"] for r in rows}
    for subset, a in acc.items():
        if "t" in subset:
            assert a > 0.9, f"{subset}: accuracy {a:.3f} with the label-carrying text features"
        else:
            assert a < 0.4, f"{subset}: accuracy {a:.3f} from label-free features (chance is 0.25)"
    for r in rows:
        assert r["metrics"]["C"] in P.C_GRID
        assert set(r["metrics"]["per_class"]) == set(CLASSES) == set(r["metrics"]["iemocap"])
    assert P.probe(features, labels, "multiclass", CLASSES, dataset="iemocap") == rows  # deterministic


def test_probe_regression_recovers_a_linear_target():
    features, labels = synthetic("regression")
    rows = P.probe(features, labels, "regression", None)
    corr = {"".join(m[0] for m in r["modalities"]): r["metrics"]["corr"] for r in rows}
    for subset, r in corr.items():
        if "t" in subset:
            assert r > 0.9, f"{subset}: Pearson r {r:.3f}"
        else:
            assert abs(r) < 0.3, f"{subset}: Pearson r {r:.3f} from features unrelated to the target"
    assert all(r["metrics"]["alpha"] in P.ALPHA_GRID for r in rows)
    assert set(rows[0]["metrics"]) == {"acc2", "acc2_has0", "f1", "f1_has0", "acc7", "mae", "corr", "alpha"}


@pytest.mark.parametrize("change, match", [
    (lambda f, l: f.pop("valid"), "split 'valid'"),
    (lambda f, l: f["test"].pop("audio"),
     r"features\['test'\] must hold the modalities of features\['train'\]: expected \['text', 'audio', 'vision'\], "
     r"found \['text', 'vision'\]"),
    (lambda f, l: f["valid"].__setitem__("depth", f["valid"]["text"]), r"features\['valid'\] must hold .* found "
     r"\['text', 'audio', 'vision', 'depth'\]"),
    (lambda f, l: f["train"].pop("vision"), r"features\['valid'\] must hold .* expected \['text', 'audio'\]"),
    (lambda f, l: f["train"].clear(), r"features\['train'\] holds no modality"),
    (lambda f, l: f["test"].__setitem__("audio", f["test"]["audio"][1:]), r"features\['test'\]\['audio'\] must be "
     r"\(N, D\) with N = 200 labels, got \(199, 8\)"),
    (lambda f, l: f["train"]["vision"].__setitem__((0, 0), np.nan), "non-finite"),
    (lambda f, l: f.__setitem__("valid", {m: x[:, :5] for m, x in f["valid"].items()}), "features, train has"),
    (lambda f, l: l["test"].__setitem__(0, 4), r"labels\['test'\] must be class ids in \[0, 4\)"),
])
def test_probe_validates_inputs(change, match):
    features, labels = synthetic("multiclass", d=8)
    change(features, labels)
    with pytest.raises(ValueError, match=match):
        P.probe(features, labels, "multiclass", CLASSES)


def test_probe_rejects_bad_task():
    features, labels = synthetic("multiclass", d=8)
    with pytest.raises(ValueError, match="task"):
        P.probe(features, labels, "binary", CLASSES)
    with pytest.raises(ValueError, match="class names"):
        P.probe(features, labels, "multiclass", None)


def synthetic_on(widths: dict[str, int], task: str, seed: int = 0):
    """Small Gaussian features of the given widths where only the first modality carries the label."""
    rng = np.random.default_rng(seed)
    first, sizes = next(iter(widths)), {"train": 120, "valid": 60, "test": 60}
    means, w = 3 * rng.normal(size=(len(CLASSES), widths[first])), rng.normal(size=widths[first])
    features, labels = {}, {}
    for split, n in sizes.items():
        features[split] = {m: rng.normal(size=(n, d)) for m, d in widths.items()}
        if task == "multiclass":
            labels[split] = rng.integers(0, len(CLASSES), n)
            features[split][first] += means[labels[split]]
        else:
            labels[split] = features[split][first] @ w + 0.1 * rng.normal(size=n)
    return features, labels


def all_finite(metrics) -> bool:
    if isinstance(metrics, dict):
        return all(all_finite(v) for v in metrics.values())
    return math.isfinite(metrics)


def test_probe_on_four_modalities_one_of_width_one():
    widths = {"vision": 4, "text": 3, "pulse": 1, "audio": 4}  # the dict order is the run's order
    features, labels = synthetic_on(widths, "multiclass")
    rows = P.probe(features, labels, "multiclass", CLASSES)
    assert [tuple(r["modalities"]) for r in rows] == P.subsets(["vision", "text", "pulse", "audio"])
    assert len(rows) == 15 and all(isinstance(r["modalities"], list) for r in rows)
    assert rows[2]["modalities"] == ["pulse"] and rows[-1]["modalities"] == ["vision", "text", "pulse", "audio"]
    for r in rows:
        assert all_finite(r["metrics"]), r["modalities"]
        acc = r["metrics"]["accuracy"]
        if "vision" in r["modalities"]:
            assert acc > 0.8, f"{r['modalities']}: accuracy {acc:.3f} with the label-carrying features"
        else:
            assert acc < 0.5, f"{r['modalities']}: accuracy {acc:.3f} from label-free features (chance 0.25)"


def test_probe_on_five_modalities_with_shared_initials():
    names = ["top_left", "top_right", "bottom_left", "bottom_right", "center"]
    features, labels = synthetic_on(dict.fromkeys(names, 3), "regression")
    rows = P.probe(features, labels, "regression", None)
    assert [r["modalities"] for r in rows] == [list(s) for s in P.subsets(names)]
    assert len(rows) == 5 + 5 + 1
    assert rows[5]["modalities"] == names[1:]  # the leave-one-out without top_left comes first
    for r in rows:
        assert all_finite(r["metrics"]), r["modalities"]
        corr = r["metrics"]["corr"]
        if "top_left" in r["modalities"]:
            assert corr > 0.9, f"{r['modalities']}: Pearson r {corr:.3f}"
        else:
            assert abs(corr) < 0.4, f"{r['modalities']}: Pearson r {corr:.3f} from unrelated features"
    table = P.format_table(rows, "regression")
    assert "top_right+bottom_left+bottom_right+center" in table and "\nT " not in table


@pytest.fixture(scope="module")
def result_rows():
    features, labels = synthetic("multiclass", d=8)
    rows = P.probe(features, labels, "multiclass", CLASSES, dataset="iemocap")
    return [{"encoder": enc, **r} for enc in ("pairwise_nce", "random_init", "supervised") for r in rows]


def test_write_results_round_trip(tmp_path, result_rows):
    out = tmp_path / "run"
    P.write_results(out, "iemocap", "multiclass", result_rows)
    saved = json.loads((out / "results.json").read_text())
    assert set(saved) == {"dataset", "task", "rows"}
    assert (saved["dataset"], saved["task"]) == ("iemocap", "multiclass")
    assert saved["rows"] == result_rows
    assert all(set(r) == {"encoder", "modalities", "metrics"} for r in saved["rows"])
    assert (out / "results.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert sorted(p.name for p in out.iterdir()) == ["results.json", "results.png"]  # no temporary files left


def test_write_results_meta_and_fit_callback(tmp_path):
    """``meta``: more keys of results.json, between task and rows; ``on_fit``: called after each subset's fit."""
    features, labels = synthetic("multiclass", d=8)
    seen = []
    rows = P.probe(features, labels, "multiclass", CLASSES, on_fit=seen.append)
    assert seen == P.SUBSETS
    rows = [{"encoder": "pairwise_nce", **r} for r in rows]
    P.write_results(tmp_path, "npz", "multiclass", rows, meta={"config": {"epochs": 2}, "device": "cpu"})
    assert list(json.loads((tmp_path / "results.json").read_text())) == ["dataset", "task", "config", "device",
                                                                          "rows"]
    with pytest.raises(ValueError, match="meta cannot replace"):
        P.write_results(tmp_path, "npz", "multiclass", rows, meta={"rows": []})


def test_write_results_regression_plot(tmp_path):
    features, labels = synthetic("regression", d=8)
    rows = [{"encoder": "pairwise_nce", **r} for r in P.probe(features, labels, "regression", None)]
    P.write_results(tmp_path, "mosi", "regression", rows)
    assert (tmp_path / "results.png").read_bytes()[:4] == b"\x89PNG"


@pytest.mark.parametrize("bad", [float("nan"), float("inf"), None, "0.5"])
def test_write_results_refuses_non_finite(tmp_path, result_rows, bad):
    rows = [dict(r, metrics=dict(r["metrics"])) for r in result_rows]
    rows[4]["metrics"]["per_class"] = {"happy": {"f1": bad}}
    with pytest.raises(ValueError, match=r"row 4 \(pairwise_nce, text\+vision\)/per_class/happy/f1"):
        P.write_results(tmp_path, "iemocap", "multiclass", rows)
    assert list(tmp_path.iterdir()) == []  # nothing written


def test_format_table(result_rows):
    table = P.format_table(result_rows, "multiclass")
    lines = table.splitlines()
    assert len(lines) == 2 + len(result_rows) and len({len(line.rstrip()) for line in lines[2:]}) == 1
    first_column = {line.split()[0] for line in lines[2:] if not line.startswith(" ")}
    assert first_column == {"T", "A", "V", "TA", "TV", "AV", "TAV"}
    for enc in ("pairwise_nce", "random_init", "supervised"):
        assert table.count(enc) == len(P.SUBSETS)
    acc = result_rows[-1]["metrics"]["accuracy"]
    assert f"{100 * acc:.1f}" in lines[-1]
    reg = [{"modalities": ["audio"], "metrics": {"acc2": 0.5, "f1": 0.5, "acc7": 0.2, "mae": 1.0, "corr": 0.1}}]
    assert "acc7%" in P.format_table(reg, "regression")


EIGHT = {
    "initials": ["text", "audio", "vision", "depth", "eeg", "force", "gaze", "heart"],
    "names": ["top_left", "top_right", "bottom_left", "bottom_right", "center", "text", "tone", "touch"],
}
ENCODERS = ("pairwise_nce", "pairwise_sigmoid", "random_init", "supervised")


def made_up_rows(modalities, encoders=ENCODERS, seed=0):
    """Result rows with random metrics in [0, 1) for every subset and encoder: the table and the plot need no fit."""
    rng = np.random.default_rng(seed)
    return [{"encoder": enc, "modalities": list(s),
             "metrics": {"accuracy": float(rng.uniform()), "weighted_f1": float(rng.uniform())}}
            for s in P.subsets(modalities) for enc in encoders]


@pytest.mark.parametrize("kind", sorted(EIGHT))
def test_format_table_eight_modalities(kind):
    names = EIGHT[kind]
    rows = made_up_rows(names)
    lines = P.format_table(rows, "multiclass").splitlines()
    assert len(lines) == 2 + len(rows)
    assert {len(line) for line in lines} == {len(lines[0])}  # every line as wide as the header
    labels = [P.subset_label(s, names) for s in P.subsets(names)]
    first = [line.split()[0] for line in lines[2:] if not line.startswith(" ")]
    assert first == labels  # every label, once, in subsets order
    assert lines[2].split()[1] == "pairwise_nce" and lines[3].split()[0] == "pairwise_sigmoid"
    width = lines[0].index("encoder")
    assert width == max(len(label) for label in labels) + 2  # the subset column fits the longest label
    assert all(line[width:].startswith(tuple(ENCODERS)) for line in lines[2:])


def test_format_table_orders_rows_of_any_input_order(result_rows):
    by_size = sorted(result_rows, key=lambda r: -len(r["modalities"]))  # TAV first, encoders still in order
    assert P.format_table(by_size, "multiclass") == P.format_table(result_rows, "multiclass")
    pairs = [r for r in result_rows if len(r["modalities"]) == 2]
    first = [line.split()[0] for line in P.format_table(pairs, "multiclass").splitlines()[2:]
             if not line.startswith(" ")]
    assert first == ["TA", "TV", "AV"]


def png_size(path) -> tuple[int, int]:
    data = path.read_bytes()
    assert data[:8] == b"\x89PNG\r\n\x1a\n"
    return int.from_bytes(data[16:20], "big"), int.from_bytes(data[20:24], "big")  # the IHDR chunk


@pytest.mark.parametrize("kind", sorted(EIGHT))
def test_write_results_eight_modalities(tmp_path, kind):
    rows = made_up_rows(EIGHT[kind])
    P.write_results(tmp_path, "synthetic", "multiclass", rows)
    saved = json.loads((tmp_path / "results.json").read_text())
    assert [r["modalities"] for r in saved["rows"]] == [r["modalities"] for r in rows]
    width, height = png_size(tmp_path / "results.png")
    assert width >= 17 * 4 * 0.35 * 120  # 0.35 in per bar at 120 dpi: the 68 bars stay apart
    if kind == "names":  # 7 names in a label: vertical tick labels, with their own room below the bars
        assert height > 4.2 * 120 + 40 * 0.1 * 120
    else:  # 8 letters fit flat under a group of 4 bars
        assert height == 4.2 * 120
    P.write_results(tmp_path, "synthetic", "multiclass", made_up_rows(P.MODALITIES, ENCODERS[:1]))
    assert png_size(tmp_path / "results.png") == (720, 504)  # M = 3, one encoder: 6 x 4.2 in, labels flat


def test_plot_layout_and_axis_label():
    assert P._figure_layout(["T", "A", "V", "TA", "TV", "AV", "TAV"], 3) == (pytest.approx(8.35), 4.2, 0)
    labels = [P.subset_label(s, EIGHT["initials"]) for s in P.subsets(EIGHT["initials"])]
    width, height, rotation = P._figure_layout(labels, 1)
    assert rotation == 90 and height > 4.2  # 8-letter labels under single bars would overlap flat
    assert P._axis_label(P.MODALITIES) == "modalities (T = text, A = audio, V = vision)"
    assert P._axis_label(EIGHT["names"]) == "modalities"


def test_write_results_refuses_no_rows(tmp_path):
    with pytest.raises(ValueError, match="no rows"):
        P.write_results(tmp_path, "iemocap", "multiclass", [])
    assert list(tmp_path.iterdir()) == []
