"""Aggregation strategies, one per file, built by name."""

from strategies.fedavg import build_fedavg

__all__ = ["build_fedavg", "STRATEGY_BUILDERS"]

STRATEGY_BUILDERS = {"fedavg": build_fedavg}
