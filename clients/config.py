"""Typed, frozen configuration for what a client needs to train.

The server composes these with its own sections (strategy, simulation) into a
``RunConfig``; the client receives the flattened task in each round's
``ConfigRecord`` and rebuilds the same dataclasses with :func:`from_flat`.
Every value is checked when its dataclass is built, and an error names the
dotted key and the offending value.
"""

from __future__ import annotations

import dataclasses
import json
import math
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, TypeVar

__all__ = [
    "ConfigError",
    "DatasetConfig",
    "ModelConfig",
    "TrainConfig",
    "PrivacyConfig",
    "AdversaryConfig",
    "AuditConfig",
    "ClientTask",
    "build",
    "flatten",
    "from_flat",
    "require",
]

T = TypeVar("T")

BUNDLED_DATASETS = ("digits", "mnist5k", "fashion-mnist", "breast-cancer")
FILE_FORMATS = ("csv", "parquet", "npz", "idx", "images")
PARTITIONERS = ("iid", "dirichlet", "pathological", "shard")
LR_SCHEDULES = ("constant", "step", "cosine")
ACCOUNTANTS = ("rdp", "prv")
NOISE_GENERATORS = ("torch", "secure")
GRAD_SAMPLE_MODES = ("auto", "hooks", "functorch", "ghost", "ew")
PRIVACY_LEVELS = ("sample", "client", "local")
ATTACKS = ("none", "sign_flip", "scale", "gaussian", "nan", "label_flip")
AUDITS = ("none", "sample", "client")


class ConfigError(ValueError):
    """A configuration value is invalid; the message names the key and value."""


def require(ok: bool, key: str, value: Any, why: str) -> None:
    """Raise :class:`ConfigError` naming ``key`` and ``value`` unless ``ok``."""
    if not ok:
        raise ConfigError(f"{key}={value!r}: {why}")


@dataclass(frozen=True)
class DatasetConfig:
    """Which data, how the server's test set and clients' data are cut and prepared.

    Attributes
    ----------
    name : a bundled data set (``digits``, ``mnist5k``, ``fashion-mnist``,
        ``breast-cancer``) or a site-file format (``csv``, ``parquet``, ``npz``,
        ``idx``, ``images``): then each client reads its own file(s).
    test_fraction : bundled data: share held out by the server for central
        evaluation; no client ever trains on it.
    val_fraction : share of each client's data kept for local validation.
    partitioner : bundled data: ``iid``, ``dirichlet`` (``alpha``),
        ``pathological`` (``classes_per_client``) or ``shard``
        (``shards_per_client``), all flwr-datasets partitioners.
    sites : site files, one client per entry (simulation over site files); a
        deployed site names its own with ``data-path``/``data-format`` in its
        node config instead.
    test_path : site files: a held-out file the server evaluates on (optional).
    label_column, features, labels, input_shape : the task schema shared by
        server and clients (``clients.schema``); left empty, it is read from
        the first site file once, by the server, and sent to every client.
    preprocess : the ordered preprocessing steps (``clients.preprocess``).
    """

    name: str = "digits"
    test_fraction: float = 0.2
    val_fraction: float = 0.1
    partitioner: str = "iid"
    alpha: float = 0.5
    min_partition_size: int = 10
    classes_per_client: int = 2
    shards_per_client: int = 2
    sites: Any = ()
    test_path: str = ""
    label_column: str = "label"
    features: Any = ()
    labels: Any = ()
    input_shape: Any = ()
    preprocess: Any = ()

    def __post_init__(self) -> None:
        require(self.name in BUNDLED_DATASETS + FILE_FORMATS, "dataset.name", self.name,
                 f"unknown data set; choose one of {list(BUNDLED_DATASETS + FILE_FORMATS)}")
        require(0.0 < self.test_fraction < 1.0, "dataset.test_fraction",
                 self.test_fraction, "must be in (0, 1)")
        require(0.0 <= self.val_fraction < 1.0, "dataset.val_fraction",
                 self.val_fraction, "must be in [0, 1)")
        require(self.partitioner in PARTITIONERS, "dataset.partitioner", self.partitioner,
                 f"unknown partitioner; choose one of {list(PARTITIONERS)}")
        require(self.alpha > 0, "dataset.alpha", self.alpha, "must be > 0")
        require(self.min_partition_size >= 1, "dataset.min_partition_size",
                 self.min_partition_size, "must be >= 1")
        require(self.classes_per_client >= 1, "dataset.classes_per_client",
                 self.classes_per_client, "must be >= 1")
        require(self.shards_per_client >= 1, "dataset.shards_per_client",
                 self.shards_per_client, "must be >= 1")
        object.__setattr__(self, "sites", _strings("dataset.sites", self.sites))
        object.__setattr__(self, "features", _strings("dataset.features", self.features))
        object.__setattr__(self, "labels", _tuple("dataset.labels", self.labels))
        shape = _tuple("dataset.input_shape", self.input_shape)
        require(all(isinstance(d, int) and d > 0 for d in shape), "dataset.input_shape",
                self.input_shape, "must be a list of positive integers, e.g. [1, 28, 28]")
        object.__setattr__(self, "input_shape", shape)
        object.__setattr__(self, "preprocess", _steps(self.preprocess))

    @property
    def is_files(self) -> bool:
        """Each client reads its own site file(s) (rather than a bundled partition)."""
        return self.name in FILE_FORMATS


