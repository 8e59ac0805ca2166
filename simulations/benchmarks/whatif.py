"""fedpriv's simulation without its worker cache: the reference for the fix.

Runs what ``fedpriv simulate`` runs (the same composed config, ServerApp, run
directory and Flower's Ray backend) except that each message is handled with a
worker cache that keeps nothing (``clients.cache.WorkerCache.disabled()``): the
client loads and cuts the data, calibrates σ and asks the accountant for ε in
every call, as fedpriv did before the cache. The cache changes no value, so the
run directory and ledgers are what ``fedpriv simulate`` writes.

Run as ``python -m simulations.benchmarks.whatif RUN_DIR [HYDRA OVERRIDES…]``.
"""

from __future__ import annotations

import os
import sys
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

__all__ = ["client_app", "main"]


class _UncachedClientApp(ClientApp):
    """fedpriv's own ClientApp (every message type it handles), its worker cache off."""

    def __call__(self, message: Message, context: Context) -> Message:
        from clients.app import app as fedpriv_app
        from clients.cache import WorkerCache, use_worker_cache

        with use_worker_cache(WorkerCache.disabled()):
            return fedpriv_app(message, context)


client_app = _UncachedClientApp()


def main(run_dir: str, overrides: list[str]) -> None:
    from flwr.simulation import run_simulation

    from server.app import compose_config, make_server_app
    from server.console import remove_log_handler, route_logs_to_file
    from server.rundir import RunDir
    from simulations.simulate import _backend_config

    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    cfg, resolved = compose_config(overrides)
    rd = RunDir(Path(run_dir), tensorboard=False)
    handler = route_logs_to_file(rd.path)
    try:
        run_simulation(server_app=make_server_app(cfg, rd, resolved), client_app=client_app,
                       num_supernodes=cfg.simulation.num_clients,
                       backend_name=cfg.simulation.backend,
                       backend_config=_backend_config(cfg))  # type: ignore[arg-type]
    finally:
        remove_log_handler(handler)


if __name__ == "__main__":
    main(sys.argv[1], sys.argv[2:])
