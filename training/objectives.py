"""The training objectives of fastpair-train, behind one interface (the training loop never asks which).

All hold the same encoders (``fastpair.training.models.MultimodalEncoder``: per modality m of the data an
encoder E_m to a 512-d feature f_m and a projection head H_m) and add what their loss needs; ``model`` in a
checkpoint is an objective's state_dict.

- ``pairwise_nce`` (the paper's, no labels): z_m = H_m(dropout(f_m)) and, for each modality pair (p, q) of
  ``--pairs`` (every pair by default) over the samples that have both, with x, y the L2-normalized z_p, z_q
  and S_ij = <x_i, y_j> / t,

      L_pq = 1/(2n) sum_i [(logsumexp_j S_ij - S_ii) + (logsumexp_j S_ji - S_ii)],   L = mean_pq L_pq,

  with one learnable temperature t (``fastpair.PairwiseNCE``; ``--label-smoothing`` its label_smoothing).
  Under torchrun the j run over the global batch. With ``--views 2`` the batch holds two crops of every clip
  and its ids (``fastpair.training.views``): the positives are the crops of the same clip.
- ``pairwise_sigmoid`` (``--objective sigmoid``, no labels): the same encoders and heads with SigLIP's loss,
  L_pq = -(1/n) sum_ij log sigmoid(z_ij (S_ij + b)), z_ij = +1 for i = j, -1 else, with a learnable t and
  b (``fastpair.PairwiseSigmoid``).
- ``gram_nce`` (``--objective gram``, no labels): the same encoders and heads with GRAM's volume loss of all
  modalities at once (``fastpair.GramNCE``): the anchor's (``--anchor``, the first by default) samples against
  the tuples of the other modalities, scored by the volume their unit vectors span, InfoNCE both ways, with
  a learnable t (``--label-smoothing`` its label_smoothing).
- ``supervised`` (a baseline): a linear head on the concatenation of every f_m, trained with
  the labels: cross-entropy over the classes, or the L1 error of sentiment scores (MulT's regression loss).
  The projection heads are unused.
- ``random_init`` (the other baseline) is no objective: the pairwise_nce model as ``build`` makes it, untrained.

``build`` seeds torch right before construction, so every objective starts from the same encoder weights.
"""

from __future__ import annotations

import torch
from torch import nn

from fastpair import GradCache, GramNCE, PairwiseNCE, PairwiseSigmoid

from . import modalities
from .config import Config
from .models import MultimodalEncoder, present

Stats = dict[str, torch.Tensor]


class Objective(nn.Module):
    """The encoders plus one loss. ``forward(batch, group)`` is the training loss of a batch;
    ``validation(batch)`` the loss and per-batch statistics (means over the batch) that ``summary`` turns
    into log fields once averaged over the split."""

    name: str
    uses_labels: bool  # label-free objectives may also train on valid and test (--transductive)
    unused_parameters: bool  # parameters that get no gradient (DistributedDataParallel must be told)

    def __init__(self, cfg: Config, data):
        super().__init__()
        self.modalities = modalities.of(cfg, data)
        self.encoder = MultimodalEncoder(data.dims, self.modalities.kinds, width=cfg.width, layers=cfg.layers,
                                         dropout=cfg.dropout)

    def validation(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, Stats]:
        return self(batch), {}

    def summary(self, stats: Stats) -> dict:
        """The log line's fields beyond the losses, from the split's mean statistics."""
        return {}


