"""Real data with three natural views: scikit-learn's breast cancer (Wisconsin diagnostic) set.

    python -m fastpair.training.cancer data/cancer.npz [--seed 0]

scikit-learn ships the 569 fine-needle aspirates of the UCI "Breast Cancer Wisconsin (Diagnostic)" set
(``sklearn.datasets.load_breast_cancer``, malignant or benign; no download). Ten measurements of the cell
nuclei in each image (radius, texture, perimeter, area, smoothness, compactness, concavity, concave points,
symmetry, fractal dimension) are summarized three ways, which become three modalities of one sample:

    mean (N, 10)   error (N, 10)   worst (N, 10)

(the mean over the nuclei, its standard error, the mean of the three largest), written as an .npz in
fastpair-train's layout with a random 60/20/20 train/valid/test split (``--seed``; labels 0 malignant,
1 benign). The label-free loss has to find what the three summaries of one aspirate share.
"""

from __future__ import annotations

import numpy as np

from .digits import cli, splits, write_npz

VIEWS = ("mean", "error", "worst")  # scikit-learn's columns 0-9, 10-19, 20-29


def cancer_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """{"{split}/{name}": array} for the three views and the labels (see the module docstring)."""
    from sklearn.datasets import load_breast_cancer

    data = load_breast_cancer()
    x, labels = data.data.astype(np.float32), data.target.astype(np.int64)  # (569, 30), (569,)
    out = {}
    for split, idx in splits(len(labels), seed):
        for k, name in enumerate(VIEWS):
            out[f"{split}/{name}"] = np.ascontiguousarray(x[idx, 10 * k:10 * (k + 1)])
        out[f"{split}/labels"] = labels[idx]
    return out


def write_cancer(path: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the .npz to ``path`` atomically; returns its arrays."""
    arrays = cancer_arrays(seed)
    write_npz(path, arrays)
    return arrays


def main(argv=None) -> int:
    return cli("python -m fastpair.training.cancer", __doc__.splitlines()[0], write_cancer, argv)


if __name__ == "__main__":
    raise SystemExit(main())
