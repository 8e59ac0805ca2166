"""The whole run's configuration: the client task plus server-side sections.

Built once from hydra's composed config with :func:`load_run_config`, which
checks every key and cross-checks sections, so a bad value fails before any
process starts, naming the key and the value.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from clients.audit import check_audit
from clients.config import (
    AdversaryConfig,
    AuditConfig,
    ClientTask,
    ConfigError,
    DatasetConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    build,
    require,
)
from strategies import STRATEGY_BUILDERS, STRATEGY_PARAMS, Sampling, build_strategy

__all__ = ["StrategyConfig", "SimulationConfig", "OutputConfig", "RunConfig", "load_run_config"]

STRATEGIES = tuple(STRATEGY_BUILDERS)
# Strategies whose aggregate is the (equally weighted) mean: client-level DP covers them.
CLIENT_DP_STRATEGIES = ("fedavg", "fedprox")


@dataclass(frozen=True)
class StrategyConfig:
    """Aggregation (``flwr.serverapp.strategy``) and client sampling per round.

    ``ema`` > 0 keeps an exponential moving average of the global models
    (weight ``ema`` on the past); central evaluation and the saved model use
    it. Clients still train from the plain aggregate. It only post-processes
    released updates, so it costs no privacy.

    Strategy parameters (each used only by the strategies named):
    ``proximal_mu`` (fedprox); ``server_lr``, ``beta_1``, ``beta_2``, ``tau``
    (fedadam, fedyogi); ``trim_beta`` (fedtrimmedavg); ``num_malicious_nodes``
    (multikrum, bulyan) and ``num_nodes_to_select`` (multikrum, 0 = n − f).

    ``max_update_norm``: updates (reply − global model) with a larger L2 norm
    are rejected before aggregation (``strategies.validation``); ``None``: no
    bound. Non-finite values and wrong keys, shapes or dtypes are always
    rejected.
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    round_timeout: float = 600.0
    ema: float = 0.0
    proximal_mu: float = 0.01
    server_lr: float = 0.01
    beta_1: float = 0.9
    beta_2: float = 0.99
    tau: float = 1e-3
    trim_beta: float = 0.2
    num_malicious_nodes: int = 0
    num_nodes_to_select: int = 0
    max_update_norm: float | None = None

    def __post_init__(self) -> None:
        require(0 <= self.ema < 1, "strategy.ema", self.ema, "must be in [0, 1)")
        require(self.name in STRATEGIES, "strategy.name", self.name,
                 f"unknown strategy; choose one of {list(STRATEGIES)}")
        require(0 < self.fraction_train <= 1, "strategy.fraction_train", self.fraction_train,
                 "must be in (0, 1]")
        require(0 <= self.fraction_evaluate <= 1, "strategy.fraction_evaluate",
                 self.fraction_evaluate, "must be in [0, 1]")
        require(self.min_train_clients >= 1, "strategy.min_train_clients",
                 self.min_train_clients, "must be >= 1")
        require(self.min_evaluate_clients >= 0, "strategy.min_evaluate_clients",
                 self.min_evaluate_clients, "must be >= 0")
        require(self.round_timeout > 0, "strategy.round_timeout", self.round_timeout,
                 "must be > 0 seconds")
        if self.max_update_norm is not None:
            require(0 < self.max_update_norm < math.inf, "strategy.max_update_norm",
                    self.max_update_norm, "must be a finite number > 0 (or null: no bound)")

    def sampling(self, num_clients: int) -> Sampling:
        return Sampling(fraction_train=self.fraction_train,
                        fraction_evaluate=self.fraction_evaluate,
                        min_train_clients=self.min_train_clients,
                        min_evaluate_clients=self.min_evaluate_clients,
                        num_clients=num_clients)

    @property
    def params(self) -> dict[str, Any]:
        """This strategy's own parameters, by builder keyword."""
        return {k: getattr(self, k) for k in STRATEGY_PARAMS[self.name]}


@dataclass(frozen=True)
class SimulationConfig:
    """Flower's simulation engine: how many virtual clients and their resources.

    ``init_args`` go to ``ray.init`` (e.g. ``{address: auto}`` to join a
    running Ray cluster).
    """

    num_clients: int = 3
    backend: str = "ray"
    num_cpus: float = 1.0
    num_gpus: float = 0.0
    init_args: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        require(self.num_clients >= 1, "simulation.num_clients", self.num_clients,
                 "must be >= 1")
        require(self.backend == "ray", "simulation.backend", self.backend,
                 "only 'ray' is supported")
        require(self.num_cpus > 0, "simulation.num_cpus", self.num_cpus, "must be > 0")
        require(self.num_gpus >= 0, "simulation.num_gpus", self.num_gpus, "must be >= 0")


@dataclass(frozen=True)
class OutputConfig:
    """What the run directory gets besides the fixed contract."""

    tensorboard: bool = False
    progress: bool = True


