"""Run a real simulation and record every reply a site sends (for test_site_messages.py).

Usage: ``python tests/e2e/record_replies.py OUT_DIR HYDRA_OVERRIDE...``

The ServerApp is fedpriv's own (``server.app.serve``) with one change: its
Grid is wrapped so that each reply that reaches the server is described in
``OUT_DIR/replies.json`` (and each message the server sent, for
comparison) — per record: its kind, keys, and for arrays their
shapes and dtypes, for metrics and configs their values. The ClientApp is
``clients.app.app``, unchanged, on Flower's Ray simulation engine.
"""

from __future__ import annotations

import json
import sys
from collections.abc import Iterable
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(REPO))


def describe(message: Any) -> dict[str, Any]:
    from flwr.app import ArrayRecord, ConfigRecord, MetricRecord

    out: dict[str, Any] = {"type": message.metadata.message_type, "records": {}}
    if message.has_error():
        out["error"] = message.error.reason
        return out
    for name, record in message.content.items():
        if isinstance(record, ArrayRecord):
            out["records"][name] = {"kind": "arrays", "arrays": {
                k: {"shape": list(a.shape), "dtype": a.dtype} for k, a in record.items()}}
        elif isinstance(record, MetricRecord):
            out["records"][name] = {"kind": "metrics", "values": dict(record)}
        elif isinstance(record, ConfigRecord):
            out["records"][name] = {"kind": "config", "values": {
                k: (v.hex() if isinstance(v, bytes) else v) for k, v in record.items()}}
        else:
            out["records"][name] = {"kind": type(record).__name__}
    return out


def main(out_dir: str, overrides: list[str]) -> None:
    from flwr.serverapp import Grid, ServerApp
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import compose_config, serve
    from server.rundir import RunDir
    from simulations.simulate import _backend_config
    from strategies.budget import _EligibleGrid

    out = Path(out_dir)
    cfg, resolved = compose_config(overrides)
    seen: list[dict[str, Any]] = []
    sent: list[dict[str, Any]] = []

    class RecordingGrid(_EligibleGrid):
        def push_messages(self, messages: Iterable[Any]) -> Iterable[str]:
            messages = list(messages)
            ids = list(super().push_messages(messages))
            sent.extend(describe(m) for m in messages)  # their ids are set by the push
            return ids

        def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Any]:
            replies = list(super().pull_messages(message_ids))
            seen.extend(describe(m) for m in replies)
            return replies

    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Any) -> None:
        serve(RecordingGrid(grid, set()), cfg, RunDir(out / "run"), resolved)

    run_simulation(server_app=server_app, client_app=client_app,
                   num_supernodes=cfg.simulation.num_clients, backend_name="ray",
                   backend_config=_backend_config(cfg))  # type: ignore[arg-type]
    (out / "replies.json").write_text(json.dumps({"sent": sent, "replies": seen}, indent=1))


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
