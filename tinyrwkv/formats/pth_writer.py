"""Writing torch `.pth` files without torch: the zip archive and the pickle that `torch.save`
writes for a dict of tensors, built byte by byte (docs/formats.md §1.5).

    save_pth("lora.pth", {"blocks.0.att.key.lora_A": a, ...}, dtype="bfloat16")
    write_pth("m.pth", source, "f16")           # a TensorSource (tinyrwkv convert), streamed

What is written (what torch 2.13's `torch.save(dict_of_tensors, f)` writes, docs/formats.md §1.1):

    archive/data.pkl                  pickle protocol 2: {name: _rebuild_tensor_v2(
                                        BINPERSID ('storage', torch.<T>Storage, key, 'cpu', numel),
                                        0, size, stride, False, OrderedDict())}
    archive/.format_version           "1"
    archive/.storage_alignment        "64"
    archive/byteorder                 "little"
    archive/data/<key>                one C-contiguous little-endian storage per tensor
    archive/version                   "3\\n"
    archive/.data/serialization_id    40 digits

Every member is stored (not compressed) and its data starts at a multiple of 64 bytes, reached by
padding the local header's extra field with a "FB" field as torch does, so a reader can
memory-map each storage (torch.load(mmap=True); tinyrwkv's reader maps them too). Where the
bytes differ from torch's, no reader sees it: the local headers carry the CRC and sizes (torch
leaves them zero and writes a data descriptor after the data: the CRC is computed here before
the header is written, so no seek back and no descriptor is needed); the pickle uses no memo
(torch's pickler memoizes every object; nothing requires it); the prefix is always "archive";
the serialization id is not torch's formula (torch only reports it). ZIP64 records are used
where a size or offset reaches 4 GiB, and the ZIP64 end records are always written, as torch
does.

The opcodes are emitted here, never through `pickle.dump`, and the file holds only dicts,
strings, ints, tuples, False and the three globals torch itself writes: what
`torch.load(weights_only=True)` and tinyrwkv's own reader (formats/pickle_reader.py) accept.
"""

from __future__ import annotations

import hashlib
import math
import struct
import zlib

import numpy as np

from .numerics import BF16_BITS, from_float32, parse_target
from .pickle_reader import TORCH_STORAGES
from .source import InMemory

__all__ = ["save_pth", "write_pth"]

_PREFIX = "archive"        # what torch.save writes to a file object (to a path: the file's stem)
_ALIGN = 64                # torch's storage alignment (serialization config save.storage_alignment)

# numpy dtype of a storage's bytes -> torch storage class (the inverse of TORCH_STORAGES:
# np.uint16 arrays are bf16 bit patterns, as the readers return them with dtype="bfloat16").
_STORAGE_OF = {np.dtype(element.numpy).newbyteorder("<"): name
               for name, element in TORCH_STORAGES.items()}

_U32_MAX = 0xFFFFFFFF      # a 32-bit zip field holding this means "see the ZIP64 extra field"
_CHUNK = 1 << 26           # bytes per crc32/write call: bounded temporaries, any member size


def save_pth(path, tensors, dtype=None):
    """Write {name: array} as a torch `.pth` (what torch.save({name: tensor}) writes), atomically;
    torch is not needed. torch.load(path, weights_only=True) and tinyrwkv's read_checkpoint read
    it back.

    dtype: None stores each array as it is (float32, float16, float64, integers, bool; np.uint16
    arrays are bf16 bit patterns, as read_checkpoint(..., dtype="bfloat16") returns them, and are
    stored as bf16); "float32", "float16" or "bfloat16" converts every floating array (bf16:
    rounded to nearest even, as torch's .to(torch.bfloat16)); integer and bool arrays are never
    converted. Arrays of any strides and byte order; 0-d to n-d."""
    target = parse_target(dtype)
    if not tensors:
        raise ValueError("save_pth: no tensors to write (a .pth of an empty dict is not a "
                         "state dict, and tinyrwkv's reader refuses it)")
    arrays, plan, read_as = {}, {}, {}
    for name, value in tensors.items():
        if not isinstance(name, str):
            raise ValueError(f"save_pth: tensor names are strings, not {type(name).__name__} "
                             f"({name!r})")
        array = np.asarray(value)
        if not array.dtype.isnative:           # one rule for ">u2" bf16 bits and "<u2" alike
            array = array.astype(array.dtype.newbyteorder("="))
        arrays[name] = array
        stored = _stored_dtype(array.dtype, target)
        plan[name] = (_storage_class(name, stored), array.shape)
        read_as[name] = BF16_BITS if stored == np.uint16 else dtype    # bits stay bits
    source = InMemory(arrays)                  # one copy of the conversion rules (source.py)
    _write(path, plan, lambda name: source.read(name, read_as[name]))


