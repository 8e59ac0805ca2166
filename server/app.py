"""The fedpriv ServerApp.

``fedpriv simulate`` builds the config with hydra and hands it to
:func:`make_server_app`; ``flwr run .`` loads :data:`app`, which composes the
same ``conf/`` with the same hydra defaults (plus the overrides in the run
config key ``fedpriv.overrides``). Both end in :func:`server.loop.run_federation`.
"""

from __future__ import annotations

import logging
import shlex
import shutil
import time
from pathlib import Path
from typing import Any

from flwr.app import Context
from flwr.serverapp import Grid, ServerApp
from omegaconf import DictConfig, OmegaConf

from clients.config import ConfigError
from server.config import RunConfig, load_run_config
from server.console import RoundReporter, remove_log_handler, route_logs_to_file
from server.loop import run_federation
from server.rundir import RunDir

__all__ = ["CONF_DIR", "app", "compose_config", "quote_group_choices", "to_run_config",
           "make_server_app", "serve"]

CONF_DIR = Path(__file__).resolve().parents[1] / "conf"

# Config-group options whose names hydra's override grammar reads as something else.
_LITERAL_OPTIONS = {"adversary=nan": "adversary='nan'"}


def quote_group_choices(overrides: list[str]) -> list[str]:
    """``adversary=nan`` as hydra must read it (its grammar turns ``nan`` into a float)."""
    return [_LITERAL_OPTIONS.get(o, o) for o in overrides]


def to_run_config(dc: DictConfig) -> tuple[RunConfig, str]:
    """Validate a composed hydra config; return it typed, and as resolved YAML."""
    container = OmegaConf.to_container(dc, resolve=True)
    if not isinstance(container, dict):
        raise ConfigError(f"config root={container!r}: expected a mapping")
    data: dict[str, Any] = {str(k): v for k, v in container.items() if k != "hydra"}
    return load_run_config(data), OmegaConf.to_yaml(OmegaConf.create(data))


def compose_config(overrides: list[str]) -> tuple[RunConfig, str]:
    """Compose ``conf/`` with hydra's defaults and ``overrides`` (no run dir)."""
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    GlobalHydra.instance().clear()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return to_run_config(compose(config_name="config",
                                     overrides=quote_group_choices(overrides)))


# How often the server looks for replies in a simulation. Flower's in-process grid
# sleeps 0.1 s between looks, so every round waited 0.05 s on average after its last
# reply (a tenth of a round of the default task); a look is a dictionary lookup.
SIMULATION_PULL_INTERVAL_S = 0.005
# Where a simulation's server saves every client's data for the workers (removed at the end).
CLIENT_CUT_DIR = "client-data"


def serve(grid: Grid, cfg: RunConfig, run_dir: RunDir, resolved_yaml: str) -> dict[str, Any]:
    from flwr.superlink.grid import InMemoryGrid

    from clients.allocator import keep_freed_memory

    keep_freed_memory()  # the central evaluation's activations, reused batch to batch
    if isinstance(grid, InMemoryGrid):
        grid.pull_interval = min(grid.pull_interval, SIMULATION_PULL_INTERVAL_S)
    run_dir.write_config(resolved_yaml)
    if not cfg.dataset.is_files:
        # Simulated clients cut a bundled data set: show how (counts, class mix).
        from server.partition_report import partition_report, write_partition_report

        write_partition_report(run_dir.path, partition_report(
            cfg.dataset, cfg.simulation.num_clients, cfg.train.seed))
    cut = None
    local = isinstance(grid, InMemoryGrid) or getattr(grid, "clients_on_this_machine", False)
    if local and not cfg.dataset.is_files and not cfg.dataset.preprocess:
        # Simulated clients on this machine (Ray's workers): cut their data once, here.
        from clients.data import cut_clients, save_cut

        cut = (run_dir.path / CLIENT_CUT_DIR).resolve()
        save_cut(cut_clients(cfg.dataset, cfg.simulation.num_clients, cfg.train.seed), cut)
    reporter = RoundReporter(cfg.train.rounds, enabled=cfg.output.progress)
    try:
        return run_federation(grid, cfg, run_dir, reporter, client_cut=cut)
    finally:
        run_dir.close()
        if cut is not None:
            shutil.rmtree(cut, ignore_errors=True)  # a copy of bundled data: not kept


def make_server_app(cfg: RunConfig, run_dir: RunDir, resolved_yaml: str) -> ServerApp:
    """A ServerApp bound to an already validated config (the hydra entry point)."""
    server_app = ServerApp()

    @server_app.main()
    def _main(grid: Grid, context: Context) -> None:
        serve(grid, cfg, run_dir, resolved_yaml)

    return server_app


app = ServerApp()


@app.main()
def main(grid: Grid, context: Context) -> None:
    """Entry point for ``flwr run .``.

    This runs inside the SuperLink's ``flwr-simulation`` process, whose working
    directory is wherever the background SuperLink was first started; a relative
    ``fedpriv.run-dir`` (and the default) resolves against that, so the absolute
    path is printed (``flwr run --stream`` / ``flwr log`` show it).
    """
    overrides = shlex.split(str(context.run_config.get("fedpriv.overrides", "")))
    cfg, resolved = compose_config(overrides)
    path = str(context.run_config.get("fedpriv.run-dir", "")) or str(
        Path("outputs") / "flwr" / time.strftime("%Y-%m-%d_%H-%M-%S")
    )
    run_dir = RunDir(Path(path).expanduser().resolve(), tensorboard=cfg.output.tensorboard)
    print(f"fedpriv: run directory {run_dir.path}", flush=True)
    handler = route_logs_to_file(run_dir.path)
    # The root logger is now at INFO; under a SuperLink, httpx would log every
    # log-upload request, and those lines are themselves uploaded (a feedback loop).
    logging.getLogger("httpx").setLevel(logging.WARNING)
    try:
        serve(grid, cfg, run_dir, resolved)
    finally:
        remove_log_handler(handler)
