"""A site's training data: its own files (or a bundled partition), cleaned and prepared.

Everything here runs at the site. What leaves it is only what training needs:
the number of examples (in the reply's metrics) and, for federated
normalisation, Gaussian-noised sums (``clients.preprocess``), charged to the
site's ledger like any other release. The site data report (rows read, dropped
by reason, class histogram, feature ranges) is written to the site's state
folder and never sent.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable, Mapping
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np

from clients.config import ConfigError, DatasetConfig
from clients.data import ArrayData, client_partition
from clients.preprocess import Pipeline, PipelineResult, build_pipeline
from clients.schema import TaskSchema

__all__ = ["SiteData", "task_schema", "site_source", "load_site_data", "statistics_step",
           "DATA_REPORT", "STATS_MEAN_KEY", "STATS_STD_KEY", "cleaned_features", "server_test_data",
           "input_shape_of"]

DATA_REPORT = "data_report.json"
# The statistics round's result, sent by the server with every round's config.
STATS_MEAN_KEY = "stats-mean"
STATS_STD_KEY = "stats-std"
# A simulation's server: the folder where it saved every client's bundled data
# (clients.data.save_cut), for the workers to read rather than cut themselves.
CLIENT_CUT_KEY = "client-data-cut"


# A site's prepared data: train and validation sets, the augmentation, the report.
SiteData = PipelineResult

# How a simulated client gets its bundled partition: clients.data.client_partition, or
# the same through a worker's cache (clients.cache.WorkerCache.client_partition).
Partition = Callable[[DatasetConfig, int, int, int], tuple[ArrayData, ArrayData]]


def task_schema(cfg: DatasetConfig) -> TaskSchema:
    """The schema every site validates its files against (site-file data sets)."""
    if cfg.input_shape:
        return TaskSchema(kind="image", labels=tuple(cfg.labels),
                          input_shape=tuple(cfg.input_shape))
    return TaskSchema(kind="tabular", labels=tuple(cfg.labels), features=tuple(cfg.features),
                      label_column=cfg.label_column)


def site_source(cfg: DatasetConfig, node_config: Mapping[str, Any],
                partition_id: int) -> tuple[Path, str]:
    """Where this site's data is: its node config (a deployed site), else ``dataset.sites``."""
    if node_config.get("data-path"):
        fmt = str(node_config.get("data-format") or cfg.name)
        return Path(str(node_config["data-path"])).expanduser(), fmt
    if not 0 <= partition_id < len(cfg.sites):
        raise ConfigError(
            f"dataset.sites={list(cfg.sites)}: no file for client {partition_id}; list one "
            "per client, or set data-path/data-format in the site's node config")
    return Path(cfg.sites[partition_id]).expanduser(), cfg.name


def statistics_step(cfg: DatasetConfig) -> Mapping[str, Any] | None:
    """The ``normalize`` step that needs federated statistics, if any."""
    for step in cfg.preprocess:
        if step.get("name") == "normalize" and step.get("mode") == "federated":
            return step
    return None


def _pipeline(cfg: DatasetConfig, stats: tuple[list[float], list[float]] | None) -> Pipeline:
    steps = list(cfg.preprocess)
    if not any(s.get("name") == "split" for s in steps):
        steps.append({"name": "split", "val_fraction": cfg.val_fraction})
    pipeline = build_pipeline(steps)
    if pipeline.needs_statistics:
        if stats is None:
            raise ConfigError("dataset.preprocess: normalize mode=federated needs the "
                              "statistics round's result, which the server did not send")
        pipeline = pipeline.with_statistics(np.asarray(stats[0]), np.asarray(stats[1]))
    return pipeline


def _write_report(state_dir: Path | None, report: dict[str, Any]) -> None:
    if state_dir is None:
        return
    state_dir.mkdir(parents=True, exist_ok=True)
    tmp = state_dir / (DATA_REPORT + ".tmp")
    tmp.write_text(json.dumps(report, indent=2, default=str) + "\n")
    os.replace(tmp, state_dir / DATA_REPORT)


def read_site_records(cfg: DatasetConfig, node_config: Mapping[str, Any],
                      partition_id: int) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int]:
    """Read and validate this site's file: ``(x, class index or -1, raw labels, source, rows)``."""
    from clients.loaders import load_site

    path, fmt = site_source(cfg, node_config, partition_id)
    schema = task_schema(cfg)
    raw = load_site(path, fmt, schema)
    return raw.x, schema.label_index(raw.labels), raw.labels, raw.source, raw.rows_read


def _bundled_kind(data: ArrayData) -> str:
    """A bundled data set's kind for the pipeline: images are (N, C, H, W)."""
    return "image" if data.x.ndim == 4 else "tabular"


