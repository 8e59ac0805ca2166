"""The benchmark suites: what each one runs, and how big.

``quick`` is sized to finish in under ten minutes on a 2-core CPU machine,
``full`` takes hours, ``tiny`` exists for the tests (seconds, one repeat).
Each section is a frozen dataclass; a suite leaves a section out with ``None``.
"""

from __future__ import annotations

from dataclasses import dataclass, field

__all__ = ["DpOverheadSpec", "ThroughputSpec", "MemorySpec", "AccuracySpec", "ProfileSpec",
           "Suite", "SUITES"]


@dataclass(frozen=True)
class DpOverheadSpec:
    """DP-SGD against plain SGD: same model, data, batch size and thread count.

    Attributes
    ----------
    models : labels from :data:`simulations.benchmarks.dp_overhead.MODEL_VARIANTS`.
    modes : Opacus ``grad_sample_mode`` values compared with non-private training:
        per-sample hooks, ghost clipping, torch's ExpandedWeights.
    repeats : timed epochs per mode, interleaved (non-private, hooks, ghost, ...),
        after one untimed warm-up epoch each.
    max_examples : training examples used (``None``: the whole train pool).
    memory_examples : examples in the epoch whose peak memory is measured.
    """

    dataset: str = "mnist5k"
    models: tuple[str, ...] = ("mlp", "mlp-wide", "cnn", "transformer")
    modes: tuple[str, ...] = ("hooks", "ghost", "ew")
    batch_size: int = 128
    repeats: int = 3
    max_examples: int | None = 1024
    memory_examples: int = 1024
    threads: int = 1
    timeout_s: float = 1800.0


@dataclass(frozen=True)
class ThroughputSpec:
    """fedpriv's simulation against the naive Flower + Opacus pattern.

    ``sampled`` clients train per round at every size (``min(sampled, size)``).
    The first round pays Ray's start-up and each worker's imports; the rate is
    the median over the later rounds of each run.
    """

    dataset: str = "mnist5k"
    model: str = "cnn"
    sizes: tuple[int, ...] = (10, 100)
    sampled: int = 10
    rounds: int = 3
    repeats: int = 1
    overrides: tuple[str, ...] = ()  # extra hydra overrides for fedpriv's runs
    # Sizes at which fedpriv also runs with its worker cache off (as before the cache).
    what_if_sizes: tuple[int, ...] = ()
    timeout_s: float = 900.0


@dataclass(frozen=True)
class MemorySpec:
    """Resident memory of a fedpriv simulation at round ``late`` ÷ round ``early``."""

    dataset: str = "digits"
    model: str = "mlp"
    num_clients: int = 3
    early: int = 5
    late: int = 50
    overrides: tuple[str, ...] = ()
    timeout_s: float = 1800.0


@dataclass(frozen=True)
class AccuracySpec:
    """Accuracy at each ε: fedpriv (IID and Dirichlet), central DP-SGD, non-private.

    Federated runs: ``num_clients`` clients, all training every round, for
    ``rounds`` rounds of ``local_epochs`` epochs (``federated_epsilons`` only).
    Central DP-SGD: the same model, batch size, learning rate and accountant
    on one client holding the pooled data, ``rounds * local_epochs`` epochs, at
    every ε in ``epsilons``. ``overrides``: hydra overrides shared by all.
    """

    dataset: str = "mnist5k"
    model: str = "cnn"
    epsilons: tuple[float, ...] = (1.0, 3.0, 8.0)
    federated_epsilons: tuple[float, ...] = (3.0,)
    num_clients: int = 10
    partitioners: tuple[str, ...] = ("iid", "dirichlet")
    alpha: float = 0.5
    rounds: int = 2
    local_epochs: int = 3
    batch_size: int = 128
    lr: float = 1.5
    nonprivate_lr: float = 0.05
    overrides: tuple[str, ...] = ()
    delta: float = 1e-5
    timeout_s: float = 7200.0

    @property
    def epochs(self) -> int:
        """Passes over the data: the same for central and federated training."""
        return self.rounds * self.local_epochs


@dataclass(frozen=True)
class ProfileSpec:
    """cProfile of fedpriv's real ClientApp ``train`` handler, in process.

    ``calls`` handler calls as distinct clients of round 1 (what most calls are
    when few of many clients are sampled per round), after one untimed call.
    """

    dataset: str = "mnist5k"
    model: str = "cnn"
    num_clients: int = 100
    calls: int = 3
    top: int = 25
    overrides: tuple[str, ...] = ()
    # Settings the same calls are also timed in (simulations.benchmarks.client_profile.WHAT_IF).
    what_if: tuple[str, ...] = ("without worker cache",)


