"""Framework-free privacy accounting shared by clients, strategies and server."""

from privacy.accounting import (
    Release,
    calibrate_noise_multiplier,
    compress,
    epsilon,
    planned_poisson_schedule,
)

__all__ = [
    "Release",
    "calibrate_noise_multiplier",
    "compress",
    "epsilon",
    "planned_poisson_schedule",
]
