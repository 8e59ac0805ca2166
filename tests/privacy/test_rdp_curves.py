"""ε through RdpCurves: exactly the value Opacus' own accountants give, only faster."""

import pytest
from opacus.accountants import PRVAccountant, RDPAccountant

from privacy import epsilon
from privacy.accounting import EpsilonMemo, RdpCurves

pytestmark = pytest.mark.filterwarnings("ignore::RuntimeWarning", "ignore::UserWarning")

HISTORIES = [
    ([(1.5, 0.5, 2)], 1e-5),  # a small site: half its records in a batch
    ([(1.1, 0.027, 380)], 1e-5),
    ([(0.9, 1.0, 5)], 1e-6),  # full batches: no sampling
    ([(4.0, 0.3, 7), (0.8, 0.05, 30), (1.2, 1.0, 3)], 1e-5),  # three (σ, q) at once
]


def _opacus(cls, history, delta):
    acc = cls()
    acc.history = list(history)
    return float(acc.get_epsilon(delta=delta))


@pytest.mark.parametrize(("history", "delta"), HISTORIES)
@pytest.mark.parametrize(("name", "cls"), [("prv", PRVAccountant), ("rdp", RDPAccountant)])
def test_epsilon_is_opacus_own_value_with_fresh_and_with_shared_curves(name, cls, history,
                                                                      delta):
    # Prepare: curves already holding these (σ, q) from a history with other step counts.
    shared = RdpCurves()
    epsilon(history=[(s, q, 3 * n + 1) for s, q, n in history], delta=delta,
            accountant=name, curves=shared)
    # Execute
    expected = _opacus(cls, history, delta)
    fresh = epsilon(history=history, delta=delta, accountant=name)
    reused = epsilon(history=history, delta=delta, accountant=name, curves=shared)
    # Assert: equal, not approximately equal
    assert fresh == expected and reused == expected
    assert len(shared) == len(history)


def test_curves_keep_one_entry_per_sigma_and_q_within_their_bound():
    # Prepare
    curves = RdpCurves(maxsize=2)
    # Execute
    for steps in (1, 10, 100):
        curves.epsilon([(1.0, 0.1, steps)], 1e-5)
    same = len(curves)
    curves.epsilon([(2.0, 0.1, 1), (3.0, 0.1, 1)], 1e-5)
    # Assert
    assert same == 1 and len(curves) == 2
    assert not curves.step(1.0, 0.1).flags.writeable


def test_the_memo_shares_its_curves_across_histories():
    # Prepare
    memo = EpsilonMemo(maxsize=8)
    # Execute: a site's growing history, round after round
    values = [memo([(1.5, 0.5, 2 * r)], 1e-5, "prv") for r in (1, 2, 3)]
    # Assert
    assert values == [_opacus(PRVAccountant, [(1.5, 0.5, 2 * r)], 1e-5) for r in (1, 2, 3)]
    assert len(memo.curves) == 1 and memo.misses == 3
