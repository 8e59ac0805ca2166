"""Update validation: each rejection path, and the round goes on with the rest."""

import numpy as np
import pytest
from flwr.app import ConfigRecord
from flwr.serverapp.strategy import FedAvg

from strategies.budget import BudgetAwareSelection
from strategies.validation import UpdateValidation, check_update

GLOBAL = np.zeros(2, dtype=np.float64)


@pytest.fixture
def validated(msgs, task_identity):
    """FedAvg behind validation, configured with the global model w = [0, 0]."""
    def make(max_update_norm=None):
        strategy = UpdateValidation(FedAvg(min_train_nodes=1, min_available_nodes=3),
                                    max_update_norm=max_update_norm)
        strategy.configure_train(1, msgs.arrays(w=GLOBAL), ConfigRecord({}),
                                 msgs.FakeGrid([1, 2, 3]))
        return strategy
    return make


def _good(msgs):
    return [msgs.reply(1, {"w": np.array([1.0, 1.0])}),
            msgs.reply(2, {"w": np.array([3.0, 3.0])})]


@pytest.mark.parametrize("bad,check,needle", [
    ({"w": np.array([np.nan, 0.0])}, "nonfinite", "w: 1 NaN or infinite"),
    ({"w": np.array([np.inf, -np.inf])}, "nonfinite", "w: 2 NaN or infinite"),
    ({"w": np.zeros(3)}, "shape", "shape [3], expected [2]"),
    ({"w": np.zeros(2, dtype=np.float32)}, "dtype", "dtype float32, expected float64"),
    ({"v": np.zeros(2)}, "keys", "unexpected tensors ['v'], missing ['w']"),
    ({"w": np.zeros(2), "extra": np.zeros(1)}, "keys", "unexpected tensors ['extra']"),
])
def test_a_bad_update_is_rejected_and_the_others_are_aggregated(msgs, validated, bad, check,
                                                                 needle):
    # Prepare: two good replies and one bad one from node 3.
    strategy = validated()
    replies = [*_good(msgs), msgs.reply(3, bad)]

    arrays, _ = strategy.aggregate_train(1, replies)

    # The round goes on: the mean of the two good updates, (1 + 3) / 2 = 2.
    assert msgs.weights(arrays) == pytest.approx([2.0, 2.0])
    [rejection] = strategy.rejections
    assert (rejection.node_id, rejection.check, rejection.server_round) == (3, check, 1)
    assert needle in rejection.reason


def test_an_update_above_the_norm_bound_is_rejected(msgs, validated):
    # Prepare: bound 2; updates of norm sqrt(2), 2 exactly (1.2, 1.6) and sqrt(18).
    strategy = validated(max_update_norm=2.0)
    replies = [msgs.reply(1, {"w": np.array([1.0, 1.0])}),
               msgs.reply(2, {"w": np.array([1.2, 1.6])}),
               msgs.reply(3, {"w": np.array([3.0, 3.0])})]

    arrays, _ = strategy.aggregate_train(1, replies)

    # Kept: nodes 1 and 2, mean [1.1, 1.3]; node 3's norm 3*sqrt(2) = 4.24 > 2.
    assert msgs.weights(arrays) == pytest.approx([1.1, 1.3])
    assert [(r.node_id, r.check) for r in strategy.rejections] == [(3, "norm")]
    assert "4.24264 > max_update_norm=2" in strategy.rejections[0].reason


def test_a_reply_without_arrays_is_rejected(msgs, validated):
    strategy = validated()
    empty = msgs.reply(3, {})
    del empty.content["arrays"]

    kept, rejected = strategy.screen(1, [*_good(msgs), empty])

    assert [m.metadata.src_node_id for m in kept] == [1, 2]
    assert [(r.node_id, r.check) for r in rejected] == [(3, "arrays")]


def test_a_round_with_every_update_rejected_aggregates_nothing(msgs, validated):
    strategy = validated()
    replies = [msgs.reply(1, {"w": np.array([np.nan, 1.0])}), msgs.reply(2, {"w": np.zeros(5)})]

    assert strategy.aggregate_train(1, replies) == (None, None)
    assert [r.check for r in strategy.rejections] == ["nonfinite", "shape"]


def test_check_update_accepts_a_well_formed_update():
    ref = {"a": np.zeros((2, 2), dtype=np.float32), "b": np.zeros(1, dtype=np.int64)}
    got = {"a": np.ones((2, 2), dtype=np.float32), "b": np.ones(1, dtype=np.int64)}
    # Norm of the update: sqrt(4 * 1 + 1) = sqrt(5) ~ 2.236.
    assert check_update(got, ref, max_update_norm=2.3) is None
    assert check_update(got, ref, max_update_norm=2.2)[0] == "norm"


def test_budget_selection_still_lowers_the_sampler_wait_through_the_validation(msgs):
    inner = FedAvg(min_train_nodes=1, min_available_nodes=4)
    validation = UpdateValidation(inner)
    budget = BudgetAwareSelection(validation)
    budget.exhausted = {3: "spent"}

    seen = []
    inner.configure_train = lambda rnd, arrays, config, grid: seen.append(
        inner.min_available_nodes) or []
    budget.configure_train(2, msgs.arrays(w=GLOBAL), ConfigRecord({}), msgs.FakeGrid([1, 2, 3, 4]))

    assert seen == [3]  # 4 - 1 spent site, set through the validation wrapper
    assert inner.min_available_nodes == 4


def test_a_bad_bound_is_refused():
    with pytest.raises(ValueError, match="max_update_norm=0"):
        UpdateValidation(FedAvg(), max_update_norm=0)

