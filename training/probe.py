"""Fusion probe: linear models on frozen encoder features, for every modality subset (the paper's protocol).

Protocol, per subset of (text, audio, vision) in ``SUBSETS`` order (T, A, V, TA, TV, AV, TAV):

1. concatenate the frozen 512-d features of the chosen modalities;
2. standardize with a ``StandardScaler`` fit on the train split only;
3. fit on train, for each regularization strength of a small grid, a scikit-learn
   ``LogisticRegression`` (multinomial, lbfgs; grid ``C_GRID``) for task "multiclass" or a ``Ridge``
   (grid ``ALPHA_GRID``) for task "regression";
4. choose the strength on the valid split: highest valid accuracy (classification) or lowest valid MAE
   (regression); ties go to the stronger regularization. The valid split is never trained on;
5. report the test metrics of the chosen train-fitted model, plus the chosen ``C`` or ``alpha``.

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
import warnings
from itertools import combinations

import numpy as np
from sklearn.exceptions import ConvergenceWarning
from sklearn.linear_model import LogisticRegression, Ridge
from sklearn.metrics import accuracy_score, balanced_accuracy_score, f1_score, precision_recall_fscore_support
from sklearn.preprocessing import StandardScaler
from threadpoolctl import threadpool_limits  # a scikit-learn dependency

from .checkpoint import atomic_write
from .names import MODALITIES, SPLITS

SUBSETS: list[tuple[str, ...]] = [c for k in (1, 2, 3) for c in combinations(MODALITIES, k)]  # T A V TA TV AV TAV
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


def _check_inputs(features, labels, task, classes) -> None:
    if task not in TASKS:
        raise ValueError(f"probe: task must be one of {TASKS}, got {task!r}")
    if task == "multiclass" and not classes:
        raise ValueError("probe: task 'multiclass' needs the class names, got classes=None")
    for split in SPLITS:
        if split not in features or split not in labels:
            raise ValueError(f"probe: features and labels need split {split!r}, got {sorted(features)} "
                             f"and {sorted(labels)}")
        y, n = np.asarray(labels[split]).reshape(-1), len(labels[split])
        if task == "multiclass" and (n == 0 or np.any(y != np.round(y)) or y.min() < 0 or y.max() >= len(classes)):
            raise ValueError(f"probe: labels[{split!r}] must be class ids in [0, {len(classes)}) ({classes})")
        if task == "regression" and (n == 0 or not np.isfinite(y).all()):
            raise ValueError(f"probe: labels[{split!r}] must be non-empty and finite for task 'regression'")
        for m in MODALITIES:
            x = features[split].get(m)
            if x is None or np.ndim(x) != 2 or len(x) != n:
                raise ValueError(f"probe: features[{split!r}][{m!r}] must be (N, D) with N = {n} labels, "
                                 f"got {None if x is None else np.shape(x)}")
            if np.shape(x)[1] != np.shape(features["train"][m])[1]:
                raise ValueError(f"probe: features[{split!r}][{m!r}] has {np.shape(x)[1]} features, "
                                 f"train has {np.shape(features['train'][m])[1]}")
            if not np.isfinite(x).all():
                raise ValueError(f"probe: features[{split!r}][{m!r}] has non-finite values")


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
          classes: list[str] | None, dataset: str = "", seed: int = 0) -> list[dict]:
    """Linear fusion probe on frozen features for every modality subset (see the module docstring).

    features[split][modality]: (N_split, D_m) float features, splits "train", "valid", "test", modalities
    text/audio/vision. labels[split]: (N_split,) int class ids in [0, len(classes)) for task "multiclass",
    float scores for "regression". ``dataset == "iemocap"`` adds MulT's per-emotion binary metrics.
    Returns one row per subset, in ``SUBSETS`` order: {"modalities": [...], "metrics": {..., "C" | "alpha"}}.
    """
    _check_inputs(features, labels, task, classes)
    y = {s: np.asarray(labels[s]).reshape(-1) for s in SPLITS}
    y = {s: (v.astype(np.int64) if task == "multiclass" else v.astype(np.float64)) for s, v in y.items()}
    # Standardizing each modality once equals standardizing every concatenation (the scaler is per column).
    scaled = {}
    for m in MODALITIES:
        scaler = StandardScaler().fit(np.asarray(features["train"][m], dtype=np.float64))
        scaled[m] = {s: scaler.transform(np.asarray(features[s][m], dtype=np.float64)) for s in SPLITS}
    rows = []
    for subset in SUBSETS:
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


def _plot(path: str, dataset: str, task: str, rows: list[dict]) -> None:
    # Figure + its own Agg canvas, without pyplot: no global backend switch, no figure registry to leak into.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    metric, encoders = HEADLINE[task], list(dict.fromkeys(r["encoder"] for r in rows))
    score = {(r["encoder"], tuple(r["modalities"])): r["metrics"][metric] for r in rows}
    subsets = [s for s in SUBSETS if any(k[1] == s for k in score)]
    fig = Figure(figsize=(max(6.0, 1.0 + 0.35 * len(subsets) * len(encoders)), 4.2), layout="constrained")
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    width = 0.8 / len(encoders)
    for i, enc in enumerate(encoders):
        xs = [j + (i - (len(encoders) - 1) / 2) * width for j in range(len(subsets))]
        ax.bar(xs, [score.get((enc, s), 0.0) for s in subsets], width, label=enc)
    ax.set_xticks(range(len(subsets)), ["".join(m[0].upper() for m in s) for s in subsets])
    ax.set(xlabel="modalities (T = text, A = audio, V = vision)", ylabel=f"test {metric}", ylim=(0, 1),
           title=f"{dataset or 'data'}: linear probe on frozen features ({task})")
    fig.legend(loc="outside lower center", ncols=len(encoders), fontsize="small")  # keeps the bars clear
    ax.grid(axis="y", alpha=0.3)
    atomic_write(path, lambda f: fig.savefig(f, format="png", dpi=120))


def write_results(out_dir, dataset: str, task: str, rows: list[dict]) -> None:
    """Write DIR/results.json and DIR/results.png, each atomically (temporary file + os.replace).

    rows: [{"encoder": "pairwise_nce" | "pairwise_sigmoid" | "random_init" | "supervised", "modalities": [...],
    "metrics": {...}}].
    results.json = {"dataset", "task", "rows": [{"encoder", "modalities", "metrics"}]}; every metric must be a
    finite number (ValueError naming the row and metric otherwise; nothing is written then). results.png: a
    grouped bar chart of the headline test metric (accuracy for multiclass, acc2 for regression) per subset,
    one bar per encoder.
    """
    if task not in TASKS:
        raise ValueError(f"write_results: task must be one of {TASKS}, got {task!r}")
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
    os.makedirs(out_dir, exist_ok=True)
    text = json.dumps({"dataset": dataset, "task": task, "rows": clean}, indent=2, allow_nan=False) + "\n"
    atomic_write(os.path.join(out_dir, "results.json"), lambda f: f.write(text.encode()))
    _plot(os.path.join(out_dir, "results.png"), dataset, task, clean)


def format_table(rows: list[dict], task: str) -> str:
    """An aligned text table: one block per subset (SUBSETS order), one line per encoder, headline test metrics.

    Accuracies and F1 in percent; MAE and Pearson r as is. Rows without "encoder" (probe's own output) show "-".
    """
    if task not in TASKS:
        raise ValueError(f"format_table: task must be one of {TASKS}, got {task!r}")
    cols = _TABLE[task]
    order = {s: i for i, s in enumerate(SUBSETS)}
    encoders = list(dict.fromkeys(r.get("encoder", "-") for r in rows))
    rows = sorted(rows, key=lambda r: (order.get(tuple(r["modalities"]), len(order)),
                                       encoders.index(r.get("encoder", "-"))))
    enc_w = max(len("encoder"), *(len(e) for e in encoders))
    header = f"{'subset':<6}  {'encoder':<{enc_w}}" + "".join(f"  {h:>6}" for h, *_ in cols)
    lines, last = [header, "-" * len(header)], None
    for r in rows:
        subset = "".join(m[0].upper() for m in r["modalities"])
        cells = "".join(f"  {fmt.format(scale * r['metrics'][key]):>6}" for _, key, scale, fmt in cols)
        lines.append(f"{subset if subset != last else '':<6}  {r.get('encoder', '-'):<{enc_w}}{cells}")
        last = subset
    return "\n".join(lines)
