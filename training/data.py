"""Multimodal emotion-recognition (MER) feature data: the built-in synthetic set and the published feature files.

``load(spec, seed)`` returns an :class:`MERData` whose splits "train", "valid", "test" hold, per modality
(text, audio, vision for the MER files and the synthetic set; the file's own names for an .npz), a float32
array x and a bool mask, and the labels y (N,): int64 class ids (task "multiclass") or float32 scores
("regression"). A sequence modality has x (N, T_m, F_m) and mask (N, T_m) (True = a real time step, False
= padding); a vector modality (pre-pooled features, what most embedding data sets hold) has x (N, F_m) and
mask (N,) (True = present).

File formats. A file is opened in binary and told apart by its magic bytes (a zip, "PK", is an .npz; anything
else is read as a pickle); the layout is then recognized from its keys and array shapes, never from the file
name, and every shape is read from the file. Each file holds the splits "train", "valid", "test". The name
only shapes an error: a file named .npz that is neither a zip nor a pickle is "not a valid .npz (zip) file".

- MulT pickles (Tsai et al. 2019: iemocap_data.pkl, mosi_data.pkl, mosei_senti_data.pkl): each split is a dict
  with "text" (N, T, 300), "audio" (N, T, 74), "vision" (N, T, 35), "labels" and maybe "id".
  Labels (N, 4, 2) are IEMOCAP's: one (absent, present) pair per emotion in the order neutral, happy, sad,
  angry; the class is the emotion whose "present" bit (index 1 of the last axis) is set. A sample with no
  or several present bits gets the argmax of the present bits (the first such emotion; a warning on stderr
  counts them). Labels (N, 1, 1), (N, 1) or (N,) of floats are sentiment scores in [-3, 3] (MOSI, MOSEI;
  task regression, name "mult-sentiment": the two cannot be told apart by shapes).
- MMSA pickles (aligned_50.pkl / unaligned_50.pkl of MOSI, MOSEI, SIMS): each split has "text" (N, T, F)
  features (768 for BERT, 300 for GloVe; "text_bert", the (N, 3, T) token ids, is not used), "audio"
  (N, Ta, Fa), "vision" (N, Tv, Fv), "regression_labels" (N,) (task regression, name "mmsa"), maybe
  "audio_lengths" / "vision_lengths" and "classification_labels", "raw_text", "id" (not used).
- .npz (read with allow_pickle=False): "{split}/labels" (integers: task multiclass, classes "0".."K-1";
  floats: task regression) and, for any M >= 2 modality names, "{split}/{name}": (N, T, F) sequences or (N, F)
  vectors, the same kind and feature count in every split; optional "{split}/{name}_lengths" (N,) for a
  sequence. The modalities are the train split's other keys, in the file's order (the order of the loss's
  pairs); "labels", "regression_labels", "id", "y" and names ending in "_lengths" or "_mask" are reserved, and
  a name is letters, digits and "_", starting with a letter. Name "npz".

Masks: where "{modality}_lengths" exists, step t is valid iff t < length (padding at the end); otherwise a
step is valid iff one of its features is nonzero (MulT pads with zeros; a NaN counts as data), and so is a
vector. A modality with no valid step at all (mask all False) is a missing modality and is kept as such.

Hygiene, in order: cast to float32 (a float64 value beyond float32's range becomes inf); NaN and +-inf set
to 0, counted per "split/modality" (MulT's MOSEI audio holds -inf), with one warning line on stderr when
any; each feature standardized with the mean and std over the train split's valid time steps (the same
shift and scale for all splits; std < 1e-6 counts as 1, so a constant feature becomes 0, not NaN);
padding steps are 0 afterwards. A malformed file raises :class:`DataError` with a one-line message naming
the file and the key.

Safety: pickles run through a restricted unpickler that resolves only the globals numpy arrays, numpy
scalars and plain containers need, under numpy 1.x ("numpy.core.*") and 2.x ("numpy._core.*") module names
(the published files were written by numpy 1.x). Any other global is refused with DataError, never
imported or called.

Synthetic data ("synthetic", the default): generated from the seed by ``fastpair.training.synthetic``, whose
docstring has the generative process.
"""

from __future__ import annotations

import codecs
import pickle
import sys
from collections import OrderedDict
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

from .names import IEMOCAP_CLASSES, MODALITIES, RESERVED, SPLITS, modality_name_error
from .synthetic import make_synthetic