def _tuple(key: str, value: Any) -> tuple[Any, ...]:
    if value is None:
        return ()
    if isinstance(value, str):
        value = json.loads(value) if value.startswith("[") else [value]
    require(isinstance(value, (list, tuple)), key, value, "must be a list")
    return tuple(value)


def _strings(key: str, value: Any) -> tuple[str, ...]:
    items = _tuple(key, value)
    require(all(isinstance(v, str) and v for v in items), key, value,
            "must be a list of non-empty strings")
    return items


def _steps(value: Any) -> tuple[dict[str, Any], ...]:
    """``dataset.preprocess``: a list of ``{name: step, ...options}`` (JSON in a ConfigRecord)."""
    if isinstance(value, str):
        value = json.loads(value) if value else []
    items = _tuple("dataset.preprocess", value)
    for step in items:
        ok = isinstance(step, Mapping) and isinstance(step.get("name"), str)
        require(ok, "dataset.preprocess", step, "each step must be a mapping with a 'name'")
    return tuple(dict(step) for step in items)


@dataclass(frozen=True)
class ModelConfig:
    """A model from the registry (``clients.models``) and its sizes."""

    name: str = "mlp"
    hidden: int = 64
    channels: int = 16
    groups: int = 4
    dim: int = 32
    heads: int = 2
    layers: int = 1
    norm_groups: int = 0

    def __post_init__(self) -> None:
        from clients.models import MODELS  # the registry is the list of valid names

        require(self.name in MODELS, "model.name", self.name,
                 f"unknown model; choose one of {sorted(MODELS)}")
        for key in ("hidden", "channels", "groups", "dim", "heads", "layers"):
            value = getattr(self, key)
            require(value >= 1, f"model.{key}", value, "must be >= 1")
        require(self.norm_groups >= 0, "model.norm_groups", self.norm_groups,
                "must be >= 0 (0: no normalisation)")
        require(self.channels % self.groups == 0, "model.groups", self.groups,
                 f"must divide model.channels={self.channels}")
        require(self.dim % self.heads == 0, "model.heads", self.heads,
                 f"must divide model.dim={self.dim}")


@dataclass(frozen=True)
class TrainConfig:
    """The federated schedule and each client's local optimisation.

    ``lr_schedule`` sets the learning rate of round r (1-based) of ``rounds``:
    ``constant``; ``step`` (times ``lr_gamma`` every ``lr_step_rounds``);
    ``cosine`` (from ``lr`` down to ``lr_min``).
    """

    rounds: int = 10
    local_epochs: int = 1
    batch_size: int = 64
    lr: float = 0.5
    momentum: float = 0.0
    weight_decay: float = 0.0
    lr_schedule: str = "constant"
    lr_gamma: float = 0.5
    lr_step_rounds: int = 5
    lr_min: float = 0.0
    seed: int = 0

    def __post_init__(self) -> None:
        for key in ("rounds", "local_epochs", "batch_size", "lr_step_rounds"):
            value = getattr(self, key)
            require(value >= 1, f"train.{key}", value, "must be >= 1")
        require(self.lr > 0, "train.lr", self.lr, "must be > 0")
        require(0 <= self.momentum < 1, "train.momentum", self.momentum, "must be in [0, 1)")
        require(self.weight_decay >= 0, "train.weight_decay", self.weight_decay, "must be >= 0")
        require(self.lr_schedule in LR_SCHEDULES, "train.lr_schedule", self.lr_schedule,
                 f"choose one of {list(LR_SCHEDULES)}")
        require(0 < self.lr_gamma <= 1, "train.lr_gamma", self.lr_gamma, "must be in (0, 1]")
        require(0 <= self.lr_min <= self.lr, "train.lr_min", self.lr_min,
                 f"must be in [0, train.lr={self.lr}]")


