"""Pieces of the server loop that need no Flower run."""

import pytest
import torch

from privacy import epsilon
from server.loop import _ema, _PrivacyTally


def test_ema_of_weights_by_hand():
    w = [{"w": torch.tensor([0.0]), "n": torch.tensor([1])},
         {"w": torch.tensor([4.0]), "n": torch.tensor([2])},
         {"w": torch.tensor([8.0]), "n": torch.tensor([3])}]
    smoothed = None
    for x in w:
        smoothed = _ema(smoothed, x, 0.5)
    # 0 -> 0.5*0 + 0.5*4 = 2 -> 0.5*2 + 0.5*8 = 5; integer tensors take the latest.
    assert smoothed["w"].item() == pytest.approx(5.0)
    assert smoothed["n"].item() == 3
    assert _ema(w[0], w[1], 0.0) is w[1]


def test_tally_reports_the_larger_of_reported_and_recomputed():
    tally = _PrivacyTally()
    # A client that under-reports: the server's own recomputation wins.
    tally.add({"client": 0, "epsilon": 0.01, "noise_multiplier": 1.0, "sample_rate": 0.1,
               "steps": 50})
    tally.add({"client": 0, "epsilon": 0.02, "noise_multiplier": 1.0, "sample_rate": 0.1,
               "steps": 50})
    expected = epsilon(history=[(1.0, 0.1, 100)], delta=1e-5)
    assert tally.epsilon_max(1e-5, "rdp") == pytest.approx(expected)
    assert tally.per_client(1e-5, "rdp")[0] == pytest.approx(expected)
    # A client that over-reports keeps its (larger) claim.
    tally.add({"client": 1, "epsilon": 99.0, "noise_multiplier": 5.0, "sample_rate": 0.1,
               "steps": 1})
    assert tally.epsilon_max(1e-5, "rdp") == 99.0
