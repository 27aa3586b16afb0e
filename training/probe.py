"""Fusion probe: linear models on frozen encoder features, for modality subsets (the paper's protocol).

The probe runs on any set of M >= 1 modalities: the keys of ``features["train"]``, in their order. The subsets
(``subsets``): for M <= 4 every non-empty one, by size (text, audio, vision: T, A, V, TA, TV, AV, TAV, which is
``SUBSETS``); for M > 4, where that would be 2^M - 1 fits, every single modality, every leave-one-out subset and
all of them (2M + 1). Per subset:

1. concatenate the frozen features of the chosen modalities;
2. standardize with a ``StandardScaler`` fit on the train split only;
3. fit on train, for each regularization strength of a small grid, a scikit-learn
   ``LogisticRegression`` (multinomial, lbfgs; grid ``C_GRID``) for task "multiclass" or a ``Ridge``
   (grid ``ALPHA_GRID``) for task "regression";
4. choose the strength on the valid split: highest valid accuracy (classification) or lowest valid MAE
   (regression); ties go to the stronger regularization. The valid split is never trained on;
5. report the test metrics of the chosen train-fitted model, plus the chosen ``C`` or ``alpha``.

Each row names its modalities in full; the table and the plot label a subset with ``subset_label``: the initials
(TA) when the run's modalities have distinct first letters, the names joined with "+" otherwise.

Metrics (``classification_metrics``, ``regression_metrics``) follow MulT's ``src/eval_metrics.py``
(Tsai et al. 2019) and MMSA, which the MER literature reports; every metric is a finite float by definition
(the degenerate cases are spelled out below), so ``write_results`` refuses NaN/inf instead of repairing it.

The LogisticRegression fits along the C grid are warm-started from the previous (stronger-regularized)
solution: the same convex objective, so the same optimum up to lbfgs' tolerance, in fewer iterations (at most
``MAX_ITER``; a weakly regularized fit on near-separable features may stop there, and is used as it is).
lbfgs and Ridge's cholesky solver are deterministic: ``seed`` only reaches the estimators' ``random_state``.
"""

from __future__ import annotations

import copy
import json
import math
import numbers
import os
import textwrap
import warnings
from collections.abc import Sequence
from itertools import combinations

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from .checkpoint import atomic_write
from .names import MODALITIES, SPLITS

TASKS = ("multiclass", "regression")
C_GRID = (0.01, 0.1, 1.0, 10.0)  # LogisticRegression inverse L2 strength, strongest first
ALPHA_GRID = (1e4, 1e3, 1e2, 1e1, 1.0, 0.1)  # Ridge L2 strength, strongest first
MAX_ITER = 300  # lbfgs iterations per fit; warm starts along C_GRID keep the weak-regularization fits short
# BLAS threads during the fits: (2000 x 1536) problems are too small for threading to pay, and on a busy machine
# OpenBLAS' spinning threads make the fits many times slower.
BLAS_THREADS = 1
HEADLINE = {"multiclass": "accuracy", "regression": "acc2"}  # the metric plotted in results.png
_TABLE = {  # format_table columns: (header, metric key, scale, format)
    "multiclass": [("acc%", "accuracy", 100, "{:.1f}"), ("wF1%", "weighted_f1", 100, "{:.1f}")],
    "regression": [("acc2%", "acc2", 100, "{:.1f}"), ("F1%", "f1", 100, "{:.1f}"), ("acc7%", "acc7", 100, "{:.1f}"),
                   ("MAE", "mae", 1, "{:.3f}"), ("r", "corr", 1, "{:.3f}")],
}
ALL_SUBSETS_UP_TO = 4  # every subset up to M = 4 modalities (15 fits); beyond, singles + leave-one-outs + all


def _check_names(modalities: Sequence[str]) -> tuple[str, ...]:
    if isinstance(modalities, str):  # a str is a Sequence[str] of its letters
        raise ValueError(f"modalities must be a sequence of names, got the string {modalities!r}")
    names = tuple(modalities)
    if not names:
        raise ValueError("modalities: need at least one modality, got none")
    if not all(isinstance(m, str) and m for m in names):
        raise ValueError(f"modalities must be non-empty strings, got {list(names)}")
    duplicates = sorted({m for m in names if names.count(m) > 1})
    if duplicates:
        raise ValueError(f"modalities must be distinct, got {duplicates} more than once in {list(names)}")
    return names