def write_pth(path, source, out_type="f32"):
    """Write a TensorSource (formats/source.py) as a torch .pth of out_type "f32", "f16" or
    "bf16", atomically, without torch: every tensor read as float32 and converted (bf16: to
    nearest even), one tensor at a time, so memory holds one tensor, not the model."""
    target = {"f32": "float32", "f16": "float16", "bf16": BF16_BITS}.get(out_type)
    if target is None:
        raise ValueError(f".pth files are written as f32, f16 or bf16, not {out_type!r}")
    stored = _stored_dtype(np.dtype(np.float32), parse_target(target))
    plan = {name: (_storage_class(name, stored), tuple(info.shape))
            for name, info in source.tensors().items()}

    def fetch(name):
        array = np.asarray(source.read(name, "float32"), dtype=np.float32)   # ints too, as before
        return from_float32(array, parse_target(target))
    _write(path, plan, fetch)


# ---- what each tensor is stored as ----

def _stored_dtype(dtype, target):
    """The NumPy dtype of the stored bytes of an array of `dtype` written for `target` (from
    parse_target): floating arrays and bf16 bits (np.uint16) follow the target; others stay."""
    if dtype.kind != "f" and dtype != np.uint16:
        return dtype
    if target is None:
        return dtype
    return np.dtype(np.uint16) if target is BF16_BITS else target


def _storage_class(name, dtype):
    storage = _STORAGE_OF.get(dtype.newbyteorder("<"))
    if storage is None:
        kinds = "float32/16/64, bf16 bits (uint16), int64/32/16/8, uint8 or bool"
        raise ValueError(f"save_pth: {name!r} is {dtype}, which a torch .pth cannot hold as "
                         f"tinyrwkv writes it ({kinds}); convert it first, e.g. "
                         ".astype(np.float32)")
    return storage


def _contiguous_strides(shape):
    """torch's strides of a contiguous tensor, in elements: an empty dimension counts as 1."""
    strides, step = [], 1
    for n in reversed(shape):
        strides.append(step)
        step *= max(n, 1)
    return tuple(reversed(strides))


# ---- the pickle, opcode by opcode (pickletools documents each) ----

def _int(n):
    """An int as pickle protocol 2 writes it (pickle.py save_long)."""
    if 0 <= n <= 0xFF:
        return b"K" + struct.pack("<B", n)                         # BININT1
    if 0 <= n <= 0xFFFF:
        return b"M" + struct.pack("<H", n)                         # BININT2
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)                         # BININT
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + struct.pack("<B", len(raw)) + raw             # LONG1


def _str(s):
    raw = s.encode("utf-8", "surrogatepass")                       # as pickle.py does
    return b"X" + struct.pack("<I", len(raw)) + raw                # BINUNICODE


def _global(module, name):
    return b"c" + module.encode("ascii") + b"\n" + name.encode("ascii") + b"\n"   # GLOBAL


def _tuple(items):
    if len(items) <= 3:                        # EMPTY_TUPLE, TUPLE1, TUPLE2, TUPLE3
        return b"".join(items) + b")\x85\x86\x87"[len(items):len(items) + 1]
    return b"(" + b"".join(items) + b"t"       # MARK ... TUPLE


