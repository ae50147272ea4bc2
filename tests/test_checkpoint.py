"""tinyrwkv.checkpoint: reading .pth/.safetensors without torch, refusing code, and naming problems.

torch and safetensors are the oracles here (test-only dependencies): every file they write must
read back bit-exactly, and every file we write must read back bit-exactly in them.
"""
import collections
import io
import json
import os
import pickle
import struct
import subprocess
import sys
import zipfile
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings, strategies as st

from tinyrwkv import CheckpointError, UnsupportedCheckpoint
from tinyrwkv.formats import (ProgressBar, bf16_to_float32, inspect_checkpoint, read_checkpoint,
                              save_safetensors, to_bf16_bits)
from tinyrwkv.formats import progress as progress_module
from tinyrwkv.formats import reading
from tinyrwkv.schema import check_x070_keys, detect_version

torch = pytest.importorskip("torch", reason="torch is the oracle for .pth files: pip install -e '.[test]'")

FIXTURES = Path(__file__).resolve().parents[2] / "shared/reference/rwkv7_fixtures"
FIXTURE_NAMES = {"synthetic_L3_C256": "x070", "synthetic_de_L3_C256": "x070-deepembed"}


def fixture_path(name):
    path = FIXTURES / f"{name}.pth"
    if not path.exists():
        pytest.skip(f"fixture {path} not found (../shared/reference is laid beside the checkout)")
    return path


def torch_reference(path):
    """torch's reading of a .pth, as float32/int numpy arrays (bf16 -> float32 is exact)."""
    sd = torch.load(path, map_location="cpu", weights_only=True)
    return {k: to_numpy(v) for k, v in sd.items()}


def to_numpy(t):
    t = t.detach()
    return t.float().numpy() if t.dtype == torch.bfloat16 else t.numpy()


def assert_same(got, ref):
    """Same keys (in the same order), shapes, dtypes and bits."""
    assert list(got) == list(ref)
    for k in ref:
        assert got[k].shape == ref[k].shape, k
        assert got[k].dtype == ref[k].dtype, (k, got[k].dtype, ref[k].dtype)
        np.testing.assert_array_equal(got[k], ref[k], err_msg=k)


def backed_by_memmap(arr):
    """True if arr is a view (through any chain of bases) of an np.memmap."""
    obj = arr
    while obj is not None:
        if isinstance(obj, np.memmap):
            return True
        obj = getattr(obj, "base", None)
    return False


def raises_checkpoint_error(path, exact=CheckpointError, **kwargs):
    """read_checkpoint(path) must raise exactly `exact` (no raw zipfile/pickle/struct error)."""
    with pytest.raises(Exception) as excinfo:
        read_checkpoint(path, **kwargs)
    assert type(excinfo.value) is exact, repr(excinfo.value)
    assert str(path) in str(excinfo.value)
    return str(excinfo.value)


# ---- building torch-style zips by hand (for files torch would never write) ----

def p_str(s):
    b = s.encode()
    return b"X" + struct.pack("<I", len(b)) + b                       # BINUNICODE


def p_int(i):
    return b"J" + struct.pack("<i", i)                                # BININT


def p_tuple(*items):
    return b"(" + b"".join(items) + b"t"                              # MARK ... TUPLE


def p_global(module, name):
    return b"c" + module.encode() + b"\n" + name.encode() + b"\n"    # GLOBAL


def p_tensor(storage_key, numel, offset, size, stride, storage="FloatStorage"):
    """_rebuild_tensor_v2(<persistent storage>, offset, size, stride, False, OrderedDict()),
    exactly the opcodes torch.save emits (docs/formats.md §1)."""
    pid = p_tuple(p_str("storage"), p_global("torch", storage), p_str(storage_key), p_str("cpu"),
                  p_int(numel)) + b"Q"                                # BINPERSID
    args = p_tuple(pid, p_int(offset), p_tuple(*map(p_int, size)), p_tuple(*map(p_int, stride)),
                   b"\x89", p_global("collections", "OrderedDict") + b")R")
    return p_global("torch._utils", "_rebuild_tensor_v2") + args + b"R"


def p_dict(entries):
    """A protocol-2 pickle of a dict; entries: name -> opcodes of the value."""
    return b"\x80\x02}(" + b"".join(p_str(k) + v for k, v in entries.items()) + b"u."


def write_torch_zip(path, pickle_bytes, storages, prefix="archive", byteorder="little",
                    compression=zipfile.ZIP_STORED):
    with zipfile.ZipFile(path, "w", compression) as zf:
        zf.writestr(f"{prefix}/data.pkl", pickle_bytes)
        if byteorder is not None:
            zf.writestr(f"{prefix}/byteorder", byteorder)
        for key, data in storages.items():
            zf.writestr(f"{prefix}/data/{key}", data)
        zf.writestr(f"{prefix}/version", "3\n")
    return path


def rezip(src, dst, change=lambda name, data: data, compression=zipfile.ZIP_STORED):
    """Copy a zip member by member; change(name, data) returns new bytes, or None to drop it."""
    with zipfile.ZipFile(src) as zin, zipfile.ZipFile(dst, "w", compression) as zout:
        for info in zin.infolist():
            data = change(info.filename, zin.read(info.filename))
            if data is not None:
                zout.writestr(info.filename, data)
    return dst


def member_names(path):
    with zipfile.ZipFile(path) as zf:
        return zf.namelist()


FOUR_FLOATS = np.arange(4, dtype="<f4")


def test_handmade_zip_is_what_torch_writes(tmp_path):
    """The hand-built files below are only meaningful if torch reads them too."""
    pkl = p_dict({"a": p_tensor("0", 4, 0, (2, 2), (2, 1)), "b": p_tensor("0", 4, 1, (3,), (1,))})
    path = write_torch_zip(tmp_path / "hand.pth", pkl, {"0": FOUR_FLOATS.tobytes()})
    ref = torch_reference(path)
    assert_same(read_checkpoint(path), ref)
    np.testing.assert_array_equal(ref["b"], [1, 2, 3])


# ---- the fixtures (torch-2.11-written bf16) ----

@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_reads_exactly_like_torch(name):
    path = fixture_path(name)
    weights = read_checkpoint(path)
    assert_same(weights, torch_reference(path))
    assert all(w.dtype == np.float32 for w in weights.values())     # bf16 widened
    assert detect_version(weights.keys()) == FIXTURE_NAMES[name]
    check_x070_keys(weights)


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_inspect_reads_no_tensor_data(name, monkeypatch):
    path = fixture_path(name)
    sd = torch.load(path, map_location="cpu", weights_only=True)

    def no_memmap(*args, **kwargs):
        raise AssertionError("inspect_checkpoint must not map tensor data")
    monkeypatch.setattr(np, "memmap", no_memmap)
    info = inspect_checkpoint(path)
    assert list(info) == list(sd)
    assert info == {k: (tuple(v.shape), "bf16") for k, v in sd.items()}
    assert detect_version(info) == FIXTURE_NAMES[name]


# ---- files written by torch now ----

