"""A cache of RNN states by token prefix, for the server (docs/serving.md §2).

    cache = StateCache(512 * 2**20, folder="state-cache")   # 512 MiB in memory (folder optional)
    n, state, logits = cache.lookup("story-float32", ids)    # the longest cached prefix ids[:n]
    ...read ids[n:] from `state` (a copy: yours to change)...
    cache.store("story-float32", ids, state, logits)         # keep the state after ids (copied)
    cache.stats()      # {hits, misses, entries, bytes, budget, evictions, tokens_saved, disk_...}

RWKV reads a prompt into a fixed-size state: the state after a conversation's first k tokens is
all a model needs to continue it, whatever k is. The cache keeps such states, keyed by the model
(`model_key`: a string naming the model *and* its storage, e.g. "rwkv7-0.1b/float32", so the
states of different models or storage types never mix) and by the exact token ids read.

Lookup. Every entry's key is (model_key, n, hash of ids[:n]). `lookup` computes the hash of every
prefix of `ids` in one vectorised pass (a polynomial hash mod 2**64, prefix_hashes), then probes
the lengths the cache holds for that model from the longest down; the first key found whose ids
equal ids[:n] exactly (a hash collision is never a hit) is the answer. Cost: O(T) for the hashes
of a T-token sequence, one dict probe per distinct cached length <= T, O(n) for the exact check of
the hit (and of any colliding key), then a copy of the state. Measured (docs/serving.md §2.4):
0.06-0.16 ms for 4000 tokens and 500 entries, the copy of a shipped-model state included.

Memory. Bounded by `budget_bytes`: an entry costs state.nbytes + logits.nbytes + the ids (4 bytes
a token) + ENTRY_OVERHEAD; the least recently used entries (a lookup hit or a store makes an entry
recent) are evicted first; an entry larger than the whole budget is not stored at all.

Persistence (`folder`). Each stored entry is written by a background thread (store() returns at
once; flush() waits), atomically (tinyrwkv/files.py), as `<32 hex digits>.npz`: an uncompressed
npz with the tag "tinyrwkv-state-cache-v1" (the layout is in ENTRY_MEMBERS below and
docs/serving.md §2.3). A new StateCache on the folder scans it at start: it reads each file's
tag, model key and ids and checks the headers of its arrays (never the state data, never
pickle), and loads a state only when a lookup needs it. Files of entries evicted from
memory stay on disk, up to `disk_budget` bytes (default 4x budget_bytes); beyond it the least
recently used files are removed. Files that are corrupt, foreign or of another format are skipped
with a StateCacheWarning naming them, and never removed. One process per folder: a second process
sees another's files only when it starts.

Thread safety: one lock guards the index; hashing, copying states and file I/O happen outside it.
Any thread may call any method.
"""

from __future__ import annotations

import atexit
import hashlib
import os
import queue
import re
import threading
import warnings
import weakref
from collections import OrderedDict
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .files import atomic_open
from .formats.npz import NpzReader
from .model import State

__all__ = ["StateCache", "StateCacheWarning", "prefix_hashes", "entry_bytes", "CACHE_FORMAT"]

CACHE_FORMAT = "tinyrwkv-state-cache-v1"
STATE_ARRAYS = ("att_shift", "wkv", "ffn_shift")
ENTRY_MEMBERS = ("format", "model_key", "ids", *STATE_ARRAYS)     # + "logits" when known
ENTRY_OVERHEAD = 512          # bytes charged per entry for its Python objects and index slots
DISK_FACTOR = 4               # default disk budget: this many times the memory budget
MAX_ID = 2**31 - 1            # ids are kept as int32
WRITE_QUEUE = 8               # entries waiting for the background writer; store() waits beyond
_NAME = re.compile(r"^[0-9a-f]{32}\.npz$")
_BASE = np.uint64(0x9E3779B97F4A7C15)       # odd: a unit mod 2**64 (the golden-ratio constant)


