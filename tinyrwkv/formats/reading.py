"""Reading the tensors of a .pth or .safetensors container into arrays: `read_checkpoint` (every
tensor, keys as stored), `inspect_checkpoint` (shapes and dtypes only) and `Container` (the same
file as a TensorSource, for the single entry point in formats/__init__.py).

Memory (the loading goal: no second copy of the weights): a tensor returned in the dtype it is
stored in (float32/float16/float64/integer with dtype=None, bf16 with dtype="bfloat16") is a
read-only view into one `np.memmap` of the file: nothing is read until used, and the OS pages
weights in and out. A tensor that must be converted (bf16 -> float32, which NumPy cannot keep;
anything -> float64; float32 -> bf16; a transposed or big-endian tensor) is *not* read through the
map: its bytes come in with plain file reads, 4 MB at a time, into a reusable buffer (one per read
thread) and are converted into a preallocated output array. Through a map the source pages would
stay resident and count in the process's memory on top of the converted copy (a 3 GB bf16 file
loaded as float32 peaked at 1.5x the 6.1 GB of weights); with reads the peak is the weights plus
the buffers (1.01x). `Container.read` (one tensor, for conversions) always reads, never maps, so
a conversion's memory is one tensor at a time.
"""

from __future__ import annotations

import contextvars
import math
import os
import threading
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, SUPPORTED_FORMATS, corrupt
from .container import is_contiguous, read_head, sniff
from .numerics import convert_into, parse_target, result_dtype
from .progress import choose_progress
from .pth import plan_pth
from .safetensors import plan_safetensors
from .source import TensorInfo, TensorSource

# Converted tensors are read this many file bytes at a time, into one reusable buffer per read
# thread: big enough that the per-read overhead vanishes (a syscall per 4 MB), small enough that
# the buffers (4 x 4 MB) are noise next to the weights.
PIECE_BYTES = 4 * 2**20

# Threads that read and convert tensors (see materialize).
READ_THREADS = min(4, os.cpu_count() or 1)


def plan(path):
    """Open a .pth or .safetensors container and describe its tensors (no tensor data read)."""
    path = Path(path)
    head, size = read_head(path)
    kind = sniff(path, head, size)
    if kind == "gguf":
        raise CheckpointError(
            f"{path} is a GGUF file (llama.cpp's format), not a .pth/.safetensors container: "
            "read it with tinyrwkv.load or tinyrwkv.formats.read_model, which rename its "
            f"tensors to the official keys. {SUPPORTED_FORMATS}")
    return plan_pth(path, size) if kind == "pth" else plan_safetensors(path, size)


def inspect_checkpoint(path):
    """{key: (shape, stored dtype name)} without reading any tensor data (keys as stored).

    Dtype names: "bf16", "fp16", "fp32", "fp64", "i64", "i32", "i16", "i8", "u8", "bool".
    Only the zip directory, the pickle and a few header bytes are read (or the safetensors header).
    """
    return {name: (t.shape, t.dtype.name) for name, t in plan(path).tensors.items()}


def read_checkpoint(path, dtype=None, progress=None):
    """Read a `.pth` (torch zip) or `.safetensors` container into {key: array}, keys as stored.
    (For any model file, GGUF and Hugging Face folders too, with official keys:
    tinyrwkv.formats.read_model.)

    Args:
        path:     the file; its format is decided from its first bytes, not its name.
        dtype:    None: arrays as stored, except bf16 -> float32 (exact). float32/float16/float64
                  and integer storages are read-only views into a memory map of the file (no copy;
                  only a tensor saved non-contiguous, or a big-endian file, is copied).
                  "float32", "float64" (or a NumPy float dtype): every floating tensor converted to
                  it; a tensor already stored in that dtype stays a zero-copy view.
                  "bfloat16": every floating tensor as bf16 **bit patterns in a np.uint16 array**
                  (NumPy has no bf16 type; `bf16_to_float32` widens them exactly). bf16 storages
                  are zero-copy views of the file, not converted at all; float32/float16/float64
                  storages are rounded to nearest even, as torch's `.bfloat16()` (`to_bf16_bits`).
                  A uint16 array from this call always means bf16 bits (no stored integer type is
                  uint16).
                  Integer/bool tensors are never converted. Converted tensors are read with plain
                  file reads in 4 MB pieces, never through the map, so peak memory is the returned
                  arrays plus a few small buffers (module docstring, "Memory").
        progress: None (a ProgressBar on stderr for files > 256 MB when stderr is a terminal),
                  False (never), True (a ProgressBar whatever the size), or a callable
                  progress(done_bytes, total_bytes), called once before and after each tensor.
    Returns:
        dict key -> np.ndarray, in file order, shapes exactly as stored (no squeeze/transpose).
    Raises:
        CheckpointError: the file is missing, truncated, corrupt, not a checkpoint, or its pickle
            asks for code (formats/pth.py).
    """
    return Container(path).read_all(dtype, progress)


