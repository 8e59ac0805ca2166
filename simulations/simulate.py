"""``fedpriv simulate``: a local federated simulation through hydra.

hydra composes ``conf/`` (overrides, ``--multirun`` sweeps, ``hydra.run.dir``
work as usual); the config is validated before Ray or Flower start; then
Flower's simulation engine runs the ServerApp and ClientApp on Ray.
"""

from __future__ import annotations

import os
import sys
from typing import Any

import hydra
from hydra.core.hydra_config import HydraConfig
from omegaconf import DictConfig

from clients.config import ConfigError
from server.app import CONF_DIR
from server.config import RunConfig
from server.console import remove_log_handler, route_logs_to_file
from server.rundir import RunDir

__all__ = ["run_simulation_from_config", "hydra_main"]


def _backend_config(cfg: RunConfig) -> dict[str, Any]:
    init_args: dict[str, Any] = {"logging_level": "ERROR", "log_to_driver": False,
                                 "include_dashboard": False}
    init_args.update(cfg.simulation.init_args)
    return {
        "client_resources": {"num_cpus": cfg.simulation.num_cpus,
                             "num_gpus": cfg.simulation.num_gpus},
        "init_args": init_args,
    }


def run_simulation_from_config(cfg: RunConfig, run_dir: RunDir, resolved_yaml: str) -> None:
    """Run the whole simulation; raises if any client or the server failed."""
    from flwr.simulation import run_simulation

    from clients.app import app as client_app
    from server.app import make_server_app

    # Ray prints a FutureWarning about GPU env vars on every start unless told.
    os.environ.setdefault("RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO", "0")
    handler = route_logs_to_file(run_dir.path)
    try:
        run_simulation(
            server_app=make_server_app(cfg, run_dir, resolved_yaml),
            client_app=client_app,
            num_supernodes=cfg.simulation.num_clients,
            backend_name=cfg.simulation.backend,
            backend_config=_backend_config(cfg),  # type: ignore[arg-type]
        )
    finally:
        remove_log_handler(handler)


@hydra.main(config_path=str(CONF_DIR), config_name="config", version_base="1.3")
def hydra_main(dc: DictConfig) -> None:
    from server.app import to_run_config

    try:
        cfg, resolved = to_run_config(dc)
    except ConfigError as ex:
        print(f"fedpriv: invalid configuration: {ex}", file=sys.stderr)
        sys.exit(2)
    run_dir = RunDir(HydraConfig.get().runtime.output_dir, tensorboard=cfg.output.tensorboard)
    print(f"fedpriv: run directory {run_dir.path}")
    run_simulation_from_config(cfg, run_dir, resolved)
