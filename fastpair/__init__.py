"""fastpair: the modality-pairwise contrastive loss (Franceschini et al., ICPR 2022), exact and memory-lean."""

from ._version import __version__
from .call import modality_pairs
from .loss import pairwise_nce
from .module import PairwiseNCE

__all__ = ["pairwise_nce", "PairwiseNCE", "modality_pairs", "__version__"]
