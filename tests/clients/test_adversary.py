"""Simulated adversaries: what each attack sends, worked out by hand."""

import numpy as np
import pytest
import torch

from clients.adversary import flip_labels, poison_update
from clients.config import AdversaryConfig, ConfigError
from clients.data import ArrayData

GLOBAL = {"w": torch.tensor([1.0, 2.0]), "steps": torch.tensor(7)}
TRAINED = {"w": torch.tensor([1.5, 1.0]), "steps": torch.tensor(7)}  # u = [0.5, -1.0]


@pytest.mark.parametrize("cfg,expected", [
    # global - 4u = [1 - 2, 2 + 4]
    (AdversaryConfig(name="sign_flip", num_clients=1, flip_scale=4.0), [-1.0, 6.0]),
    # global + 100u = [1 + 50, 2 - 100]
    (AdversaryConfig(name="scale", num_clients=1, scale=100.0), [51.0, -98.0]),
])
def test_update_attacks_by_hand(cfg, expected):
    sent = poison_update(TRAINED, GLOBAL, cfg, seed=0)
    assert sent["w"].tolist() == pytest.approx(expected)
    assert sent["steps"].item() == 7  # integer buffers pass unchanged


def test_nan_attack_sends_only_nan():
    sent = poison_update(TRAINED, GLOBAL, AdversaryConfig(name="nan", num_clients=1), seed=0)
    assert torch.isnan(sent["w"]).all()


def test_gaussian_attack_replaces_the_update_with_noise_of_the_configured_std():
    big = {"w": torch.zeros(20_000)}
    cfg = AdversaryConfig(name="gaussian", num_clients=1, noise_std=3.0)

    sent = poison_update({"w": torch.ones(20_000)}, big, cfg, seed=1)["w"].numpy()

    # The honest update (all ones) is gone: mean ~0 and std ~3 (standard errors 0.02, 0.015).
    assert abs(sent.mean()) < 0.1 and sent.std() == pytest.approx(3.0, abs=0.06)
    again = poison_update({"w": torch.ones(20_000)}, big, cfg, seed=1)["w"].numpy()
    assert np.array_equal(sent, again)  # reproducible from the seed


def test_label_flip_maps_y_to_c_minus_1_minus_y():
    data = ArrayData(np.zeros((3, 2), np.float32), np.array([0, 3, 9]), 10)
    assert flip_labels(data).y.tolist() == [9, 6, 0]


def test_the_first_num_clients_partitions_attack():
    cfg = AdversaryConfig(name="scale", num_clients=2)
    assert [cfg.attacks(p) for p in range(4)] == [True, True, False, False]
    assert not AdversaryConfig().attacks(0)


@pytest.mark.parametrize("kwargs,needle", [
    ({"name": "flood"}, "adversary.name='flood'"),
    ({"name": "none", "num_clients": 2}, "adversary.num_clients=2: no attack chosen"),
    ({"name": "scale", "num_clients": -1}, "adversary.num_clients=-1"),
    ({"name": "scale", "scale": 0.0}, "adversary.scale=0.0"),
])
def test_bad_adversary_values_are_named(kwargs, needle):
    with pytest.raises(ConfigError, match=needle):
        AdversaryConfig(**kwargs)


def test_the_config_contract_composes_including_nan():
    from server.app import compose_config

    cfg, _ = compose_config(["strategy=fedmedian", "adversary=nan", "adversary.num_clients=2",
                             "simulation.num_clients=10"])
    assert (cfg.adversary.name, cfg.adversary.num_clients) == ("nan", 2)
    assert cfg.task.adversary == cfg.adversary  # sent to the clients with the task
    with pytest.raises(ConfigError, match="adversary.num_clients=4: more adversaries"):
        compose_config(["adversary=scale", "adversary.num_clients=4"])