def _local_records(cfg: DatasetConfig, node_config: Mapping[str, Any], partition_id: int,
                   num_partitions: int, seed: int, partition: Partition = client_partition,
                   ) -> tuple[np.ndarray, np.ndarray, np.ndarray, str, int, str, int]:
    """``(x, y, raw labels, source, rows read, kind, num_classes)`` before preprocessing."""
    if cfg.is_files:
        x, y, labels, source, rows = read_site_records(cfg, node_config, partition_id)
        schema = task_schema(cfg)
        return x, y, labels, source, rows, schema.kind, schema.num_classes
    local, _ = partition(replace(cfg, val_fraction=0.0), partition_id, num_partitions, seed)
    return (local.x.astype(np.float64), local.y, local.y, f"bundled:{cfg.name}", len(local),
            _bundled_kind(local), local.num_classes)


def cleaned_features(cfg: DatasetConfig, *, node_config: Mapping[str, Any], partition_id: int,
                     num_partitions: int, seed: int, partition: Partition = client_partition,
                     ) -> tuple[np.ndarray, int]:
    """The cleaned, not yet normalised features the statistics round sums up."""
    x, y, labels, *_ = _local_records(cfg, node_config, partition_id, num_partitions, seed,
                                      partition)
    x, y, _ = build_pipeline(list(cfg.preprocess)).clean_only(x, y, raw_labels=labels)
    return x, len(y)


def load_site_data(cfg: DatasetConfig, *, node_config: Mapping[str, Any], partition_id: int,
                   num_partitions: int, seed: int, state_dir: Path | None = None,
                   stats: tuple[list[float], list[float]] | None = None,
                   partition: Partition = client_partition) -> SiteData:
    """This site's ``(train, validation)`` data, prepared by ``dataset.preprocess``.

    Bundled data sets with no preprocessing steps keep the plain partition and
    split of :func:`clients.data.client_partition` (or ``partition``, the same
    through a worker's cache).
    """
    if not cfg.is_files and not cfg.preprocess:
        train, val = partition(cfg, partition_id, num_partitions, seed)
        return SiteData(train, val, None, {"source": f"bundled:{cfg.name}",
                                           "rows_read": len(train) + len(val)})
    x, y, labels, source, rows, kind, num_classes = _local_records(
        cfg, node_config, partition_id, num_partitions, seed, partition)
    result = _pipeline(cfg, stats).run(x, y, kind=kind, num_classes=num_classes,
                                       seed=seed + 1 + partition_id, raw_labels=labels)
    report = {"source": source, "rows_read": rows, **result.report}
    _write_report(state_dir, report)
    return SiteData(result.train, result.val, result.augment, report)


def server_test_data(cfg: DatasetConfig, seed: int,
                     stats: tuple[list[float], list[float]] | None = None) -> ArrayData | None:
    """The server's held-out data for central evaluation (``None``: there is none).

    Bundled data: the seeded, stratified split no client sees. Site files: the
    optional ``dataset.test_path``. Either is cleaned, normalised (with the
    federated statistics when those are used) and turned into scattering
    features like the sites' data, never augmented.
    """
    from clients.data import stored_test_split
    from clients.loaders import load_site

    if not cfg.is_files:
        test = stored_test_split(cfg, seed)[1].decoded()
        x, y, labels = test.x.astype(np.float64), test.y, test.y
        kind, num_classes = _bundled_kind(test), test.num_classes
    elif not cfg.test_path:
        return None
    else:
        schema = task_schema(cfg)
        raw = load_site(Path(cfg.test_path).expanduser(), cfg.name, schema)
        x, y, labels = raw.x, schema.label_index(raw.labels), raw.labels
        kind, num_classes = schema.kind, schema.num_classes
    steps = [s for s in cfg.preprocess if s.get("name") in ("clean", "normalize", "scatter")]
    if not cfg.is_files and not steps:
        return test  # the plain split, as the clients' plain partitions
    pipeline = build_pipeline([*steps, {"name": "split", "val_fraction": 0.0}])
    if pipeline.needs_statistics:
        if stats is None:
            raise ConfigError("the server's test data: normalize mode=federated needs the "
                              "statistics round's result first")
        pipeline = pipeline.with_statistics(np.asarray(stats[0]), np.asarray(stats[1]))
    result = pipeline.run(x, y, kind=kind, num_classes=num_classes, seed=seed,
                          raw_labels=labels)
    return result.train


def input_shape_of(cfg: DatasetConfig) -> tuple[tuple[int, ...], int]:
    """``(model input shape, number of classes)`` of the task, after ``dataset.preprocess``."""
    pipeline = build_pipeline(list(cfg.preprocess))
    if cfg.is_files:
        schema = task_schema(cfg)
        return pipeline.output_shape(schema.sample_shape), schema.num_classes
    from clients.data import load_bundled

    data = load_bundled(cfg.name)
    return pipeline.output_shape(tuple(int(d) for d in data.x.shape[1:])), data.num_classes
