"""The worker cache: results a client process keeps between messages.

Flower pickles the ClientApp with every message (``vce_api._load``,
``ray_actor.run``), so nothing attached to ``clients.app.app`` outlives one
call. What outlives it is the worker process, so the cache belongs to the
process: :func:`worker_cache` returns this process's :class:`WorkerCache`,
created on first use and kept until the process ends; :func:`use_worker_cache`
puts another one in place (a test, a benchmark, a disabled cache) and
:meth:`WorkerCache.clear` empties it.

It remembers pure functions of their keys, nothing else:

- a bundled data set's train pool and its partition cut (the indices of every
  client), keyed by the dataset config, the seed and the number of partitions;
  site files are read anew every call (a site may change its file);
- a bundled data set's client data after ``dataset.preprocess`` and the
  validation split (scattering features take seconds per thousand images; the
  split alone was 6 % of a digits client's call), keyed by the dataset config,
  the partition, the seed, the federated statistics and the state directory,
  bounded by count and by bytes; its arrays are made read-only. Data without
  a costly step (:data:`COSTLY_STEPS`) has a bound of its own, a small one:
  a Fashion-MNIST client's 1.5 MB is redone from the pool in about 1 ms (of
  a 115 ms call), and keeping all 100 clients' took 150 MB in every worker;
- σ calibrations (:func:`privacy.calibrate_noise_multiplier`), keyed by every
  argument of the calibration;
- ε of a history (:class:`privacy.EpsilonMemo`), keyed by its composition, δ
  and the accountant;
- a simulation server's cut of every client's data
  (:class:`clients.data.ClientCut`), mapped once per folder; a client's data
  is read from it only when the cut's key is that of the client's own
  arguments, and counted in ``cut_reads``.

So no charge, σ or ε changes with it: the ledgers stay the only privacy state
(a run's σ is still read back from its first charge, every release is still
committed before it is made). Each memo is bounded, the oldest entry evicted.
"""

from __future__ import annotations

import dataclasses
import json
import logging
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

import numpy as np

from clients.config import DatasetConfig
from clients.data import (
    ArrayData,
    ByteImages,
    ClientCut,
    client_partition,
    cut_key,
    load_cut,
    partition_all,
    stored_test_split,
)
from privacy import EpsilonMemo, GaussianRelease, calibrate_noise_multiplier
from privacy.memo import Lru

if TYPE_CHECKING:
    from clients.sitedata import SiteData

__all__ = ["CacheStats", "WorkerCache", "worker_cache", "use_worker_cache"]

@dataclass(frozen=True)
class CacheStats:
    """How one memo of a :class:`WorkerCache` has done since it was created or cleared."""

    hits: int
    misses: int
    size: int
    maxsize: int


log = logging.getLogger(__name__)

# Preprocessing steps whose output is worth its memory: everything else is redone
# from the kept pool in about a millisecond.
COSTLY_STEPS = frozenset({"scatter"})


def _site_bytes(data: SiteData) -> int:
    return sum(a.nbytes for part in (data.train, data.val) for a in (part.x, part.y))


def _read_only(data: SiteData) -> SiteData:
    for part in (data.train, data.val):
        _frozen(part.x)
        _frozen(part.y)
    return data


def _frozen(array: np.ndarray) -> np.ndarray:
    array.setflags(write=False)  # shared by every client of the worker: nobody may edit it
    return array