class StateCacheWarning(UserWarning):
    """A file in a state cache folder that is skipped (corrupt, foreign) or cannot be written."""


def prefix_hashes(ids):
    """hashes[n] = hash of ids[:n] for n = 0..len(ids) (uint64, one vectorised pass):
    sum over i < n of (ids[i] + 1) * BASE**(i + 1), mod 2**64. The hash of a prefix does not
    depend on what follows it, so one pass serves every length. Not collision-resistant against a
    chosen input (no 2**64 polynomial hash is): the cache compares ids exactly, so a collision
    costs a miss, never a wrong state."""
    x = np.asarray(ids).astype(np.uint64) + np.uint64(1)
    powers = np.cumprod(np.full(len(x), _BASE, dtype=np.uint64))     # wraps mod 2**64
    out = np.zeros(len(x) + 1, dtype=np.uint64)
    np.cumsum(x * powers, out=out[1:])
    return out


def entry_bytes(n_tokens, state, logits=None):
    """Memory one cached entry is charged: the state, the logits, the ids (int32) and
    ENTRY_OVERHEAD."""
    lb = 0 if logits is None else int(np.asarray(logits).nbytes)
    return int(state.nbytes) + lb + 4 * int(n_tokens) + ENTRY_OVERHEAD


class _Entry:
    """One cached prefix. `state`/`logits` are None while it is on disk only; `path` is None
    while it is in memory only. Its arrays are never changed in place (a new store replaces
    them), so lookup can copy them outside the lock."""
    __slots__ = ("key", "ids", "state", "logits", "nbytes", "path", "file_bytes", "file_logits",
                 "writing")

    def __init__(self, key, ids, state, logits, nbytes, path=None, file_bytes=0,
                 file_logits=False):
        self.key, self.ids, self.state, self.logits = key, ids, state, logits
        self.nbytes, self.path, self.file_bytes = nbytes, path, file_bytes
        self.file_logits = file_logits          # whether its file holds logits
        self.writing = False                    # a write of its file is queued or under way


