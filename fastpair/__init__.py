"""fastpair: the modality-pairwise contrastive loss (Franceschini et al., ICPR 2022), exact and memory-lean."""

from .loss import modality_pairs, pairwise_nce
from .module import PairwiseNCE

__version__ = "0.1.0"
__all__ = ["pairwise_nce", "PairwiseNCE", "modality_pairs", "__version__"]
