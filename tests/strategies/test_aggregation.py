"""Each strategy aggregates hand-made replies to the numbers worked out by hand.

Replies carry one array ``w``; the expected aggregates are computed in the
comments (or with plain numpy), never by calling a strategy.
"""

import math

import numpy as np
import pytest
from flwr.app import ConfigRecord

from strategies import Sampling, build_strategy


def _build(name, n, **params):
    defaults = {"proximal_mu": 0.1, "server_lr": 0.1, "beta_1": 0.9, "beta_2": 0.99,
                "tau": 1e-3, "trim_beta": 0.2, "num_malicious_nodes": 1,
                "num_nodes_to_select": 0}
    return build_strategy(name, Sampling(num_clients=n, min_train_clients=n,
                                         min_evaluate_clients=0), {**defaults, **params})


def _points(msgs, values, nums=None):
    """One reply per value, ``w`` = [value] (a 1-D model)."""
    nums = nums or [1] * len(values)
    return [msgs.reply(i + 1, {"w": np.array([v], dtype=np.float64)}, num_examples=k)
            for i, (v, k) in enumerate(zip(values, nums, strict=True))]


def test_fedavg_weights_by_num_examples(msgs):
    # Prepare: w = 0, 3, 6 from clients with 1, 2, 3 examples.
    strategy = _build("fedavg", 3)
    replies = _points(msgs, [0.0, 3.0, 6.0], nums=[1, 2, 3])

    arrays, _ = strategy.aggregate_train(1, replies)

    # (1*0 + 2*3 + 3*6) / 6 = 24 / 6 = 4.
    assert msgs.weights(arrays) == pytest.approx([4.0])


def test_fedmedian_is_the_coordinate_wise_median(msgs):
    # Prepare: five 3-D models, one with an outlier coordinate.
    rows = [[1, 0, 0], [2, 1, 0], [3, 2, 10], [5, 3, 0], [100, -50, 0]]
    replies = [msgs.reply(i, {"w": np.array(r, dtype=np.float64)}) for i, r in enumerate(rows)]

    arrays, _ = _build("fedmedian", 5).aggregate_train(1, replies)

    # Sorted columns: [1 2 3 5 100], [-50 0 1 2 3], [0 0 0 0 10] -> middle values 3, 1, 0.
    assert msgs.weights(arrays) == pytest.approx([3.0, 1.0, 0.0])


def test_fedtrimmedavg_cuts_int_beta_n_at_each_end(msgs):
    rows = [[1, 0, 0], [2, 1, 0], [3, 2, 10], [5, 3, 0], [100, -50, 0]]
    replies = [msgs.reply(i, {"w": np.array(r, dtype=np.float64)}) for i, r in enumerate(rows)]

    arrays, _ = _build("fedtrimmedavg", 5, trim_beta=0.2).aggregate_train(1, replies)

    # int(0.2 * 5) = 1 value cut at each end: [2 3 5] -> 10/3, [0 1 2] -> 1, [0 0 0] -> 0.
    assert msgs.weights(arrays) == pytest.approx([10 / 3, 1.0, 0.0])


def test_multikrum_averages_the_m_best_scored_replies(msgs):
    # Prepare: 1-D points 0, 1, 2.5, 4, 100; f = 1, so each score sums the squared distances
    # to the n - f - 2 = 2 nearest others:
    #   0: 1 + 6.25 = 7.25   1: 1 + 2.25 = 3.25   2.5: 2.25 + 2.25 = 4.5
    #   4: 2.25 + 9 = 11.25  100: 96^2 + 97.5^2 (huge)
    # m = 3 keeps 1, 2.5 and 0, averaged by num-examples (2, 1, 1).
    replies = _points(msgs, [0.0, 1.0, 2.5, 4.0, 100.0], nums=[1, 2, 1, 1, 1])
    strategy = _build("multikrum", 5, num_malicious_nodes=1, num_nodes_to_select=3)

    arrays, _ = strategy.aggregate_train(1, replies)

    assert msgs.weights(arrays) == pytest.approx([(1 * 0.0 + 2 * 1.0 + 1 * 2.5) / 4])


def test_krum_selects_the_single_best_scored_reply(msgs):
    replies = _points(msgs, [0.0, 1.0, 2.5, 4.0, 100.0])
    strategy = _build("multikrum", 5, num_malicious_nodes=1, num_nodes_to_select=1)

    arrays, _ = strategy.aggregate_train(1, replies)

    assert msgs.weights(arrays) == pytest.approx([1.0])  # score 3.25, the lowest


