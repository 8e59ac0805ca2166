"""The robustness table: final accuracy of each strategy under each attack.

``python -m simulations.robustness`` runs 10 clients on the bundled digits for
every strategy in :data:`STRATEGIES` without adversaries, and under every
attack in :data:`ATTACKS` with 1, 2 and 3 adversaries, then writes the tables
between the markers of ``docs/robustness.md`` (results in
``docs/robustness.json``; a run already there is not repeated, so an
interrupted sweep resumes). Runs go through :mod:`simulations.inprocess`: the
real server loop, strategies and ClientApp, without Ray.

Every client trains with sample-level DP-SGD (the project has no non-private
mode); the settings in :data:`BASE` are chosen to make a run cheap (full-batch
steps, so q = 1 and the RDP accountant is instant).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from concurrent.futures import ProcessPoolExecutor
from pathlib import Path
from typing import Any

__all__ = ["ATTACKS", "BASE", "STRATEGIES", "main", "render", "run_one"]

STRATEGIES = ("fedavg", "fedmedian", "fedtrimmedavg", "multikrum", "bulyan")
ATTACKS = ("sign_flip", "scale", "gaussian", "nan", "label_flip")
ADVERSARIES = (1, 2, 3)
NUM_CLIENTS = 10
BASE = (
    f"simulation.num_clients={NUM_CLIENTS}", "dataset=digits", "model=mlp",
    "train.rounds=10", "train.local_epochs=5", "train.batch_size=256", "train.lr=1.0",
    "privacy.target_epsilon=8", "privacy.accountant=rdp",
    "strategy.fraction_evaluate=0", "strategy.ema=0", "output.progress=false",
)
# Each robust strategy set for the most adversaries it can tolerate among n = 10.
STRATEGY_SETTINGS: dict[str, tuple[str, ...]] = {
    "fedtrimmedavg": ("strategy.trim_beta=0.3",),
    "multikrum": ("strategy.num_malicious_nodes=3",),
    "bulyan": ("strategy.num_malicious_nodes=1",),
}
# How many Byzantine clients of 10 each one is proven to tolerate as configured.
TOLERATES = {"fedavg": 0, "fedmedian": 4, "fedtrimmedavg": 3, "multikrum": 3, "bulyan": 1}
THEORY = {
    "fedavg": "none: one unbounded update moves the mean anywhere",
    "fedmedian": "f < n/2 (Yin et al. 2018)",
    "fedtrimmedavg": "f <= int(beta n) = 3 with beta = 0.3 (Yin et al. 2018)",
    "multikrum": "n > 2f + 2, configured f = 3 (Blanchard et al. 2017)",
    "bulyan": "n >= 4f + 3, so f = 1 at n = 10 (El Mhamdi et al. 2018)",
}
START, END = "<!-- robustness:start -->", "<!-- robustness:end -->"


def key_of(strategy: str, attack: str, adversaries: int) -> str:
    return f"{strategy}/{attack if adversaries else 'none'}/{adversaries}"


def overrides_of(strategy: str, attack: str, adversaries: int, seed: int) -> list[str]:
    adv = [f"adversary={attack}", f"adversary.num_clients={adversaries}"] if adversaries else []
    return [*BASE, f"train.seed={seed}", f"strategy={strategy}",
            *STRATEGY_SETTINGS.get(strategy, ()), *adv]


def run_one(strategy: str, attack: str, adversaries: int, seed: int = 0) -> dict[str, Any]:
    """One simulation; its final central accuracy and what the server rejected."""
    from server.app import compose_config
    from simulations.inprocess import run_in_process

    cfg, resolved = compose_config(overrides_of(strategy, attack, adversaries, seed))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="fedpriv-robust-") as tmp:
        summary = run_in_process(cfg, Path(tmp) / "run", resolved)
    return {"strategy": strategy, "attack": attack if adversaries else "none",
            "adversaries": adversaries, "seed": seed, "accuracy": summary["accuracy"],
            "stop_reason": summary["stop_reason"], "rounds_completed":
            summary["rounds_completed"], "updates_rejected": summary["updates_rejected"],
            "epsilon_sample_level_max": summary["epsilon_sample_level_max"],
            "wall_seconds": round(time.perf_counter() - t0, 1)}


def _cell(result: dict[str, Any] | None, strategy: str, adversaries: int) -> str:
    if result is None:
        return "–"
    acc = result["accuracy"]
    text = "n/a" if acc is None else f"{acc:.3f}"
    if result["stop_reason"] != "completed":
        text += f" ({result['stop_reason']} after {result['rounds_completed']})"
    if adversaries > TOLERATES[strategy]:
        text += " †"
    return text


def render(results: dict[str, dict[str, Any]]) -> str:
    """The Markdown tables: one per attack, strategies by number of adversaries."""
    lines = []
    for attack in ATTACKS:
        lines += [f"### {attack}", "",
                  "| strategy | 0 (clean) | 1 | 2 | 3 |", "| --- | --- | --- | --- | --- |"]
        for s in STRATEGIES:
            cells = [_cell(results.get(key_of(s, attack, k)), s, k) for k in (0, *ADVERSARIES)]
            lines.append(f"| {s} | " + " | ".join(cells) + " |")
        lines.append("")
    lines += ["† more adversaries than the strategy, as configured, is proven to tolerate.",
              "", "| strategy | tolerates (n = 10) |", "| --- | --- |"]
    lines += [f"| {s} | {THEORY[s]} |" for s in STRATEGIES]
    total = sum(r["wall_seconds"] for r in results.values())
    lines += ["", f"{len(results)} runs, {total / 60:.0f} min of simulation in total."]
    return "\n".join(lines)


def write_doc(doc: Path, table: str) -> None:
    """Replace what lies between the markers of ``doc`` (create it if absent)."""
    text = doc.read_text() if doc.exists() else f"# Robustness\n\n{START}\n{END}\n"
    if START not in text or END not in text:
        raise ValueError(f"{doc}: lacks the markers {START} ... {END}")
    head, rest = text.split(START, 1)
    _, tail = rest.split(END, 1)
    doc.write_text(f"{head}{START}\n{table}\n{END}{tail}")


def _jobs() -> list[tuple[str, str, int]]:
    jobs = [(s, "none", 0) for s in STRATEGIES]
    return jobs + [(s, a, k) for a in ATTACKS for k in ADVERSARIES for s in STRATEGIES]


def _run_job(job: tuple[str, str, int, int]) -> dict[str, Any]:
    return run_one(*job)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m simulations.robustness", description=__doc__)
    p.add_argument("--doc", type=Path, default=Path("docs/robustness.md"))
    p.add_argument("--results", type=Path, default=Path("docs/robustness.json"))
    p.add_argument("--jobs", type=int, default=1, help="simulations run at once")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--render-only", action="store_true", help="only rewrite the tables")
    args = p.parse_args(argv)
    results: dict[str, dict[str, Any]] = (json.loads(args.results.read_text())
                                          if args.results.exists() else {})
    todo = [(s, a, k, args.seed) for s, a, k in _jobs()
            if key_of(s, a, k) not in results and not args.render_only]
    print(f"{len(todo)} runs to do, {len(results)} done", file=sys.stderr)
    with ProcessPoolExecutor(max_workers=max(1, args.jobs)) as pool:
        for res in pool.map(_run_job, todo):
            results[key_of(res["strategy"], res["attack"], res["adversaries"])] = res
            args.results.write_text(json.dumps(results, indent=1, sort_keys=True) + "\n")
            print(f"{res['strategy']:14s} {res['attack']:10s} {res['adversaries']} "
                  f"accuracy {res['accuracy']} ({res['wall_seconds']}s)", file=sys.stderr)
    write_doc(args.doc, render(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