def subsets(modalities: Sequence[str]) -> list[tuple[str, ...]]:
    """The modality subsets the probe fits, in its row order.

    M = len(modalities) <= ``ALL_SUBSETS_UP_TO`` (4): every non-empty subset (2^M - 1), by size and, within a
    size, in ``itertools.combinations`` order of the given order (text, audio, vision: T A V TA TV AV TAV).
    M > 4: every single modality in order, every leave-one-out subset (the one without the first modality
    first) and all of them (2M + 1 subsets; every subset would be 255 fits at M = 8).
    ValueError for no modality, a duplicate name or a name that is not a non-empty string.
    """
    names = _check_names(modalities)
    if len(names) <= ALL_SUBSETS_UP_TO:
        return [c for k in range(1, len(names) + 1) for c in combinations(names, k)]
    leave_one_out = [names[:i] + names[i + 1:] for i in range(len(names))]
    return [(m,) for m in names] + leave_one_out + [names]


def _initials_distinct(modalities: Sequence[str]) -> bool:
    initials = [m[0].upper() for m in modalities]
    return len(set(initials)) == len(initials)


def subset_label(subset: Sequence[str], modalities: Sequence[str]) -> str:
    """The short name of ``subset`` in the table and the plot of a run on ``modalities``.

    The uppercase first letters in the subset's order ("T", "TA", "TAV") when the first letters of all the
    run's modalities are distinct (case-insensitively); otherwise the names joined with "+"
    ("top_left+bottom_right"). The all-modalities row is spelled the same way (never "all"), so every label
    names its subset on its own. ValueError for an empty subset or a name that is not one of ``modalities``.
    """
    unknown = [m for m in subset if m not in modalities]
    if not subset or unknown:
        raise ValueError(f"subset_label: {list(subset)} must be a non-empty subset of {list(modalities)}")
    if _initials_distinct(modalities):
        return "".join(m[0].upper() for m in subset)
    return "+".join(subset)


SUBSETS: list[tuple[str, ...]] = subsets(MODALITIES)  # the MER default: T A V TA TV AV TAV


def _check_pair(y_true, y_pred, name: str) -> tuple[np.ndarray, np.ndarray]:
    y_true, y_pred = np.asarray(y_true).reshape(-1), np.asarray(y_pred).reshape(-1)
    if y_true.shape != y_pred.shape or y_true.size == 0:
        raise ValueError(f"{name}: y_true and y_pred must be non-empty and of equal length, "
                         f"got {y_true.size} and {y_pred.size}")
    return y_true, y_pred


def classification_metrics(y_true, y_pred, classes: list[str], iemocap: bool = False) -> dict:
    """Test metrics of a single-label classifier.

    y_true, y_pred: (N,) integer class ids in [0, len(classes)). Returns floats in [0, 1]:

    - ``accuracy``; ``weighted_f1`` (per-class F1 averaged with the true-class supports as weights);
      ``balanced_accuracy`` (mean per-class recall, the "unweighted accuracy" of the IEMOCAP literature);
    - ``per_class``: class name -> {"f1": F1 of that class, "recall": fraction of that class predicted
      correctly (its "class accuracy")}; a class never predicted or never present scores 0 (zero_division=0);
    - with ``iemocap=True`` also ``iemocap``: class name -> {"accuracy", "f1"} as MulT's ``eval_iemocap``
      reports them: the binary "is this emotion" problem (y == k vs pred == k), its accuracy and its
      support-weighted F1 over the two binary classes.
    """
    y_true, y_pred = _check_pair(y_true, y_pred, "classification_metrics")
    labels = np.arange(len(classes))
    for name, y in (("y_true", y_true), ("y_pred", y_pred)):
        if not np.issubdtype(y.dtype, np.integer) or y.min() < 0 or y.max() >= len(classes):
            raise ValueError(f"classification_metrics: {name} must be integer ids in [0, {len(classes)}), "
                             f"got dtype {y.dtype}, range [{y.min()}, {y.max()}]")
    _, recall, f1, _ = precision_recall_fscore_support(y_true, y_pred, labels=labels, zero_division=0)
    out = {
        "accuracy": float(accuracy_score(y_true, y_pred)),
        "weighted_f1": float(f1_score(y_true, y_pred, labels=labels, average="weighted", zero_division=0)),
        "balanced_accuracy": float(balanced_accuracy_score(y_true, y_pred)),
        "per_class": {c: {"f1": float(f1[k]), "recall": float(recall[k])} for k, c in enumerate(classes)},
    }
    if iemocap:
        out["iemocap"] = {}
        for k, c in enumerate(classes):
            t, p = y_true == k, y_pred == k
            out["iemocap"][c] = {"accuracy": float(accuracy_score(t, p)),
                                 "f1": float(f1_score(t, p, labels=[False, True], average="weighted",
                                                      zero_division=0))}
    return out


