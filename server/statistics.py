"""The preliminary round of federated normalisation statistics.

When ``dataset.preprocess`` has ``{name: normalize, mode: federated}``, the
server asks every site (a Flower ``query`` message) for Gaussian-noised,
clipped sums, sums of squares and counts of its cleaned features
(``clients.preprocess.local_statistics``); each site charges that release to its
ledger first. The server mirrors the charges (level ``statistics``), combines
the sums into global means and standard deviations, and sends them with every
training round, so all sites normalise alike.
"""

from __future__ import annotations

import logging
import math
from collections.abc import Callable, Iterable
from typing import Any

from flwr.app import ConfigRecord, Message, MessageType, RecordDict
from flwr.serverapp import Grid

from clients.preprocess import NoisyStatistics, combine_statistics
from clients.records import RecordError, config_record
from server.ledger import ServerLedger
from strategies.budget import is_decline

__all__ = ["federated_statistics"]

log = logging.getLogger("fedpriv")


def federated_statistics(
    grid: Grid, task: dict[str, Any], *, num_clients: int, ledger: ServerLedger,
    send: Callable[[Grid, Iterable[Message], float, str], list[Message]], timeout: float,
) -> tuple[list[float], list[float], list[dict[str, Any]]]:
    """Run the statistics round; return ``(mean, std, rejected replies)``.

    Waits until ``num_clients`` sites are connected, like the first training
    round would. A reply whose charge or statistics are malformed is rejected
    (and logged); the round goes on with the others.
    """
    import time

    deadline = time.monotonic() + timeout
    while len(nodes := list(grid.get_node_ids())) < num_clients:
        if time.monotonic() > deadline:
            raise RuntimeError(f"statistics round: {len(nodes)} of {num_clients} sites "
                               f"connected after {timeout}s")
        time.sleep(0.5)
    config = ConfigRecord({**task, "server-round": 0})
    messages = [Message(content=RecordDict({"config": config}), message_type=MessageType.QUERY,
                        dst_node_id=node) for node in nodes]
    replies = send(grid, messages, timeout, "the statistics round")
    for reply in (r for r in replies if is_decline(r)):
        status = reply.content["status"]
        log.warning("statistics round: site %s did not answer (%s): %s",
                    status.get("site"), status.get("status"), status.get("reason"))  # type: ignore[union-attr]
    kept, rejected = ledger.mirror([r for r in replies if not is_decline(r)], server_round=0)
    parts: list[NoisyStatistics] = []
    for reply in kept:
        try:
            parts.append(NoisyStatistics.from_lists(config_record(reply.content, "statistics")))
        except (RecordError, ValueError, KeyError, TypeError) as ex:
            rejected.append({"node_id": reply.metadata.src_node_id,
                             "reason": f"statistics rejected: {ex}"})
    for r in rejected:
        log.warning("statistics round: node %s: %s", r["node_id"], r["reason"])
    if not parts:
        raise RuntimeError("statistics round: no site sent usable statistics")
    mean, var = combine_statistics(parts)
    return [float(m) for m in mean], [math.sqrt(float(v)) for v in var], rejected
