"""The pickle inside a `.pth` (data.pkl), read by a small interpreter of our own that can build
dicts, lists, tuples, numbers, strings and tensor records, and nothing else.

Why not `pickle.Unpickler` with an allow-list in `find_class` (what tinyrwkv did before, and what
issue 13 broke): the allow-list only guards which globals a file names. Every other opcode still
runs Python's own code on whatever is on the stack, and a crafted file steers that:

  * BUILD calls `__setstate__` (or sets attributes) on any object: a frozen, slotted dataclass
    still has `__setstate__`, so a file re-set a tensor's stride after it had been checked (a
    negative stride, then a segfault when the tensor was viewed) and rewrote the shared table of
    element types (every later load in the process returned garbage);
  * the objects are Python's: a 600-byte pickle builds a DAG of tuples whose hash or repr takes
    2^60 steps, an integer of a million digits, a dict keyed by anything.

Here every opcode is a few lines of ours (pickletools documents each one), so what a file can make
happen is exactly what these lines do:

  * globals (GLOBAL, STACK_GLOBAL) are names from a fixed list, pushed as `Global(name)`: no
    Python object of the list is ever on the stack, so nothing a file does can reach one;
  * REDUCE calls only our functions for those names (`_CALLS`), which check their arguments and
    return plain values or immutable records (`StorageRef`, `TensorRef`);
  * BUILD is accepted on an `OrderedDict` only (torch's `_metadata` of module versions, ignored);
  * instance-making opcodes (INST, OBJ, NEWOBJ, NEWOBJ_EX), extensions, out-of-band buffers and
    the text opcodes of protocol 0 are refused by name;
  * dict keys and set elements are atoms (str/bytes up to 1,024 characters, numbers, None) or
    tuples of up to 8 atoms, so hashing and comparing a key is cheap; nothing the file builds is
    ever printed or repr'd, only summaries ("a list of 3 items");
  * every opcode costs one step, and work proportional to a length costs that length: at most
    `Limits.steps` steps, so time and memory are bounded before anything is looked at;
  * the pickle itself is at most `Limits.pickle_bytes`, integers at most `Limits.int_bytes`.

The accepted subset is what `torch.load(weights_only=True)` reads for dense tensors and the plain
values around them: state dicts (with `_metadata`), nested training checkpoints with optimizer
state, torch.Size, dtypes, devices, sets, bytes. Tensor *values* are checked by the caller
(formats/pth.py) after the whole pickle is read: `read_pickle` returns every TensorRef it built.
"""

from __future__ import annotations

import struct
from dataclasses import dataclass
from types import MappingProxyType

from ..errors import CheckpointError, corrupt
from .numerics import BF16, BOOL, FP16, FP32, FP64, I8, I16, I32, I64, U8

# torch storage class name -> element type (docs/formats.md §1.2). A read-only mapping, and the
# pickle only ever sees the *names* (inside Global and StorageRef): the DType objects are looked up
# by formats/pth.py after reading, where no opcode can reach them.
TORCH_STORAGES = MappingProxyType({
    "BFloat16Storage": BF16, "HalfStorage": FP16, "FloatStorage": FP32, "DoubleStorage": FP64,
    "LongStorage": I64, "IntStorage": I32, "ShortStorage": I16, "CharStorage": I8,
    "ByteStorage": U8, "BoolStorage": BOOL,
})


