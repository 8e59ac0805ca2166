"""Pure accounting over histories of Gaussian releases.

A history is a list of ``(noise_multiplier, sample_rate, steps)`` tuples, the
same shape as an Opacus accountant's ``history``. These functions hold no
state: whoever owns a history persists it (across rounds, and on disk at a real
site) and asks for ε from the whole of it, so every ε is cumulative.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Sequence

__all__ = [
    "Release",
    "compress",
    "planned_poisson_schedule",
    "calibrate_noise_multiplier",
    "epsilon",
]

Release = tuple[float, float, int]

MAX_USEFUL_SIGMA = 1e3


def planned_poisson_schedule(
    *, num_samples: int, batch_size: int, local_epochs: int, rounds: int
) -> tuple[float, int, int]:
    """The sampling rate and steps Opacus' Poisson loader will use.

    Opacus converts a loader of ``ceil(n / B)`` batches into Poisson sampling
    with ``q = 1 / ceil(n / B)`` and ``int(1 / q)`` steps per epoch.

    Returns
    -------
    (sample_rate, steps_per_round, total_steps)
    """
    if num_samples < 1:
        raise ValueError(f"num_samples={num_samples}: a client needs at least one record")
    if batch_size < 1 or local_epochs < 1 or rounds < 1:
        raise ValueError("batch_size, local_epochs and rounds must be >= 1")
    num_batches = -(-num_samples // batch_size)
    sample_rate = 1.0 / num_batches
    steps_per_round = local_epochs * int(1 / sample_rate)
    return sample_rate, steps_per_round, steps_per_round * rounds


def calibrate_noise_multiplier(
    *,
    target_epsilon: float,
    delta: float,
    sample_rate: float,
    steps: int,
    accountant: str = "rdp",
) -> float:
    """Smallest σ (to a tolerance) whose ε after ``steps`` is at most the target.

    Binary search by Opacus' ``get_noise_multiplier``; the returned σ always
    gives ε ≤ ``target_epsilon`` for the whole planned schedule.
    """
    from opacus.accountants.utils import get_noise_multiplier

    if target_epsilon <= 0:
        raise ValueError(f"target_epsilon={target_epsilon}: must be > 0")
    if not 0 < delta < 1:
        raise ValueError(f"delta={delta}: must be in (0, 1)")
    if target_epsilon < 1.0:
        # The RDP -> (ε, δ) conversion has a floor (about 0.1 at δ = 1e-5), and Opacus'
        # search takes minutes to find that out; ask once, at a σ no useful run exceeds.
        floor = epsilon(history=[(MAX_USEFUL_SIGMA, sample_rate, steps)], delta=delta,
                        accountant=accountant)
        if floor > target_epsilon:
            raise ValueError(
                f"target_epsilon={target_epsilon}: unreachable with the {accountant} "
                f"accountant at delta={delta}; even noise_multiplier={MAX_USEFUL_SIGMA:g} "
                f"gives epsilon={floor:.4f}"
            )
    return float(
        get_noise_multiplier(
            target_epsilon=target_epsilon,
            target_delta=delta,
            sample_rate=sample_rate,
            steps=steps,
            accountant=accountant,
            epsilon_tolerance=0.005,
        )
    )


def compress(history: Iterable[Sequence[float]]) -> list[Release]:
    """Merge releases with the same (σ, q) by adding their steps.

    Exact for RDP, PRV and PLD alike: composition depends only on how many
    steps ran at each (σ, q), not on their order.
    """
    steps: dict[tuple[float, float], int] = {}
    for sigma, q, n in history:
        key = (float(sigma), float(q))
        steps[key] = steps.get(key, 0) + int(n)
    return [(sigma, q, n) for (sigma, q), n in steps.items()]


def epsilon(*, history: Iterable[Sequence[float]], delta: float, accountant: str = "rdp") -> float:
    """Cumulative ε at ``delta`` of a whole history (0.0 for an empty one).

    ``rdp``: Mironov 2017 with the conversion of Balle et al. 2020 (Opacus);
    ``prv``: Gopi, Lee & Wutschitz 2021 (Opacus; an upper bound).
    """
    from opacus.accountants import create_accountant

    acc = create_accountant(mechanism=accountant)
    acc.history = compress(history)
    if not acc.history:
        return 0.0
    if any(sigma <= 0 and q > 0 and n > 0 for sigma, q, n in acc.history):
        return math.inf  # a noiseless release has no privacy guarantee at all
    return float(acc.get_epsilon(delta=delta))
