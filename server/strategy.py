"""The run's strategy, wrappers composed: budget-aware selection, validation, aggregation.

Outside in::

    BudgetAwareSelection         never selects a spent site; declines never aggregate
      SeededSelection            which sites train: from (run seed, round, site name)
      UpdateValidation           malformed or outsized updates never aggregate
        ClientLevelDP            privacy.levels has client: clip, sum, noise (fedavg, fedprox)
          <strategy>             fedavg, fedprox, fedadam, ..., bulyan

The server loop mirrors each reply's privacy charge before the validation sees
it, so a rejected update is still counted as spent; with client-level DP it
charges each round's release to every site that answered, before the noisy
model leaves the process.
"""

from __future__ import annotations

from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch
from flwr.app import ConfigRecord, Message, MessageType, MetricRecord, RecordDict
from flwr.serverapp import Grid

from clients.app import derive_seed
from clients.audit import client_membership
from clients.noise import describe_noise_generator, secure_gaussian
from server.config import RunConfig
from server.ledger import ServerLedger
from strategies import build_strategy
from strategies.budget import BudgetAwareSelection
from strategies.client_dp import ClientLevelDP, ClientRelease, NoiseFn
from strategies.selection import SeededSelection
from strategies.validation import Rejection, UpdateValidation

__all__ = ["StrategyStack", "build_stack", "client_level_noise", "identify_sites",
           "site_of_reply"]


def _who(reply: Message | None) -> dict[str, Any]:
    """The client id and site name a reply claims (``None`` where it does not say)."""
    client, site = None, None
    if reply is not None and reply.has_content():
        met, info = reply.content.get("metrics"), reply.content.get("ledger")
        if isinstance(met, MetricRecord) and isinstance(met.get("client"), int):
            client = met["client"]
        if not isinstance(info, ConfigRecord):  # client-level DP only: no charge, a name
            info = reply.content.get("site")
        if isinstance(info, ConfigRecord) and isinstance(info.get("site"), str):
            site = info["site"]
    return {"client": client, "site": site}


def site_of_reply(reply: Message) -> str:
    """The site name a reply claims, else its node id."""
    site = _who(reply)["site"]
    return str(site) if site is not None else f"node-{reply.metadata.src_node_id}"


@dataclass
class StrategyStack:
    """The composed strategy of one run, and the rejections it counted per site."""

    budget: BudgetAwareSelection
    validation: UpdateValidation
    selection: SeededSelection
    client_dp: ClientLevelDP | None = None
    rejections_per_client: dict[str, Counter[str]] = field(default_factory=dict)

    def client_release(self, server_round: int) -> ClientRelease | None:
        """This round's client-level release, if one was made."""
        if self.client_dp is None:
            return None
        return next((r for r in self.client_dp.releases if r.server_round == server_round),
                    None)

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

    def charge_client_level(self, ledger: ServerLedger, cfg: RunConfig, server_round: int,
                            answered: list[Message]) -> dict[str, Any] | None:
        """Charge this round's client-level release to every site that answered.

        Called after aggregation and before the model is sent anywhere or saved
        (write-ahead). Returns what ``metrics.jsonl`` records of the release.
        """
        release = self.client_release(server_round)
        if release is None:
            return None
        pc = cfg.privacy
        sites = [site_of_reply(m) for m in answered]
        run_id = str(answered[0].metadata.run_id) if answered else "unknown"
        ledger.record_client_level(
            run_id=run_id, server_round=server_round, sites=sites,
            noise_multiplier=release.noise_multiplier, clipping_norm=release.clipping_norm,
            sample_rate=release.num_sampled / cfg.simulation.num_clients, delta=pc.delta,
            noise_generator=client_level_generator(cfg), accountant=pc.accountant)
        return {"noise_multiplier": release.noise_multiplier,
                "clipping_norm": release.clipping_norm, "sampled": release.num_sampled,
                "replied": release.num_replied, "noise_std": release.noise_std,
                "sites": sorted(set(sites))}

    def rejection_counts(self) -> dict[str, dict[str, int]]:
        return {site: dict(c) for site, c in sorted(self.rejections_per_client.items())}


def client_level_noise(cfg: RunConfig) -> NoiseFn:
    """The server's noise for client-level DP, from ``privacy.noise_generator``.

    ``torch``: a generator seeded from the run seed and the round, so the run
    can be reproduced; ``secure``: the OS CSPRNG (:func:`clients.noise.secure_gaussian`).
    """
    def for_round(server_round: int) -> Callable[[tuple[int, ...], float], np.ndarray]:
        if cfg.privacy.noise_generator == "secure":
            return lambda shape, std: secure_gaussian(shape, std, dtype=torch.float64).numpy()
        gen = torch.Generator().manual_seed(derive_seed(cfg.train.seed, server_round,
                                                        "client-level"))
        return lambda shape, std: torch.normal(0.0, std, shape, generator=gen,
                                               dtype=torch.float64).numpy()
    return for_round


def client_level_generator(cfg: RunConfig) -> str:
    """How the ledger names the client-level noise generator."""
    if cfg.privacy.noise_generator == "secure":
        return describe_noise_generator("secure")
    return ("torch-mt19937: torch generator seeded per (run seed, round), the server's "
            "client-level noise; reproducible, not cryptographically secure")


def build_stack(cfg: RunConfig) -> StrategyStack:
    """The configured strategy inside its wrappers (the config is already validated)."""
    s, pc = cfg.strategy, cfg.privacy
    sampling = s.sampling(cfg.simulation.num_clients)
    inner = base = build_strategy(s.name, sampling, s.params)
    client_dp = None
    if "client" in pc.levels:
        # audit=client: canary clients inside the mechanism, scored by server.empirical
        inner = client_dp = ClientLevelDP(
            base, noise_multiplier=pc.client_noise_multiplier,
            clipping_norm=pc.client_clipping_norm,
            num_sampled_clients=sampling.train_sample_size, noise=client_level_noise(cfg),
            canaries=client_membership(cfg.task))
    validation = UpdateValidation(inner, max_update_norm=s.max_update_norm)
    selection = SeededSelection(validation, seed=cfg.train.seed, sampler=base)
    return StrategyStack(BudgetAwareSelection(selection), validation, selection, client_dp)


def identify_sites(grid: Grid, send: Callable[..., list[Message]], task: dict[str, Any],
                   timeout: float) -> dict[int, str]:
    """Ask every connected node for its site name (``query.identify``): node id -> name.

    The seeded selection is keyed on names, which stay the same from run to run,
    where simulated node ids do not.
    """
    messages = [Message(RecordDict({"config": ConfigRecord(task)}), dst_node_id=node,
                        message_type=f"{MessageType.QUERY}.identify")
                for node in grid.get_node_ids()]
    names = {}
    for reply in send(grid, messages, timeout, "identification"):
        record = reply.content.get("site")
        if isinstance(record, ConfigRecord) and isinstance(record.get("site"), str):
            names[reply.metadata.src_node_id] = str(record["site"])
    return names
