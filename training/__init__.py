"""Training kit of fastpair (installed as ``fastpair.training``). The experiment and its command lines
(experiment.py) run on: options (config.py), MER data loaders (data.py) and the synthetic set (synthetic.py),
per-modality encoders (models.py), the objectives (objectives.py), the training loop (train.py) with its
torchrun machinery (world.py), checkpoints (checkpoint.py) and run log (runlog.py), and the fusion probe
(probe.py)."""