@dataclass(frozen=True)
class Limits:
    """What data.pkl may make us build. Real files use a small part of each: measured on torch
    2.13 pickles of RWKV-7 key sets, a state dict takes ~32 steps and ~100 bytes per tensor and
    nests 3 MARKs deep; a {model, AdamW state, epoch} checkpoint ~125 steps and ~330 bytes per
    parameter, 6 MARKs deep."""
    # A 61-layer (14B-shaped) RWKV-7 has ~2,000 tensors: its state dict pickle is ~200 kB, with
    # AdamW state ~670 kB. 16 MiB is ~25x that, and bounds the strings a pickle can hold.
    pickle_bytes: int = 16 * 2**20
    # One step per opcode plus one per element of any length-proportional work. 2^20 steps is
    # ~32,000 tensors of a state dict, ~8,000 parameters with AdamW state (the 61-layer
    # checkpoint above takes 250,000); 0.5-0.9 s of pure Python on a busy 2-core machine; and the
    # objects built stay under ~128 bytes per step (measured worst: an empty set, 216 bytes,
    # every two steps), so ~130 MB at most.
    steps: int = 2**20
    # MARK nesting: a checkpoint with optimizer state nests 6 deep.
    mark_depth: int = 64
    # Bytes of one LONG1/LONG4 integer: sizes, counts and training steps fit in 8; a uint64 seed
    # needs 9 (sign byte). 16 leaves room and keeps every integer < 2^127.
    int_bytes: int = 16
    # Characters of a str/bytes used as a dict key or set element: tensor names are < 100. Keys
    # are hashed and compared on every insert; this keeps each comparison cheap.
    key_chars: int = 1024
    # Atoms in a tuple used as a key or set element.
    key_tuple: int = 8
    # Dimensions of a tensor (torch allows at most 64).
    ndim: int = 64


LIMITS = Limits()


# ---- what the interpreter builds besides plain values ----

@dataclass(frozen=True, slots=True)
class Global:
    """An allowed global, by its full name ("torch.FloatStorage"): what GLOBAL pushes."""
    name: str


@dataclass(frozen=True, slots=True)
class StorageRef:
    """A persistent id ('storage', torch.<element>Storage, key, location, numel)."""
    element: str           # the storage class name, a key of TORCH_STORAGES ("BFloat16Storage")
    key: str               # the zip member data/<key>
    numel: int             # elements (not bytes)


@dataclass(frozen=True, slots=True)
class TensorRef:
    """`_rebuild_tensor_v2(storage, offset, size, stride, ...)`: a strided view of a storage, all
    counts in elements. The fields are ints and tuples of ints, typed when built; their values
    are checked against the storage by formats/pth.py once the whole pickle is read."""
    storage: StorageRef
    offset: int
    shape: tuple
    stride: tuple


class OrderedDictValue(dict):
    """What `collections.OrderedDict()` builds: a dict (dicts keep insertion order) of its own
    type, so that BUILD can tell it from a plain dict."""
    __slots__ = ()


@dataclass
class Unpickled:
    top: object            # the pickled object
    tensors: list          # every TensorRef built, in order (those in optimizer state too)


def read_pickle(data, path, limits=LIMITS):
    """Interpret the pickle `data` (bytes); `path` names the file in errors. Raises
    CheckpointError for anything outside the accepted subset or beyond `limits`."""
    if len(data) > limits.pickle_bytes:
        raise pickle_too_large(path, len(data), limits)
    return _Machine(data, path, limits).run()


def pickle_too_large(path, nbytes, limits):
    return CheckpointError(
        f"refusing to load {path}: its data.pkl is {nbytes:,} bytes, more than the "
        f"{limits.pickle_bytes:,} tinyrwkv reads (a state dict's pickle takes ~100 bytes per "
        "tensor); if the file is yours, save the state dict alone with torch.save")


# ---- the allow-list ----

# Protocol 2 pickles written by Python 3 name builtins as "__builtin__" (fix_imports).
_MODULE_ALIASES = {"__builtin__": "builtins"}

# torch dtypes appear as values (tensor metadata, optimizer options): names only, never called.
_TORCH_DTYPES = (
    "float32 float float64 double float16 half bfloat16 complex32 chalf complex64 cfloat "
    "complex128 cdouble uint8 uint16 uint32 uint64 int8 int16 short int32 int int64 long bool "
    "float8_e4m3fn float8_e4m3fnuz float8_e5m2 float8_e5m2fnuz qint8 quint8 qint32 quint4x2"
).split()

