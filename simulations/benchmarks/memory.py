"""Memory growth: resident memory of a fedpriv simulation at a late round ÷ an early one.

One ``fedpriv simulate`` run with every client training every round and
federated evaluation on (fedpriv's defaults), ``late + 1`` rounds so that the
process is still alive when round ``late`` has been written. A monitor samples
the run's process tree every 0.25 s; the RSS "at round r" is the first sample
after ``metrics.jsonl`` holds r lines. ``ratio`` is over the processes
fedpriv's code runs in (the simulation process, which holds the server, and
the Ray client workers); Ray's own daemons are reported apart.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from simulations.benchmarks.measure import ProcStats
from simulations.benchmarks.suites import MemorySpec
from simulations.benchmarks.throughput import (
    MonitoredRun,
    fedpriv_command,
    is_client_worker,
    run_monitored,
)

__all__ = ["run_memory_growth", "summarise_memory"]


def run_memory_growth(spec: MemorySpec, work: Path) -> dict[str, Any]:
    if not 1 <= spec.early < spec.late:
        raise ValueError(f"early={spec.early}, late={spec.late}: need 1 <= early < late")
    run_dir = work / "run"
    run = run_monitored(
        fedpriv_command(dataset=spec.dataset, model=spec.model, clients=spec.num_clients,
                        sampled=spec.num_clients, rounds=spec.late + 1, run_dir=run_dir,
                        federated_evaluation=True, round_timeout=spec.timeout_s,
                        extra=spec.overrides),
        work / "fedpriv.out", spec.timeout_s, run_dir / "metrics.jsonl", fresh=run_dir)
    if run.returncode != 0:
        raise RuntimeError(f"fedpriv simulate failed ({run.returncode}); see {run.log}:\n"
                           + run.log.read_text()[-3000:])
    result = summarise_memory(run, spec.early, spec.late)
    result["method"] = (f"fedpriv simulate, `{spec.dataset}`, `{spec.model}`, {spec.num_clients} "
                        f"clients all training every round, federated evaluation on; "
                        + result["method"])
    return {**result, "dataset": spec.dataset, "model": spec.model,
            "num_clients": spec.num_clients}


def summarise_memory(run: MonitoredRun, early: int, late: int) -> dict[str, Any]:
    """RSS by process group at rounds ``early`` and ``late`` of a monitored fedpriv run."""
    root = run.monitor.root

    def server(p: ProcStats) -> bool:
        return p.pid == root

    groups = {
        "fedpriv (server + client workers)": lambda p: server(p) or is_client_worker(p),
        "client workers": is_client_worker,
        "server (simulation process)": server,
        "Ray's own processes": lambda p: not (server(p) or is_client_worker(p)),
    }
    by_group: dict[str, Any] = {}
    curve: dict[str, list[tuple[int, float]]] = {}
    for name, match in groups.items():
        at_early, at_late = (run.monitor.rss_at_progress(r, match) for r in (early, late))
        by_group[name] = {
            "early_mb": round(at_early / 1024, 1) if at_early else None,
            "late_mb": round(at_late / 1024, 1) if at_late else None,
            "ratio": round(at_late / at_early, 3) if at_early and at_late else None,
        }
        if name != "Ray's own processes":
            curve[name] = [(r, round(v / 1024, 1)) for r in range(1, late + 1)
                           if (v := run.monitor.rss_at_progress(r, match))]
    return {
        "method": (f"RSS summed over the processes (first /proc sample after round r was "
                   f"written); ratio = RSS at round {late} ÷ round {early} of fedpriv's "
                   f"processes"),
        "early": early, "late": late,
        "ratio": by_group["fedpriv (server + client workers)"]["ratio"],
        "by_group": by_group,
        "curve_mb": curve,
    }
