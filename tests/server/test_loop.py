"""Pieces of the server loop that need no Flower run."""

import pytest
import torch

from server.loop import _ema


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