class WorkerCache:
    """One client worker process's memos (see the module docstring).

    Parameters
    ----------
    max_pools : bundled data pools (with their cut) kept; one is a whole data
        set (Fashion-MNIST: 38 MB of pixel bytes), so keep this small.
    max_sites : bundled client data sets after preprocessing kept.
    max_site_bytes : their total size bound, for data from a costly step
        (Fashion-MNIST scattering features: about 75 MB per client of ten).
    max_plain_site_bytes : the same for the other client data sets (a digits
        client: 4 kB, so 1,000 fit; a Fashion-MNIST client of 100: 1.5 MB).
    max_sigmas : σ calibrations kept.
    max_epsilons : ε of histories kept.

    A size of 0 keeps nothing: :meth:`disabled` is a cache that only computes.
    """

    def __init__(self, *, max_pools: int = 2, max_sites: int = 1024,
                 max_site_bytes: int = 256 * 2**20, max_plain_site_bytes: int = 16 * 2**20,
                 max_sigmas: int = 256, max_epsilons: int = 1024) -> None:
        for name, value in (("max_pools", max_pools), ("max_sites", max_sites),
                            ("max_site_bytes", max_site_bytes),
                            ("max_plain_site_bytes", max_plain_site_bytes),
                            ("max_sigmas", max_sigmas), ("max_epsilons", max_epsilons)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{name}={value!r}: must be an integer >= 0")
        self._pools: Lru[tuple[ArrayData | ByteImages, list[np.ndarray]]] = Lru(max_pools)
        self._sites: Lru[SiteData] = Lru(max_sites, max_bytes=max_site_bytes,
                                         size_of=_site_bytes)
        self._plain_sites: Lru[SiteData] = Lru(max_sites, max_bytes=max_plain_site_bytes,
                                               size_of=_site_bytes)
        self._sigmas: Lru[float] = Lru(max_sigmas)
        self._cuts: Lru[ClientCut | None] = Lru(max_pools)
        self.epsilon = EpsilonMemo(maxsize=max_epsilons)
        self.cut_reads = 0  # clients' data read from a server's cut (client_partition)

    @classmethod
    def disabled(cls) -> WorkerCache:
        """A cache that keeps nothing: every call computes (the uncached reference)."""
        return cls(max_pools=0, max_sites=0, max_sigmas=0, max_epsilons=0)

    def client_partition(self, cfg: DatasetConfig, partition_id: int, num_partitions: int,
                         seed: int, *, cut: str | None = None) -> tuple[ArrayData, ArrayData]:
        """:func:`clients.data.client_partition`, the pool loaded and cut once per key.

        ``cut``: a folder where the server saved every client's data
        (:func:`clients.data.save_cut`); read from there, mapped once per folder,
        when it was cut for these arguments, and computed here otherwise.
        """
        if cut is not None and 0 <= partition_id < num_partitions:
            found = self._cuts.get(cut, lambda: _readable_cut(cut))
            if found is not None and found.key == cut_key(cfg, num_partitions, seed):
                self.cut_reads += 1
                return found.client(partition_id)
        # The pool and the cut do not depend on the validation share; the split does,
        # and client_partition makes it from the config it is given.
        key = (_config_key(dataclasses.replace(cfg, val_fraction=0.0)), seed, num_partitions)

        def load() -> tuple[ArrayData | ByteImages, list[np.ndarray]]:
            pool = stored_test_split(cfg, seed)[0]
            _frozen(pool.codes if isinstance(pool, ByteImages) else pool.x)
            _frozen(pool.y)
            parts = partition_all(cfg, num_partitions, seed, pool=pool)
            return pool, [_frozen(p) for p in parts]

        if not 0 <= partition_id < num_partitions:  # the same error, before any load
            return client_partition(cfg, partition_id, num_partitions, seed)
        pool, parts = self._pools.get(key, load)
        return client_partition(cfg, partition_id, num_partitions, seed, pool=pool,
                                parts=parts)

    def site_data(self, cfg: DatasetConfig, *, partition_id: int, num_partitions: int,
                  seed: int, stats: tuple[Sequence[float], Sequence[float]] | None,
                  state_dir: object, load: Callable[[], SiteData]) -> SiteData:
        """``load()`` (:func:`clients.sitedata.load_site_data` with these arguments),
        once per key for bundled data; every call for site files (they may change).

        The arrays it returns are read-only: the next call gets them too.
        """
        if cfg.is_files:
            return load()
        frozen_stats = None if stats is None else (tuple(map(float, stats[0])),
                                                   tuple(map(float, stats[1])))
        key = (_config_key(cfg), int(partition_id), int(num_partitions), int(seed),
               frozen_stats, str(state_dir))
        costly = any(step["name"] in COSTLY_STEPS for step in cfg.preprocess)
        memo = self._sites if costly else self._plain_sites
        return memo.get(key, lambda: _read_only(load()))

    def noise_multiplier(self, *, target_epsilon: float, delta: float, sample_rate: float,
                         steps: int, accountant: str,
                         prior: Sequence[GaussianRelease] = ()) -> float:
        """:func:`privacy.calibrate_noise_multiplier`, remembered by all its arguments."""
        prior = tuple(prior)
        key = (float(target_epsilon), float(delta), float(sample_rate), int(steps),
               accountant, prior)
        return self._sigmas.get(key, lambda: calibrate_noise_multiplier(
            target_epsilon=target_epsilon, delta=delta, sample_rate=sample_rate, steps=steps,
            accountant=accountant, prior=prior))

    def stats(self) -> dict[str, CacheStats]:
        """Hits, misses and sizes of each memo."""
        def of(m: Lru[Any] | EpsilonMemo) -> CacheStats:
            return CacheStats(m.hits, m.misses, len(m), m.maxsize or 0)

        costly, plain = of(self._sites), of(self._plain_sites)
        sites = CacheStats(costly.hits + plain.hits, costly.misses + plain.misses,
                           costly.size + plain.size, costly.maxsize + plain.maxsize)
        return {"data": of(self._pools), "site_data": sites, "sigma": of(self._sigmas),
                "epsilon": of(self.epsilon)}

    def clear(self) -> None:
        """Forget everything (and the counts)."""
        self._pools.clear()
        self._cuts.clear()
        self.cut_reads = 0
        self._plain_sites.clear()
        self._sites.clear()
        self._sigmas.clear()
        self.epsilon.clear()


def _readable_cut(folder: str) -> ClientCut | None:
    """:func:`clients.data.load_cut`, or ``None`` (with a warning) when it cannot be read."""
    from pathlib import Path

    try:
        return load_cut(Path(folder))
    except ValueError as err:
        log.warning("%s; the worker cuts its clients' data itself", err)
        return None


def _config_key(cfg: DatasetConfig) -> str:
    """Every field of the config, canonically (its list fields are not hashable)."""
    return json.dumps(dataclasses.asdict(cfg), sort_keys=True, default=repr)


class _ProcessCache:
    """Holds this process's :class:`WorkerCache` (see :func:`worker_cache`)."""

    def __init__(self) -> None:
        self.cache: WorkerCache | None = None


_PROCESS = _ProcessCache()


def worker_cache() -> WorkerCache:
    """This process's :class:`WorkerCache`, created on first use and kept for its life.

    Every handler of ``clients.app`` takes it from here once per message.
    """
    if _PROCESS.cache is None:
        _PROCESS.cache = WorkerCache()
    return _PROCESS.cache


@contextmanager
def use_worker_cache(cache: WorkerCache) -> Iterator[WorkerCache]:
    """Make ``cache`` this process's worker cache inside the block, then restore the old one."""
    before = _PROCESS.cache
    _PROCESS.cache = cache
    try:
        yield cache
    finally:
        _PROCESS.cache = before
