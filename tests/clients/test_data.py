"""Bundled data, the server's test split and flwr-datasets partitions."""

import gzip
import os
import time
from pathlib import Path

import numpy as np
import pytest

from clients.config import ConfigError, DatasetConfig
from clients.data import (
    FASHION_MNIST_ENV,
    client_partition,
    cut_clients,
    cut_key,
    fashion_mnist_dirs,
    load_bundled,
    load_cut,
    load_fashion_mnist,
    partition_all,
    save_cut,
    server_test_split,
    stored_test_split,
)


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


# --------------------------------------------------------------------------
# Fashion-MNIST
# --------------------------------------------------------------------------

REQUIRE_FASHION = os.environ.get("FEDPRIV_REQUIRE_FASHION_MNIST") == "1"
NOT_INSTALLED = (
    "dataset.name='fashion-mnist': the Fashion-MNIST files are not installed; install them "
    "with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set "
    "FEDPRIV_FASHION_MNIST_DIR to a folder holding train-images-idx3-ubyte.gz and "
    "train-labels-idx1-ubyte.gz"
)


@pytest.fixture(scope="module")
def fashion():
    """The installed training set and the CPU seconds its load took.

    Skipped if absent, unless FEDPRIV_REQUIRE_FASHION_MNIST=1 (CI) makes that a failure.
    CPU time, not wall time, so a busy machine does not fail the speed check.
    """
    start = time.process_time()
    try:
        data = load_bundled("fashion-mnist")
    except ConfigError as err:
        if "not installed" not in str(err) or REQUIRE_FASHION:
            raise
        pytest.skip("Fashion-MNIST is not installed (apt-get install dataset-fashion-mnist); "
                    "set FEDPRIV_REQUIRE_FASHION_MNIST=1 to make this a failure")
    return data, time.process_time() - start


def _installed_folder() -> Path:
    """The folder the loader found the gzipped files in."""
    found = [d for d in fashion_mnist_dirs() if (d / "train-images-idx3-ubyte.gz").is_file()]
    if not found:
        pytest.skip("Fashion-MNIST is installed without gzip; this check reads the .gz files")
    return found[0]


def _idx_bytes(array: np.ndarray) -> bytes:
    """An IDX file of unsigned bytes, written from the format's description."""
    head = bytes([0, 0, 0x08, array.ndim]) + b"".join(
        n.to_bytes(4, "big") for n in array.shape)
    return head + array.astype(np.uint8).tobytes()


def _write_fashion(folder: Path, images: bytes, labels: bytes, gz: bool = True) -> None:
    suffix, wrap = (".gz", gzip.compress) if gz else ("", bytes)
    (folder / f"train-images-idx3-ubyte{suffix}").write_bytes(wrap(images))
    (folder / f"train-labels-idx1-ubyte{suffix}").write_bytes(wrap(labels))


def test_fashion_mnist_training_set(fashion):
    # Prepare
    data, seconds = fashion
    # Execute / Assert: Fashion-MNIST's training set is 60,000 images, 6,000 per class.
    assert data.x.shape == (60000, 1, 28, 28) and data.x.dtype == np.float32
    assert data.y.dtype == np.int64 and data.num_classes == 10
    assert np.bincount(data.y).tolist() == [6000] * 10
    assert data.x.min() == -1.0 and data.x.max() == 1.0
    assert seconds < 2.0


def test_fashion_mnist_pixels_match_an_independent_reader(fashion):
    # Prepare: the raw bytes after the 16-byte images / 8-byte labels headers.
    data, _ = fashion
    folder = _installed_folder()
    raw = np.frombuffer(gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes()),
                        dtype=np.uint8, offset=16)
    labels = np.frombuffer(gzip.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes()),
                           dtype=np.uint8, offset=8)
    # Execute
    expected = raw[: 50 * 784].reshape(50, 1, 28, 28) / 255.0 * 2.0 - 1.0
    # Assert
    np.testing.assert_allclose(data.x[:50], expected, atol=1e-6)
    assert np.array_equal(data.y, labels)


