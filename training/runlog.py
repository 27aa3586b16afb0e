"""A training run's record: DIR/log.jsonl, the console line of each epoch, and TensorBoard (``--tensorboard``).

log.jsonl starts with a line about the data the run saw (name, source, task, split sizes, the splits trained
on, NaN/inf values set to 0), then one line per epoch: train and valid loss, lr, samples/s, whether it was
the best so far, and the objective's own fields (pairwise_nce: per-pair valid loss and retrieval accuracy,
temperature). A resumed run first drops the lines of the epochs it redoes. Rank 0 alone calls these.
"""

from __future__ import annotations

import json
import os

from .checkpoint import atomic_write
from .config import TrainError


def summary_writer():
    """TensorBoard's SummaryWriter class, or a TrainError naming the package to install."""
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise TrainError("--tensorboard needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter


class RunLog:
    """The log of one objective's run in ``out_dir``; ``name`` prefixes its console lines and scalars."""

    def __init__(self, out_dir: str, name: str, epochs: int):
        self.path, self.name, self.epochs = os.path.join(out_dir, "log.jsonl"), name, epochs
        self.writer = None

    def start(self, data, splits: list[str], batch: int, chunk: int = 0) -> None:
        """A fresh run: the log starts with the data it saw (a log of an earlier run here would mislead), the
        batch per step and the chunks its encoders ran in (0: whole batches)."""
        with open(self.path, "w") as f:
            f.write(json.dumps({"data": data.name, "source": data.source, "task": data.task,
                                "samples": {s: len(sp.y) for s, sp in data.splits.items()},
                                "train_splits": splits, "nonfinite_set_to_0": data.nonfinite,
                                "batch_size": batch, "chunk_size": chunk}) + "\n")

    def keep_until(self, last_epoch: int) -> None:
        """Keep the lines of the epochs a resumed run does not redo (atomically)."""
        if not os.path.exists(self.path):
            return
        with open(self.path) as f:
            keep = [line for line in f if line.strip() and json.loads(line).get("epoch", 0) <= last_epoch]
        atomic_write(self.path, lambda f: f.write("".join(keep).encode()))

    def open_tensorboard(self, out_dir: str) -> None:
        self.writer = summary_writer()(os.path.join(out_dir, "tensorboard"))

    def epoch(self, record: dict) -> str:
        """Append an epoch's record (and its numbers to TensorBoard); returns its console line."""
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        if self.writer is not None:
            for key, value in record.items():
                if isinstance(value, (int, float)) and not isinstance(value, bool):
                    self.writer.add_scalar(f"{self.name}/{key}", value, record["epoch"])
        return (f"[{self.name}] epoch {record['epoch']:3d}/{self.epochs}  train {record['train_loss']:.4f}  "
                f"valid {record['valid_loss']:.4f}{' *' if record['best'] else '  '}  "
                + (f"t {record['temperature']:.4f}  " if "temperature" in record else "")
                + f"{record['samples_per_s']:.0f} samples/s")

    def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
