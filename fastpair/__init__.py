"""fastpair: the modality-pairwise contrastive loss (Franceschini et al., ICPR 2022), exact and memory-lean.

The public names are imported on first use (PEP 562), so that ``import fastpair.training.cli`` (the command
lines' ``--help``) or ``fastpair.__version__`` does not pay for importing torch.
"""

from __future__ import annotations

import importlib
import os
from typing import TYPE_CHECKING

from ._version import __version__

# A source checkout keeps the subpackages kernels/ and training/ beside this folder; pyproject.toml installs
# them as fastpair.kernels and fastpair.training. Where the checkout itself is imported (Python started in
# its root, which puts this folder first on sys.path), the package looks for them there too.
_CHECKOUT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
if not os.path.isdir(os.path.join(os.path.dirname(os.path.abspath(__file__)), "kernels")) and os.path.isfile(
        os.path.join(_CHECKOUT, "kernels", "__init__.py")):
    __path__.append(_CHECKOUT)

if TYPE_CHECKING:
    from .call import modality_pairs
    from .gradcache import GradCache
    from .loss import gram_nce, pairwise_nce, pairwise_sigmoid
    from .module import GramNCE, PairwiseNCE, PairwiseSigmoid

_HOMES = {"pairwise_nce": "loss", "pairwise_sigmoid": "loss", "gram_nce": "loss", "PairwiseNCE": "module",
          "PairwiseSigmoid": "module", "GramNCE": "module", "GradCache": "gradcache", "modality_pairs": "call"}

__all__ = ["pairwise_nce", "pairwise_sigmoid", "gram_nce", "PairwiseNCE", "PairwiseSigmoid", "GramNCE", "GradCache",
           "modality_pairs", "__version__"]


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value  # once imported, an ordinary attribute
        return value
    raise AttributeError(f"module 'fastpair' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