_VALUES = frozenset(
    [f"torch.{name}" for name in TORCH_STORAGES]
    + [f"torch.{name}" for name in _TORCH_DTYPES]
    + ["torch.Tensor", "torch.nn.parameter.Parameter"])

# Tensor kinds torch.load(weights_only=True) also rebuilds and tinyrwkv does not read.
_OTHER_TENSORS = {
    "torch._utils._rebuild_qtensor": "quantized", "torch._utils._rebuild_sparse_tensor": "sparse",
    "torch.serialization._get_layout": "sparse",
    "torch._utils._rebuild_nested_tensor": "nested",
    "torch._utils._rebuild_meta_tensor_no_storage": "meta (data-less)",
    "torch._utils._rebuild_wrapper_subclass": "tensor-subclass",
    "torch._utils._rebuild_tensor_v3": "untyped-storage",
    "torch._utils._rebuild_tensor": "legacy", "torch.UntypedStorage": "untyped-storage",
    "torch._utils._rebuild_device_tensor_from_numpy": "numpy-backed",
    "torch._utils._rebuild_device_tensor_from_cpu_tensor": "device",
}


def _resolve_global(path, module, name):
    """The stand-in for global module.name, or the error that explains why there is none."""
    module = _MODULE_ALIASES.get(module, module)
    full = f"{module}.{name}"
    if full in _CALLS or full in _VALUES:
        return Global(full)
    if module == "torch" and name.endswith("Storage"):
        return CheckpointError(
            f"{path} stores tensors as torch.{printable(name)}, an element type tinyrwkv does "
            f"not read (supported: {', '.join(TORCH_STORAGES)}); convert the tensors to bf16, "
            "fp16 or fp32 and save again")
    if full in _OTHER_TENSORS:
        return CheckpointError(
            f"{path} holds a {_OTHER_TENSORS[full]} tensor (its pickle asks for {full}), which "
            "tinyrwkv does not read; save dense CPU tensors (.to_dense(), .dequantize(), "
            ".contiguous()) with torch.save")
    return CheckpointError(
        f"refusing to load {path}: its pickle asks for {printable(module)}.{printable(name)}, "
        "which a tensor checkpoint never needs; this file may be malicious (tinyrwkv never "
        "executes code from checkpoints). If you trust it, load it with torch and save its state "
        "dict alone with torch.save")


# ---- the functions REDUCE may call: (machine, args tuple) -> value ----

def _ordered_dict(m, args):
    m.expect(len(args) == 0, "collections.OrderedDict() takes no arguments here")
    return OrderedDictValue()


def _rebuild_tensor_v2(m, args):
    """(storage, offset, size, stride, requires_grad, backward_hooks[, metadata]) -> TensorRef.
    requires_grad, hooks and metadata do not matter for reading the values."""
    m.expect(len(args) in (6, 7), "a tensor record has the wrong number of fields")
    storage, offset, shape, stride = args[:4]
    ok = (type(storage) is StorageRef and type(offset) is int
          and type(shape) is tuple and type(stride) is tuple
          and len(shape) <= m.limits.ndim and len(stride) <= m.limits.ndim)
    m.expect(ok, "a tensor record has malformed storage/offset/size/stride")
    m.charge(len(shape) + len(stride))
    m.expect(all(type(n) is int for n in shape + stride),
             "a tensor record has a size or stride that is not a tuple of integers")
    tensor = TensorRef(storage, offset, shape, stride)
    m.tensors.append(tensor)
    return tensor


def _rebuild_parameter(m, args):
    """nn.Parameter(data, requires_grad, hooks[, state]): for reading, the tensor itself."""
    m.expect(len(args) in (3, 4) and type(args[0]) is TensorRef,
             "a parameter record does not wrap a tensor")
    return args[0]


