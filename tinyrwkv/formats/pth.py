"""The official `.pth` container (torch's zip format) read without torch, through a restricted
unpickler that never runs code from the file.

    .pth    a ZIP archive, every member stored uncompressed under one folder <prefix>/:
              <prefix>/data.pkl     a pickle (protocol 2) of {name: tensor}; each tensor is
                                    _rebuild_tensor_v2(storage, offset, size, stride, ...)
              <prefix>/data/<key>   one raw storage per key, numel * itemsize bytes
              <prefix>/byteorder    "little" (absent in old files -> little)
            The data of each member starts 64-byte aligned at
            local_header_offset + 30 + filename_len + extra_len, so it can be memory-mapped
            (docs/formats.md).

Why the unpickler is restricted: a `.pth` is a pickle, and unpickling can call any importable
function with any arguments (`os.system("...")` is two opcodes). Loading a downloaded `.pth` with
plain `pickle` (or `torch.load(weights_only=False)`) runs whatever its author wrote. A tensor
checkpoint needs exactly four kinds of globals: `collections.OrderedDict`,
`torch._utils._rebuild_tensor_v2` (and `_rebuild_parameter`), and the `torch.*Storage` classes.
`_RestrictedUnpickler` maps those names to harmless stand-ins defined here (torch is never
imported) and refuses every other global, so tinyrwkv never executes code from a checkpoint.
This is the allow-list idea of `torch.load(weights_only=True)`, without torch.
"""

from __future__ import annotations

import io
import pickle
import struct
import zipfile
from dataclasses import dataclass

from ..errors import SUPPORTED_FORMATS, CheckpointError, corrupt
from .container import Plan, Region, TensorPlan, check_view, is_count
from .numerics import BF16, BOOL, FP16, FP32, FP64, I8, I16, I32, I64, U8, DType

# torch storage class name -> element type (docs/formats.md).
TORCH_STORAGES = {
    "BFloat16Storage": BF16, "HalfStorage": FP16, "FloatStorage": FP32, "DoubleStorage": FP64,
    "LongStorage": I64, "IntStorage": I32, "ShortStorage": I16, "CharStorage": I8,
    "ByteStorage": U8, "BoolStorage": BOOL,
}

# One local file header is 30 bytes: signature, 5 two-byte fields (version, flags, method, time,
# date), crc, compressed size, uncompressed size, then name length and extra-field length.
_LOCAL_HEADER = struct.Struct("<4s5H3I2H")


def plan_pth(path, size):
    """The Plan of a torch zip checkpoint: its state dict's tensors, each located in the file."""
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
                    raise corrupt(path, f"its byteorder member says {order!r}")
                big_endian = order == "big"
    except CheckpointError:
        raise
    except Exception as e:          # BadZipFile, EOFError, struct.error, OSError, zlib.error, ...
        raise corrupt(path, f"the zip structure cannot be read ({type(e).__name__}: {e})") from e

    top = _RestrictedUnpickler(io.BytesIO(pickle_bytes), path).load_checked()
    state = _state_dict_of(top, path)

    # Locate every storage the tensors use, and check each view against its storage.
    try:
        tensors, regions = _locate_tensors(path, size, state, infos, prefix)
    except CheckpointError:
        raise
    except (OSError, ValueError, struct.error) as e:      # e.g. a nonsense header offset
        raise corrupt(path, f"a zip member cannot be located ({type(e).__name__}: {e})") from e
    return Plan(path, tensors, regions, big_endian)


def _locate_tensors(path, size, state, infos, prefix):
    tensors, regions = {}, {}
    with open(path, "rb") as f:
        for name, t in state.items():
            key = t.storage.key
            member = prefix + "data/" + key
            if key not in regions:
                info = infos.get(member)
                if info is None:
                    raise corrupt(path, f"tensor {name!r} uses storage {member!r}, which is not in "
                                        "the archive")
                regions[key] = _member_region(f, path, info, size)
            nbytes = t.storage.numel * t.storage.dtype.itemsize
            if regions[key].nbytes != nbytes:
                raise corrupt(path, f"storage {member!r} (tensor {name!r}) has "
                                    f"{regions[key].nbytes} bytes, but the pickle says "
                                    f"{t.storage.numel} x {t.storage.dtype.name} = {nbytes} bytes")
            check_view(path, name, t.offset, t.shape, t.stride, t.storage.numel)
            tensors[name] = TensorPlan(t.storage.dtype, key, t.offset, t.shape, t.stride)
    return tensors, regions