def torch_zoo():
    g = torch.Generator().manual_seed(0)
    base = torch.arange(20, dtype=torch.float32)
    return collections.OrderedDict([
        ("bf16", torch.randn(3, 5, generator=g).to(torch.bfloat16)),
        ("fp16", torch.randn(4, 2, generator=g).half()),
        ("fp32", torch.randn(2, 3, 4, generator=g)),
        ("fp64", torch.randn(7, generator=g, dtype=torch.float64)),
        ("i64", torch.arange(-5, 5)),
        ("i32", torch.arange(6, dtype=torch.int32).reshape(2, 3)),
        ("i16", torch.tensor([-3, 300], dtype=torch.int16)),
        ("i8", torch.tensor([-128, 127], dtype=torch.int8)),
        ("u8", torch.tensor([0, 255], dtype=torch.uint8)),
        ("bool", torch.tensor([True, False, True])),
        ("transposed", torch.randn(3, 4, generator=g).t()),                    # not contiguous
        ("bf16_transposed", torch.randn(3, 4, generator=g).to(torch.bfloat16).t()),
        ("base", base),
        ("view", base[5:17].view(3, 4)),                                       # shares base's storage
        ("strided", base[1::3]),                                               # stride 3, offset 1
        ("scalar", torch.tensor(3.25)),                                        # 0-d
        ("int_scalar", torch.tensor(7)),
        ("bf16_scalar", torch.tensor(-1.5, dtype=torch.bfloat16)),
        ("empty", torch.zeros(0, 3)),
        ("param", torch.nn.Parameter(torch.randn(3, generator=g))),            # _rebuild_parameter
        ("ones_113", torch.ones(1, 1, 3)),
    ])


def test_torch_written_dtypes_and_views(tmp_path):
    sd = torch_zoo()
    path = tmp_path / "zoo.pth"
    torch.save(sd, path)
    got = read_checkpoint(path)
    assert_same(got, {k: to_numpy(v) for k, v in sd.items()})
    assert_same(got, torch_reference(path))
    assert got["transposed"].flags.c_contiguous and got["bf16_transposed"].flags.c_contiguous
    assert np.shares_memory(got["base"], got["view"])              # one storage, one mapping
    assert got["scalar"].shape == () and got["empty"].shape == (0, 3)


def test_parameter_with_state(tmp_path):
    p = torch.nn.Parameter(torch.arange(3.0))
    p.note = 5                          # an attribute makes torch use _rebuild_parameter_with_state
    path = tmp_path / "p.pth"
    torch.save({"p": p}, path)
    assert b"_rebuild_parameter_with_state" in zipfile.ZipFile(path).read("p/data.pkl")
    np.testing.assert_array_equal(read_checkpoint(path)["p"], [0, 1, 2])


def test_zero_copy_memmap_views(tmp_path):
    sd = torch_zoo()
    path = tmp_path / "zoo.pth"
    torch.save(sd, path)
    got = read_checkpoint(path)
    for key in ("fp32", "fp16", "fp64", "i64", "i32", "u8", "bool", "base", "view", "scalar"):
        a = got[key]
        assert backed_by_memmap(a), key
        assert not a.flags.owndata and not a.flags.writeable, key
        with pytest.raises(ValueError):
            a[...] = 0
    for key in ("bf16", "transposed"):                               # converted / copied
        assert got[key].flags.writeable and not backed_by_memmap(got[key])
    # dtype="float32" keeps a float32 storage zero-copy, and converts the others
    as32 = read_checkpoint(path, dtype="float32")
    assert backed_by_memmap(as32["fp32"]) and as32["fp16"].dtype == np.float32


@pytest.mark.parametrize("dtype", ["float32", "float64", np.float64])
def test_dtype_conversion(tmp_path, dtype):
    sd = torch_zoo()
    path = tmp_path / "zoo.pth"
    torch.save(sd, path)
    got = read_checkpoint(path, dtype=dtype)
    ref = {k: to_numpy(v) for k, v in sd.items()}
    for k, v in ref.items():
        if v.dtype.kind == "f":
            assert got[k].dtype == np.dtype(dtype), k
            expected = v.astype(dtype)
            np.testing.assert_array_equal(got[k], expected, err_msg=k)
        else:
            assert got[k].dtype == v.dtype, k                  # integers and bools untouched
            np.testing.assert_array_equal(got[k], v)
    assert got["fp64"].dtype == np.dtype(dtype)


@pytest.mark.parametrize("bad", ["int32", "bool", "complex64"])
def test_dtype_must_be_floating(bad):
    with pytest.raises(ValueError, match="floating"):
        read_checkpoint(fixture_path("synthetic_L3_C256"), dtype=bad)


# ---- dtype="bfloat16", bf16_to_float32, and conversions by plain reads ----

def torch_bf16_bits(t):
    """torch's rounding of a floating tensor to bf16 (`.bfloat16()`), as uint16 bit patterns."""
    return t.detach().to(torch.bfloat16).contiguous().view(torch.int16).numpy().view(np.uint16)


def torch_expected(sd, dtype):
    """What read_checkpoint(path, dtype) must return for a file torch saved from `sd`, by torch."""
    out = {}
    for k, t in sd.items():
        if not t.is_floating_point():
            out[k] = t.numpy()                                    # integers/bools: untouched
        elif dtype == "bfloat16":
            out[k] = torch_bf16_bits(t)
        else:
            v = to_numpy(t)                                       # bf16 -> float32 (exact)
            out[k] = v if dtype is None else v.astype(dtype)
    return out


def rounding_cases():
    """Tensors whose bf16 rounding is easy to get wrong, in every floating storage type."""
    ties = (np.arange(0x3F800000, 0x3F800000 + 2**20, 2**15, dtype=np.uint32) | 0x8000)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, 3.4e38, -3.4e38, 1e-40, -1e-45,
                        1 + 2**-8, 1 + 3 * 2**-8, 1.00390625, 1.01171875], np.float32)
    return {
        "fp32_ties": torch.from_numpy(np.concatenate([ties.view(np.float32), special])),
        # torch rounds float64 through float32 (as to_bf16_bits does): 1 + 2^-8 + 2^-30 becomes
        # the tie 1 + 2^-8 and rounds to even (1.0), not up to 1 + 2^-7 as one rounding would.
        "fp64_double_rounding": torch.tensor([1 + 2**-8 + 2**-30, -(1 + 3 * 2**-8 - 2**-40), 1e300,
                                              1e-300, 2.0**-130], dtype=torch.float64),
        "fp16_range": torch.tensor([65504.0, -65504.0, 6e-8, 1.0 + 2**-10, -2.5e-5],
                                   dtype=torch.float16),
    }


@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_bfloat16_keeps_bf16_storages_as_views(name):
    path = fixture_path(name)
    sd = torch.load(path, map_location="cpu", weights_only=True)
    got = read_checkpoint(path, dtype="bfloat16")
    assert list(got) == list(sd)
    for k, t in sd.items():
        a = got[k]
        assert a.dtype == np.uint16 and a.shape == tuple(t.shape), k
        assert backed_by_memmap(a) and not a.flags.writeable, k        # no conversion, no copy
        np.testing.assert_array_equal(a, torch_bf16_bits(t), err_msg=k)
        wide = bf16_to_float32(a)                                      # exact widening
        assert wide.dtype == np.float32 and wide.shape == a.shape
        np.testing.assert_array_equal(wide, t.float().numpy(), err_msg=k)


