"""The server's round loop: train, aggregate, evaluate, record.

fedpriv owns the loop (rather than ``Strategy.start``) so that it can see each
client's reply: per-client privacy metrics go to ``metrics.jsonl``, and a
client that raised ends the run at once with its traceback.
"""

from __future__ import annotations

import functools
import logging
import math
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from flwr.app import ArrayRecord, ConfigRecord, Message
from flwr.serverapp import Grid

from clients.config import TrainConfig, flatten
from clients.data import ArrayData
from clients.models import build_model
from clients.records import integer, metric_record, number
from clients.sitedata import (
    CLIENT_CUT_KEY,
    STATS_MEAN_KEY,
    STATS_STD_KEY,
    input_shape_of,
    server_test_data,
    statistics_step,
)
from clients.state import STATE_ROOT_KEY
from clients.train import pick_device, predict
from server.config import RunConfig
from server.console import RoundReporter
from server.empirical import canary_audit
from server.evaluation import classification_metrics
from server.ledger import ServerLedger
from server.replies import ClientFailedError, RoundSender
from server.rundir import RunDir
from server.statistics import federated_statistics
from server.strategy import build_stack, identify_sites, site_of_reply
from strategies.budget import BudgetAwareSelection, is_decline

__all__ = ["ClientFailedError", "lr_for_round", "run_federation"]

log = logging.getLogger("fedpriv")


