"""FedTrimmedAvg (Yin et al. 2018): coordinate-wise β-trimmed mean.

Per coordinate, the ``int(β·n)`` largest and smallest values of the n replies
are dropped and the rest averaged (unweighted). It tolerates up to ``int(β·n)``
Byzantine replies.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedTrimmedAvg

from strategies.utils import Sampling, flower_sampling

__all__ = ["build_fedtrimmedavg"]


def build_fedtrimmedavg(sampling: Sampling, *, trim_beta: float) -> FedTrimmedAvg:
    """Trimmed mean cutting ``trim_beta`` (in [0, 0.5)) of each tail."""
    if not 0 <= trim_beta < 0.5:
        raise ValueError(f"trim_beta={trim_beta}: must be in [0, 0.5)")
    return FedTrimmedAvg(**flower_sampling(sampling), beta=trim_beta)
