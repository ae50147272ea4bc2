"""The header of a GGUF file, read by our own bounded parser (no `gguf` package needed).

    header = read_gguf_header("model.gguf")
    header.metadata["rwkv7.block_count"]      # ints, floats, bools, strings, lists, arrays
    header.tensors["token_embd.weight"]       # GGUFTensor: shape, type, where its bytes are

Layout (GGUF v2 and v3, little-endian; llama.cpp's ggml/src/gguf.cpp and ggml's GGUF
specification, https://github.com/ggml-org/ggml/blob/master/docs/gguf.md):

    "GGUF"  u32 version  u64 tensor count  u64 metadata count
    metadata, each:  string key  u32 value type  value
        value types: 0 u8, 1 i8, 2 u16, 3 i16, 4 u32, 5 i32, 6 f32, 7 bool, 8 string,
                     9 array (u32 element type, u64 count, elements), 10 u64, 11 i64, 12 f64
        string: u64 byte length, UTF-8 bytes
    tensor infos, each:  string name  u32 n_dims  u64 ne[n_dims]  u32 ggml type  u64 offset
    padding to general.alignment (default 32), then the data section; each tensor's offset
    counts from its start.

Why our own: the `gguf` package's GGUFReader trusts the counts it reads, so a metadata array
declared 2^40 elements long makes it allocate gigabytes before it fails with an empty message.
Here every count and length is checked against the bytes left in the file *before* anything is
allocated or looped over, so what a file can make us hold is bounded by its size; and then:
ggml types tinyrwkv can decode only (others refused by name), at most 4 dimensions, each
tensor's bytes inside the file and aligned, no two tensors overlapping, names and keys unique.
Every failure is a CheckpointError naming the file, the problem and the fix.
"""

from __future__ import annotations

import math
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError, corrupt
from .container import regular_file

MAGIC = b"GGUF"
VERSIONS = (2, 3)                 # v1 (before August 2023) had 32-bit counts; llama.cpp dropped it
DEFAULT_ALIGNMENT = 32
MAX_DIMS = 4                      # ggml's GGML_MAX_DIMS
MAX_NESTING = 4                   # arrays of arrays: none in any known file; bounds the recursion

# ggml tensor types tinyrwkv decodes: id -> (name, elements per block, bytes per block). Sizes
# from ggml's type traits (ggml/src/ggml.c; the same as gguf-py's GGML_QUANT_SIZES, which
# tests/test_hostile_readers.py compares them with). f32/f16/bf16 are read with NumPy; the
# quantised ones are dequantised by the gguf package.
GGML_TYPES = {
    0: ("f32", 1, 4), 1: ("f16", 1, 2), 30: ("bf16", 1, 2),
    2: ("q4_0", 32, 18), 3: ("q4_1", 32, 20), 6: ("q5_0", 32, 22), 7: ("q5_1", 32, 24),
    8: ("q8_0", 32, 34),
    10: ("q2_k", 256, 84), 11: ("q3_k", 256, 110), 12: ("q4_k", 256, 144),
    13: ("q5_k", 256, 176), 14: ("q6_k", 256, 210),
}
UNQUANTISED = ("f32", "f16", "bf16")

# ggml types that exist but tinyrwkv does not decode (no dequantiser, or not weights at all):
# named in the refusal.
OTHER_GGML_TYPES = {
    4: "Q4_2 (removed from ggml)", 5: "Q4_3 (removed from ggml)", 9: "Q8_1", 15: "Q8_K",
    16: "IQ2_XXS", 17: "IQ2_XS", 18: "IQ3_XXS", 19: "IQ1_S", 20: "IQ4_NL", 21: "IQ3_S",
    22: "IQ2_S", 23: "IQ4_XS", 24: "I8", 25: "I16", 26: "I32", 27: "I64", 28: "F64", 29: "IQ1_M",
    34: "TQ1_0", 35: "TQ2_0", 39: "MXFP4", 40: "NVFP4", 41: "Q1_0",
}

# metadata value type -> (struct format, bytes) for the scalars; 8 (string) and 9 (array) apart
_SCALARS = {0: ("<B", 1), 1: ("<b", 1), 2: ("<H", 2), 3: ("<h", 2), 4: ("<I", 4), 5: ("<i", 4),
            6: ("<f", 4), 7: ("<B", 1), 10: ("<Q", 8), 11: ("<q", 8), 12: ("<d", 8)}
