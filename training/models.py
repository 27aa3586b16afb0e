"""Per-modality encoders of the paper (Franceschini et al., ICPR 2022), for any set of modalities.

Each modality m has an encoder E_m: (B, T, F_m) or (B, F_m) -> (B, 512), the feature the fusion probe reads,
and a projection head H_m: 512 -> 1024 -> 512 whose output feeds the loss (SimCLR/CLIP practice: the loss
sees the head's output, the probe the encoder's). The encoders (``ENCODERS``, chosen per modality with
``--encoder NAME=KIND``):
- "transformer" (the paper's for text): input projection, sinusoidal positions, pre-norm layers,
- "tcn" (the paper's for audio): residual blocks of dilated 1-D convolutions,
- "gru" (the paper's for vision): a bidirectional GRU,
each followed by masked mean-pooling over the valid time steps and a linear map to 512;
- "mlp": for vector features (B, F) (a sequence is mean-pooled over its valid steps first): ``layers``
  hidden layers of ``width`` with ReLU and dropout, then a linear map to 512.
By default (``default_encoder``) text, audio and vision get the paper's, another sequence modality the
Transformer, a vector modality the MLP.

The authors' encoders (github.com/ricfrr/mpuc-mer) are wider (a 6-layer Transformer at d_model = 300 for
text); ``width`` and ``layers`` set the size here, and the defaults are small enough to train on two CPU
cores in minutes. A sample whose modality has no valid time step (missing) gets the feature of an
all-zero pooled state, and the training loop masks it out of the loss.
"""

from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn.utils.rnn import pack_padded_sequence, pad_packed_sequence

from .names import ENCODER_KINDS

MAX_STEPS = 1024  # the Transformer's table of positions: the longest sequence it takes