def lr_for_round(cfg: TrainConfig, server_round: int) -> float:
    """Learning rate of 1-based ``server_round`` under ``cfg.lr_schedule``."""
    if cfg.lr_schedule == "constant":
        return cfg.lr
    if cfg.lr_schedule == "step":
        return cfg.lr * cfg.lr_gamma ** ((server_round - 1) // cfg.lr_step_rounds)
    progress = (server_round - 1) / max(1, cfg.rounds - 1)
    return cfg.lr_min + 0.5 * (cfg.lr - cfg.lr_min) * (1 + math.cos(math.pi * progress))


def _client_rows(replies: list[Message]) -> list[dict[str, Any]]:
    rows = []
    for m in replies:
        met = metric_record(m.content)
        cap = number(met, "epsilon-cap")
        rows.append({
            "client": integer(met, "client"),
            "site": site_of_reply(m),
            "num_examples": integer(met, "num-examples"),
            "epsilon": number(met, "epsilon"),
            "epsilon_cap": cap if cap > 0 else None,
            "noise_multiplier": number(met, "noise_multiplier"),
            "sample_rate": number(met, "sample_rate"),
            "steps": integer(met, "steps"),
            "total_steps": integer(met, "total_steps"),
            "train_loss": number(met, "train_loss"),
        })
    return sorted(rows, key=lambda r: r["client"])


def _central_probs(model: torch.nn.Module, weights: dict[str, torch.Tensor], test: ArrayData,
                   device: torch.device) -> np.ndarray:
    model.load_state_dict(weights, strict=True)
    return predict(model, test, device)


def _ema(previous: dict[str, torch.Tensor] | None, new: dict[str, torch.Tensor],
         decay: float) -> dict[str, torch.Tensor]:
    """Exponential moving average of floating-point weights (others: latest)."""
    if previous is None or decay == 0:
        return new
    return {k: decay * previous[k] + (1 - decay) * v if v.is_floating_point() else v
            for k, v in new.items()}


class _SiteEpsilons:
    """Each site's sample-level ε in the server ledger, brought up to date with the
    sites that have rows after the last update, wherever they were written (ε is a
    function of a site's rows: the others' are unchanged)."""

    def __init__(self, ledger: ServerLedger, delta: float, accountant: str) -> None:
        self._ledger, self._delta, self._accountant = ledger, delta, accountant
        self._seen_seq, _ = ledger.ledger.head()
        self._by_site = ledger.per_site(delta, accountant)

    def largest(self) -> float:
        """The largest site's ε, every row so far taken in."""
        new_rows = self._ledger.ledger.rows(after_seq=self._seen_seq)
        if new_rows:
            self._seen_seq = new_rows[-1].seq
        self._by_site.update(self._ledger.per_site(self._delta, self._accountant,
                                                   sites={r.charge.site for r in new_rows}))
        return max(self._by_site.values(), default=0.0)


def _book(record: dict[str, Any], epsilons: _SiteEpsilons, ledger: ServerLedger,
          cfg: RunConfig, records: _Records, central: Future[dict[str, Any]] | None,
          t_start: float, t_next: float | None) -> None:
    """A round's bookkeeping that the next round does not wait for: ε for its record,
    then the record, written as soon as its central evaluation is done."""
    record["epsilon_sample_level_max"] = eps_max = epsilons.largest()
    record["epsilon_client_level"] = _max_epsilon(ledger, cfg, "client")
    records.hold(record, eps_max, central, t_start, t_next)
    records.write(wait=False)


class _Records:
    """Round records, each written once its central evaluation is done.

    The clients' workers would otherwise wait while the server finishes a round, so
    what the next round does not need waits for its messages to go out: the
    metrics of round r's central evaluation are computed on one thread of its own
    (from the model's probabilities, computed before: a model's pass beside
    busy workers contends with them for the CPUs and, in small torch calls, for
    the GIL), and the rest of the round's bookkeeping (each site's ε for the
    record) is deferred to :meth:`catch_up`, which round r+1 calls once its
    messages are out. Round r's record and progress line are written then or,
    when the evaluation is still running, once round r+1's replies are in (or the
    loop ends): always in round order. A round's ``wall_seconds`` is the time from
    its start to the next round's start (for the last round: to the end of its
    evaluation), so the rounds' times still add up to the loop's. Owned by
    :func:`run_federation`, for one run.
    """

    def __init__(self, run_dir: RunDir, reporter: RoundReporter, outcome: _Outcome) -> None:
        self._run_dir, self._reporter, self._outcome = run_dir, reporter, outcome
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="fedpriv-central")
        self._held: tuple[dict[str, Any], float, Future[dict[str, Any]] | None,
                          float, float | None] | None = None
        self._deferred: Callable[[float | None], None] | None = None
        self._evaluating: Future[dict[str, Any]] | None = None
        self.central: dict[str, Any] = {}  # the last written round's central metrics

    def evaluate(self, fn: Callable[..., dict[str, Any]], *args: Any) -> Future[dict[str, Any]]:
        """Start ``fn(*args)`` on the evaluation thread once the evaluation before it is
        done: at most one runs beside a round, so a slow evaluation holds the loop
        back instead of piling up behind it."""
        if self._evaluating is not None:
            self._evaluating.exception()  # waits; a failure is raised when its record is
        self._evaluating = self._pool.submit(fn, *args)
        return self._evaluating

    def defer(self, bookkeeping: Callable[[float | None], None]) -> None:
        """Keep a round's remaining bookkeeping for :meth:`catch_up`."""
        self.catch_up(None)
        self._deferred = bookkeeping

    def catch_up(self, t_next: float | None) -> None:
        """Run the deferred bookkeeping, if any (once); ``t_next``: when the next round
        started (``None``: there is none)."""
        todo, self._deferred = self._deferred, None
        if todo is not None:
            todo(t_next)

    def hold(self, record: dict[str, Any], eps_max: float,
             central: Future[dict[str, Any]] | None, t_start: float,
             t_next: float | None) -> None:
        """Keep ``record`` until ``central`` (its evaluation) is done; the one held
        before is written first."""
        self.write()
        self._held = (record, eps_max, central, t_start, t_next)

    def write(self, wait: bool = True) -> None:
        """Write the held record, waiting for its evaluation (``wait=False``: only when
        that is done already)."""
        if self._held is None:
            return
        record, eps_max, future, t_start, t_next = self._held
        if not wait and future is not None and not future.done():
            return
        self._held = None
        central = future.result() if future is not None else {}
        record["central"] = central
        record["wall_seconds"] = (time.perf_counter() if t_next is None else t_next) - t_start
        self._run_dir.append_round(record)
        self._outcome.rounds_completed = record["round"]
        self.central = central
        log.info("round %d: central %s, eps_max %.4f", record["round"],
                 {k: v for k, v in central.items() if k != "confusion_matrix"}, eps_max)
        self._reporter.round_done(record, eps_max)

    def __enter__(self) -> _Records:
        return self

    def __exit__(self, *exc: object) -> None:
        """Finish the deferred bookkeeping and write the held record (also when the loop
        raised), then stop the thread."""
        try:
            self.catch_up(None)
            self.write()
        finally:
            self._pool.shutdown(wait=True)


