"""The server's state cache (tinyrwkv/state_cache.py, docs/serving.md §2): longest exact prefix,
copies not aliases, LRU by bytes, model separation, persistence, hostile folders, hash
collisions, threads."""

import threading
import warnings

import numpy as np
import pytest

from tinyrwkv.model import State
from tinyrwkv.state_cache import (ENTRY_OVERHEAD, StateCache, StateCacheWarning, entry_bytes,
                                  prefix_hashes)

L, C, H, N, V = 2, 8, 2, 4, 16          # a tiny model's state: (2, 8), (2, 2, 4, 4), (2, 8)


def state_for(tag, seed=0):
    """A state whose every number says which entry it is (tag) plus seeded noise."""
    rng = np.random.default_rng(seed)
    return State(np.full((L, C), tag, np.float32) + rng.standard_normal((L, C), np.float32),
                 np.full((L, H, N, N), tag, np.float32),
                 np.full((L, C), tag, np.float32))


def logits_for(tag):
    return np.arange(V, dtype=np.float32) + tag


def tag_of(state):
    return float(state.wkv.flat[0])


def same_bits(a, b):
    return all(getattr(a, n).dtype == getattr(b, n).dtype and
               getattr(a, n).tobytes() == getattr(b, n).tobytes()
               for n in ("att_shift", "wkv", "ffn_shift"))


# ---------------------------------------------------------------------------------------------

def test_longest_exact_prefix():
    cache = StateCache(10**7)
    cache.store("m", [1, 2, 3], state_for(3), logits_for(3))
    cache.store("m", [1, 2, 3, 4, 5], state_for(5))
    cache.store("m", [1, 2, 9], state_for(9))
    n, state, logits = cache.lookup("m", [1, 2, 3, 4, 5, 6])
    assert (n, tag_of(state), logits) == (5, 5.0, None)
    n, state, logits = cache.lookup("m", [1, 2, 3, 4])          # 5 tokens not a prefix of 4
    assert (n, tag_of(state)) == (3, 3.0) and np.array_equal(logits, logits_for(3))
    assert cache.lookup("m", [1, 2, 3, 4, 5])[0] == 5           # the whole sequence
    assert cache.lookup("m", [1, 2, 9, 9])[0] == 3 and tag_of(cache.lookup("m", [1, 2, 9])[1]) == 9
    assert cache.lookup("m", [1, 2, 4, 5, 6]) == (0, None, None)   # diverges at token 3
    assert cache.lookup("m", [1, 2]) == (0, None, None)          # shorter than every entry
    assert cache.lookup("m", [2, 2, 3, 4, 5]) == (0, None, None)  # diverges at the first token
    assert cache.lookup("m", []) == (0, None, None)
    s = cache.stats()
    assert (s["hits"], s["misses"], s["tokens_saved"]) == (5, 4, 5 + 3 + 5 + 3 + 3)
    assert cache.store("m", [], state_for(0)) is False


def test_copies_not_aliases():
    cache = StateCache(10**7)
    original, logits = state_for(1), logits_for(1)
    cache.store("m", [4, 5], original, logits)
    original.wkv[...] = -7                    # the caller's state changes after the store
    logits[...] = -7
    n, got, got_logits = cache.lookup("m", [4, 5])
    assert tag_of(got) == 1.0 and got_logits[0] == 1.0
    got.wkv[...] = 99                         # and the copy lookup returned changes too
    got.att_shift[...] = 99
    got_logits[...] = 99
    n, again, again_logits = cache.lookup("m", [4, 5])
    assert same_bits(again, state_for(1)) and np.array_equal(again_logits, logits_for(1))


def test_entry_bytes_is_state_logits_ids_and_overhead():
    s, lg = state_for(0), logits_for(0)
    assert entry_bytes(10, s, lg) == s.nbytes + lg.nbytes + 4 * 10 + ENTRY_OVERHEAD
    assert s.nbytes == 4 * L * C * (N + 2)    # docs/architecture.md §5: L*C*(N+2) numbers