def materialize(plan, target, progress, total):
    """Every tensor of the plan, as read_checkpoint returns it: a zero-copy view of the file map
    where the stored bytes are already the answer, otherwise a new array filled by plain reads.

    Conversions run on READ_THREADS threads, one tensor per job: file reads and NumPy's copy and
    shift release the GIL, and so does the kernel's work of handing out the fresh output pages,
    the largest cost of a float32 load (most of its CPU time is system time). Measured on a busy
    2-core VM (1.5B shape, bf16 -> float32, 18 runs each): median 2.4 s with 2 threads, 3.3 s with
    one, best runs 1.0 s and 1.3 s; the spread there (1-14 s) is the VM's page faults, not this
    code. Results and progress reports keep file order."""
    file_map = None                    # np.memmap of the whole file, made at the first view
    reader = _Reader(plan, target)
    out = {}                           # name -> array, or a Future of one (a conversion job)
    if progress is not None:
        progress(0, total)
    pool = ThreadPoolExecutor(READ_THREADS, thread_name_prefix="tinyrwkv-read")
    try:
        for name, t in plan.tensors.items():
            region = plan.regions[t.storage]
            if math.prod(t.shape) and region.offset is not None and _is_view(plan, t, target):
                if file_map is None:
                    file_map = _map(plan.path)
                storage = file_map[region.offset: region.offset + region.nbytes].view(
                    _stored_dtype(plan, t))
                out[name] = _strided(storage, t)                             # a read-only view
            elif math.prod(t.shape) == 0 or region.offset is None:           # empty, or zipped
                out[name] = reader.read(name)
            else:
                job = contextvars.copy_context().run       # np.errstate etc. as the caller's
                out[name] = pool.submit(job, reader.read, name)
        done = 0
        for name, t in plan.tensors.items():
            if isinstance(out[name], Future):
                out[name] = out[name].result()
            done += t.nbytes
            if progress is not None:
                progress(done, total)
    except OSError as e:
        raise CheckpointError(f"cannot read {plan.path}: {e}") from e
    finally:
        pool.shutdown(cancel_futures=True)    # after an error: no new job starts
        reader.close()
    return out


def _stored_dtype(plan, t):
    """The file's element type and byte order of tensor t."""
    stored = np.dtype(t.dtype.numpy)
    return stored.newbyteorder(">") if plan.big_endian else stored


def _is_view(plan, t, target):
    """True when the stored bytes already are the answer (no conversion, contiguous)."""
    return _stored_dtype(plan, t) == result_dtype(t.dtype, target) and \
        is_contiguous(t.shape, t.stride)


def _map(path):
    """One read-only map of the whole file; every zero-copy tensor is a slice of it."""
    try:
        return np.memmap(path, np.uint8, "r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot memory-map {path}: {e}") from e


def _strided(storage, t):
    """The tensor as a view of its 1-D storage: element (i0, i1, ...) is
    storage[offset + i0*stride0 + i1*stride1 + ...]. Read-only; may be non-contiguous (a
    transposed tensor saved as such)."""
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[t.offset:], shape=t.shape, strides=tuple(s * itemsize for s in t.stride),
        writeable=False)


