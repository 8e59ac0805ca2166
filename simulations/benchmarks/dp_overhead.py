"""What DP-SGD costs: time per epoch and peak memory against plain SGD.

Same model, data, batch size and thread count. DP-SGD is fedpriv's own round
(:func:`clients.train.dp_train_round`: Opacus, Poisson sampling, one local
epoch, engine set-up included, as every round pays it); the reference is a plain
loop over a shuffled loader with the same batch size, optimizer and loss.

How it is measured, in one worker process started for the purpose:

* **time**: the modes run interleaved (plain, hooks, ghost, plain, ...), one
  epoch each, after one untimed warm-up epoch per mode; the ratio is the median
  of the per-repeat ratios, so a slow spell on a shared machine hits both sides
  of a ratio. CPU-second ratios are reported too.
* **memory**: for each (model, mode) the worker forks a child before any
  training of that model has run in it; the child trains two steps on a copy
  of the model (which faults in the library code it runs), then one epoch on
  ``memory_examples`` examples twice, each from the same fresh copy:

  - under torch's memory profiler, for the peak of the tensors the epoch
    allocates (:func:`~simulations.benchmarks.measure.tensor_peak_bytes`).
    ``peak_memory_ratio`` compares that plus the weights' bytes: the CPU
    counterpart of ``torch.cuda.max_memory_allocated``;
  - with its resident high-water mark reset (``/proc/self/clear_refs``), for
    the peak RSS. ``training_rss_ratio`` compares what training adds above the
    RSS it started from, plus the weights' bytes; it includes the allocator's
    slack and Python objects. ``peak_rss_ratio_process`` compares the whole
    process, torch's runtime included. glibc's mmap threshold is pinned
    (``mallopt``) and freed heap pages are trimmed before the epoch, so buffers
    freed and reused show as growth.
"""

from __future__ import annotations

import copy
import functools
import json
import os
import select
import signal
import subprocess
import sys
import time
import warnings
from dataclasses import asdict
from typing import Any

from simulations.benchmarks.measure import (
    median,
    read_status_kb,
    reset_peak_rss,
    tensor_peak_bytes,
)
from simulations.benchmarks.suites import DpOverheadSpec

__all__ = ["MODEL_VARIANTS", "run_dp_overhead"]

# label -> ModelConfig fields. "mlp-wide" is the linear-heavy model (~305k weights
# on 28x28 inputs), where per-sample gradients cost most memory.
MODEL_VARIANTS: dict[str, dict[str, Any]] = {
    "mlp": {"name": "mlp"},
    "mlp-wide": {"name": "mlp", "hidden": 384},
    "cnn": {"name": "cnn"},
    "transformer": {"name": "transformer"},
}
M_MMAP_THRESHOLD = -3  # glibc's mallopt parameter number
MMAP_THRESHOLD = 128 * 1024


def run_dp_overhead(spec: DpOverheadSpec) -> dict[str, Any]:
    """Run the measurement in a fresh worker process; return the ``dp_overhead`` section."""
    env = {**os.environ, "OMP_NUM_THREADS": str(spec.threads), "MKL_NUM_THREADS": str(spec.threads)}
    out = subprocess.run([sys.executable, "-m", "simulations.benchmarks.dp_overhead",
                          json.dumps(asdict(spec))], capture_output=True, text=True,
                         timeout=spec.timeout_s, env=env)
    if out.returncode != 0:
        raise RuntimeError(f"dp_overhead worker failed ({out.returncode}):\n{out.stderr[-4000:]}")
    return dict(json.loads(out.stdout.strip().splitlines()[-1]))


# ---------------------------------------------------------------------------
# Inside the worker
# ---------------------------------------------------------------------------

def _task(spec: DpOverheadSpec, model: str, mode: str) -> Any:
    from clients.config import (
        ClientTask,
        DatasetConfig,
        ModelConfig,
        PrivacyConfig,
        TrainConfig,
    )

    return ClientTask(
        dataset=DatasetConfig(name=spec.dataset),
        model=ModelConfig(**MODEL_VARIANTS[model]),
        train=TrainConfig(rounds=1, local_epochs=1, batch_size=spec.batch_size, lr=0.1),
        privacy=PrivacyConfig(grad_sample_mode=mode if mode != "nonprivate" else "hooks"),
    )