def test_bfloat16_rounds_like_torch(tmp_path):
    sd = torch_zoo()
    sd.update(rounding_cases())
    path = tmp_path / "zoo.pth"
    torch.save(sd, path)
    with np.errstate(over="ignore"):                   # 1e300 rounds to inf, as in torch
        got = read_checkpoint(path, dtype="bfloat16")
    assert_same(got, torch_expected(sd, "bfloat16"))      # bit for bit; integers untouched
    assert backed_by_memmap(got["bf16"]) and not backed_by_memmap(got["fp32"])
    assert got["bf16_transposed"].flags.c_contiguous and not backed_by_memmap(got["bf16_transposed"])
    assert got["fp32"].flags.writeable and not got["bf16"].flags.writeable
    # the same from a .safetensors file
    from safetensors.torch import save_file
    floats = {k: v.clone().contiguous() for k, v in sd.items() if v.is_floating_point()}
    save_file(floats, tmp_path / "zoo.safetensors")
    with np.errstate(over="ignore"):
        got = read_checkpoint(tmp_path / "zoo.safetensors", dtype="bfloat16")
    for k, t in floats.items():
        assert got[k].dtype == np.uint16, k
        np.testing.assert_array_equal(got[k], torch_bf16_bits(t), err_msg=k)


def test_bf16_to_float32_widens_every_bit_pattern():
    bits = np.arange(2**16, dtype=np.uint16)
    theirs = torch.from_numpy(bits.view(np.int16)).view(torch.bfloat16).float()
    theirs = theirs.view(torch.int32).numpy().view(np.uint32)          # bits: NaN payloads too
    for given in (bits, bits.view(np.int16), bits.astype(">u2"), bits.reshape(256, 256)):
        ours = bf16_to_float32(given)
        assert ours.dtype == np.float32 and ours.shape == given.shape and ours.flags.c_contiguous
        np.testing.assert_array_equal(ours.reshape(-1).view(np.uint32), theirs)
    scalar = bf16_to_float32(np.array(0x3F80, np.uint16))
    assert scalar.shape == () and scalar == 1.0
    for wrong in (np.zeros(3, np.float32), np.zeros(3, np.uint32), np.zeros(3, np.float16)):
        with pytest.raises(TypeError, match="16-bit"):
            bf16_to_float32(wrong)


@pytest.mark.parametrize("threads", [1, 3])
@pytest.mark.parametrize("dtype", [None, "float32", "float64", "bfloat16"])
def test_conversions_in_pieces_and_threads(tmp_path, monkeypatch, dtype, threads):
    """Converted tensors are read _PIECE_BYTES at a time on _READ_THREADS threads. With 40-byte
    pieces every case happens (a tensor in one piece, a piece ending inside a tensor, a short last
    piece, many jobs in flight), and the result must still be torch's, bit for bit."""
    g = torch.Generator().manual_seed(5)
    sd = torch_zoo()
    sd.update(rounding_cases())
    sd.update({"big_bf16": torch.randn(37, 29, generator=g).to(torch.bfloat16),
               "big_fp32": torch.randn(41, 7, generator=g),
               "big_fp16": torch.randn(301, generator=g).half(),
               "big_fp64": torch.randn(3, 33, generator=g, dtype=torch.float64),
               "big_transposed": torch.randn(50, 9, generator=g).to(torch.bfloat16).t()})
    path = tmp_path / "zoo.pth"
    torch.save(sd, path)
    monkeypatch.setattr(reading, "PIECE_BYTES", 40)       # 5 float64s, 10 float32s, 20 bf16s
    monkeypatch.setattr(reading, "READ_THREADS", threads)
    with np.errstate(over="ignore"):                  # 1e300 -> float32 is inf, as astype says
        assert_same(read_checkpoint(path, dtype=dtype), torch_expected(sd, dtype))


def test_conversions_do_not_map_the_file(tmp_path, monkeypatch):
    """A tensor that must be converted is read with plain reads, never through np.memmap: mapped
    source pages would stay in this process's memory next to the converted copy (measured in
    test_peak_memory_of_a_conversion). A bf16-only file read as float32 must make no map at all."""
    path = fixture_path("synthetic_L3_C256")
    reference = torch_reference(path)

    def no_memmap(*args, **kwargs):
        raise AssertionError("a conversion went through np.memmap")
    monkeypatch.setattr(np, "memmap", no_memmap)
    for dtype in (None, "float32", "float64"):
        got = read_checkpoint(path, dtype=dtype)
        assert_same(got, {k: v.astype(dtype or np.float32) for k, v in reference.items()})
        assert all(a.flags.owndata and a.flags.writeable for a in got.values())
    with pytest.raises(AssertionError, match="np.memmap"):   # bf16 kept: views of a map
        read_checkpoint(path, dtype="bfloat16")


def test_bfloat16_from_big_endian_and_compressed_files(tmp_path):
    """The copies that are not conversions (a byte swap, a deflated member) keep bf16 bits too."""
    g = torch.Generator().manual_seed(6)
    sd = {"bf16": torch.randn(5, 3, generator=g).to(torch.bfloat16), "f32": torch.randn(7, generator=g),
          "f16": torch.randn(4, generator=g).half(), "i64": torch.arange(-2, 4)}
    little = tmp_path / "little.pth"
    torch.save(sd, little)
    expected = torch_expected(sd, "bfloat16")
    big = big_endian_copy(little, tmp_path / "big.pth", sd)
    deflated = rezip(little, tmp_path / "deflated.pth", compression=zipfile.ZIP_DEFLATED)
    for path in (big, deflated):
        got = read_checkpoint(path, dtype="bfloat16")
        assert_same(got, expected)
        assert all(a.dtype.isnative and not backed_by_memmap(a) for a in got.values())