class StateCache:
    """States after token prefixes, by model; least recently used out first (module docstring).

    budget_bytes: memory the entries may take (0 keeps nothing).
    folder: where entries are also written (created when missing); None: memory only.
    disk_budget: bytes of entry files the folder may hold (default DISK_FACTOR x budget_bytes).
    background_writes: with a folder, write entry files on a background thread (default), so
        store() returns without waiting for the disk (a 0.1B entry takes 20-40 ms with its fsync);
        at most WRITE_QUEUE entries wait, beyond that store() waits. flush() waits for them all;
        close() also stops the thread. False: store() writes the file itself.
    hash_fn: prefix_hashes by default; any function of an int32 array ids returning len(ids)+1
        integers, the n-th depending on ids[:n] only (tests inject a colliding one).
    """

    def __init__(self, budget_bytes, folder=None, *, disk_budget=None, background_writes=True,
                 hash_fn=prefix_hashes):
        if isinstance(budget_bytes, bool) or not isinstance(budget_bytes, (int, np.integer)) \
                or budget_bytes < 0:
            raise ValueError(f"the state cache budget must be a whole number of bytes >= 0, got "
                             f"{budget_bytes!r}")
        if disk_budget is not None and (not isinstance(disk_budget, (int, np.integer))
                                        or disk_budget < 0):
            raise ValueError(f"the state cache disk budget must be a whole number of bytes >= 0,"
                             f" got {disk_budget!r}")
        self.budget = int(budget_bytes)
        self.disk_budget = DISK_FACTOR * self.budget if disk_budget is None else int(disk_budget)
        self._hash = hash_fn
        self._lock = threading.RLock()
        self._entries = {}                 # key -> _Entry (in memory, on disk, or both)
        self._mem = OrderedDict()          # keys with a state in memory, least recent first
        self._disk = OrderedDict()         # keys with a file, least recent first
        self._lengths = {}                 # model_key -> {n: number of keys of that length}
        self._sorted = {}                  # model_key -> sorted list of lengths (or None: stale)
        self._bytes = self._disk_bytes = 0
        self._generation = 0               # bumped by clear(): writes in flight are dropped
        self._background = bool(background_writes)
        self._queue = None                 # the background writer's jobs (started on first use)
        self._writer = None
        self._reset_counters()
        self.folder = None
        if folder is not None:
            self.folder = Path(folder)
            if self.folder.exists() and not self.folder.is_dir():
                raise ValueError(f"state cache folder {self.folder} is a file: give a folder "
                                 "(it is created when missing)")
            self.folder.mkdir(parents=True, exist_ok=True)
            self._scan()

    # -----------------------------------------------------------------------------------------
    # the interface
    # -----------------------------------------------------------------------------------------

    def lookup(self, model_key, ids):
        """(n, state, logits): the longest cached prefix ids[:n] of `ids` for `model_key`, a copy
        of the State after it and the logits after its last token (a copy, or None when the
        entry was stored without them); (0, None, None) when no prefix is cached."""
        _check_key(model_key)
        ids = _as_ids(ids)
        hashes = np.asarray(self._hash(ids)).tolist()
        while True:
            with self._lock:
                entry = self._find(model_key, ids, hashes)
                if entry is None:
                    self.misses += 1
                    return 0, None, None
                state, logits, path = entry.state, entry.logits, entry.path
                if state is not None:
                    self._touch(entry)
                    self.hits += 1
                    self.tokens_saved += len(entry.ids)
            if state is not None:
                n = len(entry.ids)
                return n, state.copy(), None if logits is None else logits.copy()
            loaded = self._read_entry(path, model_key, entry.ids)    # outside the lock
            with self._lock:
                if loaded is None:                                   # unreadable: drop it, retry
                    if self._entries.get(entry.key) is entry:
                        self._forget_file(entry, remove=False)
                    continue
                state, logits = loaded
                if self._entries.get(entry.key) is entry and entry.state is None:
                    entry.state, entry.logits = state, logits
                    entry.nbytes = entry_bytes(len(entry.ids), state, logits)
                    if entry.nbytes <= self.budget:
                        self._mem[entry.key] = None
                        self._bytes += entry.nbytes
                        self._evict_memory()
                    else:
                        entry.state = entry.logits = None
                if self._entries.get(entry.key) is entry:
                    self._touch(entry)
                self.hits += 1
                self.tokens_saved += len(entry.ids)
            return len(entry.ids), state.copy(), None if logits is None else logits.copy()

    def store(self, model_key, ids, state, logits=None):
        """Keep a copy of `state` (the State after reading `ids`) and of `logits` (after the last
        id; optional). True when stored; False when `ids` is empty or the entry is larger than
        the whole budget. Storing ids already cached refreshes that entry."""
        _check_key(model_key)
        ids = _as_ids(ids)
        if len(ids) == 0:
            return False
        host = state.to_host() if hasattr(state, "to_host") else state
        state = State(*(np.array(getattr(host, name), copy=True) for name in STATE_ARRAYS))
        if logits is not None:
            logits = np.array(logits.get() if hasattr(logits, "get") and
                              not isinstance(logits, np.ndarray) else logits, copy=True)
        nbytes = entry_bytes(len(ids), state, logits)
        if nbytes > self.budget:
            return False
        key = (model_key, len(ids), int(self._hash(ids)[-1]))
        ids = ids.copy()
        with self._lock:
            generation = self._generation
            old = self._entries.get(key)
            if old is not None and not np.array_equal(old.ids, ids):
                self._remove(old)                       # a hash collision: the newer one stays
                old = None
            if old is None:
                entry = _Entry(key, ids, state, logits, nbytes)
                self._entries[key] = entry
                self._index_add(key)
            else:
                entry = old
                if entry.state is not None:
                    self._bytes -= entry.nbytes
                    del self._mem[key]
                if logits is None and entry.logits is not None:
                    logits = entry.logits                   # the same ids: the same logits
                    nbytes = entry_bytes(len(ids), state, logits)
                entry.state, entry.logits, entry.nbytes = state, logits, nbytes
                if entry.path is not None and logits is not None and not entry.file_logits:
                    self._forget_file(entry, remove=False)      # rewritten below, with logits
            self._mem[key] = None
            self._bytes += nbytes
            self._touch(entry)
            self._evict_memory()
            write = self.folder is not None and entry.path is None and \
                not entry.writing and self.disk_budget >= nbytes
            entry.writing = entry.writing or write
        if write:
            job = (entry, model_key, ids, state, logits, generation)
            if self._background:
                self._start_writer().put(job)           # waits while WRITE_QUEUE jobs wait
            else:
                self._write(*job)
        return True

    def flush(self):
        """Wait until every entry stored so far is written to the folder (no-op without one)."""
        if self._queue is not None:
            self._queue.join()

    def close(self):
        """Write what is pending and stop the background writer (a later store starts it
        again). Also what `with StateCache(...) as cache:` does at the end."""
        with self._lock:
            q, writer, self._queue, self._writer = self._queue, self._writer, None, None
        if q is not None:
            q.put(None)
            writer.join()

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()

    def stats(self):
        """Counters and sizes: hits, misses (lookups that found no prefix), entries and bytes in
        memory, budget, evictions (from memory), tokens_saved (the ids hits did not have to
        read), and disk_entries, disk_bytes, disk_budget (0 without a folder)."""
        with self._lock:
            return dict(hits=self.hits, misses=self.misses, entries=len(self._mem),
                        bytes=self._bytes, budget=self.budget, evictions=self.evictions,
                        tokens_saved=self.tokens_saved, disk_entries=len(self._disk),
                        disk_bytes=self._disk_bytes,
                        disk_budget=self.disk_budget if self.folder is not None else 0)

    def clear(self):
        """Forget every entry and reset the counters; with a folder, also remove the entry files
        this cache indexed (never other files)."""
        with self._lock:
            for entry in list(self._entries.values()):
                self._remove(entry)
            self._generation += 1
            self._reset_counters()

    def __len__(self):
        with self._lock:
            return len(self._entries)

    def __repr__(self):
        s = self.stats()
        where = f", folder={str(self.folder)!r}" if self.folder is not None else ""
        return (f"StateCache({s['entries']} entries, {s['bytes']:,} of {s['budget']:,} bytes"
                f"{where})")

    # -----------------------------------------------------------------------------------------
    # the index (callers hold the lock)
    # -----------------------------------------------------------------------------------------

    def _reset_counters(self):
        self.hits = self.misses = self.evictions = self.tokens_saved = 0

    def _find(self, model_key, ids, hashes):
        """The entry of the longest cached prefix of `ids`, or None."""
        lengths = self._sorted_lengths(model_key)
        T = len(ids)
        for n in reversed(lengths):
            if n > T:
                continue
            entry = self._entries.get((model_key, n, hashes[n]))
            if entry is not None and np.array_equal(entry.ids, ids[:n]):
                return entry
        return None

    def _sorted_lengths(self, model_key):
        lengths = self._sorted.get(model_key)
        if lengths is None:
            lengths = sorted(self._lengths.get(model_key, ()))
            self._sorted[model_key] = lengths
        return lengths

    def _index_add(self, key):
        model_key, n = key[0], key[1]
        counts = self._lengths.setdefault(model_key, {})
        if n not in counts:
            self._sorted.pop(model_key, None)
        counts[n] = counts.get(n, 0) + 1

    def _index_remove(self, key):
        model_key, n = key[0], key[1]
        counts = self._lengths[model_key]
        counts[n] -= 1
        if counts[n] == 0:
            del counts[n]
            self._sorted.pop(model_key, None)
            if not counts:
                del self._lengths[model_key]

    def _touch(self, entry):
        """Make `entry` the most recently used, in memory and on disk (its file's mtime too, so
        the order survives a restart)."""
        if entry.key in self._mem:
            self._mem.move_to_end(entry.key)
        if entry.path is not None:
            self._disk.move_to_end(entry.key)
            try:
                os.utime(entry.path)
            except OSError:
                pass

    def _drop_if_nowhere(self, entry):
        if entry.state is None and entry.path is None and self._entries.get(entry.key) is entry:
            del self._entries[entry.key]
            self._index_remove(entry.key)

    def _evict_memory(self):
        while self._bytes > self.budget and self._mem:
            key, _ = self._mem.popitem(last=False)
            entry = self._entries[key]
            self._bytes -= entry.nbytes
            entry.state = entry.logits = None
            self.evictions += 1
            self._drop_if_nowhere(entry)

    def _evict_disk(self):
        while self._disk_bytes > self.disk_budget and self._disk:
            self._forget_file(self._entries[next(iter(self._disk))], remove=True)

    def _forget_file(self, entry, remove):
        """Take `entry`'s file off the index (and delete it when `remove`)."""
        self._disk.pop(entry.key, None)
        self._disk_bytes -= entry.file_bytes
        path, entry.path, entry.file_bytes = entry.path, None, 0
        if remove and path is not None:
            try:
                os.remove(path)
            except FileNotFoundError:
                pass
            except OSError as e:
                warnings.warn(f"state cache: cannot remove {path} ({e})", StateCacheWarning,
                              stacklevel=3)
        self._drop_if_nowhere(entry)

    def _remove(self, entry):
        """Forget `entry` entirely: memory, index, and its file."""
        if entry.key in self._mem:
            del self._mem[entry.key]
            self._bytes -= entry.nbytes
        entry.state = entry.logits = None
        if entry.path is not None:
            self._forget_file(entry, remove=True)
        self._drop_if_nowhere(entry)

    # -----------------------------------------------------------------------------------------
    # the folder
    # -----------------------------------------------------------------------------------------

    def _file_name(self, model_key, ids):
        digest = hashlib.blake2b(model_key.encode("utf-8") + b"\0" + ids.astype("<i4").tobytes(),
                                 digest_size=16)
        return self.folder / f"{digest.hexdigest()}.npz"

    def _start_writer(self):
        with self._lock:
            if self._queue is None:
                self._queue = queue.Queue(maxsize=WRITE_QUEUE)
                self._writer = threading.Thread(target=self._write_loop, args=(self._queue,),
                                                name="tinyrwkv-state-cache-writer", daemon=True)
                self._writer.start()
                atexit.register(_flush_at_exit, weakref.ref(self))
            return self._queue

    def _write_loop(self, jobs):
        while True:
            job = jobs.get()
            try:
                if job is None:
                    return
                self._write(*job)
            except Exception as e:               # noqa: BLE001 - the writer must keep going
                warnings.warn(f"state cache: writing an entry failed ({e!r})", StateCacheWarning)
            finally:
                jobs.task_done()

    def _write(self, entry, model_key, ids, state, logits, generation):
        """Write `entry`'s file (outside the lock), then index it."""
        try:
            self._write_file(entry, model_key, ids, state, logits, generation)
        finally:
            entry.writing = False

    def _write_file(self, entry, model_key, ids, state, logits, generation):
        path = self._file_name(model_key, ids)
        arrays = dict(format=np.array(CACHE_FORMAT), model_key=np.array(model_key),
                      ids=ids.astype("<i4"),
                      **{name: getattr(state, name) for name in STATE_ARRAYS})
        if logits is not None:
            arrays["logits"] = logits
        try:
            with atomic_open(path) as f:
                np.savez(f, **arrays)
            size = path.stat().st_size
        except (OSError, ValueError) as e:
            warnings.warn(f"state cache: cannot write {path} ({e}); the entry stays in memory "
                          "only", StateCacheWarning, stacklevel=3)
            return
        with self._lock:
            current = self._entries.get(entry.key)
            if generation != self._generation or size > self.disk_budget:
                keep = False                      # cleared meanwhile, or too large for the disk
            elif current is None:                 # evicted from memory meanwhile: disk only
                entry.state = entry.logits = None
                self._entries[entry.key] = entry
                self._index_add(entry.key)
                current, keep = entry, True
            else:
                keep = current.path is None and np.array_equal(current.ids, ids)
            if not keep:
                if current is None or current.path != path:
                    _remove_quietly(path)
                return
            current.path, current.file_bytes = path, size
            current.file_logits = logits is not None
            self._disk[current.key] = None
            self._disk_bytes += size
            self._evict_disk()

    def _scan(self):
        """Index the entry files already in the folder, oldest first (file headers, ids and
        model keys only; states are read when a lookup needs them)."""
        found = []
        for path in self.folder.iterdir():
            name = path.name
            if name.startswith(".") and (name.endswith(".tmp") or name.endswith(".old")):
                continue                          # a temporary left by a killed write
            if not path.is_file() or not _NAME.match(name):
                warnings.warn(f"state cache: skipping {path}: not a state cache entry (entries "
                              "are named <32 hex digits>.npz)", StateCacheWarning, stacklevel=3)
                continue
            try:
                model_key, ids, nbytes, has_logits = self._read_index(path)
                stat = path.stat()
            except (CheckpointError, OSError) as e:
                warnings.warn(f"state cache: skipping {path}: {e}", StateCacheWarning,
                              stacklevel=3)
                continue
            found.append((stat.st_mtime_ns, name, path, model_key, ids, nbytes, stat.st_size,
                          has_logits))
        for _, _, path, model_key, ids, nbytes, size, has_logits in sorted(found,
                                                                          key=lambda f: f[:2]):
            key = (model_key, len(ids), int(self._hash(ids)[-1]))
            if key in self._entries:              # a colliding hash: the newer file wins
                self._forget_file(self._entries[key], remove=False)
            entry = _Entry(key, ids, None, None, nbytes, path, size, has_logits)
            self._entries[key] = entry
            self._index_add(key)
            self._disk[key] = None
            self._disk_bytes += size
        self._evict_disk()

    def _read_index(self, path, arrays=False):
        """(model_key, ids, memory bytes, has logits) of an entry file, every member's header
        checked; with arrays=True also (state, logits), read in the same pass."""
        with NpzReader(path, "state cache entry", _FIX) as npz:
            names = set(npz.names)
            expected = set(ENTRY_MEMBERS)
            if "format" not in names or not _is_tag(npz):
                raise npz.error(f"not a state cache entry (no '{CACHE_FORMAT}' tag)")
            if not expected <= names or names - expected - {"logits"}:
                raise npz.error(f"an entry holds exactly {', '.join(ENTRY_MEMBERS)} and "
                                f"optionally logits, this file holds {', '.join(sorted(names))}")
            declared = npz.declared_bytes()
            if declared > path.stat().st_size:        # entries are written uncompressed
                raise npz.error(f"it declares {declared:,} bytes of arrays in a "
                                f"{path.stat().st_size:,}-byte file")
            h = npz.header("model_key")
            if h.shape != () or h.dtype.kind != "U" or h.dtype.itemsize > 4 * 1024:
                raise npz.error("model_key is not a short string")
            model_key = str(npz.read("model_key"))
            h = npz.header("ids")
            if len(h.shape) != 1 or h.shape[0] == 0 or h.dtype.kind not in "iu":
                raise npz.error(f"ids must be a non-empty 1-D integer array, not {h.dtype} "
                                f"{h.shape}")
            ids = npz.read("ids")
            if ids.min() < 0 or ids.max() > MAX_ID:
                raise npz.error(f"ids must be in [0, {MAX_ID}]")
            ids = ids.astype(np.int32)
            shapes = {name: npz.header(name).shape for name in STATE_ARRAYS}
            numbers = STATE_ARRAYS + (("logits",) if "logits" in names else ())
            for name in numbers:
                dtype = npz.header(name).dtype
                if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
                    raise npz.error(f"{name} is {dtype}, not real float16/32/64")
            att, wkv, ffn = (shapes[name] for name in STATE_ARRAYS)
            if not (len(att) == 2 and ffn == att and len(wkv) == 4 and wkv[0] == att[0]
                    and wkv[2] == wkv[3] and wkv[1] * wkv[2] == att[1]):
                raise npz.error(f"att_shift {att}, wkv {wkv} and ffn_shift {ffn} are not the "
                                "(L, C), (L, H, N, N), (L, C) of one model")
            if "logits" in names and len(npz.header("logits").shape) != 1:
                raise npz.error("logits must be 1-D")
            nbytes = sum(npz.header(name).nbytes for name in numbers)
            data = {name: npz.read(name) for name in numbers} if arrays else None
        if path.name != self._file_name(model_key, ids).name:
            raise CheckpointError(f"{path}: its name does not match its model key and ids (a "
                                  f"renamed or copied file); {_FIX}")
        index = (model_key, ids, nbytes + 4 * len(ids) + ENTRY_OVERHEAD, "logits" in names)
        if not arrays:
            return index
        for name, array in data.items():
            if not np.isfinite(array).all():
                raise CheckpointError(f"{path}: {name} holds NaN or infinite values; {_FIX}")
        return index, (State(*(data[name] for name in STATE_ARRAYS)), data.get("logits"))

    def _read_entry(self, path, model_key, ids):
        """(state, logits) of the entry file at `path`, checked again (the file may have changed
        since the scan); None, with a warning, when it cannot be used."""
        try:
            (key_in_file, ids_in_file, _, _), loaded = self._read_index(path, arrays=True)
            if key_in_file != model_key or not np.array_equal(ids_in_file, ids):
                raise CheckpointError(f"{path}: it now holds another entry; {_FIX}")
        except (CheckpointError, OSError) as e:
            warnings.warn(f"state cache: skipping {path}: {e}", StateCacheWarning, stacklevel=4)
            return None
        return loaded


