"""Where a fedpriv client's time goes: the real ``train`` handler, timed by phase.

The handler (:func:`clients.app.train`) runs in this process, as a Ray worker
would run it, on the suite's data and model, as a *new* client in round 1 each
call (a fresh state folder): what most calls are when a few of many clients are
sampled per round. Each phase (the functions the handler calls) is timed by a
thin wrapper, in CPU seconds, which a shared machine disturbs less than wall
time; cProfile of one more call names the hottest functions. One untimed call
first pays the imports.

The calls run with a worker cache of their own (``clients.cache``), as a
worker's calls do: the untimed first call fills it. ``what_if`` re-runs the
same calls in another setting, the reference for the fix: ``without worker
cache`` (a cache that keeps nothing, so every call loads and cuts the data,
calibrates σ and asks the accountant for ε, as fedpriv did before the cache).
"""

from __future__ import annotations

import cProfile
import dataclasses
import pstats
import tempfile
import time
from collections.abc import Callable, Iterator
from contextlib import ExitStack, contextmanager
from pathlib import Path
from typing import Any

from simulations.benchmarks.suites import ProfileSpec

__all__ = ["PHASES", "WHAT_IF", "variant", "run_profile"]

# phase -> the name ``clients.app.train`` calls it by (a global of clients.app). They
# do not nest: calibration runs before the charge, the charge before training.
PHASES: dict[str, str] = {
    "load and partition data": "_load",
    "sigma calibration (first round of a client)": "_sigma",
    "charge: cap check, epsilon, ledger commit": "charge",
    "build model, load weights": "_model",
    "DP-SGD epoch (Opacus)": "dp_train_round",
    "reply (budget for next round)": "_reply",
}


class _Harness:
    """Calls the real handler with hand-made messages, as Flower's simulation would."""

    def __init__(self, spec: ProfileSpec, work: Path) -> None:
        from flwr.app import ArrayRecord

        from clients.config import flatten
        from clients.models import build_model
        from clients.sitedata import input_shape_of
        from server.app import compose_config

        self.cfg, _ = compose_config([f"dataset={spec.dataset}", f"model={spec.model}",
                                      f"simulation.num_clients={spec.num_clients}",
                                      f"strategy.min_train_clients={min(2, spec.num_clients)}",
                                      f"strategy.min_evaluate_clients={min(2, spec.num_clients)}",
                                      *spec.overrides])
        shape, num_classes = input_shape_of(self.cfg.dataset)
        self.arrays = ArrayRecord(build_model(self.cfg.model, shape, num_classes).state_dict())
        self.task = flatten(self.cfg.task)
        self.work = work
        self.calls = 0

    def call(self) -> float:
        """One handler call as a new client in round 1; returns wall seconds."""
        from flwr.app import ConfigRecord, Context, Metadata, RecordDict
        from flwr.app.message.message import make_message

        from clients.app import train
        from clients.state import STATE_ROOT_KEY

        self.calls += 1
        n = self.cfg.simulation.num_clients
        pid = self.calls % n
        root = tempfile.mkdtemp(prefix="site-", dir=self.work)
        context = Context(run_id=1, node_id=pid + 1, state=RecordDict(), run_config={},
                          node_config={"partition-id": pid, "num-partitions": n})
        config = ConfigRecord({**self.task, STATE_ROOT_KEY: root, "lr": self.cfg.train.lr,
                               "num-threads": 1, "server-round": 1})
        meta = Metadata(run_id=1, message_id=f"m{self.calls}", src_node_id=0,
                        dst_node_id=pid + 1, reply_to_message_id="", group_id="1",
                        created_at=time.time(), ttl=3600.0, message_type="train")
        t = time.perf_counter()
        reply = train(make_message(meta, RecordDict({"arrays": self.arrays, "config": config})),
                      context)
        if reply.has_error() or "arrays" not in reply.content:
            raise RuntimeError(f"the train handler did not train: {reply.content}")
        return time.perf_counter() - t


class _PhaseClock:
    """Wraps each phase function of ``clients.app`` to add up its CPU and wall seconds."""

    def __init__(self) -> None:
        self.cpu: dict[str, float] = {name: 0.0 for name in PHASES}
        self.wall: dict[str, float] = {name: 0.0 for name in PHASES}

    @contextmanager
    def installed(self) -> Iterator[None]:
        import clients.app

        with ExitStack() as stack:
            for phase, attr in PHASES.items():
                if hasattr(clients.app, attr):  # a renamed phase is reported as 0
                    stack.enter_context(_patched(clients.app, attr, self._wrap(phase)))
            yield

    def _wrap(self, phase: str) -> Callable[[Callable[..., Any]], Callable[..., Any]]:
        def make(fn: Callable[..., Any]) -> Callable[..., Any]:
            def timed(*args: Any, **kwargs: Any) -> Any:
                cpu, wall = time.process_time(), time.perf_counter()
                try:
                    return fn(*args, **kwargs)
                finally:
                    self.cpu[phase] += time.process_time() - cpu
                    self.wall[phase] += time.perf_counter() - wall
            return timed
        return make