def test_file_shrinking_while_reading(tmp_path, monkeypatch):
    """A file cut short after its directory was read (a download still running) is an error that
    names the file, also when the short read happens on a read thread."""
    path = tmp_path / "model.pth"
    path.write_bytes(fixture_path("synthetic_L3_C256").read_bytes())
    plan = reading.plan

    def plan_then_truncate(p):
        result = plan(p)
        os.truncate(p, p.stat().st_size // 2)
        return result
    monkeypatch.setattr(reading, "plan", plan_then_truncate)
    assert "truncated or corrupt" in raises_checkpoint_error(path, dtype="float32")


PEAK_RSS_CHILD = r"""
import json, os, resource, sys
# ru_maxrss survives exec: a child of pytest starts with pytest's peak (hundreds of MB, more than
# this whole measurement). A forked process starts its own count, so measure in one.
pid = os.fork()
if pid:
    sys.exit(os.waitstatus_to_exitcode(os.waitpid(pid, 0)[1]))
import numpy as np
from tinyrwkv.formats import read_checkpoint
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024      # Linux: kB
weights = read_checkpoint(sys.argv[1], dtype=sys.argv[2], progress=False)
after = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024
print(json.dumps({"before": before, "after": after,
                  "nbytes": sum(a.nbytes for a in weights.values()),
                  "dtypes": sorted({str(a.dtype) for a in weights.values()})}))
sys.stdout.flush()
os._exit(0)
"""


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="ru_maxrss in kB and os.fork: Linux")
def test_peak_memory_of_a_conversion(tmp_path):
    """The loading goal: no second copy. Reading a 192 MiB bf16 file as float32 may grow the peak
    resident memory by the 384 MiB of returned arrays, +10%, +30 MiB (read buffers, allocator
    slack): 452 MiB. Measured: +392 MiB. Converting through a memory map of the file, as before,
    kept the 192 MiB of source pages resident too: +576 MiB, which fails here.
    Kept as bf16 (views of the map), nothing is read: +0."""
    g = torch.Generator().manual_seed(7)
    path = tmp_path / "big.pth"
    torch.save({f"blocks.{i}.w": torch.randn(4096, 4096, generator=g).to(torch.bfloat16)
                for i in range(6)}, path)                                      # 6 x 32 MiB
    env = dict(os.environ, PYTHONPATH=str(Path(reading.__file__).parents[2]))
    for dtype, dtypes, nbytes, allowed in (("float32", ["float32"], 6 * 2**26, 1.1 * 6 * 2**26),
                                           ("bfloat16", ["uint16"], 6 * 2**25, 0)):
        proc = subprocess.run([sys.executable, "-c", PEAK_RSS_CHILD, str(path), dtype], env=env,
                              capture_output=True, text=True, timeout=120)
        assert proc.returncode == 0, proc.stderr
        got = json.loads(proc.stdout)
        assert got["dtypes"] == dtypes and got["nbytes"] == nbytes
        assert got["before"] < 200 * 2**20, got            # the fork worked: our own baseline
        growth = got["after"] - got["before"]
        assert growth <= allowed + 30 * 2**20, (dtype, growth / 2**20, nbytes / 2**20)


def test_state_dict_containers(tmp_path):
    sd = collections.OrderedDict([("b", torch.ones(2)), ("a", torch.zeros(3))])
    model = torch.nn.Linear(2, 2, bias=False)
    opt = torch.optim.Adam(model.parameters())
    model(torch.ones(1, 2)).sum().backward()
    opt.step()
    cases = {
        "ordered": sd,
        "nested": {"state_dict": sd, "epoch": 3, "lr": 0.1},
        "model_and_optimizer": {"model": sd, "optimizer": opt.state_dict()},
    }
    for name, obj in cases.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        got = read_checkpoint(tmp_path / f"{name}.pth")
        assert list(got) == ["b", "a"], name                       # file order kept
        np.testing.assert_array_equal(got["a"], np.zeros(3, np.float32))

    bad = {"two_state_dicts": ({"x": sd, "y": sd}, "several dicts of tensors"),
           "a_list": ([torch.ones(1)], "holds a list"),
           "a_tensor": (torch.ones(2), "not a state dict"),
           "empty": ({}, "not a state dict"),
           "mixed": ({"w": torch.ones(1), "epoch": 3}, "not a state dict")}
    for name, (obj, message) in bad.items():
        torch.save(obj, tmp_path / f"{name}.pth")
        assert message in raises_checkpoint_error(tmp_path / f"{name}.pth"), name


def test_unsupported_element_type(tmp_path):
    path = tmp_path / "complex.pth"
    torch.save({"c": torch.zeros(2, dtype=torch.complex64)}, path)
    text = raises_checkpoint_error(path)
    assert "torch.ComplexFloatStorage" in text and "does not read" in text


def big_endian_copy(little, dst, sd):
    """A copy of the torch-saved `little` whose byteorder member says 'big' and whose storages are
    byteswapped (as a file from s390x); `sd` is what was saved (storages 0, 1, ... in its order)."""
    sizes = {str(i): t.element_size() for i, t in enumerate(sd.values())}

    def to_big(name, data):
        if name.endswith("/byteorder"):
            return b"big"
        key = name.rsplit("/", 1)[-1]
        if "/data/" in name:
            return np.frombuffer(data, f"<u{sizes[key]}").byteswap().tobytes()
        return data
    return rezip(little, dst, to_big)


def test_big_endian_file(tmp_path):
    """A file whose byteorder member says 'big' (e.g. from s390x) is byteswapped into native arrays."""
    sd = {"f32": torch.randn(3, 2), "bf16": torch.randn(5).to(torch.bfloat16),
          "f16": torch.randn(4).half(), "i64": torch.arange(-2, 4)}
    little = tmp_path / "little.pth"
    torch.save(sd, little)
    big = big_endian_copy(little, tmp_path / "big.pth", sd)
    ref = {k: to_numpy(v) for k, v in sd.items()}
    assert_same(torch_reference(big), ref)                # torch agrees the file is well-formed
    got = read_checkpoint(big)
    assert_same(got, ref)
    assert all(a.dtype.isnative for a in got.values())


def test_compressed_members(tmp_path):
    """Members deflated by a re-zipping tool are read through zipfile (a copy) instead of mapped."""
    path = fixture_path("synthetic_L3_C256")
    deflated = rezip(path, tmp_path / "deflated.pth", compression=zipfile.ZIP_DEFLATED)
    assert deflated.stat().st_size < path.stat().st_size
    assert_same(read_checkpoint(deflated), read_checkpoint(path))


def test_progress_callback():
    path = fixture_path("synthetic_L3_C256")
    calls = []
    read_checkpoint(path, progress=lambda done, total: calls.append((done, total)))
    info = inspect_checkpoint(path)
    total = sum(2 * int(np.prod(shape)) for shape, _ in info.values())       # bf16: 2 bytes each
    assert calls[0] == (0, total) and calls[-1] == (total, total)
    assert len(calls) == len(info) + 1
    dones = [d for d, _ in calls]
    assert dones == sorted(dones) and all(t == total and d <= t for d, t in calls)


class FakeTTY(io.StringIO):
    def isatty(self):
        return True


def test_progress_bar_draws_only_on_a_terminal():
    out = io.StringIO()
    bar = ProgressBar(stream=out)                           # not a terminal, not forced
    bar(5, 10), bar(10, 10), bar.close()
    assert out.getvalue() == ""

    out = io.StringIO()
    with ProgressBar(label="model.pth", stream=out, force=True, min_interval=3600) as bar:
        for done in range(0, 11):
            bar(done * 2_000_000, 20_000_000)
    text = out.getvalue()
    # throttled: the first update and the final 100% only; then close() ends the line
    assert text.count("\r") == 2 and text.endswith("\n")
    assert "model.pth:   0.0%" in text and "100.0% 20.0/20.0 MB" in text and "MB/s" in text


