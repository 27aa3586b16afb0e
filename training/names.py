"""The names the training kit shares: the MER modalities of the published files and the synthetic set (in the
order of the loss's pairs: text-audio, text-vision, audio-vision), the splits, the keys of a data file that
are not modalities, IEMOCAP's four emotion classes, and the encoder kinds of ``--encoder``. Torch-free: the
command lines read these before they import torch."""

import re

MODALITIES = ("text", "audio", "vision")
SPLITS = ("train", "valid", "test")
LABEL_KEYS = ("labels", "regression_labels")
RESERVED = (*LABEL_KEYS, "id", "y")  # never a modality's name; nor "{name}_lengths" or "{name}_mask"
NAME = re.compile(r"[A-Za-z][A-Za-z0-9_]*")  # a modality: a Python identifier without "-", ",", "=" or ":"
IEMOCAP_CLASSES = ["neutral", "happy", "sad", "angry"]
ENCODER_KINDS = ("transformer", "tcn", "gru", "mlp")  # models.ENCODERS' keys, in this order


def modality_name_error(name: str) -> str | None:
    """Why ``name`` cannot name a modality, or None when it can: the batch keeps ``name``, ``name + "_mask"``
    and "y" side by side, and --pairs / --encoder spell names with "-", ",", "=" and ":"."""
    if not NAME.fullmatch(name):
        return "a modality's name must start with a letter and hold only letters, digits and '_'"
    if name in RESERVED or name.endswith(("_lengths", "_mask")):
        return f"{RESERVED} and names ending in _lengths or _mask are reserved"
    return None
