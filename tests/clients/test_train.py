"""One round of DP-SGD, checked against a hand-written DP-SGD step (torch.func)."""

import numpy as np
import pytest
import torch
from torch import nn

from clients.config import ClientTask, ModelConfig, PrivacyConfig, TrainConfig
from clients.data import ArrayData
from clients.models import build_model
from clients.train import dp_train_round, grad_sample_mode_for
from privacy import compress, epsilon, planned_poisson_schedule

CPU = torch.device("cpu")


def _data(n=40, seed=0):
    rng = np.random.default_rng(seed)
    x = rng.uniform(-1, 1, size=(n, 1, 8, 8)).astype(np.float32)
    return ArrayData(x, rng.integers(0, 10, size=n).astype(np.int64), 10)


def _task(batch_size, epochs=1, clip=1.0, rounds=1):
    return ClientTask(
        model=ModelConfig(name="mlp", hidden=16),
        train=TrainConfig(rounds=rounds, local_epochs=epochs, batch_size=batch_size),
        privacy=PrivacyConfig(max_grad_norm=clip),
    )


def _manual_dp_sgd_step(model, data, lr, clip):
    """Reference: per-sample grads via torch.func, clipped to `clip`, averaged, no noise."""
    from torch.func import functional_call, grad, vmap

    params = {k: v.detach().clone() for k, v in model.named_parameters()}

    def loss_fn(p, x, y):
        out = functional_call(model, p, (x.unsqueeze(0),))
        return nn.functional.cross_entropy(out, y.unsqueeze(0))

    x, y = torch.from_numpy(data.x), torch.from_numpy(data.y)
    grads = vmap(grad(loss_fn), in_dims=(None, 0, 0))(params, x, y)
    norms = torch.sqrt(sum(g.flatten(1).pow(2).sum(1) for g in grads.values()))
    factor = torch.clamp(clip / norms, max=1.0)
    return {k: params[k] - lr * (grads[k] * factor.view(-1, *[1] * (grads[k].dim() - 1))).sum(0)
            / len(y) for k in params}


def test_noiseless_full_batch_step_equals_clipped_mean_gradient():
    data, task = _data(), _task(batch_size=64, clip=0.5)  # q = 1: every record, one step
    model = build_model(task.model, (1, 8, 8), 10, seed=0)
    expected = _manual_dp_sgd_step(model, data, lr=0.3, clip=0.5)
    res = dp_train_round(model, data, task, lr=0.3, noise_multiplier=0.0, history=[], seed=0,
                         device=CPU)
    assert res.steps == 1 and res.sample_rate == 1.0
    for k, v in model.state_dict().items():
        torch.testing.assert_close(v, expected[k], atol=1e-5, rtol=1e-4)


def test_noise_has_the_calibrated_standard_deviation():
    # Same seed and data, with and without noise: the difference is pure noise of
    # std lr * sigma * C / (q * n) per coordinate (Opacus' mean reduction).
    data, task = _data(n=50), _task(batch_size=64, clip=1.0)
    sigma, lr = 2.0, 1.0
    a = build_model(task.model, (1, 8, 8), 10, seed=0)
    b = build_model(task.model, (1, 8, 8), 10, seed=0)
    dp_train_round(a, data, task, lr=lr, noise_multiplier=0.0, history=[], seed=5, device=CPU)
    dp_train_round(b, data, task, lr=lr, noise_multiplier=sigma, history=[], seed=5, device=CPU)
    diff = torch.cat([(a.state_dict()[k] - b.state_dict()[k]).flatten() for k in a.state_dict()])
    expected_std = lr * sigma * 1.0 / 50
    assert diff.numel() > 1000
    assert diff.std().item() == pytest.approx(expected_std, rel=0.1)
    assert abs(diff.mean().item()) < 4 * expected_std / diff.numel() ** 0.5


def test_history_accumulates_what_opacus_accounted():
    data, task = _data(n=120), _task(batch_size=16, epochs=2, rounds=3)
    q, per_round, _ = planned_poisson_schedule(num_samples=120, batch_size=16, local_epochs=2,
                                               rounds=3)
    model = build_model(task.model, (1, 8, 8), 10, seed=0)
    history = []
    for rnd in range(3):
        res = dp_train_round(model, data, task, lr=0.1, noise_multiplier=1.2, history=history,
                             seed=rnd, device=CPU)
        history = res.history
        assert res.steps == per_round and res.sample_rate == pytest.approx(q)
    assert compress(history) == [(1.2, pytest.approx(q), 3 * per_round)]
    eps = epsilon(history=history, delta=task.privacy.delta, accountant=task.privacy.accountant)
    # Independent accountant (dp-accounting PLD) on the same planned releases.
    import dp_accounting

    pld = dp_accounting.pld.PLDAccountant()
    pld.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(1.2)),
                3 * per_round)
    assert eps >= pld.get_epsilon(task.privacy.delta)


