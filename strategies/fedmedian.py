"""FedMedian (Yin et al. 2018): the coordinate-wise median of the clients' models.

Robust while fewer than half of the aggregated updates are Byzantine. It
ignores ``num-examples`` (each reply counts once).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedMedian

from strategies.utils import Sampling, flower_sampling

__all__ = ["build_fedmedian"]


def build_fedmedian(sampling: Sampling) -> FedMedian:
    """Coordinate-wise median over the replies of a round."""
    return FedMedian(**flower_sampling(sampling))
