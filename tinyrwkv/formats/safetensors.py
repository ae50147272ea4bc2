"""The .safetensors container, read (its plan) and written (streamed, one tensor at a time).

    .safetensors  8-byte little-endian header length n, n bytes of JSON
                  {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
                  then the data section (offsets are relative to its start).

The header depends only on names, shapes and dtypes, so a writer can put it down first and then
stream the tensors in (write_safetensors): a conversion never holds more than one tensor.
"""

from __future__ import annotations

import json
import math
import reprlib
import struct

import numpy as np

from ..errors import CheckpointError, corrupt
from ..files import atomic_open
from .container import Plan, Region, TensorPlan, is_count
from .numerics import BF16, BOOL, FP16, FP32, FP64, I8, I16, I32, I64, U8, to_bf16_bits

# safetensors dtype code -> element type.
SAFETENSORS_DTYPES = {
    "BF16": BF16, "F16": FP16, "F32": FP32, "F64": FP64, "I64": I64, "I32": I32,
    "I16": I16, "I8": I8, "U8": U8, "BOOL": BOOL,
}

# NumPy dtype -> safetensors code, for arrays written as they are.
_CODES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
          np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16",
          np.dtype("i1"): "I8", np.dtype("u1"): "U8", np.dtype("?"): "BOOL"}


# The largest JSON header read: the reference `safetensors` library's own limit (MAX_HEADER_SIZE,
# 100,000,000 bytes), so every file it writes or accepts is read here, and a header cannot make
# us hold more than that.
MAX_HEADER_BYTES = 100_000_000

# Dimensions of one tensor: torch's own limit (a tensor has at most 64 dimensions), far above
# what any model holds; it keeps a crafted shape from costing more than a glance.
MAX_DIMS = 64


def plan_safetensors(path, size):
    """The Plan of a .safetensors file, from its JSON header (no tensor data read).

    Checked before anything is planned, each failure a CheckpointError naming the file and the
    entry: the header's length (inside the file, at most MAX_HEADER_BYTES); valid UTF-8 JSON, an
    object, no key twice; each entry an object with a dtype code (a string tinyrwkv reads), a shape
    (a list of at most MAX_DIMS non-negative integers) and data_offsets (two integers, begin <=
    end, inside the data section, end - begin = numel x itemsize); no two tensors' bytes overlap.
    "__metadata__" (free-form strings: format, author, ...) is skipped.
    """
    n, raw = _read_header_bytes(path, size)
    header = _parse_header_json(path, raw)
    data_start, data_len = 8 + n, size - 8 - n
    tensors, regions = {}, {}
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        dtype, shape, begin, end = _check_entry(path, name, entry, data_len)
        regions[name] = Region(nbytes=end - begin, offset=data_start + begin)
        tensors[name] = TensorPlan(dtype, name, 0, shape, _c_strides(shape))
    _check_no_overlap(path, regions, data_start)
    return Plan(path, tensors, regions, kind="safetensors")


def _read_header_bytes(path, size):
    """(n, the n header bytes) after the 8-byte length field, checked against the file's size
    and MAX_HEADER_BYTES before anything is read."""
    try:
        with open(path, "rb") as f:
            field = f.read(8)
            if len(field) < 8:
                raise corrupt(path, f"it has {len(field)} bytes, fewer than the 8 of the "
                                    "safetensors header length")
            (n,) = struct.unpack("<Q", field)
            if n > size - 8:
                raise corrupt(path, f"its safetensors header says {n} bytes but the file has only "
                                    f"{size - 8} after the length field")
            if n > MAX_HEADER_BYTES:
                raise corrupt(path, f"its safetensors header says {n:,} bytes, over the "
                                    f"{MAX_HEADER_BYTES:,}-byte limit of the safetensors format "
                                    "(no real file has one that large)")
            raw = f.read(n)
    except OSError as e:
        raise corrupt(path, f"the safetensors header cannot be read ({e})") from e
    if len(raw) != n:
        raise corrupt(path, f"it ends inside its {n}-byte safetensors header")
    return n, raw