def test_lru_eviction_by_bytes():
    size = entry_bytes(3, state_for(0), logits_for(0))
    cache = StateCache(3 * size)                          # holds exactly three entries
    for t in (1, 2, 3):
        assert cache.store("m", [t, t, t], state_for(t), logits_for(t))
    assert cache.stats()["entries"] == 3 and cache.stats()["bytes"] == 3 * size
    assert cache.stats()["evictions"] == 0
    assert cache.lookup("m", [1, 1, 1])[0] == 3           # 1 is now the most recent; 2 the least
    cache.store("m", [4, 4, 4], state_for(4), logits_for(4))
    assert cache.lookup("m", [2, 2, 2])[0] == 0           # evicted
    assert [cache.lookup("m", [t, t, t])[0] for t in (1, 3, 4)] == [3, 3, 3]
    s = cache.stats()
    assert (s["entries"], s["bytes"], s["evictions"]) == (3, 3 * size, 1)


def test_oversize_entry_refused():
    size = entry_bytes(2, state_for(0), logits_for(0))
    cache = StateCache(size - 1)
    assert cache.store("m", [1, 2], state_for(1), logits_for(1)) is False
    assert cache.stats()["entries"] == 0 and cache.lookup("m", [1, 2]) == (0, None, None)
    assert cache.store("m", [1, 2], state_for(1)) is True   # without logits it fits


def test_models_never_mix():
    cache = StateCache(10**7)
    cache.store("model-a/float32", [1, 2], state_for(1))
    assert cache.lookup("model-b/float32", [1, 2, 3]) == (0, None, None)
    assert cache.lookup("model-a/float16", [1, 2, 3]) == (0, None, None)
    assert cache.lookup("model-a/float32", [1, 2, 3])[0] == 2


def test_bad_arguments_are_named():
    with pytest.raises(ValueError, match="budget"):
        StateCache(-1)
    cache = StateCache(10**6)
    with pytest.raises(TypeError, match="model_key"):
        cache.lookup(("not", "a", "string"), [1])
    with pytest.raises(ValueError, match="integers"):
        cache.store("m", [0.5, 1.5], state_for(0))
    with pytest.raises(ValueError, match=r"\[0, "):
        cache.lookup("m", [-1, 2])


def test_prefix_hashes_are_prefix_consistent():
    rng = np.random.default_rng(1)
    ids = rng.integers(0, 65536, 300).astype(np.int32)
    h = prefix_hashes(ids)
    assert len(h) == 301
    for n in (0, 1, 17, 300):
        assert prefix_hashes(ids[:n])[-1] == h[n]     # the hash of ids[:n] alone
    assert len(set(h.tolist())) == 301                 # all prefixes differ here
    assert prefix_hashes([0])[-1] != prefix_hashes([0, 0])[-1] != 0   # zeros still count


# --- hash collisions --------------------------------------------------------------------------

def length_only(ids):
    """A hash that collides for every pair of sequences of one length."""
    return np.arange(len(ids) + 1)


def test_hash_collisions_never_hit():
    cache = StateCache(10**7, hash_fn=length_only)
    cache.store("m", [1], state_for(1))
    cache.store("m", [1, 2, 3], state_for(3))
    assert cache.lookup("m", [1, 2, 4])[0] == 1      # key (m, 3) exists, its ids differ: go on
    assert cache.lookup("m", [1, 6, 7, 8])[0] == 1
    assert cache.lookup("m", [9, 2, 3]) == (0, None, None)
    assert cache.lookup("m", [1, 2, 3, 4])[0] == 3
    cache.store("m", [5, 6, 7], state_for(7))        # the same key, other ids: replaces it
    assert cache.lookup("m", [1, 2, 3])[0] == 1
    n, state, _ = cache.lookup("m", [5, 6, 7])
    assert (n, tag_of(state)) == (3, 7.0)
    assert cache.stats()["entries"] == 2


# --- persistence --------------------------------------------------------------------------------