def test_automatic_progress_bar(monkeypatch):
    path = fixture_path("synthetic_L3_C256")
    fake = FakeTTY()
    monkeypatch.setattr(sys, "stderr", fake)
    read_checkpoint(path)                               # 5.8 MB < 256 MB: no bar
    assert fake.getvalue() == ""
    monkeypatch.setattr(progress_module, "AUTO_PROGRESS_BYTES", 1000)
    read_checkpoint(path)
    assert "100.0%" in fake.getvalue() and fake.getvalue().endswith("\n")
    fake.seek(0), fake.truncate()
    read_checkpoint(path, progress=False)
    assert fake.getvalue() == ""
    monkeypatch.setattr(sys, "stderr", io.StringIO())  # not a terminal: no bar either
    read_checkpoint(path)
    assert sys.stderr.getvalue() == ""


# ---- safetensors ----

def numpy_zoo():
    rng = np.random.default_rng(0)
    return {"f32": rng.standard_normal((2, 3)).astype(np.float32),
            "f16": rng.standard_normal(5).astype(np.float16),
            "f64": rng.standard_normal((1, 1, 4)),
            "i64": np.arange(-3, 3, dtype=np.int64), "i32": np.arange(4, dtype=np.int32),
            "u8": np.array([0, 7, 255], np.uint8), "bool": np.array([True, False]),
            "scalar": np.array(2.5, np.float32), "empty": np.zeros((0, 4), np.float32)}


def test_safetensors_from_the_numpy_writer(tmp_path):
    from safetensors.numpy import save_file
    tensors = numpy_zoo()
    save_file(tensors, tmp_path / "np.safetensors", metadata={"format": "np"})
    got = read_checkpoint(tmp_path / "np.safetensors")
    assert sorted(got) == sorted(tensors)
    for k, v in tensors.items():
        assert got[k].dtype == v.dtype and got[k].shape == v.shape, k
        np.testing.assert_array_equal(got[k], v)
    assert backed_by_memmap(got["f32"]) and not got["f32"].flags.writeable
    assert inspect_checkpoint(tmp_path / "np.safetensors")["f16"] == ((5,), "fp16")


def test_safetensors_from_the_torch_writer(tmp_path):
    from safetensors.torch import save_file
    g = torch.Generator().manual_seed(1)
    tensors = {"emb.weight": torch.randn(7, 4, generator=g).to(torch.bfloat16),
               "blocks.0.att.x_r": torch.randn(1, 1, 4, generator=g).to(torch.bfloat16),
               "f32": torch.randn(3, generator=g), "f16": torch.randn(2, 2, generator=g).half()}
    save_file(tensors, tmp_path / "t.safetensors")
    got = read_checkpoint(tmp_path / "t.safetensors")
    for k, v in tensors.items():
        np.testing.assert_array_equal(got[k], to_numpy(v), err_msg=k)
        assert got[k].shape == tuple(v.shape)
    assert inspect_checkpoint(tmp_path / "t.safetensors")["emb.weight"] == ((7, 4), "bf16")


def test_save_safetensors_reads_back_everywhere(tmp_path):
    from safetensors import safe_open
    from safetensors.numpy import load_file
    tensors = numpy_zoo()
    path = tmp_path / "ours.safetensors"
    save_safetensors(path, tensors, metadata={"source": "tinyrwkv"})
    for reader in (load_file, read_checkpoint):
        got = reader(path)
        for k, v in tensors.items():
            assert got[k].dtype == v.dtype and got[k].shape == v.shape, (reader, k)
            np.testing.assert_array_equal(got[k], v)
    raw = path.read_bytes()
    n = struct.unpack("<Q", raw[:8])[0]
    assert (8 + n) % 8 == 0 and raw[8 + n - 1:8 + n] in (b" ", b"}")
    with safe_open(path, "np") as f:
        assert f.metadata() == {"source": "tinyrwkv"}


def test_save_safetensors_bf16(tmp_path):
    from safetensors.torch import load_file
    x = np.random.default_rng(2).standard_normal((6, 5)).astype(np.float32) * 100
    path = tmp_path / "bf16.safetensors"
    scalar = np.array(1 + 2**-8, np.float32)                      # a tie: rounds to even (1.0)
    save_safetensors(path, {"w": x, "i": np.arange(3), "s": scalar}, bf16_keys=["w", "s"])
    loaded = load_file(path)
    assert loaded["w"].dtype == torch.bfloat16 and loaded["i"].dtype == torch.int64
    expected = torch.from_numpy(x).to(torch.bfloat16)
    assert torch.equal(loaded["w"], expected)
    assert loaded["s"].shape == () and loaded["s"].item() == 1.0
    got = read_checkpoint(path)
    np.testing.assert_array_equal(got["w"], expected.float().numpy())
    assert got["s"].shape == () and got["s"] == 1.0
    with pytest.raises(ValueError, match="floating"):
        save_safetensors(path, {"i": np.arange(3)}, bf16_keys=["i"])
    with pytest.raises(ValueError, match="not in tensors"):
        save_safetensors(path, {"w": x}, bf16_keys=["v"])
    with pytest.raises(ValueError, match="complex"):
        save_safetensors(path, {"c": np.zeros(2, np.complex64)})


def test_to_bf16_bits_rounds_like_torch():
    rng = np.random.default_rng(3)
    special = np.array([0.0, -0.0, 1.0, -1.0, np.inf, -np.inf, np.nan, 3.4e38, -3.4e38, 1e-40,
                        -1e-45, 1.00390625, 1.01171875, 1 + 2**-8, 1 + 3 * 2**-8], np.float32)
    # exact ties (the discarded half is 0x8000) must round to even in both directions
    ties = (np.arange(0x3F800000, 0x3F800000 + 2**20, 2**15, dtype=np.uint32) | 0x8000).view(np.float32)
    wide = (rng.standard_normal(10000) * 10.0 ** rng.integers(-40, 38, 10000)).astype(np.float32)
    x = np.concatenate([special, ties, wide])
    ours = to_bf16_bits(x)
    theirs = torch.from_numpy(x).to(torch.bfloat16).view(torch.int16).numpy().view(np.uint16)
    finite = ~np.isnan(x)
    np.testing.assert_array_equal(ours[finite], theirs[finite])
    assert np.isnan((ours[~finite].astype(np.uint32) << 16).view(np.float32)).all()


# ---- malicious pickles ----

