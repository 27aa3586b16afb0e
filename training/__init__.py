"""Training kit of fastpair (installed as ``fastpair.training``). The command lines (cli.py, torch-free until
their options are parsed) run the experiment (experiment.py) on: options (config.py), MER data loaders (data.py)
and the synthetic set (synthetic.py), per-modality encoders (models.py), the objectives (objectives.py), the
training loop (train.py) with its torchrun machinery (world.py), checkpoints (checkpoint.py), run log
(runlog.py) and progress lines (progress.py), and the fusion probe (probe.py)."""
