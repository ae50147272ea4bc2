"""The official `.pth` container (torch's zip format) read without torch, through a pickle
interpreter that never runs code from the file (formats/pickle_reader.py).

    .pth    a ZIP archive, every member stored uncompressed under one folder <prefix>/:
              <prefix>/data.pkl     a pickle (protocol 2) of {name: tensor}; each tensor is
                                    _rebuild_tensor_v2(storage, offset, size, stride, ...)
              <prefix>/data/<key>   one raw storage per key, numel * itemsize bytes
              <prefix>/byteorder    "little" (absent in old files -> little)
            The data of each member starts 64-byte aligned at
            local_header_offset + 30 + filename_len + extra_len, so it can be memory-mapped
            (docs/formats.md §1).

Reading one is three steps, each bounded before the next looks at anything:
  1. the zip: data.pkl read through a bounded read (at most Limits.pickle_bytes, whatever its
     header declares), byteorder likewise;
  2. the pickle, interpreted (pickle_reader.read_pickle): plain values, and a TensorRef per tensor;
  3. the tensors: the state dict chosen (the top object, or the one dict of tensors one level
     down: `_state_dict_of`), then every tensor view checked against its storage (`_check_view`),
     every storage against its zip member (`_member_region`), all before any tensor byte is read.
"""

from __future__ import annotations

import math
import struct
import zipfile

from ..errors import SUPPORTED_FORMATS, CheckpointError, corrupt
from .container import Plan, Region, TensorPlan
from .pickle_reader import (LIMITS, TORCH_STORAGES, OrderedDictValue, TensorRef, describe,
                            pickle_too_large, printable, read_pickle)
from .pth_writer import save_pth, write_pth   # the writers, without torch (formats/pth_writer.py)

__all__ = ["plan_pth", "TORCH_STORAGES", "save_pth", "write_pth"]

# One local file header is 30 bytes: signature, 5 two-byte fields (version, flags, method, time,
# date), crc, compressed size, uncompressed size, then name length and extra-field length.
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")

# Deflate emits at most 258 bytes per 2 bits of input (a length-258 match, the shortest code),
# so no deflated member inflates more than ~1032x; a header that says more is lying, and
# believing it would make us allocate what the file cannot hold (a zip bomb).
_DEFLATE_MAX_RATIO = 1032

# Deflated storages together may inflate at most 64:1, plus 64 MiB: trained weights compress
# less than 2:1 (bf16 ~1.2:1), and only all-zero tensors compress more (~1030:1), which in a model
# are a few small ones (biases, layer-0 stand-ins: the 64 MiB). So a 1 MB zip asks for at most
# ~130 MB, not the ~1 GB deflate's own limit would allow.
_MAX_INFLATION = 64
_INFLATION_ALLOWANCE = 64 * 2**20

# Keys under which training scripts put the model's state dict next to other entries
# ({"model": ..., "optimizer": ..., "epoch": ...}; Lightning: "state_dict"). When several dicts of
# tensors sit at the top ("model" and "ema"), the one of these names is taken.
_MODEL_KEYS = ("model", "state_dict")

# The tensors of a state dict may share storages (tied embeddings: two views of one storage), but
# their elements add up to about the stored elements. A file whose views add up to more than 4x
# its storages would make us allocate far more than it holds (many views of one storage, each
# converted to its own array): refused.
_MAX_VIEW_REUSE = 4


def plan_pth(path, size):
    """The Plan of a torch zip checkpoint: its state dict's tensors, each located in the file."""
    try:
        with zipfile.ZipFile(path) as zf:
            infos = {info.filename: info for info in zf.infolist()}
            prefix = _pickle_prefix(path, infos)
            pickle_bytes = _read_bounded(zf, infos[prefix + "data.pkl"], path)
            big_endian = _is_big_endian(zf, infos.get(prefix + "byteorder"), path)
    except CheckpointError:
        raise
    except Exception as e:          # BadZipFile, EOFError, struct.error, OSError, zlib.error, ...
        raise corrupt(path, f"the zip structure cannot be read ({type(e).__name__}: "
                            f"{printable(str(e))})") from e

    unpickled = read_pickle(pickle_bytes, path)
    state, inner_key = _state_dict_of(unpickled.top, path)
    for name, t in state.items():
        _check_view(path, f"tensor {printable(name)!r}", t)
    for t in unpickled.tensors:                 # the rest (e.g. optimizer state): same rules
        _check_view(path, "a tensor in data.pkl", t)
    _check_view_reuse(path, state)
    try:
        tensors, regions = _locate_tensors(path, size, state, infos, prefix)
    except CheckpointError:
        raise
    except (OSError, ValueError, struct.error) as e:      # e.g. a nonsense header offset
        raise corrupt(path, f"a zip member cannot be located ({type(e).__name__})") from e
    shown_key = None if inner_key is None else printable(inner_key, 60)
    return Plan(path, tensors, regions, big_endian, inner_key=shown_key)


# ---- the zip ----

