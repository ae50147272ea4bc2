"""Reading RWKV-7 checkpoints without torch: `.pth` (torch zip) and `.safetensors`.

Everything here turns a file into a dict `official key -> np.ndarray` with the shapes exactly as
stored (no squeeze, no transpose: that is the model builder's job), or fails with a
`CheckpointError` that names the file, the problem and the fix.

The two containers (rwkv7.md §1.5, and the safetensors format):

    .pth          a ZIP archive, every member stored uncompressed under one folder <prefix>/:
                    <prefix>/data.pkl     a pickle (protocol 2) of {name: tensor}; each tensor is
                                          _rebuild_tensor_v2(storage, offset, size, stride, ...)
                    <prefix>/data/<key>   one raw storage per key, numel * itemsize bytes
                    <prefix>/byteorder    "little" (absent in old files -> little)
                  The data of each member starts 64-byte aligned at
                  local_header_offset + 30 + filename_len + extra_len, so it can be memory-mapped.
    .safetensors  8-byte little-endian header length n, n bytes of JSON
                  {name: {"dtype", "shape", "data_offsets": [begin, end]}, "__metadata__": {...}},
                  then the data section (offsets are relative to its start).

Why the unpickler is restricted: a `.pth` is a pickle, and unpickling can call any importable
function with any arguments (`os.system("...")` is two opcodes). Loading a downloaded `.pth` with
plain `pickle` (or `torch.load(weights_only=False)`) runs whatever its author wrote. A tensor
checkpoint needs exactly four kinds of globals (rwkv7.md §1.5): `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` (and `_rebuild_parameter`), and the `torch.*Storage` classes.
`_RestrictedUnpickler` maps those names to harmless stand-ins defined here (torch is never
imported) and refuses every other global, so tinyrwkv never executes code from a checkpoint.
This is the allow-list idea of `torch.load(weights_only=True)`, without torch.

Memory (the loading goal: no second copy of the weights): a tensor returned in the dtype it is
stored in (float32/float16/float64/integer with dtype=None, bf16 with dtype="bfloat16") is a
read-only view into one `np.memmap` of the file: nothing is read until used, and the OS pages
weights in and out. A tensor that must be converted (bf16 -> float32, which NumPy cannot keep;
anything -> float64; float32 -> bf16; a transposed or big-endian tensor) is *not* read through the
map: its bytes come in with plain file reads, 4 MB at a time, into a reusable buffer (one per read
thread) and are converted into a preallocated output array. Through a map the source pages would
stay resident and count in the process's memory on top of the converted copy (a 3 GB bf16 file
loaded as float32 peaked at 1.5x the 6.1 GB of weights); with reads the peak is the weights plus
the buffers (1.01x).
bf16 -> float32 is exact (a bf16 is the top half of a float32, rwkv7.md §1.5). Released RWKV-7
weights are bf16 (rwkv7.md §1.4); dtype="bfloat16" keeps them so, as uint16 bit patterns.
"""

from __future__ import annotations

import contextvars
import io
import json
import math
import os
import pickle
import re
import struct
import sys
import threading
import time
import zipfile
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np

__all__ = [
    "CheckpointError", "UnsupportedCheckpoint", "read_checkpoint", "inspect_checkpoint",
    "detect_version", "check_x070_keys", "save_safetensors", "to_bf16_bits", "bf16_to_float32",
    "ProgressBar",
]

SUPPORTED_FORMATS = ("tinyrwkv reads PyTorch zip checkpoints (.pth, as written by torch.save since "
                     "torch 1.6) and .safetensors files")
SUPPORTED_VERSIONS = "tinyrwkv supports RWKV-7 x070 and its DeepEmbed variant"

# A progress bar is drawn automatically (on a terminal) for files larger than this.
_AUTO_PROGRESS_BYTES = 256 * 2**20

# Converted tensors are read this many file bytes at a time, into one reusable buffer per read
# thread: big enough that the per-read overhead vanishes (a syscall per 4 MB), small enough that
# the buffers (4 x 4 MB) are noise next to the weights.
_PIECE_BYTES = 4 * 2**20

# Threads that read and convert tensors (see _materialize).
_READ_THREADS = min(4, os.cpu_count() or 1)

