"""The worker cache: the same charges, σ, ε and update as without it; distinct keys; bounded."""

import time

import numpy as np
import pytest
import torch
from flwr.app import ArrayRecord, ConfigRecord, Context, Metadata, RecordDict
from flwr.app.message.message import make_message

from clients.app import train
from clients.cache import WorkerCache, use_worker_cache, worker_cache
from clients.config import DatasetConfig, flatten
from clients.data import client_partition
from clients.models import build_model
from privacy import EpsilonMemo, GaussianRelease, calibrate_noise_multiplier, epsilon
from privacy.ledger import LEDGER_FILE, Ledger
from server.app import compose_config

RUN_ID = 7
NUM_CLIENTS = 4


@pytest.fixture(scope="module")
def task():
    # RDP at q = 1 (one batch holds a client's records) calibrates in milliseconds;
    # 2 rounds, so that round 2 reads σ back from the ledger.
    cfg, _ = compose_config(["train.rounds=2", "privacy.accountant=rdp", "train.batch_size=512",
                             f"simulation.num_clients={NUM_CLIENTS}",
                             "strategy.min_train_clients=2", "strategy.min_evaluate_clients=2"])
    return cfg, flatten(cfg.task)


def _call(task, root, pid, rnd):
    """The train handler for client ``pid`` in round ``rnd``, as Flower's simulation calls it."""
    cfg, flat = task
    model = build_model(cfg.model, (1, 8, 8), 10, seed=0)
    config = ConfigRecord({**flat, "lr": 0.5, "num-threads": 1, "server-round": rnd,
                           "site-state-root": str(root)})
    meta = Metadata(run_id=RUN_ID, message_id=f"m{pid}-{rnd}", src_node_id=0,
                    dst_node_id=pid + 1, reply_to_message_id="", group_id=str(rnd),
                    created_at=time.time(), ttl=3600, message_type="train")
    context = Context(run_id=RUN_ID, node_id=pid + 1, state=RecordDict(), run_config={},
                      node_config={"partition-id": pid, "num-partitions": NUM_CLIENTS})
    return train(make_message(meta, RecordDict({"arrays": ArrayRecord(model.state_dict()),
                                                "config": config})), context)


def _ledger_rows(root):
    rows = []
    for path in sorted(root.glob(f"*/{LEDGER_FILE}")):
        with Ledger.open(path, create=False) as ledger:
            rows += [r.charge for r in ledger.rows()]
    return rows


def _run(task, root, cache):
    """Two rounds of three clients (two of them share a worker's cache, as in Ray)."""
    replies = []
    with use_worker_cache(cache):
        for rnd in (1, 2):
            for pid in (0, 1, 3):
                replies.append(_call(task, root, pid, rnd))
    return replies


def test_cached_calls_charge_and_train_exactly_as_uncached_ones(task, tmp_path):
    # Prepare
    cached = WorkerCache()
    # Execute
    plain = _run(task, tmp_path / "uncached", WorkerCache.disabled())
    fast = _run(task, tmp_path / "cached", cached)
    # Assert: the cache was used ...
    stats = cached.stats()
    # Round 1 cuts each client's data from one pool; round 2 finds it prepared.
    assert stats["data"].hits == 2 and stats["data"].misses == 1
    assert stats["site_data"].hits == 3 and stats["site_data"].misses == 3
    assert stats["sigma"].hits >= 1 and stats["epsilon"].hits >= 1
    # ... and every reply is the same: metrics (σ, ε, q, steps), the update, the charge.
    for a, b in zip(plain, fast, strict=True):
        assert dict(a.content["metrics"]) == dict(b.content["metrics"])
        wa = a.content["arrays"].to_torch_state_dict()
        wb = b.content["arrays"].to_torch_state_dict()
        assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    charges_a, charges_b = _ledger_rows(tmp_path / "uncached"), _ledger_rows(tmp_path / "cached")
    assert len(charges_a) == len(charges_b) == 6
    for ca, cb in zip(charges_a, charges_b, strict=True):
        assert (ca.noise_multiplier, ca.sample_rate, ca.steps, ca.epsilon_reported,
                ca.num_records) == (cb.noise_multiplier, cb.sample_rate, cb.steps,
                                    cb.epsilon_reported, cb.num_records)


