"""Sorting a round's replies: a lost site lets the round go on; a raising client stops it."""

import time

import pytest
from flwr.app import Error, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message
from flwr.common.constant import SUPERLINK_NODE_ID, ErrorCode

from server.replies import ClientFailedError, RoundSender


def _meta(message_id, src, dst, reply_to=""):
    return Metadata(run_id=1, message_id=message_id, src_node_id=src, dst_node_id=dst,
                    reply_to_message_id=reply_to, group_id="1", created_at=time.time(),
                    ttl=60, message_type="train")


def _sent(node):
    return make_message(_meta(f"m{node}", 0, node), RecordDict({}))


def _answer(node):
    return make_message(_meta(f"r{node}", node, 0, f"m{node}"),
                        RecordDict({"metrics": MetricRecord({"client": node})}))


def _error(node, code, *, from_superlink=False):
    src = SUPERLINK_NODE_ID if from_superlink else node
    return make_message(_meta(f"e{node}", src, 0, f"m{node}"), error=Error(code, "why"))


class _Grid:
    def __init__(self, replies):
        self.replies = replies
        self.timeouts = []

    def send_and_receive(self, messages, *, timeout=None):
        self.timeouts.append(timeout)
        return list(self.replies)


def test_unavailable_crashed_and_silent_nodes_are_lost_and_the_others_answer():
    # Prepare: 5 nodes; 1 and 2 answer, 3 is unavailable (the SuperLink answers for
    # it), 4's ClientApp crashed, 5 never answers.
    grid = _Grid([_answer(1), _answer(2),
                  _error(3, ErrorCode.NODE_UNAVAILABLE, from_superlink=True),
                  _error(4, ErrorCode.CLIENT_APP_CRASHED)])
    send = RoundSender()
    send.round = 7

    # Execute
    answered = send(grid, [_sent(n) for n in range(1, 6)], 30.0, "training round 7")

    # Assert
    assert [m.metadata.src_node_id for m in answered] == [1, 2]
    assert grid.timeouts == [30.0]
    lost = send.take_lost()
    assert [(x["node_id"], x["round"]) for x in lost] == [(3, 7), (4, 7), (5, 7)]
    assert lost[0]["reason"].startswith("node unavailable")
    assert "crashed" in lost[1]["reason"]
    assert lost[2]["reason"] == "no reply within round_timeout=30.0s"
    assert send.take_lost() == []  # taken once


@pytest.mark.parametrize("code", [ErrorCode.CLIENT_APP_RAISED_EXCEPTION,
                                  ErrorCode.LOAD_CLIENT_APP_EXCEPTION, ErrorCode.UNKNOWN])
def test_a_client_whose_app_raised_stops_the_run(code):
    grid = _Grid([_answer(1), _error(2, code)])
    expected = r"(?s)1 client\(s\) failed during training.*node 2: why"
    with pytest.raises(ClientFailedError, match=expected):
        RoundSender()(grid, [_sent(1), _sent(2)], 5.0, "training round 1")


def test_nothing_to_send_sends_nothing():
    grid = _Grid([])
    assert RoundSender()(grid, [], 5.0, "evaluation round 1") == []
    assert grid.timeouts == []
