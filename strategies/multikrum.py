"""Multi-Krum (Blanchard et al. 2017): average the m replies with the best Krum scores.

A reply's score is the sum of squared distances to its n − f − 2 nearest
neighbours; the ``num_nodes_to_select`` (m) lowest-scoring replies are averaged
(weighted by ``num-examples``). Krum's guarantee needs n > 2f + 2.
"""

from __future__ import annotations

from flwr.serverapp.strategy import MultiKrum

from strategies.utils import Sampling, flower_sampling

__all__ = ["build_multikrum"]


def build_multikrum(sampling: Sampling, *, num_malicious_nodes: int,
                    num_nodes_to_select: int) -> MultiKrum:
    """Multi-Krum for up to ``num_malicious_nodes`` (f) Byzantine clients.

    ``num_nodes_to_select`` (m) of 0 means n − f for the round's sample size n.
    """
    n, f = sampling.train_sample_size, num_malicious_nodes
    if f < 0:
        raise ValueError(f"num_malicious_nodes={f}: must be >= 0")
    if n <= 2 * f + 2:
        raise ValueError(f"num_malicious_nodes={f}: Krum needs more than 2f + 2 = {2 * f + 2} "
                         f"clients per round, and a round samples {n}")
    m = num_nodes_to_select or n - f
    if not 1 <= m <= n - f:
        raise ValueError(f"num_nodes_to_select={num_nodes_to_select}: must be in [1, n - f = "
                         f"{n - f}] (or 0 for n - f)")
    return MultiKrum(**flower_sampling(sampling), num_malicious_nodes=f, num_nodes_to_select=m)
