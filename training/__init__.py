"""Training kit of fastpair (installed as ``fastpair.training``): MER data loaders (data.py), per-modality
encoders (models.py), the label-free training loop and CLIs (train.py) and the fusion probe (probe.py)."""
