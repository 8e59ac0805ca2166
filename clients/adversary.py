"""Simulated Byzantine clients (``adversary=``): poisoned updates and flipped labels.

Only for robustness experiments in simulation. An adversarial client runs the
honest path first (charges its ledger, trains with DP-SGD), then corrupts what
it sends, so the server's privacy accounting and validation see exactly what
a real attacker in that position could send. The corruption needs no privacy
cost of its own: it is a function of the (already charged) DP release, the
public global model and a seed.
"""

from __future__ import annotations

import numpy as np
import torch

from clients.config import AdversaryConfig
from clients.data import ArrayData

__all__ = ["UPDATE_ATTACKS", "flip_labels", "poison_update"]

UPDATE_ATTACKS = ("sign_flip", "scale", "gaussian", "nan")


def flip_labels(data: ArrayData) -> ArrayData:
    """The same records with label ``y`` replaced by ``num_classes − 1 − y``."""
    return ArrayData(data.x, (data.num_classes - 1 - data.y).astype(data.y.dtype),
                     data.num_classes)


def poison_update(trained: dict[str, torch.Tensor], global_weights: dict[str, torch.Tensor],
                  cfg: AdversaryConfig, *, seed: int) -> dict[str, torch.Tensor]:
    """What an adversary sends instead of ``trained`` (floating-point tensors only).

    With u = trained − global: ``sign_flip`` sends global − flip_scale·u,
    ``scale`` sends global + scale·u, ``gaussian`` sends global + N(0,
    noise_std²), ``nan`` sends NaN. Noise is drawn from a generator seeded with
    ``seed``.
    """
    if cfg.name not in UPDATE_ATTACKS:
        raise ValueError(f"adversary.name={cfg.name!r}: not an update attack "
                         f"({list(UPDATE_ATTACKS)})")
    rng = np.random.default_rng(seed)
    out: dict[str, torch.Tensor] = {}
    for key, w in trained.items():
        g = global_weights[key].to(w.dtype)
        if not w.is_floating_point():
            out[key] = w
        elif cfg.name == "sign_flip":
            out[key] = g - cfg.flip_scale * (w - g)
        elif cfg.name == "scale":
            out[key] = g + cfg.scale * (w - g)
        elif cfg.name == "gaussian":
            noise = rng.normal(0.0, cfg.noise_std, size=tuple(w.shape))
            out[key] = g + torch.from_numpy(noise).to(w.dtype)
        else:
            out[key] = torch.full_like(w, float("nan"))
    return out