def test_persistence_round_trip_is_bit_identical(tmp_path):
    cache = StateCache(10**7, tmp_path)
    stored = state_for(2.5, seed=3)
    cache.store("m", [3, 1, 4, 1, 5], stored, logits_for(2))
    cache.flush()                                    # the background writer is done
    assert cache.stats()["disk_entries"] == 1 and len(list(tmp_path.glob("*.npz"))) == 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")               # a clean folder: no warning
        again = StateCache(10**7, tmp_path)
    assert again.stats()["entries"] == 0 and again.stats()["disk_entries"] == 1   # lazy
    n, state, logits = again.lookup("m", [3, 1, 4, 1, 5, 9])
    assert n == 5 and same_bits(state, stored)
    assert logits.dtype == np.float32 and logits.tobytes() == logits_for(2).tobytes()
    assert again.stats()["entries"] == 1             # now in memory too
    assert again.lookup("other", [3, 1, 4, 1, 5]) == (0, None, None)


def test_evicted_entries_stay_on_disk_within_the_disk_budget(tmp_path):
    size = entry_bytes(2, state_for(0), None)
    cache = StateCache(size, tmp_path, disk_budget=10**9,      # one entry in memory
                       background_writes=False)                # store() writes the file itself
    cache.store("m", [1, 1], state_for(1))
    file_bytes = cache.stats()["disk_bytes"]
    cache.store("m", [2, 2], state_for(2))
    assert cache.stats()["entries"] == 1 and cache.stats()["evictions"] == 1
    n, state, _ = cache.lookup("m", [1, 1])                    # read back from its file
    assert (n, tag_of(state)) == (2, 1.0)

    with StateCache(size, tmp_path / "small", disk_budget=2 * file_bytes) as small:  # two files
        for t in (1, 2, 3):
            small.store("m", [t, t], state_for(t))
            small.flush()                                      # files in this order
    assert small.stats()["disk_entries"] == 2
    assert len(list((tmp_path / "small").glob("*.npz"))) == 2
    fresh = StateCache(size, tmp_path / "small", disk_budget=2 * file_bytes)
    assert fresh.lookup("m", [1, 1]) == (0, None, None)        # the oldest file was removed
    assert [fresh.lookup("m", [t, t])[0] for t in (2, 3)] == [2, 2]


def test_clear_forgets_memory_and_files(tmp_path):
    cache = StateCache(10**7, tmp_path)
    cache.store("m", [1, 2], state_for(1))
    cache.flush()
    (tmp_path / "mine.txt").write_text("not the cache's")
    cache.clear()
    assert cache.lookup("m", [1, 2]) == (0, None, None)
    assert not list(tmp_path.glob("*.npz")) and (tmp_path / "mine.txt").exists()
    assert cache.stats()["hits"] == 0 and cache.stats()["misses"] == 1