def test_fashion_mnist_missing_names_the_fix(tmp_path, monkeypatch):
    # Prepare: the override points at an empty folder; it is the only place searched.
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    # Execute / Assert
    with pytest.raises(ConfigError) as err:
        load_bundled("fashion-mnist")
    assert NOT_INSTALLED in str(err.value) and str(tmp_path) in str(err.value)
    with pytest.raises(ConfigError, match="not installed"):
        load_fashion_mnist(dirs=[])


def test_fashion_mnist_override_folder_gzipped_or_not(tmp_path, monkeypatch):
    # Prepare: 3 images whose pixel (i, r, c) is (i + r + c) mod 256, labels 7, 0, 9.
    i, r, c = np.meshgrid(np.arange(3), np.arange(28), np.arange(28), indexing="ij")
    pixels = (i + r + c) % 256
    plain, zipped = tmp_path / "plain", tmp_path / "zipped"
    plain.mkdir(), zipped.mkdir()
    _write_fashion(plain, _idx_bytes(pixels), _idx_bytes(np.array([7, 0, 9])), gz=False)
    _write_fashion(zipped, _idx_bytes(pixels), _idx_bytes(np.array([7, 0, 9])), gz=True)
    monkeypatch.setenv(FASHION_MNIST_ENV, str(zipped))
    # Execute
    from_env = load_bundled("fashion-mnist")
    from_plain = load_fashion_mnist(dirs=[tmp_path / "absent", plain])
    # Assert: value v maps to 2 v / 255 - 1.
    expected = (2.0 * (i + r + c) / 255.0 - 1.0)[:, None]
    for data in (from_env, from_plain):
        assert data.x.shape == (3, 1, 28, 28) and data.y.tolist() == [7, 0, 9]
        np.testing.assert_allclose(data.x, expected, atol=1e-6)


@pytest.mark.parametrize("damage, message", [
    ("drop_pixels", "promises shape"),
    ("cut_gzip", "cannot be read"),
    ("bad_magic", "magic number"),
])
def test_damaged_idx_files_raise(tmp_path, damage, message):
    # Prepare: a well-formed pair, then one kind of damage.
    images = _idx_bytes(np.zeros((2, 28, 28)))
    labels = _idx_bytes(np.array([1, 2]))
    if damage == "drop_pixels":
        _write_fashion(tmp_path, images[:-10], labels)
    elif damage == "bad_magic":
        _write_fashion(tmp_path, b"\x00\x00\x0d\x03" + images[4:], labels)
    else:
        _write_fashion(tmp_path, images, labels)
        path = tmp_path / "train-images-idx3-ubyte.gz"
        path.write_bytes(path.read_bytes()[:-12])
    # Execute / Assert
    with pytest.raises(ConfigError, match=message):
        load_fashion_mnist(dirs=[tmp_path])


def test_truncated_copy_of_the_installed_file_raises(fashion, tmp_path):
    # Prepare: the real labels, the real images cut to their first 100,000 bytes.
    folder = _installed_folder()
    raw = gzip.decompress((folder / "train-images-idx3-ubyte.gz").read_bytes())
    labels = gzip.decompress((folder / "train-labels-idx1-ubyte.gz").read_bytes())
    _write_fashion(tmp_path, raw[:100_000], labels)
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"promises shape \(60000, 28, 28\)"):
        load_fashion_mnist(dirs=[tmp_path])


# --------------------------------------------------------------------------
# Breast cancer
# --------------------------------------------------------------------------

def test_breast_cancer_is_scaled_by_published_ranges():
    # Prepare: UCI's description gives mean radius in [6.981, 28.11], worst area in
    # [185.2, 4254.0]; the data set has 212 malignant (0) and 357 benign (1) cases.
    from sklearn.datasets import load_breast_cancer

    raw = load_breast_cancer().data
    # Execute
    d = load_bundled("breast-cancer")
    # Assert
    assert d.x.shape == (569, 30) and d.x.dtype == np.float32 and d.num_classes == 2
    assert np.bincount(d.y).tolist() == [212, 357]
    assert d.x.min() >= -1.0 and d.x.max() <= 1.0
    radius = np.clip(2 * (raw[:, 0] - 6.981) / (28.11 - 6.981) - 1, -1, 1)
    area = np.clip(2 * (raw[:, 23] - 185.2) / (4254.0 - 185.2) - 1, -1, 1)
    np.testing.assert_allclose(d.x[:, 0], radius, atol=1e-6)
    np.testing.assert_allclose(d.x[:, 23], area, atol=1e-6)


