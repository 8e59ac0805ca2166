"""The server ledger with client-level and local DP: what it mirrors and what it charges."""

import time

import pytest
from flwr.app import ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from privacy import epsilon
from server.ledger import ServerLedger


def _charge(node, level, sigma, relation="add_remove"):
    return ConfigRecord({"site": f"client-{node}", "hash": "cd" * 32, "seq": 2, "run_id": "7",
                         "round": 1, "level": level, "noise_multiplier": sigma,
                         "clipping_norm": 1.0, "sample_rate": 1.0, "steps": 1, "delta": 1e-5,
                         "sampling": "none", "relation": relation, "noise_generator": "t"})


def _reply(node, **records):
    metrics = MetricRecord({"num-examples": 10, "client": node, "noise_multiplier": 0.0,
                            "sample_rate": 1.0, "steps": 0})
    meta = Metadata(run_id=7, message_id=f"r{node}", src_node_id=node, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60,
                    message_type="train")
    return make_message(meta, RecordDict({"metrics": metrics, **records}))


@pytest.fixture
def ledger(tmp_path):
    server = ServerLedger(tmp_path / "ledger.sqlite")
    yield server
    server.close()


def test_a_local_charge_is_mirrored_and_a_reply_without_one_is_expected_only_without_site_levels(
        ledger):
    local = _reply(1, ledger=_charge(1, "local", 4.0, "replace_one"))
    bare = _reply(2, site=ConfigRecord({"site": "client-2"}))

    kept, rejected = ledger.mirror([local, bare], 1)  # a site-level run: a charge is required
    kept_off, rejected_off = ledger.mirror([bare], 2, site_levels=False)

    assert [m.metadata.src_node_id for m in kept] == [1]
    assert [r["node_id"] for r in rejected] == [2] and "ledger" in rejected[0]["reason"]
    assert [m.metadata.src_node_id for m in kept_off] == [2] and rejected_off == []
    [row] = ledger.ledger.rows()
    assert (row.charge.level, row.charge.relation, row.charge.site) == ("local", "replace_one",
                                                                        "client-1")


def test_sample_and_local_charges_of_one_reply_are_both_mirrored(ledger):
    both = _reply(1, ledger=_charge(1, "sample", 0.0 + 1.5), **{
        "ledger-local": _charge(1, "local", 4.0, "replace_one")})
    both.content["metrics"]["noise_multiplier"] = 1.5
    both.content["metrics"]["steps"] = 1

    kept, rejected = ledger.mirror([both], 1)

    assert len(kept) == 1 and rejected == []
    assert sorted(r.charge.level for r in ledger.ledger.rows()) == ["local", "sample"]


def test_client_level_releases_are_charged_per_site_and_composed(ledger):
    for rnd in (1, 2, 3):
        ledger.record_client_level(run_id="7", server_round=rnd, sites=["b", "a", "a"],
                                   noise_multiplier=2.0, clipping_norm=1.0, sample_rate=1.0,
                                   delta=1e-5, noise_generator="t", accountant="rdp")

    rows = ledger.ledger.rows(level="client")
    assert [(r.charge.site, r.charge.round) for r in rows] == [
        ("a", 1), ("b", 1), ("a", 2), ("b", 2), ("a", 3), ("b", 3)]
    assert {r.charge.sampling for r in rows} == {"none"}
    # The last claim is three rounds composed (Opacus RDP, the run's accountant here).
    assert rows[-1].charge.epsilon_reported == pytest.approx(
        epsilon(history=[(2.0, 1.0, 3)], delta=1e-5, accountant="rdp"))
    assert ledger.per_site(1e-5, "rdp", level="client")["a"] == pytest.approx(
        rows[-1].charge.epsilon_reported)
