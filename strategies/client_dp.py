"""Client-level central DP: Flower's server-side fixed clipping, with a fixed denominator.

:class:`ClientLevelDP` is Flower's ``DifferentialPrivacyServerSideFixedClipping``
(McMahan et al. 2018, "Learning Differentially Private Recurrent Language
Models"; Geyer et al. 2017): each reply's update u_i = w_i − w is clipped to
L2 norm C, and the release is

    w + (Σ_i clip(u_i) + N(0, σ²C² I)) / m

where m is the number of clients the round *planned* to sample (Flower's
``num_sampled_clients``) and the sum runs over the replies that actually
arrived. Adding or removing one whole site changes the sum by at most C, so
each round is one Gaussian mechanism with noise multiplier σ on a
sensitivity-C sum, whatever the number that replied; dividing by the public
constant m is post-processing. Two changes to Flower's wrapper make that true:

- **equal weights**: the wrapped FedAvg is told to weight every reply by 1
  (a ``num-examples`` weight would let one site's weight, itself private and
  unbounded, scale its update past C);
- **fixed denominator**: Flower divides by the number that replied (k) but
  calibrates the noise for m; with k < m the noise on the sum would shrink to
  σC·k/m. The mean is rescaled to the sum over m before the noise is added.

Noise is drawn from the ``noise`` callable passed in (a generator chosen and
recorded by the caller), not from numpy's global generator. Each round's
release is kept in :attr:`ClientLevelDP.releases` for the ledger.

**Canary clients** (``audit=client``, Nasr et al. 2023, arXiv 2302.07956): with
``canaries`` (secret membership bits b, one per canary) the mechanism runs on
the model's vector extended by a block of one coordinate per canary, which the
model never uses and no site ever receives. Canary ``j`` is a virtual client
whose whole update is ``C·e_j`` on the block (norm exactly C, so clipping keeps
it); a real site's update is 0 there, so its clipping and its sum are those
without the block. The block is released in the same step as the model, by the
same line, with the same noise draw function and std::

    block = (Σ_j b_j·clip(C·e_j) + N(0, σ²C² I)) / m

and taken out before the model leaves (:attr:`ClientLevelDP.canary_releases`):
the server scores it (``server.empirical``). The block's noise is drawn after
the model's, so the model and every site's charge are exactly those of the run
without canaries.

Sound only when the wrapped strategy's aggregate is that weighted mean:
FedAvg and FedProx. A robust aggregate (median, trimmed mean, Krum, Bulyan)
can move by up to C when one site changes, not C/m, and FedAdam / FedYogi
apply their server optimizer to the mean *before* this wrapper adds noise:
both are refused.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import cast

import numpy as np
from flwr.app import Array, ArrayRecord, Message, MetricRecord
from flwr.serverapp.strategy import DifferentialPrivacyServerSideFixedClipping, FedAvg, Strategy
from flwr.serverapp.strategy.dp_fixed_clipping import validate_replies
from flwr.supercore.differential_privacy import compute_stdv

from strategies.utils import ForwardsSampling

__all__ = ["CANARY_BLOCK", "UNIT_WEIGHT", "ClientLevelDP", "ClientRelease", "NoiseFn",
           "clip_update"]

UNIT_WEIGHT = "dp-unit-weight"
CANARY_BLOCK = "canary-block"  # the block's key in the released vector (audit=client)

# noise(server_round) -> draw(shape, std), which returns N(0, std²) draws; one draw
# per tensor, in the order of the model's tensors.
NoiseFn = Callable[[int], Callable[[tuple[int, ...], float], np.ndarray]]


def clip_update(new: list[np.ndarray], start: list[np.ndarray],
                clipping_norm: float) -> list[np.ndarray]:
    """``start + u·min(1, C/||u||)`` with u = new − start (Flower's FlatClip, McMahan et al.
    2018), and ``new`` unchanged when u = 0."""
    update = [np.subtract(a, b) for a, b in zip(new, start, strict=True)]
    norm = float(np.sqrt(sum(float(np.sum(np.square(u, dtype=np.float64))) for u in update)))
    scale = min(1.0, clipping_norm / norm) if norm > 0 else 1.0
    return [b + (u * scale).astype(b.dtype) for b, u in zip(start, update, strict=True)]


@dataclass(frozen=True)
class ClientRelease:
    """One round's client-level release: what the ledger records."""

    server_round: int
    noise_multiplier: float
    clipping_norm: float
    num_sampled: int  # m, the fixed denominator
    num_replied: int  # k, the replies summed
    noise_std: float  # of the released mean: σC/m