_NUMPY = {0: "<u1", 1: "<i1", 2: "<u2", 3: "<i2", 4: "<u4", 5: "<i4", 6: "<f4", 7: "<u1",
          10: "<u8", 11: "<i8", 12: "<f8"}
STRING, ARRAY, BOOL = 8, 9, 7
INTEGER_TYPES = (0, 1, 2, 3, 4, 5, 10, 11)
# The fewest bytes one value of a type takes: a string is at least its 8-byte length, an array
# its 4-byte element type and 8-byte count. Counts are checked with these before any loop.
_MIN_BYTES = {**{t: n for t, (_, n) in _SCALARS.items()}, STRING: 8, ARRAY: 12}
# The fewest bytes of one metadata entry (key length, value type, a 1-byte value) and of one
# tensor info (name length, n_dims, one ne, type, offset).
_MIN_KV, _MIN_TENSOR = 8 + 4 + 1, 8 + 4 + 8 + 4 + 8


@dataclass(frozen=True)
class GGUFTensor:
    """One tensor of a GGUF file, as its header describes it, checked.

    shape: NumPy order (the header's ne reversed: ggml lists the fastest dimension first).
    offset: the absolute file offset of its first byte; nbytes: its size in the file.
    """
    name: str
    shape: tuple
    type_id: int
    type_name: str                 # "f32", "q8_0", ... (GGML_TYPES)
    offset: int
    nbytes: int

    @property
    def row_bytes(self):
        """Bytes of one row (the last NumPy axis): whole blocks, checked by the parser."""
        _, block, block_bytes = GGML_TYPES[self.type_id]
        return self.shape[-1] // block * block_bytes


@dataclass
class GGUFHeader:
    """A GGUF file's metadata {key: value} and tensors {name: GGUFTensor}, in file order.

    Values: int, float, bool, str; an array of numbers is a 1-D NumPy array, an array of strings
    (or of arrays) a list. Accessors (integer, string, ...) check a value's type and raise a
    CheckpointError naming the key when it is not what the caller needs.
    """
    path: Path
    version: int
    metadata: dict
    types: dict                    # key -> the value type code (arrays: (9, element type))
    tensors: dict
    alignment: int
    data_start: int

    def integer(self, key):
        """The integer under `key` (None if absent): CheckpointError if it is not an integer."""
        value = self.metadata.get(key)
        if value is not None and self.types[key] not in INTEGER_TYPES:
            raise self.wrong_type(key, "an integer")
        return value

    def string(self, key):
        value = self.metadata.get(key)
        if value is not None and self.types[key] != STRING:
            raise self.wrong_type(key, "a string")
        return value

    def strings(self, key):
        """The array of strings under `key` (a list), or None if absent."""
        value = self.metadata.get(key)
        if value is not None and self.types[key] != (ARRAY, STRING):
            raise self.wrong_type(key, "an array of strings")
        return value

    def numbers(self, key):
        """The array of numbers under `key` (a 1-D NumPy array), or None if absent."""
        value = self.metadata.get(key)
        if value is not None and not isinstance(value, np.ndarray):
            raise self.wrong_type(key, "an array of numbers")
        return value

    def scalar_number(self, key):
        """An integer or floating value under `key` (None if absent)."""
        value = self.metadata.get(key)
        if value is not None and self.types[key] not in INTEGER_TYPES + (6, 12):
            raise self.wrong_type(key, "a number")
        return value

    def wrong_type(self, key, wanted):
        return CheckpointError(f"{self.path}: GGUF metadata {key!r} is {_type_name(self.types[key])}, "
                               f"not {wanted}; the file is damaged or was written by a broken "
                               "converter: re-convert it")


def _type_name(code):
    """A value type for messages: "a u32", "a string", "an array of strings"."""
    names = {0: "a u8", 1: "an i8", 2: "a u16", 3: "an i16", 4: "a u32", 5: "an i32",
             6: "an f32", 7: "a bool", 8: "a string", 9: "an array", 10: "a u64", 11: "an i64",
             12: "an f64"}
    if isinstance(code, tuple):
        return f"an array of {names.get(code[1], code[1]).split()[-1]}s"
    return names.get(code, f"value type {code}")