LAYOUTS = (
    "MulT pickle (splits with text/audio/vision (N,T,F) and labels (N,4,2) or (N,1,1)), "
    "MMSA pickle (text/audio/vision (N,T,F), regression_labels (N,), optional *_lengths), "
    ".npz ('{split}/{name}' (N,T,F) or (N,F) for M >= 2 names, and '{split}/labels' (N,)), or 'synthetic'"
)


class DataError(ValueError):
    """A data file that cannot be read or does not have a supported layout (one-line message)."""


@dataclass
class Split:
    x: dict[str, np.ndarray]  # modality -> float32 (N, T_m, F_m) or (N, F_m), finite, standardized, 0 on padding
    mask: dict[str, np.ndarray]  # modality -> bool (N, T_m) (True = a real time step) or (N,) (True = present)
    y: np.ndarray  # (N,) int64 class ids or float32 scores


@dataclass
class MERData:
    name: str  # "synthetic", "iemocap", "mult-sentiment", "mmsa", "npz"
    task: str  # "multiclass" | "regression"
    classes: list[str] | None  # class names for multiclass, None for regression
    splits: dict[str, Split]  # "train", "valid", "test"
    nonfinite: dict[str, int]  # "split/modality" -> NaN/inf values set to 0 (every key present)
    source: str  # the path, or "synthetic(seed=S)"

    @property
    def modalities(self) -> tuple[str, ...]:
        """The modality names in the data's order (the order of the loss's pairs)."""
        return tuple(self.splits["train"].x)

    @property
    def dims(self) -> dict[str, int]:
        return {m: x.shape[-1] for m, x in self.splits["train"].x.items()}

    def is_sequence(self, m: str) -> bool:
        """(N, T, F) time steps, or else (N, F) vectors."""
        return self.splits["train"].x[m].ndim == 3


def load(spec: str = "synthetic", seed: int = 0) -> MERData:
    """Load ``spec``: "synthetic" (generated from ``seed``) or the path of a MulT/MMSA pickle or an .npz."""
    if spec == "synthetic":
        raw, src, container = make_synthetic(seed), f"synthetic(seed={seed})", "synthetic"
    else:
        raw, container = _read(Path(spec))
        src = str(spec)
    name, task, classes, parts = _parse(raw, src, container)
    if container == "synthetic":
        classes = list(IEMOCAP_CLASSES)
    splits, nonfinite = _clean(parts, src)
    return MERData(name, task, classes, splits, nonfinite, src)


def to_tensors(split: Split) -> dict[str, torch.Tensor]:
    """{"text": (N,T,F) float32, "text_mask": (N,T) bool, ..., "y": (N,) int64 or float32}; shares memory.
    A vector modality: (N,F) and (N,)."""
    out = {}
    for m in split.x:
        out[m] = torch.from_numpy(split.x[m])
        out[m + "_mask"] = torch.from_numpy(split.mask[m])
    out["y"] = torch.from_numpy(split.y)
    return out


# ----------------------------------------------------------------------------------------------- reading files

# What unpickling numpy arrays and plain containers needs, resolved from numpy itself (module names moved from
# numpy.core to numpy._core in numpy 2; protocol 5 rebuilds contiguous arrays with _frombuffer).
_RECONSTRUCT = np.zeros(1).__reduce__()[0]
_FROMBUFFER = np.zeros(1).__reduce_ex__(5)[0]
_SCALAR = np.float64(0).__reduce__()[0]
_SAFE_GLOBALS = {("numpy", "ndarray"): np.ndarray, ("numpy", "dtype"): np.dtype,
                 ("collections", "OrderedDict"): OrderedDict}
for _core in ("numpy.core", "numpy._core"):
    _SAFE_GLOBALS.update({(f"{_core}.multiarray", "_reconstruct"): _RECONSTRUCT,
                          (f"{_core}.multiarray", "scalar"): _SCALAR,
                          (f"{_core}.numeric", "_frombuffer"): _FROMBUFFER})
for _t in (dict, list, tuple, set, frozenset, bytes, bytearray, str, int, float, complex, bool):
    _SAFE_GLOBALS[("builtins", _t.__name__)] = _SAFE_GLOBALS[("__builtin__", _t.__name__)] = _t
