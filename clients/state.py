"""Who and where a site is, and its privacy history (its own ledger).

A site's privacy state is its ledger, ``STATE_DIR/ledger.sqlite``: every
release it ever made, across rounds, restarts and runs. The σ of a run is read
back from that run's first charge, so a restarted client keeps the noise it was
calibrated with. The state folder is the node config's ``state-dir`` (a real
site); in a simulation the server names one folder per client under the run
directory (``site-state-root``).
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from pathlib import Path

from flwr.app import ConfigRecord, Context

from clients.config import ConfigError
from clients.records import integer
from privacy import GaussianRelease
from privacy.ledger import LEDGER_FILE, Ledger

__all__ = ["Site", "site_of", "run_history", "site_history"]

STATE_ROOT_KEY = "site-state-root"


@dataclass(frozen=True)
class Site:
    name: str
    partition_id: int
    num_partitions: int
    state_dir: Path
    epsilon_cap: float | None  # the site's own cap (node config ``epsilon-cap``)
    device: str

    def ledger(self) -> Ledger:
        return Ledger.open(self.state_dir / LEDGER_FILE)


def _node_cap(value: object) -> float | None:
    if value is None or value == "":
        return None
    try:
        cap = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        cap = math.nan
    if not (math.isfinite(cap) and cap > 0):
        raise ConfigError(f"node config epsilon-cap={value!r}: must be a number > 0")
    return cap


def site_of(context: Context, config: ConfigRecord | None = None) -> Site:
    """The site this ClientApp runs at, from its node config (and the server's root)."""
    cfg = context.node_config
    if "partition-id" not in cfg or "num-partitions" not in cfg:
        raise ConfigError(
            "node config must set 'partition-id' and 'num-partitions' "
            f"(got keys {sorted(cfg)})"
        )
    pid, num = integer(cfg, "partition-id"), integer(cfg, "num-partitions")
    name = str(cfg.get("site-name") or f"client-{pid}")
    if cfg.get("state-dir"):
        state_dir = Path(str(cfg["state-dir"])).expanduser()
    elif config is not None and config.get(STATE_ROOT_KEY):
        state_dir = Path(str(config[STATE_ROOT_KEY])) / name
    else:
        raise ConfigError(
            "no state folder for the site's privacy ledger: set 'state-dir' in the node "
            "config (a deployed site) or let the server send 'site-state-root' (simulation)"
        )
    return Site(name, pid, num, state_dir, _node_cap(cfg.get("epsilon-cap")),
                str(cfg.get("device", "auto")))


def run_history(ledger: Ledger, run_id: str, site: str,
                level: str = "sample") -> tuple[float | None, list[GaussianRelease]]:
    """(σ of this run's first charge, or ``None``; this run's releases at ``level``)."""
    rows = ledger.rows(run_id=run_id, site=site, level=level)
    sigma = rows[0].charge.noise_multiplier if rows else None
    return sigma, [r.charge.release() for r in rows]


def site_history(ledger: Ledger, site: str) -> list[GaussianRelease]:
    """Every release the site ever made (all runs, all levels): what its cap bounds."""
    return [r.charge.release() for r in ledger.rows(site=site)]