def _tensor(storage, key, shape):
    """_rebuild_tensor_v2(<persistent storage>, 0, size, stride, False, OrderedDict())."""
    numel = math.prod(shape)
    persistent = _tuple([_str("storage"), _global("torch", storage), _str(key), _str("cpu"),
                         _int(numel)]) + b"Q"                      # BINPERSID
    hooks = _global("collections", "OrderedDict") + b")R"          # OrderedDict() via REDUCE
    args = _tuple([persistent, _int(0), _tuple([_int(n) for n in shape]),
                   _tuple([_int(s) for s in _contiguous_strides(shape)]), b"\x89", hooks])
    return _global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def _pickle(plan):
    """data.pkl for plan {name: (storage class, shape)}; storage i is member data/<i>."""
    out = [b"\x80\x02}"]                                           # PROTO 2, EMPTY_DICT
    items = [_str(name) + _tensor(storage, str(i), shape)
             for i, (name, (storage, shape)) in enumerate(plan.items())]
    for start in range(0, len(items), 1000):   # SETITEMS in batches of 1000, as pickle.py does
        out.append(b"(" + b"".join(items[start:start + 1000]) + b"u")
    return b"".join(out) + b"."                                    # STOP


# ---- the zip (APPNOTE.TXT: 4.3.7 local header, 4.3.12 central directory, 4.3.14-16 ends) ----

_LOCAL = struct.Struct("<IHHHHHIIIHH")          # 30 bytes
_CENTRAL = struct.Struct("<IHHHHHHIIIHHHHHII")  # 46 bytes
_END64 = struct.Struct("<IQHHIIQQQQ")           # 56 bytes
_LOCATOR64 = struct.Struct("<IIQI")             # 20 bytes
_END = struct.Struct("<IHHHHIIH")               # 22 bytes
_DOS_DATE = (0 << 9) | (1 << 5) | 1             # 1980-01-01, 00:00: the same bytes every time


class _ZipWriter:
    """Stored members written one after another to a binary file object `f` (at offset 0), each
    aligned to _ALIGN; `close()` writes the central directory and the end records. Sizes and
    offsets from `zip64_at` on go in ZIP64 fields (the 32-bit field then holds 0xFFFFFFFF): a
    zip's limit is 2^32 - 1; the tests lower it to exercise the ZIP64 records on small files."""

    def __init__(self, f, zip64_at=_U32_MAX):
        self.f, self.offset, self.entries, self.zip64_at = f, 0, [], zip64_at

    def _small(self, value, sentinel=_U32_MAX):
        """A 32-bit (or 16-bit) field: the value, or the sentinel that points to ZIP64."""
        return sentinel if value >= min(self.zip64_at, sentinel) else value

    def add(self, name, pieces, crc, size):
        """Member `name` whose data is the buffers `pieces` (size bytes, crc32 `crc`)."""
        raw_name = name.encode("utf-8")
        zip64 = size >= self.zip64_at
        extra = struct.pack("<HHQQ", 1, 16, size, size) if zip64 else b""   # ZIP64: sizes
        data_at = self.offset + _LOCAL.size + len(raw_name) + len(extra)
        pad = -data_at % _ALIGN
        if 0 < pad < 4:                         # an extra field needs 4 bytes of header
            pad += _ALIGN
        if pad:                                 # torch's padding field: id "FB", then "Z"s
            extra += b"FB" + struct.pack("<H", pad - 4) + b"Z" * (pad - 4)
        shown = _U32_MAX if zip64 else size
        self.f.write(_LOCAL.pack(0x04034B50, 45 if zip64 else 20, 0, 0, 0, _DOS_DATE, crc,
                                 shown, shown, len(raw_name), len(extra)))
        self.f.write(raw_name + extra)
        for piece in pieces:
            self.f.write(piece)
        self.entries.append((raw_name, crc, size, self.offset))
        self.offset = data_at + pad + size

    def close(self):
        start = self.offset
        for raw_name, crc, size, at in self.entries:
            # ZIP64 extra in the central directory: the fields that overflow, in this order
            fields = [v for v in (size, size, at) if v >= self.zip64_at]
            extra = (struct.pack(f"<HH{len(fields)}Q", 1, 8 * len(fields), *fields)
                     if fields else b"")
            version = 45 if fields else 20
            self.f.write(_CENTRAL.pack(0x02014B50, version, version, 0, 0, 0, _DOS_DATE, crc,
                                       self._small(size), self._small(size), len(raw_name),
                                       len(extra), 0, 0, 0, 0, self._small(at)))
            self.f.write(raw_name + extra)
            self.offset += _CENTRAL.size + len(raw_name) + len(extra)
        count, length, end64 = len(self.entries), self.offset - start, self.offset
        self.f.write(_END64.pack(0x06064B50, _END64.size - 12, 45, 45, 0, 0, count, count,
                                 length, start))
        self.f.write(_LOCATOR64.pack(0x07064B50, 0, end64, 1))
        self.f.write(_END.pack(0x06054B50, 0, 0, self._small(count, 0xFFFF),
                               self._small(count, 0xFFFF), self._small(length),
                               self._small(start), 0))


