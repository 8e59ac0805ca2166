"""Dirac canaries in Opacus DP-SGD: the block costs the real model nothing, a canary's
clipped gradient is exactly C·e_j, and the audit tells an honest mechanism from a
planted bug (claims from privacy.accounting, i.e. Opacus' RDP accountant)."""

import copy
import warnings

import numpy as np
import pytest
import torch
from torch import nn
from torch.utils.data import DataLoader, TensorDataset

from clients.canary import (
    REAL,
    CanaryDataset,
    canary_scores,
    canary_weights,
    dp_sgd_with_canaries,
    draw_membership,
    masked_loss,
    real_model,
    with_canaries,
)
from privacy import epsilon, planned_poisson_schedule
from privacy.empirical import audit_from_scores

DELTA = 1e-5


@pytest.fixture(autouse=True)
def _quiet_opacus():
    with warnings.catch_warnings():
        warnings.filterwarnings("ignore", message="Secure RNG turned off")
        warnings.filterwarnings("ignore", message="Full backward hook is firing")
        warnings.filterwarnings("ignore", message="Optimal order is the")
        yield


def _private(module, dataset, *, noise_multiplier, max_grad_norm, lr=0.5):
    from opacus import PrivacyEngine

    dp_model, dp_opt, _ = PrivacyEngine().make_private(
        module=module, optimizer=torch.optim.SGD(module.parameters(), lr=lr),
        data_loader=DataLoader(dataset, batch_size=len(dataset)),
        noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, grad_sample_mode="hooks")
    return dp_model, dp_opt


