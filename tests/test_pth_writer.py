"""formats/pth_writer.py: torch .pth files written without torch (docs/formats.md §1.5).

The oracle is torch itself (a test-only dependency): every file save_pth writes must load in
torch.load (weights_only=True and False, and mmap=True) with the dtype, shape, strides and bits
torch's own conversion gives; its pickle must say what torch.save's says; and its zip layout must
be what torch.save's is (members, stored, 64-byte aligned). tinyrwkv's own reader must read it
back too, which is checked with and without torch.
"""
import io
import pickle
import struct
import zipfile

import numpy as np
import pytest

from tinyrwkv.files import temporaries_of
from tinyrwkv.formats import InMemory, read_checkpoint
from tinyrwkv.formats.lora import initial_state, merge_lora, read_adapter
from tinyrwkv.formats.pth import save_pth, write_pth
from tinyrwkv.formats import pth_writer
from tinyrwkv.model import Config

# special_values holds 70000, which float16 cannot hold: NumPy's cast warns and gives inf, as
# torch's gives silently; the tests check the inf.
pytestmark = pytest.mark.filterwarnings("ignore:overflow encountered in cast:RuntimeWarning")

# Awkward shapes: 0-d, 1-d of one and of odd length, an (H, N, N) state, 4-d, and empty ones
# (torch's contiguous stride of an empty dimension counts it as 1).
SHAPES = [(), (1,), (7,), (3, 5), (3, 8, 8), (2, 3, 1, 5), (0,), (2, 0, 3), (257, 300)]
DTYPES = [None, "float32", "float16", "bfloat16"]


@pytest.fixture(scope="module")
def torch():
    return pytest.importorskip("torch", reason="torch is the oracle for .pth: pip install -e '.[test]'")


def special_values(rng, n):
    """Values where conversions go wrong: signed zeros, infinities, NaN, float32 subnormals,
    float16 overflow and subnormals, and bf16 rounding ties (low 16 bits exactly 0x8000, with an
    even and an odd kept bit) and near-ties."""
    bits = np.array([0x3F808000, 0x3F818000, 0x3F807FFF, 0x3F808001, 0x7F7FFFFF, 0x00000001,
                     0x80400000], np.uint32).view(np.float32)
    fixed = np.array([0.0, -0.0, np.inf, -np.inf, np.nan, 70000.0, -1e-7, 6e-8], np.float32)
    values = np.concatenate([bits, fixed, rng.standard_normal(n).astype(np.float32) * 100])
    return values[:max(n, 0)] if n < len(values) else values


def random_tensors(rng, dtype):
    """{name: array} over SHAPES; for dtype None a mix of float32, float16, float64 and int64
    arrays (each stored as itself), else float32 arrays with special values mixed in."""
    out = {}
    for i, shape in enumerate(SHAPES):
        n = int(np.prod(shape))             # (70000 overflows float16: inf, as torch gives)
        x = rng.permutation(special_values(rng, n))[:n].reshape(shape)
        if dtype is None:
            with np.errstate(over="ignore"):                # 70000 -> float16 inf: meant
                x = x.astype([np.float32, np.float16, np.float64][i % 3])
        out[f"t{i}.weight"] = x
    out["steps"] = rng.integers(-2**40, 2**40, size=(3,))           # ints are never converted
    out["blocks.0.tête_名"] = rng.standard_normal(2).astype(np.float32)  # a non-ASCII name
    return out


def torch_reference(torch, array, dtype):
    """torch's own conversion of `array` to what save_pth(dtype=...) stores."""
    t = torch.from_numpy(np.array(array))
    if not t.is_floating_point():
        return t
    return t if dtype is None else t.to(getattr(torch, dtype))