@dataclass(frozen=True)
class RunConfig:
    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    strategy: StrategyConfig = field(default_factory=StrategyConfig)
    simulation: SimulationConfig = field(default_factory=SimulationConfig)
    output: OutputConfig = field(default_factory=OutputConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)

    def __post_init__(self) -> None:
        n = self.simulation.num_clients
        s = self.strategy
        require(s.min_train_clients <= n, "strategy.min_train_clients", s.min_train_clients,
                 f"more clients sampled per round than exist (simulation.num_clients={n})")
        require(s.min_evaluate_clients <= n, "strategy.min_evaluate_clients",
                 s.min_evaluate_clients,
                 f"more clients sampled per round than exist (simulation.num_clients={n})")
        levels = list(self.privacy.levels)
        require("client" not in levels or s.name in CLIENT_DP_STRATEGIES, "privacy.levels",
                levels, f"client-level DP with strategy={s.name} is unsound: its noise is "
                "calibrated for the mean of the clipped updates (sensitivity C/m), and "
                f"{s.name}'s aggregate is not that mean (a robust aggregate moves by up to C "
                "when one site changes; fedadam/fedyogi apply their optimizer before the "
                f"noise); use one of {list(CLIENT_DP_STRATEGIES)}, or sample/local DP")
        a = self.adversary
        require(a.num_clients <= n, "adversary.num_clients", a.num_clients,
                f"more adversaries than clients (simulation.num_clients={n})")
        check_audit(self.task, n)
        flwr_log = logging.getLogger("flwr")
        level = flwr_log.level
        flwr_log.setLevel(logging.ERROR)  # a trial build: no "evaluation skipped" warning
        try:  # the builders check their parameters against the round's sample size
            build_strategy(s.name, s.sampling(n), s.params)
        except ValueError as ex:
            raise ConfigError(f"strategy.{ex} (strategy={s.name})") from ex
        finally:
            flwr_log.setLevel(level)

    @property
    def task(self) -> ClientTask:
        return ClientTask(dataset=self.dataset, model=self.model, train=self.train,
                          privacy=self.privacy, adversary=self.adversary, audit=self.audit)


def load_run_config(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain nested mapping.

    Site files: every listed file must exist, one client runs per file
    (``simulation.num_clients`` follows ``dataset.sites``), and a schema left
    empty is read once from the first file, so that every site validates its
    data against the same one.
    """
    data = _with_site_files(dict(data))
    cfg = build(RunConfig, data)
    _check_models(cfg)
    return cfg


def _with_site_files(data: dict[str, Any]) -> dict[str, Any]:
    from clients.config import FILE_FORMATS

    ds = dict(data.get("dataset") or {})
    if ds.get("name") not in FILE_FORMATS:
        return data
    sites = list(ds.get("sites") or [])
    require(bool(sites), "dataset.sites", sites,
            "list one site file per client, e.g. dataset.sites='[a.csv,b.csv]'")
    for path in [*sites, *([ds["test_path"]] if ds.get("test_path") else [])]:
        require(Path(str(path)).expanduser().exists(), "dataset.sites", path,
                "no such file or directory")
    if not ds.get("labels") or not (ds.get("features") or ds.get("input_shape")):
        ds.update(_inferred_schema(ds, str(sites[0])))
    sim = dict(data.get("simulation") or {})
    sim["num_clients"] = len(sites)
    return {**data, "dataset": ds, "simulation": sim}


def _inferred_schema(ds: Mapping[str, Any], first: str) -> dict[str, Any]:
    from clients.loaders import LoaderError, infer_schema

    try:
        schema = infer_schema(first, str(ds["name"]), label_column=str(ds.get("label_column",
                                                                              "label")),
                              labels=list(ds["labels"]) if ds.get("labels") else None)
    except LoaderError as ex:
        raise ConfigError(f"dataset.sites[0]={first!r}: cannot read a schema from it: "
                          f"{ex}") from ex
    if schema.kind == "image":
        return {"labels": list(schema.labels), "input_shape": list(schema.input_shape),
                "features": []}
    return {"labels": list(schema.labels), "features": list(schema.features), "input_shape": []}


def _check_models(cfg: RunConfig) -> None:
    """The model must exist and pass Opacus' ModuleValidator before round 1."""
    from clients.models import build_model, check_dp_compatible
    from clients.preprocess import PreprocessError
    from clients.sitedata import input_shape_of, task_schema

    if cfg.dataset.is_files:
        try:
            task_schema(cfg.dataset)
        except ValueError as ex:
            raise ConfigError(f"dataset schema: {ex}") from ex
    try:
        shape, num_classes = input_shape_of(cfg.dataset)
    except PreprocessError as ex:
        raise ConfigError(f"dataset.preprocess: {ex}") from ex
    model = build_model(cfg.model, shape, num_classes)
    check_dp_compatible(model, cfg.model.name)
