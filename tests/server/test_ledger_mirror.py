"""The server's ledger: mirroring what sites report, rejecting what cannot be true."""

import math
import time

import pytest
from flwr.app import ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from privacy import epsilon
from server.ledger import ServerLedger


def _reply(node, *, sigma=1.2, q=0.25, steps=4, eps=None, site=None, drop=None, lie_steps=None):
    metrics = {"num-examples": 431, "client": node, "noise_multiplier": sigma,
               "sample_rate": q, "steps": steps, "delta": 1e-5, "max_grad_norm": 1.0,
               "epsilon": eps if eps is not None else 1.0, "epsilon-cap": -1.0}
    # The site's committed charge, as clients.records.charge_record sends it.
    info = {"site": site or f"client-{node}", "hash": "ab" * 32, "seq": 1, "run_id": "7",
            "round": 1, "level": "sample", "noise_multiplier": sigma, "clipping_norm": 1.0,
            "sample_rate": q, "steps": steps, "delta": 1e-5,
            "noise_generator": "torch-mt19937: test", "sampling": "poisson",
            "relation": "add_remove", "accountant": "rdp", "num_records": 431,
            "epsilon_reported": metrics["epsilon"]}
    if lie_steps is not None:  # the ledger row says fewer steps than were trained
        info["steps"] = lie_steps
    content = {"metrics": MetricRecord(metrics), "ledger": ConfigRecord(info)}
    if drop:
        del content[drop]
    meta = Metadata(run_id=7, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60,
                    message_type="train")
    return make_message(meta, RecordDict(content))


@pytest.fixture
def ledger(tmp_path):
    server = ServerLedger(tmp_path / "ledger.sqlite")
    yield server
    server.close()


def test_good_reports_are_mirrored_and_bad_ones_rejected_with_the_reason(ledger):
    # Prepare: one honest reply and three that cannot be charged.
    replies = [_reply(1), _reply(2, sigma=0.0), _reply(3, eps=math.nan), _reply(4, drop="ledger"),
               _reply(5, lie_steps=1)]

    kept, rejected = ledger.mirror(replies, server_round=1)

    assert [m.metadata.src_node_id for m in kept] == [1]
    reasons = {r["node_id"]: r["reason"] for r in rejected}
    assert set(reasons) == {2, 3, 4, 5}
    assert "noise_multiplier=0.0" in reasons[2]
    assert "epsilon_reported=nan" in reasons[3]
    assert "ledger" in reasons[4]
    assert "steps=4" in reasons[5] and "says 1" in reasons[5]
    # Node 5's charge is valid, and its update left the site: the cost is mirrored even
    # though the update is not aggregated. Invalid charges (2, 3) and none (4) cannot be.
    rows = ledger.ledger.rows()
    assert [r.charge.site for r in rows] == ["client-1", "client-5"]
    assert rows[0].charge.source == "client-1#1:" + "ab" * 32
    assert rows[1].charge.steps == 1


def test_per_site_epsilon_is_the_larger_of_claim_and_recomputation(ledger):
    honest = epsilon(history=[(1.2, 0.25, 8)], delta=1e-5, accountant="rdp")
    # Site a under-claims in round 2, site b over-claims: the server keeps the larger.
    ledger.mirror([_reply(1, site="a", eps=0.1), _reply(2, site="b", eps=50.0)], 1)
    ledger.mirror([_reply(1, site="a", eps=0.2), _reply(2, site="b", eps=60.0)], 2)

    per_site = ledger.per_site(1e-5, "rdp")

    assert per_site["a"] == pytest.approx(honest, rel=1e-9)
    assert per_site["b"] == 60.0
