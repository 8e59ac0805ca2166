"""A client's privacy state: its calibrated σ and its accountant history.

Kept in Flower's ``context.state`` (which lives across rounds of a run) and,
when the node config names a ``state-dir`` (a real site), also on disk, so a
restarted client resumes its spending instead of starting from zero. When
both exist, the one with more steps wins: over-count, never under-count.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field
from pathlib import Path

from flwr.app import ConfigRecord, Context

from clients.records import config_record, number, numbers
from privacy import Release

__all__ = ["PrivacyState", "load_state", "save_state"]

STATE_KEY = "fedpriv.privacy"
STATE_FILE = "privacy_state.json"


@dataclass(frozen=True)
class PrivacyState:
    noise_multiplier: float
    history: list[Release] = field(default_factory=list)

    @property
    def total_steps(self) -> int:
        return sum(n for _, _, n in self.history)


def _state_file(context: Context) -> Path | None:
    folder = context.node_config.get("state-dir")
    return Path(str(folder)) / STATE_FILE if folder else None


def _from_record(context: Context) -> PrivacyState | None:
    if STATE_KEY not in context.state:
        return None
    rec = config_record(context.state, STATE_KEY)
    hist = zip(numbers(rec, "sigma_hist"), numbers(rec, "q_hist"), numbers(rec, "steps_hist"),
               strict=True)
    return PrivacyState(number(rec, "noise_multiplier"), [(s, q, int(k)) for s, q, k in hist])


def _from_disk(path: Path | None) -> PrivacyState | None:
    if path is None or not path.exists():
        return None
    data = json.loads(path.read_text())
    return PrivacyState(float(data["noise_multiplier"]),
                        [(float(s), float(q), int(k)) for s, q, k in data["history"]])


def load_state(context: Context) -> PrivacyState | None:
    """The most-spent known state, or ``None`` for a client that never trained."""
    known = [s for s in (_from_record(context), _from_disk(_state_file(context))) if s]
    return max(known, key=lambda s: s.total_steps) if known else None


def save_state(context: Context, state: PrivacyState) -> None:
    """Persist ``state`` (atomically and fsynced when on disk)."""
    context.state[STATE_KEY] = ConfigRecord({
        "noise_multiplier": state.noise_multiplier,
        "sigma_hist": [float(s) for s, _, _ in state.history],
        "q_hist": [float(q) for _, q, _ in state.history],
        "steps_hist": [int(k) for _, _, k in state.history],
    })
    path = _state_file(context)
    if path is None:
        return
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    with open(tmp, "w", encoding="utf-8") as fh:
        json.dump({"noise_multiplier": state.noise_multiplier,
                   "history": [list(r) for r in state.history]}, fh)
        fh.flush()
        os.fsync(fh.fileno())
    os.replace(tmp, path)