class _Reader:
    """Reads single tensors of a plan into new arrays with plain file reads (never a map), each
    thread with its own PIECE_BYTES buffer; compressed zip members are read once and kept."""

    def __init__(self, plan, target):
        self.plan, self.target = plan, target
        self.local = threading.local()
        self.compressed = {}           # storage key -> bytes
        self.lock = threading.Lock()
        self.zf = None

    def read(self, name):
        t = self.plan.tensors[name]
        region = self.plan.regions[t.storage]
        stored = _stored_dtype(self.plan, t)
        arr = np.empty(t.shape, result_dtype(t.dtype, self.target))
        if arr.size == 0:
            return arr
        if region.offset is None:                     # rare: a re-zipped, compressed .pth
            storage = np.frombuffer(self._member(t.storage, region), stored)      # (numel,)
            convert_into(_strided(storage, t), t.dtype, self.target, arr)
            return arr
        if not hasattr(self.local, "buffer"):
            self.local.buffer = np.empty(PIECE_BYTES, np.uint8)
        with open(self.plan.path, "rb", buffering=0) as f:    # unbuffered: readinto goes straight in
            _read_converted(f, self.plan.path, region.offset, stored, t, self.target, arr,
                            self.local.buffer)
        return arr

    def _member(self, key, region):
        with self.lock:
            if key not in self.compressed:
                self.zf = self.zf or zipfile.ZipFile(self.plan.path)
                try:
                    self.compressed[key] = self.zf.read(region.member)
                except Exception as e:
                    raise corrupt(self.plan.path, f"member {region.member!r} cannot be read "
                                                  f"({e})") from e
            return self.compressed[key]

    def close(self):
        if self.zf is not None:
            self.zf.close()


def _read_converted(f, path, region_offset, stored, t, target, arr, buffer):
    """Fill `arr` (the result, preallocated) with tensor `t`, converted, reading the file with
    plain reads: the page cache is copied into `buffer`, never mapped, so no source page counts in
    this process's memory once the tensor is done.

    A C-contiguous tensor (every checkpoint tensor in practice) is read PIECE_BYTES at a time, each
    piece converted straight into its slice of `arr`. A strided one (a transposed tensor saved as
    such) is read whole, span and all, into a temporary, then converted as a strided view."""
    itemsize = stored.itemsize
    start = region_offset + t.offset * itemsize                     # file offset of element 0
    if is_contiguous(t.shape, t.stride):
        flat = arr.reshape(-1)                                      # a view: arr is contiguous
        per_piece = len(buffer) // itemsize
        for i in range(0, flat.size, per_piece):
            piece = flat[i: i + per_piece]                          # (n,)
            raw = buffer[: piece.size * itemsize]
            read_exactly(f, path, start + i * itemsize, raw)
            convert_into(raw.view(stored), t.dtype, target, piece)
        return
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride))  # elements from first to last
    raw = buffer[: span * itemsize] if span * itemsize <= len(buffer) else \
        np.empty(span * itemsize, np.uint8)
    read_exactly(f, path, start, raw)
    view = np.lib.stride_tricks.as_strided(
        raw.view(stored), shape=t.shape, strides=tuple(s * itemsize for s in t.stride),
        writeable=False)
    convert_into(view, t.dtype, target, arr)


def read_exactly(f, path, offset, raw):
    """Read len(raw) bytes of the file from `offset` into the uint8 array `raw`."""
    f.seek(offset)
    view = memoryview(raw)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise corrupt(path, f"it ends at byte {offset + got}, inside a tensor")
        got += n


class Container(TensorSource):
    """A .pth or .safetensors file with the official key names, as a TensorSource."""

    def __init__(self, path, the_plan=None):
        self.path = Path(path)
        self.plan = the_plan or plan(path)
        self.format = self.plan.kind

    def tensors(self):
        return {k: TensorInfo(t.shape, t.dtype.name) for k, t in self.plan.tensors.items()}

    @property
    def description(self):
        """"pth, stored bf16"; for a training checkpoint, also where the model was found."""
        if self.plan.inner_key is None:
            return super().description
        return f"{super().description}; the state dict under {self.plan.inner_key!r}"

    def read(self, key, dtype=None):
        """One tensor as a new array (plain reads, no memory map: module docstring)."""
        reader = _Reader(self.plan, parse_target(dtype))
        try:
            return reader.read(key)
        except OSError as e:
            raise CheckpointError(f"cannot read {self.path}: {e}") from e
        finally:
            reader.close()

    def read_all(self, dtype=None, progress=None):
        """Every tensor, zero-copy where possible, conversions on threads (read_checkpoint)."""
        target = parse_target(dtype)
        total = sum(t.nbytes for t in self.plan.tensors.values())
        report, bar = choose_progress(progress, self.path.name, self.path.stat().st_size)
        try:
            return materialize(self.plan, target, report, total)
        finally:
            if bar is not None:
                bar.close()