# Python 3 pickles bytes as _codecs.encode(str, "latin1") under protocols 0-2 (numpy 1.x array buffers).
_SAFE_GLOBALS[("_codecs", "encode")] = codecs.encode


class _RestrictedUnpickler(pickle.Unpickler):
    def __init__(self, file, src: str):
        super().__init__(file, encoding="latin1")  # latin1: numpy arrays pickled by Python 2
        self.src = src

    def find_class(self, module: str, name: str):
        try:
            return _SAFE_GLOBALS[(module, name)]
        except KeyError:
            raise DataError(f"{self.src}: refused to unpickle global {module}.{name} "
                            "(only numpy arrays and plain containers are allowed)") from None


def _read(path: Path) -> tuple[object, str]:
    """The file's content as nested dicts of arrays, and its container: "pickle" or "npz"."""
    try:  # streamed, not read into memory first: the published MOSEI pickles are several GB
        f = path.open("rb")
    except OSError as e:
        raise DataError(f"{path}: cannot read ({e.strerror or e})") from None
    with f:
        head = f.read(8)
        f.seek(0)
        if head[:2] == b"PK":
            try:
                with np.load(f, allow_pickle=False) as z:
                    flat = {k: z[k] for k in z.files}
            except Exception as e:  # BadZipFile, zlib.error, ValueError (object arrays), ...: whatever a bad zip raises
                raise DataError(f"{path}: unreadable or truncated .npz ({_one_line(e)})") from None
            nested: dict = {}
            for key, arr in flat.items():
                split, _, field = key.partition("/")
                nested.setdefault(split, {})[field] = arr
            return nested, "npz"
        try:
            return _RestrictedUnpickler(f, str(path)).load(), "pickle"
        except DataError:
            raise
        except Exception as e:  # UnpicklingError, EOFError, ValueError, ...: whatever a bad byte stream raises
            if path.suffix.lower() == ".npz":  # meant as an .npz (a pickle named so was read above): say why not
                raise DataError(f"{path}: not a valid .npz (zip) file: an .npz is a zip archive, which starts with "
                                f"b'PK', this file with {head!r} (nor is it a readable pickle)") from None
            raise DataError(f"{path}: not a supported file: unreadable or truncated pickle ({_one_line(e)}); "
                            f"supported: {LAYOUTS}") from None


def _one_line(e: Exception) -> str:
    return f"{type(e).__name__}: {e}".replace("\n", " ")[:200]


# ------------------------------------------------------------------------------------------ recognizing layouts

def _parse(raw, src: str, container: str):
    """-> (name, task, classes, {split: (x {m: array}, lengths {m: array | None}, y)}), arrays still raw."""
    if not isinstance(raw, dict) or not any(s in raw for s in SPLITS):
        raise DataError(f"{src}: unknown layout (no train/valid/test splits); supported: {LAYOUTS}")
    for s in SPLITS:
        if s not in raw:
            raise DataError(f"{src}: missing split {s!r} (found {sorted(map(str, raw))})")
        if not isinstance(raw[s], dict):
            raise DataError(f"{src}: split {s!r} is a {type(raw[s]).__name__}, expected a dict of arrays")
    label_key = "regression_labels" if "regression_labels" in raw["train"] else "labels"
    if label_key not in raw["train"]:
        raise DataError(f"{src}: unknown layout (train has keys {sorted(map(str, raw['train']))}, no 'labels' "
                        f"or 'regression_labels'); supported: {LAYOUTS}")
    names = _modality_names(raw["train"], src) if container == "npz" else MODALITIES
    parts, kinds, shapes = {}, set(), {}
    for s in SPLITS:
        d, xs, lengths = raw[s], {}, {}
        for m in names:
            x = xs[m] = _modality(d, s, m, src, shapes)
            n = len(xs[names[0]])
            if len(x) != n:
                raise DataError(f"{src}: {s}/{m} has {len(x)} samples but {s}/{names[0]} has {n}")
            lengths[m] = _lengths(d, s, m, n, src) if f"{m}_lengths" in d and x.ndim == 3 else None
        y, kind = _labels(_array(d, s, label_key, src), s, label_key, n, src, names[0])
        parts[s] = (xs, lengths, y)
        kinds.add(kind)
    if len(kinds) > 1:
        raise DataError(f"{src}: {label_key} mix label kinds across splits ({sorted(kinds)})")
    kind = kinds.pop()
    if kind == "emotion":
        return "iemocap", "multiclass", list(IEMOCAP_CLASSES), parts
    if kind == "class":  # integer classes: .npz (or a pickle in the same layout, "mult")
        k = max(int(p[2].max(initial=-1)) for p in parts.values()) + 1
        return {"pickle": "mult"}.get(container, container), "multiclass", [str(i) for i in range(k)], parts
    if label_key == "regression_labels":
        return "mmsa", "regression", None, parts
    return {"pickle": "mult-sentiment"}.get(container, container), "regression", None, parts


