"""fastpair: the modality-pairwise contrastive loss (Franceschini et al., ICPR 2022), exact and memory-lean."""

from ._version import __version__
from .call import modality_pairs
from .loss import pairwise_nce, pairwise_sigmoid
from .module import PairwiseNCE, PairwiseSigmoid

__all__ = ["pairwise_nce", "pairwise_sigmoid", "PairwiseNCE", "PairwiseSigmoid", "modality_pairs", "__version__"]