def test_sigma_and_epsilon_in_the_reply_match_the_accountant_called_directly(task, tmp_path):
    # Prepare
    cfg, _ = task
    # Execute: client 1 after client 0 in one worker (client 1 hits the data cache)
    with use_worker_cache(WorkerCache()):
        _call(task, tmp_path, 0, 1)
        metrics = _call(task, tmp_path, 1, 1).content["metrics"]
    # Assert: the same σ and ε as calibrating and accounting this client's schedule anew
    # (Opacus' Poisson loader: q = 1 / number of batches, that many steps per epoch.)
    train_data, _ = client_partition(cfg.dataset, 1, NUM_CLIENTS, cfg.train.seed)
    batches = -(-len(train_data) // cfg.train.batch_size)
    q, steps = 1.0 / batches, cfg.train.local_epochs * batches
    assert (metrics["sample_rate"], metrics["steps"]) == (q, steps)
    sigma = calibrate_noise_multiplier(
        target_epsilon=cfg.privacy.target_epsilon, delta=cfg.privacy.delta, sample_rate=q,
        steps=steps * cfg.train.rounds, accountant="rdp")
    assert metrics["noise_multiplier"] == sigma
    assert metrics["epsilon"] == epsilon(history=[(sigma, q, steps)], delta=cfg.privacy.delta,
                                         accountant="rdp")


@pytest.mark.parametrize("change", [
    {"partitioner": "dirichlet"}, {"test_fraction": 0.3}, {"name": "breast-cancer"},
])
def test_data_keys_distinguish_configs_seeds_and_sizes(change):
    # Prepare
    cache = WorkerCache(max_pools=8)
    base = DatasetConfig(name="digits")
    other = DatasetConfig(**{"name": "digits", **change})
    # Execute
    got = {
        "base": cache.client_partition(base, 1, 4, 0),
        "other config": cache.client_partition(other, 1, 4, 0),
        "other seed": cache.client_partition(base, 1, 4, 1),
        "other size": cache.client_partition(base, 1, 5, 0),
        "base again": cache.client_partition(base, 1, 4, 0),
    }
    # Assert: each equals the uncached function called directly
    expected = {
        "base": client_partition(base, 1, 4, 0),
        "other config": client_partition(other, 1, 4, 0),
        "other seed": client_partition(base, 1, 4, 1),
        "other size": client_partition(base, 1, 5, 0),
        "base again": client_partition(base, 1, 4, 0),
    }
    for name, (local, val) in got.items():
        want_local, want_val = expected[name]
        assert np.array_equal(local.x, want_local.x), name
        assert np.array_equal(local.y, want_local.y) and np.array_equal(val.y, want_val.y), name
    assert cache.stats()["data"].misses == 4 and cache.stats()["data"].hits == 1


def test_the_validation_share_reuses_the_pool_but_splits_anew():
    # Prepare
    cache = WorkerCache(max_pools=1)
    cfg, no_val = DatasetConfig(val_fraction=0.2), DatasetConfig(val_fraction=0.0)
    # Execute
    local, val = cache.client_partition(cfg, 2, 3, 0)
    whole, none = cache.client_partition(no_val, 2, 3, 0)
    # Assert
    assert cache.stats()["data"].hits == 1
    assert len(val) > 0 and len(none) == 0 and len(whole) == len(local) + len(val)
    assert np.array_equal(val.y, client_partition(cfg, 2, 3, 0)[1].y)


def test_sigma_keys_are_every_argument_of_the_calibration():
    # Prepare
    cache = WorkerCache()
    # (q = 1 calibrates in milliseconds; q < 1 at a small rate stays under a second.)
    base = {"target_epsilon": 3.0, "delta": 1e-5, "sample_rate": 1.0, "steps": 5,
            "accountant": "rdp", "prior": ()}
    variants = [{}, {"target_epsilon": 2.0}, {"delta": 1e-6}, {"sample_rate": 0.001},
                {"steps": 6}, {"accountant": "prv"},
                {"prior": (GaussianRelease(5.0, 1.0, 1, sampling="none"),)}]
    # Execute / Assert: every variant is computed, and equals the direct calibration
    for v in variants:
        args = {**base, **v}
        assert cache.noise_multiplier(**args) == calibrate_noise_multiplier(**args)
    assert cache.stats()["sigma"].misses == len(variants)
    assert cache.noise_multiplier(**base) == calibrate_noise_multiplier(**base)
    assert cache.stats()["sigma"].hits == 1


def test_every_memo_is_bounded():
    # Prepare
    cache = WorkerCache(max_pools=1, max_sigmas=2, max_epsilons=2)
    # Execute
    for seed in range(3):
        cache.client_partition(DatasetConfig(), 0, 2, seed)
    for steps in (10, 20, 30):
        cache.noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=1.0, steps=steps,
                               accountant="rdp")
        cache.epsilon([(1.0, 1.0, steps)], 1e-5, "rdp")
    # Assert
    stats = cache.stats()
    assert (stats["data"].size, stats["sigma"].size, stats["epsilon"].size) == (1, 2, 2)
    assert stats["data"].misses == 3 and stats["sigma"].misses == 3
    # The least recently used went first: steps=10 is computed again, steps=30 is not.
    cache.noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=1.0, steps=30,
                           accountant="rdp")
    cache.noise_multiplier(target_epsilon=3.0, delta=1e-5, sample_rate=1.0, steps=10,
                           accountant="rdp")
    assert cache.stats()["sigma"].hits == 1 and cache.stats()["sigma"].misses == 4


