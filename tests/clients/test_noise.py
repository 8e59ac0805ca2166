"""Secure DP noise: its distribution, and that Opacus' optimizer really uses it."""

import math

import pytest
import torch
from opacus import PrivacyEngine
from opacus.optimizers import AdaClipDPOptimizer, DPOptimizer, DPOptimizerFastGradientClipping
from scipy import stats
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

import clients.noise as noise_module
from clients.noise import NOISE_GENERATORS, secure_gaussian, use_noise_generator

pytestmark = [
    pytest.mark.filterwarnings("ignore:Secure RNG turned off"),
    # Opacus' hooks fire on module outputs because the inputs need no gradient: harmless.
    pytest.mark.filterwarnings("ignore:Full backward hook is firing"),
]

N_RECORDS, BATCH = 64, 16  # Poisson sampling with q = 16/64; expected batch 16 (a power of 2)


# ---------------------------------------------------------------- secure_gaussian


def test_secure_gaussian_has_mean_zero_and_the_requested_std():
    # Prepare
    n, std = 200_000, 2.0
    # Execute
    x = secure_gaussian((n,), std, dtype=torch.float64).numpy()
    # Assert: 6 standard errors; SE(mean) = std/sqrt(n), SE(sample std) ≈ std/sqrt(2n).
    assert abs(x.mean()) < 6 * std / math.sqrt(n)
    assert abs(x.std(ddof=1) - std) < 6 * std / math.sqrt(2 * n)


def test_secure_gaussian_passes_a_kolmogorov_smirnov_test_against_scipy_normal():
    # Prepare
    n, std = 200_000, 2.0
    # Execute
    x = secure_gaussian((n,), std, dtype=torch.float64).numpy()
    # Assert
    assert stats.kstest(x, stats.norm(loc=0.0, scale=std).cdf).pvalue > 1e-3


def test_secure_gaussian_is_still_normal_when_drawn_in_many_odd_sized_chunks(monkeypatch):
    # Prepare: chunks of 7 normals, so pairs straddle chunk ends and one normal is dropped.
    monkeypatch.setattr(noise_module, "_CHUNK", 7)
    # Execute
    x = secure_gaussian((5_001,), 1.0, dtype=torch.float64).numpy()
    # Assert
    assert stats.kstest(x, stats.norm().cdf).pvalue > 1e-3


def test_secure_gaussian_respects_shape_dtype_and_device():
    # Execute
    x = secure_gaussian((3, 4, 5), 1.0, device="cpu", dtype=torch.float16)
    y = secure_gaussian(torch.Size([2, 3]), 1.0)
    # Assert
    assert x.shape == (3, 4, 5) and x.dtype == torch.float16 and x.device.type == "cpu"
    assert y.shape == (2, 3) and y.dtype == torch.float32
    assert secure_gaussian((0, 3), 1.0).shape == (0, 3)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
def test_secure_gaussian_lands_on_cuda():
    x = secure_gaussian((10,), 1.0, device="cuda")
    assert x.device.type == "cuda"


def test_two_draws_differ():
    # Execute
    a, b = secure_gaussian((1000,), 1.0), secure_gaussian((1000,), 1.0)
    # Assert
    assert not torch.equal(a, b)


def test_zero_std_gives_zeros():
    # Execute
    x = secure_gaussian((4, 2), 0.0, dtype=torch.float64)
    # Assert
    assert torch.equal(x, torch.zeros(4, 2, dtype=torch.float64))


@pytest.mark.parametrize("std", [-1.0, float("nan"), float("inf")])
def test_bad_std_raises_naming_the_value(std):
    with pytest.raises(ValueError, match=repr(std)):
        secure_gaussian((3,), std)


def test_all_zero_random_bytes_give_finite_bounded_noise(monkeypatch):
    # Prepare: all-zero words are the smallest uniform, 2**-53 (never 0, so log is finite).
    monkeypatch.setattr(noise_module.os, "urandom", lambda k: bytes(k))
    std = 3.0
    # Box-Muller radius for u = 2**-53, worked by hand: sqrt(-2 ln 2**-53) = sqrt(106 ln 2).
    largest = 4 * math.sqrt(106 * math.log(2)) / 2 * std
    # Execute
    x = secure_gaussian((100,), std, dtype=torch.float64)
    # Assert
    assert torch.isfinite(x).all()
    assert x.abs().max().item() <= largest * (1 + 1e-12)


