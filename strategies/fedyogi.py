"""FedYogi (Reddi et al. 2021), Flower's implementation.

Like FedAdam, but the second moment moves additively (Zaheer et al. 2018):
v ← v − (1−β₂)Δ²·sign(v − Δ²), and w ← w + η·m/(√v + τ) (no bias correction).
"""

from __future__ import annotations

from flwr.serverapp.strategy import FedYogi

from strategies.fedadam import check_server_optimizer
from strategies.utils import Sampling, flower_sampling

__all__ = ["build_fedyogi"]


def build_fedyogi(sampling: Sampling, *, server_lr: float, beta_1: float, beta_2: float,
                  tau: float) -> FedYogi:
    """FedYogi with server learning rate ``server_lr`` (η), ``beta_1``, ``beta_2``, ``tau``."""
    check_server_optimizer(server_lr=server_lr, beta_1=beta_1, beta_2=beta_2, tau=tau)
    return FedYogi(**flower_sampling(sampling), eta=server_lr, beta_1=beta_1, beta_2=beta_2,
                   tau=tau)