def _rebuild_from_type_v2(m, args):
    """(rebuild function, torch.Tensor or Parameter, its args, attributes): a tensor that carried
    Python attributes when saved. The attributes are ignored."""
    ok = (len(args) == 4 and type(args[0]) is Global and args[0].name in _TENSOR_REBUILDS
          and type(args[1]) is Global
          and args[1].name in ("torch.Tensor", "torch.nn.parameter.Parameter")
          and type(args[2]) is tuple)
    m.expect(ok, "a tensor-with-attributes record is malformed")
    return _CALLS[args[0].name](m, args[2])


def _torch_size(m, args):
    m.expect(len(args) == 1 and type(args[0]) is tuple and len(args[0]) <= m.limits.ndim,
             "a torch.Size record is malformed")
    m.charge(len(args[0]))
    m.expect(all(type(n) is int for n in args[0]), "a torch.Size holds something not an integer")
    return args[0]                                   # a tuple: what _rebuild_tensor_v2 expects


def _torch_device(m, args):
    ok = (len(args) in (1, 2) and type(args[0]) is str and len(args[0]) <= 64
          and (len(args) == 1 or type(args[1]) is int))
    m.expect(ok, "a torch.device record is malformed")
    return args[0] if len(args) == 1 else f"{args[0]}:{args[1]}"


def _set_of(kind):
    def build(m, args):
        m.expect(len(args) <= 1 and all(type(a) is list for a in args),
                 f"a {kind.__name__} record is malformed")
        items = args[0] if args else []
        m.charge(len(items))
        for item in items:
            m.check_key(item, f"a {kind.__name__} element")
        return kind(items)
    return build