class ClientLevelDP(ForwardsSampling, DifferentialPrivacyServerSideFixedClipping):
    """Wrap FedAvg or FedProx with server-side clipping and Gaussian noise.

    Parameters
    ----------
    strategy : a ``FedAvg`` whose ``aggregate_train`` is FedAvg's own.
    noise_multiplier : σ (> 0), relative to ``clipping_norm``.
    clipping_norm : C (> 0), the bound on each site's update.
    num_sampled_clients : m, the planned sample size per round.
    noise : draws the noise; see :data:`NoiseFn`.
    canaries : secret membership bits of the canary clients (``audit=client``), or None.
    """

    def __init__(self, strategy: Strategy, *, noise_multiplier: float, clipping_norm: float,
                 num_sampled_clients: int, noise: NoiseFn,
                 canaries: np.ndarray | None = None) -> None:
        if not isinstance(strategy, FedAvg) or \
                type(strategy).aggregate_train is not FedAvg.aggregate_train:
            raise ValueError(
                f"{type(strategy).__name__}: client-level DP needs the aggregate to be the "
                "mean of the clipped updates (FedAvg, FedProx); this strategy's aggregate "
                "is not, so noise calibrated for the mean does not cover it")
        if not noise_multiplier > 0:
            raise ValueError(f"noise_multiplier={noise_multiplier}: must be > 0 (a noiseless "
                             "release has no guarantee)")
        super().__init__(strategy, noise_multiplier, clipping_norm, num_sampled_clients)
        self.noise = noise
        self.releases: list[ClientRelease] = []
        self.canaries = None
        if canaries is not None:
            bits = np.asarray(canaries)
            if bits.ndim != 1 or bits.size < 1 or not np.all((bits == 0) | (bits == 1)):
                raise ValueError(f"canaries: shape {bits.shape}, need 1-D 0/1 membership bits")
            self.canaries = bits.astype(bool)
        # (round, released block): one per release, with canaries only
        self.canary_releases: list[tuple[int, np.ndarray]] = []
        self._round = 0
        self._replied = 0

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        """Flower's server-side fixed clipping, with equal weights and a fixed denominator.

        The same steps as ``DifferentialPrivacyServerSideFixedClipping.aggregate_train``,
        written out because Flower's clipping divides by the update's norm and
        fails on an update of norm 0 (a site that sends the global model back).
        """
        replies = list(replies)
        if not validate_replies(replies, self.num_sampled_clients):
            return None, None
        start = self.current_arrays.to_numpy_ndarrays()
        for reply in replies:
            for met in reply.content.metric_records.values():
                met[UNIT_WEIGHT] = 1
            for name, rec in reply.content.array_records.items():
                clipped = clip_update(rec.to_numpy_ndarrays(), start, self.clipping_norm)
                reply.content[name] = ArrayRecord({k: Array(np.asarray(v)) for k, v in
                                                   zip(rec.keys(), clipped, strict=True)})
        self._round, self._replied = server_round, len(replies)
        inner = cast(FedAvg, self.strategy)
        weighted_by = inner.weighted_by_key
        inner.weighted_by_key = UNIT_WEIGHT  # for training only; evaluation keeps its own
        try:
            arrays, metrics = inner.aggregate_train(server_round, replies)
        finally:
            inner.weighted_by_key = weighted_by
        if arrays is not None:
            arrays = self._add_noise_to_aggregated_arrays(arrays)
        return arrays, metrics

    def canary_sum(self) -> np.ndarray:
        """Σ_j b_j·clip(C·e_j): the included canary clients' clipped updates on the block."""
        if self.canaries is None:
            raise ValueError("no canaries: this mechanism was built without audit=client")
        m = self.canaries.size
        total = np.zeros(m)
        for j in np.flatnonzero(self.canaries):
            update = np.zeros(m)
            update[j] = self.clipping_norm
            total += clip_update([update], [np.zeros(m)], self.clipping_norm)[0]
        return total

    def _add_noise_to_aggregated_arrays(self, aggregated_arrays: ArrayRecord) -> ArrayRecord:
        """Mean over k -> sum over m, then N(0, (σC/m)²) per coordinate (the canary
        block, when there is one, last: the same release for one more tensor)."""
        k, m = self._replied, self.num_sampled_clients
        std = compute_stdv(self.noise_multiplier, self.clipping_norm, m)
        start = {key: a.numpy() for key, a in self.current_arrays.items()}
        # Σ_i clip(u_i) over the k replies, per tensor
        sums = {key: k * (a.numpy() - start[key]) for key, a in aggregated_arrays.items()}
        dtypes = {key: a.numpy().dtype for key, a in aggregated_arrays.items()}
        if self.canaries is not None:
            if CANARY_BLOCK in sums:
                raise ValueError(f"the model has a tensor named {CANARY_BLOCK!r}")
            sums[CANARY_BLOCK] = self.canary_sum()
            start[CANARY_BLOCK] = np.zeros(self.canaries.size)
            dtypes[CANARY_BLOCK] = np.dtype(np.float64)
        draw = self.noise(self._round)
        released = {key: np.asarray(start[key] + total / m + draw(tuple(total.shape), std),
                                    dtype=dtypes[key])
                    for key, total in sums.items()}
        if self.canaries is not None:
            self.canary_releases.append((self._round, released.pop(CANARY_BLOCK)))
        self.releases.append(ClientRelease(self._round, self.noise_multiplier,
                                           self.clipping_norm, m, k, std))
        return ArrayRecord({key: Array(v) for key, v in released.items()})
