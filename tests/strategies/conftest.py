"""Hand-built Flower messages for strategy tests (no network, no Grid)."""

import time
from types import SimpleNamespace

import numpy as np
import pytest
from flwr.app import Array, ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message


class FakeGrid:
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


def reply(node, arrays, num_examples=1, **metrics):
    """A trained reply from ``node`` carrying ``arrays`` ({name: numpy array})."""
    content = {"arrays": ArrayRecord({k: Array(np.asarray(v)) for k, v in arrays.items()}),
               "metrics": MetricRecord({"num-examples": num_examples, "client": node,
                                        **metrics}),
               "ledger": ConfigRecord({"site": f"client-{node}"})}
    meta = Metadata(run_id=1, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60,
                    message_type="train")
    return make_message(meta, RecordDict(content))


def arrays(**named):
    """An ArrayRecord of numpy arrays (the global model a strategy is configured with)."""
    return ArrayRecord({k: Array(np.asarray(v)) for k, v in named.items()})


def weights(record, key="w"):
    return record[key].numpy()


@pytest.fixture
def msgs():
    """``msgs.reply``, ``msgs.FakeGrid``, ``msgs.weights``, ``msgs.arrays``."""
    return SimpleNamespace(reply=reply, FakeGrid=FakeGrid, weights=weights, arrays=arrays)


@pytest.fixture
def task_identity(monkeypatch):
    """Flower's ``Message(...)`` reads the run id of the process it runs in (a ServerApp's)."""
    from flwr.supercore.task_identity import TaskIdentity

    monkeypatch.setattr(TaskIdentity, "_run_id", 1)
    monkeypatch.setattr(TaskIdentity, "_node_id", 0)
    monkeypatch.setattr(TaskIdentity, "_task_id", 1)
