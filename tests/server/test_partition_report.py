"""The partition report: per-client counts and class histograms, as JSON and a PNG."""

import json
from collections import Counter

import numpy as np
import pytest
from matplotlib.image import imread

from clients.config import DatasetConfig
from clients.data import partition_all, server_test_split
from server.partition_report import (
    partition_report,
    plot_partition_report,
    write_partition_report,
)

PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def _cfg(partitioner, **overrides):
    return DatasetConfig(name="digits", partitioner=partitioner, **overrides)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological", "shard"])
def test_counts_and_histograms_match_labels_counted_independently(partitioner):
    # Prepare: digits has 1797 images (sklearn's own count per class below).
    from sklearn.datasets import load_digits

    cfg = _cfg(partitioner)
    all_labels = Counter(load_digits().target.tolist())
    pool, test = server_test_split(cfg, seed=4)
    parts = partition_all(cfg, 10, seed=4)
    # Execute
    report = partition_report(cfg, 10, seed=4)
    # Assert
    assert report["num_clients"] == 10 and report["num_classes"] == 10
    assert sum(report["counts"]) == report["pool_size"] == len(pool) == 1797 - len(test)
    for idx, hist, n in zip(parts, report["class_histograms"], report["counts"], strict=True):
        labels = Counter(pool.y[idx].tolist())
        assert hist == [labels.get(c, 0) for c in range(10)] and n == len(idx)
    per_class = np.sum(report["class_histograms"], axis=0) + np.bincount(test.y, minlength=10)
    assert per_class.tolist() == [all_labels[c] for c in range(10)]
    assert report["partitioner"] == partitioner


def test_report_names_the_partitioner_and_its_parameters():
    # Prepare
    cfg = _cfg("pathological", classes_per_client=3)
    # Execute
    report = partition_report(cfg, 10, seed=1)
    # Assert
    assert report["settings"] == {"classes_per_client": 3}
    assert report["parameters"] == {
        "class": "PathologicalPartitioner", "num_partitions": 10, "partition_by": "label",
        "num_classes_per_partition": 3, "class_assignment_mode": "deterministic",
        "shuffle": True, "seed": 1,
    }
    assert all(sum(1 for n in h if n) <= 3 for h in report["class_histograms"])


def test_written_json_and_png(tmp_path):
    # Prepare
    report = partition_report(_cfg("dirichlet"), 5, seed=0)
    run_dir = tmp_path / "run"
    # Execute
    write_partition_report(run_dir, report)
    # Assert
    assert json.loads((run_dir / "partition_report.json").read_text()) == report
    png = run_dir / "partition_report.png"
    assert png.read_bytes()[:8] == PNG_SIGNATURE
    pixels = imread(png)
    assert pixels.ndim == 3 and pixels.shape[0] > 100 and pixels.shape[1] > 100
    assert np.ptp(pixels[..., :3]) > 0.5  # not a blank canvas


def test_bars_stack_each_clients_histogram():
    # Prepare: 3 clients, 2 classes, built by hand.
    report = {"dataset": "toy", "partitioner": "iid", "seed": 0,
              "counts": [5, 3, 4], "class_histograms": [[2, 3], [3, 0], [1, 3]]}
    # Execute
    ax = plot_partition_report(report).axes[0]
    # Assert: class c's bar for client i starts where class c-1's ended.
    bars = [(round(p.get_x() + p.get_width() / 2), p.get_y(), p.get_height())
            for p in ax.patches]
    assert sorted(bars) == sorted([(0, 0, 2), (0, 2, 3), (1, 0, 3), (1, 3, 0),
                                   (2, 0, 1), (2, 1, 3)])


def test_inconsistent_report_is_refused(tmp_path):
    # Prepare
    report = {"counts": [5, 3], "class_histograms": [[2, 2], [3, 0]]}
    # Execute / Assert
    with pytest.raises(ValueError, match=r"does not add up to report\['counts'\]=\[5, 3\]"):
        write_partition_report(tmp_path, report)
    assert not (tmp_path / "partition_report.json").exists()
