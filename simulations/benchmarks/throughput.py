"""Simulation throughput: fedpriv's real simulation against the naive baseline.

Both run as subprocesses of this script, one after the other, at each size:
fedpriv through ``fedpriv simulate`` (its hydra config, its ClientApp and
ServerApp, Flower's Ray backend), the baseline through
:mod:`simulations.benchmarks.naive`. Same data, model, batch size, learning
rate, number of clients and number sampled per round; neither runs federated
evaluation; both evaluate centrally after every round.

Round times come from the runs themselves (fedpriv's ``metrics.jsonl``, the
baseline's evaluation stamps). The first round pays Ray's start-up and each
worker's imports, so ``updates_per_s`` is ``sampled / median round time`` over
the later rounds. A monitor samples the process tree of each run (the
simulation process and every Ray process under it) for CPU seconds and
resident memory; a client worker is a process Ray titled ``ClientAppActor``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from simulations.benchmarks.measure import ProcStats, TreeMonitor, median
from simulations.benchmarks.suites import ThroughputSpec

__all__ = ["MonitoredRun", "fedpriv_command", "fedpriv_overrides", "run_monitored",
           "run_throughput", "is_client_worker", "summarise_run"]

# Shared by fedpriv and the baseline (fedpriv's defaults for these keys).
LR, MAX_GRAD_NORM, DELTA, BATCH_SIZE = 1.5, 1.0, 1e-5, 128


def is_client_worker(p: ProcStats) -> bool:
    return "ClientAppActor" in p.name


@dataclass
class MonitoredRun:
    returncode: int
    wall_s: float
    monitor: TreeMonitor
    log: Path


def _rounds_done(metrics: Path) -> int:
    try:
        with metrics.open() as fh:
            return sum(1 for _ in fh)
    except OSError:
        return 0


def run_monitored(cmd: list[str], log: Path, timeout_s: float,
                  metrics: Path | None = None, *, fresh: Path | None = None) -> MonitoredRun:
    """Run ``cmd`` with its process tree sampled; ``metrics``: a file with one line per round.

    ``fresh``: the run's directory, removed first. A run directory left by an
    earlier run would lend it its sites' ledgers, and every ε would include the
    earlier run's spending. The run is killed with its whole session (Ray's
    processes too) on a timeout and whenever this function is left early (an
    exception, Ctrl-C, or SIGTERM through ``fedpriv bench``'s handler), so no
    run outlives the benchmark that started it.
    """
    env = {**os.environ, "RAY_ACCEL_ENV_VAR_OVERRIDE_ON_ZERO": "0", "RAY_DEDUP_LOGS": "0"}
    if fresh is not None:
        shutil.rmtree(fresh, ignore_errors=True)
    log.parent.mkdir(parents=True, exist_ok=True)
    t0 = time.perf_counter()
    with log.open("w") as out:
        proc = subprocess.Popen(cmd, stdout=out, stderr=subprocess.STDOUT, env=env,
                                start_new_session=True)
        try:
            progress = (lambda: _rounds_done(metrics)) if metrics is not None else (lambda: 0)
            with TreeMonitor(proc.pid, progress) as monitor:
                try:
                    code = proc.wait(timeout=timeout_s)
                except subprocess.TimeoutExpired:
                    _kill_session(proc)
                    code = proc.wait()
        finally:
            if proc.poll() is None:
                _kill_session(proc)
                proc.wait()
    return MonitoredRun(code, time.perf_counter() - t0, monitor, log)


def _kill_session(proc: subprocess.Popen[bytes]) -> None:
    """SIGKILL the session ``proc`` leads: the run and its Ray processes."""
    try:
        os.killpg(proc.pid, signal.SIGKILL)
    except ProcessLookupError:
        pass


def fedpriv_overrides(*, dataset: str, model: str, clients: int, sampled: int, rounds: int,
                      batch_size: int = BATCH_SIZE, lr: float = LR,
                      federated_evaluation: bool = False, round_timeout: float = 3600.0,
                      extra: tuple[str, ...] = ()) -> list[str]:
    """hydra overrides for ``sampled`` of ``clients`` training each round.

    ``round_timeout``: a loaded machine can take minutes for a round's first calls
    (each Ray worker's imports); fedpriv's default (600 s) would then end the run.
    """
    evaluation = [] if federated_evaluation else ["strategy.fraction_evaluate=0",
                                                  "strategy.min_evaluate_clients=0"]
    return [f"dataset={dataset}", f"model={model}", f"simulation.num_clients={clients}",
            f"strategy.fraction_train={sampled / clients!r}",
            f"strategy.min_train_clients={sampled}", *evaluation,
            f"strategy.round_timeout={round_timeout}", f"train.rounds={rounds}",
            f"train.batch_size={batch_size}", f"train.lr={lr}",
            f"privacy.max_grad_norm={MAX_GRAD_NORM}", f"privacy.delta={DELTA}",
            "output.progress=false", *extra]


def fedpriv_command(*, run_dir: Path, **kwargs: Any) -> list[str]:
    """``fedpriv simulate`` with :func:`fedpriv_overrides`, writing to ``run_dir``."""
    return [sys.executable, "-m", "simulations.cli", "simulate", *fedpriv_overrides(**kwargs),
            f"hydra.run.dir={run_dir}"]


def summarise_run(run: MonitoredRun, round_s: list[float], sampled: int) -> dict[str, Any]:
    """Rates, CPU and memory of one monitored run."""
    steady = round_s[1:] or round_s
    rate = sampled / m if (m := median(steady)) else None
    workers = run.monitor.peak_by_pid(is_client_worker)
    anon = run.monitor.peak_anon_by_pid(is_client_worker)
    updates = sampled * len(round_s)
    cpu = run.monitor.cpu_seconds()
    return {
        "round_s": [round(r, 3) for r in round_s],
        "first_round_s": round(round_s[0], 3) if round_s else None,
        "round_s_median": m,
        "updates_per_s": rate,
        "wall_s": round(run.wall_s, 2),
        "cpu_s": round(cpu, 2),
        "cpu_s_per_update": round(cpu / updates, 3) if updates else None,
        "workers": len(workers),
        "peak_rss_per_worker_mb": round(max(workers.values()) / 1024, 1) if workers else None,
        # Without the pages shared with other processes (torch's libraries, mostly).
        "peak_private_per_worker_mb": round(max(anon.values()) / 1024, 1) if anon else None,
        "peak_rss_workers_sum_mb": round(run.monitor.peak_total_rss_kb(is_client_worker) / 1024,
                                         1),
        "peak_rss_total_mb": round(run.monitor.peak_total_rss_kb() / 1024, 1),
        "driver_peak_rss_mb": round(run.monitor.peak_by_pid(
            lambda p: p.pid == run.monitor.root).get(run.monitor.root, 0) / 1024, 1),
    }


def _fedpriv(spec: ThroughputSpec, size: int, sampled: int, work: Path,
             without_cache: bool = False) -> dict[str, Any]:
    run_dir = work / "run"
    overrides = fedpriv_overrides(dataset=spec.dataset, model=spec.model, clients=size,
                                  sampled=sampled, rounds=spec.rounds,
                                  round_timeout=spec.timeout_s, extra=spec.overrides)
    cmd = ([sys.executable, "-m", "simulations.benchmarks.whatif", str(run_dir), *overrides]
           if without_cache else [sys.executable, "-m", "simulations.cli", "simulate",
                               *overrides, f"hydra.run.dir={run_dir}"])
    run = run_monitored(cmd, work / "fedpriv.out", spec.timeout_s, run_dir / "metrics.jsonl",
                        fresh=run_dir)
    if run.returncode != 0:
        raise RuntimeError(f"fedpriv simulation failed ({run.returncode}); see {run.log}:\n"
                           + run.log.read_text()[-3000:])
    rows = [json.loads(line) for line in (run_dir / "metrics.jsonl").read_text().splitlines()]
    trained = [len(r["clients"]) for r in rows]
    if trained != [sampled] * spec.rounds:
        raise RuntimeError(f"fedpriv trained {trained} clients per round, expected {sampled}")
    return summarise_run(run, [float(r["wall_seconds"]) for r in rows], sampled)


def _naive(spec: ThroughputSpec, size: int, sampled: int, work: Path) -> dict[str, Any]:
    out = work / "naive.json"
    naive_spec = {"dataset": spec.dataset, "model": spec.model, "clients": size,
                  "sampled": sampled, "rounds": spec.rounds, "batch_size": BATCH_SIZE,
                  "lr": LR, "max_grad_norm": MAX_GRAD_NORM, "delta": DELTA}
    run = run_monitored([sys.executable, "-m", "simulations.benchmarks.naive",
                         json.dumps(naive_spec), str(out)], work / "naive.out", spec.timeout_s)
    if run.returncode != 0 or not out.exists():
        raise RuntimeError(f"naive baseline failed ({run.returncode}); see {run.log}:\n"
                           + run.log.read_text()[-3000:])
    return summarise_run(run, json.loads(out.read_text())["round_s"], sampled)


def _median_of(runs: list[dict[str, Any]]) -> dict[str, Any]:
    """Numeric fields: median over repeats; the repeats themselves are kept."""
    if len(runs) == 1:
        return runs[0]
    keys = [k for k, v in runs[0].items() if isinstance(v, (int, float))]
    out: dict[str, Any] = {k: median([r[k] for r in runs if r.get(k) is not None])
                           for k in keys}
    out["repeats"] = runs
    return out


def run_throughput(spec: ThroughputSpec, work: Path) -> dict[str, Any]:
    """The ``simulation`` section: each size, fedpriv and naive, ``spec.repeats`` times."""
    sizes: dict[str, Any] = {}
    for size in spec.sizes:
        sampled = min(spec.sampled, size)
        kinds = ("fedpriv", "naive", *(("fedpriv_without_cache",) if size in spec.what_if_sizes
                                       else ()))
        runs: dict[str, list[dict[str, Any]]] = {kind: [] for kind in kinds}
        for rep in range(spec.repeats):
            # Alternate the order, so that a drift in the machine's load does not
            # always favour the same side.
            for kind in (kinds if rep % 2 == 0 else kinds[::-1]):
                where = work / f"{size}-clients" / f"{kind}-{rep}"
                if kind == "naive":
                    runs[kind].append(_naive(spec, size, sampled, where))
                else:
                    runs[kind].append(_fedpriv(spec, size, sampled, where,
                                               without_cache=kind == "fedpriv_without_cache"))
        row: dict[str, Any] = {"sampled": sampled}
        naive = row["naive"] = _median_of(runs["naive"])
        for kind in kinds:
            if kind == "naive":
                continue
            fed = row[kind] = _median_of(runs[kind])
            suffix = "" if kind == "fedpriv" else "_without_cache"
            row["speedup_vs_naive" + suffix] = (
                fed["updates_per_s"] / naive["updates_per_s"]
                if fed.get("updates_per_s") and naive.get("updates_per_s") else None)
            row["speedup_vs_naive_cpu" + suffix] = (
                naive["cpu_s_per_update"] / fed["cpu_s_per_update"]
                if fed.get("cpu_s_per_update") and naive.get("cpu_s_per_update") else None)
        sizes[str(size)] = row
    per_worker = [v["fedpriv"]["peak_rss_per_worker_mb"] for v in sizes.values()
                  if v["fedpriv"].get("peak_rss_per_worker_mb")]
    naive_worker = [v["naive"]["peak_rss_per_worker_mb"] for v in sizes.values()
                    if v["naive"].get("peak_rss_per_worker_mb")]
    return {
        "method": (f"`{spec.dataset}`, `{spec.model}`, {spec.rounds} rounds, "
                   f"{spec.sampled} clients sampled per round (all, below that), no federated "
                   f"evaluation, central evaluation every round; updates/s = sampled ÷ median "
                   f"round time of rounds 2..{spec.rounds}; speedup_vs_naive = fedpriv's "
                   f"updates/s ÷ the baseline's (speedup_vs_naive_cpu: the same with CPU "
                   f"seconds per update of the whole process tree, Ray's start-up included); "
                   f"median of {spec.repeats} run(s), order alternated; peak RSS: the "
                   f"kernel's high-water mark of each Ray ClientAppActor process. "
                   f"fedpriv_without_cache (at {list(spec.what_if_sizes)} clients): the same "
                   f"simulation with each worker's cache off "
                   f"(simulations/benchmarks/whatif.py), fedpriv as it was before the cache"),
        "dataset": spec.dataset, "model": spec.model, "rounds": spec.rounds,
        "repeats": spec.repeats, "sizes": sizes,
        "fedpriv_peak_rss_per_worker_mb": max(per_worker) if per_worker else None,
        "naive_peak_rss_per_worker_mb": max(naive_worker) if naive_worker else None,
    }
