"""Hostile and ordinary .pth files (issue 13): crafted pickles never run code, never crash, hang,
balloon or poison the process, and every refusal is one clear line; the files torch writes for
a module's state dict or a training checkpoint read like torch.load(weights_only=True) reads them.

The crafted pickles are written opcode by opcode with the small builder below (pickletools
documents each opcode), inside a torch-style zip. Files written by torch itself need torch; those
tests skip without it.
"""
import os
import pickle
import struct
import subprocess
import sys
import time
import tracemalloc
import zipfile

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import CheckpointError
from tinyrwkv.cli import main
from tinyrwkv.formats import inspect_checkpoint, open_model, read_checkpoint
from tinyrwkv.formats import numerics
from tinyrwkv.synthetic import make_weights

IDS = np.arange(1, 9)

# Every hostile file must be refused (or read) within this time: the slowest pickle the limits
# admit (2^20 steps) takes ~1 s on a busy 2-core CI runner, and the crafted files here are a few
# hundred bytes (milliseconds); before the fix some took over 120 s (issue 13, item 4).
SECONDS = 2.0


# ---- a hand-written pickle builder: each function returns the opcodes of one value ----

def text(s):
    raw = s.encode()
    return b"X" + struct.pack("<I", len(raw)) + raw                    # BINUNICODE


