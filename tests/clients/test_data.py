"""Bundled data, the server's test split and flwr-datasets partitions."""

import numpy as np
import pytest

from clients.config import ConfigError, DatasetConfig
from clients.data import client_partition, load_bundled, partition_all, server_test_split


def _rows(data):
    return {row.tobytes() for row in data.x.reshape(len(data), -1)}


def test_digits_shape_and_range():
    d = load_bundled("digits")
    assert d.x.shape == (1797, 1, 8, 8) and d.x.dtype == np.float32
    assert d.x.min() == -1.0 and d.x.max() == 1.0
    assert set(np.unique(d.y)) == set(range(10))


def test_mnist5k_loads():
    d = load_bundled("mnist5k")
    assert d.x.shape == (5000, 1, 28, 28)
    assert np.bincount(d.y).tolist() == [500] * 10


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet"])
def test_partitions_disjoint_cover_pool_and_avoid_test(partitioner):
    cfg = DatasetConfig(partitioner=partitioner, alpha=0.5)
    pool, test = server_test_split(cfg, seed=3)
    parts = partition_all(cfg, 5, seed=3)
    flat = np.concatenate(parts)
    assert len(flat) == len(set(flat.tolist())) == len(pool)
    # No client ever holds a test record (compare contents, not indices).
    test_rows = _rows(test)
    for pid in range(5):
        train, val = client_partition(cfg, pid, 5, seed=3)
        assert not (_rows(train) | _rows(val)) & test_rows


def test_partitioning_is_seeded():
    cfg = DatasetConfig(partitioner="dirichlet", alpha=0.3)
    a = partition_all(cfg, 4, seed=1)
    b = partition_all(cfg, 4, seed=1)
    c = partition_all(cfg, 4, seed=2)
    assert all(np.array_equal(x, y) for x, y in zip(a, b, strict=True))
    assert not all(np.array_equal(x, y) for x, y in zip(a, c, strict=True))


def test_iid_is_balanced_and_dirichlet_is_skewed():
    def label_share_spread(cfg):
        pool, _ = server_test_split(cfg, 0)
        shares = [np.bincount(pool.y[p], minlength=10) / len(p) for p in partition_all(cfg, 4, 0)]
        return float(np.max(np.std(shares, axis=0)))

    iid = label_share_spread(DatasetConfig(partitioner="iid"))
    skewed = label_share_spread(DatasetConfig(partitioner="dirichlet", alpha=0.1))
    assert iid < 0.05 < skewed


def test_bad_partition_id_is_named():
    with pytest.raises(ConfigError, match="partition-id=4"):
        client_partition(DatasetConfig(), 4, 4, 0)