def _pieces(data):
    """A bytes-like object as memoryviews of at most _CHUNK bytes."""
    view = memoryview(data).cast("B")
    return [view[i:i + _CHUNK] for i in range(0, len(view), _CHUNK)] or [view]


def _crc(pieces):
    crc = 0
    for piece in pieces:
        crc = zlib.crc32(piece, crc)
    return crc


def _write(path, plan, fetch, zip64_at=_U32_MAX):
    """The .pth of plan {name: (storage class, shape)}; fetch(name) returns the array, whose
    dtype must be the storage's (any byte order) and shape the plan's. Atomic (files.py).
    zip64_at: _ZipWriter's (tests only)."""
    from ..files import atomic_open
    crcs = []

    def add(zf, name, data):
        pieces = _pieces(data)
        crcs.append(_crc(pieces))
        zf.add(f"{_PREFIX}/{name}", pieces, crcs[-1], sum(len(p) for p in pieces))

    with atomic_open(path) as f:                # the file appears whole, or not at all
        zf = _ZipWriter(f, zip64_at)
        add(zf, "data.pkl", _pickle(plan))
        add(zf, ".format_version", b"1")
        add(zf, ".storage_alignment", str(_ALIGN).encode())
        add(zf, "byteorder", b"little")
        for i, (name, (storage, shape)) in enumerate(plan.items()):
            stored = np.dtype(TORCH_STORAGES[storage].numpy)
            array = np.asarray(fetch(name))
            if array.shape != tuple(shape) or array.dtype.newbyteorder("<") != stored:
                raise ValueError(f"{name!r}: got {array.dtype} {array.shape}, expected "
                                 f"{stored} {tuple(shape)}")
            array = np.ascontiguousarray(array, dtype=stored)      # little-endian, C order
            add(zf, f"data/{i}", array.reshape(-1).view(np.uint8))
            del array                           # hold one tensor at a time
        add(zf, "version", b"3\n")
        # torch's id: 20 digits from the records' CRCs, 20 from their names; only reported
        # (torch.load's metadata log), never checked: ours is built the same way, not equal.
        names = "\n".join(["data.pkl"] + [f"data/{i}" for i in range(len(plan))])
        ident = (int.from_bytes(hashlib.sha256(struct.pack(f"<{len(crcs)}I", *crcs)).digest()[:8],
                                "little") % 10**20,
                 int.from_bytes(hashlib.sha256(names.encode()).digest()[:8], "little") % 10**20)
        add(zf, ".data/serialization_id", f"{ident[0]:020d}{ident[1]:020d}".encode())
        zf.close()
