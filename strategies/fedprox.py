"""FedProx (Li et al. 2020): FedAvg on the server, a proximal term in the client loss.

Flower's ``FedProx`` sends ``proximal-mu`` in each round's config; the client
(``clients.train``) adds μ(w − w_global) to its privatised gradient.
"""

from __future__ import annotations

import math

from flwr.serverapp.strategy import FedProx

from strategies.utils import Sampling, flower_sampling

__all__ = ["build_fedprox"]


def build_fedprox(sampling: Sampling, *, proximal_mu: float) -> FedProx:
    """FedProx with proximal weight ``proximal_mu`` (> 0; 0 would be FedAvg)."""
    if not (math.isfinite(proximal_mu) and proximal_mu > 0):
        raise ValueError(f"proximal_mu={proximal_mu}: must be a finite number > 0 "
                         "(0 is FedAvg: use strategy=fedavg)")
    return FedProx(**flower_sampling(sampling), proximal_mu=proximal_mu)
