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


@pytest.mark.parametrize("name,levels", [
    ("sample", ("sample",)), ("client", ("client",)), ("local", ("local",)),
    ("sample_client", ("sample", "client")), ("sample_local", ("sample", "local")),
    ("client_local", ("client", "local")),
])
def test_each_privacy_level_combination_composes(name, levels):
    cfg, _ = compose_config([f"privacy={name}"])
    assert cfg.privacy.levels == levels


@pytest.mark.parametrize("strategy", ["fedmedian", "fedadam"])
def test_client_level_dp_with_an_aggregate_other_than_the_mean_is_refused(strategy):
    with pytest.raises(ConfigError) as info:
        compose_config(["privacy=sample_client", f"strategy={strategy}"])
    assert "privacy.levels=['sample', 'client']" in str(info.value)
    assert f"client-level DP with strategy={strategy} is unsound" in str(info.value)


def test_robust_aggregation_with_local_dp_is_accepted():
    # Local noise is added before the server sees anything: any aggregate is post-processing.
    cfg, _ = compose_config(["privacy=sample_local", "strategy=fedmedian"])
    assert cfg.privacy.levels == ("sample", "local")
