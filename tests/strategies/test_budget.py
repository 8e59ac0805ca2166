"""Budget-aware selection: spent sites are never selected again."""

import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.serverapp.strategy import FedAvg

from strategies.budget import BudgetAwareSelection


class _Grid:
    """The part of a Grid that strategies use to sample and build messages."""

    def __init__(self, nodes):
        self.nodes = nodes

    def get_node_ids(self):
        return list(self.nodes)

    def create_message(self, content, message_type, dst_node_id, group_id, ttl=None):
        meta = Metadata(run_id=1, message_id="", src_node_id=0, dst_node_id=dst_node_id,
                        reply_to_message_id="", group_id=group_id, created_at=time.time(),
                        ttl=ttl or 60, message_type=message_type)
        return make_message(meta, content)


def _reply(node, content):
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60,
                    message_type="train")
    return make_message(meta, RecordDict(content))


def _trained(node, afford=1, binding="site"):
    import torch

    arrays = ArrayRecord({"w": torch.full((2,), float(node))})
    return _reply(node, {"arrays": arrays,
                         "metrics": MetricRecord({"num-examples": 10, "can-afford-next": afford}),
                         "ledger": ConfigRecord({"binding-cap": binding})})


def _declined(node, binding="site"):
    return _reply(node, {"metrics": MetricRecord({"declined": 1}),
                         "status": ConfigRecord({"status": "budget_exhausted", "site": f"s{node}",
                                                 "binding-cap": binding, "reason": "spent"})})


def _selection():
    return BudgetAwareSelection(FedAvg(fraction_train=1.0, min_train_nodes=1,
                                       min_available_nodes=4))


def test_declines_and_spent_sites_are_left_out_of_aggregation_and_selection():
    budget, grid = _selection(), _Grid([1, 2, 3, 4])
    replies = [_trained(1), _trained(2, afford=0), _declined(3), _trained(4)]

    arrays, _ = budget.aggregate_train(1, replies)

    # Only the three trained updates are averaged (equal weights): (1 + 2 + 4) / 3.
    assert float(arrays["w"].numpy()[0]) == pytest.approx((1 + 2 + 4) / 3, rel=1e-6)
    assert set(budget.exhausted) == {2, 3}
    assert [d.node_id for d in budget.declines] == [3]
    assert not budget.global_cap_reached
    assert sorted(budget.eligible(grid)) == [1, 4]


def test_the_wrapped_strategy_samples_only_from_sites_with_budget():
    # Prepare: a wrapped strategy that records what it was shown.
    class Recorder(FedAvg):
        def configure_train(self, server_round, arrays, config, grid):
            self.seen = (sorted(grid.get_node_ids()), self.min_available_nodes)
            return []

    inner = Recorder(min_train_nodes=1, min_available_nodes=4)
    budget = BudgetAwareSelection(inner)
    budget.aggregate_train(1, [_trained(1), _trained(2, afford=0), _declined(3), _trained(4)])

    budget.configure_train(2, ArrayRecord({}), ConfigRecord({}), _Grid([1, 2, 3, 4]))

    # Only 1 and 4 are shown, and Flower's sampler waits for 2 nodes, not 4 ...
    assert inner.seen == ([1, 4], 2)
    assert inner.min_available_nodes == 4  # ... only during this call.


def test_a_global_cap_is_reported_separately():
    budget = _selection()
    budget.aggregate_train(1, [_trained(1, afford=0, binding="global"), _trained(2)])
    assert budget.global_cap_reached and set(budget.exhausted) == {1}


def test_a_round_of_declines_aggregates_nothing():
    budget = _selection()
    assert budget.aggregate_train(1, [_declined(1), _declined(2)]) == (None, None)


def _no_hang(seconds):
    """Fail (instead of hanging) if Flower's sampler waits for nodes that never come."""
    import signal

    def _fail(*_):
        raise TimeoutError(f"sampling waited more than {seconds}s for absent nodes")

    signal.signal(signal.SIGALRM, _fail)
    signal.alarm(seconds)


def test_a_site_that_never_comes_back_does_not_stall_sampling(monkeypatch):
    from flwr.supercore.task_identity import TaskIdentity

    for field in ("_run_id", "_node_id", "_task_id"):  # Flower's Message() reads them
        monkeypatch.setattr(TaskIdentity, field, 1)
    # Prepare: the strategy was built for 4 sites; only 3 are connected now.
    budget, grid = _selection(), _Grid([1, 2, 3])
    budget.min_available = 2

    # Execute
    _no_hang(10)
    try:
        messages = budget.configure_train(2, ArrayRecord(), ConfigRecord(), grid)
    finally:
        import signal

        signal.alarm(0)

    # Assert: all connected sites asked; the wrapped strategy's setting is restored.
    assert sorted(m.metadata.dst_node_id for m in messages) == [1, 2, 3]
    assert budget.strategy.min_available_nodes == 4


def test_wait_for_returns_when_enough_nodes_or_time_is_up():
    budget = _selection()
    assert budget.wait_for(_Grid([1, 2, 3, 4]), 4, timeout=5) == 4
    t0 = time.monotonic()
    assert budget.wait_for(_Grid([1, 2]), 4, timeout=0.3, poll=0.05) == 2
    assert time.monotonic() - t0 < 5
