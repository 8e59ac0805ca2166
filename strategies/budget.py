"""Budget-aware selection: never ask a site whose privacy budget is spent.

(Nor one whose data failed to load: it answered ``data_error`` and is left out
of training and evaluation for the rest of the run.)

A wrapper in Flower's style (like ``DifferentialPrivacyServerSideFixedClipping``):
it wraps any strategy. Sites enforce their own caps (a site whose next round
would cross its cap answers ``budget_exhausted`` instead of training); this
wrapper learns from those answers, and from each site's ``can-afford-next``
flag, which sites are spent, and hides them from the wrapped strategy's
sampling from then on. Declines never reach the wrapped ``aggregate_train``.
"""

from __future__ import annotations

import time
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any, cast

from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

__all__ = ["BudgetAwareSelection", "Decline", "is_decline"]

STATUS_KEY = "status"
EXHAUSTED = "budget_exhausted"
DATA_ERROR = "data_error"  # the site's data failed to load or validate
DECLINES = (EXHAUSTED, DATA_ERROR)


@dataclass(frozen=True)
class Decline:
    node_id: int
    site: str
    binding_cap: str  # "site" or "global" (budget declines)
    reason: str
    status: str = EXHAUSTED


def is_decline(reply: Message) -> bool:
    """Whether ``reply`` is a site's structured refusal (budget spent, or bad data)."""
    status = reply.content.get(STATUS_KEY) if reply.has_content() else None
    return isinstance(status, ConfigRecord) and status.get("status") in DECLINES


def _decline(reply: Message) -> Decline:
    status = cast(ConfigRecord, reply.content[STATUS_KEY])  # is_decline checked it
    return Decline(reply.metadata.src_node_id, str(status.get("site", "?")),
                   str(status.get("binding-cap", "site")), str(status.get("reason", "")),
                   str(status.get("status")))


class _EligibleGrid(Grid):
    """A view of ``grid`` whose ``get_node_ids`` leaves out ``excluded`` nodes."""

    def __init__(self, grid: Grid, excluded: set[int]) -> None:
        self._grid = grid
        self._excluded = excluded

    def get_node_ids(self) -> Iterable[int]:
        return [n for n in self._grid.get_node_ids() if n not in self._excluded]

    def __getattr__(self, name: str) -> Any:
        return getattr(self._grid, name)

    # Grid's abstract methods, delegated.
    def set_run(self, run: Any) -> None:
        self._grid.set_run(run)

    @property
    def run(self) -> Any:
        return self._grid.run

    def create_message(self, *args: Any, **kwargs: Any) -> Message:
        return self._grid.create_message(*args, **kwargs)

    def push_messages(self, messages: Iterable[Message]) -> Iterable[str]:
        return self._grid.push_messages(messages)

    def pull_messages(self, message_ids: Iterable[str]) -> Iterable[Message]:
        return self._grid.pull_messages(message_ids)

    def send_and_receive(self, messages: Iterable[Message], *,
                         timeout: float | None = None) -> Iterable[Message]:
        return self._grid.send_and_receive(messages, timeout=timeout)


class BudgetAwareSelection(Strategy):
    """Wrap ``strategy`` so that spent sites are never selected again.

    Parameters
    ----------
    strategy : the strategy whose sampling and aggregation are used.

    Attributes
    ----------
    exhausted : node id -> why it is no longer selected.
    declines : every decline seen, in order.
    global_cap_reached : a site declined, or cannot afford its next round,
        because of the global cap (not its own): the run should end.
    min_available : when set, sample among the nodes connected at the time, as
        long as at least this many are. Flower's samplers otherwise wait for
        the wrapped strategy's ``min_available_nodes`` and would wait forever
        for a site that never comes back.
    """

    def __init__(self, strategy: Strategy) -> None:
        self.strategy = strategy
        self.exhausted: dict[int, str] = {}
        self.declines: list[Decline] = []
        self._by_node: dict[int, Decline] = {}
        self.global_cap_reached = False
        self.min_available: int | None = None

    def wait_for(self, grid: Grid, want: int, timeout: float, poll: float = 1.0) -> int:
        """Wait up to ``timeout`` s until ``want`` nodes are connected; return how many are."""
        deadline = time.monotonic() + timeout
        while (have := len(list(grid.get_node_ids()))) < want and time.monotonic() < deadline:
            time.sleep(poll)
        return have

    def _inner_min(self, inner_min: int, left_out: int, grid: Grid) -> int:
        want = max(1, inner_min - left_out)
        if self.min_available is None:
            return want
        connected = len(list(grid.get_node_ids())) - left_out
        return max(self.min_available, min(want, connected))

    def eligible(self, grid: Grid) -> list[int]:
        return [n for n in grid.get_node_ids() if n not in self.exhausted]

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        view = _EligibleGrid(grid, set(self.exhausted))
        # Flower's samplers wait until `min_available_nodes` are connected: spent
        # sites will never count again, so wait only for the others.
        inner_min = getattr(self.strategy, "min_available_nodes", None)
        if inner_min is not None:
            self.strategy.min_available_nodes = self._inner_min(  # type: ignore[attr-defined]
                inner_min, len(self.exhausted), grid)
        try:
            return list(self.strategy.configure_train(server_round, arrays, config, view))
        finally:
            if inner_min is not None:
                self.strategy.min_available_nodes = inner_min  # type: ignore[attr-defined]

    def split(self, replies: Iterable[Message]) -> tuple[list[Message], list[Decline]]:
        """Trained replies and declines; remembers spent sites."""
        trained, declined = [], []
        for reply in replies:
            if is_decline(reply):
                d = _decline(reply)
                declined.append(d)
                self.exhausted[d.node_id] = d.reason
                self.global_cap_reached |= d.status == EXHAUSTED and d.binding_cap == "global"
                continue
            trained.append(reply)
            metrics, info = reply.content.get("metrics"), reply.content.get("ledger")
            if isinstance(metrics, MetricRecord) and metrics.get("can-afford-next", 1) == 0:
                binding = info.get("binding-cap") if isinstance(info, ConfigRecord) else None
                which = binding if isinstance(binding, str) else "site"
                self.exhausted[reply.metadata.src_node_id] = (
                    f"its next round would exceed its {which} epsilon cap")
                self.global_cap_reached |= binding == "global"
        self.declines.extend(declined)
        self._by_node.update({d.node_id: d for d in declined})
        return trained, declined

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        trained, _ = self.split(replies)
        if not trained:
            return None, None
        return self.strategy.aggregate_train(server_round, trained)

    def configure_evaluate(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                           grid: Grid) -> Iterable[Message]:
        # Spent sites may still evaluate (it costs no DP budget); a site whose data
        # failed cannot.
        broken = {n for n, d in self._by_node.items() if d.status == DATA_ERROR}
        view = _EligibleGrid(grid, broken)
        inner_min = getattr(self.strategy, "min_available_nodes", None)
        if inner_min is not None:
            self.strategy.min_available_nodes = self._inner_min(  # type: ignore[attr-defined]
                inner_min, len(broken), grid)
        try:
            return list(self.strategy.configure_evaluate(server_round, arrays, config, view))
        finally:
            if inner_min is not None:
                self.strategy.min_available_nodes = inner_min  # type: ignore[attr-defined]

    def aggregate_evaluate(self, server_round: int, replies: Iterable[Message]
                           ) -> MetricRecord | None:
        return self.strategy.aggregate_evaluate(server_round, replies)

    def summary(self) -> None:
        self.strategy.summary()
