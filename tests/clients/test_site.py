"""The train handler at one site: caps, declines, charges and restarts, without Flower's engine."""

import time

import pytest
from flwr.app import ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message.message import make_message

from clients.app import train
from clients.config import ConfigError, flatten
from clients.models import build_model
from clients.state import site_of
from privacy import epsilon
from privacy.ledger import LEDGER_FILE, Ledger
from server.app import compose_config

RUN_ID = 11


@pytest.fixture(scope="module")
def task():
    # RDP keeps calibration cheap; 3 rounds of 1 epoch.
    cfg, _ = compose_config(["train.rounds=3", "privacy.accountant=rdp"])
    return cfg, flatten(cfg.task)


def _message(cfg, flat, rnd, **extra):
    model = build_model(cfg.model, (1, 8, 8), 10, seed=0)
    config = ConfigRecord({**flat, "lr": 0.5, "num-threads": 1, "server-round": rnd, **extra})
    meta = Metadata(run_id=RUN_ID, message_id=f"m{rnd}", src_node_id=0, dst_node_id=1,
                    reply_to_message_id="", group_id=str(rnd), created_at=time.time(),
                    ttl=3600, message_type="train")
    return make_message(meta, RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                          "config": config}))


def _context(node_config):
    return Context(run_id=RUN_ID, node_id=1, node_config=node_config, state=RecordDict(),
                   run_config={})


def _rows(state_dir):
    with Ledger.open(state_dir / LEDGER_FILE, create=False) as ledger:
        return ledger.rows()


def test_state_dir_and_cap_come_from_the_node_config(tmp_path):
    node = {"partition-id": 1, "num-partitions": 3, "state-dir": str(tmp_path / "site"),
            "epsilon-cap": "2.5", "site-name": "hospital-b"}
    site = site_of(_context(node), ConfigRecord({"site-state-root": str(tmp_path / "srv")}))
    assert site.state_dir == tmp_path / "site"  # the server's root never overrides the site
    assert site.epsilon_cap == 2.5 and site.name == "hospital-b"


@pytest.mark.parametrize("cap", ["0", "-1", "nan", "inf", "lots"])
def test_a_bad_node_cap_is_refused(tmp_path, cap):
    node = {"partition-id": 0, "num-partitions": 1, "state-dir": str(tmp_path),
            "epsilon-cap": cap}
    with pytest.raises(ConfigError, match="epsilon-cap"):
        site_of(_context(node))


def test_a_site_without_a_state_folder_is_refused():
    with pytest.raises(ConfigError, match="state-dir"):
        site_of(_context({"partition-id": 0, "num-partitions": 1}))


def test_charges_before_release_and_resumes_after_a_restart(task, tmp_path):
    cfg, flat = task
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path)}

    # Execute: round 1 in one process, round 2 after a "restart" (a fresh Context).
    reply1 = train(_message(cfg, flat, 1), _context(node))
    reply2 = train(_message(cfg, flat, 2), _context(node))

    rows = _rows(tmp_path)
    assert [r.charge.round for r in rows] == [1, 2]
    # The reply names the committed row it was charged under.
    for reply, row in zip((reply1, reply2), rows, strict=True):
        assert reply.content["ledger"]["hash"] == row.hash
        assert reply.content["ledger"]["seq"] == row.seq
    # The restarted client kept the σ it was calibrated with, and its ε is cumulative.
    sigma = rows[0].charge.noise_multiplier
    assert rows[1].charge.noise_multiplier == sigma
    q, steps = rows[0].charge.sample_rate, rows[0].charge.steps
    expected = epsilon(history=[(sigma, q, 2 * steps)], delta=1e-5, accountant="rdp")
    assert reply2.content["metrics"]["epsilon"] == pytest.approx(expected, rel=1e-9)
    assert rows[1].charge.epsilon_reported == pytest.approx(expected, rel=1e-9)


def test_a_site_declines_a_round_its_cap_cannot_pay_for(task, tmp_path):
    cfg, flat = task
    # Prepare: one round costs well over 0.5 at the calibrated σ (ε ≈ 3 over 3 rounds).
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path),
            "epsilon-cap": 0.5}

    reply = train(_message(cfg, flat, 1), _context(node))

    assert reply.content["status"]["status"] == "budget_exhausted"
    assert reply.content["status"]["binding-cap"] == "site"
    assert "arrays" not in reply.content  # nothing derived from the data left the site
    assert reply.content["metrics"]["epsilon-after"] > 0.5
    assert _rows(tmp_path) == []  # and nothing was charged


def test_the_server_can_lower_a_cap_but_not_raise_it(task, tmp_path):
    cfg, flat = task
    node = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path),
            "epsilon-cap": 0.5}
    # A generous server-side cap does not lift the site's own 0.5 ...
    generous = {**flat, "privacy.site_epsilon_cap": [100.0]}
    reply = train(_message(cfg, generous, 1), _context(node))
    assert reply.content["status"]["status"] == "budget_exhausted"
    # ... while a tight global cap binds a site with no cap of its own.
    tight = {**flat, "privacy.epsilon_cap": 0.5}
    uncapped = {"partition-id": 0, "num-partitions": 3, "state-dir": str(tmp_path / "b")}
    reply = train(_message(cfg, tight, 1), _context(uncapped))
    assert reply.content["status"]["binding-cap"] == "global"
