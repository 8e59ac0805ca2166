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
