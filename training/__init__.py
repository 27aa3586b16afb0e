"""Training kit of fastpair (installed as ``fastpair.training``): MER data loaders, per-modality
encoders, the label-free training loop and the fusion probe.

Not implemented yet (see README, "Not yet"); ``make train`` runs ``python -m fastpair.demo`` meanwhile.
"""
