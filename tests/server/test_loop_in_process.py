"""The real server loop, strategies and ClientApp in one process (no Ray): 3 clients x 2 rounds.

Client 0 is a simulated adversary that sends NaN: its updates are rejected, the
rounds go on with the others, and its privacy charges still count.
"""

import json

import pytest

from privacy.ledger import Ledger
from server.app import compose_config
from simulations.inprocess import run_in_process

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    path = tmp_path_factory.mktemp("inprocess") / "run"
    cfg, resolved = compose_config(["train.rounds=2", "simulation.num_clients=3",
                                    "privacy.accountant=rdp", "output.progress=false",
                                    "adversary=nan", "adversary.num_clients=1"])
    summary = run_in_process(cfg, path, resolved)
    rounds = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]
    return path, summary, rounds


def test_a_nan_update_is_rejected_each_round_and_the_round_goes_on(run):
    path, summary, rounds = run
    assert summary["stop_reason"] == "completed" and summary["rounds_completed"] == 2
    for r in rounds:
        [rejected] = r["rejected"]
        assert (rejected["client"], rejected["site"], rejected["check"]) == (0, "client-0",
                                                                            "nonfinite")
        assert "NaN" in rejected["reason"]
        assert sorted(c["client"] for c in r["clients"]) == [1, 2]  # aggregated
    assert summary["updates_rejected"] == 2
    assert summary["rejections_per_client"] == {"client-0": {"nonfinite": 2}}
    assert summary["accuracy"] > 0.3  # the honest clients' model, not NaN


def test_a_rejected_update_is_still_charged_in_the_server_ledger(run):
    path, _, _ = run
    with Ledger.open(path / "ledger.sqlite", create=False) as ledger:
        rows = ledger.rows()
    # 3 sites x 2 rounds, the adversary's included: its update left the site.
    assert sorted((r.charge.site, r.charge.round) for r in rows) == [
        (f"client-{c}", rnd) for c in range(3) for rnd in (1, 2)]
