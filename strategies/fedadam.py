"""FedAdam (Reddi et al. 2021, "Adaptive Federated Optimization"), Flower's implementation.

The server treats the mean client update Δ as a pseudo-gradient and takes an
Adam step: m ← β₁m + (1−β₁)Δ, v ← β₂v + (1−β₂)Δ², w ← w + η̂·m/(√v + τ), where
Flower's η̂ = η·√(1−β₂^(r+1)) / (1−β₁^(r+1)) adds a bias correction (round r).
It only post-processes the aggregate of released updates: no privacy cost.
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedAdam

from strategies.utils import Sampling, flower_sampling

__all__ = ["build_fedadam", "check_server_optimizer"]


def check_server_optimizer(*, server_lr: float, beta_1: float, beta_2: float,
                           tau: float) -> None:
    """Raise ``ValueError`` naming the first server-optimizer setting out of range."""
    if not server_lr > 0:
        raise ValueError(f"server_lr={server_lr}: must be > 0")
    for name, value in (("beta_1", beta_1), ("beta_2", beta_2)):
        if not 0 <= value < 1:
            raise ValueError(f"{name}={value}: must be in [0, 1)")
    if not tau > 0:
        raise ValueError(f"tau={tau}: must be > 0 (it keeps m / (sqrt(v) + tau) finite)")


def build_fedadam(sampling: Sampling, *, server_lr: float, beta_1: float, beta_2: float,
                  tau: float) -> FedAdam:
    """FedAdam with server learning rate ``server_lr`` (η), ``beta_1``, ``beta_2``, ``tau``."""
    check_server_optimizer(server_lr=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau)
    return FedAdam(**flower_sampling(sampling), eta=server_lr, beta_1=beta_1, beta_2=beta_2,
                   tau=tau)