@dataclass(frozen=True)
class PrivacyConfig:
    """Sample-level DP-SGD at each client (Opacus), and the caps on what a site spends.

    σ is calibrated once per client for the whole planned schedule so that its
    cumulative ε after the last round is at most ``target_epsilon`` at ``delta``
    (Abadi et al. 2016; accountant: Mironov 2017 RDP or Gopi et al. 2021 PRV).

    Caps (ε at ``delta``, with ``accountant``, over every release that touched
    a site's records): ``site_epsilon_cap`` is one number for every site or a
    list with one per client (simulation; a deployed site sets ``epsilon-cap``
    in its node config, and the tighter cap binds); ``epsilon_cap`` is a
    global cap no site may cross. A site whose next round would cross its cap
    declines the round instead of training.

    ``noise_generator``: ``torch`` (seeded, reproducible, not cryptographically
    secure) or ``secure`` (the OS CSPRNG; see :mod:`clients.noise`).

    ``levels``: which mechanisms run, any of ``sample`` (the above),
    ``client`` (client-level central DP: the server clips each site's update to
    ``client_clipping_norm`` and adds Gaussian noise with multiplier
    ``client_noise_multiplier``; ``strategies.client_dp``) and ``local`` (each
    site clips its update to ``local_clipping_norm`` and adds noise with
    multiplier ``local_noise_multiplier`` before it leaves; ``clients.local_dp``).
    Without ``sample``, sites train with plain SGD.
    """

    target_epsilon: float = 3.0
    delta: float = 1e-5
    max_grad_norm: float = 1.0
    accountant: str = "prv"
    grad_sample_mode: str = "auto"
    site_epsilon_cap: Any = None
    epsilon_cap: float | None = None
    noise_generator: str = "torch"
    levels: Any = ("sample",)
    client_noise_multiplier: float = 1.0
    client_clipping_norm: float = 1.0
    local_noise_multiplier: float = 1.0
    local_clipping_norm: float = 1.0

    def __post_init__(self) -> None:
        require(self.target_epsilon > 0, "privacy.target_epsilon", self.target_epsilon,
                 "must be > 0")
        require(0 < self.delta < 1, "privacy.delta", self.delta, "must be in (0, 1)")
        require(self.max_grad_norm > 0, "privacy.max_grad_norm", self.max_grad_norm,
                 "must be > 0")
        require(self.accountant in ACCOUNTANTS, "privacy.accountant", self.accountant,
                 f"choose one of {list(ACCOUNTANTS)}")
        require(self.grad_sample_mode in GRAD_SAMPLE_MODES, "privacy.grad_sample_mode",
                 self.grad_sample_mode, f"choose one of {list(GRAD_SAMPLE_MODES)}")
        require(self.noise_generator in NOISE_GENERATORS, "privacy.noise_generator",
                 self.noise_generator, f"choose one of {list(NOISE_GENERATORS)}")
        levels = _strings("privacy.levels", self.levels)
        require(bool(levels) and len(set(levels)) == len(levels)
                and set(levels) <= set(PRIVACY_LEVELS), "privacy.levels", list(levels),
                f"a non-empty list of distinct levels from {list(PRIVACY_LEVELS)}")
        object.__setattr__(self, "levels", levels)
        for key in ("client_noise_multiplier", "client_clipping_norm", "local_noise_multiplier",
                    "local_clipping_norm"):
            value = getattr(self, key)
            require(0 < value < math.inf, f"privacy.{key}", value, "must be a finite number > 0")
        caps = self.site_epsilon_cap
        if caps is not None:
            caps = tuple(caps) if isinstance(caps, (list, tuple)) else (caps,)
            for c in caps:
                ok = isinstance(c, (int, float)) and not isinstance(c, bool) and 0 < c < math.inf
                require(ok, "privacy.site_epsilon_cap", self.site_epsilon_cap,
                         "must be a number > 0 or a list of them (one per client)")
            require(len(caps) > 0, "privacy.site_epsilon_cap", self.site_epsilon_cap,
                    "an empty list caps nothing; leave it unset (null) instead")
            object.__setattr__(self, "site_epsilon_cap", tuple(float(c) for c in caps))
        if self.epsilon_cap is not None:
            require(0 < self.epsilon_cap < math.inf, "privacy.epsilon_cap", self.epsilon_cap,
                    "must be a finite number > 0")

    def site_cap(self, partition_id: int) -> float | None:
        """The configured cap of client ``partition_id`` (``None``: uncapped)."""
        caps = self.site_epsilon_cap
        if caps is None:
            return None
        if len(caps) == 1:
            return float(caps[0])
        if not 0 <= partition_id < len(caps):
            raise ConfigError(f"privacy.site_epsilon_cap={list(caps)}: no entry for client "
                              f"{partition_id}")
        return float(caps[partition_id])