def test_all_one_random_bytes_are_the_uniform_one_and_give_zero(monkeypatch):
    # Prepare: all-ones words are the uniform 1, so the radius sqrt(-2 ln 1) is 0.
    monkeypatch.setattr(noise_module.os, "urandom", lambda k: b"\xff" * k)
    # Execute
    x = secure_gaussian((10,), 5.0, dtype=torch.float64)
    # Assert
    assert torch.equal(x, torch.zeros(10, dtype=torch.float64))


# ---------------------------------------------------------------- use_noise_generator


def _private(grad_sample_mode="hooks", sigma=1.5, clip=0.5, seed=0):
    """A tiny linear model made private by Opacus, with Poisson sampling."""
    torch.manual_seed(seed)
    model = nn.Linear(64, 32)
    data = TensorDataset(torch.randn(N_RECORDS, 64), torch.randint(0, 32, (N_RECORDS,)))
    loader = DataLoader(data, batch_size=BATCH)
    criterion = nn.CrossEntropyLoss()
    engine = PrivacyEngine()
    private = engine.make_private(
        module=model, optimizer=torch.optim.SGD(model.parameters(), lr=0.1),
        criterion=criterion, data_loader=loader, noise_multiplier=sigma,
        max_grad_norm=clip, poisson_sampling=True, grad_sample_mode=grad_sample_mode,
    )
    if grad_sample_mode == "ghost":
        dp_model, opt, dp_criterion, dp_loader = private
    else:
        (dp_model, opt, dp_loader), dp_criterion = private, criterion
    return engine, dp_model, opt, dp_criterion, dp_loader


def _train(dp_model, opt, criterion, loader, epochs=1):
    """Runs DP-SGD; returns the noise Opacus added at each step, and the step count.

    The clipped sum is copied as soon as the optimizer has formed it (Opacus'
    ``clip_and_accumulate``, or ghost clipping's ``accumulate``), before any
    noise. After ``step`` ``p.grad = (summed_grad + noise) / expected_batch_size``
    (loss_reduction="mean"); the expected batch size is 16, a power of 2, so
    undoing the division is exact.
    """
    sums = []

    def spying(method):
        def spy():
            method()
            sums[:] = [p.summed_grad.clone() for p in opt.params]
        return spy

    for name in ("clip_and_accumulate", "accumulate"):
        if hasattr(opt, name):
            setattr(opt, name, spying(getattr(opt, name)))
    noises, steps = [], 0
    for _ in range(epochs):
        for x, y in loader:
            opt.zero_grad()
            criterion(dp_model(x), y).backward()
            opt.step()
            pairs = zip(opt.params, sums, strict=True)
            noises += [(p.grad * BATCH - s).flatten() for p, s in pairs]
            steps += 1
    return torch.cat(noises).double(), steps


@pytest.mark.parametrize(
    ("mode", "base"), [("hooks", DPOptimizer), ("ghost", DPOptimizerFastGradientClipping)]
)
def test_secure_noise_in_opacus_has_std_sigma_times_clip_and_is_accounted(
    mode, base, monkeypatch
):
    # Prepare
    sigma, clip = 1.5, 0.5
    engine, dp_model, opt, criterion, loader = _private(mode, sigma, clip)
    assert type(opt) is base  # the optimizer Opacus 1.6 builds for this mode
    calls = []

    def spy(shape, std, **kwargs):
        calls.append(std)
        return secure_gaussian(shape, std, **kwargs)

    monkeypatch.setattr(noise_module, "secure_gaussian", spy)
    # Execute
    described = use_noise_generator(opt, "secure")
    noise, steps = _train(dp_model, opt, criterion, loader, epochs=3)
    # Assert: the noise added is N(0, (sigma * clip)^2), to 6 standard errors.
    n, expected_std = noise.numel(), sigma * clip
    assert abs(noise.mean().item()) < 6 * expected_std / math.sqrt(n)
    assert abs(noise.std().item() - expected_std) < 6 * expected_std / math.sqrt(2 * n)
    assert stats.kstest(noise.numpy(), stats.norm(scale=expected_std).cdf).pvalue > 1e-3
    assert calls == [sigma * clip] * (steps * len(opt.params))  # one draw per tensor and step
    assert "urandom" in described
    assert isinstance(opt, base) and opt.noise_multiplier == sigma
    assert engine.accountant.history == [(sigma, BATCH / N_RECORDS, steps)]


def test_torch_noise_is_reproducible_under_a_seed_and_secure_noise_is_not():
    # Prepare
    def final_weights(generator):
        _, dp_model, opt, criterion, loader = _private(seed=7)
        use_noise_generator(opt, generator)
        _train(dp_model, opt, criterion, loader)
        return torch.cat([p.detach().flatten() for p in dp_model.parameters()])

    # Execute
    torch_a, torch_b = final_weights("torch"), final_weights("torch")
    secure_a, secure_b = final_weights("secure"), final_weights("secure")
    # Assert: same seed, same batches; only the noise source differs.
    assert torch.equal(torch_a, torch_b)
    assert not torch.equal(secure_a, secure_b)