def _measure(harness: _Harness, calls: int) -> dict[str, Any]:
    """CPU and wall seconds per call, in all and by phase (no profiler running)."""
    clock = _PhaseClock()
    with clock.installed():
        cpu, wall = time.process_time(), time.perf_counter()
        for _ in range(calls):
            harness.call()
        cpu, wall = time.process_time() - cpu, time.perf_counter() - wall
    phases: list[dict[str, Any]] = [{"phase": k, "cpu_s": round(clock.cpu[k] / calls, 3),
               "wall_s": round(clock.wall[k] / calls, 3)} for k in PHASES]
    phases.append({"phase": "other", "cpu_s": round(max(0.0, cpu - sum(clock.cpu.values()))
                                                     / calls, 3),
                   "wall_s": round(max(0.0, wall - sum(clock.wall.values())) / calls, 3)})
    for p in phases:
        p["share"] = round(p["cpu_s"] / (cpu / calls), 3) if cpu else 0.0
    return {"cpu_s": cpu / calls, "wall_s": wall / calls, "phases": phases}


def _profiled(harness: _Harness) -> pstats.Stats:
    prof = cProfile.Profile(time.process_time)
    prof.enable()
    try:
        harness.call()
    finally:
        prof.disable()
    return pstats.Stats(prof)


def _top(stats: pstats.Stats, top: int) -> list[dict[str, Any]]:
    raw: dict[tuple[str, int, str], tuple[Any, ...]] = stats.stats  # type: ignore[attr-defined]
    rows = sorted(raw.items(), key=lambda kv: kv[1][2], reverse=True)[:top]
    return [{"function": f"{Path(path).name}:{line}({func})", "self_cpu_s": round(tt, 3),
             "cumulative_cpu_s": round(ct, 3), "calls": nc}
            for (path, line, func), (_cc, nc, tt, ct, _callers) in rows]


# ---------------------------------------------------------------------------
# Settings compared with fedpriv as is
# ---------------------------------------------------------------------------

@contextmanager
def _patched(module: Any, name: str, make: Callable[[Any], Any]) -> Iterator[None]:
    original = getattr(module, name)
    setattr(module, name, make(original))
    try:
        yield
    finally:
        setattr(module, name, original)


@contextmanager
def variant(name: str) -> Iterator[None]:
    """Run the calls inside in the setting ``name`` (one of :data:`WHAT_IF`)."""
    from clients.cache import WorkerCache, use_worker_cache

    if name not in WHAT_IF:
        raise ValueError(f"what_if={name!r}: unknown; choose from {list(WHAT_IF)}")
    with use_worker_cache(WorkerCache.disabled()):
        yield


WHAT_IF = ("without worker cache",)


def run_profile(spec: ProfileSpec, work: Path) -> dict[str, Any]:
    """Time ``spec.calls`` handler calls by phase; then with each suggested fix patched in."""
    import warnings

    warnings.filterwarnings("ignore", message="Optimal order is the largest alpha")
    # PRV at q = 1 (a client with fewer records than a batch) takes log(0) on the way.
    warnings.filterwarnings("ignore", category=RuntimeWarning, module=r"opacus\.")
    from clients.cache import WorkerCache, use_worker_cache

    work.mkdir(parents=True, exist_ok=True)
    unknown = [v for v in spec.what_if if v not in WHAT_IF]
    if unknown:
        raise ValueError(f"what_if={unknown}: unknown; choose from {list(WHAT_IF)}")
    harness = _Harness(spec, work)
    cache = WorkerCache()  # this measurement's worker, as a Ray worker would hold one
    with use_worker_cache(cache):
        harness.call()  # imports, lazy initialisation, the cache filled: once per worker
        as_is = _measure(harness, spec.calls)
        top = _top(_profiled(harness), spec.top)
    what_if = []
    for name in spec.what_if:
        with variant(name):
            m = _measure(harness, spec.calls)
        # speedup: how many times less CPU fedpriv as is takes than in this setting.
        what_if.append({"variant": name, "cpu_s": round(m["cpu_s"], 3),
                        "wall_s": round(m["wall_s"], 3),
                        "speedup": round(m["cpu_s"] / as_is["cpu_s"], 2) if as_is["cpu_s"]
                        else None})
    return {
        "method": (f"clients.app.train called in process as a new client in round 1, "
                   f"with a worker cache of its own ({spec.calls} call(s) after one untimed "
                   f"call that fills it; {spec.num_clients} clients, "
                   f"`{spec.dataset}`, `{spec.model}`), its phases timed by wrappers (CPU "
                   f"seconds per call); top functions from cProfile of one more call (the "
                   f"profiler inflates call-heavy Python code); what_if: the same calls in "
                   f"another setting, speedup = its CPU s ÷ as is"),
        "dataset": spec.dataset, "model": spec.model, "num_clients": spec.num_clients,
        "calls": spec.calls,
        "cpu_s_per_call": round(as_is["cpu_s"], 3),
        "wall_s_per_call": round(as_is["wall_s"], 3),
        "phases": as_is["phases"],
        "cache": {k: dataclasses.asdict(v) for k, v in cache.stats().items()},
        "top_self_cpu": top,
        "what_if": what_if,
    }