def test_breast_cancer_unreadable_description_raises(monkeypatch):
    # Prepare: a description without the Min/Max table.
    import sklearn.datasets
    from sklearn.utils import Bunch

    real = sklearn.datasets.load_breast_cancer()
    monkeypatch.setattr(sklearn.datasets, "load_breast_cancer",
                        lambda: Bunch(**{**real, "DESCR": "no table here"}))
    # Execute / Assert
    with pytest.raises(ConfigError, match="breast-cancer.*Min/Max.*mean radius"):
        load_bundled("breast-cancer")


# --------------------------------------------------------------------------
# Partitioners
# --------------------------------------------------------------------------

def _cfg(partitioner, name="digits", **overrides):
    return DatasetConfig(name=name, partitioner=partitioner, **overrides)


@pytest.mark.parametrize("partitioner", ["iid", "dirichlet", "pathological", "shard"])
def test_every_partitioner_cuts_the_whole_pool_disjointly_and_reproducibly(partitioner):
    # Prepare
    cfg = _cfg(partitioner)
    pool, _ = server_test_split(cfg, seed=5)
    # Execute
    parts = partition_all(cfg, 10, seed=5)
    again = partition_all(cfg, 10, seed=5)
    other = partition_all(cfg, 10, seed=6)
    # Assert
    flat = np.concatenate(parts)
    assert all(len(p) > 0 for p in parts)
    assert len(flat) == len(set(flat.tolist()))
    assert set(flat.tolist()) == set(range(len(pool)))
    assert all(np.array_equal(a, b) for a, b in zip(parts, again, strict=True))
    assert not all(np.array_equal(a, b) for a, b in zip(parts, other, strict=True))


@pytest.mark.parametrize("clients, k", [(10, 2), (9, 2), (4, 7), (3, 10)])
def test_pathological_gives_each_client_at_most_k_classes(clients, k):
    # Prepare
    cfg = _cfg("pathological", classes_per_client=k)
    pool, _ = server_test_split(cfg, seed=0)
    # Execute
    parts = partition_all(cfg, clients, seed=0)
    # Assert
    assert all(len(set(pool.y[p].tolist())) <= k for p in parts)
    assert set(pool.y[np.concatenate(parts)].tolist()) == set(range(10))


def test_pathological_refuses_to_drop_classes():
    # Prepare: 4 clients x 2 consecutive classes reach only classes 0..4 of 10.
    cfg = _cfg("pathological", classes_per_client=2)
    # Execute / Assert
    with pytest.raises(ConfigError, match=r"classes_per_client=2.*\[5, 6, 7, 8, 9\].*>= 7"):
        partition_all(cfg, 4, seed=0)


