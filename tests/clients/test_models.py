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


@pytest.mark.parametrize("shape", [(3, 4, 28, 28), (2, 3, 7, 9), (1, 1, 2, 5), (5, 8, 8)])
def test_maxpool2x2_gives_max_pool2d_values_to_the_bit(shape):
    from clients.models import MaxPool2x2

    g = torch.Generator().manual_seed(0)
    x = torch.randn(shape, generator=g) * 5
    x.view(-1)[:: 7] = x.view(-1)[1:: 7][: x.view(-1)[:: 7].numel()]  # ties inside windows
    x.view(-1)[3] = float("-inf")
    expected = nn.functional.max_pool2d(x, 2)
    with torch.no_grad():  # the strided-slices path
        got = MaxPool2x2()(x)
    assert got.shape == expected.shape and torch.equal(got, expected)
    # With autograd: max_pool2d itself, its gradient included.
    a, b = x.clone().requires_grad_(), x.clone().requires_grad_()
    MaxPool2x2()(a).sum().backward()
    nn.functional.max_pool2d(b, 2).sum().backward()
    assert torch.equal(a.grad, b.grad)


def test_maxpool2x2_refuses_a_map_smaller_than_its_window_as_max_pool2d_does():
    from clients.models import MaxPool2x2

    with torch.no_grad(), pytest.raises(RuntimeError, match="too small"):
        MaxPool2x2()(torch.zeros(1, 1, 1, 5))


def test_maxpool2x2_keeps_nan_as_max_pool2d_does():
    from clients.models import MaxPool2x2

    x = torch.zeros(1, 1, 4, 4)
    x[0, 0, 1, 2] = float("nan")
    with torch.no_grad():
        got = MaxPool2x2()(x)
    assert torch.equal(got.isnan(), nn.functional.max_pool2d(x, 2).isnan())
    assert got.isnan().sum() == 1


def _cnn_tanh_then_pool(model: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """The CNN as it was first written: tanh, then nn.MaxPool2d(2), with ``model``'s weights."""
    f = model.features
    h = nn.functional.max_pool2d(torch.tanh(f[1](f[0](x))), 2)
    h = nn.functional.adaptive_avg_pool2d(torch.tanh(f[5](f[4](h))), 2)
    return model.head(h.flatten(1))


@pytest.mark.parametrize("shape", [(1, 28, 28), (1, 8, 8), (3, 9, 11)])
def test_cnn_pooling_before_tanh_gives_the_tanh_then_pool_outputs(shape):
    from sklearn.datasets import load_digits

    model = build_model(ModelConfig(name="cnn"), shape, num_classes=10, seed=3)
    g = torch.Generator().manual_seed(1)
    x = torch.randn(64, *shape, generator=g) * 4
    if shape == (1, 8, 8):  # real images too: flat backgrounds tie inside windows
        digits = load_digits().images[:64].astype("float32") / 16.0
        x = torch.from_numpy(digits).unsqueeze(1)
    with torch.no_grad():
        assert torch.equal(model(x), _cnn_tanh_then_pool(model, x))
    # With autograd the outputs are the same, and so are the weights' gradients (a tie
    # of tanh values may route a vanishing gradient to another record of the window).
    y = torch.arange(64) % 10
    nn.functional.cross_entropy(model(x), y).backward()
    got = {n: p.grad.clone() for n, p in model.named_parameters()}
    model.zero_grad()
    nn.functional.cross_entropy(_cnn_tanh_then_pool(model, x), y).backward()
    for n, p in model.named_parameters():
        torch.testing.assert_close(got[n], p.grad, rtol=1e-5, atol=1e-6, msg=n)


def test_cnn_parameter_names_are_unchanged():
    model = build_model(ModelConfig(name="cnn"), (1, 28, 28), 10)
    assert [k for k in model.state_dict()] == [
        "features.0.weight", "features.0.bias", "features.1.weight", "features.1.bias",
        "features.4.weight", "features.4.bias", "features.5.weight", "features.5.bias",
        "head.weight", "head.bias"]