def test_disabled_keeps_nothing_and_clear_forgets():
    # Prepare
    off, on = WorkerCache.disabled(), WorkerCache()
    # Execute
    for cache in (off, on):
        for _ in range(2):
            cache.client_partition(DatasetConfig(), 0, 2, 0)
            cache.epsilon([(1.0, 1.0, 10)], 1e-5, "rdp")
    # Assert
    assert all(s.size == 0 and s.hits == 0 for s in off.stats().values())
    assert on.stats()["data"].hits == 1 and on.stats()["epsilon"].hits == 1
    on.clear()
    assert all(s.size == 0 and s.hits == s.misses == 0 for s in on.stats().values())


def test_clients_cannot_edit_the_shared_pool():
    # Prepare
    cache = WorkerCache()
    local, _ = cache.client_partition(DatasetConfig(), 0, 2, 0)
    # Execute: a client's data is its own copy ...
    local.x[:] = 0.0
    again, _ = cache.client_partition(DatasetConfig(), 0, 2, 0)
    # Assert: ... and the pool behind it is unchanged
    assert np.array_equal(again.x, client_partition(DatasetConfig(), 0, 2, 0)[0].x)


def test_the_fashion_mnist_pool_is_kept_as_read_only_bytes(tmp_path, monkeypatch):
    # Prepare: a 100-image stand-in for Fashion-MNIST (10 per class).
    from clients.data import FASHION_MNIST_ENV, ByteImages

    rng = np.random.default_rng(0)
    images = rng.integers(0, 256, size=(100, 28, 28), dtype=np.uint8)
    labels = np.repeat(np.arange(10, dtype=np.uint8), 10)
    head = bytes([0, 0, 8, 3]) + b"".join(n.to_bytes(4, "big") for n in images.shape)
    (tmp_path / "train-images-idx3-ubyte").write_bytes(head + images.tobytes())
    (tmp_path / "train-labels-idx1-ubyte").write_bytes(bytes([0, 0, 8, 1]) + (100).to_bytes(
        4, "big") + labels.tobytes())
    monkeypatch.setenv(FASHION_MNIST_ENV, str(tmp_path))
    cfg, cache = DatasetConfig(name="fashion-mnist"), WorkerCache()
    # Execute
    local, val = cache.client_partition(cfg, 1, 3, 0)
    ((pool, _parts), _size), = cache._pools._items.values()  # the one pool kept
    # Assert: one byte a pixel, which no client can edit; clients get floats, as uncached.
    assert isinstance(pool, ByteImages) and pool.codes.dtype == np.uint8
    assert not pool.codes.flags.writeable and not pool.y.flags.writeable
    want, want_val = client_partition(cfg, 1, 3, 0)
    assert local.x.dtype == np.float32 and np.array_equal(local.x, want.x)
    assert np.array_equal(val.x, want_val.x) and np.array_equal(local.y, want.y)


@pytest.mark.parametrize("steps, kept_by", [
    ((), "max_plain_site_bytes"),
    (({"name": "normalize", "mode": "none"},), "max_plain_site_bytes"),
    (({"name": "scatter", "J": 1, "L": 4},), "max_site_bytes"),
])
def test_site_data_is_kept_under_the_bound_of_its_kind(tmp_path, steps, kept_by):
    # Prepare: a cache that can keep each kind of site data, and one that keeps
    # none of this kind (its bound is 0), the other bound left at its default.
    from clients.sitedata import load_site_data

    cfg = DatasetConfig(name="digits", preprocess=steps)
    loads = []

    def get(cache):
        def load():
            loads.append(1)
            return load_site_data(cfg, node_config={}, partition_id=1, num_partitions=3,
                                  seed=0, state_dir=tmp_path)
        return cache.site_data(cfg, partition_id=1, num_partitions=3, seed=0, stats=None,
                               state_dir=tmp_path, load=load)

    keeps, drops = WorkerCache(), WorkerCache(**{kept_by: 0})
    # Execute
    first = get(keeps)
    again = get(keeps)
    get(drops), get(drops)
    # Assert: loaded once where it may be kept, every time where its bound is 0
    assert again is first and keeps.stats()["site_data"].hits == 1
    assert drops.stats()["site_data"].hits == 0 and drops.stats()["site_data"].misses == 2
    assert len(loads) == 3