def assert_same_tensor(torch, got, want, name):
    """Equal dtype, shape and contiguous layout, and equal bits, except that a NaN need only stay
    NaN: torch's float32->bf16 NaN pattern depends on the code path (0xFFFF in its vectorised
    CPU conversion, 0x7FC0 in c10's scalar one), and both are NaN."""
    assert got.dtype == want.dtype, name
    assert tuple(got.shape) == tuple(want.shape), name
    assert got.is_contiguous() and got.storage_offset() == 0, name
    assert got.stride() == torch.empty(want.shape).stride(), name      # torch's contiguous strides
    if not got.is_floating_point():
        assert torch.equal(got, want), name
        return
    as_int = {2: torch.int16, 4: torch.int32, 8: torch.int64}[got.element_size()]
    nan = torch.isnan(want)
    assert torch.equal(torch.isnan(got), nan), name
    assert torch.equal(got[~nan].view(as_int), want[~nan].view(as_int)), name


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("seed", [0, 1])
def test_torch_load_reads_it_bit_for_bit(torch, tmp_path, dtype, seed):
    rng = np.random.default_rng(seed)
    tensors = random_tensors(rng, dtype)
    path = tmp_path / "t.pth"
    save_pth(path, tensors, dtype)
    loads = {"weights_only": dict(weights_only=True), "full": dict(weights_only=False),
             "mmap": dict(weights_only=True, mmap=True)}
    for how, kwargs in loads.items():
        loaded = torch.load(path, **kwargs)
        assert list(loaded) == list(tensors), how                   # names, in order
        for name, array in tensors.items():
            assert_same_tensor(torch, loaded[name], torch_reference(torch, array, dtype),
                               f"{name} ({how})")


@pytest.mark.parametrize("dtype", DTYPES)
def test_tinyrwkv_reads_it_back(tmp_path, dtype):
    """read_checkpoint, torch-free: float32/16/64 and ints exactly; bf16 (widened to float32)
    within half a bf16 ulp (2^-8 relative: 7 stored fraction bits) and exactly for values that
    are bf16 already; with dtype="bfloat16" the stored bits equal what torch wrote (checked in
    test_torch_load_reads_it_bit_for_bit)."""
    rng = np.random.default_rng(7)
    tensors = random_tensors(rng, dtype)
    tensors["bf16_exact"] = (rng.integers(0, 2**16, 33, dtype=np.uint32) << 16).view(np.float32)
    tensors["bf16_exact"][~np.isfinite(tensors["bf16_exact"])] = 1.0
    path = tmp_path / "t.pth"
    save_pth(path, tensors, dtype)
    back = read_checkpoint(path)
    assert list(back) == list(tensors)
    for name, x in tensors.items():
        got = back[name]
        assert got.shape == x.shape, name
        if x.dtype.kind != "f" or dtype in (None, "float32"):
            assert got.dtype == x.dtype, name
            np.testing.assert_array_equal(got, x, err_msg=name)
        elif dtype == "float16":
            np.testing.assert_array_equal(got, x.astype(np.float16), err_msg=name)
        else:
            assert got.dtype == np.float32, name
            finite = np.isfinite(x) & (np.abs(x) < 3.38e38)     # beyond bf16's max rounds to inf
            np.testing.assert_array_equal(np.isnan(got), np.isnan(x), err_msg=name)
            err = np.abs(got[finite].astype(np.float64) - x[finite])
            assert np.all(err <= 2.0**-8 * np.abs(x[finite].astype(np.float64)) + 2.0**-133), name
    if dtype != "float16":                      # float16 rounds them (checked above)
        np.testing.assert_array_equal(back["bf16_exact"], tensors["bf16_exact"])


def test_bf16_bits_are_stored_as_they_are(tmp_path):
    """np.uint16 arrays are bf16 bit patterns (what read_checkpoint(dtype="bfloat16") returns):
    with dtype None they are stored unchanged, so a bf16 file read as bits and saved again is the
    same tensors; with dtype="float32" they are widened exactly."""
    rng = np.random.default_rng(3)
    bits = rng.integers(0, 0x7F80, size=(4, 6), dtype=np.uint16)   # finite positive bf16s
    for order in ("<u2", ">u2"):                  # in either byte order
        save_pth(tmp_path / "a.pth", {"w": bits.astype(order)})
        back = read_checkpoint(tmp_path / "a.pth", dtype="bfloat16")["w"]
        np.testing.assert_array_equal(back, bits)
        save_pth(tmp_path / "b.pth", {"w": bits.astype(order)}, "float32")
        wide = read_checkpoint(tmp_path / "b.pth")["w"]
        assert wide.dtype == np.float32
        np.testing.assert_array_equal(wide.view(np.uint32), bits.astype(np.uint32) << 16)


