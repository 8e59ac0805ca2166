"""fedpriv's simulation with the suggested client fixes patched in: a measurement only.

Runs what ``fedpriv simulate`` runs (the same composed config, ServerApp, run
directory and Flower's Ray backend) except that each client worker wraps
fedpriv's own ClientApp (every handler) with three memos
(:func:`simulations.benchmarks.client_profile.fixes`): the bundled data pool
and its partition cut, σ calibration, and ε of a history. Each is a pure
function of its key, so nothing that is charged or accounted changes; the run
directory and ledgers are written as usual.

Flower pickles the ClientApp with every message (``vce_api`` and
``ray_actor.run``), so nothing attached to it survives between calls; what
outlives a call in a worker process is what its modules hold. Here that is
:data:`WORKER_FIXES`, created when a worker first imports this module and
kept for the worker's life. This is the shape the suggested fix would take in
``clients.app``: one explicit, documented object per worker process.

Run as ``python -m simulations.benchmarks.whatif RUN_DIR [HYDRA OVERRIDES…]``.
"""

from __future__ import annotations

import os
import sys
from contextlib import ExitStack
from pathlib import Path

from flwr.app import Context, Message
from flwr.clientapp import ClientApp

__all__ = ["WorkerFixes", "client_app", "main"]


class WorkerFixes:
    """The memos of one worker process, installed on first use and kept for its life."""

    def __init__(self) -> None:
        self._stack: ExitStack | None = None

    def install(self) -> None:
        if self._stack is None:
            from simulations.benchmarks.client_profile import fixes

            stack = ExitStack()
            stack.enter_context(fixes("all three"))
            self._stack = stack


WORKER_FIXES = WorkerFixes()


class _PatchedClientApp(ClientApp):
    """fedpriv's own ClientApp (every message type it handles), fixes installed first."""

    def __call__(self, message: Message, context: Context) -> Message:
        from clients.app import app as fedpriv_app

        WORKER_FIXES.install()
        return fedpriv_app(message, context)


client_app = _PatchedClientApp()


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
