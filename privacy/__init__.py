"""Framework-free privacy accounting, ledger, budgets and audit data.

Shared by clients, strategies and server; imports neither flwr nor torch.
"""

from privacy.accounting import (
    ACCOUNTANTS,
    EpsilonMemo,
    GaussianRelease,
    Release,
    UnsupportedAccounting,
    calibrate_noise_multiplier,
    compress,
    epsilon,
    epsilon_all,
    planned_poisson_schedule,
)

__all__ = [
    "ACCOUNTANTS",
    "EpsilonMemo",
    "GaussianRelease",
    "Release",
    "UnsupportedAccounting",
    "calibrate_noise_multiplier",
    "compress",
    "epsilon",
    "epsilon_all",
    "planned_poisson_schedule",
]