def _plain_and_canary(num_canaries=6, max_grad_norm=0.05, noise_multiplier=0.0):
    """The same Linear model twice under Opacus: plain, and with a canary block."""
    torch.manual_seed(0)
    x, y = 3 * torch.randn(8, 4), torch.randint(0, 3, (8,))
    plain = nn.Linear(4, 3)
    wrapped = with_canaries(copy.deepcopy(plain), num_canaries, magnitude=max_grad_norm)
    base = TensorDataset(x, y)
    # No canary in either loader's data: the same length, so the same expected batch size.
    a = _private(plain, base, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    b = _private(wrapped, CanaryDataset(base, np.zeros(num_canaries, dtype=bool)),
                 noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm)
    return x, y, plain, wrapped, a, b


def _step(dp_model, dp_opt, loss_fn, seed=7):
    dp_opt.zero_grad(set_to_none=True)
    loss_fn(dp_model).backward()
    torch.manual_seed(seed)  # the same noise draws for the real parameters of both
    dp_opt.step()


def test_real_records_get_the_same_update_with_the_block():
    # Prepare: per-sample gradients far above C, so clipping acts on every record;
    # noise on, drawn from the same seed (the real parameters come first).
    x, y, plain, wrapped, (dp_a, opt_a), (dp_b, opt_b) = _plain_and_canary(noise_multiplier=1.0)
    real_ids = torch.full((8,), REAL)

    # Execute
    _step(dp_a, opt_a, lambda m: nn.functional.cross_entropy(m(x), y))
    _step(dp_b, opt_b, lambda m: masked_loss(m(x, real_ids), y, real_ids))

    # Assert
    assert torch.allclose(wrapped.model.weight, plain.weight, atol=1e-7)
    assert torch.allclose(wrapped.model.bias, plain.bias, atol=1e-7)


def test_a_sampled_canary_adds_exactly_c_on_its_coordinate_only():
    # Prepare: the same real records plus canaries 1 and 4 in one batch, no noise.
    c, lr, batch = 0.05, 0.5, 8  # expected batch size 8: one Poisson batch of 8 records
    x, y, plain, wrapped, (dp_a, opt_a), (dp_b, opt_b) = _plain_and_canary(max_grad_norm=c)
    xb = torch.cat([x, torch.zeros(2, 4)])
    yb = torch.cat([y, torch.zeros(2, dtype=torch.long)])
    ids = torch.cat([torch.full((8,), REAL), torch.tensor([1, 4])])

    # Execute
    _step(dp_a, opt_a, lambda m: nn.functional.cross_entropy(m(x), y))
    _step(dp_b, opt_b, lambda m: masked_loss(m(xb, ids), yb, ids))

    # Assert: real parameters as without the canaries; the block moved by -lr·C/8 at 1
    # and 4, C up to Opacus' clip factor C / (norm + 1e-6) with norm = magnitude = C.
    assert torch.allclose(wrapped.model.weight, plain.weight, atol=1e-7)
    expected = np.zeros(6)
    expected[[1, 4]] = -lr * c * (c / (c + 1e-6)) / batch
    np.testing.assert_allclose(canary_weights(dp_b), expected, rtol=1e-6, atol=1e-12)


def test_unwrapped_state_dict_has_no_block_and_no_opacus_keys():
    # Prepare
    x, y, plain, wrapped, _, (dp_b, opt_b) = _plain_and_canary()
    ids = torch.full((8,), REAL)
    _step(dp_b, opt_b, lambda m: masked_loss(m(x, ids), y, ids))

    # Execute
    state = real_model(dp_b).state_dict()

    # Assert: the plain model's keys and the trained values, nothing else.
    assert set(state) == set(plain.state_dict()) == {"weight", "bias"}
    assert any(k.startswith("_module.canary") for k in dp_b.state_dict())
    assert torch.equal(state["weight"], dp_b._module.model.weight.detach())


def test_canary_dataset_appends_included_canaries():
    # Prepare
    base = TensorDataset(torch.arange(6.0).reshape(3, 2), torch.tensor([2, 1, 0]))
    membership = np.array([0, 1, 1, 0, 1], dtype=bool)

    # Execute
    data = CanaryDataset(base, membership)
    records = [data[i] for i in range(len(data))]

    # Assert: real records unchanged with id -1, then canaries 1, 2, 4 as zero inputs.
    assert len(data) == 6
    assert [int(r[1]) for r in records] == [REAL, REAL, REAL, 1, 2, 4]
    assert torch.equal(records[1][0], torch.tensor([2.0, 3.0])) and int(records[1][2]) == 1
    assert all(torch.equal(r[0], torch.zeros(2)) for r in records[3:])


def test_masked_loss_is_real_cross_entropy_over_the_whole_batch():
    # Prepare: two real records and one canary, logits chosen by hand.
    logits = torch.tensor([[0.0, 0.0], [2.0, 0.0], [50.0, -50.0]], requires_grad=True)
    y, ids = torch.tensor([0, 1, 1]), torch.tensor([REAL, REAL, 3])

    # Execute
    loss = masked_loss(logits, y, ids)
    loss.backward()

    # Assert: (ln 2 + ln(1 + e^2)) / 3, and no gradient from the canary's row.
    assert loss.item() == pytest.approx((np.log(2) + np.log1p(np.exp(2))) / 3, rel=1e-6)
    assert torch.equal(logits.grad[2], torch.zeros(2))


def test_canary_scores_by_hand():
    updates = [np.array([-0.1, 0.2]), np.array([-0.3, 0.0])]
    np.testing.assert_allclose(canary_scores(updates), [0.4, -0.2])
    # Per-rate: -(-0.1/0.1 - 0.3/0.5) = 1.6 and -(0.2/0.1) = -2.
    np.testing.assert_allclose(canary_scores(updates, learning_rates=[0.1, 0.5]), [1.6, -2.0])
    with pytest.raises(ValueError, match="learning_rates"):
        canary_scores(updates, learning_rates=[0.1])


def test_bad_block_settings_are_refused():
    with pytest.raises(ValueError, match="num_canaries=0"):
        with_canaries(nn.Linear(2, 2), 0, magnitude=1.0)
    with pytest.raises(ValueError, match="magnitude=-1"):
        with_canaries(nn.Linear(2, 2), 3, magnitude=-1.0)


def test_noiseless_scores_count_sampled_steps_even_with_empty_batches():
    # Prepare: 3 records + 3 canaries in, batch size 1: q = 1/6, expected batch 1, and
    # many empty Poisson batches.
    base = TensorDataset(torch.randn(3, 4), torch.tensor([0, 1, 0]))
    membership = np.array([1, 0, 1, 1], dtype=bool)
    torch.manual_seed(0)

    # Execute
    run = dp_sgd_with_canaries(nn.Linear(4, 2), base, membership, noise_multiplier=0.0,
                               max_grad_norm=2.0, batch_size=1, epochs=3, lr=1.0, seed=0)

    # Assert: 18 steps; an included canary scores C per step it was sampled in (a whole
    # number of C's, up to Opacus' clip tolerance), an excluded one exactly 0.
    assert run.steps == 18
    counts = run.scores / 2.0
    np.testing.assert_allclose(counts, np.round(counts), atol=1e-5)
    assert run.scores[1] == 0.0 and np.all(run.scores[membership] >= 0)
    assert counts[membership].sum() > 0


# --- The audit of the whole mechanism ------------------------------------------------

M, N_REAL, BATCH, EPOCHS, C = 500, 200, 90, 10, 1.0
SIGMA = 3.4  # claims ε just under 2 at this schedule (checked below; calibrating costs seconds)


@pytest.fixture(scope="module")
def setup():
    """200 real records and 500 canaries (about 250 in): q = 0.2, 50 steps."""
    g = torch.Generator().manual_seed(0)
    x = torch.randn(N_REAL, 10, generator=g)
    base = TensorDataset(x, (x[:, 0] > 0).long())
    membership = draw_membership(M, seed=100)
    q, _, steps = planned_poisson_schedule(num_samples=N_REAL + int(membership.sum()),
                                           batch_size=BATCH, local_epochs=EPOCHS, rounds=1)
    claim = epsilon(history=[(SIGMA, q, steps)], delta=DELTA)
    assert 1.8 <= claim <= 2.0
    return base, membership, SIGMA, claim, (q, steps)


def _audit(setup, noise_multiplier, tamper=None):
    base, membership, _, _, (q, steps) = setup
    torch.manual_seed(0)
    run = dp_sgd_with_canaries(nn.Linear(10, 2), base, membership,
                               noise_multiplier=noise_multiplier, max_grad_norm=C,
                               batch_size=BATCH, epochs=EPOCHS, lr=0.1, seed=1, tamper=tamper)
    assert (run.sample_rate, run.steps) == pytest.approx((q, steps))
    return audit_from_scores(run.scores, run.membership, delta=DELTA)


def test_noise_off_control_reaches_the_ceiling(setup):
    audit = _audit(setup, noise_multiplier=0.0)
    assert audit.correct == audit.guesses
    assert audit.epsilon_lb >= 0.85 * audit.ceiling


def test_honest_mechanism_stays_within_its_claim(setup):
    _, _, sigma, claim, _ = setup
    audit = _audit(setup, noise_multiplier=sigma)
    assert audit.epsilon_lb <= claim


def test_planted_bug_is_caught(setup):
    # The optimizer adds a tenth of the noise the claim was computed for.
    _, _, sigma, claim, _ = setup

    def tenth_of_the_noise(optimizer):
        optimizer.noise_multiplier *= 0.1

    audit = _audit(setup, noise_multiplier=sigma, tamper=tenth_of_the_noise)
    assert audit.epsilon_lb > claim
