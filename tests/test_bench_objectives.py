"""bench/objectives.py's summary: means and spreads over seeds per subset and encoder, and its verdict."""

from __future__ import annotations

import math

from bench.objectives import markdown, summarize, verdict


def _rows(accuracies: dict[str, tuple[float, float]]) -> list[dict]:
    """Probe rows of one seed: encoder -> (accuracy on modality a, accuracy on a and b)."""
    return [dict(encoder=e, modalities=mods, metrics={"accuracy": acc})
            for e, pair in accuracies.items() for mods, acc in ((["a"], pair[0]), (["a", "b"], pair[1]))]


def test_summary_means_spreads_and_verdict():
    runs = {0: _rows({"pairwise_nce": (0.5, 0.8), "gram_nce": (0.6, 0.7)}),
            1: _rows({"pairwise_nce": (0.7, 0.9), "gram_nce": (0.6, 0.9)})}
    rows = summarize(runs)
    nce_a = next(r for r in rows if r["encoder"] == "pairwise_nce" and r["modalities"] == ["a"])
    assert math.isclose(nce_a["mean"], 0.6) and math.isclose(nce_a["std"], math.sqrt(0.02)) and nce_a["seeds"] == 2
    lines = verdict(rows)
    # on "a" the two tie: a tie counts for both
    assert lines[0] == "- pairwise_nce: mean over the 2 subsets 72.5%; all modalities 85.0 ± 7.1%; best in 2 of 2"
    assert lines[1] == "- gram_nce: mean over the 2 subsets 70.0%; all modalities 80.0 ± 14.1%; best in 1 of 2"
    meta = dict(device="cpu", date="2026-12-02", cpu="x", torch="t", fastpair="f", commit="c", seeds=[0, 1])
    table = markdown(meta, {"toy": rows})
    assert "| a | 60.0 ± 14.1 | - | 60.0 ± 0.0 | - | - |" in table.replace("**", "")