def test_returned_weights_have_plain_keys():
    data, task = _data(), _task(batch_size=8)
    model = build_model(task.model, (1, 8, 8), 10)
    keys_before = set(model.state_dict())
    dp_train_round(model, data, task, lr=0.1, noise_multiplier=1.0, history=[], seed=0, device=CPU)
    assert set(model.state_dict()) == keys_before
    assert not any(k.startswith("_module.") for k in model.state_dict())


@pytest.mark.parametrize("mode", ["functorch", "ghost", "ew"])
def test_other_grad_sample_modes_run(mode):
    data = _data()
    task = ClientTask(model=ModelConfig(name="mlp", hidden=16),
                      train=TrainConfig(batch_size=8),
                      privacy=PrivacyConfig(grad_sample_mode=mode))
    model = build_model(task.model, (1, 8, 8), 10)
    res = dp_train_round(model, data, task, lr=0.1, noise_multiplier=1.0, history=[], seed=0,
                         device=CPU)
    assert res.steps == 5 and np.isfinite(res.train_loss)


@pytest.mark.parametrize("cfg, expected", [
    (ModelConfig(name="mlp"), "ghost"),
    (ModelConfig(name="linear"), "ghost"),
    (ModelConfig(name="linear", norm_groups=1), "ghost"),  # GroupNorm without weights
    (ModelConfig(name="cnn"), "ew"),  # Conv2d, GroupNorm, Linear
    (ModelConfig(name="transformer"), "ew"),  # Linear, Embedding, LayerNorm
])
def test_auto_picks_ghost_clipping_for_linear_weights_and_expanded_weights_else(cfg, expected):
    model = build_model(cfg, (1, 8, 8), 10)
    assert grad_sample_mode_for(model, "auto") == expected
    assert grad_sample_mode_for(model, "auto", canaries=True) == "hooks"
    for mode in ("hooks", "ghost", "functorch", "ew"):
        assert grad_sample_mode_for(model, mode) == mode


def test_auto_picks_hooks_for_a_layer_expanded_weights_has_no_rule_for():
    # PReLU's weight: neither all-Linear (ghost) nor an ExpandedWeights layer.
    model = nn.Sequential(nn.Flatten(), nn.Linear(64, 10), nn.PReLU())
    assert grad_sample_mode_for(model, "auto") == "hooks"

    class MyConv(nn.Conv2d):  # a subclass may change forward: no ExpandedWeights
        pass

    assert grad_sample_mode_for(nn.Sequential(MyConv(1, 2, 3)), "auto") == "hooks"


@pytest.mark.parametrize("name, picked", [("mlp", "ghost"), ("cnn", "ew"),
                                           ("transformer", "ew")])
@pytest.mark.parametrize("batch_size", [1, 8])  # 1: most Poisson batches are empty
def test_auto_trains_the_weights_hooks_train(name, picked, batch_size):
    # Ghost clipping and ExpandedWeights clip every record's gradient to the same norm
    # as the hooks do, and the noise comes from the same generator in the same order:
    # the weights agree to float rounding, empty batches (noise alone) included.
    data = _data()
    cfg = ModelConfig(name=name, hidden=16)
    trained = {}
    for mode in ("hooks", "auto"):
        task = ClientTask(model=cfg, train=TrainConfig(batch_size=batch_size, local_epochs=2),
                          privacy=PrivacyConfig(grad_sample_mode=mode))
        model = build_model(task.model, (1, 8, 8), 10, seed=0)
        assert grad_sample_mode_for(model, mode) == ("hooks" if mode == "hooks" else picked)
        res = dp_train_round(model, data, task, lr=0.5, noise_multiplier=1.0, history=[],
                             seed=3, device=CPU)
        trained[mode] = (model.state_dict(), res.history)
    (hooks, h_hist), (auto, a_hist) = trained["hooks"], trained["auto"]
    assert h_hist == a_hist
    initial = build_model(cfg, (1, 8, 8), 10, seed=0).state_dict()
    for key in hooks:
        assert not torch.equal(hooks[key], initial[key])
        torch.testing.assert_close(auto[key], hooks[key], rtol=1e-4, atol=1e-4)


def test_predict_gives_the_same_probabilities_whatever_the_batch():
    # The CPU default (256) slices the data differently from one batch of all: the
    # probabilities must not depend on it. 600 images: two full slices and a short one.
    from clients.train import PREDICT_BATCH_CPU, predict

    rng = np.random.default_rng(3)
    data = ArrayData(rng.normal(size=(600, 1, 28, 28)).astype(np.float32),
                     rng.integers(0, 10, 600), 10)
    model = build_model(ModelConfig(name="cnn"), (1, 28, 28), 10, seed=1)
    with torch.no_grad():
        expected = torch.softmax(model.eval()(torch.from_numpy(data.x)), dim=1).numpy()

    got = predict(model, data, torch.device("cpu"))

    assert PREDICT_BATCH_CPU < len(data) and got.shape == (600, 10)
    np.testing.assert_allclose(got, expected, rtol=0, atol=1e-6)
    empty = ArrayData(data.x[:0], data.y[:0], 10)
    assert predict(model, empty, torch.device("cpu")).shape == (0, 10)
