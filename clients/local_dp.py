"""Local DP: each site clips its update and adds Gaussian noise before it leaves.

The mechanism is the one of Flower's ``LocalDpMod`` (``flwr.clientapp.mod``):
the update u = w − w_global is clipped to L2 norm C with Flower's own
``compute_clip_model_update``, and N(0, (σC)² I) is added. Two things differ,
on purpose:

- **accounting**: ``LocalDpMod`` is configured with a per-round (ε, δ) and
  calibrates σ by the classic bound √(2 ln(1.25/δ))/ε, which holds only for
  ε < 1 and says nothing about the run. Here σ (``privacy.local_noise_multiplier``)
  is charged to the site's ledger every round, before the update leaves, and
  the ledger composes the rounds (RDP / PRV / PLD): the ε reported is the
  run's, never one round's.
- **noise source**: ``LocalDpMod`` draws from numpy's global generator; here
  the generator is the site's ``privacy.noise_generator`` (seeded torch, or the
  OS CSPRNG), named in the ledger.

Neighbouring relation: the adversary is anyone who sees the update, the
protected unit is the site's whole data set, and two data sets can give any two
updates in the C-ball, so the sensitivity is 2C. Each release is recorded as
``replace_one`` with noise multiplier σ relative to C; the accountants analyse
it as add/remove-one with multiplier σ/2 (``privacy.accounting``), i.e. noise
σC against sensitivity 2C.
"""

from __future__ import annotations

import numpy as np
import torch
from flwr.supercore.differential_privacy import compute_clip_model_update

from privacy import GaussianRelease

__all__ = ["local_release", "privatize_update"]


def local_release(noise_multiplier: float) -> GaussianRelease:
    """What one round of local DP costs: one Gaussian release, replace-one, no sampling."""
    return GaussianRelease(noise_multiplier, 1.0, 1, sampling="none", relation="replace_one")


def privatize_update(trained: dict[str, torch.Tensor], global_weights: dict[str, torch.Tensor],
                     *, clipping_norm: float, noise_multiplier: float, noise_generator: str,
                     seed: int) -> dict[str, torch.Tensor]:
    """``global + clip(trained − global, C) + N(0, (σC)²)`` for floating-point tensors.

    ``noise_generator``: ``torch`` (a generator seeded with ``seed``) or
    ``secure`` (the OS CSPRNG, :func:`clients.noise.secure_gaussian`).
    """
    from clients.noise import secure_gaussian

    if not (clipping_norm > 0 and noise_multiplier > 0):
        raise ValueError(f"clipping_norm={clipping_norm}, noise_multiplier={noise_multiplier}: "
                         "both must be > 0")
    keys = [k for k, w in trained.items() if w.is_floating_point()]
    new = [trained[k].detach().cpu().numpy().astype(np.float64) for k in keys]
    start = [global_weights[k].detach().cpu().numpy().astype(np.float64) for k in keys]
    if any(np.any(a != b) for a, b in zip(new, start, strict=True)):
        # Flower's clipping, in place (it divides by the norm: skipped for a zero update).
        compute_clip_model_update(new, start, clipping_norm)
    std = noise_multiplier * clipping_norm
    generator = torch.Generator().manual_seed(seed)
    out = dict(trained)
    for key, value in zip(keys, new, strict=True):
        shape = tuple(value.shape)
        if noise_generator == "secure":
            noise = secure_gaussian(shape, std, dtype=torch.float64)
        else:
            noise = torch.normal(0.0, std, shape, generator=generator, dtype=torch.float64)
        out[key] = (torch.from_numpy(value) + noise).to(trained[key].dtype)
    return out
