"""The server's round loop: train, aggregate, evaluate, record.

fedpriv owns the loop (rather than ``Strategy.start``) so that it can see each
client's reply: per-client privacy metrics go to ``metrics.jsonl``, and a
client that raised ends the run at once with its traceback.
"""

from __future__ import annotations

import logging
import math
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from clients.config import TrainConfig, flatten
from clients.data import ArrayData, server_test_split
from clients.models import build_model
from clients.records import integer, metric_record, number
from clients.train import pick_device, predict
from privacy import epsilon
from server.config import RunConfig
from server.console import RoundReporter
from server.evaluation import classification_metrics
from server.rundir import RunDir
from strategies import STRATEGY_BUILDERS

__all__ = ["ClientFailedError", "lr_for_round", "run_federation"]

log = logging.getLogger("fedpriv")


class ClientFailedError(RuntimeError):
    """A client raised or did not reply; the run stops instead of waiting."""


def lr_for_round(cfg: TrainConfig, server_round: int) -> float:
    """Learning rate of 1-based ``server_round`` under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** ((server_round - 1) // cfg.lr_step_rounds)
    progress = (server_round - 1) / max(1, cfg.rounds - 1)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))


@dataclass
class _PrivacyTally:
    """Per client: what it reported, and what the server recomputes from its releases."""

    reported: dict[int, float] = field(default_factory=dict)
    releases: dict[int, list[tuple[float, float, int]]] = field(default_factory=dict)

    def add(self, c: dict[str, Any]) -> None:
        cid = int(c["client"])
        self.reported[cid] = max(self.reported.get(cid, 0.0), float(c["epsilon"]))
        self.releases.setdefault(cid, []).append(
            (float(c["noise_multiplier"]), float(c["sample_rate"]), int(c["steps"]))
        )

    def per_client(self, delta: float, accountant: str) -> dict[int, float]:
        """Each client's cumulative ε: the larger of what it reported and the recomputation."""
        return {cid: max(self.reported[cid],
                         epsilon(history=hist, delta=delta, accountant=accountant))
                for cid, hist in sorted(self.releases.items())}

    def epsilon_max(self, delta: float, accountant: str) -> float:
        """Largest cumulative ε of any client."""
        return max(self.per_client(delta, accountant).values(), default=0.0)


def _send(grid: Grid, messages: Iterable[Message], timeout: float, what: str) -> list[Message]:
    messages = list(messages)
    replies = list(grid.send_and_receive(messages, timeout=timeout)) if messages else []
    failed = [m for m in replies if m.has_error()]
    if failed:
        reasons = "\n".join(
            f"--- node {m.metadata.src_node_id}: {m.error.reason}" for m in failed
        )
        raise ClientFailedError(f"{len(failed)} client(s) failed during {what}:\n{reasons}")
    if len(replies) < len(messages):
        raise ClientFailedError(
            f"{len(messages) - len(replies)} of {len(messages)} client(s) did not reply to "
            f"{what} within strategy.round_timeout={timeout}s"
        )
    return replies


def _client_rows(replies: list[Message]) -> list[dict[str, Any]]:
    rows = []
    for m in replies:
        met = metric_record(m.content)
        rows.append({
            "client": integer(met, "client"),
            "num_examples": integer(met, "num-examples"),
            "epsilon": number(met, "epsilon"),
            "noise_multiplier": number(met, "noise_multiplier"),
            "sample_rate": number(met, "sample_rate"),
            "steps": integer(met, "steps"),
            "total_steps": integer(met, "total_steps"),
            "train_loss": number(met, "train_loss"),
        })
    return sorted(rows, key=lambda r: r["client"])


def _central(model: torch.nn.Module, weights: dict[str, torch.Tensor], test: ArrayData,
             device: torch.device) -> dict[str, Any]:
    model.load_state_dict(weights, strict=True)
    return classification_metrics(test.y, predict(model, test, device))


def _ema(previous: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor],
         decay: float) -> dict[str, torch.Tensor]:
    """Exponential moving average of floating-point weights (others: latest)."""
    if previous is None or decay == 0:
        return new
    return {k: decay * previous[k] + (1 - decay) * v if v.is_floating_point() else v
            for k, v in new.items()}


