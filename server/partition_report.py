"""How the bundled train pool was cut among simulated clients.

``partition_report`` recomputes the seeded cut exactly as every client does
(:func:`clients.data.partition_all`) and counts each client's records per
class; ``write_partition_report`` saves it to the run directory as
``partition_report.json`` and a stacked bar chart ``partition_report.png``.

The histograms describe the clients' label distributions, so they are for
simulation on public bundled data only: for real sites they would disclose
what DP-SGD protects.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.config import DatasetConfig
from clients.data import partition_all, partitioner_parameters, stored_test_split

if TYPE_CHECKING:
    from matplotlib.figure import Figure

__all__ = ["partition_report", "write_partition_report", "plot_partition_report"]

JSON_NAME = "partition_report.json"
PNG_NAME = "partition_report.png"
# The dataset.* keys each partitioner reads.
_SETTINGS = {
    "dirichlet": ("alpha", "min_partition_size"),
    "pathological": ("classes_per_client",),
    "shard": ("shards_per_client",),
}


def partition_report(cfg: DatasetConfig, num_clients: int, seed: int) -> dict[str, Any]:
    """Per-client record counts and class histograms of a simulated cut.

    Parameters
    ----------
    cfg : the run's data set configuration.
    num_clients : number of simulated clients (partitions).
    seed : the run's seed (the same one the clients use).

    Returns
    -------
    dict
        JSON-serialisable: ``dataset``, ``seed``, ``num_clients``,
        ``num_classes``, ``pool_size``, ``test_size``, ``partitioner`` with its
        ``settings`` (the ``dataset.*`` keys it reads) and ``parameters`` (the
        flwr-datasets class and the arguments it was built with), ``counts``
        (records per client) and ``class_histograms`` (per client, a list of
        record counts per class).
    """
    pool, test = stored_test_split(cfg, seed)  # labels and sizes: nothing decoded
    parts = partition_all(cfg, num_clients, seed, pool=pool)
    histograms = [np.bincount(pool.y[p], minlength=pool.num_classes).tolist() for p in parts]
    return {
        "dataset": cfg.name,
        "seed": seed,
        "num_clients": num_clients,
        "num_classes": pool.num_classes,
        "pool_size": len(pool),
        "test_size": len(test),
        "partitioner": cfg.partitioner,
        "settings": {k: getattr(cfg, k) for k in _SETTINGS.get(cfg.partitioner, ())},
        "parameters": partitioner_parameters(cfg, pool.y, num_clients, seed),
        "counts": [len(p) for p in parts],
        "class_histograms": histograms,
    }


def _check(report: dict[str, Any]) -> np.ndarray:
    """The histograms as an int array ``(clients, classes)``, checked against the counts."""
    for key in ("counts", "class_histograms"):
        if key not in report:
            raise ValueError(f"report[{key!r}] is missing; build it with partition_report()")
    hist = np.asarray(report["class_histograms"], dtype=np.int64)
    counts = list(report["counts"])
    if hist.ndim != 2 or hist.sum(axis=1).tolist() != counts:
        raise ValueError(f"report['class_histograms'] (shape {hist.shape}) does not add up to "
                         f"report['counts']={counts}")
    return hist


def plot_partition_report(report: dict[str, Any]) -> Figure:
    """A stacked bar chart: clients on x, each client's records stacked by class."""
    from matplotlib import colormaps
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    hist = _check(report)
    clients, classes = hist.shape
    fig = Figure(figsize=(min(4.0 + 0.3 * clients, 16.0), 4.2), dpi=100)
    FigureCanvasAgg(fig)
    ax = fig.add_subplot()
    palette = colormaps["tab10" if classes <= 10 else "tab20"]
    bottom = np.zeros(clients, dtype=np.int64)
    x = np.arange(clients)
    for c in range(classes):
        ax.bar(x, hist[:, c], bottom=bottom, color=palette(c % palette.N), label=str(c),
               width=0.8)
        bottom += hist[:, c]
    ax.set_xlabel("client (partition id)")
    ax.set_ylabel("records")
    ax.set_xticks(x if clients <= 40 else x[:: max(1, clients // 20)])
    settings = ", ".join(f"{k}={v}" for k, v in report.get("settings", {}).items())
    ax.set_title(f"{report.get('dataset', '?')}: {report.get('partitioner', '?')}"
                 f"{f' ({settings})' if settings else ''}, seed {report.get('seed', '?')}",
                 fontsize=10)
    if classes <= 20:
        ax.legend(title="class", fontsize=7, title_fontsize=8, loc="center left",
                  bbox_to_anchor=(1.0, 0.5))
    fig.tight_layout()
    return fig


def write_partition_report(run_dir: Path, report: dict[str, Any]) -> None:
    """Write ``partition_report.json`` and ``partition_report.png`` into ``run_dir``.

    Parameters
    ----------
    run_dir : the run directory (created if missing).
    report : as returned by :func:`partition_report`.

    Raises
    ------
    ValueError
        If the report's histograms do not add up to its counts.
    """
    fig = plot_partition_report(report)
    run_dir = Path(run_dir)
    run_dir.mkdir(parents=True, exist_ok=True)
    (run_dir / JSON_NAME).write_text(json.dumps(report, indent=2, allow_nan=False) + "\n")
    fig.savefig(run_dir / PNG_NAME, format="png")