def _pickle_prefix(path, infos):
    """The folder "<prefix>/" of the one data.pkl (or "" at the top level)."""
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
        shown = ", ".join(printable(n, 60) for n in pkl_names[:3])
        raise CheckpointError(f"{path} holds several pickles ({shown}); expected one torch "
                              "checkpoint per file")
    return pkl_names[0][: -len("data.pkl")]


def _read_bounded(zf, info, path, limit=LIMITS.pickle_bytes, piece=2**20):
    """Member `info`'s bytes, at most `limit`: its declared size is checked, and then not trusted.
    Read a piece at a time (zipfile inflates as much as each read asks for), so a member that
    inflates beyond what it declares costs one piece before zipfile stops at the declared size
    and its CRC check fails."""
    if info.file_size > limit:
        raise pickle_too_large(path, info.file_size, LIMITS)
    pieces, total = [], 0
    with zf.open(info) as member:
        while chunk := member.read(piece):      # to the end, where the CRC is checked
            pieces.append(chunk)
            total += len(chunk)
            if total > limit:
                raise pickle_too_large(path, total, LIMITS)
    return b"".join(pieces)


def _is_big_endian(zf, info, path):
    if info is None:
        return False                            # files from before torch 1.7 are little-endian
    with zf.open(info) as member:
        order = member.read(16).decode("ascii", "replace").strip()
    if order not in ("little", "big"):
        raise corrupt(path, f"its byteorder member says {printable(order, 16)!r}")
    return order == "big"


# ---- the state dict ----

def _is_state_dict(obj):
    return (type(obj) in (dict, OrderedDictValue) and len(obj) > 0
            and all(type(k) is str and type(v) is TensorRef for k, v in obj.items()))


def _state_dict_of(top, path):
    """(the {name: tensor} dict in the pickle, the key it was found under or None): the top object
    itself, or the one dict of tensors one level down (training checkpoints:
    {"model": ..., "optimizer": ..., "epoch": ...}; the other entries are ignored). Several
    candidates: the one named in _MODEL_KEYS, else an error naming them."""
    if _is_state_dict(top):
        return top, None
    if type(top) not in (dict, OrderedDictValue):
        raise CheckpointError(f"{path} holds {describe(top)}, not a state dict of name -> "
                              "tensor; save model.state_dict() with torch.save")
    verdicts = {}                  # id(value) -> _is_state_dict(value): a value may recur
    candidates = []
    for key, value in top.items():
        if id(value) not in verdicts:
            verdicts[id(value)] = _is_state_dict(value)
        if verdicts[id(value)] and type(key) is str:
            candidates.append(key)
    if len(candidates) == 1:
        return top[candidates[0]], candidates[0]
    named = [key for key in candidates if key in _MODEL_KEYS]
    if len(named) == 1:
        return top[named[0]], named[0]
    if candidates:
        raise CheckpointError(
            f"{path} holds several dicts of tensors ({_names(candidates)}) and none is named "
            f"{' or '.join(map(repr, _MODEL_KEYS))}, so which one is the model is unclear; save "
            "the one you want alone with torch.save")
    raise CheckpointError(
        f"{path} holds a dict ({len(top):,} entries: {_names(list(top))}) that is not a state "
        "dict of name -> tensor, and none of its entries is one; save model.state_dict() with "
        "torch.save")


def _names(keys, shown=6):
    """The first keys of a dict, for a message: short and printable whatever the file holds."""
    parts = [repr(printable(k, 40)) if type(k) is str else describe(k) for k in keys[:shown]]
    return ", ".join(parts) + (", ..." if len(keys) > shown else "")


# ---- the tensors ----

def _check_view(path, label, t):
    """A tensor record (ints and tuples of ints: pickle_reader typed them) must be a view that
    stays inside its storage and has no more elements than it: no negative size, stride or
    offset, no element outside, no view that repeats stored elements to grow (a stride-0 view of
    one element declared 2^28 long would make a 387-byte file fill 1 GiB when read)."""
    shape, stride, offset, numel = t.shape, t.stride, t.offset, t.storage.numel
    where = f"(offset {_count(offset)}, size {_dims(shape)}, stride {_dims(stride)})"
    if len(shape) != len(stride):
        raise corrupt(path, f"{label} has size {_dims(shape)} but stride {_dims(stride)}")
    if offset < 0 or any(n < 0 for n in shape) or any(s < 0 for s in stride):
        raise corrupt(path, f"{label} {where} has a negative offset, size or stride, which "
                            "torch never saves")
    elements = math.prod(shape)
    if elements == 0:
        last = offset - 1              # an empty tensor touches no element
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if last >= numel or offset > numel:
        raise corrupt(path, f"{label} {where} reaches outside its storage of {_count(numel)} "
                            "elements")
    if elements > numel:
        raise CheckpointError(
            f"{path}: {label} {where} has {_count(elements)} elements but its storage only "
            f"{_count(numel)}: a view that repeats stored elements (as .expand() makes), which "
            "tinyrwkv refuses because reading it takes more memory than the file holds; save "
            "tensor.contiguous() instead")