def run_federation(grid: Grid, cfg: RunConfig, run_dir: RunDir,
                   reporter: RoundReporter) -> dict[str, Any]:
    """Run ``cfg.train.rounds`` rounds on ``grid``; write the run directory; return the summary."""
    t0 = time.perf_counter()
    _, test = server_test_split(cfg.dataset, cfg.train.seed)
    shape = tuple(test.x.shape[1:])
    model = build_model(cfg.model, shape, test.num_classes, seed=cfg.train.seed)  # type: ignore[arg-type]
    device = pick_device()
    arrays = ArrayRecord(model.state_dict())
    s = cfg.strategy
    strategy = STRATEGY_BUILDERS[s.name](
        fraction_train=s.fraction_train, fraction_evaluate=s.fraction_evaluate,
        min_train_clients=s.min_train_clients, min_evaluate_clients=s.min_evaluate_clients,
        num_clients=cfg.simulation.num_clients,
    )
    task = flatten(cfg.task)
    tally = _PrivacyTally()
    central: dict[str, Any] = {}
    eps_max = 0.0
    smoothed: dict[str, torch.Tensor] | None = None
    with reporter:
        for rnd in range(1, cfg.train.rounds + 1):
            t_round = time.perf_counter()
            lr = lr_for_round(cfg.train, rnd)
            threads = max(1, int(cfg.simulation.num_cpus))
            config = ConfigRecord({**task, "lr": lr, "num-threads": threads})
            replies = _send(grid, strategy.configure_train(rnd, arrays, config, grid),
                            s.round_timeout, f"training round {rnd}")
            clients = _client_rows(replies)
            for c in clients:
                tally.add(c)
            new_arrays, _ = strategy.aggregate_train(rnd, replies)
            if new_arrays is None:
                raise ClientFailedError(f"round {rnd}: no client update to aggregate")
            arrays = new_arrays
            fed_eval = None
            if s.fraction_evaluate > 0 and cfg.dataset.val_fraction > 0:
                eval_config = ConfigRecord(dict(task))
                ev = _send(grid, strategy.configure_evaluate(rnd, arrays, eval_config, grid),
                           s.round_timeout, f"evaluation round {rnd}")
                agg = strategy.aggregate_evaluate(rnd, ev)
                # The weighted mean of client ids is meaningless: drop it.
                fed_eval = {k: v for k, v in agg.items() if k != "client"} if agg else None
            smoothed = _ema(smoothed, arrays.to_torch_state_dict(), s.ema)
            central = _central(model, smoothed, test, device)
            eps_max = tally.epsilon_max(cfg.privacy.delta, cfg.privacy.accountant)
            record = {
                "round": rnd, "lr": lr, "central": central, "clients": clients,
                "federated_evaluation": fed_eval, "epsilon_sample_level_max": eps_max,
                "wall_seconds": time.perf_counter() - t_round,
            }
            run_dir.append_round(record)
            log.info("round %d: central %s, eps_max %.4f", rnd,
                     {k: v for k, v in central.items() if k != "confusion_matrix"}, eps_max)
            reporter.round_done(record, eps_max)
    run_dir.save_model(smoothed if smoothed is not None else arrays.to_torch_state_dict())
    summary = _summary(cfg, central, tally, time.perf_counter() - t0)
    run_dir.write_summary(summary)
    return summary


def _summary(cfg: RunConfig, central: dict[str, Any], tally: _PrivacyTally,
             wall_seconds: float) -> dict[str, Any]:
    per_client = tally.per_client(cfg.privacy.delta, cfg.privacy.accountant)
    return {
        "rounds": cfg.train.rounds,
        "num_clients": cfg.simulation.num_clients,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "accuracy": central["accuracy"],
        "f1_macro": central["f1_macro"],
        "roc_auc_ovr": central["roc_auc_ovr"],
        "delta": cfg.privacy.delta,
        "target_epsilon": cfg.privacy.target_epsilon,
        "epsilon_sample_level_max": max(per_client.values(), default=0.0),
        "epsilon_per_client": {str(k): v for k, v in per_client.items()},
        "accountant": f"opacus-{cfg.privacy.accountant}",
        "sampling": "poisson",
        "noise_generator": "torch default PRNG, seeded per (seed, round, client); "
                           "not cryptographically secure",
        "wall_seconds": wall_seconds,
    }
