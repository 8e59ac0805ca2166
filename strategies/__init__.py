"""Aggregation strategies, one per file, built by name; wrappers compose around any of them."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from flwr.serverapp.strategy import Strategy

from strategies.bulyan import build_bulyan
from strategies.fedadam import build_fedadam
from strategies.fedavg import build_fedavg
from strategies.fedmedian import build_fedmedian
from strategies.fedprox import build_fedprox
from strategies.fedtrimmedavg import build_fedtrimmedavg
from strategies.fedyogi import build_fedyogi
from strategies.multikrum import build_multikrum
from strategies.utils import Sampling

__all__ = [
    "ROBUST_STRATEGIES",
    "STRATEGY_BUILDERS",
    "STRATEGY_PARAMS",
    "Sampling",
    "build_bulyan",
    "build_fedadam",
    "build_fedavg",
    "build_fedmedian",
    "build_fedprox",
    "build_fedtrimmedavg",
    "build_fedyogi",
    "build_multikrum",
    "build_strategy",
]

STRATEGY_BUILDERS: dict[str, Callable[..., Strategy]] = {
    "fedavg": build_fedavg,
    "fedprox": build_fedprox,
    "fedadam": build_fedadam,
    "fedyogi": build_fedyogi,
    "fedmedian": build_fedmedian,
    "fedtrimmedavg": build_fedtrimmedavg,
    "multikrum": build_multikrum,
    "bulyan": build_bulyan,
}

# The strategy-specific keyword arguments each builder takes (``strategy.*`` keys).
_SERVER_OPT = ("server_lr", "beta_1", "beta_2", "tau")
STRATEGY_PARAMS: dict[str, tuple[str, ...]] = {
    "fedavg": (),
    "fedprox": ("proximal_mu",),
    "fedadam": _SERVER_OPT,
    "fedyogi": _SERVER_OPT,
    "fedmedian": (),
    "fedtrimmedavg": ("trim_beta",),
    "multikrum": ("num_malicious_nodes", "num_nodes_to_select"),
    "bulyan": ("num_malicious_nodes",),
}

# Not a weighted mean of the updates: their sensitivity to one client is not C / n.
ROBUST_STRATEGIES = ("fedmedian", "fedtrimmedavg", "multikrum", "bulyan")


def build_strategy(name: str, sampling: Sampling, params: Mapping[str, Any]) -> Strategy:
    """Build strategy ``name`` with the keys of ``params`` that it takes (others ignored)."""
    if name not in STRATEGY_BUILDERS:
        raise ValueError(f"strategy={name!r}: choose one of {sorted(STRATEGY_BUILDERS)}")
    return STRATEGY_BUILDERS[name](sampling, **{k: params[k] for k in STRATEGY_PARAMS[name]})
