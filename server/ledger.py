"""The server's ledger: a mirror of every release the sites reported, per run.

``RUN_DIR/ledger.sqlite``. Each trained reply's release (σ, q, steps, clipping,
generator, the site's own ledger row hash) is appended *before* the round's
aggregate is released, and every ε the server prints is recomputed from these
rows (the larger of that and what the site claimed is kept: over-count).
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path
from typing import Any

from flwr.app import Message

from clients.records import (
    RecordError,
    charge_from_record,
    config_record,
    metric_record,
    number,
)
from privacy import EpsilonMemo, GaussianRelease
from privacy.ledger import Charge, Ledger, LedgerError

__all__ = ["ServerLedger"]


class ServerLedger:
    def __init__(self, path: Path) -> None:
        self.ledger = Ledger.open(path)
        self._epsilon = EpsilonMemo()  # lives as long as this run's ledger

    def close(self) -> None:
        self.ledger.close()

    @staticmethod
    def _disagreement(reply: Message, charge: Charge) -> str | None:
        """Why the reply's metrics (which aggregation uses) contradict its charge, if they do."""
        if charge.level != "sample" or "metrics" not in reply.content:
            return None
        met = metric_record(reply.content)
        for key in ("noise_multiplier", "sample_rate", "steps"):
            if number(met, key) != float(getattr(charge, key)):
                return f"metrics {key}={met[key]!r} but the ledger charge says " \
                       f"{getattr(charge, key)!r}"
        return None

    def mirror(self, replies: list[Message], server_round: int, *,
               site_levels: bool = True) -> tuple[list[Message], list[dict[str, Any]]]:
        """Append each reply's release; return (replies to aggregate, rejections with reasons).

        A valid charge is mirrored even when the reply is then rejected (its
        metrics contradict the charge): the update did leave the site, so its
        cost counts. A charge that is itself invalid cannot be mirrored; the
        site's own ledger, which the audit reads, still holds it.

        A reply carries one charge per level the site releases at: ``ledger``
        and, with both sample and local DP, ``ledger-local``. With
        ``site_levels=False`` (client-level DP only: the sites release nothing
        noised themselves) a reply without a charge is expected.
        """
        kept, rejected = [], []
        for reply in replies:
            try:
                keys = [k for k in reply.content.config_records
                        if k == "ledger" or k.startswith("ledger-")]
                if site_levels or keys:
                    keys = keys if "ledger" in keys else ["ledger", *keys]
                for key in keys:
                    charge = charge_from_record(config_record(reply.content, key),
                                                round=server_round)
                    self.ledger.append(charge)
                    why = self._disagreement(reply, charge)
                    if why is not None:
                        raise RecordError(why)
            except (RecordError, LedgerError) as ex:
                rejected.append({"node_id": reply.metadata.src_node_id,
                                 "reason": f"privacy report rejected: {ex}"})
                continue
            kept.append(reply)
        return kept, rejected

    def per_site(self, delta: float, accountant: str, level: str | None = "sample",
                 sites: Iterable[str] | None = None) -> dict[str, float]:
        """Each site's cumulative ε at ``level`` (``None``: all levels composed) in this
        ledger: the larger of the recomputation and what the site claimed.

        ``sites``: only these (those without a row at ``level`` are left out);
        ``None``: every site in the ledger.
        """
        out: dict[str, float] = {}
        by_site: dict[str, list[Charge]] = {}
        where: dict[str, Any] = {"level": level} if level else {}
        rows = (self.ledger.rows(**where) if sites is None else
                [r for site in sorted(set(sites)) for r in self.ledger.rows(site=site, **where)])
        for row in rows:
            by_site.setdefault(row.charge.site, []).append(row.charge)
        for site, charges in sorted(by_site.items()):
            recomputed = self._epsilon([c.release() for c in charges], delta, accountant)
            reported = max(c.epsilon_reported or 0.0 for c in charges)
            out[site] = max(recomputed, reported)
        return out

    def record_client_level(self, *, run_id: str, server_round: int, sites: list[str],
                            noise_multiplier: float, clipping_norm: float, sample_rate: float,
                            delta: float, noise_generator: str, accountant: str) -> None:
        """Charge one round's client-level release (the server's own) to each site in it.

        ``sites``: every site whose reply reached the aggregation step (kept or
        rejected: its contribution, or its absence, shaped the release). The
        sampling is Flower's fixed-size sampler, which has no Poisson guarantee,
        so the row says ``sampling`` ``none`` (every site sampled) or
        ``shuffle`` (a fixed-size subset): accounted without amplification.
        ``epsilon_reported``: the site's cumulative client-level ε after it.
        """
        sampling = "none" if sample_rate >= 1.0 else "shuffle"
        for site in sorted(set(sites)):
            history = [r.charge.release() for r in self.ledger.rows(site=site, level="client")]
            release = GaussianRelease(noise_multiplier, min(1.0, sample_rate), 1, sampling)
            eps = self._epsilon([*history, release], delta, accountant)
            self.ledger.append(Charge(
                run_id=run_id, round=server_round, site=site, level="client",
                noise_multiplier=noise_multiplier, clipping_norm=clipping_norm,
                sample_rate=min(1.0, sample_rate), steps=1, delta=delta, sampling=sampling,
                noise_generator=noise_generator, epsilon_reported=eps, accountant=accountant,
                source=None))

    def caps(self) -> dict[str, float]:
        """The latest cap each site reported (sites without a cap are left out)."""
        out: dict[str, float] = {}
        for row in self.ledger.rows():
            if row.charge.epsilon_cap is not None:
                out[row.charge.site] = row.charge.epsilon_cap
        return out

    def generators(self) -> list[str]:
        return sorted({r.charge.noise_generator for r in self.ledger.rows()})