def test_corrupt_and_foreign_files_are_skipped_with_a_warning(tmp_path):
    cache = StateCache(10**7, tmp_path)
    cache.store("m", [7, 8], state_for(8))
    cache.close()
    good = next(tmp_path.glob("*.npz"))
    data = good.read_bytes()
    (tmp_path / ("ab" * 16 + ".npz")).write_bytes(data[: len(data) // 2])     # truncated
    (tmp_path / ("cd" * 16 + ".npz")).write_bytes(b"PK\x03\x04 garbage")
    np.savez(tmp_path / ("ef" * 16 + ".npz"), x=np.zeros(3))                  # foreign npz
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.warns(StateCacheWarning) as record:
        again = StateCache(10**7, tmp_path)
    messages = " | ".join(str(w.message) for w in record)
    for name in ("ab" * 16, "cd" * 16, "ef" * 16, "notes.txt"):
        assert name in messages
    assert again.lookup("m", [7, 8, 9])[0] == 2               # the good entry still serves
    assert (tmp_path / "notes.txt").exists()                  # never removed

    # a file spoiled after the scan: a warning and a miss, not a crash
    for path in tmp_path.iterdir():
        if path != good:
            path.unlink()
    third = StateCache(10**7, tmp_path)
    good.write_bytes(data[:100])
    with pytest.warns(StateCacheWarning, match=good.name):
        assert third.lookup("m", [7, 8]) == (0, None, None)
    assert third.lookup("m", [7, 8]) == (0, None, None)       # forgotten, no second warning


def test_a_file_with_nan_or_another_name_is_refused(tmp_path):
    cache = StateCache(10**7, tmp_path)
    cache.store("m", [1, 2], state_for(1))
    cache.flush()
    path = next(tmp_path.glob("*.npz"))
    path.rename(tmp_path / ("00" * 16 + ".npz"))              # its name no longer matches
    with pytest.warns(StateCacheWarning, match="does not match"):
        assert StateCache(10**7, tmp_path).lookup("m", [1, 2])[0] == 0


# --- threads --------------------------------------------------------------------------------

def test_threads_store_and_look_up_concurrently(tmp_path):
    size = entry_bytes(40, state_for(0), logits_for(0))
    cache = StateCache(12 * size, tmp_path)                   # small: evictions happen meanwhile
    errors = []

    def worker(w):
        rng = np.random.default_rng(w)
        try:
            conversation = [w] + [int(x) for x in rng.integers(0, 100, 39)]   # [w]: its own
            for n in range(1, 41):
                tag = 1000 * w + n
                cache.store("m", conversation[:n], state_for(tag), logits_for(tag))
                m, state, logits = cache.lookup("m", conversation + [5])
                if m and (tag_of(state) != 1000 * w + m or logits[0] != 1000 * w + m):
                    errors.append(f"worker {w}: prefix {m} returned the state of {tag_of(state)}")
                if m:
                    state.wkv[...] = -1                       # must not reach the cache
        except Exception as e:                                # noqa: BLE001 - reported below
            errors.append(repr(e))

    threads = [threading.Thread(target=worker, args=(w,)) for w in range(6)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert errors == []
    s = cache.stats()
    assert s["bytes"] <= s["budget"] and s["entries"] <= 12
    assert s["hits"] + s["misses"] == 6 * 40
    cache.close()
    again = StateCache(12 * size, tmp_path)                   # every file written is readable
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        for w in range(6):
            conversation = [w] + [int(x) for x in
                                  np.random.default_rng(w).integers(0, 100, 39)]
            m, state, _ = again.lookup("m", conversation)
            assert m == 0 or tag_of(state) == 1000 * w + m


def test_clear_drops_writes_still_queued(tmp_path):
    cache = StateCache(10**7, tmp_path)
    for t in range(1, 6):
        cache.store("m", [t, t], state_for(t))
    cache.clear()                                   # some writes may still be waiting
    cache.flush()
    assert not list(tmp_path.glob("*.npz")) and cache.stats()["disk_entries"] == 0


def test_logits_stored_later_reach_the_file(tmp_path):
    with StateCache(10**7, tmp_path) as cache:
        cache.store("m", np.array([3, 4], dtype=np.int64), state_for(4))      # no logits yet
        cache.flush()
        cache.store("m", [3, 4], state_for(4), logits_for(4))
    n, state, logits = StateCache(10**7, tmp_path).lookup("m", np.array([3, 4, 5]))
    assert n == 2 and np.array_equal(logits, logits_for(4))
    assert len(list(tmp_path.glob("*.npz"))) == 1


def test_an_entry_from_disk_larger_than_a_new_budget_is_served_not_kept(tmp_path):
    with StateCache(10**7, tmp_path) as cache:
        cache.store("m", [1, 2], state_for(1), logits_for(1))
    small = StateCache(100, tmp_path, disk_budget=10**7)
    n, state, _ = small.lookup("m", [1, 2])
    assert (n, tag_of(state)) == (2, 1.0)
    assert small.stats()["entries"] == 0 and small.stats()["bytes"] == 0