def _modality_names(train: dict, src: str) -> tuple[str, ...]:
    """An .npz's modalities: the train split's keys other than the labels, "id" and "*_lengths", in order."""
    names = tuple(k for k in map(str, train) if k not in RESERVED and not k.endswith("_lengths"))
    for m in names:
        why = modality_name_error(m)
        if why:
            raise DataError(f"{src}: train/{m}: {why}")
    if len(names) < 2:
        raise DataError(f"{src}: at least 2 modalities expected (arrays 'train/NAME' beside 'train/labels'), "
                        f"found {list(names)}")
    return names


def _modality(d: dict, split: str, m: str, src: str, shapes: dict) -> np.ndarray:
    """A modality's array, checked: numbers, (N, T, F) or (N, F), and the kind and feature count of train's."""
    x = _array(d, split, m, src)
    if x.ndim not in (2, 3):
        raise DataError(f"{src}: {split}/{m} has shape {x.shape}, expected (N, T, F) sequences or (N, F) vectors")
    if x.dtype.kind not in "biuf":
        raise DataError(f"{src}: {split}/{m} has dtype {x.dtype}, expected numbers")
    if len(x) == 0 or 0 in x.shape[1:]:
        raise DataError(f"{src}: {split}/{m} has shape {x.shape}: every split needs samples, every sequence "
                        "time steps and every modality features")
    kind = (x.ndim, x.shape[-1])
    if shapes.setdefault(m, kind) != kind:
        expected = "(N, T, F)" if shapes[m][0] == 3 else "(N, F)"
        raise DataError(f"{src}: {split}/{m} has shape {x.shape} but train/{m} is {expected} with "
                        f"{shapes[m][1]} features")
    return x


def _array(d: dict, split: str, key: str, src: str) -> np.ndarray:
    if key not in d:
        raise DataError(f"{src}: missing key {split}/{key} (found {sorted(map(str, d))})")
    try:
        return np.asarray(d[key])
    except (ValueError, TypeError) as e:
        raise DataError(f"{src}: {split}/{key} is not an array ({_one_line(e)})") from None


def _lengths(d: dict, split: str, m: str, n: int, src: str) -> np.ndarray:
    key = f"{m}_lengths"
    arr = _array(d, split, key, src)
    if arr.shape != (n,) or arr.dtype.kind not in "biuf":
        raise DataError(f"{src}: {split}/{key} has shape {arr.shape} and dtype {arr.dtype}, expected ({n},) numbers")
    return arr


def _labels(arr: np.ndarray, split: str, key: str, n: int, src: str, first: str) -> tuple[np.ndarray, str]:
    """-> (y, kind): kind "emotion" (IEMOCAP (N,4,2)), "class" (integers (N,)) or "score" (floats (N,[1,[1]]))."""
    if arr.ndim == 0 or len(arr) != n:
        raise DataError(f"{src}: {split}/{key} has shape {arr.shape} but {split}/{first} has {n} samples")
    if arr.ndim == 3 and arr.shape[1:] == (4, 2):
        present = arr[:, :, 1].astype(np.float64)
        unclear = int((np.count_nonzero(present > 0, axis=1) != 1).sum())
        if unclear:  # no emotion or several: argmax of the present bits, i.e. the first one set (or neutral)
            print(f"warning: {src}: {unclear} {split} labels have no or several present emotions; "
                  "took the first (argmax)", file=sys.stderr)
        return present.argmax(axis=1).astype(np.int64), "emotion"
    if arr.dtype.kind in "iub" and arr.shape == (n,):
        if n and arr.min() < 0:
            raise DataError(f"{src}: {split}/{key} has a negative class id ({arr.min()})")
        return arr.astype(np.int64), "class"
    if arr.dtype.kind == "f" and arr.shape in ((n,), (n, 1), (n, 1, 1)):
        y = arr.reshape(n).astype(np.float32)
        if not np.isfinite(y).all():
            raise DataError(f"{src}: {split}/{key} holds NaN or inf scores")
        return y, "score"
    raise DataError(f"{src}: {split}/{key} has shape {arr.shape} and dtype {arr.dtype}; expected (N,4,2) emotion "
                    "bits, (N,) integer classes or (N,), (N,1), (N,1,1) float scores")


