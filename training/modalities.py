"""A run's modalities: the encoder of each, the loss's pairs and GRAM's anchor, from --encoder, --pairs,
--anchor and the data.

The modalities are the data's (``MERData.modalities``, in its order); ``--encoder NAME=KIND`` overrides
``models.default_encoder`` for NAME; ``--pairs`` picks the loss's pairs by name ("all": every pair, in
fastpair's order). Every name must be one of the data's, which is only known once it is loaded: the
errors here are TrainErrors found on every rank alike.
"""

from __future__ import annotations

from dataclasses import dataclass

from .config import Config, TrainError, encoder_spec, pair_spec
from .models import MAX_STEPS, SEQUENCE_ONLY, default_encoder


@dataclass(frozen=True)
class Modalities:
    names: tuple[str, ...]  # the data's, in order
    kinds: dict[str, str]  # name -> encoder (a key of models.ENCODERS)
    pairs: list[tuple[int, int]] | None  # indices into names; None: every pair
    anchor: int = 0  # --objective gram's anchor, an index into names

    def pair_names(self) -> list[str]:
        """"A-B" per pair of the loss, in its order."""
        from fastpair import modality_pairs

        pairs = self.pairs if self.pairs is not None else modality_pairs(len(self.names))
        return [f"{self.names[p]}-{self.names[q]}" for p, q in pairs]


def of(cfg: Config, data) -> Modalities:
    names = tuple(data.modalities)
    if cfg.anchor:
        _known(cfg.anchor, names, "--anchor")
    anchor = names.index(cfg.anchor) if cfg.anchor else 0
    return Modalities(names, _encoders(cfg, data, names), _pairs(cfg.pairs, names), anchor)


def _known(name: str, names: tuple[str, ...], option: str) -> None:
    if name not in names:
        raise TrainError(f"{option}: the data has no modality {name!r} (it has {', '.join(names)})")


def _encoders(cfg: Config, data, names: tuple[str, ...]) -> dict[str, str]:
    chosen = encoder_spec(cfg.encoder)
    for name, kind in chosen.items():
        _known(name, names, "--encoder")
        if kind in SEQUENCE_ONLY and not data.is_sequence(name):
            raise TrainError(f"--encoder {name}={kind}: {name} holds (N, F) vectors; {kind} needs (N, T, F) "
                             "sequences (use mlp)")
    kinds = {m: chosen.get(m, default_encoder(m, data.is_sequence(m))) for m in names}
    for m in names:
        steps = max(sp.x[m].shape[1] for sp in data.splits.values()) if data.is_sequence(m) else 0
        if kinds[m] == "transformer" and steps > MAX_STEPS:
            raise TrainError(f"{m} has {steps} time steps; the transformer encoder takes at most "
                             f"{MAX_STEPS} (choose --encoder {m}=tcn, gru or mlp)")
    return kinds


def _pairs(text: str, names: tuple[str, ...]) -> list[tuple[int, int]] | None:
    spec = pair_spec(text)
    if spec == "all":
        return None
    if isinstance(spec, str):  # anchor:NAME
        _known(spec, names, "--pairs")
        a = names.index(spec)
        return [(a, j) for j in range(len(names)) if j != a]
    pairs, seen = [], set()
    for p, q in spec:
        _known(p, names, "--pairs")
        _known(q, names, "--pairs")
        if p == q or frozenset((p, q)) in seen:
            raise TrainError(f"--pairs: {p}-{q} " + ("pairs a modality with itself" if p == q else "is given twice"))
        seen.add(frozenset((p, q)))
        pairs.append((names.index(p), names.index(q)))
    return pairs
