"""FedAvg (McMahan et al. 2017), Flower's message-based implementation."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

from strategies.utils import Sampling, flower_sampling

__all__ = ["build_fedavg"]


def build_fedavg(sampling: Sampling) -> FedAvg:
    """FedAvg weighted by each client's ``num-examples``."""
    return FedAvg(**flower_sampling(sampling))
