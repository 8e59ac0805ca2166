"""The server's side of the canary audits: collect, score, bound.

``audit=sample`` (:class:`CanaryAudit`):

Every site that trains sends its canary block (:mod:`clients.audit`) in a reply
record named ``canary``. :meth:`CanaryAudit.collect` takes it out of the reply
before validation and aggregation see it (the global model has no block) and
keeps it with the round's learning rate. At the end, :meth:`CanaryAudit.finish`
scores canary ``j`` as ``-Σ_rounds block_j / lr_round``
(:func:`clients.canary.canary_scores`), derives the membership bits the sites
drew (same seeds, :func:`clients.audit.site_canaries`) and bounds ε with
:func:`privacy.empirical.audit_from_scores` at the run's δ.

The claim the bound is held against is the largest cumulative sample-level ε
of any site with canaries: a canary, like any record, touches only its own
site's DP-SGD, so the whole run is (max_s ε_s, δ)-DP for each of them.

``audit=client`` (:class:`ClientCanaryAudit`): the canaries are virtual
clients inside the server's client-level DP mechanism
(:class:`strategies.client_dp.ClientLevelDP`), which releases their block with
the model and keeps it. Canary ``j``'s score is ``Σ_rounds`` of the released
block at ``j``. A canary client takes part in every round that made a release,
so the claim is the ε of those releases composed, one per round, without
sampling (:func:`privacy.empirical_audit.canary_client_history`): the same as
``epsilon_client_level`` when some site answered every round. The canaries
are charged to no site and change no site's charge.

``RUN_DIR/audit_empirical.json`` keeps the result, the claim, the seeds, the
membership bits and the scores (nothing of it is ever sent to a site), so that
``fedpriv audit`` can recompute the bound; ``summary.json`` gets
``epsilon_empirical_lower_bound`` (``null`` without an audit).
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from flwr.app import ArrayRecord, Message

from clients.audit import (
    CANARY_RECORD,
    SiteCanaries,
    block_of,
    membership_seed,
    site_canaries,
)
from clients.canary import canary_scores
from clients.records import RecordError, config_record, integer, metric_record
from privacy import EpsilonMemo
from privacy.empirical import audit_from_scores
from privacy.empirical_audit import EMPIRICAL_FILE, canary_client_history
from server.config import RunConfig
from server.ledger import ServerLedger
from strategies.client_dp import ClientLevelDP

__all__ = ["CanaryAudit", "ClientCanaryAudit", "canary_audit"]

log = logging.getLogger("fedpriv")


@dataclass
class _Site:
    """One site's canaries and the blocks it released, round by round."""

    canaries: SiteCanaries
    seed: int
    name: str | None = None
    rounds: list[int] = field(default_factory=list)
    learning_rates: list[float] = field(default_factory=list)
    blocks: list[np.ndarray] = field(default_factory=list)


class CanaryAudit:
    """Collects the canary blocks of a run and audits them at its end (``audit=sample``).

    With any other ``audit`` it does nothing and :meth:`finish` returns ``None``.
    """

    def __init__(self, cfg: RunConfig) -> None:
        self.cfg = cfg
        self.enabled = cfg.audit.name == "sample"
        n = cfg.simulation.num_clients
        self.sites: dict[int, _Site] = {}
        if self.enabled:
            for p in range(n):
                canaries = site_canaries(cfg.task, p, n)
                if canaries is not None:
                    self.sites[p] = _Site(canaries, membership_seed(cfg.train.seed, p))

    def collect(self, server_round: int, lr: float, replies: list[Message]) -> None:
        """Take each trained reply's ``canary`` record out of it and keep the block."""
        if not self.enabled:
            return
        for reply in replies:
            record = reply.content.pop(CANARY_RECORD, None) if reply.has_content() else None
            try:
                partition = integer(metric_record(reply.content), "client")
                site = self.sites[partition]
                if not isinstance(record, ArrayRecord):
                    raise RecordError("no canary block in the reply")
                block = block_of(record)
                if block.shape != site.canaries.ids.shape:
                    raise RecordError(f"canary block of {block.size} values, expected "
                                      f"{site.canaries.ids.size}")
            except (RecordError, ValueError, KeyError) as ex:
                # Scores without this round are still post-processing: the bound stays valid.
                log.warning("round %d: node %s: canary block left out: %s", server_round,
                            reply.metadata.src_node_id, ex)
                continue
            site.name = str(config_record(reply.content, "ledger").get("site"))
            site.rounds.append(server_round)
            site.learning_rates.append(lr)
            site.blocks.append(block)

    def finish(self, ledger: ServerLedger, run_dir: Path) -> float | None:
        """Score the canaries, bound ε, write ``audit_empirical.json``; return ε_lb."""
        if not self.enabled:
            return None
        a, pc = self.cfg.audit, self.cfg.privacy
        scores = np.zeros(a.num_canaries)
        membership = np.zeros(a.num_canaries, dtype=bool)
        for site in self.sites.values():
            membership[site.canaries.ids] = site.canaries.membership
            if site.blocks:
                scores[site.canaries.ids] = canary_scores(site.blocks, site.learning_rates)
        result = audit_from_scores(scores, membership, delta=pc.delta,
                                   significance=a.significance, seed=self.cfg.train.seed)
        per_site = ledger.per_site(pc.delta, pc.accountant)
        claims = {s.name: per_site[s.name] for s in self.sites.values()
                  if s.name is not None and s.name in per_site and s.canaries.ids.size}
        claimed_site = max(claims, key=lambda k: claims[k]) if claims else None
        claimed = claims[claimed_site] if claimed_site is not None else None
        doc = self._document(result.to_json(), claimed, claimed_site, claims, scores,
                             membership)
        (run_dir / EMPIRICAL_FILE).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        log.info("empirical audit: epsilon_lb %.4f (ceiling %.4f) against claimed %s",
                 result.epsilon_lb, result.ceiling, claimed)
        if claimed is not None and result.epsilon_lb > claimed:
            log.warning("empirical lower bound %.4f exceeds the claimed epsilon %.4f (%s): "
                        "evidence of a privacy bug", result.epsilon_lb, claimed, claimed_site)
        return result.epsilon_lb

    def _document(self, result: dict[str, Any], claimed: float | None,
                  claimed_site: str | None, claims: dict[str, float],
                  scores: np.ndarray, membership: np.ndarray) -> dict[str, Any]:
        pc = self.cfg.privacy
        return {
            "level": "sample",
            **result,
            "claimed_epsilon": claimed,
            "claimed_site": claimed_site,
            "claimed_epsilon_per_site": claims,
            "accountant": pc.accountant,
            "magnitude": pc.max_grad_norm,
            "num_clients": self.cfg.simulation.num_clients,
            "assignment": "canary j belongs to partition j mod num_clients",
            "membership_seeds": "derive_seed(train.seed, 'audit', partition)",
            "tiebreak_seed": self.cfg.train.seed,
            "score": "-sum over rounds of block_j / lr_round",
            "sites": [{"partition": p, "site": s.name, "seed": s.seed,
                       "canaries": int(s.canaries.ids.size), "included": s.canaries.included,
                       "rounds": s.rounds, "learning_rates": s.learning_rates}
                      for p, s in sorted(self.sites.items())],
            "membership": membership.astype(int).tolist(),
            "scores": scores.tolist(),
        }


