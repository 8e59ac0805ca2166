"""Central metrics against values worked out by hand."""

import numpy as np
import pytest

from clients.config import TrainConfig
from server.evaluation import classification_metrics
from server.loop import lr_for_round


def test_metrics_on_a_hand_checked_example():
    y = np.array([0, 0, 1, 1, 2, 2])
    probs = np.array([
        [0.8, 0.1, 0.1],   # 0 -> 0
        [0.2, 0.7, 0.1],   # 0 -> 1 (wrong)
        [0.1, 0.8, 0.1],   # 1 -> 1
        [0.1, 0.6, 0.3],   # 1 -> 1
        [0.1, 0.2, 0.7],   # 2 -> 2
        [0.3, 0.1, 0.6],   # 2 -> 2
    ])
    m = classification_metrics(y, probs)
    assert m["accuracy"] == pytest.approx(5 / 6)
    # per class precision 1, 2/3, 1; recall 1/2, 1, 1
    assert m["precision_macro"] == pytest.approx((1 + 2 / 3 + 1) / 3)
    assert m["recall_macro"] == pytest.approx((0.5 + 1 + 1) / 3)
    f1 = [2 * 1 * 0.5 / 1.5, 2 * (2 / 3) * 1 / (5 / 3), 1.0]
    assert m["f1_macro"] == pytest.approx(sum(f1) / 3)
    assert m["confusion_matrix"] == [[1, 1, 0], [0, 2, 0], [0, 0, 2]]
    expected_loss = -np.mean(np.log([0.8, 0.2, 0.8, 0.6, 0.7, 0.6]))
    assert m["loss"] == pytest.approx(expected_loss)
    # Class 0 vs rest: positives 0.8, 0.2; negatives 0.1,0.1,0.1,0.3 -> (4 + 3)/8 pairs won.
    # Class 1: positives 0.8, 0.6 vs 0.1,0.7,0.2,0.1 -> (4 + 3)/8. Class 2: 0.7,0.6 vs all
    # of 0.1,0.1,0.1,0.3 -> 8/8.
    assert m["roc_auc_ovr"] == pytest.approx((7 / 8 + 7 / 8 + 1) / 3)


def test_auc_is_nan_when_a_class_is_missing():
    m = classification_metrics(np.array([0, 0, 1]), np.full((3, 3), 1 / 3))
    assert np.isnan(m["roc_auc_ovr"])


def test_lr_schedules():
    assert lr_for_round(TrainConfig(lr=0.4), 7) == 0.4
    step = TrainConfig(lr=0.4, lr_schedule="step", lr_gamma=0.5, lr_step_rounds=2)
    assert [lr_for_round(step, r) for r in (1, 2, 3, 4, 5)] == [0.4, 0.4, 0.2, 0.2, 0.1]
    cos = TrainConfig(lr=1.0, lr_min=0.0, lr_schedule="cosine", rounds=3)
    assert [lr_for_round(cos, r) for r in (1, 2, 3)] == pytest.approx([1.0, 0.5, 0.0])