# read_checkpoint(dtype="bfloat16"): floating tensors as bf16 bit patterns in np.uint16 arrays.
_BF16_BITS = "bfloat16"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: the message names the file, the problem and the fix."""


class UnsupportedCheckpoint(CheckpointError):
    """A readable checkpoint of a model version or layout tinyrwkv does not implement."""


# ----------------------------------------------------------------------------------------------
# Element types
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True, slots=True)
class _DType:
    """One stored element type. Frozen and slotted: the unpickler hands these objects to the
    pickle stream (as the value of `torch.BFloat16Storage` etc.), and a crafted pickle must not be
    able to change them (pickle's BUILD opcode sets attributes)."""
    name: str            # short name used in messages and by inspect_checkpoint: "bf16", "fp32", ...
    numpy: str           # little-endian NumPy dtype of the stored bytes ("<u2" for bf16)

    @property
    def itemsize(self):
        return np.dtype(self.numpy).itemsize

    @property
    def is_float(self):
        return self.name in ("bf16", "fp16", "fp32", "fp64")


_BF16, _FP16, _FP32, _FP64 = _DType("bf16", "<u2"), _DType("fp16", "<f2"), _DType("fp32", "<f4"), \
    _DType("fp64", "<f8")
_I64, _I32, _I16, _I8 = _DType("i64", "<i8"), _DType("i32", "<i4"), _DType("i16", "<i2"), \
    _DType("i8", "i1")
_U8, _BOOL = _DType("u8", "u1"), _DType("bool", "?")

# torch storage class name -> element type (rwkv7.md §1.5).
_TORCH_STORAGES = {
    "BFloat16Storage": _BF16, "HalfStorage": _FP16, "FloatStorage": _FP32, "DoubleStorage": _FP64,
    "LongStorage": _I64, "IntStorage": _I32, "ShortStorage": _I16, "CharStorage": _I8,
    "ByteStorage": _U8, "BoolStorage": _BOOL,
}

# safetensors dtype code -> element type.
_SAFETENSORS_DTYPES = {
    "BF16": _BF16, "F16": _FP16, "F32": _FP32, "F64": _FP64, "I64": _I64, "I32": _I32,
    "I16": _I16, "I8": _I8, "U8": _U8, "BOOL": _BOOL,
}


def bf16_to_float32(bits):
    """bf16 bit patterns -> float32, exactly: a bf16 is the upper 16 bits of a float32 (rwkv7.md
    §1.5), so this only shifts. `bits`: a np.uint16 array of any byte order, as
    `read_checkpoint(path, dtype="bfloat16")` returns (or np.int16, as torch's
    `t.view(torch.int16).numpy()` gives). Returns a new C-contiguous float32 array, same shape."""
    bits = np.asarray(bits)
    if bits.dtype.kind not in "ui" or bits.dtype.itemsize != 2:
        raise TypeError(f"bf16 bits are 16-bit integers (np.uint16), not {bits.dtype}")
    wide = bits.astype(np.uint32)              # new array, native byte order (int16: bits kept)
    if bits.dtype.kind == "i":
        wide &= 0xFFFF                         # int16 -> uint32 sign-extends; keep the 16 bits
    wide <<= 16                                # in place: peak memory is one float32 tensor
    return wide.view(np.float32)


def to_bf16_bits(x):
    """float32 array -> uint16 bf16 bit patterns, rounding to nearest, ties to even (as torch's
    `.to(torch.bfloat16)` does). NaNs stay NaN (quiet bit set); overflow rounds to +-inf.

    Used to write bf16 safetensors files, since NumPy has no bf16 type.
    """
    bits = np.asarray(x, dtype=np.float32, order="C").view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds the discarded 16 bits to nearest-even;
    # a carry into the exponent is exactly right (it rounds up to the next binade or to inf).
    with np.errstate(over="ignore"):     # only NaN bit patterns wrap around; replaced below
        rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(np.isnan(bits.view(np.float32)), quiet_nan, rounded)


# ----------------------------------------------------------------------------------------------
# The plan: what a file holds and where, before any tensor data is read
# ----------------------------------------------------------------------------------------------

@dataclass
class _Region:
    """Where one storage's bytes are: `offset` in the file (mapped), or a compressed zip member."""
    nbytes: int
    offset: int | None = None      # absolute file offset of the first byte (stored members)
    member: str | None = None      # zip member name (compressed members, read through zipfile)


@dataclass
class _Tensor:
    """One tensor: a strided view of a storage, all counts in elements."""
    dtype: _DType
    storage: str                   # key into the regions dict
    offset: int
    shape: tuple
    stride: tuple


@dataclass
class _Plan:
    path: Path
    tensors: dict                  # name -> _Tensor, in file order
    regions: dict                  # storage key -> _Region
    big_endian: bool = False


def _corrupt(path, what):
    return CheckpointError(f"{path} is truncated or corrupt: {what}; re-download it (or re-save it)")


def _plan(path):
    """Open `path`, decide its format from its first bytes, and describe its tensors."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist")
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file inside it "
                              "(a .pth or .safetensors file)")
    try:
        size = path.stat().st_size
        with open(path, "rb") as f:
            head = f.read(512)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    kind = _sniff(path, head, size)
    return _plan_pth(path, size) if kind == "pth" else _plan_safetensors(path, size)


def _sniff(path, head, size):
    """'pth' or 'safetensors' from the magic bytes; otherwise say what the file looks like."""
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy failed; "
                              "download it again")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):       # a zip (or an empty zip)
        return "pth"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"       # 8-byte length, then the JSON header's opening brace
    if head.startswith(b"GGUF"):
        what = ("a GGUF file (llama.cpp's format); tinyrwkv does not read GGUF: use the original "
                "RWKV-7 .pth (or a .safetensors export)")
    elif head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = ("a bare pickle, not a zip: the legacy torch format (torch < 1.6, or "
                "_use_new_zipfile_serialization=False). Re-save it with a recent torch: "
                "torch.save(torch.load(old, weights_only=True), new)")
    elif head.startswith(b"\x93NUMPY"):
        what = "a NumPy .npy array, not a checkpoint"
    elif head.startswith(b"version https://git-lfs"):
        what = ("a Git LFS pointer, not the weights themselves: run `git lfs pull` "
                "(or download the file directly)")
    elif _looks_like_text(head):
        snippet = head[:60].decode("utf-8", "replace").split("\n")[0]
        hint = " (an HTML page: probably a failed download)" if b"<html" in head.lower() or \
            b"<!doctype" in head.lower() else ""
        what = f"a text file{hint}, beginning {snippet!r}"
    else:
        what = f"an unknown binary format (first bytes {head[:8].hex(' ')})"
    raise CheckpointError(f"{path} is not a checkpoint tinyrwkv can read: it looks like {what}. "
                          f"{SUPPORTED_FORMATS}")


def _looks_like_text(head):
    text = head.decode("utf-8", "replace")[:-1]    # the 512-byte cut may split the last character
    return all((c.isprintable() and c != "\ufffd") or c in "\r\n\t" for c in text)


# ---- .pth: zip + restricted pickle ----

# One local file header is 30 bytes: signature, 5 two-byte fields (version, flags, method, time,
# date), crc, compressed size, uncompressed size, then name length and extra-field length.
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def _plan_pth(path, size):
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            pkl_names = [name for name in infos if name == "data.pkl" or name.endswith("/data.pkl")]
            if not pkl_names:
                if any(name.endswith(".npy") for name in infos):
                    raise CheckpointError(f"{path} is a zip archive of .npy arrays (a NumPy .npz), "
                                          f"not a torch checkpoint. {SUPPORTED_FORMATS}")
                raise CheckpointError(f"{path} is a zip archive without a data.pkl member, so not "
                                      f"a torch checkpoint. {SUPPORTED_FORMATS}")
            if any("/code/" in name for name in infos) and any(n.endswith("constants.pkl") for n in infos):
                raise CheckpointError(f"{path} is a TorchScript archive (torch.jit.save), not a state "
                                      "dict; save model.state_dict() with torch.save instead")
            if len(pkl_names) > 1:
                raise CheckpointError(f"{path} holds several pickles ({', '.join(pkl_names[:3])}); "
                                      "expected one torch checkpoint per file")
            pkl_name = pkl_names[0]
            prefix = pkl_name[: -len("data.pkl")]          # "<prefix>/" (or "" at the top level)
            pickle_bytes = zf.read(pkl_name)               # checks the CRC too
            big_endian = False
            if prefix + "byteorder" in infos:
                order = zf.read(prefix + "byteorder").decode("ascii", "replace").strip()
                if order not in ("little", "big"):
                    raise _corrupt(path, f"its byteorder member says {order!r}")
                big_endian = order == "big"
    except CheckpointError:
        raise
    except Exception as e:          # BadZipFile, EOFError, struct.error, OSError, zlib.error, ...
        raise _corrupt(path, f"the zip structure cannot be read ({type(e).__name__}: {e})") from e

    top = _RestrictedUnpickler(io.BytesIO(pickle_bytes), path).load_checked()
    state = _state_dict_of(top, path)

    # Locate every storage the tensors use, and check each view against its storage.
    try:
        tensors, regions = _locate_tensors(path, size, state, infos, prefix)
    except CheckpointError:
        raise
    except (OSError, ValueError, struct.error) as e:      # e.g. a nonsense header offset
        raise _corrupt(path, f"a zip member cannot be located ({type(e).__name__}: {e})") from e
    return _Plan(path, tensors, regions, big_endian)


def _locate_tensors(path, size, state, infos, prefix):
    tensors, regions = {}, {}
    with open(path, "rb") as f:
        for name, t in state.items():
            key = t.storage.key
            member = prefix + "data/" + key
            if key not in regions:
                info = infos.get(member)
                if info is None:
                    raise _corrupt(path, f"tensor {name!r} uses storage {member!r}, which is not in "
                                         "the archive")
                regions[key] = _member_region(f, path, info, size)
            nbytes = t.storage.numel * t.storage.dtype.itemsize
            if regions[key].nbytes != nbytes:
                raise _corrupt(path, f"storage {member!r} (tensor {name!r}) has "
                                     f"{regions[key].nbytes} bytes, but the pickle says "
                                     f"{t.storage.numel} x {t.storage.dtype.name} = {nbytes} bytes")
            _check_view(path, name, t.offset, t.shape, t.stride, t.storage.numel)
            tensors[name] = _Tensor(t.storage.dtype, key, t.offset, t.shape, t.stride)
    return tensors, regions


def _member_region(f, path, info, size):
    """Where the bytes of zip member `info` are. For a stored (uncompressed) member that is
    local_header_offset + 30 + name_len + extra_len, with the lengths read from the *local*
    header (they differ from the central directory's: torch pads the local extra field to align
    the data to 64 bytes; rwkv7.md §1.5)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return _Region(nbytes=info.file_size, member=info.filename)
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise _corrupt(path, f"the local header of {info.filename!r} is cut off")
    signature, *_, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if signature != b"PK\x03\x04":
        raise _corrupt(path, f"no local header where {info.filename!r} should start")
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if info.compress_size != info.file_size or offset + info.file_size > size:
        raise _corrupt(path, f"member {info.filename!r} ends beyond the end of the file")
    return _Region(nbytes=info.file_size, offset=offset)


def _check_view(path, name, offset, shape, stride, numel):
    """A strided view (all in elements) must stay inside its storage of `numel` elements."""
    if len(shape) != len(stride):
        raise _corrupt(path, f"tensor {name!r} has size {shape} but stride {stride}")
    if any(n == 0 for n in shape):
        last = offset - 1              # an empty tensor touches no element
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if offset < 0 or last >= numel:
        raise _corrupt(path, f"tensor {name!r} (offset {offset}, size {shape}, stride {stride}) "
                             f"reaches outside its storage of {numel} elements")


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """What a persistent id ('storage', <type>, key, location, numel) stands for."""
    dtype: _DType
    key: str
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """What `_rebuild_tensor_v2(storage, offset, size, stride, ...)` stands for."""
    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple


def _is_count(x):
    return type(x) is int and x >= 0


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that understands a tensor state dict and nothing else.

    `find_class` is the only way a pickle can reach a Python callable; it returns our stand-ins for
    the few names a state dict uses (rwkv7.md §1.5) and refuses all others. The stand-ins only
    record numbers: no torch import, no file access, no code from the file.
    """

    def __init__(self, file, path):
        super().__init__(file)
        self.path = path
        self.allowed = {
            # An OrderedDict is just a dict for us (dicts keep insertion order).
            ("collections", "OrderedDict"): dict,
            ("torch._utils", "_rebuild_tensor_v2"): self.rebuild_tensor,
            ("torch._utils", "_rebuild_parameter"): self.rebuild_parameter,
            ("torch._utils", "_rebuild_parameter_with_state"): self.rebuild_parameter,
        }
        self.allowed.update({("torch", name): dtype for name, dtype in _TORCH_STORAGES.items()})

    def find_class(self, module, name):
        stand_in = self.allowed.get((module, name))
        if stand_in is None and module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"{self.path} stores tensors as torch.{name}, an element type "
                                  f"tinyrwkv does not read (supported: {', '.join(_TORCH_STORAGES)}); "
                                  "convert the tensors to bf16, fp16 or fp32 and save again")
        if stand_in is None:
            raise CheckpointError(
                f"refusing to load {self.path}: its pickle asks for {module}.{name}, which a tensor "
                "checkpoint never needs; this file may be malicious (tinyrwkv never executes code "
                "from checkpoints). If you trust it (e.g. a training checkpoint with optimizer "
                "state), extract the state dict with torch and save that with torch.save")
        return stand_in

    def persistent_load(self, pid):
        if not (isinstance(pid, tuple) and len(pid) == 5 and pid[0] == "storage"
                and isinstance(pid[1], _DType) and isinstance(pid[2], str) and _is_count(pid[4])):
            raise _corrupt(self.path, f"unexpected persistent id {str(pid)[:80]} in data.pkl "
                                      "(expected ('storage', <type>, key, location, numel))")
        return _StorageRef(dtype=pid[1], key=pid[2], numel=pid[4])

    def rebuild_tensor(self, storage, offset, shape, stride, *rest):
        # rest: requires_grad, backward_hooks[, metadata] -- irrelevant for inference
        ok = (isinstance(storage, _StorageRef) and _is_count(offset)
              and isinstance(shape, tuple) and all(_is_count(n) for n in shape)
              and isinstance(stride, tuple) and all(_is_count(s) for s in stride))
        if not ok:
            raise _corrupt(self.path, "a tensor in data.pkl has malformed storage/offset/size/stride")
        return _TensorRef(storage, offset, shape, stride)

    def rebuild_parameter(self, data, *rest):
        # nn.Parameter(data, requires_grad[, state]): for us, the same tensor.
        if not isinstance(data, _TensorRef):
            raise _corrupt(self.path, "a parameter in data.pkl does not wrap a tensor")
        return data

    def load_checked(self):
        """`load()`, with every low-level failure turned into a CheckpointError."""
        try:
            return self.load()
        except CheckpointError:
            raise
        except RecursionError as e:
            raise _corrupt(self.path, "data.pkl nests too deeply") from e
        except Exception as e:   # UnpicklingError, EOFError, TypeError, ... from garbage bytes
            raise _corrupt(self.path, f"data.pkl is not a valid pickle ({type(e).__name__}: {e})") from e


def _is_state_dict(obj):
    return (isinstance(obj, dict) and len(obj) > 0
            and all(isinstance(k, str) and isinstance(v, _TensorRef) for k, v in obj.items()))


def _state_dict_of(top, path):
    """The {name: tensor} dict in the pickle: the top object, or the one dict of tensors nested
    one level down (training scripts save {"state_dict": ..., "epoch": ...} or {"model": ...})."""
    if _is_state_dict(top):
        return top
    if isinstance(top, dict):
        inner = [k for k, v in top.items() if _is_state_dict(v)]
        if len(inner) == 1:
            return top[inner[0]]
        if len(inner) > 1:
            raise CheckpointError(f"{path} holds several dicts of tensors ({', '.join(map(repr, inner))});"
                                  " save the model's state dict alone with torch.save")
        keys = ", ".join(repr(k) for k in list(top)[:8])
        raise CheckpointError(f"{path} holds a dict ({len(top)} entries: {keys}) that is not a state "
                              "dict of name -> tensor; save model.state_dict() with torch.save")
    raise CheckpointError(f"{path} holds a {type(top).__name__}, not a state dict of name -> tensor; "
                          "save model.state_dict() with torch.save")


# ---- .safetensors ----

def _plan_safetensors(path, size):
    try:
        with open(path, "rb") as f:
            (n,) = struct.unpack("<Q", f.read(8))
            if n > size - 8:
                raise _corrupt(path, f"its safetensors header says {n} bytes but the file has only "
                                     f"{size - 8} after the length field")
            raw = f.read(n)
    except CheckpointError:
        raise
    except (OSError, struct.error) as e:
        raise _corrupt(path, f"the safetensors header cannot be read ({e})") from e
    try:
        header = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError) as e:
        raise _corrupt(path, f"its safetensors header is not valid JSON ({type(e).__name__}: {e})") from e
    if not isinstance(header, dict):
        raise _corrupt(path, "its safetensors header is not a JSON object")

    data_start, data_len = 8 + n, size - 8 - n
    tensors, regions = {}, {}
    for name, entry in header.items():
        if name == "__metadata__":       # free-form strings (format, author, ...), not tensors
            continue
        try:
            code, shape, (begin, end) = entry["dtype"], tuple(entry["shape"]), entry["data_offsets"]
        except (TypeError, KeyError, ValueError) as e:
            raise _corrupt(path, f"header entry {name!r} lacks dtype/shape/data_offsets") from e
        dtype = _SAFETENSORS_DTYPES.get(code)
        if dtype is None:
            raise CheckpointError(f"{path}: tensor {name!r} has dtype {code!r}, which tinyrwkv does "
                                  f"not read (supported: {', '.join(_SAFETENSORS_DTYPES)}); "
                                  "re-export it as BF16, F16 or F32")
        if not (all(_is_count(d) for d in shape) and _is_count(begin) and _is_count(end)):
            raise _corrupt(path, f"header entry {name!r} has a malformed shape or data_offsets")
        if not begin <= end <= data_len:
            raise _corrupt(path, f"tensor {name!r} has data_offsets [{begin}, {end}] outside the "
                                 f"{data_len}-byte data section (the file may be cut short)")
        numel = math.prod(shape)
        if end - begin != numel * dtype.itemsize:
            raise _corrupt(path, f"tensor {name!r} has {end - begin} bytes of data, but shape "
                                 f"{list(shape)} x {code} needs {numel * dtype.itemsize}")
        regions[name] = _Region(nbytes=end - begin, offset=data_start + begin)
        # C-contiguous strides, in elements
        stride = tuple(math.prod(shape[i + 1:]) for i in range(len(shape)))
        tensors[name] = _Tensor(dtype, name, 0, shape, stride)
    return _Plan(path, tensors, regions)


# ----------------------------------------------------------------------------------------------
# Public API
# ----------------------------------------------------------------------------------------------

def inspect_checkpoint(path):
    """{key: (shape, stored dtype name)} without reading any tensor data (for `tinyrwkv info`).

    Dtype names: "bf16", "fp16", "fp32", "fp64", "i64", "i32", "i16", "i8", "u8", "bool".
    Only the zip directory, the pickle and a few header bytes are read (or the safetensors header).
    """
    plan = _plan(path)
    return {name: (t.shape, t.dtype.name) for name, t in plan.tensors.items()}


def read_checkpoint(path, dtype=None, progress=None):
    """Read a `.pth` (torch zip) or `.safetensors` checkpoint into {official key: array}.

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
            asks for code (see the module docstring).
    """
    if isinstance(dtype, str) and dtype == _BF16_BITS:
        target = _BF16_BITS
    else:
        target = None if dtype is None else np.dtype(dtype)
        if target is not None and target.kind != "f":
            raise ValueError(f"dtype must be None, 'bfloat16' or a floating dtype such as "
                             f"'float32', not {dtype!r}")
    plan = _plan(path)
    total = sum(t.dtype.itemsize * math.prod(t.shape) for t in plan.tensors.values())

    bar = None
    if progress is None:
        big = plan.path.stat().st_size > _AUTO_PROGRESS_BYTES
        progress = bar = ProgressBar(label=plan.path.name) if big and _stderr_is_tty() else None
    elif progress is True:
        progress = bar = ProgressBar(label=plan.path.name)
    elif progress is False:
        progress = None
    elif not callable(progress):
        raise TypeError(f"progress must be None, True, False or a callable, not {progress!r}")

    try:
        return _materialize(plan, target, progress, total)
    finally:
        if bar is not None:
            bar.close()


def _materialize(plan, target, progress, total):
    """Every tensor of the plan, as read_checkpoint returns it: a zero-copy view of the file map
    where the stored bytes are already the answer, otherwise a new array filled by plain reads.

    Conversions run on _READ_THREADS threads, one tensor per job: file reads and NumPy's copy and
    shift release the GIL, and so does the kernel's work of handing out the fresh output pages,
    the largest cost of a float32 load (most of its CPU time is system time). Measured on a busy
    2-core VM (1.5B shape, bf16 -> float32, 18 runs each): median 2.4 s with 2 threads, 3.3 s with
    one, best runs 1.0 s and 1.3 s; the spread there (1-14 s) is the VM's page faults, not this
    code. Results and progress reports keep file order."""
    file_map = None                    # np.memmap of the whole file, made at the first view
    compressed = {}                    # storage key -> bytes, for compressed zip members
    zf = None
    out = {}                           # name -> array, or a Future of one (a conversion job)
    local = threading.local()          # each worker thread's read buffer

    def read_converted(t, region, stored, arr):
        if not hasattr(local, "buffer"):
            local.buffer = np.empty(_PIECE_BYTES, np.uint8)
        with open(plan.path, "rb", buffering=0) as f:     # unbuffered: readinto goes straight in
            _read_converted(f, plan.path, region.offset, stored, t, target, arr, local.buffer)
        return arr

    if progress is not None:
        progress(0, total)
    pool = ThreadPoolExecutor(_READ_THREADS, thread_name_prefix="tinyrwkv-read")
    try:
        for name, t in plan.tensors.items():
            region = plan.regions[t.storage]
            stored = np.dtype(t.dtype.numpy)               # the file's element type and byte order
            if plan.big_endian:
                stored = stored.newbyteorder(">")
            result = _result_dtype(t.dtype, target)
            if math.prod(t.shape) == 0:
                out[name] = np.empty(t.shape, result)
            elif region.offset is None:                   # rare: a re-zipped, compressed .pth
                if t.storage not in compressed:
                    zf = zf or zipfile.ZipFile(plan.path)
                    try:
                        compressed[t.storage] = zf.read(region.member)
                    except Exception as e:
                        raise _corrupt(plan.path, f"member {region.member!r} cannot be read "
                                                  f"({e})") from e
                storage = np.frombuffer(compressed[t.storage], stored)              # (numel,)
                out[name] = np.empty(t.shape, result)
                _convert_into(_strided(storage, t), t.dtype, target, out[name])
            elif stored == result and _is_contiguous(t.shape, t.stride):
                if file_map is None:
                    file_map = _map(plan.path)
                storage = file_map[region.offset: region.offset + region.nbytes].view(stored)
                out[name] = _strided(storage, t)                             # a read-only view
            else:
                job = contextvars.copy_context().run       # np.errstate etc. as the caller's
                out[name] = pool.submit(job, read_converted, t, region, stored,
                                        np.empty(t.shape, result))
        done = 0
        for name, t in plan.tensors.items():
            if isinstance(out[name], Future):
                out[name] = out[name].result()
            done += t.dtype.itemsize * math.prod(t.shape)
            if progress is not None:
                progress(done, total)
    except OSError as e:
        raise CheckpointError(f"cannot read {plan.path}: {e}") from e
    finally:
        pool.shutdown(cancel_futures=True)    # after an error: no new job starts
        if zf is not None:
            zf.close()
    return out


def _map(path):
    """One read-only map of the whole file; every zero-copy tensor is a slice of it."""
    try:
        return np.memmap(path, np.uint8, "r")
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot memory-map {path}: {e}") from e


def _result_dtype(stored, target):
    """The NumPy dtype read_checkpoint returns for a tensor stored as `stored` (a _DType)."""
    if not stored.is_float:
        return np.dtype(stored.numpy).newbyteorder("=")     # integers/bools: never converted
    if target is _BF16_BITS:
        return np.dtype(np.uint16)                          # bf16 bit patterns
    if target is None:
        return np.dtype(np.float32) if stored == _BF16 else np.dtype(stored.numpy).newbyteorder("=")
    return target


def _is_contiguous(shape, stride):
    """True if a view with these (element) strides is C-contiguous, as NumPy decides it: axes of
    length 1 may have any stride."""
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


def _read_converted(f, path, region_offset, stored, t, target, arr, buffer):
    """Fill `arr` (the result, preallocated) with tensor `t`, converted, reading the file with
    plain reads: the page cache is copied into `buffer`, never mapped, so no source page counts in
    this process's memory once the tensor is done.

    A C-contiguous tensor (every checkpoint tensor in practice) is read _PIECE_BYTES at a time, each
    piece converted straight into its slice of `arr`. A strided one (a transposed tensor saved as
    such) is read whole, span and all, into a temporary, then converted as a strided view."""
    itemsize = stored.itemsize
    start = region_offset + t.offset * itemsize                     # file offset of element 0
    if _is_contiguous(t.shape, t.stride):
        flat = arr.reshape(-1)                                      # a view: arr is contiguous
        per_piece = len(buffer) // itemsize
        for i in range(0, flat.size, per_piece):
            piece = flat[i: i + per_piece]                          # (n,)
            raw = buffer[: piece.size * itemsize]
            _read_exactly(f, path, start + i * itemsize, raw)
            _convert_into(raw.view(stored), t.dtype, target, piece)
        return
    span = 1 + sum((n - 1) * s for n, s in zip(t.shape, t.stride))  # elements from first to last
    raw = buffer[: span * itemsize] if span * itemsize <= len(buffer) else \
        np.empty(span * itemsize, np.uint8)
    _read_exactly(f, path, start, raw)
    view = np.lib.stride_tricks.as_strided(
        raw.view(stored), shape=t.shape, strides=tuple(s * itemsize for s in t.stride),
        writeable=False)
    _convert_into(view, t.dtype, target, arr)


def _read_exactly(f, path, offset, raw):
    """Read len(raw) bytes of the file from `offset` into the uint8 array `raw`."""
    f.seek(offset)
    view = memoryview(raw)
    got = 0
    while got < len(view):
        n = f.readinto(view[got:])
        if not n:
            raise _corrupt(path, f"it ends at byte {offset + got}, inside a tensor")
        got += n


def _strided(storage, t):
    """The tensor as a view of its 1-D storage: element (i0, i1, ...) is
    storage[offset + i0*stride0 + i1*stride1 + ...] (rwkv7.md §1.5). Read-only; may be
    non-contiguous (a transposed tensor saved as such)."""
    itemsize = storage.dtype.itemsize
    return np.lib.stride_tricks.as_strided(
        storage[t.offset:], shape=t.shape, strides=tuple(s * itemsize for s in t.stride),
        writeable=False)


def _convert_into(src, stored_type, target, dst):
    """Write the stored values `src` (the file's dtype and byte order) into `dst` (same shape, the
    dtype read_checkpoint returns; see its docstring)."""
    if stored_type == _BF16 and target is _BF16_BITS:
        np.copyto(dst, src)                         # bits as they are (byte order fixed)
    elif target is _BF16_BITS and stored_type.is_float:     # float16/32/64 -> bf16, nearest even
        dst[...] = to_bf16_bits(src)
    elif stored_type == _BF16 and dst.dtype == np.float32:
        wide = dst.view(np.uint32)                  # widen in place, copy then shift: 3.5 ms
        np.copyto(wide, src)                        # per 16 MB, faster than a casting left_shift
        wide <<= 16                                 # (5.3 ms) or an astype (13 ms)
    elif stored_type == _BF16:                      # float64 (exact) or float16 (rounds), via f32
        np.copyto(dst, bf16_to_float32(src), casting="unsafe")
    else:
        np.copyto(dst, src, casting="unsafe")       # as astype: rounds; or a byte-order swap


def _stderr_is_tty():
    try:
        return sys.stderr.isatty()
    except (AttributeError, ValueError):
        return False


class ProgressBar:
    """A one-line progress display on stderr: percentage, MB done/total, MB/s.

    Draws only when the stream is a terminal (or force=True), at most ~10 times a second (plus the
    final 100%). Use as `progress(done_bytes, total_bytes)`; call close() (or use `with`) to end
    the line.
    """

    def __init__(self, label="loading", stream=None, force=False, min_interval=0.1):
        self.stream = stream if stream is not None else sys.stderr
        isatty = getattr(self.stream, "isatty", None)
        self.enabled = force or bool(isatty and isatty())
        self.label, self.min_interval = label, min_interval
        self.start = time.monotonic()
        self.last_draw = None
        self.drawn = False

    def __call__(self, done, total):
        if not self.enabled:
            return
        now = time.monotonic()
        finished = done >= total
        if not finished and self.last_draw is not None and now - self.last_draw < self.min_interval:
            return
        self.last_draw = now
        percent = 100.0 * done / total if total else 100.0
        rate = done / 1e6 / max(now - self.start, 1e-9)
        self.stream.write(f"\r{self.label}: {percent:5.1f}% {done / 1e6:,.1f}/{total / 1e6:,.1f} MB "
                          f"{rate:,.0f} MB/s")
        self.stream.flush()
        self.drawn = True

    def close(self):
        if self.drawn:
            self.stream.write("\n")
            self.stream.flush()
            self.drawn = False

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.close()


# ----------------------------------------------------------------------------------------------
# Model version and key checks
# ----------------------------------------------------------------------------------------------

def detect_version(keys):
    """"x070" or "x070-deepembed" from the key names; UnsupportedCheckpoint for anything else.

    x070 is recognised by `blocks.0.att.r_k` and `blocks.0.att.k_k` (rwkv7.md §1.1); DeepEmbed by
    `blocks.0.ffn.s_emb.weight` and DeepEmbed+DEA ("rwkv7b") by `blocks.0.qkv.qq.weight` (§1.2, §5).
    Older versions are named from their characteristic time-mix keys; pre-release RWKV-7 RC files
    from `time_aaaaa`, `time_misc_*` or `time_maa_*` next to x070 names (§1.4).
    """
    keys = [str(k) for k in keys]
    keyset = set(keys)

    def has(*fragments):
        return next((k for k in keys for frag in fragments if frag in k), None)

    def unsupported(found, advice=""):
        return UnsupportedCheckpoint(f"this checkpoint is {found}. {SUPPORTED_VERSIONS}"
                                     + (f"; {advice}" if advice else ""))

    # Layouts of other tools first (their keys would confuse the per-version checks below).
    hf = has("model.layers.", "model.embeddings.")
    if hf:
        raise unsupported(f"in the Hugging Face / flash-linear-attention layout (e.g. {hf!r})",
                          "this layout is not supported yet: convert it to the official .pth key "
                          "names with the official tools, or use the original .pth release")
    hf_rwkv = has("rwkv.embeddings.", "rwkv.blocks.")
    if hf_rwkv:
        raise unsupported(f"in the Hugging Face transformers RWKV layout (e.g. {hf_rwkv!r}; "
                          "RWKV-4/5/6 in transformers)", "use the original .pth release")
    for prefix in ("module.", "model.", "_orig_mod."):
        if keys and all(k.startswith(prefix) for k in keys):
            stripped = [k[len(prefix):] for k in keys]
            try:
                inner = detect_version(stripped)
            except UnsupportedCheckpoint as e:
                raise UnsupportedCheckpoint(f"every key is prefixed with {prefix!r}, and without it: "
                                            f"{e}") from None
            raise unsupported(f"an RWKV-7 {inner} state dict whose keys are all prefixed with "
                              f"{prefix!r} (as a training wrapper saves them)",
                              f"strip the prefix: {{k.removeprefix({prefix!r}): v for k, v in "
                              "sd.items()}, and save that")

    dea = has(".qkv.qq.", ".qkv.k_emb.", ".qkv.v_emb.")     # not any ".qkv." (ViTs have those)
    if dea:
        raise unsupported(f"RWKV-7 with DeepEmbed + DeepEmbedAttention (\"rwkv7b\", e.g. {dea!r}), "
                          "which needs a growing per-token cache (it is not constant-state); it is "
                          "not supported")
    x070_names = (".att.r_k", ".att.k_k", ".att.k_a", ".att.w0", ".att.a0", ".att.x_r")
    rc = has(".att.time_aaaaa", ".att.time_misc_", ".att.time_kkk", ".att.time_maa_a",
             ".att.time_maa_rg", ".att.time_maa_wa")
    if rc is None and has(".att.time_maa") and has(*x070_names):
        rc = has(".att.time_maa")
    if rc:
        raise unsupported(f"a pre-release RWKV-7 (RC, before 2024-11-28) checkpoint (e.g. {rc!r}); "
                          "released x070 files use other names (att.x_r, att.w0, att.k_k, ...)",
                          "use a released x070 model")
    if "blocks.0.att.r_k" in keyset and "blocks.0.att.k_k" in keyset:
        return "x070-deepembed" if "blocks.0.ffn.s_emb.weight" in keyset else "x070"

    older = [("RWKV-6", (".att.time_maa_x", ".att.time_decay_w1")),
             ("RWKV-5", (".att.time_faaaa",)),
             ("RWKV-4", (".att.time_first", ".att.time_mix_k"))]
    for version, fragments in older:
        found = has(*fragments)
        if found:
            raise unsupported(f"{version} (found {found!r})",
                              "the official `rwkv` pip package runs it")
    state = has("time_state")
    if state and all("time_state" in k for k in keys):
        raise unsupported(f"a state-tuning file (e.g. {state!r}), not a model",
                          "load the base model and apply the state to it")
    lora = has("lora_A", "lora_B")
    if lora:
        raise unsupported(f"a LoRA adapter (e.g. {lora!r}), not a model",
                          "merge it into its base model first")
    first = ", ".join(keys[:5]) or "(none: the file holds no tensors)"
    raise unsupported(f"not an RWKV model: no RWKV keys found; first keys: {first}")


_BLOCK_KEY = re.compile(r"blocks\.(\d+)\.")


def check_x070_keys(weights, source=None):
    """Raise CheckpointError unless `weights` has exactly the keys of an RWKV-7 x070 model (plain
    or DeepEmbed), each with the right shape (rwkv7.md §1.1, §5.2).

    Sizes come from the tensors themselves (R5): V, C from `emb.weight`; H, N from
    `blocks.0.att.r_k`; L from the largest block index; F from `ffn.key.weight` rows; LoRA ranks
    from the columns of w1/a1/g1 and of v1 in layer 1 (layer 0's v1 is unused, §1.3);
    DeepEmbed rank D from `ffn.s1` columns. (1, 1, C) vectors may also be stored squeezed as (C,).
    Layer-0 v0/v1/v2 may be present or absent. `source` (e.g. the file name) goes in the message.
    """
    source = source or "the checkpoint"
    shapes = {k: tuple(v.shape) for k, v in weights.items()}    # anything with .shape will do
    emb, r_k = shapes.get("emb.weight"), shapes.get("blocks.0.att.r_k")
    if emb is None or len(emb) != 2 or r_k is None or len(r_k) != 2:
        raise CheckpointError(f"{source} is not an RWKV-7 x070 model: its size is read from "
                              f"emb.weight (V, C) and blocks.0.att.r_k (H, N), which are "
                              f"{emb} and {r_k}; use an official RWKV-7 checkpoint")
    (V, C), (H, N) = emb, r_k
    if H * N != C:
        raise CheckpointError(f"{source} is inconsistent: blocks.0.att.r_k is ({H}, {N}) but "
                              f"emb.weight has C = {C} != {H} x {N}; the file is damaged or not RWKV-7")
    L = 1 + max((int(m.group(1)) for k in shapes if (m := _BLOCK_KEY.match(k))), default=0)

    def dim(key, axis):   # a size read from another tensor; None (any size) if that one is bad
        shape = shapes.get(key)
        return shape[axis] if shape is not None and len(shape) == 2 else None

    F = dim("blocks.0.ffn.key.weight", 0)
    Dw, Da, Dg = dim("blocks.0.att.w1", 1), dim("blocks.0.att.a1", 1), dim("blocks.0.att.g1", 1)
    Dv = dim("blocks.1.att.v1" if L > 1 else "blocks.0.att.v1", 1)
    deep = "blocks.0.ffn.s_emb.weight" in shapes
    D = dim("blocks.0.ffn.s1", 1) if deep else None

    vec = lambda n: [(1, 1, n), (n,)]    # stored (1, 1, n); accepted squeezed too
    expected = {"emb.weight": [(V, C)], "blocks.0.ln0.weight": [(C,)], "blocks.0.ln0.bias": [(C,)],
                "ln_out.weight": [(C,)], "ln_out.bias": [(C,)], "head.weight": [(V, C)]}
    for i in range(L):
        b = f"blocks.{i}."
        for name in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.ln_x.weight",
                     "att.ln_x.bias"):
            expected[b + name] = [(C,)]
        for name in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g", "w0", "a0", "v0", "k_k", "k_a"):
            expected[b + "att." + name] = vec(C)
        for name, rank in (("w", Dw), ("a", Da), ("v", Dv), ("g", Dg)):
            expected[b + f"att.{name}1"] = [(C, rank)]
            expected[b + f"att.{name}2"] = [(rank, C)]
        expected[b + "att.r_k"] = [(H, N)]
        for name in ("receptance", "key", "value", "output"):
            expected[b + f"att.{name}.weight"] = [(C, C)]
        expected[b + "ffn.x_k"] = vec(C)
        expected[b + "ffn.key.weight"] = [(F, C)]
        expected[b + "ffn.value.weight"] = [(C, F)]
        if deep:   # rwkv7.md §5.2: s_emb rows are D x D matrices, flattened
            DD = D * D if D is not None else None
            expected.update({b + "ffn.s_emb.weight": [(V, DD)], b + "ffn.s_emb_x.weight": [(DD, C)],
                             b + "ffn.s1": [(C, D)], b + "ffn.s2": [(D, F)], b + "ffn.s0": vec(F)})
    optional = {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}   # unused in layer 0

    def fits(got, allowed):
        return any(len(got) == len(e) and all(x is None or x == g for x, g in zip(e, got))
                   for e in allowed)

    missing = [k for k in expected if k not in shapes and k not in optional]
    wrong = [f"{k} {shapes[k]} (expected {' or '.join(map(str, expected[k]))})"
             for k in expected if k in shapes and not fits(shapes[k], expected[k])]
    unexpected = [k for k in shapes if k not in expected]
    if missing or wrong or unexpected:
        def listing(title, items):
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            return f"{len(items)} {title}: {', '.join(items[:5])}{more}" if items else None
        problems = "; ".join(filter(None, [listing("missing", missing),
                                           listing("with the wrong shape", wrong),
                                           listing("unexpected", unexpected)]))
        variant = "x070-deepembed" if deep else "x070"
        sizes = f"L={L}, C={C}, H={H}, N={N}, V={V}, F={F}, Dw/Da/Dv/Dg={Dw}/{Da}/{Dv}/{Dg}"
        raise CheckpointError(f"{source} does not have the keys of an RWKV-7 {variant} model "
                              f"({sizes}): {problems}. The file is damaged or a different variant; "
                              "use an official checkpoint (key names: rwkv7.md §1.1)")


# ----------------------------------------------------------------------------------------------
# Writing safetensors
# ----------------------------------------------------------------------------------------------

_SAFETENSORS_CODES = {np.dtype("<f4"): "F32", np.dtype("<f2"): "F16", np.dtype("<f8"): "F64",
                      np.dtype("<i8"): "I64", np.dtype("<i4"): "I32", np.dtype("<i2"): "I16",
                      np.dtype("i1"): "I8", np.dtype("u1"): "U8", np.dtype("?"): "BOOL"}


def save_safetensors(path, tensors, metadata=None, bf16_keys=()):
    """Write {name: array} as a .safetensors file that `safetensors` and `read_checkpoint` read back.

    Arrays are stored in their own dtype (float32/16/64, int64/32/16/8, uint8, bool); the keys in
    `bf16_keys` (floating arrays) are stored as BF16, rounded to nearest even (`to_bf16_bits`).
    Pass `bf16_keys=tensors.keys()` to store everything as bf16, like a released .pth.
    `metadata`: optional {str: str}, stored as "__metadata__".
    Layout: header JSON with sorted keys, padded with spaces so the data starts 8-byte aligned;
    data ordered by itemsize (largest first), then key, so every tensor stays aligned.
    """
    bf16_keys = set(bf16_keys)
    if bf16_keys - set(tensors):
        raise ValueError(f"bf16_keys not in tensors: {sorted(bf16_keys - set(tensors))[:5]}")
    if metadata is not None and not all(isinstance(k, str) and isinstance(v, str)
                                        for k, v in metadata.items()):
        raise ValueError("safetensors metadata must map str to str")
    blobs = {}
    for name, value in tensors.items():
        if not isinstance(name, str) or name == "__metadata__":
            raise ValueError(f"invalid tensor name {name!r}")
        arr = np.asarray(value)
        if name in bf16_keys:
            if arr.dtype.kind != "f":
                raise ValueError(f"{name!r} is {arr.dtype}; only floating arrays can be stored as bf16")
            blobs[name] = ("BF16", to_bf16_bits(arr))
            continue
        little = arr.dtype.newbyteorder("<") if arr.dtype.itemsize > 1 else arr.dtype
        code = _SAFETENSORS_CODES.get(little)
        if code is None:
            raise ValueError(f"{name!r} has dtype {arr.dtype}, which save_safetensors does not write")
        blobs[name] = (code, np.asarray(arr, dtype=little, order="C"))  # (ascontiguousarray makes 0-d 1-d)

    order = sorted(blobs, key=lambda k: (-blobs[k][1].dtype.itemsize, k))
    header, offset = {}, 0
    for name in order:
        code, data = blobs[name]
        header[name] = {"dtype": code, "shape": list(data.shape),
                        "data_offsets": [offset, offset + data.nbytes]}
        offset += data.nbytes
    if metadata:
        header["__metadata__"] = dict(metadata)
    text = json.dumps(header, sort_keys=True, separators=(",", ":")).encode("utf-8")
    text += b" " * (-(8 + len(text)) % 8)
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", len(text)))
        f.write(text)
        for name in order:
            f.write(blobs[name][1].reshape(-1).view(np.uint8).data)    # no extra copy
