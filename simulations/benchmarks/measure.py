"""What the benchmarks measure with, read straight from Linux' ``/proc``.

psutil is not a dependency, so resident memory and CPU time come from
``/proc/PID/status`` (``VmRSS``, ``VmHWM``) and ``/proc/PID/stat`` (``utime``,
``stime``). A peak is the kernel's high-water mark of resident memory, which
``/proc/self/clear_refs`` can reset (writing ``5``), so one process can measure
the peak of one phase. Timings are ``time.perf_counter`` (wall) and CPU
seconds; on a shared machine CPU seconds are the steadier of the two.
"""

from __future__ import annotations

import os
import platform
import statistics
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

__all__ = ["ProcStats", "TreeMonitor", "machine_info", "median", "read_status_kb",
           "reset_peak_rss", "proc_stats", "descendants", "tensor_peak_bytes"]

_TICK = os.sysconf("SC_CLK_TCK") if hasattr(os, "sysconf") else 100


def median(values: Sequence[float]) -> float | None:
    """Median of ``values``; ``None`` for an empty sequence."""
    return float(statistics.median(values)) if values else None


def read_status_kb(key: str, pid: int | str = "self") -> int | None:
    """A ``kB`` field of ``/proc/PID/status`` (``VmRSS``, ``VmHWM``), or ``None``."""
    try:
        with open(f"/proc/{pid}/status") as fh:
            for line in fh:
                if line.startswith(key + ":"):
                    return int(line.split()[1])
    except (OSError, ValueError, IndexError):
        return None
    return None


def reset_peak_rss() -> bool:
    """Reset this process's ``VmHWM`` to its current RSS (Linux >= 4.0)."""
    try:
        with open("/proc/self/clear_refs", "w") as fh:
            fh.write("5")
        return True
    except OSError:
        return False


def tensor_peak_bytes(run: Callable[[], object]) -> int:
    """Peak of the CPU tensor memory ``run()`` allocates, above what was allocated before.

    torch's profiler with ``profile_memory`` records every allocation and free with
    its size and time; their running sum, in time order, peaks at the answer. It
    counts tensors only (what ``torch.cuda.max_memory_allocated`` counts on a GPU),
    not the allocator's slack or Python objects, and tensors alive before ``run``
    started and still alive do not count. Read through the profiler's raw
    (kineto) events: the summarised events fold allocations into their operators.
    """
    from torch.profiler import ProfilerActivity, profile

    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        run()
    events = [e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"
              and e.device_type().name == "CPU"]
    now = peak = 0
    for event in sorted(events, key=lambda e: e.start_ns()):
        now += event.nbytes()
        peak = max(peak, now)
    return peak


@dataclass(frozen=True)
class ProcStats:
    """One sample of one process."""

    pid: int
    ppid: int
    name: str
    rss_kb: int
    hwm_kb: int
    cpu_s: float
    anon_kb: int = 0  # private memory (RssAnon): what the process does not share


def proc_stats(pid: int) -> ProcStats | None:
    """RSS, peak RSS, CPU seconds and title of ``pid`` (``None`` if it is gone)."""
    try:
        with open(f"/proc/{pid}/stat") as fh:
            stat = fh.read()
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            cmd = fh.read().replace(b"\0", b" ").decode(errors="replace").strip()
    except OSError:
        return None
    # The command name is in parentheses and may itself hold spaces.
    fields = stat[stat.rfind(")") + 2:].split()
    ppid, utime, stime = int(fields[1]), int(fields[11]), int(fields[12])
    rss, hwm = read_status_kb("VmRSS", pid), read_status_kb("VmHWM", pid)
    if rss is None or hwm is None:  # a zombie has no memory fields
        return None
    return ProcStats(pid, ppid, cmd[:120], rss, hwm, (utime + stime) / _TICK,
                     read_status_kb("RssAnon", pid) or 0)


