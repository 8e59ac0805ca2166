"""The real server loop, strategies and ClientApp in one process (no Ray): 3 clients x 2 rounds.

DP-SGD at the sites plus client-level DP at the server. Client 0 is a simulated
adversary that sends NaN: its updates are rejected, the rounds go on with the
others, and its privacy charges (both levels) still count.
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
                                    "adversary=nan", "adversary.num_clients=1",
                                    "privacy=sample_client", "privacy.client_noise_multiplier=0.8",
                                    "privacy.client_clipping_norm=2.0"])
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
    from safetensors.torch import load_file

    weights = load_file(str(path / "model.safetensors"))
    assert all(bool(w.isfinite().all()) for w in weights.values())  # no NaN got through


def test_a_rejected_update_is_still_charged_in_the_server_ledger(run):
    path, _, _ = run
    with Ledger.open(path / "ledger.sqlite", create=False) as ledger:
        rows = ledger.rows()
    # 3 sites x 2 rounds at each level, the adversary's included: its update left the
    # site, and its absence from the sum is part of the client-level release.
    for level in ("sample", "client"):
        assert sorted((r.charge.site, r.charge.round) for r in rows
                      if r.charge.level == level) == [
            (f"client-{c}", rnd) for c in range(3) for rnd in (1, 2)]


def test_client_level_epsilon_is_no_lower_than_dp_accountings_from_the_ledger(run):
    # Prepare: the recorded client-level releases, read back from the server's ledger.
    import dp_accounting
    from dp_accounting.pld import pld_privacy_accountant

    path, summary, rounds = run
    with Ledger.open(path / "ledger.sqlite", create=False) as ledger:
        rows = [r.charge for r in ledger.rows(level="client")]

    # Execute: an independent accountant (Google's PLD) per site. The server's fixed-size
    # sampling has no Poisson guarantee, so each row is an unsampled Gaussian mechanism.
    recomputed = {}
    for site in {c.site for c in rows}:
        acc = pld_privacy_accountant.PLDAccountant()
        for c in (c for c in rows if c.site == site):
            assert c.sampling in ("none", "shuffle") and c.steps == 1
            acc.compose(dp_accounting.GaussianDpEvent(c.noise_multiplier))
        recomputed[site] = acc.get_epsilon(summary["delta"])

    assert {c.noise_multiplier for c in rows} == {0.8} and {c.clipping_norm for c in rows} == {2.0}
    assert summary["epsilon_client_level"] >= max(recomputed.values()) - 1e-9
    assert rounds[-1]["epsilon_client_level"] == summary["epsilon_client_level"]
    assert rounds[0]["client_level"]["sampled"] == 3
    assert rounds[0]["client_level"]["replied"] == 2  # the NaN reply never reached the sum


def test_the_run_audits_clean_with_the_servers_own_client_level_rows(run):
    from privacy.audit import audit_run

    path, summary, _ = run
    report = audit_run(path)

    assert report.ok, [f for f in report.findings if f.severity == "error"]
    levels = {s.site: s.levels for s in report.sites}
    assert set(levels) == {"client-0", "client-1", "client-2"}
    # The audit's own RDP recomputation of the client level matches the run's report.
    assert max(lv["client"]["rdp"] for lv in levels.values()) == pytest.approx(
        summary["epsilon_client_level"], rel=1e-6)


def test_each_rounds_eps_max_is_every_sites_epsilon_so_far_recomputed(tmp_path):
    # Half the sites train each round (seed 12: in round 3 the site with the most
    # charges sits out): a round's eps_max must still cover the sites
    # charged in earlier rounds only. Recomputed here with Opacus' RDP accountant from
    # the server ledger's rows up to that round.
    from opacus.accountants import RDPAccountant

    path = tmp_path / "run"
    cfg, resolved = compose_config(["train.rounds=3", "simulation.num_clients=4", "train.seed=12",
                                    "strategy.fraction_train=0.5",
                                    "strategy.min_train_clients=2",
                                    "privacy.accountant=rdp", "output.progress=false"])
    run_in_process(cfg, path, resolved)
    rounds = [json.loads(ln) for ln in (path / "metrics.jsonl").read_text().splitlines()]
    with Ledger.open(path / "ledger.sqlite", create=False) as ledger:
        rows = [r.charge for r in ledger.rows(level="sample")]
    assert len(rounds) == 3
    assert len({c.site for c in rows}) > 2  # not the same two sites every round
    lead_elsewhere = 0
    for r in rounds:
        per_site = {}
        for site in {c.site for c in rows if c.round <= r["round"]}:
            acc = RDPAccountant()
            acc.history = [(c.noise_multiplier, c.sample_rate, c.steps) for c in rows
                           if c.site == site and c.round <= r["round"]]
            per_site[site] = acc.get_epsilon(cfg.privacy.delta)
        assert r["epsilon_sample_level_max"] == pytest.approx(max(per_site.values()), rel=1e-6)
        this_round = {c.site for c in rows if c.round == r["round"]}
        lead_elsewhere += max(per_site.values()) > max(per_site[s] for s in this_round)
    assert lead_elsewhere  # a round where the largest ε belongs to a site not in it


def test_clients_read_their_data_from_the_servers_cut_which_is_removed_after(tmp_path):
    # Prepare: a worker cache of this test's own, which the in-process clients use
    from clients.cache import WorkerCache, use_worker_cache
    from server.app import CLIENT_CUT_DIR

    cfg, resolved = compose_config(["train.rounds=2", "simulation.num_clients=4",
                                    "privacy.accountant=rdp", "output.progress=false"])
    cache = WorkerCache()
    # Execute
    with use_worker_cache(cache):
        run_in_process(cfg, tmp_path / "run", resolved)
    # Assert: every training and evaluation call's data came from the cut; it is gone
    assert cache.cut_reads >= 4
    assert cache.stats()["data"].misses == 0  # no pool was loaded and cut in the worker
    assert not (tmp_path / "run" / CLIENT_CUT_DIR).exists()
