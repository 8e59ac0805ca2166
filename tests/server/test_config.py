"""Run config: composed from conf/ by hydra, validated before anything starts."""

import subprocess
import sys

import pytest

from clients.config import ConfigError
from server.app import compose_config


def test_default_config_composes_and_validates():
    cfg, resolved = compose_config([])
    assert cfg.dataset.name == "digits" and cfg.privacy.delta == 1e-5
    assert "target_epsilon" in resolved


@pytest.mark.parametrize("group,name", [("model", "cnn"), ("model", "transformer"),
                                        ("dataset", "mnist5k")])
def test_config_groups_compose(group, name):
    cfg, _ = compose_config([f"{group}={name}"])
    assert getattr(cfg, group).name == name


@pytest.mark.parametrize(
    "override,needle",
    [
        ("privacy.target_epsilon=-1", "privacy.target_epsilon=-1.0"),
        ("privacy.delta=1.5", "privacy.delta=1.5"),
        ("model.name=resnet", "model.name='resnet'"),
        ("strategy.min_train_clients=9", "strategy.min_train_clients=9"),
        ("simulation.num_clients=0", "simulation.num_clients=0"),
        ("+train.epochs=3", "train.epochs=3"),
    ],
)
def test_bad_values_are_named(override, needle):
    with pytest.raises(ConfigError) as info:
        compose_config([override])
    assert needle in str(info.value)


def test_cli_exits_nonzero_naming_the_key_before_starting(tmp_path):
    out = subprocess.run(
        [sys.executable, "-m", "simulations.cli", "simulate", "privacy.delta=2",
         f"hydra.run.dir={tmp_path}/run"],
        capture_output=True, text=True, timeout=120,
    )
    assert out.returncode != 0
    assert "privacy.delta=2" in out.stderr
    # Nothing started: no round was recorded.
    assert not (tmp_path / "run" / "metrics.jsonl").exists()
