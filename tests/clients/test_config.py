"""Config dataclasses: bad values fail with the key and value named."""

import pytest

from clients.config import (
    ClientTask,
    ConfigError,
    PrivacyConfig,
    TrainConfig,
    build,
    flatten,
    from_flat,
)


@pytest.mark.parametrize(
    "data,key",
    [
        ({"privacy": {"target_epsilon": -1.0}}, "privacy.target_epsilon=-1.0"),
        ({"privacy": {"delta": 1.0}}, "privacy.delta=1.0"),
        ({"privacy": {"delta": 0}}, "privacy.delta=0"),
        ({"privacy": {"accountant": "moments"}}, "privacy.accountant='moments'"),
        ({"model": {"name": "resnet"}}, "model.name='resnet'"),
        ({"dataset": {"name": "imagenet"}}, "dataset.name='imagenet'"),
        ({"dataset": {"test_fraction": 1.5}}, "dataset.test_fraction=1.5"),
        ({"train": {"rounds": 0}}, "train.rounds=0"),
        ({"train": {"lr": "fast"}}, "train.lr='fast'"),
        ({"train": {"batch_size": 2.5}}, "train.batch_size=2.5"),
        ({"train": {"epochs": 3}}, "train.epochs=3"),
        ({"model": {"channels": 10, "groups": 4}}, "model.groups=4"),
    ],
)
def test_bad_values_name_key_and_value(data, key):
    with pytest.raises(ConfigError) as info:
        build(ClientTask, data)
    if key is not None:
        assert key in str(info.value)


def test_defaults_are_valid_and_frozen():
    task = build(ClientTask, {})
    with pytest.raises(AttributeError):
        task.train.rounds = 3  # type: ignore[misc]


def test_int_is_accepted_where_float_is_declared():
    cfg = build(PrivacyConfig, {"target_epsilon": 3})
    assert isinstance(cfg.target_epsilon, float) and cfg.target_epsilon == 3.0


def test_flatten_roundtrip():
    task = ClientTask(train=TrainConfig(rounds=7, lr=0.25), privacy=PrivacyConfig(delta=1e-6))
    flat = flatten(task)
    assert flat["train.rounds"] == 7 and flat["privacy.delta"] == 1e-6
    # Extra keys (the round's own values) are ignored when rebuilding.
    assert from_flat(ClientTask, {**flat, "server-round": 3, "lr": 0.1}) == task