def masked_mean(h: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Mean of h (B, T, C) over the steps where mask (B, T) is True; 0 for a sample with none."""
    m = mask.unsqueeze(-1).to(h.dtype)
    return (h * m).sum(dim=1) / m.sum(dim=1).clamp_min(1.0)


class TextEncoder(nn.Module):
    def __init__(self, in_dim: int, width: int, layers: int, out_dim: int, dropout: float, heads: int = 4,
                 max_len: int = MAX_STEPS):
        super().__init__()
        self.inp = nn.Linear(in_dim, width)
        pos = torch.arange(max_len, dtype=torch.float32)[:, None]
        freq = torch.exp(torch.arange(0, width, 2, dtype=torch.float32) * (-math.log(10000.0) / width))
        pe = torch.zeros(max_len, width)
        pe[:, 0::2] = torch.sin(pos * freq)
        pe[:, 1::2] = torch.cos(pos * freq)[:, : width // 2]
        self.register_buffer("pe", pe, persistent=False)
        layer = nn.TransformerEncoderLayer(width, heads, 2 * width, dropout, batch_first=True, norm_first=True)
        self.body = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.shape[1] > self.pe.shape[0]:
            raise ValueError(f"sequences of at most {self.pe.shape[0]} steps expected, got {x.shape[1]}")
        h = self.inp(x) + self.pe[: x.shape[1]]
        # a sample with no valid step would attend to nothing (NaN): let it attend to its (zero) padding
        keys = mask | ~mask.any(dim=1, keepdim=True)
        h = self.body(h, src_key_padding_mask=~keys)
        return self.out(masked_mean(h, mask))


class TCNEncoder(nn.Module):
    """Residual blocks x + relu(conv_d(x)), kernel 3, dilation 1, 2, 4, ...: a receptive field of
    2^(layers+1) - 1 steps. Padding steps are zeroed before every convolution."""

    def __init__(self, in_dim: int, width: int, layers: int, out_dim: int, dropout: float):
        super().__init__()
        self.inp = nn.Conv1d(in_dim, width, 1)
        self.convs = nn.ModuleList(nn.Conv1d(width, width, 3, padding=2**i, dilation=2**i) for i in range(layers))
        self.drop = nn.Dropout(dropout)
        self.out = nn.Linear(width, out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        m = mask.unsqueeze(1).to(x.dtype)  # (B, 1, T)
        h = self.inp(x.transpose(1, 2)) * m
        for conv in self.convs:
            h = (h + self.drop(torch.relu(conv(h)))) * m
        return self.out(masked_mean(h.transpose(1, 2), mask))


class GRUEncoder(nn.Module):
    """A bidirectional GRU over the valid steps only: they are moved to the front (in time order) and
    packed, so neither direction reads padding."""

    def __init__(self, in_dim: int, width: int, layers: int, out_dim: int, dropout: float):
        super().__init__()
        self.rnn = nn.GRU(in_dim, width // 2, num_layers=layers, batch_first=True, bidirectional=True,
                          dropout=dropout if layers > 1 else 0.0)
        self.out = nn.Linear(2 * (width // 2), out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        steps = x.shape[1]
        lengths = mask.sum(dim=1)
        order = torch.argsort((~mask).to(torch.int8), dim=1, stable=True)  # valid steps first, in order
        x = torch.gather(x, 1, order.unsqueeze(-1).expand_as(x))
        packed = pack_padded_sequence(x, lengths.clamp_min(1).cpu(), batch_first=True, enforce_sorted=False)
        h, _ = pad_packed_sequence(self.rnn(packed)[0], batch_first=True, total_length=steps)
        valid = torch.arange(steps, device=x.device) < lengths.unsqueeze(1)
        return self.out(masked_mean(h, valid))


class MLPEncoder(nn.Module):
    """Vector features (B, F) through ``layers`` hidden layers; a sequence (B, T, F) is mean-pooled over its
    valid steps first. A missing vector (mask False) is all zeros after standardization, like a missing
    sequence's pooled state."""

    def __init__(self, in_dim: int, width: int, layers: int, out_dim: int, dropout: float):
        super().__init__()
        dims = [in_dim] + [width] * layers
        self.body = nn.Sequential(*(nn.Sequential(nn.Linear(a, b), nn.ReLU(), nn.Dropout(dropout))
                                    for a, b in zip(dims, dims[1:])))
        self.out = nn.Linear(dims[-1], out_dim)

    def forward(self, x: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        if x.ndim == 3:
            x = masked_mean(x, mask)
        return self.out(self.body(x))


ENCODERS = dict(zip(ENCODER_KINDS, (TextEncoder, TCNEncoder, GRUEncoder, MLPEncoder)))
SEQUENCE_ONLY = ("transformer", "tcn", "gru")
PAPER = {"text": "transformer", "audio": "tcn", "vision": "gru"}  # the paper's encoder per MER modality


def default_encoder(name: str, sequence: bool) -> str:
    """The paper's encoder for text, audio and vision; a Transformer for another sequence; an MLP for vectors."""
    if not sequence:
        return "mlp"
    return PAPER.get(name, "transformer")


class MultimodalEncoder(nn.Module):
    """Encoders and projection heads for every modality.

    ``kinds`` maps each modality, in the data's order, to its encoder (a key of ``ENCODERS``).
    ``features(batch)`` -> {modality: (B, feat_dim)} (the probe's input); ``forward(batch)`` -> the heads'
    outputs {modality: (B, feat_dim)}. A batch is the dict of ``fastpair.training.data.to_tensors``:
    ``batch[m]`` (B, T, F_m) and ``batch[m + "_mask"]`` (B, T) bool, or (B, F_m) and (B,) for a vector.
    """

    def __init__(self, dims: dict[str, int], kinds: dict[str, str], width: int = 128, layers: int = 2,
                 feat_dim: int = 512, proj_dim: int = 1024, dropout: float = 0.1):
        super().__init__()
        if set(kinds) != set(dims):
            raise ValueError(f"an encoder for each of {sorted(dims)} expected, got {sorted(kinds)}")
        self.modalities = tuple(kinds)
        self.encoders = nn.ModuleDict(
            {m: ENCODERS[kinds[m]](dims[m], width, layers, feat_dim, dropout) for m in self.modalities})
        self.heads = nn.ModuleDict({m: nn.Sequential(nn.Linear(feat_dim, proj_dim), nn.ReLU(),
                                                     nn.Linear(proj_dim, feat_dim)) for m in self.modalities})
        self.drop = nn.Dropout(dropout)

    def features(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.encoders[m](batch[m], batch[m + "_mask"]) for m in self.modalities}

    def forward(self, batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
        return {m: self.heads[m](self.drop(f)) for m, f in self.features(batch).items()}


def input_features(state: dict[str, torch.Tensor], prefix: str = "encoder.encoders.") -> dict[str, int]:
    """{modality: F_m} that the encoders of a state dict (keys ``prefix + modality + ...``, an objective's by
    default) were built for, in their order: each encoder's first weight matrix (the Transformer's and the
    TCN's input projection, the GRU's first input weights, the MLP's first layer) takes F_m on its axis 1."""
    found: dict[str, int] = {}
    for key, value in state.items():
        if key.startswith(prefix) and value.ndim >= 2:
            found.setdefault(key[len(prefix):].split(".")[0], int(value.shape[1]))
    return found


def present(batch: dict[str, torch.Tensor], modalities) -> torch.Tensor:
    """(M, B) bool: which samples have each modality (a valid step of a sequence; a present vector): the
    loss's mask."""
    masks = [batch[m + "_mask"] for m in modalities]
    return torch.stack([mask.any(dim=1) if mask.ndim == 2 else mask for mask in masks])
