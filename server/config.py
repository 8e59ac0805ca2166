"""The whole run's configuration: the client task plus server-side sections.

Built once from hydra's composed config with :func:`load_run_config`, which
checks every key and cross-checks sections, so a bad value fails before any
process starts, naming the key and the value.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from clients.config import (
    ClientTask,
    DatasetConfig,
    ModelConfig,
    PrivacyConfig,
    TrainConfig,
    build,
    require,
)

__all__ = ["StrategyConfig", "SimulationConfig", "OutputConfig", "RunConfig", "load_run_config"]

STRATEGIES = ("fedavg",)


@dataclass(frozen=True)
class StrategyConfig:
    """Aggregation (``flwr.serverapp.strategy``) and client sampling per round.

    ``ema`` > 0 keeps an exponential moving average of the global models
    (weight ``ema`` on the past); central evaluation and the saved model use
    it. Clients still train from the plain aggregate. It only post-processes
    released updates, so it costs no privacy.
    """

    name: str = "fedavg"
    fraction_train: float = 1.0
    fraction_evaluate: float = 1.0
    min_train_clients: int = 2
    min_evaluate_clients: int = 2
    round_timeout: float = 600.0
    ema: float = 0.0

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

    def __post_init__(self) -> None:
        n = self.simulation.num_clients
        s = self.strategy
        require(s.min_train_clients <= n, "strategy.min_train_clients", s.min_train_clients,
                 f"more clients sampled per round than exist (simulation.num_clients={n})")
        require(s.min_evaluate_clients <= n, "strategy.min_evaluate_clients",
                 s.min_evaluate_clients,
                 f"more clients sampled per round than exist (simulation.num_clients={n})")

    @property
    def task(self) -> ClientTask:
        return ClientTask(dataset=self.dataset, model=self.model, train=self.train,
                          privacy=self.privacy)


def load_run_config(data: Mapping[str, Any]) -> RunConfig:
    """Build and validate a :class:`RunConfig` from a plain nested mapping."""
    cfg = build(RunConfig, data)
    _check_models(cfg)
    return cfg


def _check_models(cfg: RunConfig) -> None:
    """The model must exist and pass Opacus' ModuleValidator before round 1."""
    from clients.data import load_bundled
    from clients.models import build_model, check_dp_compatible

    data = load_bundled(cfg.dataset.name)
    model = build_model(cfg.model, tuple(data.x.shape[1:]), data.num_classes)  # type: ignore[arg-type]
    check_dp_compatible(model, cfg.model.name)