def regression_metrics(y_true, y_pred) -> dict:
    """Sentiment-score metrics as MulT's ``eval_mosei_senti`` and MMSA define them (scores in [-3, 3]).

    - ``acc2`` (non-zero): over the samples with y_true != 0, accuracy of (pred > 0) against (true > 0);
      ``f1``: weighted F1 of that same binary problem;
    - ``acc2_has0`` / ``f1_has0``: over all samples, (pred >= 0) against (true >= 0) (MMSA's Has0 variant);
    - ``acc7``: both sides clipped to [-3, 3] and rounded with ``np.round`` (half to even, as MulT), accuracy;
    - ``mae``: mean absolute error; ``corr``: Pearson r, defined as 0.0 when either side is constant (no
      linear association can be measured), so it stays finite.

    Raises ValueError when every y_true is 0 (Acc-2 non-zero has no samples) or an input is non-finite.
    """
    y_true, y_pred = _check_pair(y_true, y_pred, "regression_metrics")
    y_true, y_pred = y_true.astype(np.float64), y_pred.astype(np.float64)
    if not (np.isfinite(y_true).all() and np.isfinite(y_pred).all()):
        raise ValueError("regression_metrics: y_true and y_pred must be finite")
    nz = y_true != 0
    if not nz.any():
        raise ValueError("regression_metrics: every y_true is 0, so Acc-2 (non-zero) is undefined")
    t2, p2 = y_true[nz] > 0, y_pred[nz] > 0
    t0, p0 = y_true >= 0, y_pred >= 0
    # An exactly constant side must be caught before centering: its mean can differ from the value by an ulp.
    constant = np.ptp(y_true) == 0 or np.ptp(y_pred) == 0
    return {
        "acc2": float(accuracy_score(t2, p2)),
        "f1": float(f1_score(t2, p2, labels=[False, True], average="weighted", zero_division=0)),
        "acc2_has0": float(accuracy_score(t0, p0)),
        "f1_has0": float(f1_score(t0, p0, labels=[False, True], average="weighted", zero_division=0)),
        "acc7": float(np.mean(np.round(np.clip(y_pred, -3, 3)) == np.round(np.clip(y_true, -3, 3)))),
        "mae": float(np.mean(np.abs(y_pred - y_true))),
        "corr": 0.0 if constant else float(np.clip(np.corrcoef(y_true, y_pred)[0, 1], -1.0, 1.0)),
    }


def _check_labels(y, split: str, task: str, classes) -> int:
    """The number of labels of ``split``; ValueError unless they fit ``task``."""
    y, n = np.asarray(y).reshape(-1), len(y)
    if task == "multiclass" and (n == 0 or np.any(y != np.round(y)) or y.min() < 0 or y.max() >= len(classes)):
        raise ValueError(f"probe: labels[{split!r}] must be class ids in [0, {len(classes)}) ({classes})")
    if task == "regression" and (n == 0 or not np.isfinite(y).all()):
        raise ValueError(f"probe: labels[{split!r}] must be non-empty and finite for task 'regression'")
    return n


def _check_features(features, split: str, modalities: tuple[str, ...], n: int) -> None:
    """ValueError unless features[split] holds exactly ``modalities``, each finite (n, D) with train's D."""
    found = list(features[split])
    if set(found) != set(modalities):
        raise ValueError(f"probe: features[{split!r}] must hold the modalities of features['train']: "
                         f"expected {list(modalities)}, found {found}")
    for m in modalities:
        x = features[split][m]
        if x is None or np.ndim(x) != 2 or len(x) != n:
            raise ValueError(f"probe: features[{split!r}][{m!r}] must be (N, D) with N = {n} labels, "
                             f"got {None if x is None else np.shape(x)}")
        if np.shape(x)[1] != np.shape(features["train"][m])[1]:
            raise ValueError(f"probe: features[{split!r}][{m!r}] has {np.shape(x)[1]} features, "
                             f"train has {np.shape(features['train'][m])[1]}")
        if not np.isfinite(x).all():
            raise ValueError(f"probe: features[{split!r}][{m!r}] has non-finite values")