@dataclass(frozen=True)
class Suite:
    name: str
    description: str
    dp_overhead: DpOverheadSpec | None = field(default_factory=DpOverheadSpec)
    profile: ProfileSpec | None = field(default_factory=ProfileSpec)
    simulation: ThroughputSpec | None = field(default_factory=ThroughputSpec)
    memory_growth: MemorySpec | None = field(default_factory=MemorySpec)
    accuracy_vs_epsilon: AccuracySpec | None = field(default_factory=AccuracySpec)


SUITES: dict[str, Suite] = {
    "tiny": Suite(
        name="tiny",
        description="seconds; for the tests only (every key, no meaningful figure)",
        dp_overhead=DpOverheadSpec(dataset="digits", models=("mlp",),
                                   modes=("hooks", "ghost", "ew"),
                                   batch_size=64, repeats=1, max_examples=256,
                                   memory_examples=256, timeout_s=300),
        # The RDP accountant calibrates in milliseconds (PRV: seconds): tests stay short.
        profile=ProfileSpec(dataset="digits", model="mlp", num_clients=3, calls=1, top=5,
                            overrides=("privacy.accountant=rdp",)),
        simulation=ThroughputSpec(dataset="digits", model="mlp", sizes=(2,), sampled=2,
                                  rounds=2, overrides=("privacy.accountant=rdp",),
                                  timeout_s=300),
        memory_growth=MemorySpec(dataset="digits", model="mlp", num_clients=2, early=1, late=2,
                                 timeout_s=300),
        accuracy_vs_epsilon=AccuracySpec(
            dataset="digits", model="mlp", epsilons=(3.0,), federated_epsilons=(3.0,),
            num_clients=2, partitioners=("iid",), rounds=1, local_epochs=1,
            overrides=("privacy.accountant=rdp",), timeout_s=300),
    ),
    "quick": Suite(
        name="quick",
        description="under 10 minutes on 2 idle CPU cores; run it for every change",
        dp_overhead=DpOverheadSpec(),
        # fedpriv's default task (digits, MLP): client calls are cheap enough that ten
        # sampled per round fit the budget; the same task for the profile.
        profile=ProfileSpec(dataset="digits", model="mlp", num_clients=100, calls=2),
        # Five rounds: the rates are medians of rounds 2-5 (two rounds made a noisy
        # median; six took the suite to 585 s of its 600).
        simulation=ThroughputSpec(dataset="digits", model="mlp", sizes=(10, 100), sampled=10,
                                  rounds=5, what_if_sizes=(100,)),
        memory_growth=MemorySpec(dataset="digits", model="mlp", num_clients=3, early=5,
                                 late=15),
        # Scattering features + linear (as full's); five short rounds, the server's
        # EMA off (at 0.8 it would still mostly show the first rounds).
        accuracy_vs_epsilon=AccuracySpec(dataset="mnist5k-scatter", model="scatter-linear",
                                         num_clients=5, federated_epsilons=(3.0,), rounds=5,
                                         local_epochs=1, overrides=("strategy.ema=0",)),
    ),
    "full": Suite(
        name="full",
        description="hours; the figures in docs/benchmarks.md",
        dp_overhead=DpOverheadSpec(dataset="fashion-mnist", batch_size=128, repeats=5,
                                   max_examples=4096, memory_examples=4096,
                                   timeout_s=4 * 3600),
        profile=ProfileSpec(dataset="fashion-mnist", model="cnn", num_clients=1000, calls=5),
        simulation=ThroughputSpec(dataset="fashion-mnist", model="cnn", sizes=(10, 100, 1000),
                                  sampled=10, rounds=4, what_if_sizes=(100, 1000),
                                  timeout_s=3600),
        memory_growth=MemorySpec(dataset="digits", model="mlp", num_clients=10, early=5,
                                 late=50, timeout_s=7200),
        # Scattering features + linear (Tramer & Boneh's ScatterNet + linear) with
        # fedpriv's defaults otherwise (batch 128, lr 1.5, clipping 1, EMA 0.8), untuned.
        # Non-private SGD over these features needs a far smaller step than DP-SGD's
        # clipped one: lr 0.002 reached 0.914 after 15 epochs, 0.05 only 0.866.
        accuracy_vs_epsilon=AccuracySpec(
            dataset="fashion-mnist-scatter", model="scatter-linear", epsilons=(1.0, 3.0, 8.0),
            federated_epsilons=(1.0, 3.0, 8.0), num_clients=10, rounds=15, local_epochs=1,
            nonprivate_lr=0.002, timeout_s=4 * 3600),
    ),
}
