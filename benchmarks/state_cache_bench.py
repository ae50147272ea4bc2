"""Time StateCache.lookup for a long conversation, report bytes per entry (docs/serving.md §2.4).

    python benchmarks/state_cache_bench.py [--tokens 4000] [--entries 500]

Entries are prefixes of one conversation at `entries` different lengths (the worst case for the
probe: every stored length <= T is a candidate), with the shipped model's state shape. Timed:
a hit on the longest entry, a hit on a short one, and a miss (the first token differs)."""

import argparse
import tempfile
import time

import numpy as np

from tinyrwkv.model import Config, State
from tinyrwkv.schema import OFFICIAL_SIZES
from tinyrwkv.state_cache import StateCache, entry_bytes, prefix_hashes


def config_of(L, C, V, N=64):
    return Config(n_layer=L, n_embd=C, n_head=C // N, head_size=N, vocab_size=V, dim_ffn=4 * C,
                  d_decay=64, d_aaa=64, d_mv=32, d_gate=128, variant="x070")


def best_of(fn, repeat=200):
    times = []
    for _ in range(repeat):
        t = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t)
    return 1e3 * float(np.median(times))


def main():
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--tokens", type=int, default=4000)
    p.add_argument("--entries", type=int, default=500)
    args = p.parse_args()
    T, E = args.tokens, args.entries
    shipped = config_of(6, 256, 4096)
    size = OFFICIAL_SIZES["0.1B"]
    base = config_of(size.n_layer, size.n_embd, size.vocab_size)
    for name, cfg in (("shipped L6 C256 V4096", shipped), ("0.1B L12 C768 V65536", base)):
        s = State.zeros(cfg)
        for a in (s.att_shift, s.wkv, s.ffn_shift):
            a[...] = 1.0                      # touched pages: a copy measures real memory traffic
        logits = np.zeros(cfg.vocab_size, np.float32)
        print(f"{name}: state {s.nbytes:,} B + logits {logits.nbytes:,} B = "
              f"{s.nbytes + logits.nbytes:,} B; entry at 4000 tokens "
              f"{entry_bytes(4000, s, logits):,} B"
              f"; state copy {best_of(lambda: s.copy(), 50):.3f} ms")

    rng = np.random.default_rng(0)
    ids = rng.integers(0, 4096, T).astype(np.int32)
    state = State.zeros(shipped)
    logits = np.zeros(shipped.vocab_size, np.float32)
    cache = StateCache(E * entry_bytes(T, state, logits) + 1)
    lengths = np.linspace(8, T - 8, E).astype(int)
    for n in lengths:
        cache.store("m", ids[:n], state, logits)
    assert cache.stats()["entries"] == E
    print(f"{E} entries, conversation of {T} tokens (shipped-model states):")
    print(f"  prefix_hashes of {T} ids: {best_of(lambda: prefix_hashes(ids)):.3f} ms")
    print(f"  lookup, hit on the longest ({lengths[-1]}): "
          f"{best_of(lambda: cache.lookup('m', ids)):.3f} ms (state and logits copy included)")
    short = ids[: lengths[0] + 4]
    print(f"  lookup of {len(short)} ids, hit on the shortest ({lengths[0]}): "
          f"{best_of(lambda: cache.lookup('m', short)):.3f} ms")
    miss = ids.copy()
    miss[0] += 1
    print(f"  lookup, miss (first token differs, {E} lengths probed): "
          f"{best_of(lambda: cache.lookup('m', miss)):.3f} ms")

    # persistence: 20 entries of the 0.1B shape written to, scanned from and read back from a folder
    s = State.zeros(base)
    s.wkv[...] = 1.0
    logits = np.ones(base.vocab_size, np.float32)
    with tempfile.TemporaryDirectory() as folder:
        disk = StateCache(10**9, folder, background_writes=False)   # time the writes
        t = time.perf_counter()
        for k in range(20):
            disk.store("m", ids[: 100 + k], s, logits)
        store_ms = 1e3 * (time.perf_counter() - t) / 20
        t = time.perf_counter()
        again = StateCache(10**9, folder)
        scan_ms = 1e3 * (time.perf_counter() - t) / 20
        t = time.perf_counter()
        for k in range(20):
            assert again.lookup("m", ids[: 100 + k])[0] == 100 + k
        read_ms = 1e3 * (time.perf_counter() - t) / 20
    print(f"folder, 0.1B entries: write {store_ms:.1f} ms each (atomic, fsync; on the writer "
          f"thread by default), "
          f"scan at start {scan_ms:.2f} ms a file, first lookup (read from disk) {read_ms:.1f} ms")


if __name__ == "__main__":
    main()