def test_any_strides_and_byte_order(torch, tmp_path):
    rng = np.random.default_rng(4)
    base = rng.standard_normal((6, 10)).astype(np.float32)
    tensors = {"transposed": base.T, "strided": base[::2, 1::3], "big_endian": base.astype(">f4"),
               "negative": base[::-1]}
    save_pth(tmp_path / "v.pth", tensors)
    loaded = torch.load(tmp_path / "v.pth", weights_only=True)
    for name, x in tensors.items():
        assert loaded[name].is_contiguous(), name
        np.testing.assert_array_equal(loaded[name].numpy(), x, err_msg=name)


@pytest.mark.parametrize("n", [0, 1, 255, 256, 65535, 65536, 2**31 - 1, 2**31, 2**40, 2**63,
                               2**64, -1, -256, -2**31, -2**31 - 1, -2**63])
def test_pickle_ints_are_what_pickle_reads(n):
    """Sizes, strides and element counts: every integer opcode (BININT1/2, BININT, LONG1)
    around its boundaries, read by Python's pickle (the shapes of real tensors reach BININT
    only: a test file with 2^31 elements would be 8 GB)."""
    assert pickle.loads(b"\x80\x02" + pth_writer._int(n) + b".") == n


def fresh(torch, array):
    """`array` as a newly allocated torch tensor, as a model's parameters are (from_numpy would
    keep NumPy's strides, which for an empty array are all 0)."""
    source = torch.from_numpy(np.array(array))
    return torch.empty(source.shape, dtype=source.dtype).copy_(source)


def unpickle_as_names(data):
    """data.pkl with Python's pickle, every global turned into a recorded call: a plain
    structure of names, tuples and values (the test's own files only: never a downloaded one)."""
    class Named(str):                       # a global: equal to its name, called -> a record
        def __call__(self, *args):
            return (str(self), args)

    class Recorder(pickle.Unpickler):
        def find_class(self, module, name):
            return Named(f"{module}.{name}")

        def persistent_load(self, pid):
            return ("persistent", pid)
    return Recorder(io.BytesIO(data)).load()


def test_pickle_and_zip_are_what_torch_save_writes(torch, tmp_path):
    """The same dict saved by torch.save and by save_pth: the same members in the same order,
    every one stored with its data 64-byte aligned (found from the local headers, as a memory
    map needs), and data.pkl meaning the same calls (globals, persistent ids, sizes, strides)."""
    rng = np.random.default_rng(5)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32), "b.c": np.float32(2.0),
              "h": rng.standard_normal((2, 4, 4)).astype(np.float16), "e": np.zeros((2, 0, 3), np.float32),
              "i": np.arange(5)}
    ours, theirs = tmp_path / "ours.pth", tmp_path / "theirs.pth"
    save_pth(ours, arrays)
    with open(theirs, "wb") as f:                     # a file object: torch's prefix is "archive"
        torch.save({k: fresh(torch, v) for k, v in arrays.items()}, f)
    members = {}
    for path in (ours, theirs):
        with zipfile.ZipFile(path) as zf:
            assert zf.testzip() is None                   # every CRC right
            infos = zf.infolist()
            members[path] = [i.filename for i in infos]
            raw = path.read_bytes()
            for info in infos:
                assert info.compress_type == zipfile.ZIP_STORED, info.filename
                name_len, extra_len = struct.unpack_from("<HH", raw, info.header_offset + 26)
                start = info.header_offset + 30 + name_len + extra_len
                assert start % 64 == 0, (path.name, info.filename)
                assert raw[start:start + info.file_size] == zf.read(info), info.filename
            small = {n: zf.read(n) for n in members[path] if "/data/" not in n and
                     not n.endswith(("data.pkl", "serialization_id"))}
            ident = zf.read("archive/.data/serialization_id")
            assert len(ident) == 40 and ident.isdigit()
            if path == ours:
                ours_small, ours_pkl = small, zf.read("archive/data.pkl")
            else:
                theirs_small, theirs_pkl = small, zf.read("archive/data.pkl")
    assert members[ours] == members[theirs]
    assert ours_small == theirs_small                     # version, byteorder, alignment, ...
    assert unpickle_as_names(ours_pkl) == unpickle_as_names(theirs_pkl)