def _parse_header_json(path, raw):
    """The header as a dict; a key given twice is an error (JSON would keep the last silently,
    and two readers could then disagree on which tensor is meant)."""
    def unique(pairs):
        seen = {}
        for key, value in pairs:
            if key in seen:
                raise _Duplicate(key)
            seen[key] = value
        return seen
    try:
        header = json.loads(raw.decode("utf-8"), object_pairs_hook=unique)
    except _Duplicate as e:
        raise corrupt(path, f"its safetensors header has the key {e.args[0]!r} twice") from None
    except (UnicodeDecodeError, ValueError, RecursionError) as e:   # ValueError: JSON syntax,
        raise corrupt(path, f"its safetensors header is not valid JSON "  # and huge integers
                            f"({type(e).__name__}: {e})") from None
    if not isinstance(header, dict):
        raise corrupt(path, "its safetensors header is not a JSON object")
    return header


class _Duplicate(Exception):
    """A key given twice in the JSON header (internal: becomes a CheckpointError)."""


def _check_entry(path, name, entry, data_len):
    """(dtype, shape, begin, end) of one header entry, every field checked (plan_safetensors)."""
    if not isinstance(entry, dict) or not {"dtype", "shape", "data_offsets"} <= entry.keys():
        raise corrupt(path, f"header entry {name!r} lacks dtype/shape/data_offsets (it must be "
                            "an object with all three)")
    code, shape, offsets = entry["dtype"], entry["shape"], entry["data_offsets"]
    if not isinstance(code, str):
        raise corrupt(path, f"header entry {name!r} has dtype {_short(code)}, not a dtype code "
                            "such as \"F32\"")
    dtype = SAFETENSORS_DTYPES.get(code)
    if dtype is None:
        raise CheckpointError(f"{path}: tensor {name!r} has dtype {_short(code)}, which tinyrwkv "
                              f"does not read (supported: {', '.join(SAFETENSORS_DTYPES)}); "
                              "re-export it as BF16, F16 or F32")
    if not (isinstance(shape, list) and len(shape) <= MAX_DIMS and all(map(is_count, shape))):
        raise corrupt(path, f"header entry {name!r} has a malformed shape {_short(shape)} (it "
                            f"must be a list of at most {MAX_DIMS} non-negative integers)")
    if not (isinstance(offsets, list) and len(offsets) == 2 and all(map(is_count, offsets))):
        raise corrupt(path, f"header entry {name!r} has malformed data_offsets {_short(offsets)} "
                            "(they must be a list of two non-negative integers [begin, end])")
    begin, end = offsets
    if not begin <= end <= data_len:
        raise corrupt(path, f"tensor {name!r} has data_offsets [{begin}, {end}] outside the "
                            f"{data_len}-byte data section (the file may be cut short)")
    numel = math.prod(shape)
    if end - begin != numel * dtype.itemsize:
        raise corrupt(path, f"tensor {name!r} has {end - begin} bytes of data, but shape "
                            f"{shape} x {code} needs {numel * dtype.itemsize}")
    if math.prod(d or 1 for d in shape) * dtype.itemsize >= 2**63:
        raise corrupt(path, f"tensor {name!r} has shape {_short(shape)}, too large for any "
                            "array (even with no elements)")        # NumPy refuses such shapes
    return dtype, tuple(shape), begin, end