@dataclass(frozen=True)
class AdversaryConfig:
    """Simulated Byzantine clients: the first ``num_clients`` partition ids attack.

    ``name``: ``none``; update attacks, applied to the trained update
    u = w − w_global before it is sent: ``sign_flip`` (sends −``flip_scale``·u;
    −4u is the sign-flipping attack of Li et al. 2019, RSA), ``scale`` (sends
    ``scale``·u), ``gaussian`` (sends N(0, ``noise_std``²) per coordinate
    instead of u), ``nan`` (sends NaN); or the data attack ``label_flip``
    (trains on label c − 1 − y). Simulation only: a deployed site refuses.
    """

    name: str = "none"
    num_clients: int = 0
    flip_scale: float = 4.0
    scale: float = 100.0
    noise_std: float = 1.0

    def __post_init__(self) -> None:
        require(self.name in ATTACKS, "adversary.name", self.name,
                f"unknown attack; choose one of {list(ATTACKS)}")
        require(self.num_clients >= 0, "adversary.num_clients", self.num_clients,
                "must be >= 0")
        require(self.name != "none" or self.num_clients == 0, "adversary.num_clients",
                self.num_clients, "no attack chosen (adversary=none); pick one, e.g. "
                "adversary=sign_flip")
        for key in ("flip_scale", "scale", "noise_std"):
            value = getattr(self, key)
            require(0 < value < math.inf, f"adversary.{key}", value, "must be a finite number > 0")

    def attacks(self, partition_id: int) -> bool:
        """Whether client ``partition_id`` is one of the adversaries."""
        return self.name != "none" and partition_id < self.num_clients


@dataclass(frozen=True)
class AuditConfig:
    """Empirical privacy audit with canaries (``clients.audit``, ``server.empirical``).

    ``name``: ``none``; ``sample`` (Dirac canaries inside each site's DP-SGD,
    Poisson-sampled like real records, before the noise); ``client`` (canary
    updates inside client-level DP). ``num_canaries``: m for the whole run.
    ``significance``: the lower bound on ε holds with probability
    ``1 - significance`` (``privacy.empirical.audit_from_scores``).
    """

    name: str = "none"
    num_canaries: int = 1000
    significance: float = 0.05

    def __post_init__(self) -> None:
        from privacy.empirical import DEFAULT_GUESS_FRACTIONS, guess_counts

        require(self.name in AUDITS, "audit.name", self.name,
                f"unknown audit; choose one of {list(AUDITS)}")
        require(0 < self.significance < 1, "audit.significance", self.significance,
                "must be in (0, 1)")
        try:  # the guessing rules need enough canaries to make a guess each
            guess_counts(self.num_canaries, DEFAULT_GUESS_FRACTIONS)
        except ValueError as ex:
            raise ConfigError(f"audit.num_canaries={self.num_canaries!r}: too few for the "
                              f"guessing rules ({ex})") from ex


