"""``fedpriv bench SUITE --out DIR``: run a benchmark suite, write results.json and results.md."""

from __future__ import annotations

import argparse
import json
import os
import resource
import signal
import time
import traceback
from collections.abc import Callable
from dataclasses import asdict, replace
from pathlib import Path
from typing import Any

from simulations.benchmarks.measure import machine_info
from simulations.benchmarks.suites import SUITES, Suite

__all__ = ["SECTIONS", "main", "run_suite", "with_sizes"]

# The keys of results.json, in the order they run (cheap and in-process first).
SECTIONS = ("dp_overhead", "profile", "simulation", "memory_growth", "accuracy_vs_epsilon")


def _runner(section: str) -> Callable[[Any, Path], dict[str, Any]]:
    """The function that runs ``section`` (imported only when it runs)."""
    if section == "dp_overhead":
        from simulations.benchmarks.dp_overhead import run_dp_overhead

        return lambda spec, _work: run_dp_overhead(spec)
    if section == "profile":
        from simulations.benchmarks.client_profile import run_profile

        return run_profile
    if section == "simulation":
        from simulations.benchmarks.throughput import run_throughput

        return run_throughput
    if section == "memory_growth":
        from simulations.benchmarks.memory import run_memory_growth

        return run_memory_growth
    if section == "accuracy_vs_epsilon":
        from simulations.benchmarks.accuracy import run_accuracy

        return run_accuracy
    raise ValueError(f"section={section!r}: choose one of {list(SECTIONS)}")


def run_suite(suite: Suite, out: Path, only: tuple[str, ...] = SECTIONS,
              log: Callable[[str], None] = print) -> dict[str, Any]:
    """Run ``suite``'s sections (those in ``only``), writing ``out/results.json`` after each.

    A section that raises is recorded as ``{"error": traceback}`` and the
    others still run.
    """
    out.mkdir(parents=True, exist_ok=True)
    work = out / "work"
    t0 = time.perf_counter()
    results: dict[str, Any] = {
        "suite": suite.name, "description": suite.description,
        "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"), "machine": machine_info(),
        "config": {s: asdict(spec) if (spec := getattr(suite, s)) is not None else None
                   for s in SECTIONS},
    }
    for section in SECTIONS:
        spec = getattr(suite, section)
        if spec is None or section not in only:
            continue
        log(f"fedpriv bench: {section} ...")
        t = time.perf_counter()
        try:
            results[section] = _runner(section)(spec, work / section)
        except Exception:
            results[section] = {"error": traceback.format_exc()}
            log(f"fedpriv bench: {section} FAILED:\n{results[section]['error']}")
        results[section]["section_wall_s"] = round(time.perf_counter() - t, 1)
        log(f"fedpriv bench: {section} done in {results[section]['section_wall_s']} s")
        _write(out, results, t0)
    _write(out, results, t0)
    return results


def _write(out: Path, results: dict[str, Any], t0: float) -> None:
    from simulations.benchmarks.report import targets, write_report

    results["wall_s"] = round(time.perf_counter() - t0, 1)
    # CPU seconds of this process and every child it waited for (their own children
    # included): on an idle machine the suite needs at least this ÷ the core count.
    usage = [resource.getrusage(who) for who in (resource.RUSAGE_SELF,
                                                 resource.RUSAGE_CHILDREN)]
    results["cpu_s"] = round(sum(u.ru_utime + u.ru_stime for u in usage), 1)
    results["load_average_end"] = list(os.getloadavg())
    results["targets"] = targets(results)
    tmp = out / "results.json.tmp"
    tmp.write_text(json.dumps(results, indent=2, default=str) + "\n")
    os.replace(tmp, out / "results.json")
    write_report(results, out)


def with_sizes(suite: Suite, sizes: tuple[int, ...]) -> Suite:
    """``suite`` with its simulation section run at ``sizes`` clients only (the rest kept)."""
    if not sizes or any(n < 1 for n in sizes):
        raise ValueError(f"sizes={list(sizes)}: give one or more client counts >= 1")
    if suite.simulation is None:
        raise ValueError(f"suite {suite.name!r} has no simulation section")
    sim = suite.simulation
    return replace(suite, simulation=replace(
        sim, sizes=sizes, what_if_sizes=tuple(n for n in sim.what_if_sizes if n in sizes)))


def _exit_on_sigterm(signum: int, frame: Any) -> None:
    raise SystemExit(128 + signum)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="fedpriv bench",
        description="Benchmarks: DP cost, accuracy against epsilon, simulation throughput "
                    "against a naive Flower + Opacus baseline, memory growth.")
    parser.add_argument("suite", choices=sorted(SUITES),
                        help="quick (<10 min on 2 cores), full (hours), tiny (tests)")
    parser.add_argument("--out", required=True, type=Path, help="folder for results.*")
    parser.add_argument("--only", default=",".join(SECTIONS),
                        help=f"comma-separated sections (default: all of {', '.join(SECTIONS)})")
    parser.add_argument("--sizes", default=None,
                        help="comma-separated client counts: the simulation section at these "
                             "sizes only (e.g. 100), instead of the suite's")
    args = parser.parse_args(argv)
    only = tuple(s.strip() for s in args.only.split(",") if s.strip())
    unknown = [s for s in only if s not in SECTIONS]
    if unknown:
        parser.error(f"--only {','.join(unknown)}: unknown section; choose from {SECTIONS}")
    suite = SUITES[args.suite]
    if args.sizes is not None:
        try:
            suite = with_sizes(suite, tuple(int(s) for s in args.sizes.split(",") if s.strip()))
        except ValueError as err:
            parser.error(f"--sizes {args.sizes}: {err}")
    # SIGTERM (kill, a CI's time-out) unwinds like Ctrl-C: each running simulation is
    # killed with its Ray processes on the way out instead of living on unowned.
    signal.signal(signal.SIGTERM, _exit_on_sigterm)
    results = run_suite(suite, args.out, only)
    print(f"fedpriv bench: {args.out / 'results.json'} and {args.out / 'results.md'} "
          f"({results['wall_s']} s)")
    return 1 if any(isinstance(results.get(s), dict) and "error" in results[s]
                    for s in SECTIONS) else 0
