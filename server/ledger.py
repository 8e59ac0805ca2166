"""The server's ledger: a mirror of every release the sites reported, per run.

``RUN_DIR/ledger.sqlite``. Each trained reply's release (σ, q, steps, clipping,
generator, the site's own ledger row hash) is appended *before* the round's
aggregate is released, and every ε the server prints is recomputed from these
rows (the larger of that and what the site claimed is kept: over-count).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import Any

from flwr.app import ConfigRecord, Message

from clients.records import RecordError, config_record, integer, metric_record, number
from privacy import EpsilonMemo
from privacy.ledger import Charge, Ledger, LedgerError

__all__ = ["MirroredRelease", "ServerLedger"]


@dataclass(frozen=True)
class MirroredRelease:
    site: str
    client: int
    charge: Charge


def _text(record: ConfigRecord, key: str) -> str:
    value = record.get(key)
    if not isinstance(value, str) or not value:
        raise RecordError(f"{key}={value!r}: expected a non-empty string")
    return value


class ServerLedger:
    def __init__(self, path: Path) -> None:
        self.ledger = Ledger.open(path)
        self._epsilon = EpsilonMemo()  # lives as long as this run's ledger

    def close(self) -> None:
        self.ledger.close()

    def release_of(self, reply: Message, server_round: int) -> MirroredRelease:
        """The release a trained reply reports (raises ``RecordError``/``LedgerError``)."""
        met, info = metric_record(reply.content), config_record(reply.content, "ledger")
        cap = number(met, "epsilon-cap")
        charge = Charge(
            run_id=_text(info, "run-id"), round=server_round, site=_text(info, "site"),
            level="sample", noise_multiplier=number(met, "noise_multiplier"),
            clipping_norm=number(met, "max_grad_norm"), sample_rate=number(met, "sample_rate"),
            steps=integer(met, "steps"), delta=number(met, "delta"),
            sampling=_text(info, "sampling"), relation=_text(info, "relation"),
            noise_generator=_text(info, "noise-generator"),
            num_records=integer(met, "num-examples"), epsilon_cap=cap if cap > 0 else None,
            epsilon_reported=number(met, "epsilon"), accountant=_text(info, "accountant"),
            source=f"{_text(info, 'site')}#{integer(info, 'seq')}:{_text(info, 'hash')}",
        )
        return MirroredRelease(charge.site, integer(met, "client"), charge)

    def mirror(self, replies: list[Message], server_round: int
               ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Append each reply's release; return (mirrored replies, rejections with reasons)."""
        kept, rejected = [], []
        for reply in replies:
            try:
                release = self.release_of(reply, server_round)
                self.ledger.append(release.charge)
            except (RecordError, LedgerError) as ex:
                rejected.append({"node_id": reply.metadata.src_node_id,
                                 "reason": f"privacy report rejected: {ex}"})
                continue
            kept.append(reply)
        return kept, rejected

    def per_site(self, delta: float, accountant: str) -> dict[str, float]:
        """Each site's cumulative sample-level ε in this ledger: max(recomputed, reported)."""
        out: dict[str, float] = {}
        by_site: dict[str, list[Charge]] = {}
        for row in self.ledger.rows(level="sample"):
            by_site.setdefault(row.charge.site, []).append(row.charge)
        for site, charges in sorted(by_site.items()):
            recomputed = self._epsilon([c.release() for c in charges], delta, accountant)
            reported = max(c.epsilon_reported or 0.0 for c in charges)
            out[site] = max(recomputed, reported)
        return out

    def caps(self) -> dict[str, float]:
        """The latest cap each site reported (sites without a cap are left out)."""
        out: dict[str, float] = {}
        for row in self.ledger.rows():
            if row.charge.epsilon_cap is not None:
                out[row.charge.site] = row.charge.epsilon_cap
        return out

    def generators(self) -> list[str]:
        return sorted({r.charge.noise_generator for r in self.ledger.rows()})
