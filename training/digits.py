"""Real data for "bring your own modalities": scikit-learn's handwritten digits as four modalities.

    python -m fastpair.training.digits data/digits.npz [--seed 0]

scikit-learn ships the 1,797 8 x 8 digit images of the UCI "Optical Recognition of Handwritten Digits" set
(``sklearn.datasets.load_digits``, 10 classes; no download). Each image's four quadrants become four views of
one sample, the classic multi-view setting of co-training: three as sequences (one step per pixel row, 4
steps x 4 pixels) and the fourth as a (16,) vector, so a run mixes sequence and vector encoders:

    top_left (N, 4, 4)   top_right (N, 4, 4)   bottom_left (N, 4, 4)   bottom_right (N, 16)

with "{name}_lengths" 4 for the sequences (a blank pixel row is white, not padding),

written as an .npz in fastpair-train's layout ("{split}/{name}", "{split}/labels") with a random 60/20/20
train/valid/test split of the images (``--seed``). No quadrant alone shows the whole digit, so the label-free
loss has to find what the quadrants of one image share.
"""

from __future__ import annotations

import argparse
import os

import numpy as np

from .checkpoint import atomic_write

QUADRANTS = {"top_left": (slice(0, 4), slice(0, 4)), "top_right": (slice(0, 4), slice(4, 8)),
             "bottom_left": (slice(4, 8), slice(0, 4)), "bottom_right": (slice(4, 8), slice(4, 8))}
VECTOR = "bottom_right"
SHARES = (0.6, 0.2)  # train, valid; the rest is test


def splits(n: int, seed: int) -> list[tuple[str, np.ndarray]]:
    """A random 60/20/20 train/valid/test split of n samples: [(split, indices)]."""
    order = np.random.default_rng(seed).permutation(n)
    cut = np.cumsum([round(share * n) for share in SHARES])
    return list(zip(("train", "valid", "test"), np.split(order, cut)))


def write_npz(path: str, arrays: dict[str, np.ndarray]) -> None:
    """The arrays as an .npz at ``path``, atomically (its folder made if needed)."""
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    atomic_write(path, lambda f: np.savez(f, **arrays))


def cli(prog: str, description: str, write, argv) -> int:
    """``prog PATH [--seed S]``: write the data set's .npz (``write(path, seed)`` returns its arrays)."""
    p = argparse.ArgumentParser(prog=prog, description=description)
    p.add_argument("path", help="the .npz to write, e.g. data/NAME.npz")
    p.add_argument("--seed", type=int, default=0, help="the random train/valid/test split")
    args = p.parse_args(argv)
    try:
        arrays = write(args.path, args.seed)
    except OSError as e:
        p.error(f"cannot write {args.path} ({e.strerror or e})")
    print(f"wrote {args.path}: " + ", ".join(f"{name} {'x'.join(map(str, a.shape))}"
                                             for name, a in arrays.items() if name.startswith("train/")))
    return 0


def digits_arrays(seed: int = 0) -> dict[str, np.ndarray]:
    """{"{split}/{name}": array} for the four quadrants and the labels (see the module docstring)."""
    from sklearn.datasets import load_digits

    digits = load_digits()
    images, labels = digits.images.astype(np.float32), digits.target.astype(np.int64)  # (1797, 8, 8), (1797,)
    out = {}
    for split, idx in splits(len(labels), seed):
        for name, (rows, cols) in QUADRANTS.items():
            quadrant = images[idx][:, rows, cols]
            out[f"{split}/{name}"] = quadrant.reshape(len(idx), -1) if name == VECTOR else quadrant
            if name != VECTOR:  # every row is data: a blank pixel row is white, not padding
                out[f"{split}/{name}_lengths"] = np.full(len(idx), quadrant.shape[1])
        out[f"{split}/labels"] = labels[idx]
    return out


def write_digits(path: str, seed: int = 0) -> dict[str, np.ndarray]:
    """Write the .npz to ``path`` atomically; returns its arrays."""
    arrays = digits_arrays(seed)
    write_npz(path, arrays)
    return arrays


def main(argv=None) -> int:
    return cli("python -m fastpair.training.digits", __doc__.splitlines()[0], write_digits, argv)


if __name__ == "__main__":
    raise SystemExit(main())
