"""Weights stored as float16 and as int8 (GGUF Q8_0 blocks) in the numba backend
(tinyrwkv/backends/numba_cpu.py, numba_decode.py; the format: tinyrwkv/formats/q8_0.py).

Correctness is checked against the float64 reference run on the SAME stored numbers
(`model.stored_tensors()`: float16 widened, Q8_0 dequantised, both exact in float32), so what is
left is float32 arithmetic and the float32 tolerance holds (TOL_F32, tests/conftest.py; the same
argument as tests/test_numba_decode.py). What the storage itself costs, against the float64
model on the original weights (the rounding included), is measured by
`python benchmarks/storage_error.py` (64 tokens, max|Δlogit| / std(logits)):

    storage     shipped model (bf16 file)   0.1B-shaped synthetic (float32 weights)
    float32     3.8e-6                      4.0e-6
    bfloat16    4.5e-6                      2.5e-2
    float16     4.2e-6                      3.3e-3
    int8        3.8e-2                      8.7e-2

(the shipped model's weights are bf16, which bfloat16 keeps exactly and float16 holds exactly
in its range). test_storage_costs_are_ordered checks the same order on a small model.
"""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.formats.q8_0 import BLOCK, BLOCK_BYTES, dequantize_q8_0, quantize_q8_0
from tinyrwkv.synthetic import make_weights

from conftest import TOL_F32, have, numba_model, on_threads, random_state, rel_err, run_tokens

pytestmark = pytest.mark.skipif(not have("numba"), reason="numba is not installed")

OFFICIAL_RANKS = (64, 64, 32, 128)     # (Dw, Da, Dv, Dg) of the 0.1B release: unequal on purpose
STORAGES = ("float16", "int8")
TOKENS = 12


def reference_of(model):
    """The float64 reference on exactly the numbers `model` stores."""
    return tinyrwkv.RWKV7(model.stored_tensors(), dtype="float64")


def state_errors(got, want):
    return {n: rel_err(getattr(got, n), getattr(want, n)) for n in ("att_shift", "wkv", "ffn_shift")}


# ---- the widening and the quantiser, bit for bit --------------------------------------------

def finite_float16_patterns():
    """Every float16 bit pattern except inf and NaN (exponent 31): 63488 of them."""
    bits = np.arange(1 << 16, dtype=np.uint32).astype(np.uint16)
    return bits[np.isfinite(bits.view(np.float16))]


def test_float16_bit_trick_is_exact_in_numpy():
    """The trick of numba_decode (FLOAT16_MASK, FLOAT16_SCALE), written in NumPy: float16 bits
    in the top half of an int32, arithmetic shift right by 3, mask, times 2^112."""
    from tinyrwkv.backends.numba_decode import FLOAT16_MASK, FLOAT16_SCALE
    h = finite_float16_patterns()
    top = (h.astype(np.int32) << 16).astype(np.int32)                # sign in bit 31
    bits = ((top >> 3) & np.int32(FLOAT16_MASK - (1 << 32))).view(np.float32)
    widened = bits * np.float32(FLOAT16_SCALE)
    assert np.array_equal(widened.view(np.uint32), h.view(np.float16).astype(np.float32).view(np.uint32))


def test_float16_kernels_widen_every_finite_pattern_exactly():
    """The compiled kernels, on every finite float16: the embedding row read (`row`, float16 and
    the Q8_0 scale path's twin float16_low) and the Q8_0 product (its scale widened in LLVM IR):
    a one-block row with q = (1, 0, ..., 0) times x = (1, 0, ..., 0) is exactly its scale."""
    from numba import njit
    from tinyrwkv.backends import numba_decode as nd
    h = finite_float16_patterns()
    want = h.view(np.float16).astype(np.float32)
    rows = np.concatenate([h, np.zeros(-len(h) % 1024, np.uint16)]).view(np.float16).reshape(-1, 1024)

    @njit
    def read_rows(W, out):
        for i in range(W.shape[0]):
            nd.row(W, i, out[i])
    out = np.empty(rows.shape, np.float32)
    read_rows(nd.as_kernel_matrix(rows), out)
    assert np.array_equal(out.reshape(-1)[:len(h)].view(np.uint32), want.view(np.uint32))

    blocks = np.zeros((len(h), BLOCK_BYTES), np.uint8)               # one block per row
    blocks[:, :2] = h.view(np.uint8).reshape(-1, 2)                  # d = each pattern
    blocks[:, 2] = 1                                                 # q[0] = 1
    x = np.zeros(BLOCK, np.float32)
    x[0] = 1
    products = np.empty(len(h), np.float32)
    nd.matvec(nd.as_kernel_matrix(blocks), x, products, np.zeros((3, 2, BLOCK), np.float32))
    assert np.array_equal(products, want)     # as values: a sum from +0 turns d = -0 into +0