def test_plain_site_data_is_evicted_past_its_byte_bound(tmp_path):
    # Prepare: a bound that holds two digits clients' data (4 kB or so each), not three.
    from clients.sitedata import load_site_data

    cfg = DatasetConfig(name="digits")

    def get(cache, pid):
        return cache.site_data(cfg, partition_id=pid, num_partitions=100, seed=0, stats=None,
                               state_dir=tmp_path, load=lambda: load_site_data(
                                   cfg, node_config={}, partition_id=pid, num_partitions=100,
                                   seed=0, state_dir=tmp_path))

    sizes = [sum(a.nbytes for part in (d.train, d.val) for a in (part.x, part.y))
             for d in (get(WorkerCache.disabled(), pid) for pid in range(3))]
    cache = WorkerCache(max_plain_site_bytes=sizes[0] + sizes[1])
    # Execute: 0, 1, then 2 pushes out 0 (the oldest); 1 is still there
    for pid in (0, 1, 2, 1, 0):
        get(cache, pid)
    # Assert
    stats = cache.stats()["site_data"]
    assert (stats.hits, stats.misses) == (1, 4)


def test_clients_read_the_servers_cut_when_it_was_cut_for_them(tmp_path):
    # Prepare: a cut for 5 digits clients with seed 0.
    from clients.data import cut_clients, save_cut

    cfg = DatasetConfig()
    save_cut(cut_clients(cfg, 5, 0), tmp_path / "cut")
    cache = WorkerCache()
    # Execute: as cut; then another seed and another client count, not as cut
    read = cache.client_partition(cfg, 3, 5, 0, cut=str(tmp_path / "cut"))
    reads = cache.cut_reads
    other_seed = cache.client_partition(cfg, 3, 5, 1, cut=str(tmp_path / "cut"))
    other_count = cache.client_partition(cfg, 3, 6, 0, cut=str(tmp_path / "cut"))
    # Assert: read from the cut only where its key matches; every answer the cut's own
    assert reads == 1 and cache.cut_reads == 1
    for got, args in ((read, (3, 5, 0)), (other_seed, (3, 5, 1)), (other_count, (3, 6, 0))):
        for part, want in zip(got, client_partition(cfg, *args), strict=True):
            assert np.array_equal(part.x, want.x) and np.array_equal(part.y, want.y)


def test_an_unreadable_cut_is_named_and_the_worker_cuts_itself(tmp_path, caplog):
    # Prepare: a folder with no cut in it
    (tmp_path / "cut").mkdir()
    cache = WorkerCache()
    # Execute
    with caplog.at_level("WARNING", logger="clients.cache"):
        got, _ = cache.client_partition(DatasetConfig(), 1, 4, 0, cut=str(tmp_path / "cut"))
    # Assert
    assert cache.cut_reads == 0 and "not a readable client cut" in caplog.text
    assert np.array_equal(got.x, client_partition(DatasetConfig(), 1, 4, 0)[0].x)


def test_a_worker_that_reads_a_cut_does_not_import_the_splitting_libraries(tmp_path):
    # Prepare: a fresh interpreter, as a Ray worker starts
    import subprocess
    import sys

    from clients.data import cut_clients, save_cut

    save_cut(cut_clients(DatasetConfig(), 4, 0), tmp_path / "cut")
    code = ("import sys, clients.app\n"
            "from clients.cache import WorkerCache\n"
            "from clients.config import DatasetConfig\n"
            "WorkerCache().client_partition(DatasetConfig(), 2, 4, 0, "
            f"cut={str(tmp_path / 'cut')!r})\n"
            "print(sorted(m for m in ('sklearn', 'pandas', 'datasets', 'flwr_datasets',"
            " 'matplotlib') if m in sys.modules))")
    # Execute
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=120, check=True).stdout
    # Assert: none of them (about 140 MB of a worker's memory)
    assert out.strip().splitlines()[-1] == "[]"


def test_the_process_cache_lives_until_replaced():
    # Prepare
    mine = WorkerCache()
    # Execute / Assert
    first = worker_cache()
    assert worker_cache() is first
    with use_worker_cache(mine):
        assert worker_cache() is mine
    assert worker_cache() is first


@pytest.mark.parametrize("bad", [-1, 1.5, True])
def test_sizes_are_checked(bad):
    with pytest.raises(ValueError, match="max_pools"):
        WorkerCache(max_pools=bad)
    with pytest.raises(ValueError, match="maxsize"):
        EpsilonMemo(maxsize=bad)


def test_epsilon_memo_answers_like_the_accountant():
    # Prepare
    memo = EpsilonMemo(maxsize=4)
    history = [(1.1, 0.001, 100), GaussianRelease(2.0, 1.0, 1, sampling="none")]
    # Execute
    first, second = memo(history, 1e-5, "rdp"), memo(list(reversed(history)), 1e-5, "rdp")
    # Assert
    assert first == second == epsilon(history=history, delta=1e-5, accountant="rdp")
    assert (memo.hits, memo.misses, len(memo)) == (1, 1, 1)
