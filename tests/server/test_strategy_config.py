"""Strategy config groups compose, and a bad strategy value fails before anything starts."""

import pytest

from clients.config import ConfigError
from server.app import compose_config


@pytest.mark.parametrize("name", ["fedavg", "fedprox", "fedadam", "fedyogi", "fedmedian",
                                  "fedtrimmedavg", "multikrum", "bulyan"])
def test_each_strategy_composes_with_its_parameters(name):
    cfg, _ = compose_config([f"strategy={name}", "simulation.num_clients=10"])
    assert cfg.strategy.name == name
    assert cfg.strategy.ema == 0.8  # inherited from the fedavg base, not repeated


@pytest.mark.parametrize("overrides,needle", [
    (["strategy=bulyan"], "strategy.num_malicious_nodes=1: Bulyan needs at least 4f + 3 = 7"),
    (["strategy=multikrum", "simulation.num_clients=10", "strategy.num_malicious_nodes=4"],
     "strategy.num_malicious_nodes=4"),
    (["strategy=fedprox", "strategy.proximal_mu=-1"], "strategy.proximal_mu=-1.0"),
    (["strategy=fedtrimmedavg", "strategy.trim_beta=0.5"], "strategy.trim_beta=0.5"),
    (["strategy=fedadam", "strategy.server_lr=0"], "strategy.server_lr=0.0"),
    (["strategy.max_update_norm=0"], "strategy.max_update_norm=0.0"),
])
def test_bad_strategy_values_are_named(overrides, needle):
    with pytest.raises(ConfigError) as info:
        compose_config(overrides)
    assert needle in str(info.value)