def test_bulyan_selects_then_averages_the_values_closest_to_the_median(msgs):
    # Prepare: n = 7 = 4f + 3 with f = 1. Multi-Krum (4 nearest) keeps theta = n - 2f = 5:
    #   0: 1 + 4 + 12.25 + 49 = 66.25     1: 1 + 1 + 6.25 + 36 = 44.25
    #   2: 4 + 1 + 2.25 + 25 = 32.25      3.5: 12.25 + 6.25 + 2.25 + 12.25 = 33
    #   7: 49 + 36 + 25 + 12.25 = 122.25  50 and -60: thousands
    # -> {0, 1, 2, 3.5, 7}; median 2; the beta = theta - 2f = 3 values closest to it are
    # 2 (0), 1 (1) and 3.5 (1.5): mean 6.5 / 3.
    replies = _points(msgs, [0.0, 1.0, 2.0, 3.5, 7.0, 50.0, -60.0])

    arrays, _ = _build("bulyan", 7, num_malicious_nodes=1).aggregate_train(1, replies)

    assert msgs.weights(arrays) == pytest.approx([6.5 / 3])


def _one_server_step(msgs, name, **params):
    strategy = _build(name, 2, **params)
    grid = msgs.FakeGrid([1, 2])
    strategy.configure_train(1, msgs.arrays(w=[1.0, -1.0]), ConfigRecord({}),
                             grid)
    # Mean of the replies [1.3, -1.0]: the pseudo-gradient is delta = [0.3, 0.0].
    replies = [msgs.reply(1, {"w": np.array([1.2, -1.1])}),
               msgs.reply(2, {"w": np.array([1.4, -0.9])})]
    arrays, _ = strategy.aggregate_train(1, replies)
    return msgs.weights(arrays)


def test_fedadam_takes_one_bias_corrected_adam_step(msgs, task_identity):
    eta, b1, b2, tau = 0.1, 0.9, 0.99, 1e-3

    w = _one_server_step(msgs, "fedadam", server_lr=eta, beta_1=b1, beta_2=b2, tau=tau)

    # m = (1 - b1) * 0.3 = 0.03; v = (1 - b2) * 0.09 = 0.0009, sqrt(v) = 0.03;
    # Flower's step size in round 1: eta * sqrt(1 - b2^2) / (1 - b1^2).
    step = eta * math.sqrt(1 - b2**2) / (1 - b1**2)
    assert w == pytest.approx([1.0 + step * 0.03 / (0.03 + tau), -1.0])


def test_fedyogi_takes_one_yogi_step(msgs, task_identity):
    eta, tau = 0.01, 1e-3

    w = _one_server_step(msgs, "fedyogi", server_lr=eta, beta_1=0.9, beta_2=0.99, tau=tau)

    # m = 0.03; v = 0 - (1 - 0.99) * 0.09 * sign(0 - 0.09) = 0.0009; no bias correction.
    assert w == pytest.approx([1.0 + eta * 0.03 / (0.03 + tau), -1.0])


def test_fedprox_sends_mu_to_the_clients_and_averages_like_fedavg(msgs, task_identity):
    strategy = _build("fedprox", 2, proximal_mu=0.25)

    messages = list(strategy.configure_train(1, msgs.arrays(w=np.zeros(1)),
                                             ConfigRecord({}), msgs.FakeGrid([1, 2])))
    arrays, _ = strategy.aggregate_train(1, _points(msgs, [1.0, 4.0], nums=[3, 1]))

    assert [m.content["config"]["proximal-mu"] for m in messages] == [0.25, 0.25]
    assert msgs.weights(arrays) == pytest.approx([(3 * 1.0 + 4.0) / 4])


@pytest.mark.parametrize("name,params,needle", [
    ("bulyan", {"num_malicious_nodes": 2}, "4f + 3 = 11"),
    ("multikrum", {"num_malicious_nodes": 4}, "2f + 2 = 10"),
    ("multikrum", {"num_nodes_to_select": 10}, "num_nodes_to_select=10"),
    ("fedtrimmedavg", {"trim_beta": 0.5}, "trim_beta=0.5"),
    ("fedprox", {"proximal_mu": 0.0}, "proximal_mu=0.0"),
    ("fedadam", {"beta_2": 1.0}, "beta_2=1.0"),
])
def test_unsound_parameters_are_refused_when_built(name, params, needle):
    with pytest.raises(ValueError, match=needle.replace("+", r"\+")):
        _build(name, 10, **params)