@pytest.mark.parametrize("clients, shards", [(10, 2), (7, 3), (4, 1)])
def test_shard_sizes_are_whole_shards(clients, shards):
    # Prepare: shards hold len(pool) // (clients * shards) records; the leftover
    # records form extra shards (the last one incomplete).
    cfg = _cfg("shard", shards_per_client=shards)
    pool, _ = server_test_split(cfg, seed=2)
    size = len(pool) // (clients * shards)
    total_shards = -(-len(pool) // size)
    # Execute
    sizes = [len(p) for p in partition_all(cfg, clients, seed=2)]
    # Assert
    held = [-(-n // size) for n in sizes]
    ragged = [n % size for n in sizes if n % size]
    assert sum(sizes) == len(pool) and sum(held) == total_shards
    assert min(held) >= shards
    assert ragged == ([len(pool) % size] if len(pool) % size else [])


def test_shard_needs_a_record_per_shard():
    # Prepare: breast-cancer's pool has 455 records (80% of 569).
    cfg = _cfg("shard", name="breast-cancer", shards_per_client=50)
    # Execute / Assert
    with pytest.raises(ConfigError, match="shards_per_client=50.*455"):
        partition_all(cfg, 10, seed=0)


def test_more_clients_than_records_names_the_empty_partition():
    # Prepare
    cfg = _cfg("iid", name="breast-cancer")
    # Execute / Assert
    with pytest.raises(ConfigError, match="partition 455 and above would be empty"):
        partition_all(cfg, 456, seed=0)


def test_client_partition_works_with_the_new_partitioners():
    # Prepare
    cfg = _cfg("shard", name="breast-cancer")
    # Execute
    train, val = client_partition(cfg, 3, 5, seed=0)
    # Assert
    assert train.x.shape[1:] == (30,) and len(train) + len(val) > 0


def test_dirichlet_that_cannot_fill_its_partitions_suggests_settings():
    # Prepare: 455 records cannot give 4 clients 100 each at alpha=0.01 (near one class each).
    cfg = _cfg("dirichlet", name="breast-cancer", alpha=0.01, min_partition_size=100)
    # Execute / Assert
    with pytest.warns(UserWarning), pytest.raises(ConfigError, match="min_partition_size"):
        partition_all(cfg, 4, seed=0)


def _synthetic_fashion(folder: Path, monkeypatch) -> np.ndarray:
    """200 random images, 20 of each class, installed as Fashion-MNIST; returns the bytes."""
    rng = np.random.default_rng(5)
    pixels = rng.integers(0, 256, size=(200, 28, 28))
    labels = rng.permutation(np.repeat(np.arange(10), 20))
    _write_fashion(folder, _idx_bytes(pixels), _idx_bytes(labels))
    monkeypatch.setenv(FASHION_MNIST_ENV, str(folder))
    return pixels


def test_fashion_mnist_is_split_as_bytes_and_decoded_as_before(tmp_path, monkeypatch):
    # Prepare: the split that decoding everything first gave, written out with
    # scikit-learn (stratified, seeded, each part in pool order) and 2 v / 255 - 1.
    from sklearn.model_selection import train_test_split

    pixels = _synthetic_fashion(tmp_path, monkeypatch)
    cfg = DatasetConfig(name="fashion-mnist", test_fraction=0.25)
    labels = load_fashion_mnist().y
    rest, out = train_test_split(np.arange(200), test_size=0.25, random_state=3,
                                 stratify=labels)
    expected = {"pool": np.sort(rest), "test": np.sort(out)}
    # Execute
    stored = dict(zip(("pool", "test"), stored_test_split(cfg, 3), strict=True))
    decoded = dict(zip(("pool", "test"), server_test_split(cfg, 3), strict=True))
    # Assert: bytes are kept (a quarter of the floats' memory), decoding gives the same floats.
    for part, idx in expected.items():
        assert stored[part].codes.dtype == np.uint8
        assert np.array_equal(stored[part].codes[:, 0], pixels[idx])
        assert np.array_equal(stored[part].y, labels[idx])
        want = (2.0 * pixels[idx] / 255.0 - 1.0).astype(np.float32)[:, None]
        assert decoded[part].x.dtype == np.float32
        assert np.array_equal(decoded[part].x, want)
        assert np.array_equal(stored[part].decoded().x, want)


def test_a_client_decodes_only_its_records_with_the_same_values(tmp_path, monkeypatch):
    # Prepare
    _synthetic_fashion(tmp_path, monkeypatch)
    cfg = DatasetConfig(name="fashion-mnist", val_fraction=0.2)
    stored = stored_test_split(cfg, 0)[0]
    floats = server_test_split(cfg, 0)[0]
    parts = partition_all(cfg, 4, 0)
    # Execute
    from_bytes = client_partition(cfg, 2, 4, 0, pool=stored, parts=parts)
    from_floats = client_partition(cfg, 2, 4, 0, pool=floats, parts=parts)
    alone = client_partition(cfg, 2, 4, 0)
    # Assert: the same train and validation records and values, however the pool is held.
    for got in (from_bytes, alone):
        for part, want in zip(got, from_floats, strict=True):
            assert part.x.dtype == np.float32
            assert np.array_equal(part.x, want.x) and np.array_equal(part.y, want.y)


@pytest.mark.parametrize("cfg, clients", [
    (DatasetConfig(), 7),
    (DatasetConfig(partitioner="dirichlet", alpha=0.5), 5),
    (DatasetConfig(partitioner="pathological", classes_per_client=2), 9),
    (DatasetConfig(val_fraction=0.0), 4),
    (DatasetConfig(name="mnist5k", test_fraction=0.3, val_fraction=0.25), 3),
])
def test_the_servers_cut_gives_each_client_what_it_would_cut_itself(tmp_path, cfg, clients):
    # Prepare: the cut saved to a folder and mapped back, as a worker reads it.
    save_cut(cut_clients(cfg, clients, 4), tmp_path / "cut")
    cut = load_cut(tmp_path / "cut")
    # Execute / Assert: every client's train and validation data, bit for bit.
    assert cut.key == cut_key(cfg, clients, 4)
    for pid in range(clients):
        for mine, theirs in zip(cut.client(pid), client_partition(cfg, pid, clients, 4),
                                strict=True):
            assert mine.x.dtype == theirs.x.dtype and mine.y.dtype == theirs.y.dtype
            assert np.array_equal(mine.x, theirs.x) and np.array_equal(mine.y, theirs.y)
            assert mine.x.flags.writeable and mine.x.flags.c_contiguous  # a copy of its own


def test_a_cut_client_is_its_partition_split_as_scikit_learn_splits_it(tmp_path):
    # Prepare: client 2's data written out from its parts, not through the code under
    # test: its partition of the test split's pool, then a stratified split of its
    # records with scikit-learn (seed + 1 + client), each part in pool order.
    from sklearn.model_selection import train_test_split

    cfg = DatasetConfig(val_fraction=0.25)
    pool, _ = server_test_split(cfg, 4)
    idx = partition_all(cfg, 5, 4)[2]
    rest, out = train_test_split(np.arange(len(idx)), test_size=0.25, random_state=4 + 1 + 2,
                                 stratify=pool.y[idx])
    want = [idx[np.sort(rest)], idx[np.sort(out)]]
    save_cut(cut_clients(cfg, 5, 4), tmp_path / "cut")
    # Execute
    got = load_cut(tmp_path / "cut").client(2)
    # Assert
    for part, rows in zip(got, want, strict=True):
        assert np.array_equal(part.x, pool.x[rows]) and np.array_equal(part.y, pool.y[rows])


def test_a_fashion_mnist_cut_keeps_bytes_and_decodes_them(tmp_path, monkeypatch):
    # Prepare
    _synthetic_fashion(tmp_path, monkeypatch)
    cfg = DatasetConfig(name="fashion-mnist")
    save_cut(cut_clients(cfg, 3, 0), tmp_path / "cut")
    # Execute
    cut = load_cut(tmp_path / "cut")
    # Assert: one byte a pixel on disk; floats for the client, as it would cut them
    assert np.load(tmp_path / "cut" / "codes.npy").dtype == np.uint8
    for pid in range(3):
        for mine, theirs in zip(cut.client(pid), client_partition(cfg, pid, 3, 0), strict=True):
            assert mine.x.dtype == np.float32 and np.array_equal(mine.x, theirs.x)
            assert np.array_equal(mine.y, theirs.y)


def test_keys_tell_every_setting_apart():
    base = cut_key(DatasetConfig(), 10, 0)
    assert base == cut_key(DatasetConfig(), 10, 0)
    assert len({base, cut_key(DatasetConfig(), 11, 0), cut_key(DatasetConfig(), 10, 1),
                cut_key(DatasetConfig(val_fraction=0.2), 10, 0),
                cut_key(DatasetConfig(partitioner="dirichlet"), 10, 0)}) == 5


@pytest.mark.parametrize("damage", ["no_meta", "no_rows", "short_bounds", "bad_json",
                                    "a_client_missing"])
def test_a_damaged_cut_is_refused_by_name(tmp_path, damage):
    # Prepare
    folder = tmp_path / "cut"
    save_cut(cut_clients(DatasetConfig(), 3, 0), folder)
    if damage == "no_meta":
        (folder / "cut.json").unlink()
    elif damage == "no_rows":
        (folder / "x.npy").unlink()
    elif damage == "short_bounds":
        bounds = np.load(folder / "bounds.npy")
        bounds[-1, -1] -= 1
        np.save(folder / "bounds.npy", bounds)
    elif damage == "a_client_missing":  # the rows still covered, by two clients of three
        bounds = np.load(folder / "bounds.npy")
        bounds[1, 2] = bounds[2, 2]
        np.save(folder / "bounds.npy", bounds[:2])
    else:
        (folder / "cut.json").write_text("{")
    # Execute / Assert
    with pytest.raises(ValueError, match=str(folder)):
        load_cut(folder)