def _member_region(f, path, info, size):
    """Where the bytes of zip member `info` are. For a stored (uncompressed) member that is
    local_header_offset + 30 + name_len + extra_len, with the lengths read from the *local*
    header (they differ from the central directory's: torch pads the local extra field to align
    the data to 64 bytes)."""
    if info.compress_type != zipfile.ZIP_STORED:
        return Region(nbytes=info.file_size, member=info.filename)
    f.seek(info.header_offset)
    raw = f.read(_LOCAL_HEADER.size)
    if len(raw) != _LOCAL_HEADER.size:
        raise corrupt(path, f"the local header of {info.filename!r} is cut off")
    signature, *_, name_len, extra_len = _LOCAL_HEADER.unpack(raw)
    if signature != b"PK\x03\x04":
        raise corrupt(path, f"no local header where {info.filename!r} should start")
    offset = info.header_offset + _LOCAL_HEADER.size + name_len + extra_len
    if info.compress_size != info.file_size or offset + info.file_size > size:
        raise corrupt(path, f"member {info.filename!r} ends beyond the end of the file")
    return Region(nbytes=info.file_size, offset=offset)


@dataclass(frozen=True, slots=True)
class _StorageRef:
    """What a persistent id ('storage', <type>, key, location, numel) stands for."""
    dtype: DType
    key: str
    numel: int


@dataclass(frozen=True, slots=True)
class _TensorRef:
    """What `_rebuild_tensor_v2(storage, offset, size, stride, ...)` stands for."""
    storage: _StorageRef
    offset: int
    shape: tuple
    stride: tuple


class _RestrictedUnpickler(pickle.Unpickler):
    """A pickle reader that understands a tensor state dict and nothing else.

    `find_class` is the only way a pickle can reach a Python callable; it returns our stand-ins for
    the few names a state dict uses and refuses all others. The stand-ins only record numbers: no
    torch import, no file access, no code from the file.
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
        self.allowed.update({("torch", name): dtype for name, dtype in TORCH_STORAGES.items()})

    def find_class(self, module, name):
        stand_in = self.allowed.get((module, name))
        if stand_in is None and module == "torch" and name.endswith("Storage"):
            raise CheckpointError(f"{self.path} stores tensors as torch.{name}, an element type "
                                  f"tinyrwkv does not read (supported: {', '.join(TORCH_STORAGES)}); "
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
                and isinstance(pid[1], DType) and isinstance(pid[2], str) and is_count(pid[4])):
            raise corrupt(self.path, f"unexpected persistent id {str(pid)[:80]} in data.pkl "
                                     "(expected ('storage', <type>, key, location, numel))")
        return _StorageRef(dtype=pid[1], key=pid[2], numel=pid[4])

    def rebuild_tensor(self, storage, offset, shape, stride, *rest):
        # rest: requires_grad, backward_hooks[, metadata] -- irrelevant for inference
        ok = (isinstance(storage, _StorageRef) and is_count(offset)
              and isinstance(shape, tuple) and all(is_count(n) for n in shape)
              and isinstance(stride, tuple) and all(is_count(s) for s in stride))
        if not ok:
            raise corrupt(self.path, "a tensor in data.pkl has malformed storage/offset/size/stride")
        return _TensorRef(storage, offset, shape, stride)

    def rebuild_parameter(self, data, *rest):
        # nn.Parameter(data, requires_grad[, state]): for us, the same tensor.
        if not isinstance(data, _TensorRef):
            raise corrupt(self.path, "a parameter in data.pkl does not wrap a tensor")
        return data

    def load_checked(self):
        """`load()`, with every low-level failure turned into a CheckpointError."""
        try:
            return self.load()
        except CheckpointError:
            raise
        except RecursionError as e:
            raise corrupt(self.path, "data.pkl nests too deeply") from e
        except Exception as e:   # UnpicklingError, EOFError, TypeError, ... from garbage bytes
            raise corrupt(self.path, f"data.pkl is not a valid pickle ({type(e).__name__}: {e})") from e


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