def descendants(root: int) -> list[int]:
    """``root`` and every process below it (one scan of ``/proc``)."""
    children: dict[int, list[int]] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            with open(entry / "stat") as fh:
                stat = fh.read()
        except OSError:
            continue
        ppid = int(stat[stat.rfind(")") + 2:].split()[1])
        children.setdefault(ppid, []).append(int(entry.name))
    out, todo = [], [root]
    while todo:
        pid = todo.pop()
        out.append(pid)
        todo.extend(children.get(pid, []))
    return out


@dataclass
class TreeSample:
    t: float
    progress: int
    procs: list[ProcStats]


@dataclass
class TreeMonitor:
    """Samples a process tree (a simulation and the Ray processes it starts).

    Every ``interval`` seconds: RSS, peak RSS and CPU seconds of each process
    under ``root``, plus ``progress()`` (e.g. rounds finished). Processes that
    exit between two samples lose at most one interval of CPU time.
    """

    root: int
    progress: Callable[[], int] = lambda: 0
    interval: float = 0.25
    samples: list[TreeSample] = field(default_factory=list)
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def __enter__(self) -> TreeMonitor:
        self._thread = threading.Thread(target=self._run, daemon=True)
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    def _run(self) -> None:
        while not self._stop.is_set():
            self.sample()
            self._stop.wait(self.interval)

    def sample(self) -> None:
        procs = [s for s in map(proc_stats, descendants(self.root)) if s is not None]
        if procs:
            self.samples.append(TreeSample(time.perf_counter(), self.progress(), procs))

    # -- summaries ---------------------------------------------------------
    def last_by_pid(self) -> dict[int, ProcStats]:
        """The last sample of every process ever seen."""
        last: dict[int, ProcStats] = {}
        for s in self.samples:
            for p in s.procs:
                last[p.pid] = p
        return last

    def cpu_seconds(self) -> float:
        """CPU seconds of the whole tree (last sample of each process)."""
        return sum(p.cpu_s for p in self.last_by_pid().values())

    def peak_by_pid(self, match: Callable[[ProcStats], bool]) -> dict[int, int]:
        """Peak RSS (kB, the kernel's high-water mark) of each matching process."""
        peaks: dict[int, int] = {}
        for p in self.last_by_pid().values():
            if match(p):
                peaks[p.pid] = max(p.hwm_kb, peaks.get(p.pid, 0))
        return peaks

    def peak_anon_by_pid(self, match: Callable[[ProcStats], bool]) -> dict[int, int]:
        """Largest sampled private (anonymous) memory, kB, of each matching process."""
        peaks: dict[int, int] = {}
        for s in self.samples:
            for p in s.procs:
                if match(p):
                    peaks[p.pid] = max(p.anon_kb, peaks.get(p.pid, 0))
        return peaks

    def peak_total_rss_kb(self, match: Callable[[ProcStats], bool] = lambda p: True) -> int:
        """Largest sum of RSS over matching processes seen in one sample."""
        return max((sum(p.rss_kb for p in s.procs if match(p)) for s in self.samples),
                   default=0)

    def rss_at_progress(self, value: int,
                        match: Callable[[ProcStats], bool] = lambda p: True) -> int | None:
        """Summed RSS (kB) of matching processes in the first sample at ``progress >= value``."""
        for s in self.samples:
            if s.progress >= value:
                return sum(p.rss_kb for p in s.procs if match(p))
        return None


def _versions() -> dict[str, str]:
    from importlib.metadata import PackageNotFoundError, version

    out = {"python": platform.python_version()}
    for pkg in ("torch", "opacus", "flwr", "ray", "numpy"):
        try:
            out[pkg] = version(pkg)
        except PackageNotFoundError:
            out[pkg] = "not installed"
    return out


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or "unknown"


def machine_info() -> dict[str, Any]:
    """The machine, its load and the library versions, for the results' header."""
    mem_kb = None
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kb = int(line.split()[1])
    except OSError:
        pass
    return {
        "cpu": _cpu_model(),
        "cores": os.cpu_count(),
        "memory_gib": round(mem_kb / 2**20, 1) if mem_kb else None,
        "platform": platform.platform(),
        "load_average": list(os.getloadavg()),
        "versions": _versions(),
    }