def _epoch(spec: DpOverheadSpec, net: Any, data: Any, task: Any, mode: str,
           seed: int) -> tuple[float, float]:
    """One epoch; returns (wall seconds, CPU seconds)."""
    import torch
    from torch.utils.data import DataLoader, TensorDataset

    from clients.train import dp_train_round

    wall, cpu = time.perf_counter(), time.process_time()
    if mode == "nonprivate":
        generator = torch.Generator().manual_seed(seed)
        loader = DataLoader(TensorDataset(torch.from_numpy(data.x), torch.from_numpy(data.y)),
                            batch_size=spec.batch_size, shuffle=True, generator=generator)
        opt = torch.optim.SGD(net.parameters(), lr=task.train.lr)
        criterion = torch.nn.CrossEntropyLoss()
        net.train()
        for xb, yb in loader:
            opt.zero_grad(set_to_none=True)
            criterion(net(xb), yb).backward()
            opt.step()
    else:
        dp_train_round(net, data, task, lr=task.train.lr, noise_multiplier=1.0, history=[],
                       seed=seed, device=torch.device("cpu"))
    return time.perf_counter() - wall, time.process_time() - cpu


def _libc() -> Any:
    import ctypes

    return ctypes.CDLL("libc.so.6")


def _measure_peak(spec: DpOverheadSpec, model: str, mode: str, data: Any) -> dict[str, Any]:
    """In a forked child: peak RSS of one epoch, from a trimmed, fresh start."""
    import gc

    from clients.models import build_model

    libc = _libc()
    libc.mallopt(M_MMAP_THRESHOLD, MMAP_THRESHOLD)  # large buffers: mmap'd, unmapped on free
    task = _task(spec, model, mode)
    net = build_model(task.model, tuple(data.x.shape[1:]), data.num_classes, seed=0)
    # Two steps on a copy first: a forked child faults in the library code it runs
    # (file-backed pages count as RSS) and Opacus sets up what it keeps.
    two_steps = data.subset(list(range(min(len(data), 2 * spec.batch_size))))
    _epoch(spec, copy.deepcopy(net), two_steps, task, mode, 0)
    profiled_epoch = functools.partial(_epoch, spec, copy.deepcopy(net), data, task, mode, 1)
    tensor_peak = tensor_peak_bytes(profiled_epoch)
    del profiled_epoch  # and its copy of the model
    gc.collect()
    libc.malloc_trim(0)  # hand freed heap pages back, so reusing them shows as growth
    reset_peak_rss()
    start = read_status_kb("VmRSS") or 0
    _epoch(spec, net, data, task, mode, seed=1)
    return {"start_kb": start, "peak_kb": read_status_kb("VmHWM") or 0,
            "tensor_peak_bytes": tensor_peak}


def _memory_in_child(spec: DpOverheadSpec, model: str, mode: str, data: Any) -> dict[str, Any]:
    """Fork; the child trains one epoch from a fresh state and reports its peak RSS."""
    read_fd, write_fd = os.pipe()
    pid = os.fork()
    if pid == 0:  # the child: nothing has trained in this address space yet
        os.close(read_fd)
        code = 0
        try:
            msg = _measure_peak(spec, model, mode, data)
        except BaseException as ex:  # reported to the parent
            msg, code = {"error": f"{type(ex).__name__}: {ex}"}, 1
        os.write(write_fd, json.dumps(msg).encode())
        os._exit(code)
    os.close(write_fd)
    chunks = []
    deadline = time.monotonic() + spec.timeout_s
    while time.monotonic() < deadline:
        ready, _, _ = select.select([read_fd], [], [], 5.0)
        if ready:
            chunk = os.read(read_fd, 65536)
            if not chunk:
                break
            chunks.append(chunk)
    os.close(read_fd)
    if not chunks:  # timed out: the child is still training
        os.kill(pid, signal.SIGKILL)
    os.waitpid(pid, 0)
    return dict(json.loads(b"".join(chunks) or b'{"error": "no answer (timeout)"}'))


def _warm_up(spec: DpOverheadSpec, pool: Any, modes: tuple[str, ...]) -> None:
    """Train a throwaway 4-unit MLP on 8 examples in every mode, in the parent.

    First use initialises autograd, kernel libraries and Opacus' lazy state (tens of
    MB, whatever the model); done here, no child counts it as training memory.
    """
    from dataclasses import replace

    from clients.config import ModelConfig
    from clients.models import build_model

    tiny = pool.subset(list(range(8)))
    for mode in modes:
        task = replace(_task(spec, "mlp", mode), model=ModelConfig(name="mlp", hidden=4))
        net = build_model(task.model, tuple(tiny.x.shape[1:]), tiny.num_classes, seed=0)
        _epoch(spec, net, tiny, task, mode, seed=0)


