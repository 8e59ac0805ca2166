"""FedAvg (McMahan et al. 2017), Flower's message-based implementation."""

from __future__ import annotations

from flwr.serverapp.strategy import FedAvg

__all__ = ["build_fedavg"]


def build_fedavg(
    *, fraction_train: float, fraction_evaluate: float, min_train_clients: int,
    min_evaluate_clients: int, num_clients: int,
) -> FedAvg:
    """FedAvg weighted by each client's ``num-examples``."""
    if not 0 < fraction_train <= 1:
        raise ValueError(f"fraction_train={fraction_train}: must be in (0, 1]")
    if min_train_clients > num_clients:
        raise ValueError(
            f"min_train_clients={min_train_clients}: more than the {num_clients} clients"
        )
    return FedAvg(
        fraction_train=fraction_train,
        fraction_evaluate=fraction_evaluate,
        min_train_nodes=min_train_clients,
        min_evaluate_nodes=min_evaluate_clients if fraction_evaluate > 0 else 0,
        min_available_nodes=num_clients,
    )
