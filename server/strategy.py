"""The run's strategy, wrappers composed: budget-aware selection, validation, aggregation.

Outside in::

    BudgetAwareSelection         never selects a spent site; declines never aggregate
      UpdateValidation           malformed or outsized updates never aggregate
        <strategy>               fedavg, fedprox, fedadam, ..., bulyan

The server loop mirrors each reply's privacy charge before the validation sees
it, so a rejected update is still counted as spent.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from flwr.app import ConfigRecord, Message, MetricRecord

from server.config import RunConfig
from strategies import build_strategy
from strategies.budget import BudgetAwareSelection
from strategies.validation import Rejection, UpdateValidation

__all__ = ["StrategyStack", "build_stack"]


def _who(reply: Message | None) -> dict[str, Any]:
    """The client id and site name a reply claims (``None`` where it does not say)."""
    client, site = None, None
    if reply is not None and reply.has_content():
        met, info = reply.content.get("metrics"), reply.content.get("ledger")
        if isinstance(met, MetricRecord) and isinstance(met.get("client"), int):
            client = met["client"]
        if isinstance(info, ConfigRecord) and isinstance(info.get("site"), str):
            site = info["site"]
    return {"client": client, "site": site}


@dataclass
class StrategyStack:
    """The composed strategy of one run, and the rejections it counted per site."""

    budget: BudgetAwareSelection
    validation: UpdateValidation
    rejections_per_client: dict[str, Counter[str]] = field(default_factory=dict)

    def screen(self, server_round: int, replies: list[Message],
               mirror_rejected: list[dict[str, Any]], all_replies: list[Message]
               ) -> tuple[list[Message], list[dict[str, Any]]]:
        """Validate ``replies`` (already mirrored to the ledger); return those kept and
        every rejection of the round (the mirror's and the validation's) as records."""
        kept, invalid = self.validation.screen(server_round, replies)
        by_node = {m.metadata.src_node_id: m for m in all_replies}
        rows = [{**r, "check": r.get("check", "privacy_report"),
                 **_who(by_node.get(r["node_id"]))} for r in mirror_rejected]
        rows += [self._row(r, by_node.get(r.node_id)) for r in invalid]
        for row in rows:
            name = str(row["site"] if row["site"] is not None else f"node-{row['node_id']}")
            self.rejections_per_client.setdefault(name, Counter())[row["check"]] += 1
        return kept, rows

    @staticmethod
    def _row(r: Rejection, reply: Message | None) -> dict[str, Any]:
        return {"node_id": r.node_id, **_who(reply), "check": r.check,
                "reason": f"update rejected ({r.check}): {r.reason}"}

    def rejection_counts(self) -> dict[str, dict[str, int]]:
        return {site: dict(c) for site, c in sorted(self.rejections_per_client.items())}


def build_stack(cfg: RunConfig) -> StrategyStack:
    """The configured strategy inside its wrappers (the config is already validated)."""
    s = cfg.strategy
    base = build_strategy(s.name, s.sampling(cfg.simulation.num_clients), s.params)
    validation = UpdateValidation(base, max_update_norm=s.max_update_norm)
    return StrategyStack(BudgetAwareSelection(validation), validation)