def test_zip64_records(torch, tmp_path):
    """Sizes and offsets of 4 GiB and more go in ZIP64 fields. A 4 GiB file is too slow for a
    test, so the writer is told to use ZIP64 for every size and offset (zip64_at=0): every 32-bit
    field is then the 0xFFFFFFFF sentinel, and torch, zipfile and tinyrwkv must read the sizes and
    offsets from the ZIP64 records alone."""
    rng = np.random.default_rng(6)
    arrays = {"a": rng.standard_normal((3, 5)).astype(np.float32), "s": np.float32(3.0)}
    plan = {k: ("FloatStorage", v.shape) for k, v in arrays.items()}
    path = tmp_path / "z.pth"
    pth_writer._write(path, plan, arrays.get, zip64_at=0)
    raw = path.read_bytes()
    end = raw.rindex(b"PK\x05\x06")
    assert struct.unpack_from("<HHII", raw, end + 8) == (0xFFFF, 0xFFFF, 0xFFFFFFFF, 0xFFFFFFFF)
    central = raw.index(b"PK\x01\x02")                 # the first central directory entry:
    assert struct.unpack_from("<II", raw, central + 20) == (0xFFFFFFFF, 0xFFFFFFFF)   # sizes
    assert struct.unpack_from("<I", raw, central + 42) == (0xFFFFFFFF,)              # offset
    with zipfile.ZipFile(path) as zf:
        assert zf.testzip() is None
        assert [i.file_size for i in zf.infolist()][4:6] == [60, 4]    # data/0, data/1
    loaded = torch.load(path, weights_only=True, mmap=True)
    back = read_checkpoint(path)
    for name, x in arrays.items():
        np.testing.assert_array_equal(loaded[name].numpy(), x)
        np.testing.assert_array_equal(back[name], x)


def peft_config():
    H, N = 2, 8
    return Config(n_layer=2, n_embd=H * N, n_head=H, head_size=N, vocab_size=11, dim_ffn=4 * H * N,
                  d_decay=4, d_aaa=4, d_mv=4, d_gate=4, variant="x070")


def test_rwkv_peft_lora_and_state_files(torch, tmp_path):
    """RWKV-PEFT's keys (docs/formats.md §6) written as bf16, as RWKV-PEFT saves them: torch
    reads the bits torch's conversion gives, read_adapter / merge_lora and initial_state read the
    values (merged against a float64 W + B A alpha / r from torch's tensors)."""
    rng = np.random.default_rng(8)
    cfg, r, alpha = peft_config(), 4, 8.0
    C, F = cfg.n_embd, cfg.dim_ffn
    shapes = {"att.receptance": (C, C), "att.key": (C, C), "att.value": (C, C),
              "att.output": (C, C), "ffn.key": (F, C), "ffn.value": (C, F)}
    lora, base = {}, {}
    for i in range(cfg.n_layer):
        for stem, (out_dim, in_dim) in shapes.items():
            lora[f"blocks.{i}.{stem}.lora_A"] = rng.standard_normal((r, in_dim)).astype(np.float32)
            lora[f"blocks.{i}.{stem}.lora_B"] = rng.standard_normal((out_dim, r)).astype(np.float32)
            base[f"blocks.{i}.{stem}.weight"] = rng.standard_normal((out_dim, in_dim)).astype(np.float32)
    lora["blocks.0.ln1.weight"] = rng.standard_normal(C).astype(np.float32)   # a fully trained one
    base["blocks.0.ln1.weight"] = np.ones(C, np.float32)
    state = {f"blocks.{i}.att.time_state":
             rng.standard_normal((cfg.n_head, cfg.head_size, cfg.head_size)).astype(np.float32)
             for i in range(cfg.n_layer)}
    save_pth(tmp_path / "rwkv-lora.pth", lora, "bfloat16")
    save_pth(tmp_path / "rwkv-state.pth", state, "bfloat16")

    want = {k: torch.from_numpy(v).to(torch.bfloat16) for k, v in lora.items()}
    got = torch.load(tmp_path / "rwkv-lora.pth", weights_only=True)
    for k in lora:
        assert_same_tensor(torch, got[k], want[k], k)
    adapter, file_alpha = read_adapter(tmp_path / "rwkv-lora.pth")
    assert file_alpha is None and set(adapter) == set(lora)
    merged = merge_lora(base, adapter, alpha)
    for k in base:
        stem = k[:-len(".weight")]
        if stem + ".lora_A" in lora:
            A, B = (want[f"{stem}.lora_{x}"].double().numpy() for x in "AB")
            ref = base[k].astype(np.float64) + B @ A * (alpha / r)
            # float32 rounding of the merge: a few float32 ulps of the largest entry
            np.testing.assert_allclose(merged[k], ref, rtol=0, atol=4 * 2.0**-23 * np.abs(ref).max())
    np.testing.assert_array_equal(merged["blocks.0.ln1.weight"],
                                  want["blocks.0.ln1.weight"].float().numpy())

    loaded_state = torch.load(tmp_path / "rwkv-state.pth", weights_only=True)
    s0 = initial_state(read_checkpoint(tmp_path / "rwkv-state.pth"), cfg)
    for i in range(cfg.n_layer):
        k = f"blocks.{i}.att.time_state"
        assert_same_tensor(torch, loaded_state[k], torch.from_numpy(state[k]).to(torch.bfloat16), k)
        np.testing.assert_array_equal(s0.wkv[i], loaded_state[k].float().numpy())