class _Cursor:
    """Reads a file front to back, refusing any read longer than what is left in it: the one
    place where the parser takes bytes, so no count from the file is trusted unchecked."""

    def __init__(self, f, path, size):
        self.f, self.path, self.size, self.pos = f, path, size, 0

    @property
    def left(self):
        return self.size - self.pos

    def take(self, n, what):
        if n > self.left:
            raise corrupt(self.path, f"{what} needs {n:,} bytes at offset {self.pos:,}, but the "
                                     f"file has only {self.left:,} left")
        data = self.f.read(n)
        if len(data) != n:                       # the file shrank while being read
            raise corrupt(self.path, f"it ends at byte {self.pos + len(data):,}, inside {what}")
        self.pos += n
        return data

    def unpack(self, fmt, n, what):
        return struct.unpack(fmt, self.take(n, what))[0]

    def u32(self, what):
        return self.unpack("<I", 4, what)

    def u64(self, what):
        return self.unpack("<Q", 8, what)

    def count(self, what, each):
        """A u64 count of items of at least `each` bytes, checked against the bytes left."""
        n = self.u64(what)
        if n * each > self.left:
            raise corrupt(self.path, f"its header declares {n:,} {what}, which would need at "
                                     f"least {n * each:,} bytes, but only {self.left:,} are left "
                                     "in the file")
        return n

    def string(self, what):
        n = self.count(f"bytes of {what}", 1)
        raw = self.take(n, what)
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise corrupt(self.path, f"{what} at offset {self.pos - n:,} is not UTF-8 "
                                     f"({raw[:20]!r}…)") from None


def read_gguf_header(path):
    """The checked header of the GGUF file at `path` (module docstring); no tensor data read."""
    path = Path(path)
    size = regular_file(path)
    try:
        with open(path, "rb", buffering=1 << 20) as f:
            return _parse(_Cursor(f, path, size))
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e


def _parse(cur):
    path = cur.path
    if cur.take(4, "the magic bytes") != MAGIC:
        raise CheckpointError(f"{path} is not a GGUF file (it does not begin with 'GGUF')")
    version = cur.u32("the version")
    if version not in VERSIONS:
        raise _bad_version(path, version)
    n_tensors = cur.count("tensors", _MIN_TENSOR)
    n_kv = cur.count("metadata entries", _MIN_KV)
    metadata, types = {}, {}
    for _ in range(n_kv):
        key = cur.string("a metadata key")
        if key in metadata:
            raise corrupt(path, f"its GGUF metadata has the key {key!r} twice")
        types[key], metadata[key] = _value(cur, cur.u32(f"the type of {key!r}"), key, 0)
    alignment = _alignment(path, metadata, types)
    infos = [_tensor_info(cur) for _ in range(n_tensors)]
    data_start = cur.pos + (-cur.pos % alignment)
    tensors = {}
    for name, shape, type_id, offset in infos:
        if name in tensors:
            raise corrupt(path, f"it has two tensors named {name!r}")
        tensors[name] = _place(path, name, shape, type_id, offset, data_start, cur.size,
                               alignment)
    _check_no_overlap(path, tensors)
    return GGUFHeader(path, version, metadata, types, tensors, alignment, data_start)


def _bad_version(path, version):
    swapped = struct.unpack("<I", struct.pack(">I", version))[0]
    if swapped in VERSIONS:
        return CheckpointError(f"{path} is a big-endian GGUF (version {swapped}), which tinyrwkv "
                               "does not read; convert the model to a little-endian GGUF (the "
                               "default of llama.cpp's converter)")
    if version == 1:
        return CheckpointError(f"{path} is a GGUF version 1 file (before August 2023), which "
                               "tinyrwkv does not read; re-convert it with a current llama.cpp")
    return corrupt(path, f"its GGUF version is {version}; tinyrwkv reads versions 2 and 3")