@dataclass
class _Outcome:
    """How the round loop ended."""

    stop_reason: str = "completed"
    detail: str = ""
    rounds_completed: int = 0
    rejected: int = 0
    rejections_per_client: dict[str, dict[str, int]] | None = None
    statistics: dict[str, Any] | None = None


def _stop_before_round(budget: BudgetAwareSelection, grid: Grid, cfg: RunConfig) -> str | None:
    """Why no further round can run, or ``None`` when one can."""
    if not budget.exhausted:
        return None
    eligible = budget.eligible(grid)
    if len(eligible) < cfg.strategy.min_train_clients:
        return (f"{len(eligible)} site(s) with budget left, fewer than "
                f"strategy.min_train_clients={cfg.strategy.min_train_clients}")
    return None


def run_federation(grid: Grid, cfg: RunConfig, run_dir: RunDir,
                   reporter: RoundReporter, client_cut: Path | None = None) -> dict[str, Any]:
    """Run up to ``cfg.train.rounds`` rounds on ``grid``; write the run directory.

    ``client_cut``: where every client's data was saved (:func:`clients.data.save_cut`),
    told to the clients with every task.

    Stops early, cleanly, when too few sites have budget left or a site
    declines because the global ε cap would be crossed (``stop_reason``).
    """
    t0 = time.perf_counter()
    shape, num_classes = input_shape_of(cfg.dataset)
    model = build_model(cfg.model, shape, num_classes, seed=cfg.train.seed)
    device = pick_device()
    arrays = ArrayRecord(model.state_dict())
    s = cfg.strategy
    stack = build_stack(cfg)
    budget = stack.budget
    task = {**flatten(cfg.task), STATE_ROOT_KEY: str(run_dir.sites_dir)}
    if client_cut is not None:
        task[CLIENT_CUT_KEY] = str(client_cut)
    ledger = ServerLedger(run_dir.ledger_path)
    pc = cfg.privacy
    smoothed: dict[str, torch.Tensor] | None = None
    outcome = _Outcome()
    send = RoundSender()  # lost sites are recorded per round, the round goes on
    # audit=sample: each site's canary block; audit=client: the canary clients inside
    # the client-level DP mechanism; scored at the end.
    canaries = canary_audit(cfg, stack.client_dp)
    try:
        stats = None
        if statistics_step(cfg.dataset) is not None:
            mean, std, rejected = federated_statistics(
                grid, task, num_clients=cfg.simulation.num_clients, ledger=ledger, send=send,
                timeout=s.round_timeout)
            task.update({STATS_MEAN_KEY: mean, STATS_STD_KEY: std})
            stats = (mean, std)
            outcome.statistics = {"mean": mean, "std": std, "rejected": rejected}
            outcome.rejected += len(rejected)
        test = server_test_data(cfg.dataset, cfg.train.seed, stats)
        # Wait (bounded) for every site once; from then on each round samples among
        # the sites connected, so one that never comes back cannot stall the run.
        have = budget.wait_for(grid, cfg.simulation.num_clients, s.round_timeout)
        if have < cfg.simulation.num_clients:
            log.warning("%d of %d sites connected after %ss; starting with them", have,
                        cfg.simulation.num_clients, s.round_timeout)
        budget.min_available = s.min_train_clients
        if s.fraction_train < 1:  # the seeded selection is keyed on site names
            stack.selection.names = identify_sites(grid, send, task, s.round_timeout)
        epsilons = _SiteEpsilons(ledger, pc.delta, pc.accountant)
        with reporter, _Records(run_dir, reporter, outcome) as records:
            for rnd in range(1, cfg.train.rounds + 1):
                why = _stop_before_round(budget, grid, cfg)
                if why:
                    outcome.stop_reason, outcome.detail = "budget_exhausted", why
                    break
                t_round = time.perf_counter()
                lr = lr_for_round(cfg.train, rnd)
                threads = max(1, int(cfg.simulation.num_cpus))
                config = ConfigRecord({**task, "lr": lr, "num-threads": threads})
                send.round = rnd
                replies = send(grid, budget.configure_train(rnd, arrays, config, grid),
                               s.round_timeout, f"training round {rnd}",
                               meanwhile=functools.partial(records.catch_up, t_round))
                records.write(wait=False)  # the round before's, if its evaluation is done
                trained, declined = budget.split(replies)
                canaries.collect(rnd, lr, trained)  # out of the replies: never aggregated
                for d in declined:
                    log.warning("round %d: site %s did not train (%s): %s", rnd, d.site,
                                d.status, d.reason)
                # Mirror each release into the server ledger before anything derived
                # from it (the aggregate, metrics) leaves this process.
                answered = trained
                trained, rejected = ledger.mirror(
                    trained, rnd, site_levels=bool({"sample", "local"} & set(pc.levels)))
                # Then validate: a rejected update has still been charged.
                trained, rejected = stack.screen(rnd, trained, rejected, answered)
                outcome.rejected += len(rejected)
                new_arrays = None
                if trained:
                    new_arrays, _ = budget.strategy.aggregate_train(rnd, trained)
                if new_arrays is None:
                    outcome.stop_reason = "no_updates"
                    if declined:
                        outcome.stop_reason = "global_epsilon_cap" if \
                            budget.global_cap_reached else "budget_exhausted"
                    outcome.detail = (f"round {rnd}: no site trained ({len(declined)} "
                                      f"declined, {len(rejected)} rejected)")
                    break
                arrays = new_arrays
                # Client-level DP: charged before the noisy model goes anywhere.
                client_level = stack.charge_client_level(ledger, cfg, rnd, answered)
                fed_eval = None
                if s.fraction_evaluate > 0 and cfg.dataset.val_fraction > 0:
                    ev = send(grid, budget.configure_evaluate(rnd, arrays, ConfigRecord(task),
                                                               grid),
                               s.round_timeout, f"evaluation round {rnd}")
                    agg = budget.aggregate_evaluate(rnd, [m for m in ev if not is_decline(m)])
                    # The weighted mean of client ids is meaningless: drop it.
                    fed_eval = {k: v for k, v in agg.items() if k != "client"} if agg else None
                smoothed = _ema(smoothed, arrays.to_torch_state_dict(), s.ema)
                # The model's pass over the test set here, with every CPU (the workers
                # wait for this round's model); the metrics beside the next round.
                evaluated = records.evaluate(
                    classification_metrics, test.y,
                    _central_probs(model, smoothed, test, device)) if test is not None else None
                record = {
                    "round": rnd, "lr": lr, "central": None, "clients": _client_rows(trained),
                    "declined": [{k: v for k, v in vars(d).items() if k != "node_id"}
                                 for d in declined],
                    "rejected": rejected,
                    "lost": send.take_lost(),
                    "federated_evaluation": fed_eval, "epsilon_sample_level_max": None,
                    "selected": stack.selection.selected.get(rnd),
                    "client_level": client_level,
                    "epsilon_client_level": None,
                    "wall_seconds": None,
                }
                # Filled in and written while the next round trains.
                records.defer(functools.partial(_book, record, epsilons, ledger, cfg, records,
                                                evaluated, t_round))
                if budget.global_cap_reached:
                    outcome.stop_reason = "global_epsilon_cap"
                    outcome.detail = (f"after round {rnd}: a site's next release would cross "
                                      f"privacy.epsilon_cap={pc.epsilon_cap}")
                    break
        central = records.central
        if smoothed is not None or outcome.rounds_completed:
            run_dir.save_model(smoothed if smoothed is not None
                               else arrays.to_torch_state_dict())
        outcome.rejections_per_client = stack.rejection_counts()
        summary = _summary(cfg, central, ledger, outcome, time.perf_counter() - t0)
        summary["epsilon_empirical_lower_bound"] = canaries.finish(ledger, run_dir.path)
        run_dir.write_summary(summary)
    finally:
        ledger.close()
    if outcome.stop_reason != "completed":
        log.warning("run stopped early: %s (%s)", outcome.stop_reason, outcome.detail)
    return summary