def _c_strides(shape):
    """C-contiguous strides in elements, in one pass."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= n
    return tuple(reversed(strides))


def _check_no_overlap(path, regions, data_start):
    """No byte of the data section belongs to two tensors: a file that says otherwise was not
    written by a safetensors writer (its layout is one tensor after another)."""
    spans = sorted((r.offset, r.offset + r.nbytes, name) for name, r in regions.items()
                   if r.nbytes)
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise corrupt(path, f"tensors {first!r} and {second!r} overlap in the data section "
                                f"(bytes {begin - data_start} to {end - data_start})")


def _short(value):
    """A header value for a message, bounded however large or deep it is (reprlib)."""
    return _REPR.repr(value)


_REPR = reprlib.Repr()
_REPR.maxlevel, _REPR.maxlist, _REPR.maxdict, _REPR.maxstring, _REPR.maxother = 2, 6, 4, 40, 40


# ---- writing ----

def write_safetensors(path, entries, fetch, metadata=None):
    """Write a .safetensors file one tensor at a time.

    Args:
        entries: {name: (code, shape)}, code a safetensors dtype ("F32", "BF16", ...).
        fetch: fetch(name) -> the array, of that shape, in the code's element type (BF16: uint16
            bit patterns); called once per tensor, in the order the data is laid out.
        metadata: optional {str: str}, stored as "__metadata__".
    Layout: header JSON with sorted keys, padded with spaces so the data starts 8-byte aligned;
    data ordered by itemsize (largest first), then name, so every tensor stays aligned.
    Atomic (tinyrwkv/files.py): an error or a kill leaves the old file, or none.
    """
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    for name, (code, _) in entries.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        if code not in SAFETENSORS_DTYPES:
            raise ValueError(f"{name!r}: {code!r} is not a safetensors dtype")
    itemsize = lambda name: SAFETENSORS_DTYPES[entries[name][0]].itemsize
    order = sorted(entries, key=lambda k: (-itemsize(k), k))
    header, offset = {}, 0
    for name in order:
        code, shape = entries[name]
        nbytes = math.prod(shape) * itemsize(name)
        header[name] = {"dtype": code, "shape": list(shape), "data_offsets": [offset, offset + nbytes]}
        offset += nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    with atomic_open(path) as f:                   # the file appears whole, or not at all
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            code, shape = entries[name]
            stored = np.dtype(SAFETENSORS_DTYPES[code].numpy)
            array = np.asarray(fetch(name))
            if tuple(array.shape) != tuple(shape) or array.dtype.newbyteorder("<") != stored:
                raise ValueError(f"{name!r}: got {array.dtype} {array.shape}, the header says "
                                 f"{code} {tuple(shape)}")
            array = np.asarray(array, dtype=stored, order="C")      # little-endian, contiguous
            f.write(array.reshape(-1).view(np.uint8).data)           # no extra copy
            del array              # before the next fetch: hold one tensor at a time, not two


def save_safetensors(path, tensors, metadata=None, bf16_keys=()):
    """Write {name: array} as a .safetensors file that `safetensors` and `read_checkpoint` read back.

    Arrays are stored in their own dtype (float32/16/64, int64/32/16/8, uint8, bool); the keys in
    `bf16_keys` (floating arrays) are stored as BF16, rounded to nearest even (`to_bf16_bits`).
    Pass `bf16_keys=tensors.keys()` to store everything as bf16, like a released .pth.
    `metadata`: optional {str: str}, stored as "__metadata__". Layout: write_safetensors.
    """
    bf16_keys = set(bf16_keys)
    if bf16_keys - set(tensors):
        raise ValueError(f"bf16_keys not in tensors: {sorted(bf16_keys - set(tensors))[:5]}")
    entries = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        arr = np.asarray(value)
        if name in bf16_keys:
            if arr.dtype.kind != "f":
                raise ValueError(f"{name!r} is {arr.dtype}; only floating arrays can be stored as bf16")
            entries[name] = ("BF16", arr.shape)
            continue
        little = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        code = _CODES.get(little)
        if code is None:
            raise ValueError(f"{name!r} has dtype {arr.dtype}, which save_safetensors does not write")
        entries[name] = (code, arr.shape)

    def fetch(name):
        arr = np.asarray(tensors[name])
        return to_bf16_bits(arr) if name in bf16_keys else arr
    write_safetensors(path, entries, fetch, metadata)