def _value(cur, vtype, key, depth):
    """(type code, value) of one metadata value of type `vtype`; arrays recurse (bounded)."""
    what = f"the value of {key!r}"
    if vtype in _SCALARS:
        fmt, n = _SCALARS[vtype]
        value = cur.unpack(fmt, n, what)
        if vtype == BOOL:
            if value > 1:
                raise corrupt(cur.path, f"{what} is a bool stored as {value}, not 0 or 1")
            value = bool(value)
        return vtype, value
    if vtype == STRING:
        return vtype, cur.string(what)
    if vtype != ARRAY:
        raise corrupt(cur.path, f"{what} has the unknown value type {vtype}")
    if depth >= MAX_NESTING:
        raise corrupt(cur.path, f"{what} nests arrays more than {MAX_NESTING} deep")
    etype = cur.u32(f"the element type of {key!r}")
    if etype not in _MIN_BYTES:
        raise corrupt(cur.path, f"{what} is an array of the unknown value type {etype}")
    n = cur.count(f"elements of {key!r}", _MIN_BYTES[etype])
    if etype in _NUMPY:                                   # numbers: one read, one array
        array = np.frombuffer(cur.take(n * _MIN_BYTES[etype], what), _NUMPY[etype])
        return (ARRAY, etype), (array.astype(bool) if etype == BOOL else array)
    return (ARRAY, etype), [_value(cur, etype, key, depth + 1)[1] for _ in range(n)]


def _alignment(path, metadata, types):
    """general.alignment: a u32 power of two (llama.cpp's rule), 32 when absent."""
    if "general.alignment" not in metadata:
        return DEFAULT_ALIGNMENT
    value = metadata["general.alignment"]
    if types["general.alignment"] != 4 or value == 0 or value & (value - 1):
        raise corrupt(path, f"its general.alignment is {value!r}; it must be a u32 power of two")
    return value


def _tensor_info(cur):
    """(name, NumPy shape, type id, offset) of one tensor info, its dimensions checked."""
    name = cur.string("a tensor name")
    n_dims = cur.u32(f"the dimensions of {name!r}")
    if not 1 <= n_dims <= MAX_DIMS:
        raise corrupt(cur.path, f"tensor {name!r} has {n_dims} dimensions; GGUF tensors have "
                                f"1 to {MAX_DIMS}")
    ne = [cur.u64(f"the shape of {name!r}") for _ in range(n_dims)]
    type_id = cur.u32(f"the type of {name!r}")
    offset = cur.u64(f"the offset of {name!r}")
    if min(ne) < 1:
        raise corrupt(cur.path, f"tensor {name!r} has the shape {tuple(reversed(ne))}, with an "
                                "empty dimension")
    return name, tuple(reversed(ne)), type_id, offset


def _place(path, name, shape, type_id, offset, data_start, size, alignment):
    """The GGUFTensor of one tensor info: a type tinyrwkv decodes, whole blocks per row, and
    its bytes aligned and inside the file."""
    if type_id not in GGML_TYPES:
        known = OTHER_GGML_TYPES.get(type_id)
        what = f"ggml type {known}" if known else f"unknown ggml type {type_id}"
        raise CheckpointError(f"{path}: tensor {name!r} is stored as {what}, which tinyrwkv "
                              f"cannot decode (it reads {', '.join(n for n, _, _ in GGML_TYPES.values())}); "
                              "re-convert the model with one of those types (f16 or q8_0, say)")
    type_name, block, block_bytes = GGML_TYPES[type_id]
    if shape[-1] % block:
        raise corrupt(path, f"tensor {name!r} has rows of {shape[-1]} elements, not a whole "
                            f"number of {type_name} blocks of {block}")
    nbytes = math.prod(shape[:-1]) * (shape[-1] // block * block_bytes)
    start = data_start + offset
    if offset % alignment:
        raise corrupt(path, f"tensor {name!r} starts at data offset {offset}, not a multiple of "
                            f"the file's alignment {alignment}")
    if start + nbytes > size:
        raise corrupt(path, f"tensor {name!r} ({type_name}, shape {shape}) needs bytes "
                            f"{start:,} to {start + nbytes:,}, past the end of the "
                            f"{size:,}-byte file (it may be cut short)")
    return GGUFTensor(name, shape, type_id, type_name, start, nbytes)


def _check_no_overlap(path, tensors):
    """No byte of the data section belongs to two tensors (llama.cpp lays them one after
    another; its own loader requires that)."""
    spans = sorted((t.offset, t.offset + t.nbytes, t.name) for t in tensors.values())
    for (_, end, first), (begin, _, second) in zip(spans, spans[1:]):
        if begin < end:
            raise corrupt(path, f"tensors {first!r} and {second!r} overlap in the data section")
