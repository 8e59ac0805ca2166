"""The sample-level canary audit at a site (``audit=sample``).

The run plants ``audit.num_canaries`` (m) Dirac canaries (:mod:`clients.canary`);
canary ``j`` belongs to the site with partition id ``j mod num_partitions``.
Each site draws its canaries' membership bits (each in with probability 1/2)
once per run, from a seed derived from (run seed, ``"audit"``, partition id): it
must know which canaries to insert. The server derives the same bits to score
them (:mod:`server.empirical`); neither bits nor scores are ever sent.

Every round the site trains its model wrapped with a block of one coordinate
per canary, starting at 0, on its data set extended by its included canaries
(:func:`clients.train.dp_train_round` with ``canaries=``). The canaries are
records like any other: Opacus' Poisson sampler takes them at the real
records' rate, and that rate is charged from ``n + included``
(:attr:`SiteCanaries.included`), exactly what Opacus accounts. The block's
final values go back in a separate ``ArrayRecord`` named ``canary``
(:func:`canary_record`); the global model has no block and the server never
aggregates it.

Only ``grad_sample_mode="hooks"`` is supported (the canaries' per-sample
gradients come from a grad sampler registered for it).

``audit=client`` involves no site: its canaries are virtual clients inside the
server's client-level DP mechanism (:class:`strategies.client_dp.ClientLevelDP`),
with membership bits from (run seed, ``"audit"``, ``"client"``)
(:func:`client_membership`), kept on the server.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
from flwr.app import ArrayRecord, Message

from clients.canary import draw_membership
from clients.config import ClientTask, require

__all__ = ["CANARY_RECORD", "SiteCanaries", "attach_canary_block", "block_of", "canary_ids",
           "canary_record", "check_audit", "client_membership", "membership_seed",
           "site_canaries"]

CANARY_RECORD = "canary"  # the reply's ArrayRecord holding the block
_BLOCK_KEY = "block"


@dataclass(frozen=True)
class SiteCanaries:
    """One site's canaries: their global ids ``j`` and their secret membership bits."""

    ids: np.ndarray
    membership: np.ndarray

    @property
    def included(self) -> int:
        """How many of them are records of the site's data set this run."""
        return int(self.membership.sum())


def canary_ids(num_canaries: int, num_partitions: int, partition_id: int) -> np.ndarray:
    """The canaries ``j`` of partition ``partition_id``: ``j mod num_partitions`` equals it."""
    if not 0 <= partition_id < num_partitions:
        raise ValueError(f"partition_id={partition_id}: must be in [0, {num_partitions})")
    return np.arange(partition_id, num_canaries, num_partitions, dtype=np.int64)


def membership_seed(run_seed: int, partition_id: int | str) -> int:
    """The seed of membership bits: (run seed, ``"audit"``, partition id), or
    (run seed, ``"audit"``, ``"client"``) for the canary clients of ``audit=client``."""
    from clients.app import derive_seed  # clients.app imports this module

    return derive_seed(run_seed, "audit", partition_id)


def client_membership(task: ClientTask) -> np.ndarray | None:
    """The canary clients' secret membership bits under ``audit=client`` (else ``None``).

    Derived on the server only, from (run seed, ``"audit"``, ``"client"``); fixed for
    the run and never sent.
    """
    if task.audit.name != "client":
        return None
    return draw_membership(task.audit.num_canaries,
                           seed=membership_seed(task.train.seed, "client"))


def check_audit(task: ClientTask, num_clients: int) -> None:
    """Refuse an audit this run cannot do (:class:`ConfigError` naming the key)."""
    a, levels = task.audit, list(task.privacy.levels)
    if a.name == "client":
        require("client" in levels, "audit.name", a.name,
                f"audit=client puts canary clients inside client-level DP, and "
                f"privacy.levels={levels} has none; use privacy=client, sample_client or "
                "client_local")
        return
    if a.name != "sample":
        return
    require("sample" in levels, "audit.name", a.name,
            f"audit=sample puts canary records inside each site's DP-SGD, and "
            f"privacy.levels={levels} has no sample level (the sites train with plain SGD); "
            "use privacy=sample, sample_client or sample_local, or audit=client for "
            "client-level DP")
    mode = task.privacy.grad_sample_mode
    require(mode in ("hooks", "auto"), "privacy.grad_sample_mode", mode,
            "audit=sample needs 'hooks' (or 'auto', which then picks hooks): the canaries' "
            "per-sample gradients come from a grad sampler registered for Opacus' hooks mode "
            "(ghost clipping, functorch and ExpandedWeights bypass it)")
    require(a.num_canaries >= num_clients, "audit.num_canaries", a.num_canaries,
            f"fewer canaries than sites (num_clients={num_clients}); each needs one")


def site_canaries(task: ClientTask, partition_id: int,
                  num_partitions: int) -> SiteCanaries | None:
    """This site's canaries under ``audit=sample`` (``None`` for any other audit)."""
    if task.audit.name != "sample":
        return None
    check_audit(task, num_partitions)
    ids = canary_ids(task.audit.num_canaries, num_partitions, partition_id)
    bits = draw_membership(len(ids), seed=membership_seed(task.train.seed, partition_id))
    return SiteCanaries(ids, bits)


def canary_record(block: np.ndarray) -> ArrayRecord:
    """The block's final values, as the reply's ``canary`` record.

    No privacy cost of its own: the block is trained by the same DP-SGD steps as
    the model, clipped with each record's gradient and noised by the same
    Gaussian noise step, so releasing it is part of the release the site
    charged (post-processing of the same noisy gradients).
    """
    return ArrayRecord({_BLOCK_KEY: torch.from_numpy(np.asarray(block, dtype=np.float64))})


def attach_canary_block(reply: Message, block: np.ndarray | None) -> Message:
    """``reply`` with the block as its ``canary`` record (unchanged when ``block`` is None)."""
    if block is not None:
        reply.content[CANARY_RECORD] = canary_record(block)
    return reply


def block_of(record: ArrayRecord) -> np.ndarray:
    """The block values a ``canary`` record carries (``ValueError`` if it is malformed)."""
    state = record.to_torch_state_dict()
    if set(state) != {_BLOCK_KEY} or state[_BLOCK_KEY].ndim != 1:
        raise ValueError(f"canary record: expected one 1-D tensor {_BLOCK_KEY!r}, got "
                         f"{ {k: list(v.shape) for k, v in state.items()} }")
    return state[_BLOCK_KEY].double().numpy()