def _encode(m, args):
    """_codecs.encode(text, "latin1"): how protocol 2 pickles bytes."""
    ok = len(args) == 2 and type(args[0]) is str and args[1] in ("latin1", "latin-1")
    m.expect(ok, "a bytes record is malformed")
    m.charge(len(args[0]) // 64)                     # copying 64 bytes ~ one opcode's time
    try:
        return args[0].encode("latin-1")
    except UnicodeEncodeError:
        raise m.corrupt("holds a bytes record with characters outside latin-1") from None


def _bytearray(m, args):
    """bytearray(), bytearray(bytes) or bytearray(text, "latin-1"): read as immutable bytes."""
    if len(args) == 2:
        return _encode(m, args)
    m.expect(len(args) <= 1 and all(type(a) is bytes for a in args),
             "a bytearray record is malformed")
    return args[0] if args else b""


def _complex(m, args):
    m.expect(len(args) <= 2 and all(type(a) in (int, float) for a in args),
             "a complex number record is malformed")
    return complex(*args)


_TENSOR_REBUILDS = {
    "torch._utils._rebuild_tensor_v2": _rebuild_tensor_v2,
    "torch._utils._rebuild_parameter": _rebuild_parameter,
    "torch._utils._rebuild_parameter_with_state": _rebuild_parameter,
}

_CALLS = MappingProxyType({
    **_TENSOR_REBUILDS,
    "torch._tensor._rebuild_from_type_v2": _rebuild_from_type_v2,
    "collections.OrderedDict": _ordered_dict,
    "torch.Size": _torch_size,
    "torch.device": _torch_device,
    "builtins.set": _set_of(set),
    "builtins.frozenset": _set_of(frozenset),
    "builtins.bytearray": _bytearray,
    "builtins.complex": _complex,
    "_codecs.encode": _encode,
})


# ---- the interpreter ----

class _Machine:
    """One pickle being read: the stack, the MARK positions in it, the memo, and the step count.
    Each opcode is a method (`_OPCODES` maps its byte to it)."""

    def __init__(self, data, path, limits):
        self.data, self.path, self.limits = bytes(data), path, limits
        self.pos = 0                 # next byte of data
        self.stack = []
        self.marks = []              # stack lengths at each open MARK
        self.floor = 0               # the innermost one (0 outside any): values below are not ours
        self.memo = {}
        self.steps = 0
        self.tensors = []
        self.storages = {}           # key -> the first StorageRef seen for it
        self.result = None

    def run(self):
        opcodes, data, limit = _OPCODES, self.data, self.limits.steps
        while True:
            if self.pos >= len(data):
                raise self.corrupt("ends before its STOP opcode")
            code = data[self.pos]
            self.pos += 1
            self.steps += 1                      # charge(1), inlined: this loop is the hot path
            if self.steps > limit:
                self.charge(0)
            handler = opcodes.get(code)
            if handler is None:
                raise self.unsupported(code)
            if handler(self):                    # only STOP returns True
                return Unpickled(self.result, self.tensors)

    # -- errors --

    def corrupt(self, what):
        return corrupt(self.path, f"data.pkl {what} (byte {self.pos - 1})")

    def refuse(self, what):
        return CheckpointError(
            f"refusing to load {self.path}: its data.pkl {what} (byte {self.pos - 1}), which a "
            "torch checkpoint never does; the file may be malicious (tinyrwkv never executes "
            "code from checkpoints). If you trust it, load it with torch and save its state dict "
            "alone with torch.save")

    def expect(self, condition, what):
        if not condition:
            raise self.corrupt(what)

    def unsupported(self, code):
        import pickletools                     # only for the opcode's name, in this message
        names = {ord(op.code): op.name for op in pickletools.opcodes}
        if code not in names:
            return self.corrupt(f"has the byte 0x{code:02x} where an opcode should be")
        return self.refuse(f"uses the pickle opcode {names[code]}")

    def charge(self, n):
        """Count n steps of work against Limits.steps."""
        self.steps += n
        if self.steps > self.limits.steps:
            raise CheckpointError(
                f"refusing to load {self.path}: its data.pkl takes more than "
                f"{self.limits.steps:,} steps to read (a state dict takes ~25 per tensor), so it "
                "is not a model checkpoint, or holds far more than one model; save the state dict "
                "alone with torch.save")

    # -- reading the opcode stream --

    def take(self, n):
        if n > len(self.data) - self.pos:
            raise self.corrupt("ends inside an opcode's argument")
        chunk = self.data[self.pos: self.pos + n]
        self.pos += n
        return chunk

    def unpack(self, fmt):
        return struct.unpack(fmt, self.take(struct.calcsize(fmt)))[0]

    def line(self):
        """A newline-terminated argument (GLOBAL's module and name), at most 256 bytes."""
        end = self.data.find(b"\n", self.pos, self.pos + 257)
        if end < 0:
            raise self.corrupt("has a GLOBAL name that is not a short line")
        raw = self.data[self.pos: end]
        self.pos = end + 1
        try:
            return raw.decode("utf-8")
        except UnicodeDecodeError:
            raise self.corrupt("has a GLOBAL name that is not UTF-8") from None

    # -- the stack --

    def push(self, value):
        self.stack.append(value)

    def pop(self):
        if len(self.stack) <= self.floor:
            raise self.corrupt("takes a value from an empty stack")
        return self.stack.pop()

    def top(self):
        if len(self.stack) <= self.floor:
            raise self.corrupt("uses a value from an empty stack")
        return self.stack[-1]

    def pop_mark(self):
        if not self.marks:
            raise self.corrupt("closes a MARK it never opened")
        start = self.marks.pop()
        self.floor = self.marks[-1] if self.marks else 0
        items = self.stack[start:]
        del self.stack[start:]
        return items

    def check_key(self, key, role="a dict key"):
        """Keys and set elements are hashed and compared: atoms and short tuples of atoms only."""
        if type(key) is tuple and len(key) <= self.limits.key_tuple:
            if all(self.is_atom(k) for k in key):
                return
        elif self.is_atom(key):
            return
        raise self.refuse(f"uses {describe(key)} as {role}")

    def is_atom(self, x):
        kind = type(x)
        if kind is str or kind is bytes:
            return len(x) <= self.limits.key_chars
        return kind in (int, float, bool, complex, type(None))

    def target(self, kinds, opcode):
        """The container below the items an opcode adds, which must be of one of `kinds`."""
        container = self.top()
        if type(container) not in kinds:
            raise self.refuse(f"applies {opcode} to {describe(container)}")
        return container

    # -- opcodes: protocol, frames, marks --

    def op_proto(self):
        version = self.take(1)[0]
        self.expect(2 <= version <= 5, f"says pickle protocol {version}, not 2 to 5")

    def op_frame(self):
        self.take(8)               # a frame's length: only a hint for buffered readers

    def op_stop(self):
        self.result = self.pop()
        return True

    def op_mark(self):
        if len(self.marks) >= self.limits.mark_depth:
            raise self.refuse(f"nests more than {self.limits.mark_depth} MARKs deep")
        self.marks.append(len(self.stack))
        self.floor = len(self.stack)

    def op_pop(self):
        if len(self.stack) > self.floor:
            self.stack.pop()
        else:
            self.pop_mark()

    def op_pop_mark(self):
        self.pop_mark()

    def op_dup(self):
        self.push(self.top())

    # -- atoms --

    def op_none(self):
        self.push(None)

    def op_newtrue(self):
        self.push(True)

    def op_newfalse(self):
        self.push(False)

    def op_binint(self):
        self.push(self.unpack("<i"))

    def op_binint1(self):
        self.push(self.take(1)[0])

    def op_binint2(self):
        self.push(self.unpack("<H"))

    def op_long1(self):
        self.push_long(self.take(1)[0])

    def op_long4(self):
        self.push_long(self.unpack("<i"))

    def push_long(self, nbytes):
        self.expect(nbytes >= 0, "has an integer of negative length")
        if nbytes > self.limits.int_bytes:
            raise self.refuse(f"holds an integer of {nbytes:,} bytes (a checkpoint's integers "
                              f"fit in {self.limits.int_bytes})")
        self.push(int.from_bytes(self.take(nbytes), "little", signed=True))

    def op_binfloat(self):
        self.push(self.unpack(">d"))

    def push_text(self, nbytes):
        try:
            self.push(self.take(nbytes).decode("utf-8", "surrogatepass"))
        except UnicodeDecodeError:
            raise self.corrupt("has a string that is not UTF-8") from None

    def op_short_binunicode(self):
        self.push_text(self.take(1)[0])

    def op_binunicode(self):
        self.push_text(self.unpack("<I"))

    def op_binunicode8(self):
        self.push_text(self.unpack("<Q"))

    def push_ascii(self, nbytes):
        """Protocol-1 byte strings, decoded as Python 3's pickle does by default (ASCII)."""
        try:
            self.push(self.take(nbytes).decode("ascii"))
        except UnicodeDecodeError:
            raise self.corrupt("has a byte string that is not ASCII") from None

    def op_short_binstring(self):
        self.push_ascii(self.take(1)[0])

    def op_binstring(self):
        nbytes = self.unpack("<i")
        self.expect(nbytes >= 0, "has a string of negative length")
        self.push_ascii(nbytes)

    def op_short_binbytes(self):
        self.push(self.take(self.take(1)[0]))

    def op_binbytes(self):
        self.push(self.take(self.unpack("<I")))

    def op_binbytes8(self):
        self.push(self.take(self.unpack("<Q")))

    # -- containers --

    def op_empty_tuple(self):
        self.push(())

    def op_tuple(self):
        self.push(tuple(self.pop_mark()))

    def op_tuple1(self):
        self.push((self.pop(),))

    def op_tuple2(self):
        second = self.pop()
        self.push((self.pop(), second))

    def op_tuple3(self):
        third, second = self.pop(), self.pop()
        self.push((self.pop(), second, third))

    def op_empty_list(self):
        self.push([])

    def op_list(self):
        self.push(self.pop_mark())

    def op_append(self):
        item = self.pop()
        self.target((list,), "APPEND").append(item)

    def op_appends(self):
        items = self.pop_mark()
        self.target((list,), "APPENDS").extend(items)

    def op_empty_dict(self):
        self.push({})

    def op_dict(self):
        items = self.pop_mark()
        self.push({})
        self.set_items(items, "DICT")

    def op_setitem(self):
        value, key = self.pop(), self.pop()
        self.set_items([key, value], "SETITEM")

    def op_setitems(self):
        self.set_items(self.pop_mark(), "SETITEMS")

    def set_items(self, items, opcode):
        """items: [key, value, key, value, ...] into the dict on top of the stack."""
        self.expect(len(items) % 2 == 0, f"has a {opcode} with a key but no value")
        target = self.target((dict, OrderedDictValue), opcode)
        for i in range(0, len(items), 2):
            self.check_key(items[i])
            target[items[i]] = items[i + 1]

    def op_empty_set(self):
        self.push(set())

    def op_additems(self):
        items = self.pop_mark()
        target = self.target((set,), "ADDITEMS")
        for item in items:
            self.check_key(item, "a set element")
        target.update(items)

    def op_frozenset(self):
        items = self.pop_mark()
        for item in items:
            self.check_key(item, "a set element")
        self.push(frozenset(items))

    # -- the memo --

    def op_binput(self):
        self.memo[self.take(1)[0]] = self.top()

    def op_long_binput(self):
        self.memo[self.unpack("<I")] = self.top()

    def op_memoize(self):
        self.memo[len(self.memo)] = self.top()

    def memo_get(self, index):
        if index not in self.memo:
            raise self.corrupt(f"refers to memo entry {index}, which it never stored")
        self.push(self.memo[index])

    def op_binget(self):
        self.memo_get(self.take(1)[0])

    def op_long_binget(self):
        self.memo_get(self.unpack("<I"))

    # -- globals, calls, state, storages --

    def op_global(self):
        module = self.line()
        self.push_global(module, self.line())

    def op_stack_global(self):
        name, module = self.pop(), self.pop()
        if type(module) is not str or type(name) is not str or len(module) + len(name) > 256:
            raise self.corrupt("has a STACK_GLOBAL whose module or name is not a short string")
        self.push_global(module, name)

    def push_global(self, module, name):
        found = _resolve_global(self.path, module, name)
        if isinstance(found, Exception):
            raise found
        self.push(found)

    def op_reduce(self):
        args = self.pop()
        func = self.top()
        if type(func) is not Global or func.name not in _CALLS:
            raise self.refuse(f"calls {describe(func)}")
        if type(args) is not tuple:
            raise self.corrupt(f"calls {func.name} with {describe(args)} instead of a tuple")
        self.stack[-1] = _CALLS[func.name](self, args)

    def op_build(self):
        """BUILD sets an object's state. torch gives a state dict's OrderedDict one attribute,
        `_metadata` (module versions, not needed to read tensors): accepted and ignored. On
        anything else BUILD would change an object after it was checked: refused."""
        state = self.pop()
        inst = self.top()
        if type(inst) is OrderedDictValue and type(state) is dict:
            self.charge(len(state))
            if all(type(k) is str for k in state):
                return
        raise self.refuse(f"sets the state of {describe(inst)} to {describe(state)} (BUILD)")

    def op_binpersid(self):
        """A storage: ('storage', torch.<element>Storage, key, location, numel)."""
        pid = self.pop()
        ok = (type(pid) is tuple and len(pid) == 5 and type(pid[0]) is str
              and pid[0] == "storage" and type(pid[1]) is Global
              and pid[1].name.removeprefix("torch.") in TORCH_STORAGES
              and type(pid[2]) is str and len(pid[2]) <= self.limits.key_chars
              and type(pid[3]) is str and type(pid[4]) is int and pid[4] >= 0)
        if not ok:
            raise corrupt(self.path, f"unexpected persistent id {describe(pid)} in data.pkl "
                                     "(expected ('storage', <type>, key, location, numel))")
        storage = StorageRef(pid[1].name.removeprefix("torch."), pid[2], pid[4])
        first = self.storages.setdefault(storage.key, storage)
        if first != storage:
            raise self.corrupt(f"declares storage {printable(storage.key)!r} twice, as "
                               f"{first.numel:,} x {first.element} and {storage.numel:,} x "
                               f"{storage.element}")
        self.push(storage)


_OPCODES = {ord(code): handler for code, handler in {
    "\x80": _Machine.op_proto, "\x95": _Machine.op_frame, ".": _Machine.op_stop,
    "(": _Machine.op_mark, "0": _Machine.op_pop, "1": _Machine.op_pop_mark, "2": _Machine.op_dup,
    "N": _Machine.op_none, "\x88": _Machine.op_newtrue, "\x89": _Machine.op_newfalse,
    "J": _Machine.op_binint, "K": _Machine.op_binint1, "M": _Machine.op_binint2,
    "\x8a": _Machine.op_long1, "\x8b": _Machine.op_long4, "G": _Machine.op_binfloat,
    "\x8c": _Machine.op_short_binunicode, "X": _Machine.op_binunicode,
    "\x8d": _Machine.op_binunicode8, "U": _Machine.op_short_binstring,
    "T": _Machine.op_binstring, "C": _Machine.op_short_binbytes, "B": _Machine.op_binbytes,
    "\x8e": _Machine.op_binbytes8,
    ")": _Machine.op_empty_tuple, "t": _Machine.op_tuple, "\x85": _Machine.op_tuple1,
    "\x86": _Machine.op_tuple2, "\x87": _Machine.op_tuple3,
    "]": _Machine.op_empty_list, "l": _Machine.op_list, "a": _Machine.op_append,
    "e": _Machine.op_appends,
    "}": _Machine.op_empty_dict, "d": _Machine.op_dict, "s": _Machine.op_setitem,
    "u": _Machine.op_setitems,
    "\x8f": _Machine.op_empty_set, "\x90": _Machine.op_additems, "\x91": _Machine.op_frozenset,
    "q": _Machine.op_binput, "r": _Machine.op_long_binput, "\x94": _Machine.op_memoize,
    "h": _Machine.op_binget, "j": _Machine.op_long_binget,
    "c": _Machine.op_global, "\x93": _Machine.op_stack_global, "R": _Machine.op_reduce,
    "b": _Machine.op_build, "Q": _Machine.op_binpersid,
}.items()}


# ---- bounded descriptions (never repr() of something a file built) ----

def describe(value):
    """A short description of a value a file built, e.g. "a list of 3 items", "a tensor"."""
    kind = type(value)
    if kind in (list, tuple, set, frozenset, dict, OrderedDictValue):
        name = {list: "list", tuple: "tuple", set: "set", frozenset: "frozenset", dict: "dict",
                OrderedDictValue: "OrderedDict"}[kind]
        unit = "entries" if kind in (dict, OrderedDictValue) else "items"
        return f"a {name} of {len(value):,} {unit}"
    if kind is str or kind is bytes:
        return f"a {'string' if kind is str else 'bytes value'} of {len(value):,} characters"
    if kind is Global:
        return f"the global {value.name}"
    if kind is TensorRef:
        return "a tensor"
    if kind is StorageRef:
        return "a storage"
    if kind in (int, float, bool, complex, type(None)):
        return f"the {kind.__name__} {value!r}"[:80]           # an atom: bounded (int < 2^127)
    return f"a {kind.__name__}"


def printable(text, limit=100):
    """`text` (from a file) safe to put in a one-line message: cut to `limit` characters,
    control and other non-printable characters escaped."""
    cut = text[:limit]
    if not cut.isprintable():
        cut = cut.encode("unicode_escape").decode("ascii")
    return cut + ("..." if len(text) > limit else "")