_FIX = "delete it (the cache writes entries again as it serves)"


def _is_tag(npz):
    h = npz.header("format")
    return (h.shape == () and h.dtype.kind == "U" and h.dtype.itemsize <= 4 * 64
            and str(npz.read("format")) == CACHE_FORMAT)


def _check_key(model_key):
    if not isinstance(model_key, str) or not model_key:
        raise TypeError(f"a state cache model_key is a non-empty string naming the model and its "
                        f"storage (e.g. 'rwkv7-0.1b/float32'), not {model_key!r}")


def _as_ids(ids):
    """ids as a 1-D int32 array (token ids are in [0, 2**31))."""
    array = np.asarray(ids)
    if array.size == 0:
        return np.zeros(0, np.int32)
    if array.ndim != 1 or array.dtype.kind not in "iu":
        raise ValueError(f"token ids must be a 1-D sequence of integers, got {array.dtype} "
                         f"with shape {array.shape}")
    if array.min() < 0 or array.max() > MAX_ID:
        raise ValueError(f"token ids must be in [0, {MAX_ID}], got {array.min()}..{array.max()}")
    return array.astype(np.int32, copy=False)


def _flush_at_exit(cache_ref):
    """Write the entries still queued when the interpreter exits (the writer is a daemon)."""
    cache = cache_ref()
    if cache is not None:
        cache.flush()


def _remove_quietly(path):
    try:
        os.remove(path)
    except OSError:
        pass
