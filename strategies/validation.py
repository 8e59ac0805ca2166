"""Update validation: malformed or outsized updates never reach aggregation.

A wrapper in Flower's style (it wraps any strategy). Before the wrapped
``aggregate_train`` sees a round's replies, each reply's arrays are checked
against the global model the round was configured with:

| check | rejects a reply whose arrays |
| --- | --- |
| ``arrays`` | are missing, or come in more than one ``ArrayRecord`` |
| ``keys`` | name other tensors than the global model's |
| ``shape`` | have another shape than the global tensor of the same name |
| ``dtype`` | have another dtype |
| ``nonfinite`` | hold a NaN or an infinity |
| ``norm`` | differ from the global model by more than ``max_update_norm`` (L2, all tensors) |

Rejected replies are dropped and the round goes on with the others. Privacy:
validation runs on what already left a site; the site charged its ledger
before sending, and the server mirrors that charge before validating
(``server.loop``), so a rejected update still counts as spent.
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import numpy as np
from flwr.app import ArrayRecord, ConfigRecord, Message, MetricRecord
from flwr.serverapp import Grid
from flwr.serverapp.strategy import Strategy

from strategies.utils import StrategyWrapper

__all__ = ["CHECKS", "Rejection", "UpdateValidation", "check_update"]

CHECKS = ("arrays", "keys", "shape", "dtype", "nonfinite", "norm")


@dataclass(frozen=True)
class Rejection:
    """One reply refused before aggregation: which node, which check, and why."""

    server_round: int
    node_id: int
    check: str
    reason: str


def check_update(arrays: Mapping[str, np.ndarray], reference: Mapping[str, np.ndarray],
                 max_update_norm: float | None = None) -> tuple[str, str] | None:
    """The first check ``arrays`` fails against ``reference``, as ``(check, reason)``.

    ``None`` when the update is well formed (and, with a bound, small enough).
    """
    if set(arrays) != set(reference):
        extra, missing = sorted(set(arrays) - set(reference)), sorted(set(reference) - set(arrays))
        return "keys", f"unexpected tensors {extra}, missing {missing}"
    for key, ref in reference.items():
        got = arrays[key]
        if got.shape != ref.shape:
            return "shape", f"{key}: shape {list(got.shape)}, expected {list(ref.shape)}"
        if got.dtype != ref.dtype:
            return "dtype", f"{key}: dtype {got.dtype}, expected {ref.dtype}"
    for key, got in arrays.items():
        if got.dtype.kind in "fc" and not np.all(np.isfinite(got)):
            bad = int(np.size(got) - np.count_nonzero(np.isfinite(got)))
            return "nonfinite", f"{key}: {bad} NaN or infinite value(s)"
    if max_update_norm is not None:
        sq = sum(float(np.sum((arrays[k].astype(np.float64) - ref.astype(np.float64)) ** 2))
                 for k, ref in reference.items())
        norm = math.sqrt(sq)
        if not norm <= max_update_norm:
            return "norm", f"update L2 norm {norm:.6g} > max_update_norm={max_update_norm:g}"
    return None


class UpdateValidation(StrategyWrapper):
    """Wrap ``strategy`` so that only well-formed updates are aggregated.

    Parameters
    ----------
    strategy : the strategy that aggregates the replies that pass.
    max_update_norm : reject an update (reply − global model) whose L2 norm is
        larger; ``None``: no bound. Must be > 0.
    arrayrecord_key : where replies carry their arrays.

    Attributes
    ----------
    rejections : every rejection so far, in order.
    """

    def __init__(self, strategy: Strategy, *, max_update_norm: float | None = None,
                 arrayrecord_key: str = "arrays") -> None:
        super().__init__(strategy)
        if max_update_norm is not None and not (math.isfinite(max_update_norm)
                                                and max_update_norm > 0):
            raise ValueError(f"max_update_norm={max_update_norm}: must be a finite number > 0")
        self.max_update_norm = max_update_norm
        self.arrayrecord_key = arrayrecord_key
        self.rejections: list[Rejection] = []
        self._reference: dict[str, np.ndarray] | None = None

    def configure_train(self, server_round: int, arrays: ArrayRecord, config: ConfigRecord,
                        grid: Grid) -> Iterable[Message]:
        self._reference = {k: a.numpy() for k, a in arrays.items()}
        return self.strategy.configure_train(server_round, arrays, config, grid)

    def _why(self, reply: Message) -> tuple[str, str] | None:
        if self._reference is None:
            raise RuntimeError("aggregate_train before configure_train: no global model to "
                               "validate updates against")
        records = reply.content.array_records if reply.has_content() else {}
        if len(records) != 1 or self.arrayrecord_key not in records:
            return "arrays", f"expected one ArrayRecord {self.arrayrecord_key!r}, got " \
                             f"{sorted(records)}"
        got = {k: a.numpy() for k, a in records[self.arrayrecord_key].items()}
        return check_update(got, self._reference, self.max_update_norm)

    def screen(self, server_round: int, replies: Iterable[Message]
               ) -> tuple[list[Message], list[Rejection]]:
        """Split ``replies`` into those that pass and the rejections (recorded)."""
        kept, rejected = [], []
        for reply in replies:
            why = self._why(reply)
            if why is None:
                kept.append(reply)
            else:
                rejected.append(Rejection(server_round, reply.metadata.src_node_id, *why))
        self.rejections.extend(rejected)
        return kept, rejected

    def aggregate_train(self, server_round: int, replies: Iterable[Message]
                        ) -> tuple[ArrayRecord | None, MetricRecord | None]:
        kept, _ = self.screen(server_round, replies)
        if not kept:
            return None, None
        return self.strategy.aggregate_train(server_round, kept)