class Payload:
    """Unpickling this calls `func(*args)`: what an attacker puts in a .pth."""

    def __init__(self, func, *args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def payload_opcodes(obj):
    """The opcodes of obj's pickle without PROTO/STOP, to splice into a state dict."""
    data = pickle.dumps(obj, protocol=2)
    assert data[:2] == b"\x80\x02" and data[-1:] == b"."
    return data[2:-1]


def malicious_files(tmp_path, marker):
    """name -> (path, the global named in the refusal, runnable by plain pickle?)"""
    touch = f"touch {marker}"
    tensor = p_tensor("0", 4, 0, (4,), (1,))
    files = {
        # evil value first, a genuine tensor after it: the pickle looks like a state dict
        "os.system": (p_dict({"evil": payload_opcodes(Payload(os.system, touch)),
                              "emb.weight": tensor}), "posix.system", True),
        "os.system by name": (p_dict({"evil": p_global("os", "system") + p_tuple(p_str(touch)) + b"R"}),
                              "os.system", False),
        "builtins.eval": (p_dict({"evil": p_global("builtins", "eval") + p_tuple(
            p_str(f"__import__('pathlib').Path({str(marker)!r}).touch()")) + b"R",
            "emb.weight": tensor}), "builtins.eval", True),
        # protocol 4 uses STACK_GLOBAL (module and name pushed as strings) instead of GLOBAL
        "subprocess.Popen": (pickle.dumps({"evil": Payload(subprocess.Popen, ["touch", str(marker)])},
                                          protocol=4), "subprocess.Popen", True),
        "torch.load": (p_dict({"evil": p_global("torch", "load") + p_tuple(p_str("/dev/null")) + b"R"}),
                       "torch.load", False),
        "torch._utils.getattr": (p_dict({"evil": p_global("torch._utils", "getattr") + b"R"}),
                                 "torch._utils.getattr", False),
    }
    out = {}
    for name, (pkl, offending, runnable) in files.items():
        path = write_torch_zip(tmp_path / f"{name.replace(' ', '_')}.pth", pkl,
                               {"0": FOUR_FLOATS.tobytes()})
        out[name] = (path, pkl, offending, runnable)
    return out


def test_malicious_pickles_are_refused(tmp_path):
    marker = tmp_path / "pwned"
    files = malicious_files(tmp_path, marker)
    assert b"\x93" in files["subprocess.Popen"][1]                        # STACK_GLOBAL present
    for name, (path, _, offending, _) in files.items():
        for reader in (read_checkpoint, inspect_checkpoint):
            with pytest.raises(Exception) as excinfo:
                reader(path)
            assert type(excinfo.value) is CheckpointError, (name, excinfo.value)
            message = str(excinfo.value)
            assert f"asks for {offending}," in message and "may be malicious" in message, message
            assert str(path) in message
        assert not marker.exists(), f"{name}: the payload ran"


def test_malicious_payloads_are_real(tmp_path):
    """Positive control: plain pickle on the same bytes does run the code (it only touches a file
    in tmp_path). Without this, the refusal test could pass with a harmless payload."""
    marker = tmp_path / "pwned"
    for name, (path, pkl, _, runnable) in malicious_files(tmp_path, marker).items():
        if not runnable:
            continue
        with zipfile.ZipFile(path) as zf:
            assert zf.read("archive/data.pkl") == pkl
        try:
            result = pickle.loads(pkl)               # runs the payload ...
        except pickle.UnpicklingError:               # ... then trips over the tensor's persistent id
            result = None
        if isinstance(result, dict) and isinstance(result.get("evil"), subprocess.Popen):
            result["evil"].wait()
        assert marker.exists(), name
        marker.unlink()


def test_malformed_tensor_records(tmp_path):
    storage = {"0": FOUR_FLOATS.tobytes()}
    cases = {
        "outside": (p_dict({"w": p_tensor("0", 4, 2, (3,), (1,))}), "reaches outside its storage"),
        "stride": (p_dict({"w": p_tensor("0", 4, 0, (2, 2), (3, 1))}), "reaches outside"),
        "numel": (p_dict({"w": p_tensor("0", 8, 0, (8,), (1,))}), "has 16 bytes"),
        "no_storage": (p_dict({"w": p_tensor("5", 4, 0, (4,), (1,))}), "archive/data/5"),
        "dtype": (p_dict({"w": p_tensor("0", 4, 0, (4,), (1,), storage="DoubleStorage")}),
                  "4 x fp64 = 32 bytes"),
        "persid": (b"\x80\x02}(" + p_str("w") + p_tuple(p_str("evil")) + b"Qu.", "persistent id"),
        "ndim": (p_dict({"w": p_tensor("0", 4, 0, (2, 2), (1,))}), "stride"),
    }
    for name, (pkl, message) in cases.items():
        path = write_torch_zip(tmp_path / f"{name}.pth", pkl, storage)
        text = raises_checkpoint_error(path)
        assert message in text, (name, text)
        assert "truncated or corrupt" in text


# ---- truncated, corrupt and foreign files ----

@pytest.mark.parametrize("fraction", [0.1, 0.5, 0.99])
def test_truncated_fixture(tmp_path, fraction):
    src = fixture_path("synthetic_L3_C256")
    data = src.read_bytes()
    path = tmp_path / "cut.pth"
    path.write_bytes(data[: int(len(data) * fraction)])
    assert "truncated or corrupt" in raises_checkpoint_error(path)


def test_truncated_small_file_at_every_cut(tmp_path):
    """Every cut of a small torch file is an error, never another exception or a wrong array."""
    src = tmp_path / "small.pth"
    torch.save({"a": torch.arange(10.0), "b": torch.ones(3, dtype=torch.bfloat16)}, src)
    data = src.read_bytes()
    for cut in range(0, len(data), 7):
        path = tmp_path / "cut.pth"
        path.write_bytes(data[:cut])
        raises_checkpoint_error(path)


def _small_pth_bytes():
    buffer = io.BytesIO()
    torch.save({"a": torch.arange(6.0).reshape(2, 3).t(), "b": torch.ones(3, dtype=torch.bfloat16),
                "c": torch.arange(4)}, buffer)
    return buffer.getvalue()


SMALL_PTH = _small_pth_bytes()


@settings(max_examples=200, deadline=None)
@given(edits=st.lists(st.tuples(st.integers(0, len(SMALL_PTH) - 1), st.integers(0, 255)),
                      min_size=1, max_size=8))
def test_random_corruption_is_an_error_or_a_read(tmp_path_factory, edits):
    """Bytes changed anywhere: either the file still reads (a changed tensor byte cannot be
    detected: storages are mapped, not CRC-checked) or it is a CheckpointError -- never any other
    exception. (tmp_path_factory: hypothesis reruns the body, a function-scoped tmp_path would be
    shared between examples.)"""
    data = bytearray(SMALL_PTH)
    for position, value in edits:
        data[position] = value
    path = tmp_path_factory.mktemp("fuzz") / "fuzzed.pth"
    path.write_bytes(bytes(data))
    try:
        weights = read_checkpoint(path)
    except CheckpointError as e:
        assert type(e) is CheckpointError and str(path) in str(e)
    else:
        assert set(weights) <= {"a", "b", "c"}


def test_missing_storage_member(tmp_path):
    src = fixture_path("synthetic_L3_C256")
    victim = next(n for n in member_names(src) if n.endswith("/data/7"))
    path = rezip(src, tmp_path / "missing.pth", lambda n, d: None if n == victim else d)
    text = raises_checkpoint_error(path)
    assert repr(victim) in text and "not in the archive" in text


def test_short_storage_member(tmp_path):
    src = fixture_path("synthetic_L3_C256")
    victim = next(n for n in member_names(src) if n.endswith("/data/0"))
    path = rezip(src, tmp_path / "short.pth", lambda n, d: d[: len(d) // 2] if n == victim else d)
    assert repr(victim) in raises_checkpoint_error(path)


def test_corrupt_pickle(tmp_path):
    src = fixture_path("synthetic_L3_C256")
    # bytes flipped in place: the zip CRC of data.pkl no longer matches
    with zipfile.ZipFile(src) as zf:
        info = next(i for i in zf.infolist() if i.filename.endswith("data.pkl"))
    data = bytearray(src.read_bytes())
    start = info.header_offset + 200
    data[start:start + 64] = bytes(64)
    flipped = tmp_path / "flipped.pth"
    flipped.write_bytes(bytes(data))
    assert "truncated or corrupt" in raises_checkpoint_error(flipped)
    # garbage with a valid CRC (re-zipped): the pickle itself cannot be parsed
    rng = np.random.default_rng(0)
    for name, junk in {"random": rng.bytes(500), "cut": zipfile.ZipFile(src).read(info.filename)[:300],
                       "empty": b""}.items():
        path = rezip(src, tmp_path / f"{name}.pth", lambda n, d: junk if n.endswith("data.pkl") else d)
        assert "data.pkl" in raises_checkpoint_error(path), name


def test_foreign_files(tmp_path):
    cases = {
        "empty.pth": (b"", "empty (0 bytes)"),
        "notes.pth": (b"these are not the weights you are looking for\n", "a text file"),
        "page.pth": (b"<!DOCTYPE html><html><body>404</body></html>", "HTML page"),
        "lfs.pth": (b"version https://git-lfs.github.com/spec/v1\noid sha256:abc\nsize 123\n",
                    "Git LFS pointer"),
        "model.gguf": (b"GGUF\x03\x00\x00\x00" + bytes(64), "GGUF"),
        "random.pth": (np.random.default_rng(0).bytes(1000), "unknown binary format"),
        "random.safetensors": (b"\xff" * 16, "unknown binary format"),
        "array.npy": (b"\x93NUMPY\x01\x00" + bytes(20), ".npy"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / name
        path.write_bytes(data)
        text = raises_checkpoint_error(path)
        assert message in text, (name, text)
        if name != "empty.pth":
            assert "tinyrwkv reads PyTorch zip checkpoints" in text
    np.savez(tmp_path / "arrays.npz", a=np.ones(2))
    assert ".npz" in raises_checkpoint_error(tmp_path / "arrays.npz")
    assert "does not exist" in raises_checkpoint_error(tmp_path / "nothing_here.pth")
    assert "directory" in raises_checkpoint_error(tmp_path)


def test_legacy_torch_format(tmp_path):
    path = tmp_path / "legacy.pth"
    torch.save({"w": torch.ones(2)}, path, _use_new_zipfile_serialization=False)
    assert "legacy torch format" in raises_checkpoint_error(path)


@pytest.mark.filterwarnings("ignore::DeprecationWarning")     # torch.jit is deprecated, still writes
def test_torchscript_archive(tmp_path):
    path = tmp_path / "scripted.pt"
    torch.jit.save(torch.jit.script(torch.nn.Linear(2, 2)), path)
    assert "TorchScript" in raises_checkpoint_error(path)


def safetensors_bytes(header, data=b"", length=None):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text) if length is None else length) + text + data


def test_corrupt_safetensors(tmp_path):
    good = {"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}}
    cases = {
        "header_beyond_file": (safetensors_bytes(good, bytes(8), length=10**6), "header says"),
        "invalid_json": (safetensors_bytes(b'{"w": {"dtype": ', bytes(8)), "not valid JSON"),
        "not_object": (safetensors_bytes(b'{"w": [1, 2]}   ', bytes(8)), "lacks dtype"),
        "outside": (safetensors_bytes({"w": {"dtype": "F32", "shape": [2], "data_offsets": [0, 8]}},
                                      bytes(4)), "outside the 4-byte data section"),
        "size_mismatch": (safetensors_bytes({"w": {"dtype": "F32", "shape": [3], "data_offsets": [0, 8]}},
                                            bytes(8)), "needs 12"),
        "deep_json": (safetensors_bytes(b"{\"a\":" + b"[" * 100000 + b"]" * 100000 + b"}"), "not valid JSON"),
        "negative": (safetensors_bytes({"w": {"dtype": "F32", "shape": [-2], "data_offsets": [0, 8]}},
                                       bytes(8)), "malformed"),
    }
    for name, (data, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(data)
        text = raises_checkpoint_error(path)
        assert message in text and "truncated or corrupt" in text, (name, text)
    path = tmp_path / "fp8.safetensors"
    path.write_bytes(safetensors_bytes({"w": {"dtype": "F8_E4M3", "shape": [2], "data_offsets": [0, 2]}},
                                       bytes(2)))
    assert "'F8_E4M3'" in raises_checkpoint_error(path)
    # a real file cut short
    save_safetensors(tmp_path / "ok.safetensors", numpy_zoo())
    raw = (tmp_path / "ok.safetensors").read_bytes()
    for cut in (4, 20, len(raw) - 3):
        (tmp_path / "cut.safetensors").write_bytes(raw[:cut])
        raises_checkpoint_error(tmp_path / "cut.safetensors")


# ---- model versions ----

X070_LAYER0 = ["emb.weight", "blocks.0.ln0.weight", "blocks.0.att.x_r", "blocks.0.att.w0",
               "blocks.0.att.k_k", "blocks.0.att.k_a", "blocks.0.att.r_k", "blocks.0.ffn.key.weight",
               "head.weight"]

VERSION_CASES = {
    "rwkv4": (["emb.weight", "blocks.0.att.time_decay", "blocks.0.att.time_first",
               "blocks.0.att.time_mix_k", "blocks.0.ffn.time_mix_k"], "RWKV-4"),
    "rwkv5": (["emb.weight", "blocks.0.att.time_mix_k", "blocks.0.att.time_decay",
               "blocks.0.att.time_faaaa", "blocks.0.att.ln_x.weight"], "RWKV-5"),
    "rwkv6": (["emb.weight", "blocks.0.att.time_maa_x", "blocks.0.att.time_maa_w1",
               "blocks.0.att.time_decay_w1", "blocks.0.att.time_faaaa"], "RWKV-6"),
    "rc7_aaaaa": (["emb.weight", "blocks.0.att.time_maa_x", "blocks.0.att.time_decay_w1",
                   "blocks.0.att.time_faaaa", "blocks.0.att.time_aaaaa"], "pre-release RWKV-7"),
    "rc7_misc": (["emb.weight", "blocks.0.att.time_misc_a", "blocks.0.att.time_decay"],
                 "pre-release RWKV-7"),
    "rc7_mixed": (X070_LAYER0 + ["blocks.0.att.time_maa_r"], "pre-release RWKV-7"),
    "rwkv7b": (X070_LAYER0 + ["blocks.0.ffn.s_emb.weight", "blocks.0.qkv.qq.weight"], "rwkv7b"),
    "fla": (["model.embeddings.weight", "model.layers.0.attn.r_proj.weight", "lm_head.weight"],
            "Hugging Face / flash-linear-attention"),
    "module_prefix": (["module." + k for k in X070_LAYER0], "prefixed with 'module.'"),
    "model_prefix": (["model." + k for k in X070_LAYER0], "prefixed with 'model.'"),
    "prefixed_rwkv6": (["module.blocks.0.att.time_maa_x", "module.emb.weight"], "RWKV-6"),
    "gpt2": (["wte.weight", "h.0.attn.c_attn.weight"], "no RWKV keys found; first keys: wte.weight"),
    "vit": (["blocks.0.attn.qkv.weight", "blocks.0.norm1.weight"], "no RWKV keys found"),
    "state": (["blocks.0.att.time_state", "blocks.1.att.time_state"], "state-tuning"),
    "lora": (["blocks.0.att.key.lora_A", "blocks.0.att.key.lora_B"], "LoRA"),
}


@pytest.mark.parametrize("case", VERSION_CASES)
def test_unsupported_versions(case):
    keys, expected = VERSION_CASES[case]
    with pytest.raises(UnsupportedCheckpoint) as excinfo:
        detect_version(keys)
    message = str(excinfo.value)
    assert expected in message, message
    assert "tinyrwkv supports RWKV-7 x070 and its DeepEmbed variant" in message
    assert isinstance(excinfo.value, CheckpointError)
    if case == "rwkv7b":
        assert "cache" in message and "not supported" in message
    if case == "fla":
        assert "not official key names" in message and "tinyrwkv.load" in message


def test_supported_versions():
    assert detect_version(X070_LAYER0) == "x070"
    assert detect_version(X070_LAYER0 + ["blocks.0.ffn.s_emb.weight"]) == "x070-deepembed"


def test_rwkv6_file_end_to_end(tmp_path):
    C, H = 8, 2
    sd = {"emb.weight": torch.zeros(11, C), "blocks.0.ln0.weight": torch.ones(C),
          "blocks.0.att.time_maa_x": torch.zeros(1, 1, C), "blocks.0.att.time_maa_w1": torch.zeros(C, 160),
          "blocks.0.att.time_decay": torch.zeros(1, 1, C), "blocks.0.att.time_decay_w1": torch.zeros(C, 64),
          "blocks.0.att.time_faaaa": torch.zeros(H, C // H), "head.weight": torch.zeros(11, C)}
    path = tmp_path / "RWKV-x060-tiny.pth"
    torch.save({k: v.to(torch.bfloat16) for k, v in sd.items()}, path)
    weights = read_checkpoint(path)
    with pytest.raises(UnsupportedCheckpoint, match="RWKV-6"):
        detect_version(weights.keys())


# ---- check_x070_keys ----

def tiny_x070(L=2, C=8, H=2, V=11, F=32, ranks=(4, 6, 2, 10), deep=False, D=3):
    """Zeros in the stored shapes of docs/architecture.md §7.1 (and §4.2 with deep=True)."""
    N = C // H
    Dw, Da, Dv, Dg = ranks
    w = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,),
         "ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)}
    for i in range(L):
        b = f"blocks.{i}."
        w.update({b + n: (C,) for n in ("ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias",
                                        "att.ln_x.weight", "att.ln_x.bias")})
        w.update({b + "att." + n: (1, 1, C) for n in ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g",
                                                      "w0", "a0", "v0", "k_k", "k_a")})
        for n, r in zip("wavg", ranks):
            w[b + f"att.{n}1"], w[b + f"att.{n}2"] = (C, r), (r, C)
        w.update({b + "att.r_k": (H, N), b + "att.receptance.weight": (C, C),
                  b + "att.key.weight": (C, C), b + "att.value.weight": (C, C),
                  b + "att.output.weight": (C, C), b + "ffn.x_k": (1, 1, C),
                  b + "ffn.key.weight": (F, C), b + "ffn.value.weight": (C, F)})
        if deep:
            w.update({b + "ffn.s_emb.weight": (V, D * D), b + "ffn.s_emb_x.weight": (D * D, C),
                      b + "ffn.s1": (C, D), b + "ffn.s2": (D, F), b + "ffn.s0": (1, 1, F)})
    return {k: np.zeros(shape, np.float32) for k, shape in w.items()}


def check_error(weights):
    with pytest.raises(CheckpointError) as excinfo:
        check_x070_keys(weights, source="tiny.pth")
    assert type(excinfo.value) is CheckpointError
    assert "tiny.pth" in str(excinfo.value)
    return str(excinfo.value)


def test_check_x070_keys_accepts_valid_layouts():
    check_x070_keys(tiny_x070())
    check_x070_keys(tiny_x070(L=1))
    check_x070_keys(tiny_x070(deep=True))
    w = tiny_x070()
    del w["blocks.0.att.v1"]                                  # layer 0's v1 is unused
    check_x070_keys(w)
    for k in ("blocks.0.att.v0", "blocks.0.att.v2"):
        del w[k]
    check_x070_keys(w)
    w = tiny_x070()                                           # llama.cpp's layer 0: copies
    w.update({f"blocks.0.att.v{n}": w[f"blocks.0.att.a{n}"] for n in "012"})    # of a0/a1/a2
    check_x070_keys(w)
    w["blocks.0.att.v1"] = np.zeros((8, 3), np.float32)       # any shape: layer 0 never uses it
    check_x070_keys(w)
    squeezed = {k: v.reshape(-1) if v.ndim == 3 else v for k, v in tiny_x070(deep=True).items()}
    check_x070_keys(squeezed)                                # (1, 1, C) stored as (C,)


def test_check_x070_keys_reports_problems():
    w = tiny_x070()
    del w["blocks.1.att.k_a"]
    assert "1 missing: blocks.1.att.k_a" in check_error(w)

    w = tiny_x070()
    w["blocks.1.att.w2"] = np.zeros((5, 8), np.float32)
    assert "blocks.1.att.w2 (5, 8) (expected (4, 8))" in check_error(w)

    w = tiny_x070()
    w["blocks.1.ffn.x_k"] = np.zeros((1, 8, 1), np.float32)
    assert "blocks.1.ffn.x_k (1, 8, 1)" in check_error(w)

    w = tiny_x070()
    w["blocks.0.att.time_first"] = np.zeros(8, np.float32)
    w["extra.weight"] = np.zeros(1, np.float32)
    message = check_error(w)
    assert "2 unexpected: blocks.0.att.time_first, extra.weight" in message

    w = tiny_x070(L=3)
    for k in [k for k in w if k.startswith("blocks.1.")]:         # a whole layer gone
        del w[k]
    assert "and " in check_error(w) and "more" in check_error(w)

    w = tiny_x070(deep=True)
    del w["blocks.1.ffn.s2"]
    assert "blocks.1.ffn.s2" in check_error(w)


    w = tiny_x070()
    w["emb.weight"] = np.zeros((11, 12), np.float32)              # C != H * N
    assert "!= 2 x 4" in check_error(w)

    w = tiny_x070()
    del w["blocks.0.att.r_k"]
    assert "blocks.0.att.r_k" in check_error(w)


def test_check_x070_keys_accepts_shape_only_objects():
    """`tinyrwkv info` checks shapes from inspect_checkpoint without loading arrays."""
    from types import SimpleNamespace
    check_x070_keys({k: SimpleNamespace(shape=v.shape) for k, v in tiny_x070().items()})
