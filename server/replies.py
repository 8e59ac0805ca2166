"""Sending one round's messages and sorting the replies: answered, lost, or failed.

A deployed site can vanish in the middle of a round (its machine reboots, its
SuperNode is killed). Flower then answers for it: after the SuperNode misses
its heartbeats the SuperLink returns an error reply (``NODE_UNAVAILABLE``); a
ClientApp process that dies answers ``CLIENT_APP_CRASHED``; a node that never
answers is simply missing when ``round_timeout`` runs out. Such a site is
*lost* for the round: the round goes on with the others and ``metrics.jsonl``
records who was lost and why. Whatever the site charged to its own ledger
before it vanished stays there (write-ahead charging), so the audit still
counts it.

A ClientApp that *raised* is different: that is a bug or a bad configuration,
not an outage, and the run stops at once with the client's traceback
(:class:`ClientFailedError`).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable
from dataclasses import asdict, dataclass

from flwr.app import Message
from flwr.common.constant import ErrorCode
from flwr.serverapp import Grid

__all__ = ["ClientFailedError", "Lost", "RoundSender", "LOST_CODES"]

log = logging.getLogger("fedpriv")

# Error codes meaning "the site is gone", not "the site's code is broken".
LOST_CODES = {
    ErrorCode.NODE_UNAVAILABLE: "node unavailable (missed heartbeats)",
    ErrorCode.MESSAGE_UNAVAILABLE: "message unavailable",
    ErrorCode.REPLY_MESSAGE_UNAVAILABLE: "reply expired",
    ErrorCode.CLIENT_APP_CRASHED: "ClientApp process crashed",
}


class ClientFailedError(RuntimeError):
    """A client raised (or could not load its app); the run stops instead of waiting."""


@dataclass(frozen=True)
class Lost:
    """A node that did not answer a round."""

    node_id: int
    round: int
    what: str
    reason: str

    def as_dict(self) -> dict[str, object]:
        return asdict(self)


# How often the server looks for replies when the grid does not say (Flower's own
# send_and_receive sleeps 3 s between looks on a deployment's grid, so every round
# waited 1.5 s on average after its last reply); a look is one request to the SuperLink.
PULL_INTERVAL_S = 0.2


def _exchange(grid: Grid, sent: list[Message], timeout: float,
              meanwhile: Callable[[], None] | None) -> list[Message]:
    """Push ``sent``, run ``meanwhile``, then pull replies until all are in or ``timeout``
    (from the push) has passed: Flower's ``send_and_receive`` with a gap for the server."""
    waiting = set(grid.push_messages(sent)) if sent else set()
    deadline = time.monotonic() + timeout
    if meanwhile is not None:
        meanwhile()
    interval = float(getattr(grid, "pull_interval", PULL_INTERVAL_S))
    replies: list[Message] = []
    while waiting:
        got = list(grid.pull_messages(waiting))
        replies.extend(got)
        waiting.difference_update(m.metadata.reply_to_message_id for m in got)
        if not waiting or time.monotonic() >= deadline:
            break
        time.sleep(min(interval, max(0.0, deadline - time.monotonic())))
    return replies


class RoundSender:
    """Sends a round's messages; keeps the nodes that were lost until taken.

    Owned by one run's loop (``server.loop.run_federation``); ``lost`` grows
    with each call and :meth:`take_lost` empties it into the round's record.
    """

    def __init__(self) -> None:
        self.lost: list[Lost] = []
        self.round = 0

    def __call__(self, grid: Grid, messages: Iterable[Message], timeout: float,
                 what: str, meanwhile: Callable[[], None] | None = None) -> list[Message]:
        """The answered replies to ``messages``; raises if a client's app raised.

        ``meanwhile`` runs once the messages are out, while the clients work (the
        server's bookkeeping of the round before); ``timeout`` counts from then too.
        """
        sent = list(messages)
        replies = _exchange(grid, sent, timeout, meanwhile)
        dst_of = {m.metadata.message_id: m.metadata.dst_node_id for m in sent
                  if m.metadata.message_id}
        answered, failed, lost_ids = [], [], {}
        for r in replies:
            if not r.has_error():
                answered.append(r)
                continue
            node = dst_of.get(r.metadata.reply_to_message_id, r.metadata.src_node_id)
            if r.error.code in LOST_CODES:
                lost_ids[node] = f"{LOST_CODES[r.error.code]}: {r.error.reason}"
            else:
                failed.append((node, r.error.reason))
        if failed:
            reasons = "\n".join(f"--- node {n}: {reason}" for n, reason in failed)
            raise ClientFailedError(f"{len(failed)} client(s) failed during {what}:\n{reasons}")
        seen = {r.metadata.src_node_id for r in answered} | set(lost_ids)
        for m in sent:
            if m.metadata.dst_node_id not in seen:
                lost_ids[m.metadata.dst_node_id] = f"no reply within round_timeout={timeout}s"
        for node, reason in sorted(lost_ids.items()):
            log.warning("%s: node %s lost: %s", what, node, reason)
            self.lost.append(Lost(node, self.round, what, reason))
        return answered

    def take_lost(self) -> list[dict[str, object]]:
        out = [x.as_dict() for x in self.lost]
        self.lost = []
        return out
