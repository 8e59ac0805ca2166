"""End to end: ``fedpriv deploy-local`` — a real TLS + SuperNode-auth deployment.

Starts ``flower-superlink`` and three ``flower-supernode``s on loopback, submits
the app with ``flwr run`` and checks the run directory, both ledgers, the audit,
and that nothing it started is left running.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
import time
from pathlib import Path

import pytest

from server.deploy import Deployment, _exe, _free_port, deploy_local

BIN = Path(sys.executable).parent
SITES, ROUNDS = 3, 2

# The summary.json keys the README's run-directory table names (federated
# statistics only appear when that round runs).
SUMMARY_KEYS = {
    "rounds", "rounds_completed", "stop_reason", "stop_detail", "num_clients", "accuracy",
    "f1_macro", "roc_auc_ovr", "delta", "target_epsilon", "epsilon_sample_level_max",
    "epsilon_per_client", "epsilon_total_per_client", "epsilon_caps", "updates_rejected",
    "accountant", "sampling", "noise_generators", "ledger", "wall_seconds",
}  # fmt: skip


def _table_rows(db: Path) -> dict[str, int]:
    with sqlite3.connect(db) as con:
        tables = [r[0] for r in con.execute("select name from sqlite_master where type='table'")]
        return {t: con.execute(f'select count(*) from "{t}"').fetchone()[0] for t in tables}


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="Flower not installed")
def test_deploy_local_runs_a_real_deployment(tmp_path: Path) -> None:
    from server.audit import main as audit

    dep = Deployment(tmp_path)
    t0 = time.monotonic()
    try:
        run_dir = deploy_local(sites=SITES, rounds=ROUNDS, workdir=tmp_path, deployment=dep,
                               timeout=900)
    finally:
        survivors = dep.alive()
    print(f"deploy-local {SITES} sites x {ROUNDS} rounds: {time.monotonic() - t0:.0f}s")
    assert not survivors, f"processes left running: {survivors}"

    assert run_dir == tmp_path / "run"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert SUMMARY_KEYS <= summary.keys(), SUMMARY_KEYS - summary.keys()
    assert summary["stop_reason"] == "completed"
    assert summary["rounds_completed"] == ROUNDS
    assert 0.0 <= summary["accuracy"] <= 1.0
    assert sorted(summary["epsilon_per_client"]) == [f"site-{i}" for i in range(SITES)]
    for name in ("metrics.jsonl", "ledger.sqlite", "model.safetensors"):
        assert (run_dir / name).is_file(), name
    rounds = [json.loads(x) for x in (run_dir / "metrics.jsonl").read_text().splitlines() if x]
    assert [r["round"] for r in rounds] == list(range(1, ROUNDS + 1))

    server_rows = _table_rows(run_dir / "ledger.sqlite")
    assert SITES * ROUNDS in server_rows.values(), server_rows
    for i in range(SITES):
        site_rows = _table_rows(tmp_path / "sites" / f"site-{i}" / "ledger.sqlite")
        assert ROUNDS in site_rows.values(), (i, site_rows)

    assert audit([str(run_dir)]) == 0


@pytest.mark.slow
@pytest.mark.skipif(not (BIN / "flower-superlink").exists(), reason="Flower not installed")
def test_a_supernode_with_an_unregistered_key_is_refused(tmp_path: Path) -> None:
    from server.health import wait_healthy
    from server.keys import make_keys

    keys = make_keys(tmp_path / "keys", ["site-a"])
    dep = Deployment(tmp_path)
    port, health = _free_port(), f"127.0.0.1:{_free_port()}"
    try:
        dep.start("superlink", [
            _exe("flower-superlink"),
            "--ssl-ca-certfile", str(keys.ca_cert), "--ssl-certfile", str(keys.server_cert),
            "--ssl-keyfile", str(keys.server_key), "--enable-supernode-auth",
            "--database", str(tmp_path / "superlink.db"), "--isolation", "process",
            "--port", str(port), "--health-server-address", health,
        ])  # fmt: skip
        wait_healthy(health, timeout=90, interval=0.3)
        node = dep.start("supernode-site-a", [
            _exe("flower-supernode"), "--superlink", f"127.0.0.1:{port}",
            "--root-certificates", str(keys.ca_cert),
            "--auth-supernode-private-key", str(keys.site_keys["site-a"][0]),
            "--isolation", "process", "--port", str(_free_port()), "--max-retries", "1",
        ])  # fmt: skip
        try:
            rc = node.wait(timeout=90)
        except subprocess.TimeoutExpired:
            pytest.fail("an unregistered SuperNode was not refused within 90s")
    finally:
        dep.stop()
    assert rc != 0
    assert "Failed to activate SuperNode" in (dep.logs / "supernode-site-a.log").read_text()
    assert not dep.alive()