class ClientCanaryAudit:
    """Scores the canary clients of ``audit=client`` at the end of the run.

    The block releases are kept by ``client_dp`` (the mechanism), so
    :meth:`collect` has nothing to take out of the replies.
    """

    enabled = True

    def __init__(self, cfg: RunConfig, client_dp: ClientLevelDP) -> None:
        if client_dp.canaries is None:
            raise ValueError("audit=client: the client-level DP mechanism has no canaries")
        self.cfg = cfg
        self.client_dp = client_dp

    def collect(self, server_round: int, lr: float, replies: list[Message]) -> None:
        """Nothing to do: the canary clients live in the mechanism, not in the replies."""

    def finish(self, ledger: ServerLedger, run_dir: Path) -> float:
        """Score the canary clients, bound ε, write ``audit_empirical.json``; return ε_lb."""
        a, pc, dp = self.cfg.audit, self.cfg.privacy, self.client_dp
        membership = np.asarray(dp.canaries, dtype=bool)
        blocks = [block for _, block in dp.canary_releases]
        scores = np.sum(blocks, axis=0) if blocks else np.zeros(membership.size)
        result = audit_from_scores(scores, membership, delta=pc.delta,
                                   significance=a.significance, seed=self.cfg.train.seed)
        history = canary_client_history((r.server_round, r.noise_multiplier)
                                        for r in dp.releases)
        memo = EpsilonMemo()
        claims = memo.all(history, pc.delta) if history else {}
        claimed = claims.get(pc.accountant)
        per_site = ledger.per_site(pc.delta, pc.accountant, level="client")
        doc = {
            "level": "client",
            **result.to_json(),
            "claimed_epsilon": claimed,
            "claimed_site": None,
            "claimed_by_accountant": claims,
            "epsilon_client_level": max(per_site.values(), default=None),
            "accountant": pc.accountant,
            "magnitude": dp.clipping_norm,
            "noise_multiplier": dp.noise_multiplier,
            "num_sampled_clients": dp.num_sampled_clients,
            "num_clients": self.cfg.simulation.num_clients,
            "rounds": [rnd for rnd, _ in dp.canary_releases],
            "membership_seed": "derive_seed(train.seed, 'audit', 'client')",
            "tiebreak_seed": self.cfg.train.seed,
            "score": "sum over rounds of the released canary block at j",
            "sites": [],
            "membership": membership.astype(int).tolist(),
            "scores": scores.tolist(),
        }
        (run_dir / EMPIRICAL_FILE).write_text(json.dumps(doc, indent=1, allow_nan=False) + "\n")
        log.info("empirical audit (client level): epsilon_lb %.4f (ceiling %.4f) against "
                 "claimed %s", result.epsilon_lb, result.ceiling, claimed)
        if claimed is not None and result.epsilon_lb > claimed:
            log.warning("empirical lower bound %.4f exceeds the claimed client-level epsilon "
                        "%.4f: evidence of a privacy bug", result.epsilon_lb, claimed)
        return result.epsilon_lb


def canary_audit(cfg: RunConfig, client_dp: ClientLevelDP | None
                 ) -> CanaryAudit | ClientCanaryAudit:
    """The run's canary audit: :class:`ClientCanaryAudit` for ``audit=client``, else
    :class:`CanaryAudit` (which does nothing without ``audit=sample``)."""
    if cfg.audit.name == "client":
        if client_dp is None:
            raise ValueError("audit=client needs the client-level DP mechanism")
        return ClientCanaryAudit(cfg, client_dp)
    return CanaryAudit(cfg)