def num(n):
    if -2**31 <= n < 2**31:
        return b"J" + struct.pack("<i", n)                            # BININT
    raw = n.to_bytes((n.bit_length() + 8) // 8, "little", signed=True)
    return b"\x8a" + bytes([len(raw)]) + raw                          # LONG1


def glob(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"    # GLOBAL


def tup(*items):
    return b"(" + b"".join(items) + b"t"                              # MARK ... TUPLE


def call(func, *args):
    return func + tup(*args) + b"R"                                   # REDUCE


def dict_of(entries):
    """A dict: entries is {key: opcodes of the value} (keys are strings)."""
    return b"}(" + b"".join(text(k) + v for k, v in entries.items()) + b"u"


def ordered_dict(entries=None, metadata=None):
    """collections.OrderedDict, as a module's state_dict() pickles: items, then BUILD with
    {"_metadata": ...} when metadata (opcodes) is given."""
    ops = call(glob("collections", "OrderedDict"))
    if entries:
        ops += b"(" + b"".join(text(k) + v for k, v in entries.items()) + b"u"
    if metadata is not None:
        ops += dict_of({"_metadata": metadata}) + b"b"
    return ops


def storage(key, numel, element="FloatStorage"):
    return tup(text("storage"), glob("torch", element), text(key), text("cpu"), num(numel)) + b"Q"


def tensor(key, numel, offset, size, stride, element="FloatStorage"):
    """_rebuild_tensor_v2(<storage>, offset, size, stride, False, OrderedDict()), as torch.save
    writes it (docs/formats.md §1.2)."""
    return call(glob("torch._utils", "_rebuild_tensor_v2"),
                storage(key, numel, element), num(offset),
                tup(*map(num, size)), tup(*map(num, stride)), b"\x89", ordered_dict())


def pickle_of(value):
    return b"\x80\x02" + value + b"."                                 # PROTO 2 ... STOP


def write_pth(path, pkl, storages, compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr("archive/data.pkl", pkl)
        zf.writestr("archive/byteorder", "little")
        for key, data in storages.items():
            zf.writestr(f"archive/data/{key}", data)
        zf.writestr("archive/version", "3\n")
    return path


def state_dict_pth(path, arrays, metadata=True):
    """A float32 state dict written by hand as torch.save writes module.state_dict(): an
    OrderedDict (with _metadata), one storage per tensor."""
    entries, storages = {}, {}
    for i, (name, a) in enumerate(arrays.items()):
        a = np.ascontiguousarray(a, np.float32)
        stride = tuple(s // 4 for s in a.strides)
        entries[name] = tensor(str(i), a.size, 0, a.shape, stride)
        storages[str(i)] = a.tobytes()
    meta = ordered_dict({"": dict_of({"version": num(1)})}) if metadata else None
    return write_pth(path, pickle_of(ordered_dict(entries, meta)), storages)


FOUR = np.arange(4, dtype="<f4").tobytes()            # the storage "0" of most crafted files
GOOD = {"w": tensor("0", 4, 0, (4,), (1,))}          # a valid state dict entry using it


def sd_pickle(entries):
    return pickle_of(dict_of(entries))


# ---- checking a refusal: one line, naming the file, within time and memory ----

def bounded(fn, seconds=SECONDS, peak=None):
    """fn()'s result or CheckpointError, asserting it took < seconds and, when peak is given,
    that tracemalloc saw at most `peak` bytes allocated at once (tracemalloc runs only then: it
    slows allocation-heavy code several times)."""
    if peak is not None:
        tracemalloc.start()
    start = time.perf_counter()
    try:
        result = fn()
    except CheckpointError as e:
        result = e
    finally:
        elapsed = time.perf_counter() - start
        if peak is not None:
            top = tracemalloc.get_traced_memory()[1]
            tracemalloc.stop()
    assert elapsed < seconds, f"took {elapsed:.1f} s"
    if peak is not None:
        assert top <= peak, f"peak {top / 2**20:.1f} MiB"
    return result


def peak_for(path):
    """The memory a crafted file may take: every file here is small; the interpreter builds at
    most ~128 bytes of objects per pickle byte (measured worst: ~110 B per step, an empty set
    every two steps, and every step takes at least a byte); plus 4 MiB for zipfile's buffers and
    modules imported on first use (pickletools, for an opcode's name)."""
    return 128 * path.stat().st_size + 4 * 2**20


def refused(path, *fragments):
    """read_checkpoint(path) must raise exactly CheckpointError: one line naming the file and each
    fragment, bounded in time and memory. Returns the message."""
    error = bounded(lambda: read_checkpoint(path), peak=peak_for(path))
    assert type(error) is CheckpointError, f"{path.name}: {error!r}"[:300]
    message = str(error)
    assert str(path) in message and "\n" not in message and len(message) < 1000, message
    for fragment in fragments:
        assert fragment in message, (path.name, message)
    return message


def write_cases(folder, cases):
    """cases: {name: pickle bytes or (pickle bytes, storages)} -> {name: path}."""
    paths = {}
    for name, case in cases.items():
        pkl, storages = case if isinstance(case, tuple) else (case, {"0": FOUR})
        paths[name] = write_pth(folder / f"{name}.pth", pkl, storages)
    return paths


# ---- code execution: each payload writes a marker file if it runs ----

class Payload:
    """Pickling this writes the opcodes that call func(*args) on unpickling."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def splice(obj, protocol=2):
    """The opcodes of obj's pickle, without PROTO and STOP (and FRAME), to put inside ours."""
    data = pickle.dumps(obj, protocol=protocol)
    body = data[2:-1]
    return body[9:] if body[:1] == b"\x95" else body


def class_with_new(code):
    """type("X", (object,), {"__new__": eval("lambda cls, *a, **k: exec(code)")}): a class whose
    instantiation (NEWOBJ, NEWOBJ_EX) runs code."""
    return call(glob("builtins", "type"), text("X"), tup(glob("builtins", "object")),
                dict_of({"__new__": call(glob("builtins", "eval"),
                                         text(f"lambda cls, *a, **k: exec({code!r})"))}))


def exec_payloads(folder):
    """name -> pickle bytes. Each runs under plain pickle and creates the file folder/<name>."""
    names = ["os_system", "posix_system", "eval", "exec", "builtin_eval", "getattr_import",
             "subprocess", "stack_global", "inst", "obj", "newobj", "newobj_ex", "pickle_loads",
             "in_optimizer", "in_tensor_record", "rebuild_from_type", "in_metadata"]
    code = {name: f"open({str(folder / name)!r}, 'w').close()" for name in names}
    shell = {name: f'"{sys.executable}" -c "{code[name]}"' for name in names}
    exec_ = glob("builtins", "exec")
    inner = pickle.dumps(Payload(eval, code["pickle_loads"]), protocol=2)
    return {
        "os_system": sd_pickle({"evil": call(glob("os", "system"), text(shell["os_system"])),
                                **GOOD}),
        "posix_system": sd_pickle({"evil": splice(Payload(os.system, shell["posix_system"])),
                                   **GOOD}),
        "eval": sd_pickle({"evil": call(glob("builtins", "eval"), text(code["eval"])), **GOOD}),
        "exec": sd_pickle({**GOOD, "evil": call(exec_, text(code["exec"]))}),
        "builtin_eval": sd_pickle({"evil": call(glob("__builtin__", "eval"),
                                                text(code["builtin_eval"]))}),
        # nested REDUCE: getattr(__import__("builtins"), "exec")(code)
        "getattr_import": sd_pickle({"evil": call(
            call(glob("builtins", "getattr"), call(glob("builtins", "__import__"),
                                                    text("builtins")), text("exec")),
            text(code["getattr_import"]))}),
        # protocol 4, as pickle writes it: FRAME, SHORT_BINUNICODE, MEMOIZE, STACK_GLOBAL
        "subprocess": pickle.dumps({"evil": Payload(subprocess.check_call, [
            sys.executable, "-c", code["subprocess"]])}, protocol=4),
        "stack_global": b"\x80\x04" + b"\x8c\x08builtins\x8c\x04exec\x93"
                        + tup(text(code["stack_global"])) + b"R.",
        "inst": pickle_of(b"(" + text(code["inst"]) + b"ibuiltins\nexec\n"),      # INST
        "obj": pickle_of(b"(" + exec_ + text(code["obj"]) + b"o"),                 # OBJ
        "newobj": pickle_of(class_with_new(code["newobj"]) + b")\x81"),           # NEWOBJ
        "newobj_ex": b"\x80\x04" + class_with_new(code["newobj_ex"]) + b")}\x92.",  # NEWOBJ_EX
        # an allowed global (_codecs.encode makes the bytes) feeding one that is not
        "pickle_loads": sd_pickle({"evil": call(glob("pickle", "loads"), call(
            glob("_codecs", "encode"), text(inner.decode("latin-1")), text("latin1")))}),
        # a valid model, and the payload in the optimizer state
        "in_optimizer": pickle_of(dict_of({"model": dict_of(GOOD), "optimizer": dict_of({
            "state": dict_of({"x": call(exec_, text(code["in_optimizer"]))})})})),
        "in_tensor_record": sd_pickle({"w": call(
            glob("torch._utils", "_rebuild_tensor_v2"), storage("0", 4), num(0), tup(num(4)),
            tup(num(1)), call(exec_, text(code["in_tensor_record"])), ordered_dict())}),
        # an allowed torch function calling what it is given: _rebuild_from_type_v2(exec, ...)
        "rebuild_from_type": sd_pickle({"w": call(
            glob("torch._tensor", "_rebuild_from_type_v2"), exec_, glob("torch", "Tensor"),
            tup(text(code["rebuild_from_type"])), dict_of({}))}),
        "in_metadata": pickle_of(ordered_dict(GOOD, call(exec_, text(code["in_metadata"])))),
    }


# Plain pickle as torch.load(weights_only=False) runs it, on every file in a folder: storage
# classes and tensor records stand for nothing here (importing torch for them takes seconds),
# everything else is Python's own (torch's _rebuild_from_type_v2 included).
PLAIN_PICKLE = """
import pathlib, pickle, sys
class Plain(pickle.Unpickler):
    def persistent_load(self, pid):
        return None
    def find_class(self, module, name):
        if module == "torch" or name in ("_rebuild_tensor_v2", "_rebuild_parameter"):
            return lambda *args: None
        return super().find_class(module, name)
for path in sorted(pathlib.Path(sys.argv[1]).iterdir()):
    try:
        Plain(open(path, "rb")).load()
    except Exception:
        pass
"""


def test_exec_payloads_are_real(tmp_path):
    """Positive control: plain pickle runs every payload (in a child process; each only creates a
    file in tmp_path). Without this the refusal test could pass with duds."""
    payloads = exec_payloads(tmp_path)
    folder = mkdir(tmp_path / "pickles")
    for name, pkl in payloads.items():
        (folder / name).write_bytes(pkl)
    subprocess.run([sys.executable, "-c", PLAIN_PICKLE, str(folder)], capture_output=True,
                   timeout=300)
    for name in payloads:
        if name == "rebuild_from_type" and importlib_missing("torch"):
            continue                     # plain pickle imports torch for that one
        assert (tmp_path / name).exists(), f"{name} did not run under plain pickle"


def importlib_missing(module):
    import importlib.util
    return importlib.util.find_spec(module) is None


EXEC_OFFENDING = {"os_system": "os.system", "posix_system": f"{os.system.__module__}.system",
                  "eval": "builtins.eval", "builtin_eval": "builtins.eval",
                  "getattr_import": "builtins.getattr", "subprocess": "subprocess.check_call",
                  "stack_global": "builtins.exec", "inst": "opcode INST", "obj": "builtins.exec",
                  "newobj": "builtins.type", "newobj_ex": "builtins.type",
                  "pickle_loads": "pickle.loads", "in_optimizer": "builtins.exec",
                  "in_tensor_record": "builtins.exec", "rebuild_from_type": "builtins.exec",
                  "in_metadata": "builtins.exec"}


@pytest.mark.parametrize("name", EXEC_OFFENDING)
def test_exec_payload_is_refused(tmp_path, name):
    markers = mkdir(tmp_path / "markers")
    path = write_cases(tmp_path, {name: exec_payloads(markers)[name]})[name]
    message = refused(path, "malicious")
    assert f" {EXEC_OFFENDING[name]}" in message, message
    for reader in (inspect_checkpoint, open_model, tinyrwkv.load):
        with pytest.raises(CheckpointError):
            reader(path)
    assert not any(markers.iterdir()), "the payload ran"


# ---- opcodes and calls outside the subset, on allowed globals (nothing to run, still refused) ----

OD = glob("collections", "OrderedDict")


def opcode_cases():
    return {
        "INST_allowed": pickle_of(b"(icollections\nOrderedDict\n"),
        "OBJ_allowed": pickle_of(b"(" + OD + b"o"),
        "NEWOBJ_allowed": pickle_of(OD + b")\x81"),
        "NEWOBJ_EX_allowed": b"\x80\x04" + OD + b")}\x92.",
        "EXT1": pickle_of(b"\x82\x01"), "EXT2": pickle_of(b"\x83\x01\x00"),
        "EXT4": pickle_of(b"\x84\x01\x00\x00\x00"),
        "PERSID": pickle_of(b"P0\n"), "GET": pickle_of(b"N0g0\n"), "PUT": pickle_of(b"Np0\n"),
        "INT": pickle_of(b"I1\n"), "LONG": pickle_of(b"L1L\n"), "FLOAT": pickle_of(b"F1.0\n"),
        "STRING": pickle_of(b"S'a'\n"), "UNICODE": pickle_of(b"Va\n"),
        "NEXT_BUFFER": b"\x80\x05\x97.", "READONLY_BUFFER": b"\x80\x05N\x98.",
        "BYTEARRAY8": b"\x80\x05\x96" + bytes(8) + b".",
        "not_an_opcode": pickle_of(b"\xff"),
        "reduce_dtype": sd_pickle({"w": call(glob("torch", "float32"), num(1))}),
        "reduce_storage_type": sd_pickle({"w": call(glob("torch", "FloatStorage"), num(4))}),
        "reduce_tensor": sd_pickle({"w": GOOD["w"] + tup() + b"R"}),
        "reduce_string": sd_pickle({"w": text("os.system") + tup() + b"R"}),
        "append_to_dict": pickle_of(b"}N" + b"a"),
        "append_to_tuple": pickle_of(b")N" + b"a"),
        "appends_to_tensor": sd_pickle({"w": GOOD["w"] + b"(Ne"}),
        "setitem_in_list": pickle_of(b"]" + text("k") + b"Ns"),
        "setitem_in_tensor": sd_pickle({"w": GOOD["w"] + text("stride") + tup(num(-1)) + b"s"}),
        "setitems_in_storage": sd_pickle({"w": storage("0", 4) + b"(" + text("numel") + num(9)
                                          + b"u"}),
        "additems_to_list": pickle_of(b"](Nu\x90"),
        "protocol_9": b"\x80\x09}.",
        "unknown_torch_global": sd_pickle({"w": glob("torch", "load")}),
        "torch_getattr": sd_pickle({"w": call(glob("torch._utils", "getattr"))}),
        "quantized": sd_pickle({"w": call(glob("torch._utils", "_rebuild_qtensor"))}),
        "complex_storage": sd_pickle({"w": tensor("0", 2, 0, (2,), (1,), "ComplexFloatStorage")}),
    }


OPCODE_EXPECTED = {"not_an_opcode": "0xff", "protocol_9": "protocol 9",
                   "quantized": "quantized tensor", "complex_storage": "ComplexFloatStorage",
                   "unknown_torch_global": "asks for torch.load,"}


@pytest.mark.parametrize("name", opcode_cases())
def test_opcode_outside_the_subset_is_refused(tmp_path, name):
    path = write_cases(tmp_path, {name: opcode_cases()[name]})[name]
    opcode = name.split("_allowed")[0]
    expected = OPCODE_EXPECTED.get(name, f"opcode {opcode}" if opcode.isupper() else "")
    assert expected in refused(path)


# ---- BUILD: refused on every stand-in, accepted only as torch's OrderedDict._metadata ----

def build_cases():
    evil_stride = dict_of({"stride": tup(num(-2**40))})
    slot_state = tup(b"N", evil_stride)                  # (None, slotstate): setattr in pickle
    storage_class = glob("torch", "FloatStorage")
    return {
        # what poisoned the process: the storage class stand-in was the shared DType object
        "storage_class": sd_pickle({"t": storage_class + dict_of({"numpy": text(">u2")}) + b"b",
                                    **GOOD}),
        "storage_class_fields": sd_pickle({"t": storage_class + tup(text("fp32"), text(">f4"))
                                           + b"b", **GOOD}),
        "storage_class_slots": sd_pickle({"t": storage_class + tup(b"N", dict_of({
            "name": text("fp16"), "numpy": text(">f2")})) + b"b", **GOOD}),
        "tensor": sd_pickle({"w": GOOD["w"] + evil_stride + b"b"}),
        "tensor_slots": sd_pickle({"w": GOOD["w"] + slot_state + b"b"}),
        "storage": sd_pickle({"w": call(glob("torch._utils", "_rebuild_tensor_v2"),
                                        storage("0", 4) + dict_of({"numel": num(2**40)}) + b"b",
                                        num(0), tup(num(4)), tup(num(1)), b"\x89",
                                        ordered_dict())}),
        # the segfault of issue 13: all four fields re-set after the record was checked
        "tensor_fields": sd_pickle({"w": GOOD["w"] + tup(storage("0", 4), num(3), tup(num(4)),
                                                          tup(num(-2**40))) + b"b"}),
        "parameter": sd_pickle({"w": call(glob("torch._utils", "_rebuild_parameter"),
                                          GOOD["w"], b"\x89", ordered_dict())
                                + evil_stride + b"b"}),
        "dtype": sd_pickle({"t": glob("torch", "float32") + dict_of({"x": num(1)}) + b"b",
                            **GOOD}),
        "rebuild_function": sd_pickle({"t": glob("torch._utils", "_rebuild_tensor_v2")
                                       + dict_of({"x": num(1)}) + b"b", **GOOD}),
        "plain_dict": pickle_of(dict_of(GOOD) + dict_of({"_metadata": dict_of({})}) + b"b"),
        "list": sd_pickle({"t": b"]" + dict_of({"x": num(1)}) + b"b", **GOOD}),
        "ordered_dict_list_state": pickle_of(ordered_dict(GOOD) + b"]b"),
        "ordered_dict_slot_state": pickle_of(ordered_dict(GOOD) + tup(b"N", dict_of({
            "x": num(1)})) + b"b"),
        "ordered_dict_int_keys": pickle_of(ordered_dict(GOOD) + b"}" + num(1) + num(2) + b"sb"),
    }


@pytest.mark.parametrize("name", build_cases())
def test_build_is_refused(tmp_path, name):
    path = write_cases(tmp_path, {name: build_cases()[name]})[name]
    assert "(BUILD)" in refused(path)


def element_types():
    return {name: (t.name, t.numpy) for name, t in vars(numerics).items()
            if isinstance(t, numerics.DType)}


def test_process_is_not_poisoned(tmp_path):
    """Read a good model, then each hostile file of this module (the ones that change objects
    first), each followed by the good model again: the same tensors bit for bit, the element types
    intact; and at the end the same logits. Whatever a hostile read raises is beside the point
    here (the other tests check the messages)."""
    good = state_dict_pth(tmp_path / "good.pth", make_weights(2, 64, 97, head_size=32, seed=5),
                          metadata=False)
    before, types = read_checkpoint(good), element_types()
    logits = tinyrwkv.load(good, backend="numpy").forward(IDS)[0]
    hostile = {**build_cases(), **view_cases(), **value_cases(), **opcode_cases(),
               **exec_payloads(mkdir(tmp_path / "markers")), **structure_cases()}
    for name, path in write_cases(mkdir(tmp_path / "hostile"), hostile).items():
        try:
            read_checkpoint(path)
        except Exception:
            pass
        after = read_checkpoint(good)
        assert element_types() == types, f"{name} changed the element types"
        assert list(after) == list(before) and all(
            after[k].dtype == before[k].dtype and np.array_equal(after[k], before[k])
            for k in before), f"after {name}, the good model reads differently"
    assert np.array_equal(tinyrwkv.load(good, backend="numpy").forward(IDS)[0], logits)
    assert not any((tmp_path / "markers").iterdir()), "a payload ran"


def mkdir(path):
    path.mkdir(exist_ok=True)
    return path


# ---- tensor views: every field checked against the storage, after the whole pickle ----

def view_cases():
    def t(offset=0, size=(4,), stride=(1,), numel=4):
        return sd_pickle({"w": tensor("0", numel, offset, size, stride)})
    return {
        "negative_stride": t(offset=3, stride=(-1,)),
        "huge_negative_stride": t(stride=(-2**40,)),
        "huge_stride": t(stride=(2**100,)),
        "negative_size": t(size=(-4,)),
        "negative_offset": t(offset=-1),
        "huge_offset": t(offset=2**62),
        "outside": t(offset=2, size=(3,)),
        "ndim_mismatch": t(size=(2, 2)),
        "too_many_dims": t(size=(1,) * 65, stride=(1,) * 65),
        # 387 bytes that would fill 1 GiB when read: one element repeated 2^28 times
        "stride_0_amplification": t(size=(2**28,), stride=(0,), numel=1),
        "negative_numel": sd_pickle({"w": tensor("0", -4, 0, (4,), (1,))}),
        "numel_larger_than_member": t(size=(2**30,), numel=2**30),
        "views_reused": (sd_pickle({f"w{i}": tensor("0", 4, 0, (4,), (1,)) for i in range(8)}),
                         {"0": FOUR}),
        "storage_declared_twice": sd_pickle({"a": tensor("0", 4, 0, (4,), (1,)),
                                             "b": tensor("0", 2, 0, (2,), (1,), "DoubleStorage")}),
        # BUILD after the check (the segfault of issue 13) is in build_cases
    }


def value_cases():
    """Wrong types where numbers belong: raw TypeError/ValueError/AttributeError before."""
    rebuild = glob("torch._utils", "_rebuild_tensor_v2")

    def rec(*fields):
        return sd_pickle({"w": call(rebuild, *fields)})
    st, hooks = storage("0", 4), ordered_dict()
    return {
        "shape_none": rec(st, num(0), b"N", tup(num(1)), b"\x89", hooks),
        "shape_string": rec(st, num(0), text("abcd"), tup(num(1)), b"\x89", hooks),
        "shape_list": rec(st, num(0), b"](" + num(4) + b"e", tup(num(1)), b"\x89", hooks),
        "shape_float": rec(st, num(0), tup(b"G" + struct.pack(">d", 4.0)), tup(num(1)),
                           b"\x89", hooks),
        "stride_bool": rec(st, num(0), tup(num(4)), tup(b"\x88"), b"\x89", hooks),
        "stride_string": rec(st, num(0), tup(num(4)), tup(text("1")), b"\x89", hooks),
        "offset_float": rec(st, b"G" + struct.pack(">d", 0.5), tup(num(4)), tup(num(1)),
                            b"\x89", hooks),
        "storage_int": rec(num(5), num(0), tup(num(4)), tup(num(1)), b"\x89", hooks),
        "storage_tensor": rec(GOOD["w"], num(0), tup(num(4)), tup(num(1)), b"\x89", hooks),
        "too_few_fields": rec(st, num(0), tup(num(4))),
        "parameter_of_int": sd_pickle({"w": call(glob("torch._utils", "_rebuild_parameter"),
                                                 num(1), b"\x89", hooks)}),
        "size_of_strings": sd_pickle({"w": call(glob("torch", "Size"), tup(text("a")))}),
        "device_of_list": sd_pickle({"d": call(glob("torch", "device"), b"]"), **GOOD}),
        "persistent_id_short": sd_pickle({"w": tup(text("storage")) + b"Q"}),
        "persistent_id_int": sd_pickle({"w": num(7) + b"Q"}),
        "key_not_a_string": pickle_of(b"}" + num(1) + GOOD["w"] + b"s"),
        "ordered_dict_with_args": pickle_of(call(OD, b"]")),
    }


VIEW_EXPECTED = {"negative_stride": "negative", "huge_negative_stride": "negative",
                 "stride_0_amplification": "repeats stored elements",
                 "views_reused": "times over", "storage_declared_twice": "twice",
                 "too_many_dims": "malformed", "numel_larger_than_member": "but the pickle says",
                 "outside": "reaches outside its storage", "persistent_id_short": "persistent id",
                 "huge_stride": "outside", "ordered_dict_with_args": "no arguments"}


@pytest.mark.parametrize("name", {**view_cases(), **value_cases()})
def test_bad_view_or_value_is_refused(tmp_path, name):
    path = write_cases(tmp_path, {name: {**view_cases(), **value_cases()}[name]})[name]
    assert VIEW_EXPECTED.get(name, "") in refused(path)


def test_stride_0_file_takes_no_memory(tmp_path):
    """The 387-byte file of issue 13 that filled 1 GiB: refused before any allocation."""
    path = write_pth(tmp_path / "s0.pth", view_cases()["stride_0_amplification"], {"0": FOUR[:4]})
    assert path.stat().st_size < 1024
    bounded(lambda: refused(path, "repeats stored elements"), peak=2**20 * 4)


# ---- structures that explode when hashed, compared, printed or walked ----

def dag_of_tuples(depth=60):
    """t_{i+1} = (t_i, t_i): 2^60 leaves in 120 bytes."""
    return b")" + b"2\x86" * depth


def dag_of_lists(depth=60):
    return b"]" + b"q\x000](h\x00h\x00e" * depth


def dag_of_dicts(depth=60):
    return b"}" + (b"q\x000}(" + text("a") + b"h\x00" + text("b") + b"h\x00u") * depth


def chain_of_lists(depth=20000):
    """[[[[...]]]] 20,000 deep, built without MARKs (recursion limit is 1,000)."""
    return b"]" + b"".join(b"]r" + struct.pack("<I", i) + b"a0j" + struct.pack("<I", i)
                           for i in range(depth))


def valid_with(junk):
    """A valid training checkpoint whose optimizer state is `junk` (parsed, then ignored)."""
    return pickle_of(dict_of({"model": dict_of(GOOD), "optimizer": junk, "epoch": num(3)}))


def structure_cases():
    dag = dag_of_tuples()
    return {
        "dag_top": pickle_of(dag),
        "dag_value": sd_pickle({"x": dag, **GOOD}),
        "dag_key": pickle_of(b"}" + dag + num(1) + b"s"),
        "dag_set": pickle_of(b"\x8f(" + dag + b"\x90"),
        "dag_frozenset": pickle_of(b"(" + dag + b"\x91"),
        "dag_set_call": pickle_of(call(glob("__builtin__", "set"), b"](" + dag + b"e")),
        "dag_persistent_id": sd_pickle({"w": dag + b"Q"}),
        "dag_shape": sd_pickle({"w": call(glob("torch._utils", "_rebuild_tensor_v2"),
                                          storage("0", 4), num(0), dag, tup(num(1)), b"\x89",
                                          ordered_dict())}),
        "dag_stack_global": pickle_of(dag + dag + b"\x93"),
        "list_dag_top": pickle_of(dag_of_lists()),
        "dict_dag_top": pickle_of(dag_of_dicts()),
        "deep_marks": pickle_of(b"(" * 100000 + b"t" * 100000),
        "chain_of_lists": pickle_of(chain_of_lists()),
        "cyclic_list": pickle_of(b"]q\x00h\x00a"),
        "long_key": pickle_of(b"}" + text("k" * 5000) + b"Ns"),
        "wide_tuple_key": pickle_of(b"}" + tup(*[num(i) for i in range(9)]) + b"Ns"),
        "long1_huge": pickle_of(b"\x8a\xff" + b"\x01" * 255),
        "long4_huge": pickle_of(b"\x8b" + struct.pack("<i", 2**31 - 1) + b"\x01" * 64),
        "long4_negative": pickle_of(b"\x8b" + struct.pack("<i", -5)),
        "memo_missing": pickle_of(b"h\x07"),
        "long_memo_missing": pickle_of(b"j\xff\xff\xff\xff"),
        "memo_put_empty": pickle_of(b"q\x00"),
        "stack_underflow": pickle_of(b"N\x86"),
        "mark_underflow": pickle_of(b"Nt"),
        "no_stop": b"\x80\x02}",
        "string_past_end": b"\x80\x02X\xff\xff\xff\x7f" + b"a" * 16,
        "string_not_utf8": pickle_of(b"X\x02\x00\x00\x00\xff\xfe"),
        "global_not_a_line": pickle_of(b"c" + b"m" * 1000),
    }


STRUCTURE_EXPECTED = {
    "dag_key": "as a dict key", "dag_set": "as a set element", "dag_frozenset": "as a set element",
    "dag_set_call": "set element", "long_key": "a string of 5,000 characters as a dict key",
    "wide_tuple_key": "a tuple of 9 items as a dict key", "deep_marks": "64 MARKs",
    "long1_huge": "255 bytes", "long4_huge": "2,147,483,647 bytes",
    "memo_missing": "memo entry 7", "long_memo_missing": "memo entry 4294967295",
    "no_stop": "STOP", "dag_top": "holds a tuple of 2 items",
    "list_dag_top": "holds a list of 2 items", "dict_dag_top": "'a', 'b'",
    "dag_persistent_id": "persistent id a tuple"}


@pytest.mark.parametrize("name", structure_cases())
def test_exploding_structure_is_refused_quickly(tmp_path, name):
    """Refused (not a state dict, a bad key, a bound) within SECONDS and small memory: nothing
    the file built is hashed beyond a short key, compared deeply, printed or walked."""
    path = write_cases(tmp_path, {name: structure_cases()[name]})[name]
    assert STRUCTURE_EXPECTED.get(name, "") in refused(path)


JUNK = {"tuples": dag_of_tuples(), "lists": dag_of_lists(), "dicts": dag_of_dicts(),
        "chain": chain_of_lists()}


@pytest.mark.parametrize("name", JUNK)
def test_junk_in_the_optimizer_state_is_ignored_quickly(tmp_path, name):
    """Exponential and deep structures where tinyrwkv does not look: the model still reads."""
    path = write_pth(tmp_path / f"{name}.pth", valid_with(JUNK[name]), {"0": FOUR})
    got = bounded(lambda: read_checkpoint(path), peak=peak_for(path))
    assert isinstance(got, dict), got
    np.testing.assert_array_equal(got["w"], np.arange(4, dtype=np.float32))
    assert "under 'model'" in open_model(path).description


def test_step_limit_bounds_time():
    """A pickle that only works (DUP, 2^20 times): refused at Limits.steps, within SECONDS; and at
    scaled-down limits, the memory per step stays under 128 bytes for the costliest objects."""
    from tinyrwkv.formats.pickle_reader import LIMITS, Limits, read_pickle
    busy = b"\x80\x02N" + b"2" * (LIMITS.steps + 10) + b"."
    error = bounded(lambda: read_pickle(busy, "busy.pth"))
    assert isinstance(error, CheckpointError) and "steps" in str(error)
    steps = 50_000
    limits = Limits(steps=steps)
    patterns = {"empty sets": b"\x8fa", "empty dicts": b"}a", "lists": b"]a",
                "memo": None, "one-entry dicts": b"}NNsa"}
    for name, unit in patterns.items():
        body = (b"".join(b"Nr" + struct.pack("<I", i) + b"0" for i in range(steps)) if unit is None
                else b"]" + unit * steps)
        error = bounded(lambda: read_pickle(b"\x80\x02" + body + b".", "x.pth", limits),
                        peak=128 * steps + 2**20)
        assert isinstance(error, CheckpointError) and "steps" in str(error), name


# ---- the zip: bounded reads, no trusting declared sizes ----

def patch_central_size(data, member, size):
    """The zip `data` with `member`'s uncompressed size in the central directory set to `size`."""
    entry = data.rindex(b"PK\x01\x02", 0, data.rindex(member.encode()))
    return data[:entry + 24] + struct.pack("<I", size) + data[entry + 28:]


def test_zip_bombs_and_lying_sizes(tmp_path):
    big = bytes(64 * 2**20)                                    # 64 MiB of zeros: ~64 kB deflated
    cases = {}
    # data.pkl inflating past the 16 MiB bound, declared honestly
    path = tmp_path / "pickle_bomb.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", b"\x80\x02" + b"N0" * (9 * 2**20) + b"N.")
    cases[path] = "more than the 16,777,216"
    # data.pkl declaring 40 bytes and inflating to 18 MiB: read to the declared size, CRC fails
    path = tmp_path / "pickle_lies.pth"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as zf:
        zf.writestr("archive/data.pkl", sd_pickle(GOOD) + bytes(18 * 2**20))
        zf.writestr("archive/data/0", FOUR)
    path.write_bytes(patch_central_size(path.read_bytes(), "archive/data.pkl", 40))
    cases[path] = "truncated or corrupt"
    # a storage declaring 4 GB from 64 kB, and a pickle that agrees: more than deflate can make
    path = tmp_path / "storage_lies.pth"
    numel = (2**32 - 4) // 4
    write_pth(path, sd_pickle({"w": tensor("0", numel, 0, (numel,), (1,))}), {"0": big},
              zipfile.ZIP_DEFLATED)
    path.write_bytes(patch_central_size(path.read_bytes(), "archive/data/0", 2**32 - 4))
    cases[path] = "more than deflate can produce"
    # an honest 64 MiB deflated storage that the pickle calls 4 elements
    path = write_pth(tmp_path / "storage_disagrees.pth", sd_pickle(GOOD), {"0": big},
                     zipfile.ZIP_DEFLATED)
    cases[path] = "the pickle says 4 x fp32"
    # honest sizes that agree with the pickle: 96 MiB of zeros from ~100 kB, a bomb all the same
    numel = 12 * 2**20
    path = write_pth(tmp_path / "consistent_bomb.pth", sd_pickle({
        name: tensor(name, numel, 0, (numel,), (1,)) for name in "ab"}),
        {name: bytes(4 * numel) for name in "ab"}, zipfile.ZIP_DEFLATED)
    cases[path] = "zip bomb or a model of zeros"
    # bzip2 and lzma can exceed deflate's ratio: refused by method
    path = write_pth(tmp_path / "bzip2.pth", sd_pickle(GOOD), {"0": FOUR}, zipfile.ZIP_BZIP2)
    cases[path] = "zip method 12"
    for path, fragment in cases.items():
        error = bounded(lambda: read_checkpoint(path), peak=8 * 2**20)   # none inflates its data
        assert type(error) is CheckpointError and fragment in str(error), (path.name, error)
        assert str(path) in str(error) and "\n" not in str(error)


def overlapping_members(path, copies):
    """Rewrite the torch zip at `path` (storage member archive/data/a) so that `copies` more
    names, archive/data/b, c, ..., point at the same bytes: central directory entries repeated
    with one letter changed (no new data)."""
    data = path.read_bytes()
    end = data.rindex(b"PK\x05\x06")
    (count,) = struct.unpack_from("<H", data, end + 10)            # entries in the directory
    cd_size, cd_offset = struct.unpack_from("<II", data, end + 12)
    name = b"archive/data/a"
    entry_start = data.rindex(b"PK\x01\x02", cd_offset, data.index(name, cd_offset))
    name_len, extra_len, comment_len = struct.unpack_from("<HHH", data, entry_start + 28)
    entry = data[entry_start: entry_start + 46 + name_len + extra_len + comment_len]
    extra = b"".join(entry.replace(name, name[:-1] + bytes([ord("b") + i])) for i in range(copies))
    eocd = bytearray(data[end:])
    struct.pack_into("<HHI", eocd, 8, count + copies, count + copies, cd_size + len(extra))
    path.write_bytes(data[:cd_offset + cd_size] + extra + bytes(eocd))
    return path


def test_overlapping_storage_members_are_refused(tmp_path):
    """Ten names for the same 1 MiB of stored bytes would declare 10 MiB of tensors in a 1 MiB
    file; sharing bytes between members is refused (a real zip never does it)."""
    numel = 2**18
    entries = {f"w{i}": tensor(chr(ord("a") + i), numel, 0, (numel,), (1,)) for i in range(10)}
    path = write_pth(tmp_path / "overlap.pth", sd_pickle(entries), {"a": bytes(4 * numel)})
    overlapping_members(path, 9)
    with zipfile.ZipFile(path) as zf:                      # a zip that zipfile accepts
        assert len([n for n in zf.namelist() if "/data/" in n]) == 10
    refused(path, "overlap")


def test_deflated_storage_is_planned_without_inflating(tmp_path):
    """An honest deflated 64 MiB storage of zeros in a < 1 MiB file: planning (inspect) inflates
    nothing; reading it would cost the 64 MiB the file declares, no more."""
    numel = 16 * 2**20
    pkl = sd_pickle({"w": tensor("0", numel, 0, (numel,), (1,))})
    path = write_pth(tmp_path / "zeros.pth", pkl, {"0": bytes(4 * numel)}, zipfile.ZIP_DEFLATED)
    assert path.stat().st_size < 2**20
    shapes = bounded(lambda: inspect_checkpoint(path), peak=4 * 2**20)
    assert shapes == {"w": ((numel,), "fp32")}


# ---- ordinary files: state_dict() with _metadata, training checkpoints ----

def test_handmade_state_dict_with_metadata_reads(tmp_path):
    """Without torch: an OrderedDict state dict with _metadata (BUILD), read exactly; torch, where
    installed, agrees the hand-built file is what it writes (so the crafted files above differ
    from real ones only where they mean to)."""
    w = make_weights(2, 64, 97, head_size=32, seed=3)
    path = state_dict_pth(tmp_path / "m.pth", w)
    got = read_checkpoint(path)
    assert list(got) == list(w)
    assert all(np.array_equal(got[k], w[k]) for k in w)
    assert np.array_equal(tinyrwkv.load(path, backend="numpy").forward(IDS)[0],
                          tinyrwkv.RWKV7(w).forward(IDS)[0])
    if not importlib_missing("torch"):
        import torch
        ref = torch.load(path, weights_only=True)
        assert ref._metadata == {"": {"version": 1}}
        assert all(np.array_equal(ref[k].numpy(), w[k]) for k in w)


@pytest.fixture(scope="module")
def torch_files(tmp_path_factory):
    """torch.save of a synthetic RWKV-7: a module's state_dict() (with _metadata), and a training
    checkpoint {model, optimizer (AdamW after one step), epoch}; plus the arrays."""
    torch = pytest.importorskip("torch")
    folder = tmp_path_factory.mktemp("torch_files")
    w = make_weights(2, 64, 97, head_size=32, seed=11)

    class Holder(torch.nn.Module):
        """A real module whose state_dict() has the official keys: one submodule per dot."""
        def __init__(self):
            super().__init__()
            for key, value in w.items():
                owner = self
                *path, leaf = key.split(".")
                for part in path:
                    if not hasattr(owner, part):
                        owner.add_module(part, torch.nn.Module())
                    owner = getattr(owner, part)
                owner.register_parameter(leaf, torch.nn.Parameter(torch.from_numpy(w[key].copy())))

    module = Holder()
    sd = module.state_dict()
    assert hasattr(sd, "_metadata") and list(sd) == list(w)
    torch.save(sd, folder / "state_dict.pth")
    opt = torch.optim.AdamW(module.parameters(), lr=1e-3)
    for p in module.parameters():
        p.grad = torch.ones_like(p)
    opt.step()
    sd = module.state_dict()
    torch.save({"model": sd, "optimizer": opt.state_dict(), "epoch": 3}, folder / "training.pth")
    torch.save({"model": sd, "ema": sd}, folder / "model_and_ema.pth")
    torch.save({"net": sd, "ema": sd}, folder / "two_models.pth")
    torch.save({"model": sd, "state_dict": sd}, folder / "model_and_state_dict.pth")
    return torch, folder


def test_torch_state_dict_with_metadata_reads_like_torch(torch_files):
    torch, folder = torch_files
    path = folder / "state_dict.pth"
    ref = torch.load(path, weights_only=True)
    got = read_checkpoint(path)
    assert list(got) == list(ref)
    assert all(np.array_equal(got[k], ref[k].numpy()) for k in ref)
    assert open_model(path).description == "pth, stored fp32"


def test_training_checkpoint_reads_its_model(torch_files, capsys):
    torch, folder = torch_files
    path = folder / "training.pth"
    ref = torch.load(path, weights_only=True)["model"]
    got = read_checkpoint(path)
    assert list(got) == list(ref)
    assert all(np.array_equal(got[k], ref[k].numpy()) for k in ref)
    assert "the state dict under 'model'" in open_model(path).description
    model = tinyrwkv.load(path, backend="numpy")
    assert np.array_equal(model.forward(IDS)[0],
                          tinyrwkv.RWKV7({k: v.numpy() for k, v in ref.items()}).forward(IDS)[0])
    main(["info", str(path)])
    assert "the state dict under 'model'" in capsys.readouterr().out


def test_several_models_in_one_file(torch_files):
    torch, folder = torch_files
    assert "under 'model'" in open_model(folder / "model_and_ema.pth").description
    for name in ("two_models", "model_and_state_dict"):
        path = folder / f"{name}.pth"
        message = refused(path, "several dicts of tensors")
        assert all(f"'{k}'" in message for k in torch.load(path, weights_only=True)), message


def test_info_on_a_hostile_file_is_one_line_and_quick(tmp_path):
    """`tinyrwkv info` on the exponential-key file of issue 13 (it ran over 120 s): exit 1 with
    one line on stderr. 60 s bounds a fresh interpreter importing NumPy on a busy runner; the
    file itself takes milliseconds."""
    path = write_cases(tmp_path, {"dag_key": structure_cases()["dag_key"]})["dag_key"]
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    env = dict(os.environ, PYTHONPATH=root, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "tinyrwkv", "info", str(path)], cwd=root,
                          env=env, capture_output=True, text=True, timeout=60)
    assert proc.returncode == 1, proc.stderr
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and str(path) in lines[0] and "as a dict key" in lines[0], lines
