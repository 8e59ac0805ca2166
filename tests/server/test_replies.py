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
    """Replies wait until pulled; ``calls`` keeps the order of pushes and pulls."""

    pull_interval = 0.01

    def __init__(self, replies):
        self.replies = list(replies)
        self.calls = []

    def push_messages(self, messages):
        self.calls.append("push")
        return [m.metadata.message_id for m in messages]

    def pull_messages(self, message_ids):
        self.calls.append("pull")
        ids = set(message_ids)
        got = [r for r in self.replies if r.metadata.reply_to_message_id in ids]
        self.replies = [r for r in self.replies if r not in got]
        return got


def test_unavailable_crashed_and_silent_nodes_are_lost_and_the_others_answer():
    # Prepare: 5 nodes; 1 and 2 answer, 3 is unavailable (the SuperLink answers for
    # it), 4's ClientApp crashed, 5 never answers.
    grid = _Grid([_answer(1), _answer(2),
                  _error(3, ErrorCode.NODE_UNAVAILABLE, from_superlink=True),
                  _error(4, ErrorCode.CLIENT_APP_CRASHED)])
    send = RoundSender()
    send.round = 7

    # Execute
    t0 = time.monotonic()
    answered = send(grid, [_sent(n) for n in range(1, 6)], 0.3, "training round 7")

    # Assert
    assert [m.metadata.src_node_id for m in answered] == [1, 2]
    assert 0.3 <= time.monotonic() - t0 < 5  # waited out the timeout for node 5, no longer
    assert grid.calls[0] == "push" and grid.calls.count("pull") > 1
    lost = send.take_lost()
    assert [(x["node_id"], x["round"]) for x in lost] == [(3, 7), (4, 7), (5, 7)]
    assert lost[0]["reason"].startswith("node unavailable")
    assert "crashed" in lost[1]["reason"]
    assert lost[2]["reason"] == "no reply within round_timeout=0.3s"
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
    assert grid.calls == []


def test_meanwhile_runs_after_the_push_and_before_the_replies_are_pulled():
    grid = _Grid([_answer(1), _answer(2)])
    done = []
    answered = RoundSender()(grid, [_sent(1), _sent(2)], 5.0, "training round 2",
                             meanwhile=lambda: done.append(list(grid.calls)))
    assert done == [["push"]]
    assert [m.metadata.src_node_id for m in answered] == [1, 2]
    assert grid.calls == ["push", "pull"]  # all in at the first pull: no waiting


def test_meanwhile_runs_when_nothing_is_sent():
    # The bookkeeping of the round before must not be skipped by an empty round.
    done = []
    assert RoundSender()(_Grid([]), [], 5.0, "training round 3",
                         meanwhile=lambda: done.append(1)) == []
    assert done == [1]


def test_the_timeout_counts_from_the_push_not_from_the_end_of_meanwhile():
    grid = _Grid([])
    t0 = time.monotonic()
    RoundSender()(grid, [_sent(1)], 0.3, "training round 4", meanwhile=lambda: time.sleep(0.3))
    assert time.monotonic() - t0 < 0.5
    assert grid.calls == ["push", "pull"]  # one look after meanwhile: the deadline had passed