def _check_inputs(features, labels, task, classes) -> tuple[str, ...]:
    """The run's modalities, the keys of features["train"] in their order, once every input checks out."""
    if task not in TASKS:
        raise ValueError(f"probe: task must be one of {TASKS}, got {task!r}")
    if task == "multiclass" and not classes:
        raise ValueError("probe: task 'multiclass' needs the class names, got classes=None")
    for split in SPLITS:
        if split not in features or split not in labels:
            raise ValueError(f"probe: features and labels need split {split!r}, got {sorted(features)} "
                             f"and {sorted(labels)}")
    if not features["train"]:
        raise ValueError("probe: features['train'] holds no modality")
    modalities = _check_names(features["train"])
    for split in SPLITS:
        _check_features(features, split, modalities, _check_labels(labels[split], split, task, classes))
    return modalities


def _fit_select(x, y, task: str, seed: int):
    """Fit on train for every grid value, keep the model with the best valid score: (model, chosen value)."""
    best = None
    if task == "multiclass":
        model = LogisticRegression(max_iter=MAX_ITER, warm_start=True, random_state=seed)
        for c in C_GRID:
            with warnings.catch_warnings():  # a weakly regularized fit may stop at MAX_ITER; still a valid probe
                warnings.simplefilter("ignore", ConvergenceWarning)
                model.set_params(C=c).fit(x["train"], y["train"])
            score = accuracy_score(y["valid"], model.predict(x["valid"]))
            if best is None or score > best[0]:
                best = (score, c, copy.deepcopy(model))  # the train-fitted model of this C
        return best[2], best[1]
    for alpha in ALPHA_GRID:
        model = Ridge(alpha=alpha, random_state=seed).fit(x["train"], y["train"])
        score = -float(np.mean(np.abs(model.predict(x["valid"]) - y["valid"])))
        if best is None or score > best[0]:
            best = (score, alpha, model)
    return best[2], best[1]


def probe(features: dict[str, dict[str, np.ndarray]], labels: dict[str, np.ndarray], task: str,
          classes: list[str] | None, dataset: str = "", seed: int = 0, on_fit=None) -> list[dict]:
    """Linear fusion probe on frozen features for the modality subsets of ``subsets`` (see the module docstring).

    features[split][modality]: (N_split, D_m) float features for splits "train", "valid", "test". The
    modalities are the keys of features["train"], in their order (any M >= 1 distinct names); every split must
    hold exactly those keys. labels[split]: (N_split,) int class ids in [0, len(classes)) for task "multiclass",
    float scores for "regression". ``dataset == "iemocap"`` adds MulT's per-emotion binary metrics.
    Returns one row per subset, in ``subsets(modalities)`` order: {"modalities": [names], "metrics": {...,
    "C" | "alpha"}}. ValueError, naming the split and modality, for inputs that do not fit. ``on_fit(subset)``,
    if given, is called after each subset's fit (progress).
    """
    modalities = _check_inputs(features, labels, task, classes)
    y = {s: np.asarray(labels[s]).reshape(-1) for s in SPLITS}
    y = {s: (v.astype(np.int64) if task == "multiclass" else v.astype(np.float64)) for s, v in y.items()}
    # Standardizing each modality once equals standardizing every concatenation (the scaler is per column).
    scaled = {}
    for m in modalities:
        scaler = StandardScaler().fit(np.asarray(features["train"][m], dtype=np.float64))
        scaled[m] = {s: scaler.transform(np.asarray(features[s][m], dtype=np.float64)) for s in SPLITS}
    rows = []
    for subset in subsets(modalities):
        x = {s: np.hstack([scaled[m][s] for m in subset]) for s in SPLITS}
        with threadpool_limits(limits=BLAS_THREADS, user_api="blas"):
            model, chosen = _fit_select(x, y, task, seed)
            pred = model.predict(x["test"])
        if task == "multiclass":
            metrics = classification_metrics(y["test"], pred, classes, iemocap=dataset.lower() == "iemocap")
            metrics["C"] = chosen
        else:
            metrics = {**regression_metrics(y["test"], pred), "alpha": chosen}
        rows.append({"modalities": list(subset), "metrics": metrics})
        if on_fit is not None:
            on_fit(subset)
    return rows


