"""Accounting: planned schedules, calibration and ε, checked against known values
and against Google's dp-accounting (an independent implementation)."""

import math

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from opacus.data_loader import DPDataLoader
from torch.utils.data import DataLoader, TensorDataset

from privacy import calibrate_noise_multiplier, compress, epsilon, planned_poisson_schedule


def pld_epsilon(history, delta):
    """ε from dp-accounting's PLD accountant (Poisson-subsampled Gaussian)."""
    import dp_accounting

    acc = dp_accounting.pld.PLDAccountant()
    for sigma, q, steps in history:
        event = dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(sigma))
        acc.compose(event, steps)
    return acc.get_epsilon(delta)


def test_rdp_matches_published_value():
    # Opacus' own test pins this value (σ 1.5, q 0.04, 2250 steps, δ 1e-5).
    assert epsilon(history=[(1.5, 0.04, 2250)], delta=1e-5) == pytest.approx(7.3291, abs=1e-3)


def test_rdp_never_below_independent_pld():
    history = [(1.5, 0.04, 2250)]
    rdp, pld = epsilon(history=history, delta=1e-5), pld_epsilon(history, 1e-5)
    assert pld == pytest.approx(6.7688, abs=5e-3)
    assert rdp >= pld


def test_empty_history_costs_nothing():
    assert epsilon(history=[], delta=1e-5) == 0.0


@pytest.mark.parametrize("n,batch", [(323, 64), (100, 7), (50, 50), (1000, 1)])
def test_planned_schedule_matches_opacus_poisson_loader(n, batch):
    loader = DataLoader(TensorDataset(torch.zeros(n, 1)), batch_size=batch)
    dp_loader = DPDataLoader.from_data_loader(loader)
    q, per_round, total = planned_poisson_schedule(
        num_samples=n, batch_size=batch, local_epochs=2, rounds=3)
    assert q == pytest.approx(dp_loader.sample_rate)
    assert per_round == 2 * len(dp_loader.batch_sampler)
    assert total == 3 * per_round


def test_planned_schedule_rejects_empty_client():
    with pytest.raises(ValueError, match="num_samples=0"):
        planned_poisson_schedule(num_samples=0, batch_size=8, local_epochs=1, rounds=1)


@settings(max_examples=12, deadline=None)
@given(
    target=st.floats(0.5, 10.0),
    q=st.floats(0.01, 0.5),
    steps=st.integers(1, 300),
)
def test_calibrated_sigma_never_exceeds_target(target, q, steps):
    sigma = calibrate_noise_multiplier(target_epsilon=target, delta=1e-5, sample_rate=q,
                                       steps=steps)
    eps = epsilon(history=[(sigma, q, steps)], delta=1e-5)
    assert eps <= target
    # ... and is not wastefully loose: within the search tolerance.
    assert eps >= target - 0.05 or math.isclose(eps, target, abs_tol=0.05)


def test_calibration_refuses_unreachable_budget_quickly():
    # RDP's conversion cannot go below ~0.1 at delta=1e-5, whatever the noise.
    with pytest.raises(ValueError, match="target_epsilon=0.01: unreachable"):
        calibrate_noise_multiplier(target_epsilon=0.01, delta=1e-5, sample_rate=0.5, steps=100)


def test_compressed_history_has_the_same_epsilon():
    history = [(1.1, 0.2, 5), (0.9, 0.1, 7), (1.1, 0.2, 5), (1.1, 0.2, 3)]
    assert sorted(compress(history)) == [(0.9, 0.1, 7), (1.1, 0.2, 13)]
    # Independent check: dp-accounting on the uncompressed list of releases.
    assert epsilon(history=history, delta=1e-5) >= pld_epsilon(history, 1e-5)
    acc_each = epsilon(history=[(1.1, 0.2, 13), (0.9, 0.1, 7)], delta=1e-5)
    assert epsilon(history=history, delta=1e-5) == pytest.approx(acc_each)


@pytest.mark.parametrize("accountant", ["rdp", "prv"])
def test_noiseless_release_has_infinite_epsilon(accountant):
    assert epsilon(history=[(0.0, 0.5, 3)], delta=1e-5, accountant=accountant) == math.inf