def awkward_values(rng, rows, cols):
    """Rows of blocks that exercise the quantiser: different scales, an all-zero block, exact
    ties (x / d = k + 0.5), negative ties, a block whose maximum is negative."""
    x = (rng.standard_normal((rows, cols)) * rng.uniform(1e-3, 3, (rows, 1))).astype(np.float32)
    x[0, :32] = 0
    x[1, :32] = np.arange(32) - 15.5
    x[1, 31] = 127                                                   # d = 1: halves are ties
    x[2, :32] = -x[1, :32]
    x[3, :32] = np.linspace(-5, 1, 32)
    return x


@pytest.mark.skipif(not have("gguf"), reason="the gguf package is not installed")
def test_q8_0_quantiser_is_ggml_bit_for_bit():
    """formats/q8_0.py against the gguf package's Q8_0 (ggml's reference, bit-exact there)."""
    import gguf
    x = awkward_values(np.random.default_rng(0), 64, 256)
    ours = quantize_q8_0(x)
    theirs = gguf.quants.quantize(x, gguf.GGMLQuantizationType.Q8_0)
    assert ours.shape == (64, 256 // 32 * 34) and np.array_equal(ours, theirs)
    assert np.array_equal(dequantize_q8_0(ours),
                          gguf.quants.dequantize(theirs, gguf.GGMLQuantizationType.Q8_0))


def test_q8_0_dequantised_values_are_the_blocks():
    x = awkward_values(np.random.default_rng(1), 8, 64)
    blocks = quantize_q8_0(x).reshape(8, 2, 34)
    d = blocks[..., :2].copy().view(np.float16).astype(np.float32)          # (8, 2, 1)
    q = blocks[..., 2:].view(np.int8).astype(np.float32)                    # (8, 2, 32)
    values = dequantize_q8_0(blocks.reshape(8, -1))
    assert np.array_equal(values, (d * q).reshape(8, 64))
    # q = round(x / d) with the float32 d, stored d rounded to float16 (relative 2^-11): each
    # value is within d/2 + 127 d 2^-11 < 0.57 d of x
    assert np.all(np.abs(values - x) <= 0.57 * np.abs(d).repeat(32, -1).reshape(8, 64))


# ---- the model against the float64 reference on the same stored numbers ---------------------

@pytest.mark.parametrize("storage", STORAGES)
def test_fused_decode_matches_float64(storage):
    w = make_weights(3, 256, 1000, ranks=OFFICIAL_RANKS, seed=5)
    model = numba_model(w, storage=storage)
    assert model.decode == "fused" and model.backend == f"numba-{'fp16' if storage == 'float16' else 'int8'}"
    ids = np.random.default_rng(1).integers(0, 1000, TOKENS)
    init = random_state(model.config, seed=2)
    got, s_got = run_tokens(model, ids, init)
    want, s_want = run_tokens(reference_of(model), ids, init)
    errors = {"logits": rel_err(got, want), **state_errors(s_got, s_want)}
    assert max(errors.values()) < TOL_F32, errors


@pytest.mark.parametrize("storage", STORAGES)
def test_per_kernel_decode_and_prefill_match_float64(storage):
    """decode="per-kernel" (numba_cpu.matvec on the stored matrices) and the prefill
    (forward_seq: each layer dequantised for BLAS), from a random state, then continuing."""
    w = make_weights(3, 256, 1000, ranks=OFFICIAL_RANKS, seed=6)
    model = numba_model(w, storage=storage, decode="per-kernel")
    ref = reference_of(model)
    ids = np.random.default_rng(2).integers(0, 1000, 2 * TOKENS)
    init = random_state(model.config, seed=3)
    got, s_got = run_tokens(model, ids[:TOKENS], init)
    want, s_want = run_tokens(ref, ids[:TOKENS], init)
    assert max(rel_err(got, want), *state_errors(s_got, s_want).values()) < TOL_F32
    got, s_got = model.forward(ids, init, full_output=True)                  # prefill
    want, s_want = ref.forward(ids, init, full_output=True)
    assert max(rel_err(got, want), *state_errors(s_got, s_want).values()) < TOL_F32
    got, _ = model.forward(ids[:5], s_got, full_output=True)                 # and on from there
    want, _ = ref.forward(ids[:5], s_want, full_output=True)
    assert rel_err(got, want) < TOL_F32


@pytest.mark.parametrize("storage", STORAGES)
def test_deep_embed_model(storage):
    """DeepEmbed (per-kernel decode and prefill): its s_emb table is stored like the other big
    matrices (rows of D*D = 1024 values: whole Q8_0 blocks)."""
    w = make_weights(2, 128, 300, deep_embed=True, seed=8)
    model = numba_model(w, storage=storage)
    assert model.decode == "per-kernel"
    ids = np.random.default_rng(4).integers(0, 300, 6)
    init = random_state(model.config, seed=3)
    ref = reference_of(model)
    assert rel_err(run_tokens(model, ids, init)[0], run_tokens(ref, ids, init)[0]) < TOL_F32
    assert rel_err(model.forward(ids, init, full_output=True)[0],
                   ref.forward(ids, init, full_output=True)[0]) < TOL_F32


def test_world_sized_vocabulary_int8():
    """A 65536-row embedding and head (the official vocabulary) in Q8_0, fused decode."""
    w = make_weights(1, 256, 65536, ranks=(32, 32, 32, 64), seed=9)
    model = numba_model(w, storage="int8")
    ids = np.random.default_rng(5).integers(0, 65536, 4)
    init = random_state(model.config, seed=4)
    got, _ = run_tokens(model, ids, init)
    want, _ = run_tokens(reference_of(model), ids, init)
    assert rel_err(got, want) < TOL_F32


@pytest.mark.parametrize("storage", STORAGES)
def test_bit_identical_across_threads(storage):
    """As for float32 and bf16 (tests/test_numba_decode.py): each output row is one thread's
    fixed-order sum, so 1 and 2 threads give the same bits."""
    w = make_weights(2, 256, 500, ranks=OFFICIAL_RANKS, seed=3)
    model = numba_model(w, storage=storage)
    ids = np.random.default_rng(2).integers(0, 500, 6)
    init = random_state(model.config, seed=4)
    results = on_threads(lambda: run_tokens(model, ids, init))
    (l1, s1), (l2, s2) = results
    assert np.array_equal(l1, l2) and np.array_equal(s1.wkv, s2.wkv)


def test_storage_costs_are_ordered():
    """Against float64 on the original float32 weights (the rounding included): float32 is
    arithmetic only, float16 (11 significant bits) < bfloat16 (8) < int8 (Q8_0: 8 bits per
    block, about 3x bf16's error here). Measured: 3e-6, 2.0e-3, 1.7e-2, 5.6e-2; the last bound
    (0.2) is 3.6x the int8 value. benchmarks/storage_error.py measures the released shapes."""
    w = make_weights(3, 256, 1000, ranks=OFFICIAL_RANKS, seed=11)
    ids = np.random.default_rng(3).integers(0, 1000, 24)
    want, _ = tinyrwkv.RWKV7(w, dtype="float64").forward(ids, full_output=True)
    err = {s: rel_err(numba_model(w, storage=s).forward(ids, full_output=True)[0], want)
           for s in ("float32", "float16", "bfloat16", "int8")}
    print(err)
    assert err["float32"] < TOL_F32 < err["float16"] < err["bfloat16"] < err["int8"] < 0.2, err


# ---- loading ------------------------------------------------------------------------------------

def big_keys(model):
    """(layer or None, key) of every big matrix the model keeps in its storage type."""
    from tinyrwkv.backends.numba_cpu import BIG_MATRICES
    out = [(None, "emb.weight"), (None, "head.weight")]
    for i, p in enumerate(model.blocks):
        out += [(i, k) for k in p if k.endswith(BIG_MATRICES)]
    return out


def stored(model, layer, key):
    return getattr(model, key.split(".")[0]) if layer is None else model.blocks[layer][key]


def official_key(layer, key):
    return key if layer is None else f"blocks.{layer}.{key}"


@pytest.mark.skipif(not have("gguf"), reason="writing GGUF needs the gguf package")
def test_q8_0_gguf_loads_without_conversion(tmp_path):
    """A Q8_0 GGUF written by tinyrwkv, loaded with storage="int8": every big matrix is a memory
    map of the file at that tensor's offset, byte for byte the file's, and the fused step reads
    those same pages (no copy anywhere)."""
    from tinyrwkv.formats import open_model, write_gguf
    path = tmp_path / "m.gguf"
    write_gguf(path, make_weights(2, 256, 500, ranks=OFFICIAL_RANKS, seed=1), out_type="q8_0")
    model = tinyrwkv.load(path, storage="int8")
    assert model.backend == "numba-int8"
    source = open_model(path)
    with open(path, "rb") as f:
        for layer, key in big_keys(model):
            blocks = stored(model, layer, key)
            info = source.raw.by_name[source.table[official_key(layer, key)][0]]
            assert info.type_name == "q8_0"
            assert isinstance(blocks, np.memmap) and blocks.offset == info.offset
            f.seek(info.offset)
            assert blocks.tobytes() == f.read(blocks.nbytes)
    assert np.shares_memory(model._decode_weights.Wk[1], model.blocks[1]["att.key.weight"])
    assert np.shares_memory(model._decode_weights.head, model.head)


@pytest.mark.skipif(not have("gguf"), reason="writing GGUF needs the gguf package")
@pytest.mark.parametrize("dtype", ["float32", "bfloat16"])
def test_quantise_on_load_gives_the_gguf_writers_bytes(tmp_path, dtype):
    """A float checkpoint loaded with storage="int8" holds exactly the blocks `tinyrwkv
    convert --type q8_0` (write_gguf) writes for it: one quantiser, formats/q8_0.py."""
    from tinyrwkv.formats import open_model, save_safetensors, write_gguf
    w = make_weights(2, 256, 500, ranks=OFFICIAL_RANKS, seed=2)
    save_safetensors(tmp_path / "m.safetensors", w,
                     bf16_keys=w.keys() if dtype == "bfloat16" else ())
    write_gguf(tmp_path / "m.gguf", open_model(tmp_path / "m.safetensors"), out_type="q8_0")
    model = tinyrwkv.load(tmp_path / "m.safetensors", storage="int8")
    gguf_file = open_model(tmp_path / "m.gguf")
    for layer, key in big_keys(model):
        want = gguf_file.quantized(official_key(layer, key)).blocks
        assert np.array_equal(stored(model, layer, key), want), key
    # the small tensors stay float32, the file's numbers
    assert model.blocks[1]["att.a1"].dtype == np.float32


@pytest.mark.skipif(not have("gguf"), reason="writing GGUF needs the gguf package")
def test_float16_storage_keeps_float16_files_as_they_are(tmp_path):
    """From an F16 GGUF and an fp16 safetensors: the stored float16 numbers are the file's (no
    rounding through another type); from float32: rounded to nearest, as NumPy's astype."""
    from tinyrwkv.formats import open_model, save_safetensors, write_gguf
    w = make_weights(2, 256, 500, ranks=OFFICIAL_RANKS, seed=3)
    write_gguf(tmp_path / "m.gguf", w, out_type="f16")
    save_safetensors(tmp_path / "h.safetensors", {k: v.astype(np.float16) for k, v in w.items()})
    save_safetensors(tmp_path / "f.safetensors", w)
    for name in ("m.gguf", "h.safetensors", "f.safetensors"):
        model = tinyrwkv.load(tmp_path / name, storage="float16")
        source = open_model(tmp_path / name)
        assert model.backend == "numba-fp16"
        for layer, key in big_keys(model):
            got = stored(model, layer, key)
            want = source.read(official_key(layer, key), "float32").astype(np.float16)
            assert got.dtype == np.float16 and np.array_equal(got.view(np.uint16), want.view(np.uint16))


def test_loaded_int8_model_runs(tmp_path):
    """tinyrwkv.load(storage="int8") from a float file, end to end, against the reference on
    its stored numbers; and the oracle sees the dequantised weights (stored_tensors)."""
    from tinyrwkv.formats import save_safetensors
    save_safetensors(tmp_path / "m.safetensors", make_weights(2, 128, 300, seed=4))
    model = tinyrwkv.load(tmp_path / "m.safetensors", storage="int8")
    assert model.blocks[0]["att.key.weight"].dtype == np.uint8
    assert model.stored_tensors()["blocks.0.att.key.weight"].shape == (128, 128)
    assert model.n_params == tinyrwkv.load(tmp_path / "m.safetensors").n_params
    ids = [1, 2, 3, 4, 5]
    got, _ = model.forward(ids)
    want, _ = reference_of(model).forward(ids)
    assert rel_err(got, want) < TOL_F32


@pytest.mark.parametrize("storage", STORAGES)
def test_official_fixture_pth(storage):
    """The official package's outputs for a bf16 .pth fixture: float16 holds these bf16 weights
    exactly (in its range), so it meets the float32 tolerance; int8 rounds them (measured
    4.4e-2, bounded at 0.1)."""
    from conftest import FIXTURES
    pth = FIXTURES / "synthetic_L3_C256.pth"
    if not pth.exists():
        pytest.skip(f"{pth} not found")
    ref = np.load(FIXTURES / "synthetic_L3_C256_official_cpufp32.npz")
    logits, _ = tinyrwkv.load(pth, storage=storage).forward(ref["toks"][:30], full_output=True)
    assert rel_err(logits, ref["seq_logits"]) < (TOL_F32 if storage == "float16" else 0.1)


# ---- what is refused ------------------------------------------------------------------------

def test_rows_that_are_not_whole_blocks_are_refused(tmp_path):
    """C = 48 (heads of 16): rows of 48 values cannot be Q8_0; the error names the tensor (load:
    before reading it). float16 is fine for them."""
    from tinyrwkv.formats import save_safetensors
    w = make_weights(1, 48, 64, head_size=16, seed=1)
    with pytest.raises(ValueError, match=r"emb\.weight has rows of 48 values, not a multiple of 32"):
        numba_model(w, storage="int8")
    save_safetensors(tmp_path / "m.safetensors", w)
    with pytest.raises(ValueError, match=r"weight has rows of 48 values, not a multiple of 32"):
        tinyrwkv.load(tmp_path / "m.safetensors", storage="int8")
    assert numba_model(w, storage="float16").backend == "numba-fp16"


def test_other_backends_refuse_int8(tmp_path):
    from tinyrwkv.formats import save_safetensors
    save_safetensors(tmp_path / "m.safetensors", make_weights(1, 64, 97, seed=1))
    for backend in ("numpy", "cupy"):
        with pytest.raises(ValueError, match="int8 storage \\(GGUF Q8_0 blocks\\) needs backend='numba'"):
            tinyrwkv.load(tmp_path / "m.safetensors", backend=backend, storage="int8")
    with pytest.raises(ValueError, match="storage='int8'"):
        tinyrwkv.load(tmp_path / "m.safetensors", strategy="cpu fp32i8")


def test_values_beyond_the_storage_range_are_refused():
    w = make_weights(1, 64, 97, seed=1)
    w["blocks.0.att.key.weight"][3, 5] = 1e5                  # beyond float16 (65504)
    with pytest.raises(ValueError, match=r"blocks\.0\.att\.key\.weight has values beyond float16.s range"):
        numba_model(w, storage="float16")
    w["blocks.0.att.key.weight"][3, 5] = 1e7                  # d = 1e7 / 127 > 65504
    with pytest.raises(ValueError, match=r"blocks\.0\.att\.key\.weight .*too large for Q8_0"):
        numba_model(w, storage="int8")


@pytest.mark.skipif(not have("gguf"), reason="writing GGUF needs the gguf package")
def test_non_finite_q8_0_scale_is_refused(tmp_path):
    """A Q8_0 GGUF whose block scale is NaN: load's finiteness check reads the scales of the
    memory-mapped blocks (inf/NaN never reach the kernels' float16 widening, which has no case
    for them)."""
    from tinyrwkv.errors import CheckpointError
    from tinyrwkv.formats import open_model, write_gguf
    path = tmp_path / "m.gguf"
    write_gguf(path, make_weights(1, 64, 97, seed=1), out_type="q8_0")
    offset = open_model(path).raw.by_name["blk.0.time_mix_key.weight"].offset
    with open(path, "r+b") as f:
        f.seek(offset + BLOCK_BYTES)                              # block 1's scale
        f.write(np.float16(np.nan).tobytes())
    with pytest.raises(CheckpointError, match=r"NaN or Inf in 1 tensor: blocks\.0\.att\.key\.weight"):
        tinyrwkv.load(path, storage="int8")


def test_non_finite_float16_weight_is_refused(tmp_path):
    """An fp16 file with an inf, loaded as float16 storage (kept as it is): refused by load's
    finiteness check before any kernel could read it (the widening trick would make it 65536)."""
    from tinyrwkv.errors import CheckpointError
    from tinyrwkv.formats import save_safetensors
    w = {k: v.astype(np.float16) for k, v in make_weights(1, 64, 97, seed=1).items()}
    w["head.weight"][5, 7] = np.inf
    save_safetensors(tmp_path / "m.safetensors", w)
    with pytest.raises(CheckpointError, match=r"NaN or Inf in 1 tensor: head\.weight"):
        tinyrwkv.load(tmp_path / "m.safetensors", storage="float16")
