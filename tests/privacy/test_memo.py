import pytest

from privacy.memo import Lru


def test_the_least_recently_used_is_evicted_and_counts_are_kept():
    calls = []
    lru: Lru[int] = Lru(2)

    def get(k):
        return lru.get(k, lambda: calls.append(k) or k * 10)

    assert [get(1), get(2), get(1), get(3)] == [10, 20, 10, 30]  # 3 evicts 2, not 1
    assert get(1) == 10 and get(2) == 20
    assert calls == [1, 2, 3, 2]
    assert (lru.hits, lru.misses, len(lru)) == (2, 4, 2)


def test_zero_keeps_nothing_and_none_keeps_everything():
    off: Lru[int] = Lru(0)
    assert [off.get(1, lambda: 1), off.get(1, lambda: 2)] == [1, 2] and len(off) == 0
    unbounded: Lru[int] = Lru(None)
    for k in range(1000):
        unbounded.get(k, lambda k=k: k)
    assert len(unbounded) == 1000 and unbounded.misses == 1000
    unbounded.clear()
    assert (len(unbounded), unbounded.hits, unbounded.misses) == (0, 0, 0)


@pytest.mark.parametrize("bad", [-1, 1.5, True, "2"])
def test_a_bad_size_is_named(bad):
    with pytest.raises(ValueError, match="maxsize"):
        Lru(bad)


def test_a_byte_bound_evicts_the_oldest_until_it_fits_and_skips_a_too_large_result():
    lru: Lru[bytes] = Lru(None, max_bytes=10, size_of=len)
    lru.get("a", lambda: b"1234")
    lru.get("b", lambda: b"5678")
    assert (len(lru), lru.nbytes) == (2, 8)
    lru.get("a", lambda: b"never")  # a hit: "a" is now the most recent
    lru.get("c", lambda: b"xyz")  # 11 bytes: "b", the least recent, goes
    assert lru.get("a", lambda: b"recomputed") == b"1234"
    assert (len(lru), lru.nbytes, lru.hits, lru.misses) == (2, 7, 2, 3)
    assert lru.get("big", lambda: b"12345678901") == b"12345678901"  # 11 > 10: not kept
    assert (len(lru), lru.nbytes) == (2, 7)
    assert lru.get("big", lambda: b"again") == b"again"
    lru.clear()
    assert (len(lru), lru.nbytes) == (0, 0)


def test_a_byte_bound_needs_a_size():
    with pytest.raises(ValueError, match="size_of"):
        Lru(4, max_bytes=10)
    with pytest.raises(ValueError, match="max_bytes"):
        Lru(4, max_bytes=-1, size_of=len)