def _finite(value, where: str):
    """A JSON-ready copy of a metrics tree; ValueError naming ``where`` for NaN/inf or a non-number."""
    if isinstance(value, dict):
        return {str(k): _finite(v, f"{where}/{k}") for k, v in value.items()}
    if isinstance(value, (list, tuple)):
        return [_finite(v, f"{where}/{i}") for i, v in enumerate(value)]
    if isinstance(value, (bool, np.bool_)):
        return bool(value)
    if isinstance(value, numbers.Integral):
        return int(value)
    if isinstance(value, numbers.Real) and math.isfinite(value):
        return float(value)
    raise ValueError(f"write_results: metric {where} must be a finite number, got {value!r}")


def _run_modalities(rows: list[dict]) -> tuple[str, ...]:
    """The modalities of a run, from its result rows: the longest row's names in their order (probe's
    all-modalities row keeps the data's order even when the rows come filtered or reordered), then any other
    name in first-seen order."""
    longest = max((r["modalities"] for r in rows), key=len, default=[])
    return tuple(dict.fromkeys([*longest, *(m for r in rows for m in r["modalities"])]))


def _subset_order(rows: list[dict], modalities: tuple[str, ...]) -> list[tuple[str, ...]]:
    """The distinct subsets of ``rows``: those of ``subsets(modalities)`` in its order, then the rest as seen."""
    seen = list(dict.fromkeys(tuple(r["modalities"]) for r in rows))
    if not seen:
        return []
    rank = {s: i for i, s in enumerate(subsets(modalities))}
    return sorted(seen, key=lambda s: rank.get(s, len(rank)))  # stable: the rest keep their first-seen order


_BAR_IN = 0.35  # inches of figure width per bar
_CHAR_IN = 0.1  # a generous width of one 10-pt character in inches, to fit the figure around its labels


def _figure_layout(labels: list[str], n_encoders: int) -> tuple[float, float, int]:
    """(width, height, tick-label rotation) of a bar chart with a group of ``n_encoders`` bars per label.

    0.35 in per bar and at least 6 in, so 17 subsets x 4 encoders (M = 8) stay apart. Labels wider than a group
    of bars turn vertical, and the figure grows by the longest one so the bars keep their height.
    """
    width = max(6.0, 1.0 + _BAR_IN * len(labels) * n_encoders)
    longest = _CHAR_IN * max(len(label) for label in labels)
    if longest <= 0.9 * (width - 1.0) / len(labels):
        return width, 4.2, 0
    return width, 4.2 + longest, 90


def _axis_label(modalities: tuple[str, ...]) -> str:
    """The x-axis title: the key to the initials of ``subset_label``, or plain "modalities" when the tick
    labels spell the names in full."""
    if not _initials_distinct(modalities):
        return "modalities"
    return "modalities (" + ", ".join(f"{m[0].upper()} = {m}" for m in modalities) + ")"