class LabelFree(Objective):
    """A loss over every modality pair of the projected features, with learnable parameters (``self.loss``)."""

    uses_labels = False
    unused_parameters = False

    def forward(self, batch, group=None, stats: bool = False):
        """With ``group`` (W ranks, each passing its local batch) the negatives come from every rank's batch
        and the loss is W times this rank's share of the global loss: DistributedDataParallel's averaging
        then gives the gradients of the concatenated batch."""
        z, names = self.encoder(batch), self.modalities.names
        return self.loss(*(z[m].float() for m in names), mask=present(batch, names), ids=batch.get("ids"),
                         group=group, return_stats=stats)

    def step_in_chunks(self, batch, chunk_size: int, group=None) -> torch.Tensor:
        """``forward(batch, group)`` and its backward with each modality's encoder, dropout and head run on
        chunks of ``chunk_size`` samples (``fastpair.GradCache``): the same gradients, the activations of a
        chunk. Returns the loss, detached."""
        names = self.modalities.names

        def projected(m):
            return lambda x, mask: self.encoder.heads[m](self.encoder.drop(self.encoder.encoders[m](x, mask)))

        def loss(*z, **kwargs):
            return self.loss(*(e.float() for e in z), **kwargs)

        step = GradCache([projected(m) for m in names], loss, chunk_size)
        return step(*((batch[m], batch[m + "_mask"]) for m in names), mask=present(batch, names),
                    ids=batch.get("ids"), group=group)

    def validation(self, batch):
        loss, stats = self(batch, stats=True)
        return loss, {"pair_loss": stats["pair_losses"], "pair_accuracy": stats["pair_accuracy"]}

    def summary(self, stats):
        names = self.modalities.pair_names()
        return {"valid_pair_loss": {k: float(v) for k, v in zip(names, stats["pair_loss"])},
                # retrieval top-1 accuracy, both directions averaged
                "valid_pair_accuracy": {k: float(v.mean()) for k, v in zip(names, stats["pair_accuracy"])},
                "temperature": float(self.loss.temperature.detach().float().mean()),
                **({"bias": float(self.loss.bias.detach().float().mean())} if hasattr(self.loss, "bias") else {})}


class PairwiseNCEObjective(LabelFree):
    name = "pairwise_nce"

    def __init__(self, cfg: Config, data):
        super().__init__(cfg, data)
        self.loss = PairwiseNCE(len(self.modalities.names), temperature=cfg.temperature,
                                pairs=self.modalities.pairs, label_smoothing=cfg.label_smoothing)


class PairwiseSigmoidObjective(LabelFree):
    name = "pairwise_sigmoid"

    def __init__(self, cfg: Config, data):
        super().__init__(cfg, data)
        self.loss = PairwiseSigmoid(len(self.modalities.names), temperature=cfg.temperature, bias=cfg.bias,
                                    pairs=self.modalities.pairs)


class GramObjective(LabelFree):
    """GRAM's volume loss of all modalities at once: the anchor's samples against the tuples of the others."""

    name = "gram_nce"

    def __init__(self, cfg: Config, data):
        super().__init__(cfg, data)
        self.loss = GramNCE(len(self.modalities.names), anchor=self.modalities.anchor, temperature=cfg.temperature,
                            label_smoothing=cfg.label_smoothing)

    def validation(self, batch):
        loss, stats = self(batch, stats=True)
        return loss, {"direction_loss": stats["direction_losses"], "direction_accuracy": stats["direction_accuracy"]}

    def summary(self, stats):
        anchor = self.modalities.names[self.modalities.anchor]
        names = (f"{anchor}->tuples", f"tuples->{anchor}")
        return {"valid_direction_loss": {k: float(v) for k, v in zip(names, stats["direction_loss"])},
                "valid_direction_accuracy": {k: float(v) for k, v in zip(names, stats["direction_accuracy"])},
                "temperature": float(self.loss.temperature.detach().float())}


class SupervisedObjective(Objective):
    name = "supervised"
    uses_labels = True
    unused_parameters = True  # the projection heads: their gradients stay None, as in a single process

    def __init__(self, cfg: Config, data):
        super().__init__(cfg, data)
        self.task = data.task
        self.head = nn.Linear(len(self.modalities.names) * 512, len(data.classes) if data.task == "multiclass" else 1)

    def forward(self, batch, group=None):
        """The local batch's loss: its mean over the ranks' equal batches is the global batch's."""
        fused = torch.cat([f.float() for f in self.encoder.features(batch).values()], dim=1)
        pred = self.head(fused)
        if self.task == "multiclass":
            return nn.functional.cross_entropy(pred, batch["y"])
        return nn.functional.l1_loss(pred.squeeze(1), batch["y"])


OBJECTIVES = {o.name: o for o in (PairwiseNCEObjective, PairwiseSigmoidObjective, GramObjective,
                                  SupervisedObjective)}
LABEL_FREE = {"nce": PairwiseNCEObjective.name, "sigmoid": PairwiseSigmoidObjective.name,  # by --objective
              "gram": GramObjective.name}


def build(cfg: Config, data, name: str) -> Objective:
    """Objective ``name`` for ``data``, from the same initial encoder weights for every name (seeded here)."""
    torch.manual_seed(cfg.seed)
    return OBJECTIVES[name](cfg, data)