def _check_view_reuse(path, state):
    """The state dict's views must not add up to much more than the storages they view."""
    viewed = sum(math.prod(t.shape) for t in state.values())
    stored = sum({t.storage.key: t.storage.numel for t in state.values()}.values())
    if viewed > _MAX_VIEW_REUSE * stored:
        raise CheckpointError(
            f"{path}: its {len(state):,} tensors view their storages {viewed // stored:,} times "
            f"over ({_count(viewed)} elements from {_count(stored)} stored); a state dict views "
            "each stored element about once, and reading this one would take far more memory "
            "than the file holds; save each tensor with .clone() before torch.save")


def _count(n):
    """An integer from a file for a message: exact up to 10^15, else its size in powers of 2 (a
    product of 64 sizes can have thousands of digits)."""
    return f"{n:,}" if abs(n) < 10**15 else f"{'-' if n < 0 else ''}~2^{abs(n).bit_length() - 1}"


def _dims(values, shown=8):
    """A size or stride tuple for a message: at most `shown` entries."""
    parts = [_count(v) for v in values[:shown]] + (["..."] if len(values) > shown else [])
    return "(" + ", ".join(parts) + ("," if len(values) == 1 else "") + ")"


def _locate_tensors(path, size, state, infos, prefix):
    """(name -> TensorPlan, storage key -> Region) for the state dict, each storage's member
    checked (_member_region, _check_members)."""
    tensors, regions, used = {}, {}, []
    with open(path, "rb") as f:
        for name, t in state.items():
            storage = t.storage
            member = prefix + "data/" + storage.key
            dtype = TORCH_STORAGES[storage.element]
            if storage.key not in regions:
                info = infos.get(member)
                if info is None:
                    raise corrupt(path, f"tensor {printable(name)!r} uses storage "
                                        f"{printable(member)!r}, which is not in the archive")
                regions[storage.key] = _member_region(f, path, info, size)
                used.append(info)
            nbytes = storage.numel * dtype.itemsize
            if regions[storage.key].nbytes != nbytes:
                raise corrupt(path, f"storage {printable(member)!r} (tensor {printable(name)!r}) "
                                    f"has {regions[storage.key].nbytes:,} bytes, but the pickle "
                                    f"says {_count(storage.numel)} x {dtype.name} = "
                                    f"{_count(nbytes)} bytes")
            tensors[name] = TensorPlan(dtype, storage.key, t.offset, t.shape, t.stride)
    _check_members(path, size, used)
    return tensors, regions


def _check_members(path, size, used):
    """The storage members used must fit in the file side by side (a crafted zip directory can
    give many names to the same bytes, declaring far more tensor data than the file holds), and
    deflated ones may not inflate much more than weights do: so what a file makes us allocate
    is bounded by its size."""
    occupied = sum(info.compress_size for info in used)
    if occupied > size:
        raise corrupt(path, f"its storages take {occupied:,} bytes of a {size:,}-byte file: zip "
                            "members that overlap")
    deflated = [info for info in used if info.compress_type == zipfile.ZIP_DEFLATED]
    inflated = sum(info.file_size for info in deflated)
    compressed = sum(info.compress_size for info in deflated)
    if inflated > _MAX_INFLATION * compressed + _INFLATION_ALLOWANCE:
        raise CheckpointError(
            f"{path}: its deflated tensor data inflates {inflated // max(compressed, 1):,}:1 "
            f"({inflated:,} bytes from {compressed:,}); weights compress less than 2:1, so this "
            "is a zip bomb or a model of zeros. If it is yours, save it again with torch.save "
            "(which stores members uncompressed)")


def _member_region(f, path, info, size):
    """Where the bytes of zip member `info` are. For a stored (uncompressed) member that is
    local_header_offset + 30 + name_len + extra_len, with the lengths read from the *local*
    header (they differ from the central directory's: torch pads the local extra field to align
    the data to 64 bytes). A deflated member (a re-zipped file) is read later through zipfile:
    its declared size must be one deflate can produce from its compressed bytes."""
    name = printable(info.filename)
    if info.compress_type == zipfile.ZIP_DEFLATED:
        if info.file_size > _DEFLATE_MAX_RATIO * info.compress_size + 64 or \
                info.header_offset + info.compress_size > size:
            raise corrupt(path, f"member {name!r} declares {info.file_size:,} bytes from "
                                f"{info.compress_size:,} compressed, more than deflate can "
                                "produce (a zip bomb, or a damaged zip directory)")
        return Region(nbytes=info.file_size, member=info.filename)
    if info.compress_type != zipfile.ZIP_STORED:
        raise CheckpointError(f"{path}: member {name!r} is compressed with zip method "
                              f"{info.compress_type}; tinyrwkv reads stored or deflated members "
                              "(torch.save writes stored ones): re-save the file with torch.save")
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise corrupt(path, f"the local header of {name!r} is cut off")
    signature, *_, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if signature != b"PK\x03\x04":
        raise corrupt(path, f"no local header where {name!r} should start")
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if info.compress_size != info.file_size or offset + info.file_size > size:
        raise corrupt(path, f"member {name!r} ends beyond the end of the file")
    return Region(nbytes=info.file_size, offset=offset)
