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


def plan_safetensors(path, size):
    """The Plan of a .safetensors file, from its JSON header (no tensor data read)."""
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise corrupt(path, f"its safetensors header says {n} bytes but the file has only "
                                    f"{size - 8} after the length field")
            raw = f.read(n)
    except CheckpointError:
        raise
    except (OSError, struct.error) as e:
        raise corrupt(path, f"the safetensors header cannot be read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise corrupt(path, f"its safetensors header is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise corrupt(path, "its safetensors header is not a JSON object")

    data_start, data_len = 8 + n, size - 8 - n
    tensors, regions = {}, {}
    for name, entry in header.items():
        if name == "__metadata__":       # free-form strings (format, author, ...), not tensors
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise corrupt(path, f"header entry {name!r} lacks dtype/shape/data_offsets") from e
        dtype = SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which tinyrwkv does "
                                  f"not read (supported: {', '.join(SAFETENSORS_DTYPES)}); "
                                  "re-export it as BF16, F16 or F32")
        if not (all(is_count(d) for d in shape) and is_count(begin) and is_count(end)):
            raise corrupt(path, f"header entry {name!r} has a malformed shape or data_offsets")
        if not begin <= end <= data_len:
            raise corrupt(path, f"tensor {name!r} has data_offsets [{begin}, {end}] outside the "
                                f"{data_len}-byte data section (the file may be cut short)")
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize:
            raise corrupt(path, f"tensor {name!r} has {end - begin} bytes of data, but shape "
                                f"{list(shape)} x {code} needs {numel * dtype.itemsize}")
        regions[name] = Region(nbytes=end - begin, offset=data_start + begin)
        # C-contiguous strides, in elements
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        tensors[name] = TensorPlan(dtype, name, 0, shape, stride)
    return Plan(path, tensors, regions, kind="safetensors")


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