def _max_epsilon(ledger: ServerLedger, cfg: RunConfig, level: str) -> float | None:
    """The largest cumulative ε of any site at ``level`` (``None`` when the level is off)."""
    if level not in cfg.privacy.levels:
        return None
    return max(ledger.per_site(cfg.privacy.delta, cfg.privacy.accountant, level=level).values(),
               default=0.0)


def _summary(cfg: RunConfig, central: dict[str, Any], ledger: ServerLedger, outcome: _Outcome,
             wall_seconds: float) -> dict[str, Any]:
    per_client = ledger.per_site(cfg.privacy.delta, cfg.privacy.accountant)
    rows, head = ledger.ledger.head()
    return {
        "rounds": cfg.train.rounds,
        "rounds_completed": outcome.rounds_completed,
        "stop_reason": outcome.stop_reason,
        "stop_detail": outcome.detail,
        "num_clients": cfg.simulation.num_clients,
        "dataset": cfg.dataset.name,
        "model": cfg.model.name,
        "accuracy": central.get("accuracy"),
        "f1_macro": central.get("f1_macro"),
        "roc_auc_ovr": central.get("roc_auc_ovr"),
        "delta": cfg.privacy.delta,
        "target_epsilon": cfg.privacy.target_epsilon,
        "epsilon_sample_level_max": max(per_client.values(), default=0.0),
        "privacy_levels": list(cfg.privacy.levels),
        "client_selection": {"seed": cfg.train.seed, "fraction_train": cfg.strategy.fraction_train,
                             "rule": "the k sites with the smallest sha256(seed/round/site)"},
        # Client-level DP (the server's releases) and local DP (the sites'): the largest
        # cumulative epsilon of any site at that level, recomputed from the ledger rows;
        # null when the level is off.
        "epsilon_client_level": _max_epsilon(ledger, cfg, "client"),
        "epsilon_local_level_max": _max_epsilon(ledger, cfg, "local"),
        "epsilon_per_client": per_client,
        # Every release that touched a site's records (sample + statistics levels).
        "epsilon_total_per_client": ledger.per_site(cfg.privacy.delta, cfg.privacy.accountant,
                                                    level=None),
        "federated_statistics": outcome.statistics,
        "epsilon_caps": ledger.caps(),
        "updates_rejected": outcome.rejected,
        "rejections_per_client": outcome.rejections_per_client,
        "accountant": f"opacus-{cfg.privacy.accountant}",
        "sampling": "poisson",
        "noise_generators": ledger.generators(),
        "ledger": {"path": "ledger.sqlite", "rows": rows, "head": head},
        "wall_seconds": wall_seconds,
    }
