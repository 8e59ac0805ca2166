"""Bulyan (El Mhamdi et al. 2018): Multi-Krum selection, then a trimmed median.

From n replies, Multi-Krum selects θ = n − 2f; per coordinate, the β = θ − 2f
values closest to the median are averaged. It needs n ≥ 4f + 3.
"""

from __future__ import annotations

from flwr.serverapp.strategy import Bulyan

from strategies.utils import Sampling, flower_sampling

__all__ = ["build_bulyan"]


def build_bulyan(sampling: Sampling, *, num_malicious_nodes: int) -> Bulyan:
    """Bulyan for up to ``num_malicious_nodes`` (f) Byzantine clients."""
    n, f = sampling.train_sample_size, num_malicious_nodes
    if f < 0:
        raise ValueError(f"num_malicious_nodes={f}: must be >= 0")
    if n < 4 * f + 3:
        raise ValueError(f"num_malicious_nodes={f}: Bulyan needs at least 4f + 3 = {4 * f + 3} "
                         f"clients per round, and a round samples {n}")
    return Bulyan(**flower_sampling(sampling), num_malicious_nodes=f)