def _plot(path: str, dataset: str, task: str, rows: list[dict]) -> None:
    # Figure + its own Agg canvas, without pyplot: no global backend switch, no figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric, encoders = HEADLINE[task], list(dict.fromkeys(r["encoder"] for r in rows))
    score = {(r["encoder"], tuple(r["modalities"])): r["metrics"][metric] for r in rows}
    modalities = _run_modalities(rows)
    shown = _subset_order(rows, modalities)
    labels = [subset_label(s, modalities) for s in shown]
    width_in, height_in, rotation = _figure_layout(labels, len(encoders))
    fig = Figure(figsize=(width_in, height_in), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(encoders)
    for i, enc in enumerate(encoders):
        xs = [j + (i - (len(encoders) - 1) / 2) * width for j in range(len(shown))]
        ax.bar(xs, [score.get((enc, s), 0.0) for s in shown], width, label=enc)
    ax.set_xticks(range(len(shown)), labels, rotation=rotation)
    # Wrapped to the figure's width (with M = 8 the key to the initials outgrows a narrow figure), never inside
    # an "X = name" entry: no-break spaces there.
    xlabel = textwrap.fill(_axis_label(modalities).replace(" = ", "\N{NO-BREAK SPACE}=\N{NO-BREAK SPACE}"),
                           int(width_in / _CHAR_IN))
    ax.set(xlabel=xlabel, ylabel=f"test {metric}", ylim=(0, 1),
           title=f"{dataset or 'data'}: linear probe on frozen features ({task})")
    fig.legend(loc="outside lower center", ncols=len(encoders), fontsize="small")  # keeps the bars clear
    ax.grid(axis="y", alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def write_results(out_dir, dataset: str, task: str, rows: list[dict], meta: dict | None = None) -> None:
    """Write DIR/results.json and DIR/results.png, each atomically (temporary file + os.replace).

    rows: [{"encoder": "pairwise_nce" | "pairwise_sigmoid" | "gram_nce" | "random_init" | "supervised",
    "modalities": [...], "metrics": {...}}], at least one; "modalities" names the data's modalities in full,
    any set of them.
    results.json = {"dataset", "task", **meta, "rows": [{"encoder", "modalities", "metrics"}]} (``meta``: more
    JSON-ready keys, fastpair-train's provenance; it cannot replace those three); every metric must be a
    finite number (ValueError naming the row and metric otherwise; nothing is written then). results.png: a
    grouped bar chart of the headline test metric (accuracy for multiclass, acc2 for regression) per subset, in
    ``subsets`` order of the rows' modalities and labelled by ``subset_label``, one bar per encoder.
    """
    if task not in TASKS:
        raise ValueError(f"write_results: task must be one of {TASKS}, got {task!r}")
    if not rows:
        raise ValueError("write_results: no rows to write")
    clean = []
    for i, row in enumerate(rows):
        missing = {"encoder", "modalities", "metrics"} - set(row)
        if missing:
            raise ValueError(f"write_results: row {i} lacks {sorted(missing)}")
        name = f"row {i} ({row['encoder']}, {'+'.join(row['modalities'])})"
        if HEADLINE[task] not in row["metrics"]:
            raise ValueError(f"write_results: {name} lacks the headline metric {HEADLINE[task]!r}")
        clean.append({"encoder": str(row["encoder"]), "modalities": [str(m) for m in row["modalities"]],
                      "metrics": _finite(row["metrics"], name)})
    if {"dataset", "task", "rows"} & set(meta or {}):
        raise ValueError(f"write_results: meta cannot replace 'dataset', 'task' or 'rows', got {sorted(meta)}")
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps({"dataset": dataset, "task": task, **(meta or {}), "rows": clean}, indent=2,
                      allow_nan=False) + "\n"
    atomic_write(os.path.join(out_dir, "results.json"), lambda f: f.write(text.encode()))
    _plot(os.path.join(out_dir, "results.png"), dataset, task, clean)


def format_table(rows: list[dict], task: str) -> str:
    """An aligned text table: one block per subset, one line per encoder, headline test metrics.

    The modalities come from the rows (``_run_modalities``), so any modality set works; the subsets follow
    ``subsets`` order and carry ``subset_label``'s labels, the column as wide as the longest. Accuracies and F1
    in percent; MAE and Pearson r as is. Rows without "encoder" (probe's own output) show "-".
    """
    if task not in TASKS:
        raise ValueError(f"format_table: task must be one of {TASKS}, got {task!r}")
    cols = _TABLE[task]
    modalities = _run_modalities(rows)
    rank = {s: i for i, s in enumerate(_subset_order(rows, modalities))}
    label = {s: subset_label(s, modalities) for s in rank}
    encoders = list(dict.fromkeys(r.get("encoder", "-") for r in rows))
    rows = sorted(rows, key=lambda r: (rank[tuple(r["modalities"])], encoders.index(r.get("encoder", "-"))))
    sub_w = max([len("subset"), *(len(text) for text in label.values())])
    enc_w = max([len("encoder"), *(len(e) for e in encoders)])
    header = f"{'subset':<{sub_w}}  {'encoder':<{enc_w}}" + "".join(f"  {h:>6}" for h, *_ in cols)
    lines, last = [header, "-" * len(header)], None
    for r in rows:
        subset = tuple(r["modalities"])
        cells = "".join(f"  {fmt.format(scale * r['metrics'][key]):>6}" for _, key, scale, fmt in cols)
        lines.append(f"{label[subset] if subset != last else '':<{sub_w}}  {r.get('encoder', '-'):<{enc_w}}{cells}")
        last = subset
    return "\n".join(lines)