@dataclass(frozen=True)
class ClientTask:
    """Everything the server tells a client about the task (sent every round)."""

    dataset: DatasetConfig = field(default_factory=DatasetConfig)
    model: ModelConfig = field(default_factory=ModelConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    privacy: PrivacyConfig = field(default_factory=PrivacyConfig)
    adversary: AdversaryConfig = field(default_factory=AdversaryConfig)
    audit: AuditConfig = field(default_factory=AuditConfig)


# The task's field types, resolved at import (``from __future__ import annotations``
# leaves them as strings): a client builds its task from every message it gets.
_TASK_FIELD_TYPES: dict[type, dict[str, Any]] = {
    cls: typing.get_type_hints(cls) for cls in (
        DatasetConfig, ModelConfig, TrainConfig, PrivacyConfig, AdversaryConfig, AuditConfig,
        ClientTask)
}


# --------------------------------------------------------------------------
# Generic building and flattening of nested frozen dataclasses
# --------------------------------------------------------------------------

def _check_type(key: str, value: Any, tp: Any) -> Any:
    """Coerce ints to floats where a float is declared; refuse other mismatches."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (dict, Mapping) or tp is dict:
        require(isinstance(value, Mapping), key, value, "must be a mapping")
        return dict(value)
    if origin in (list, tuple):
        require(isinstance(value, (list, tuple)), key, value, "must be a list")
        return tuple(value)
    if origin in (typing.Union, types.UnionType):
        args = [a for a in typing.get_args(tp) if a is not type(None)]
        if value is None:
            return None
        return _check_type(key, value, args[0])
    if tp is float:
        ok = isinstance(value, (int, float)) and not isinstance(value, bool)
        require(ok, key, value, "must be a number")
        return float(value)
    if tp is int:
        ok = isinstance(value, int) and not isinstance(value, bool)
        if isinstance(value, float) and value.is_integer():
            return int(value)
        require(ok, key, value, "must be an integer")
        return value
    if tp is bool:
        require(isinstance(value, bool), key, value, "must be true or false")
        return value
    if tp is str:
        require(isinstance(value, str), key, value, "must be a string")
        return value
    return value


def build(cls: type[T], data: Mapping[str, Any] | None, prefix: str = "") -> T:
    """Build the dataclass ``cls`` from a nested mapping, checking every key.

    Unknown keys and wrongly typed values raise :class:`ConfigError` naming
    the dotted key.
    """
    data = dict(data or {})
    hints = _TASK_FIELD_TYPES.get(cls) or typing.get_type_hints(cls)
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    unknown = sorted(set(data) - names)
    if unknown:
        key = f"{prefix}{unknown[0]}"
        raise ConfigError(f"{key}={data[unknown[0]]!r}: unknown key")
    kwargs: dict[str, Any] = {}
    for f in dataclasses.fields(cls):  # type: ignore[arg-type]
        if f.name not in data:
            continue
        tp = hints[f.name]
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(tp):
            kwargs[f.name] = build(tp, data[f.name], prefix=f"{key}.")  # type: ignore[arg-type]
        else:
            kwargs[f.name] = _check_type(key, data[f.name], tp)
    return cls(**kwargs)


def flatten(obj: Any, prefix: str = "") -> dict[str, Any]:
    """Flatten a nested dataclass into ``{"a.b": scalar}`` (mappings are skipped)."""
    out: dict[str, Any] = {}
    for f in dataclasses.fields(obj):
        value = getattr(obj, f.name)
        key = f"{prefix}{f.name}"
        if dataclasses.is_dataclass(value):
            out.update(flatten(value, prefix=f"{key}."))
        elif isinstance(value, (bool, int, float, str)):
            out[key] = value
        elif isinstance(value, tuple) and value and all(isinstance(v, float) for v in value):
            out[key] = list(value)  # a ConfigRecord holds lists of floats
        elif isinstance(value, tuple):
            # Lists of strings, ints, mixed labels, step mappings: one JSON string.
            out[key] = json.dumps(list(value))
    return out


def from_flat(cls: type[T], flat: Mapping[str, Any]) -> T:
    """Inverse of :func:`flatten` for the keys that belong to ``cls``."""
    nested: dict[str, Any] = {}
    names = {f.name for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    for key, value in flat.items():
        parts = key.split(".")
        if parts[0] not in names:
            continue
        node = nested
        for part in parts[:-1]:
            node = node.setdefault(part, {})
        node[parts[-1]] = value
    return build(cls, nested)
