"""White-box Dirac canaries for auditing Opacus DP-SGD (Nasr et al. 2023, arXiv 2302.07956).

A canary is an extra record of the site's data set whose whole gradient is
``C·e_j``: coordinate ``j`` of a parameter block the forward pass never uses
(:class:`CanaryBlock`), so the audit costs the real model nothing. Canaries are
included independently with probability 1/2 (:func:`draw_membership`); the
included ones are records like any other (:class:`CanaryDataset`), so Poisson
sampling takes them at the real records' rate and the accountant's ε claims to
cover them too. After training, ``-Δ`` of the block at ``j`` is canary ``j``'s
score (:func:`canary_scores`); :func:`privacy.empirical.audit_from_scores`
turns scores into a lower bound on ε.

How the pieces meet Opacus (hooks mode, :class:`~opacus.GradSampleModule`):

- the block's per-sample gradient comes from a registered grad sampler:
  ``magnitude·e_j`` for canary ``j``, zero for a real record, so a real
  record's norm, clipping and update are exactly those without the block;
- :func:`masked_loss` zeroes a canary's loss, so its per-sample gradient in the
  real model is zero and, once clipped to ``C <= magnitude``, it is ``C·e_j``.

Importing this module registers the grad sampler. Only
``grad_sample_mode="hooks"`` is supported (ghost clipping, functorch and
ExpandedWeights are not).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from opacus.grad_sample import register_grad_sampler
from torch import nn
from torch.nn import functional as F
from torch.utils.data import Dataset

__all__ = [
    "REAL",
    "CanaryBlock",
    "CanaryDataset",
    "CanaryModel",
    "CanaryRun",
    "canary_scores",
    "canary_weights",
    "draw_membership",
    "dp_sgd_with_canaries",
    "masked_loss",
    "real_model",
    "with_canaries",
]

REAL = -1  # the canary id of a real record


class CanaryBlock(nn.Module):
    """``num_canaries`` trainable coordinates, one per canary; identity on the logits.

    ``magnitude`` is the per-sample gradient a canary puts on its coordinate
    before clipping; it must be at least the optimizer's ``max_grad_norm`` so
    that clipping leaves exactly ``C·e_j`` (to Opacus' 1e-6 tolerance).
    """

    def __init__(self, num_canaries: int, magnitude: float) -> None:
        super().__init__()
        if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) \
                or num_canaries < 1:
            raise ValueError(f"num_canaries={num_canaries!r}: must be an integer >= 1")
        if not (isinstance(magnitude, (int, float)) and np.isfinite(magnitude) and magnitude > 0):
            raise ValueError(f"magnitude={magnitude!r}: must be a finite number > 0")
        self.num_canaries = num_canaries
        self.magnitude = float(magnitude)
        self.weight = nn.Parameter(torch.zeros(num_canaries))

    def forward(self, logits: torch.Tensor, canary_ids: torch.Tensor) -> torch.Tensor:
        # The weight is never used: its per-sample gradients come from the grad
        # sampler below, and Opacus builds the update from those alone.
        return logits


@register_grad_sampler(CanaryBlock)
def _canary_grad_sample(module: CanaryBlock, activations: list[torch.Tensor],
                        backprops: torch.Tensor) -> dict[nn.Parameter, torch.Tensor]:
    """Per-sample gradients of the block: ``magnitude·e_j`` for canary ``j``, else 0."""
    ids = activations[1].long()
    grad = torch.zeros(len(ids), module.num_canaries, dtype=module.weight.dtype,
                       device=module.weight.device)
    rows = torch.nonzero(ids != REAL).flatten()
    grad[rows, ids[rows]] = module.magnitude
    return {module.weight: grad}


class CanaryModel(nn.Module):
    """A real model followed by a :class:`CanaryBlock`: ``forward(x, canary_ids)``."""

    def __init__(self, model: nn.Module, block: CanaryBlock) -> None:
        super().__init__()
        self.model = model
        self.canary = block

    def forward(self, x: torch.Tensor, canary_ids: torch.Tensor) -> torch.Tensor:
        return self.canary(self.model(x), canary_ids)


def with_canaries(model: nn.Module, num_canaries: int, *, magnitude: float) -> CanaryModel:
    """Wrap ``model`` (not copied) with a block of ``num_canaries`` coordinates.

    Pass ``magnitude >= max_grad_norm`` of the DP optimizer.
    """
    return CanaryModel(model, CanaryBlock(num_canaries, magnitude))


def _canary_model(module: nn.Module) -> CanaryModel:
    inner = getattr(module, "_module", module)  # Opacus' GradSampleModule
    if not isinstance(inner, CanaryModel):
        raise TypeError(f"{type(module).__name__}: not a CanaryModel (or one wrapped by Opacus)")
    return inner


def real_model(module: nn.Module) -> nn.Module:
    """The real model inside a (possibly Opacus-wrapped) :class:`CanaryModel`.

    Its ``state_dict()`` has neither the block nor Opacus' ``_module.`` keys.
    """
    return _canary_model(module).model


def canary_weights(module: nn.Module) -> np.ndarray:
    """The block's current weights, shape ``(num_canaries,)``."""
    return _canary_model(module).canary.weight.detach().cpu().double().numpy().copy()


def draw_membership(num_canaries: int, *, seed: int) -> np.ndarray:
    """Secret inclusion bits: each canary in with probability 1/2, from ``seed``."""
    if isinstance(num_canaries, bool) or not isinstance(num_canaries, int) or num_canaries < 1:
        raise ValueError(f"num_canaries={num_canaries!r}: must be an integer >= 1")
    return np.random.default_rng(seed).random(num_canaries) < 0.5


class CanaryDataset(Dataset):
    """``(x, canary_id, y)`` records: the real ones (id :data:`REAL`), then included canaries.

    ``base`` yields ``(x, y)``. A canary's ``x`` is zeros shaped like the first
    record's and its label is 0; both are masked out of the loss.
    """

    def __init__(self, base: Dataset, membership: Sequence[bool] | np.ndarray) -> None:
        bits = np.asarray(membership)
        if bits.ndim != 1 or not np.all((bits == 0) | (bits == 1)):
            raise ValueError(f"membership shape {bits.shape}: need 1-D 0/1 bits")
        self.base = base
        self.num_real = len(base)  # type: ignore[arg-type]
        if self.num_real < 1:
            raise ValueError("base has no records: canaries need a real record's shape")
        self.canary_ids = np.flatnonzero(bits).astype(np.int64)
        x0, y0 = base[0]
        self._x = torch.zeros_like(torch.as_tensor(x0))
        self._y = torch.zeros_like(torch.as_tensor(y0))

    def __len__(self) -> int:
        return self.num_real + len(self.canary_ids)

    def __getitem__(self, index: int) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        if index < self.num_real:
            x, y = self.base[index]
            return torch.as_tensor(x), torch.tensor(REAL), torch.as_tensor(y)
        j = int(self.canary_ids[index - self.num_real])
        return self._x, torch.tensor(j), self._y


def masked_loss(logits: torch.Tensor, y: torch.Tensor, canary_ids: torch.Tensor) -> torch.Tensor:
    """Cross-entropy of the real records, divided by the *whole* batch size.

    That is Opacus' "mean" reduction with a canary's loss set to 0: a real
    record's per-sample gradient is its own cross-entropy gradient, as without
    canaries. An empty (Poisson) batch gives a zero that still backpropagates.
    """
    if len(y) == 0:
        return logits.sum() * 0.0
    per_sample = F.cross_entropy(logits, y, reduction="none")
    return torch.where(canary_ids == REAL, per_sample, 0.0).sum() / len(y)


def canary_scores(updates: Sequence[np.ndarray] | np.ndarray,
                  learning_rates: Sequence[float] | None = None) -> np.ndarray:
    """Scores from the block's updates ``Δ = w_after - w_before``, one per round.

    SGD subtracts ``lr·grad`` and an included canary's gradient is ``+C·e_j``,
    so the score is ``-Σ Δ`` (``-Σ Δ / lr`` with ``learning_rates``, which
    weighs rounds with different step sizes alike). Any score is
    post-processing of the released updates, so the bound stays valid.
    """
    arr = np.asarray(updates, dtype=float)
    if arr.ndim == 1:
        arr = arr[None, :]
    if arr.ndim != 2 or arr.shape[1] == 0:
        raise ValueError(f"updates shape {arr.shape}: need (rounds, num_canaries)")
    if learning_rates is not None:
        lrs = np.asarray(learning_rates, dtype=float)
        if lrs.shape != (arr.shape[0],) or not np.all(lrs > 0):
            raise ValueError(f"learning_rates={list(lrs)!r}: need one > 0 per round "
                             f"({arr.shape[0]})")
        arr = arr / lrs[:, None]
    return -arr.sum(axis=0)


@dataclass(frozen=True)
class CanaryRun:
    """What :func:`dp_sgd_with_canaries` released and spent."""

    scores: np.ndarray
    membership: np.ndarray
    history: list[tuple[float, float, int]]
    sample_rate: float
    steps: int


def dp_sgd_with_canaries(
    model: nn.Module,
    base: Dataset,
    membership: np.ndarray,
    *,
    noise_multiplier: float,
    max_grad_norm: float,
    batch_size: int,
    epochs: int,
    lr: float,
    seed: int,
    tamper: Callable[[Any], None] | None = None,
) -> CanaryRun:
    """Train ``model`` in place with Opacus DP-SGD plus canaries; score the canaries.

    The mechanism of :func:`clients.train.dp_train_round` (Poisson sampling,
    hooks-mode per-sample clipping, plain SGD), on ``base`` plus the included
    canaries. ``tamper`` is called with the DP optimizer before training: tests
    use it to plant a bug the audit must catch.
    """
    from opacus import PrivacyEngine

    torch.manual_seed(seed)  # Opacus draws its noise from torch's default generator
    dataset = CanaryDataset(base, membership)
    wrapped = with_canaries(model, len(membership), magnitude=max_grad_norm).train()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch_size,
                                         generator=torch.Generator().manual_seed(seed))
    engine = PrivacyEngine(accountant="rdp")
    dp_model, dp_opt, dp_loader = engine.make_private(
        module=wrapped, optimizer=torch.optim.SGD(wrapped.parameters(), lr=lr),
        data_loader=loader, noise_multiplier=noise_multiplier, max_grad_norm=max_grad_norm,
        poisson_sampling=True, grad_sample_mode="hooks")
    if tamper is not None:
        tamper(dp_opt)
    before = canary_weights(dp_model)
    for _ in range(epochs):
        for xb, ids, yb in dp_loader:
            dp_opt.zero_grad(set_to_none=True)
            masked_loss(dp_model(xb, ids), yb, ids).backward()
            dp_opt.step()
    after = canary_weights(dp_model)
    dp_model._close()
    history = [(float(s), float(q), int(n)) for s, q, n in engine.accountant.history]
    return CanaryRun(scores=canary_scores(after - before, [lr]), membership=np.asarray(membership),
                     history=history, sample_rate=float(dp_loader.sample_rate),
                     steps=sum(n for _, _, n in history))