def _worker(spec: DpOverheadSpec) -> dict[str, Any]:
    import numpy as np

    # Everything training imports lazily, imported before any child forks, so that
    # module memory is not counted as training memory in any mode.
    import opacus  # noqa: F401
    import opacus.grad_sample.grad_sample_module_fast_gradient_clipping  # noqa: F401
    import opacus.utils.fast_gradient_clipping_utils  # noqa: F401
    import torch

    from clients.config import DatasetConfig
    from clients.data import server_test_split
    from clients.models import build_model
    from clients.noise import use_noise_generator  # noqa: F401

    warnings.filterwarnings("ignore")
    torch.set_num_threads(spec.threads)
    pool, _ = server_test_split(DatasetConfig(name=spec.dataset), 0)
    order = np.random.default_rng(0).permutation(len(pool))
    data = pool.subset(order[: spec.max_examples] if spec.max_examples else order)
    mem_data = pool.subset(order[: spec.memory_examples])
    modes = ("nonprivate", *spec.modes)

    _warm_up(spec, pool, modes)
    memory = {(m, mode): _memory_in_child(spec, m, mode, mem_data)
              for m in spec.models for mode in modes}
    models: dict[str, Any] = {}
    for m in spec.models:
        # A mode whose memory run failed (Opacus cannot train the model that way) is
        # reported with its error and not timed.
        ok = tuple(mode for mode in modes if "error" not in memory[(m, mode)])
        tasks = {mode: _task(spec, m, mode) for mode in ok}
        base = build_model(_task(spec, m, "nonprivate").model, tuple(data.x.shape[1:]),
                           data.num_classes, seed=0)
        times: dict[str, list[tuple[float, float]]] = {mode: [] for mode in ok}
        for rep in range(spec.repeats + 1):  # repeat 0 is the warm-up
            for mode in ok:
                t = _epoch(spec, copy.deepcopy(base), data, tasks[mode], mode, seed=rep + 1)
                if rep > 0:
                    times[mode].append(t)
        models[m] = _summarise(times, memory, m, modes,
                               sum(p.numel() for p in base.parameters()))
    return {
        "method": ("time: fedpriv's dp_train_round (1 epoch, engine set-up included) vs a "
                   "plain SGD loop, modes interleaved, median of per-repeat ratios; memory, "
                   "in a forked child training one epoch: peak tensor memory plus the "
                   "weights (peak_memory_ratio), peak RSS above its starting RSS plus the "
                   "weights (training_rss_ratio), whole process (peak_rss_ratio_process)"),
        "dataset": spec.dataset, "examples": len(data), "memory_examples": len(mem_data),
        "batch_size": spec.batch_size, "repeats": spec.repeats, "threads": spec.threads,
        "models": models,
    }


def _summarise(times: dict[str, list[tuple[float, float]]],
               memory: dict[tuple[str, str], dict[str, Any]], model: str,
               modes: tuple[str, ...], params: int) -> dict[str, Any]:
    base_t = times["nonprivate"]
    base_m = memory[(model, "nonprivate")]
    param_kb = params * 4 / 1024  # float32 weights: counted on both sides, as on a GPU
    base_added = max(0, base_m.get("peak_kb", 0) - base_m.get("start_kb", 0)) + param_kb
    base_tensors = base_m.get("tensor_peak_bytes", 0) / 1024 + param_kb
    out: dict[str, Any] = {"parameters": params}
    for mode in modes:
        mem = memory[(model, mode)]
        if "error" in mem or "error" in base_m:
            out[mode] = {"error": mem.get("error") or base_m.get("error")}
            continue
        added = max(0, mem["peak_kb"] - mem["start_kb"]) + param_kb
        tensors = mem["tensor_peak_bytes"] / 1024 + param_kb
        row: dict[str, Any] = {
            "epoch_s": [round(w, 4) for w, _ in times[mode]],
            "median_epoch_s": median([w for w, _ in times[mode]]),
            "median_epoch_cpu_s": median([c for _, c in times[mode]]),
            "peak_rss_mb": round(mem["peak_kb"] / 1024, 1),
            "tensor_memory_mb": round(tensors / 1024, 3),
            "training_memory_mb": round(added / 1024, 2),
        }
        if mode != "nonprivate":
            row["time_ratio"] = median([w / bw for (w, _), (bw, _) in
                                        zip(times[mode], base_t, strict=True)])
            row["cpu_time_ratio"] = median([c / bc for (_, c), (_, bc) in
                                            zip(times[mode], base_t, strict=True)])
            row["peak_memory_ratio"] = round(tensors / base_tensors, 3)
            row["training_rss_ratio"] = round(added / base_added, 3)
            row["peak_rss_ratio_process"] = round(mem["peak_kb"] / base_m["peak_kb"], 3)
        out[mode] = row
    return out


def _spec_from_json(text: str) -> DpOverheadSpec:
    fields: dict[str, Any] = {k: tuple(v) if isinstance(v, list) else v
                              for k, v in json.loads(text).items()}
    return DpOverheadSpec(**fields)


if __name__ == "__main__":
    print(json.dumps(_worker(_spec_from_json(sys.argv[1]))))