def test_torch_noise_is_added_in_place_and_says_it_is_not_secure():
    # Prepare
    _, _, opt, _, _ = _private()
    # Execute
    described = use_noise_generator(opt, "torch")
    # Assert
    assert type(opt).__bases__ == (noise_module._InPlaceNoise, DPOptimizer)
    assert "Mersenne Twister" in described and "not cryptographically secure" in described


@pytest.mark.parametrize("piece", [1 << 16, 32])
@pytest.mark.parametrize("mode", ["hooks", "ghost"])
def test_in_place_torch_noise_trains_opacus_own_weights(mode, piece, monkeypatch):
    # Prepare: pieces of 32 split each 2,048-value weight into 64 draws.
    monkeypatch.setattr(noise_module, "_NOISE_PIECE", piece)

    def final_weights(choose):
        _, dp_model, opt, criterion, loader = _private(mode, seed=11)
        if choose:
            use_noise_generator(opt, "torch")
        _train(dp_model, opt, criterion, loader, epochs=2)
        return torch.cat([p.detach().flatten() for p in dp_model.parameters()])

    # Execute
    opacus_own, in_place = final_weights(False), final_weights(True)
    # Assert: on the CPU the pieces are, value for value, Opacus' one draw per tensor.
    assert torch.equal(opacus_own, in_place)


@pytest.mark.parametrize("n", [1, 15, 32, 33, 47, 48, 100, 1000])
def test_noise_is_drawn_in_bounded_pieces_none_shorter_than_16(n, monkeypatch):
    # Prepare
    monkeypatch.setattr(noise_module, "_NOISE_PIECE", 32)
    grad, drawn = torch.zeros(n, dtype=torch.float64), []

    def draw(piece):
        drawn.append(piece.numel())
        piece.fill_(len(drawn))

    # Execute
    noise_module._add_in_pieces_(grad, draw)
    # Assert: every value got exactly one piece's noise, in order.
    assert sum(drawn) == n and max(drawn) <= 32 + 15
    assert n < 16 or min(drawn) >= 16
    assert torch.equal(grad, torch.repeat_interleave(
        torch.arange(1, len(drawn) + 1, dtype=torch.float64), torch.tensor(drawn)))


def test_choosing_again_replaces_the_previous_choice_without_nesting():
    # Prepare
    _, _, opt, _, _ = _private()
    # Execute
    use_noise_generator(opt, "secure")
    use_noise_generator(opt, "secure")
    secure_class = type(opt)
    use_noise_generator(opt, "torch")
    # Assert
    assert secure_class.__bases__ == (noise_module._SecureNoise, DPOptimizer)
    assert secure_class.__mro__.count(DPOptimizer) == 1
    assert type(opt).__bases__ == (noise_module._InPlaceNoise, DPOptimizer)
    assert type(opt).__mro__.count(DPOptimizer) == 1


def test_only_this_optimizer_instance_changes():
    # Prepare
    _, _, first, _, _ = _private()
    _, _, second, _, _ = _private()
    # Execute
    use_noise_generator(first, "secure")
    # Assert
    assert type(second) is DPOptimizer
    assert DPOptimizer.add_noise is not type(first).add_noise


def test_unknown_generator_name_raises_listing_the_choices():
    _, _, opt, _, _ = _private()
    with pytest.raises(ValueError, match="'mt19937'.*'torch', 'secure'"):
        use_noise_generator(opt, "mt19937")
    assert NOISE_GENERATORS == ("torch", "secure")


def test_optimizers_whose_noise_step_differs_are_refused():
    # Prepare: adaptive clipping also noises the count of unclipped gradients.
    params = [nn.Parameter(torch.zeros(3))]
    adaclip = AdaClipDPOptimizer(
        torch.optim.SGD(params, lr=0.1), noise_multiplier=1.0, target_unclipped_quantile=0.5,
        clipbound_learning_rate=0.2, max_clipbound=10.0, min_clipbound=0.1,
        unclipped_num_std=1.0, max_grad_norm=1.0, expected_batch_size=8,
    )
    plain = torch.optim.SGD(params, lr=0.1)
    # Execute / Assert
    for optimizer in (adaclip, plain):
        with pytest.raises(ValueError, match="cannot choose the noise generator"):
            use_noise_generator(optimizer, "secure")