class FailsAt(InMemory):
    """A source whose read of one key raises, as a disk error or an interrupt midway would."""

    def __init__(self, arrays, bad):
        super().__init__(arrays)
        self.bad = bad

    def read(self, key, dtype=None):
        if key == self.bad:
            raise OSError("the disk went away")
        return super().read(key, dtype)


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16"])
def test_write_pth_converts_a_source_as_torch_did(torch, tmp_path, out_type):
    """write_pth (tinyrwkv convert to .pth) without torch: each tensor read as float32 and
    converted, as the torch version did with torch.tensor(...).to(dtype)."""
    rng = np.random.default_rng(9)
    arrays = {"emb.weight": rng.standard_normal((11, 16)).astype(np.float32),
              "blocks.0.att.r_k": rng.standard_normal((2, 8)).astype(np.float16),
              "blocks.0.att.x_r": special_values(rng, 17).reshape(1, 1, 17)}
    write_pth(tmp_path / "m.pth", InMemory(arrays), out_type)
    dt = {"f32": torch.float32, "f16": torch.float16, "bf16": torch.bfloat16}[out_type]
    loaded = torch.load(tmp_path / "m.pth", weights_only=True)
    assert list(loaded) == list(arrays)
    for k, x in arrays.items():
        assert_same_tensor(torch, loaded[k], torch.tensor(x.astype(np.float32)).to(dt), k)


def test_writes_are_atomic_and_deterministic(tmp_path):
    rng = np.random.default_rng(10)
    arrays = {f"w{i}": rng.standard_normal((5, 3)).astype(np.float32) for i in range(3)}
    target = tmp_path / "m.pth"
    save_pth(target, arrays)
    before = target.read_bytes()
    save_pth(tmp_path / "again.pth", arrays)
    assert (tmp_path / "again.pth").read_bytes() == before         # same input, same bytes
    with pytest.raises(OSError, match="disk went away"):
        write_pth(target, FailsAt(arrays, "w1"), "f32")           # fails after data/0 was written
    assert target.read_bytes() == before and temporaries_of(target) == []


@pytest.mark.parametrize("tensors, dtype, message", [
    ({}, None, "no tensors"),
    ({3: np.zeros(2, np.float32)}, None, "names are strings"),
    ({"c": np.zeros(2, np.complex64)}, None, "complex64.*convert it first"),
    ({"u": np.zeros(2, np.uint32)}, "float32", "uint32.*convert it first"),
    ({"w": np.zeros(2, np.float32)}, "int8", "floating dtype"),
])
def test_refusals_name_the_problem(tmp_path, tensors, dtype, message):
    with pytest.raises(ValueError, match=message):
        save_pth(tmp_path / "x.pth", tensors, dtype)
    assert not (tmp_path / "x.pth").exists() and temporaries_of(tmp_path / "x.pth") == []
