"""audit= config checks, canary assignment, the canary clients' bits, and the server's
canary collector on hand-built replies (no Flower run)."""

import json
import time

import numpy as np
import pytest
from flwr.app import ArrayRecord, ConfigRecord, Metadata, MetricRecord, RecordDict
from flwr.app.message.message import make_message

from clients.app import derive_seed
from clients.audit import (
    CANARY_RECORD,
    canary_ids,
    canary_record,
    client_membership,
    site_canaries,
)
from clients.config import ConfigError
from server.app import compose_config
from server.empirical import CanaryAudit
from server.ledger import ServerLedger
from server.strategy import build_stack


@pytest.mark.parametrize("mode", ["ghost", "functorch", "ew"])
def test_sample_audit_needs_hooks_and_fails_before_anything_starts(mode):
    with pytest.raises(ConfigError) as info:
        compose_config(["audit=sample", f"privacy.grad_sample_mode={mode}"])
    assert f"privacy.grad_sample_mode='{mode}'" in str(info.value)
    assert "audit=sample needs 'hooks'" in str(info.value)


def test_sample_audit_accepts_the_default_auto_mode():
    cfg, _ = compose_config(["audit=sample"])
    assert cfg.privacy.grad_sample_mode == "auto"  # the default is accepted


@pytest.mark.parametrize("override,needle", [
    ("audit.num_canaries=50", "audit.num_canaries=50: too few for the guessing rules"),
    ("audit.significance=1.5", "audit.significance=1.5: must be in (0, 1)"),
])
def test_bad_audit_values_are_named(override, needle):
    with pytest.raises(ConfigError, match=needle.replace("(", r"\(").replace(")", r"\)")):
        compose_config(["audit=sample", override])


def test_the_default_run_has_no_audit():
    cfg, _ = compose_config([])
    assert (cfg.audit.name, cfg.audit.num_canaries, cfg.audit.significance) == ("none", 1000,
                                                                              0.05)


def test_canaries_go_round_robin_to_the_sites():
    assert [canary_ids(10, 3, p).tolist() for p in range(3)] == [[0, 3, 6, 9], [1, 4, 7],
                                                                 [2, 5, 8]]
    with pytest.raises(ValueError, match="partition_id=3"):
        canary_ids(10, 3, 3)


def _reply(client, block):
    content = {"arrays": ArrayRecord(), "metrics": MetricRecord({"client": client}),
               "ledger": ConfigRecord({"site": f"client-{client}"})}
    if block is not None:
        content[CANARY_RECORD] = canary_record(np.asarray(block, dtype=float))
    meta = Metadata(run_id=1, message_id=f"r{client}", src_node_id=client + 1, dst_node_id=0,
                    reply_to_message_id="x", group_id="1", created_at=time.time(), ttl=60,
                    message_type="train")
    return make_message(meta, RecordDict(content))


def test_blocks_are_taken_out_of_the_replies_and_scored_per_round_rate(tmp_path):
    # Prepare: m = 100 over 2 sites (50 each); two rounds at lr 0.5 and 0.25.
    cfg, _ = compose_config(["audit=sample", "audit.num_canaries=100",
                             "simulation.num_clients=2"])
    audit = CanaryAudit(cfg)
    blocks = {0: [np.linspace(-1, 0, 50), np.full(50, -0.25)], 1: [np.zeros(50), np.ones(50)]}

    # Execute
    for rnd, lr in ((1, 0.5), (2, 0.25)):
        replies = [_reply(c, blocks[c][rnd - 1]) for c in (0, 1)]
        audit.collect(rnd, lr, replies)
        assert all(CANARY_RECORD not in r.content for r in replies)  # never aggregated
    ledger = ServerLedger(tmp_path / "ledger.sqlite")
    try:
        lb = audit.finish(ledger, tmp_path)
    finally:
        ledger.close()
    doc = json.loads((tmp_path / "audit_empirical.json").read_text())

    # Assert: score_j = -(block_r1 / 0.5 + block_r2 / 0.25) at canary j = 2k + site.
    scores = np.array(doc["scores"])
    np.testing.assert_allclose(scores[0::2], -(np.linspace(-1, 0, 50) / 0.5 - 1.0))
    np.testing.assert_allclose(scores[1::2], np.full(50, -4.0))
    bits = np.array(doc["membership"])
    for p in (0, 1):
        assert bits[p::2].tolist() == site_canaries(cfg.task, p, 2).membership.astype(
            int).tolist()
    assert doc["epsilon_lb"] == lb and doc["m"] == 100
    assert [s["rounds"] for s in doc["sites"]] == [[1, 2], [1, 2]]
    assert doc["claimed_epsilon"] is None  # nothing charged in this ledger


def test_a_reply_without_its_block_is_left_out(tmp_path, caplog):
    cfg, _ = compose_config(["audit=sample", "audit.num_canaries=100",
                             "simulation.num_clients=2"])
    audit = CanaryAudit(cfg)

    audit.collect(1, 0.5, [_reply(0, None), _reply(1, np.zeros(7))])

    assert all(not s.blocks for s in audit.sites.values())
    assert "no canary block" in caplog.text and "canary block of 7 values" in caplog.text


def test_without_an_audit_nothing_is_collected_or_written(tmp_path):
    cfg, _ = compose_config([])
    audit = CanaryAudit(cfg)
    reply = _reply(0, np.zeros(3))

    audit.collect(1, 0.5, [reply])

    assert CANARY_RECORD in reply.content
    assert audit.finish(None, tmp_path) is None
    assert not (tmp_path / "audit_empirical.json").exists()


@pytest.mark.parametrize("privacy", ["sample", "local", "sample_local"])
def test_client_audit_needs_client_level_dp(privacy):
    with pytest.raises(ConfigError) as info:
        compose_config(["audit=client", f"privacy={privacy}"])
    assert "audit.name='client'" in str(info.value)
    assert "has none; use privacy=client, sample_client or client_local" in str(info.value)


@pytest.mark.parametrize("privacy", ["client", "local", "client_local"])
def test_sample_audit_needs_sample_level_dp(privacy):
    with pytest.raises(ConfigError) as info:
        compose_config(["audit=sample", f"privacy={privacy}"])
    assert "audit.name='sample'" in str(info.value)
    assert "has no sample level" in str(info.value)


@pytest.mark.parametrize("privacy,audit", [("client", "client"), ("sample_client", "client"),
                                           ("client_local", "client"),
                                           ("sample_client", "sample"),
                                           ("sample_local", "sample")])
def test_sound_audit_and_privacy_pairs_are_accepted(privacy, audit):
    cfg, _ = compose_config([f"audit={audit}", f"privacy={privacy}"])
    assert (cfg.audit.name, audit in cfg.privacy.levels) == (audit, True)


def test_canary_clients_draw_their_bits_from_the_run_seed_on_the_server():
    # Prepare
    cfg, _ = compose_config(["privacy=client", "audit=client", "audit.num_canaries=400"])
    other, _ = compose_config(["privacy=client", "audit=client", "audit.num_canaries=400",
                               "train.seed=1"])

    # Execute
    bits = client_membership(cfg.task)

    # Assert: (run seed, "audit", "client"); about half in; no site gets any.
    expected = np.random.default_rng(derive_seed(0, "audit", "client")).random(400) < 0.5
    np.testing.assert_array_equal(bits, expected)
    assert 150 < bits.sum() < 250
    assert not np.array_equal(bits, client_membership(other.task))
    assert all(site_canaries(cfg.task, p, 3) is None for p in range(3))
    assert build_stack(cfg).client_dp.canaries.tolist() == bits.tolist()
