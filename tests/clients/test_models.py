"""Model registry: shapes, Opacus compatibility, clear refusal of unsafe models."""

import pytest
import torch
from torch import nn

from clients.config import ConfigError, ModelConfig
from clients.models import MODELS, build_model, check_dp_compatible


@pytest.mark.parametrize("name", sorted(MODELS))
@pytest.mark.parametrize("shape", [(1, 8, 8), (1, 28, 28)])
def test_every_model_is_dp_compatible_and_shapes_right(name, shape):
    model = build_model(ModelConfig(name=name), shape, num_classes=10)
    check_dp_compatible(model, name)  # raises if Opacus cannot train it
    out = model(torch.zeros(5, *shape))
    assert out.shape == (5, 10)


@pytest.mark.parametrize("name", sorted(MODELS))
def test_every_model_trains_under_opacus_hooks(name):
    from opacus import GradSampleModule

    model = GradSampleModule(build_model(ModelConfig(name=name), (1, 8, 8), 10))
    loss = nn.functional.cross_entropy(model(torch.randn(4, 1, 8, 8)), torch.arange(4))
    loss.backward()
    for p in model.parameters():
        assert p.grad_sample is not None and p.grad_sample.shape[0] == 4


def test_initial_weights_are_seeded():
    a = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=1).state_dict()
    b = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=1).state_dict()
    c = build_model(ModelConfig(name="cnn"), (1, 8, 8), 10, seed=2).state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], c[k]) for k in a)


def test_batchnorm_model_is_refused_with_a_clear_error():
    bad = nn.Sequential(nn.Conv2d(1, 4, 3), nn.BatchNorm2d(4), nn.Flatten())
    with pytest.raises(ConfigError, match="model.name='bn'.*not compatible with Opacus"):
        check_dp_compatible(bad, "bn")