# ------------------------------------------------------------------------------------------------------ hygiene

def _clean(parts: dict, src: str) -> tuple[dict[str, Split], dict[str, int]]:
    """Masks, float32, NaN/inf -> 0 (counted), standardization over train valid steps, padding -> 0."""
    xs, masks, nonfinite = {}, {}, {}
    names = tuple(parts["train"][0])
    for s, (x_raw, lengths, _) in parts.items():
        for m in names:
            a = x_raw[m] if x_raw[m].ndim == 3 else x_raw[m][:, None, :]  # a vector is a sequence of one step
            if lengths[m] is not None:  # valid iff t < length (padding at the end)
                mask = np.arange(a.shape[1]) < np.asarray(lengths[m]).reshape(-1, 1)
            else:  # valid iff some feature is nonzero; NaN != 0, so a NaN step is data
                mask = _chunked(a, lambda part: (part != 0).any(axis=-1))
            with np.errstate(over="ignore"):  # float64 beyond float32's range -> inf, zeroed just below
                x = np.require(a, np.float32, ["C", "W"])  # no copy when it already is float32
            if any(np.may_share_memory(x, other) for other in xs.values()):
                x = x.copy()  # one object under two keys (pickle memo): standardize each once
            nonfinite[f"{s}/{m}"] = int(_chunked(x, _zero_nonfinite).sum())
            xs[s, m], masks[s, m] = x, mask
    if any(nonfinite.values()):
        counts = ", ".join(f"{k}: {v}" for k, v in nonfinite.items() if v)
        print(f"warning: {src}: set {sum(nonfinite.values())} NaN/inf values to 0 ({counts})", file=sys.stderr)
    for m in names:
        mean, std = _feature_stats(xs["train", m], masks["train", m])
        for s in parts:
            x = xs[s, m]
            x -= mean  # in place: no copy of a large modality
            x /= std
            x[~masks[s, m]] = 0.0
    vector = {m: parts["train"][0][m].ndim == 2 for m in names}  # back to (N, F) and (N,): views, no copies
    splits = {s: Split({m: xs[s, m][:, 0] if vector[m] else xs[s, m] for m in names},
                       {m: masks[s, m][:, 0] if vector[m] else masks[s, m] for m in names}, parts[s][2])
              for s in parts}
    return splits, nonfinite


def _chunked(x: np.ndarray, fn, chunk: int = 1024) -> np.ndarray:
    """fn over chunks of samples, concatenated: a temporary the size of a chunk, not of the modality (a bool
    copy of MOSEI's text features alone is 345 MB)."""
    return np.concatenate([np.atleast_1d(fn(x[i:i + chunk])) for i in range(0, len(x), chunk)] or [fn(x)])


def _zero_nonfinite(part: np.ndarray) -> np.ndarray:
    """Set NaN and +-inf in ``part`` (a view) to 0 in place; returns how many per sample."""
    bad = ~np.isfinite(part)
    part[bad] = 0.0
    return bad.reshape(len(part), -1).sum(axis=1)


def _feature_stats(x: np.ndarray, mask: np.ndarray, chunk: int = 1024) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature mean and std (float32) over the valid steps, two passes in float64 over chunks of samples
    (no full-size temporary); std < 1e-6 (constant feature, or no valid step) -> 1."""
    count = max(int(mask.sum()), 1)
    total = np.zeros(x.shape[-1])
    for i in range(0, len(x), chunk):
        total += x[i:i + chunk][mask[i:i + chunk]].sum(axis=0, dtype=np.float64)
    mean = total / count
    sq = np.zeros(x.shape[-1])
    for i in range(0, len(x), chunk):
        sq += ((x[i:i + chunk][mask[i:i + chunk]] - mean) ** 2).sum(axis=0)
    std = np.sqrt(sq / count)
    std[std < 1e-6] = 1.0
    return mean.astype(np.float32), std.astype(np.float32)
