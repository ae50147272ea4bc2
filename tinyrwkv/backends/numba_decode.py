"""Decode as one compiled call per token: the whole RWKV-7 token step in a single Numba function.

`backends/numba_cpu.py` decodes with a Python loop over layers that calls a dozen kernels and NumPy
ops per layer, each a parallel region with its own thread barrier and its own temporaries: on a
small model the time goes to dispatch, not to arithmetic. Here `decode_token` does it all inside
Numba: embedding row and ln0, every layer (time mix and channel mix), ln_out and the head, writing
the state in place, with every temporary preallocated once (`make_scratch`).

Layout (`stack_weights`): the six big matrices of a layer (receptance, key, value, output,
channel-mix key and value) stay where loading put them, one tuple of L arrays per kind (no copy:
peak memory at load stays the weights' bytes); the small tensors are stacked per kind across
layers, e.g. all lerp vectors as (L, 6, C), all w1 LoRA matrices as (L, C, Dw). The
ranks are the same in every layer (layer 0's v LoRA is unused: its slot is zeros).

The big matrices (and the embedding and head) are kept in the model's storage type and read by
`dot_row` (a row times a vector) and `row` (an embedding row), compiled per storage type; each
view below is of the loaded array, no copy (`as_kernel_matrix`), and its element type is what
tells the overloads which storage they read:

    storage    held as (numba_cpu)          kernels read                      widened by
    float32    float32 (n, m)               the same                          -
    bfloat16   bf16 bits, uint16 (n, m)     uint32 pairs (n, m/2)             a shift or a mask
    float16    np.float16 (n, m)            int32 pairs (n, m/2)              FLOAT16 bit trick
    int8       Q8_0 blocks, uint8           int8 (n, m/32, 34): per block a   scale: the float16
               (n, m/32*34)                 float16 scale d, 32 int8 quants   trick; q: sitofp

A 16-bit weight is widened in registers by a bit cast (`bits_to_float32`), never into a buffer
(a buffer written in the loop defeats vectorisation: LLVM cannot prove it does not alias the
weights; measured slower than the per-kernel path). The two 16-bit types are read as 32-bit
pairs, with x split into its even and odd entries (`split_pairs`): widening a uint16 element
needs a shuffle instruction per 8, a pair only shifts and masks (float16: 13.9 G weights/s
against 7.5 one at a time, one core). The Q8_0 product is written in LLVM IR (`q8_0_dot`: the
section's comment says why). Single-thread decode on the 0.1B shape, tokens per CPU second
(benchmarks/decode_fused.py, a busy 2-core AMD EPYC VM): float32 49, bf16 77, float16 65, int8 95.

Parallelism: `prange` only where the work pays for a barrier: the matrix-vector products (rows in
chunks) and the WKV heads, when their size is at least PARALLEL_FROM multiply-adds, and a layer's
LoRAs (`loras`: fixed row and column chunks), from LORA_PARALLEL_FROM; the small vector work
(norms, lerps) runs on one thread. Each output row, each head and each LoRA chunk is computed by
one thread in a fixed order whatever the thread count, so results are bit-identical for any
number of threads (tests/test_numba_decode.py checks it).

The math is the twin of model.py (`block`, `time_mix`, `channel_mix` and their steps), in float32
with the same fastmath={"reassoc", "contract"} as numba_cpu; the parity tests hold it to the
float64 reference. Not covered: DeepEmbed models (x070-deepembed), which keep the per-kernel path.

Batched decode (`decode_batch`, the last section; RWKV7Numba.forward_batch): B sequences move on by
one token each in one call. Decode is bandwidth-bound: a token of the 0.1B model reads every weight
(~540 MB in float32) for ~135 M multiply-adds, far less arithmetic than the cores could do while
the bytes arrive. A batch does B times the arithmetic on the same bytes: each row of a matrix is
fetched once and, while it is in cache, multiplied with the B inputs (`matvec_batch`), so B
sequences cost little more than one until the arithmetic catches up with memory
(benchmarks/batch_decode.py measures where). It is `decode_token` with a batch axis and nothing
else: the same steps in the same order, each sequence through the same functions (`layer_norm`,
`loras`, `wkv_head`) and every product a `dot_row` of the same row and input, so each sequence's
logits and state are bit-identical to decoding it alone (tests/test_batched.py), and sequences
cannot influence each other: nothing is summed across the batch axis.
  The states are one `model.BatchState`, (B, L, ...) sequence-major, moved on in place. The
temporaries are the `Scratch` fields with a leading batch axis (`make_batch_scratch`), except two
whose batch axis comes second so that the input of a batched product is one C-contiguous
(B, width) array: `mixed` (6, B, C) (lerp c of every sequence is mixed[c]) and `pairs`
(3, B, 2, M). The model keeps one, sized for the largest batch seen; a call uses its first
B = len(tokens) rows. B is a loop bound, never part of a type: no batch size recompiles anything.
Parallel, above PARALLEL_FROM: the products over chunks of rows (a chunk does its rows for all B
sequences) and the WKV step over (sequence, head) pairs; norms, lerps and LoRAs loop over the
sequences on one thread. Bit-identical across thread counts, for the same reason as above.
"""

from __future__ import annotations

from collections import namedtuple

import numpy as np
from numba import njit, prange, types
from numba.core import cgutils
from numba.extending import intrinsic, overload
from llvmlite import ir

from .. import model as ref
from ..formats import q8_0

FASTMATH = {"reassoc", "contract"}
DECAY_SCALE = float(ref.DECAY_SCALE)       # plain floats: compile-time constants
GN_EPS = float(ref.GN_EPS)
LN_EPS = float(ref.LN_EPS)
PARALLEL_FROM = 1 << 16    # multiply-adds below which a parallel region costs more than it saves
ROW_CHUNKS = 64            # a big matrix-vector product is split into this many row chunks
LORA_CHUNKS = 16           # a layer's LoRAs: at most this many row (down) and column (up) chunks ...
LORA_PARALLEL_FROM = 1 << 18   # ... in parallel from this many multiply-adds (2 regions + a sum)

# Per-layer tensors stacked across layers: (stacked name, checkpoint key without 'blocks.{i}.').
STACKED = (("Wr", "att.receptance.weight"), ("Wk", "att.key.weight"),
           ("Wv", "att.value.weight"), ("Wo", "att.output.weight"),
           ("Wfk", "ffn.key.weight"), ("Wfv", "ffn.value.weight"),
           ("w0", "att.w0"), ("a0", "att.a0"), ("v0", "att.v0"),
           ("k_k", "att.k_k"), ("k_a", "att.k_a"), ("r_k", "att.r_k"),
           ("ln_x_w", "att.ln_x.weight"), ("ln_x_b", "att.ln_x.bias"),
           ("ln1_w", "ln1.weight"), ("ln1_b", "ln1.bias"),
           ("ln2_w", "ln2.weight"), ("ln2_b", "ln2.bias"), ("ffn_lerp", "ffn.x_k"),
           ("w1", "att.w1"), ("w2", "att.w2"), ("a1", "att.a1"), ("a2", "att.a2"),
           ("v1", "att.v1"), ("v2", "att.v2"), ("g1", "att.g1"), ("g2", "att.g2"))
BIG = ("Wr", "Wk", "Wv", "Wo", "Wfk", "Wfv")       # the matrices that may be kept as bf16

DecodeWeights = namedtuple("DecodeWeights",
                           ["emb", "head", "ln0_w", "ln0_b", "ln_out_w", "ln_out_b", "lerp"]
                           + [name for name, _ in STACKED])
Scratch = namedtuple("Scratch", ["x", "xa", "xf", "mixed", "r", "k", "v", "w_pre", "a", "g",
                                 "v_gate", "v_first", "kk", "k_tilde", "decay", "beta", "v_res",
                                 "y", "xk", "hidden", "lora", "pairs", "logits"])


# ----------------------------------------------------------------------------------------------
# Layout, built once at load
# ----------------------------------------------------------------------------------------------

def as_kernel_matrix(a):
    """A stored matrix as the kernels read it (no copy; the table in the module docstring):
    float32 as is; bf16 bits (uint16) as uint32 pairs; float16 as int32 pairs; Q8_0 blocks
    (uint8 (n, m / 32 * 34)) as int8 (n, m / 32, 34). The element type tells `dot_row` and `row`
    which storage they read."""
    a = np.ascontiguousarray(a)
    if a.dtype == np.uint16:                        # bf16 bits
        return a.view(np.uint32)
    if a.dtype == np.float16:
        return a.view(np.int32)
    if a.dtype == np.uint8:                         # Q8_0 blocks, one row per matrix row
        return a.view(np.int8).reshape(a.shape[0], -1, q8_0.BLOCK_BYTES)
    return a


def read_only(a):
    """A read-only view: every big matrix has the same Numba type (a memory-mapped tensor is
    read-only, a converted one is not), so that the per-layer tuples are uniform."""
    a = a.view()
    a.flags.writeable = False
    return a


def stack_weights(model):
    """A DecodeWeights from a RWKV7Numba model's prepared weights.

    The big matrices (BIG: receptance ... channel-mix value, 6 per layer) are *not* copied: each
    kind is a tuple of the per-layer arrays as loaded (memory-mapped from the file where they
    are stored as the storage type), viewed as the kernels read them (`as_kernel_matrix`).
    Stacking them into one (L, ...) array would need a second copy of most of the weights for a
    moment, and keep the file's pages resident beside it (measured: 1.4x the weights' bytes at
    load). The small per-layer tensors (vectors, LoRA matrices: a few % of the bytes) are
    stacked per kind, (L, ...) float32, and each layer's entry in `model.blocks` becomes a view
    of its slice, so they too are held once."""
    blocks, cfg = model.blocks, model.config
    L, C = cfg.n_layer, cfg.n_embd
    Dv = max(cfg.d_mv, 1)
    stacked = {}
    for name, key in STACKED:
        if name in BIG:
            stacked[name] = tuple(read_only(as_kernel_matrix(blocks[i][key])) for i in range(L))
            continue
        if key in ("att.v0", "att.v1", "att.v2"):      # layer 0 has none: a zero slot
            shape = {"att.v0": (C,), "att.v1": (C, Dv), "att.v2": (Dv, C)}[key]
            layers = [np.zeros(shape, np.float32) if i == 0 or key not in blocks[i] else blocks[i][key]
                      for i in range(L)]
        else:
            layers = [blocks[i][key] for i in range(L)]
        stacked[name] = np.ascontiguousarray(np.stack(layers), dtype=np.float32)   # (L, ...)
        for i in range(L):
            if key in blocks[i]:
                blocks[i][key] = stacked[name][i]                      # share, do not duplicate
    lerp = np.stack([np.stack([p[f"att.x_{c}"] for c in "rwkvag"]) for p in blocks])   # (L, 6, C)
    f32 = lambda a: np.ascontiguousarray(a, dtype=np.float32)
    return DecodeWeights(emb=read_only(as_kernel_matrix(model.emb)),
                         head=read_only(as_kernel_matrix(model.head)),
                         ln0_w=f32(model.ln0[0]), ln0_b=f32(model.ln0[1]),
                         ln_out_w=f32(model.ln_out[0]), ln_out_b=f32(model.ln_out[1]),
                         lerp=f32(lerp), **stacked)


def make_scratch(config):
    """Every temporary of a token step, allocated once: decode_token allocates nothing."""
    C, F, V = config.n_embd, config.dim_ffn, config.vocab_size
    D = max(config.d_decay, config.d_aaa, config.d_mv, config.d_gate, 1)
    vec = lambda: np.zeros(C, np.float32)
    return Scratch(x=vec(), xa=vec(), xf=vec(), mixed=np.zeros((6, C), np.float32),
                   r=vec(), k=vec(), v=vec(), w_pre=vec(), a=vec(), g=vec(), v_gate=vec(),
                   v_first=vec(), kk=vec(), k_tilde=vec(), decay=vec(), beta=vec(), v_res=vec(),
                   y=vec(), xk=vec(), hidden=np.zeros(F, np.float32),
                   lora=np.zeros((LORA_CHUNKS + 1, 4, D), np.float32),     # `loras`' parts
                   pairs=np.zeros((3, 2, max(C, F) // 2), np.float32),   # inputs split for bf16
                   logits=np.zeros(V, np.float32))


# ----------------------------------------------------------------------------------------------
# Widening a stored weight to float32, in registers
# ----------------------------------------------------------------------------------------------

@intrinsic
def bits_to_float32(typingctx, u):
    """The float32 whose bits are the low 32 bits of the integer u (a bit cast, no conversion):
    how a 16-bit weight, moved into place, is read without a buffer in memory. (Numba widens
    32-bit integer arithmetic to 64 bits, hence the truncation.)"""
    if not isinstance(u, types.Integer):
        return None

    def codegen(context, builder, signature, args):
        bits = args[0]
        if u.bitwidth > 32:
            bits = builder.trunc(bits, ir.IntType(32))
        return builder.bitcast(bits, ir.FloatType())
    return types.float32(u), codegen


# float16 -> float32 without a branch (every float16 except inf/NaN, exactly). A float16 is
# sign | 5 exponent bits | 10 mantissa bits, bias 15; a float32 is sign | 8 | 23, bias 127.
# With the float16 in the top half of a 32-bit signed integer t, an arithmetic shift right by 3
# puts its exponent in the low 5 bits of the float32 exponent field and its mantissa at the top
# of the float32 mantissa, and copies the sign into bits 31..28; the mask keeps bit 31 and
# clears bits 30..28 and the 13 bits below the mantissa. The result is the float16's value
# times 2^(15 - 127) = 2^-112 (a float16 subnormal lands on a float32 subnormal of the same
# form), so one multiplication by 2^112 makes it exact. Exponent 31 (inf, NaN) would come out
# finite (65536 and up), which is why loading refuses non-finite weights (tinyrwkv.load's
# check_finite; with check_finite=False they are wrong numbers, not NaN).
FLOAT16_MASK = 0x8FFFE000
FLOAT16_SCALE = float(2.0 ** 112)


@njit(fastmath=FASTMATH, inline="always")     # inlined by Numba: as a call it measured 2x slower
def float16_high(u):
    """The float16 in the high half of the 32-bit integer u, as float32 (exact)."""
    return bits_to_float32((np.int32(u) >> 3) & FLOAT16_MASK) * np.float32(FLOAT16_SCALE)


@njit(fastmath=FASTMATH, inline="always")
def float16_low(u):
    """The float16 in the low half of the 32-bit integer u, as float32 (exact)."""
    return float16_high(u << 16)


# ----------------------------------------------------------------------------------------------
# Matrix-vector products for each storage type
# ----------------------------------------------------------------------------------------------

def split_pairs(W, x, xs):
    """For W in pairs (bf16 as uint32, float16 as int32): xs[0] = x[0::2], xs[1] = x[1::2] (the
    inputs that meet the low and the high half of each pair), so that dot_row reads both
    contiguously and vectorises; measured 2x faster than reading x[2j], x[2j + 1]. For float32
    and Q8_0: nothing."""


@overload(split_pairs, jit_options={"fastmath": FASTMATH})
def _split_pairs(W, x, xs):
    if W.dtype in (types.uint32, types.int32):
        def split(W, x, xs):
            for j in range(W.shape[1]):
                xs[0, j] = x[2 * j]
                xs[1, j] = x[2 * j + 1]
        return split

    def no_split(W, x, xs):
        pass
    return no_split


def dot_row(W, i, x, xs):
    """W[i] . x for W as the kernels read it (as_kernel_matrix), x (m,) float32; xs: x split by
    split_pairs. Compiled per storage type by the overload below."""


@overload(dot_row, jit_options={"fastmath": FASTMATH})
def _dot_row(W, i, x, xs):
    if W.dtype == types.float32:
        def dot_f32(W, i, x, xs):
            acc = np.float32(0.0)
            for j in range(W.shape[1]):
                acc += W[i, j] * x[j]
            return acc
        return dot_f32
    if W.dtype == types.uint32:
        def dot_bf16(W, i, x, xs):
            acc = np.float32(0.0)
            for j in range(W.shape[1]):  # bf16 is the top half of a float32; low half = even column
                u = W[i, j]
                acc += (bits_to_float32(u << np.uint32(16)) * xs[0, j]
                        + bits_to_float32(u & np.uint32(0xFFFF0000)) * xs[1, j])
            return acc
        return dot_bf16
    if W.dtype == types.int32:
        def dot_f16(W, i, x, xs):
            acc = np.float32(0.0)
            for j in range(W.shape[1]):      # two float16 an element; low half = even column
                u = W[i, j]
                acc += float16_low(u) * xs[0, j] + float16_high(u) * xs[1, j]
            return acc
        return dot_f16
    if W.dtype == types.int8 and W.ndim == 3:
        def dot_q8_0(W, i, x, xs):
            return q8_0_dot(W, i, x)
        return dot_q8_0


# ----------------------------------------------------------------------------------------------
# The Q8_0 product, written in LLVM IR
# ----------------------------------------------------------------------------------------------
# Why not plain Numba, as for the other storage types: a Q8_0 row is blocks of 32 products that
# each need their own scale, so the fast form keeps 8 partial sums in one vector register across
# all the blocks of a row and multiplies each block's contribution by its scale on the way in.
# Numba's loop vectoriser only vectorises the inner loop (32 products) and must then add its
# lanes up at the end of every block (plus entry checks and remainder code: ~50 instructions a
# block), and Numba runs LLVM without its SLP vectoriser (NUMBA_SLP_VECTORIZE=0), which is what
# would pack eight scalar partial sums into a register. Measured on one core (AMD EPYC, AVX2;
# a 3072 x 768 matrix in cache): plain Numba 9 G weights/s, this 14.5 G/s (bf16: 18 G/s, which
# needs no conversion instruction); on a matrix that does not fit in cache, 11 G/s against bf16's
# 7.7 G/s, since Q8_0 reads 1.06 bytes a weight against 2.

def _float16_to_float32_ir(builder, half_bits):
    """IR for float16_low (the module's bit trick) of an i16 value: float32, exact."""
    i32 = ir.IntType(32)
    top = builder.shl(builder.zext(half_bits, i32), ir.Constant(i32, 16))
    bits = builder.and_(builder.ashr(top, ir.Constant(i32, 3)),
                        ir.Constant(i32, FLOAT16_MASK - (1 << 32)))     # as a signed i32
    return builder.fmul(builder.bitcast(bits, ir.FloatType()),
                        ir.Constant(ir.FloatType(), FLOAT16_SCALE))


def _q8_0_block(builder, row, x, b):
    """IR: block b of a Q8_0 row (row: i8* to the row's first byte; x: float* to the input), as
    8 partial sums: d * (q[0:8] x[0:8] + q[8:16] x[8:16] + q[16:24] x[16:24] + q[24:32] x[24:32]),
    a <8 x float>."""
    f32, i8, i16, i32, i64 = (ir.FloatType(), ir.IntType(8), ir.IntType(16), ir.IntType(32),
                              ir.IntType(64))
    fast = ("contract", "reassoc")                         # the module's FASTMATH, per instruction
    block = builder.gep(row, [builder.mul(b, ir.Constant(i64, q8_0.BLOCK_BYTES))])
    scale = _float16_to_float32_ir(
        builder, builder.load(builder.bitcast(block, i16.as_pointer()), align=1))    # d
    quants = builder.load(builder.bitcast(builder.gep(block, [ir.Constant(i64, 2)]),
                                          ir.VectorType(i8, q8_0.BLOCK).as_pointer()), align=1)
    inputs = builder.load(builder.bitcast(builder.gep(x, [builder.mul(b, ir.Constant(i64, q8_0.BLOCK))]),
                                          ir.VectorType(f32, q8_0.BLOCK).as_pointer()), align=4)
    products = builder.fmul(builder.sitofp(quants, ir.VectorType(f32, q8_0.BLOCK)), inputs,
                            flags=fast)                                          # <32 x float>
    quarter = lambda k: builder.shuffle_vector(
        products, products, ir.Constant(ir.VectorType(i32, 8), list(range(8 * k, 8 * k + 8))))
    partial = builder.fadd(builder.fadd(quarter(0), quarter(1), flags=fast),
                           builder.fadd(quarter(2), quarter(3), flags=fast), flags=fast)
    splat = builder.insert_element(ir.Constant(ir.VectorType(f32, 8), ir.Undefined), scale,
                                   ir.Constant(i32, 0))
    splat = builder.shuffle_vector(splat, splat, ir.Constant(ir.VectorType(i32, 8), [0] * 8))
    return builder.fmul(splat, partial, flags=fast)                              # <8 x float>


@intrinsic
def q8_0_dot(typingctx, W, i, x):
    """W[i] . x in float32 for Q8_0 blocks W (int8 (n, blocks, 34), C-contiguous) and x
    (blocks * 32,) float32, C-contiguous: per block, the 32 products q * x are summed into 8
    lanes, multiplied by the block's scale d and added to 8 running sums, which are added up at
    the end (in a fixed order: the same bits whatever the thread count)."""
    if not (isinstance(W, types.Array) and W.dtype == types.int8 and W.ndim == 3
            and W.layout == "C" and isinstance(x, types.Array) and x.dtype == types.float32
            and x.ndim == 1 and x.layout == "C"):
        return None

    def codegen(context, builder, signature, args):
        f32, i32 = ir.FloatType(), ir.IntType(32)
        fast = ("contract", "reassoc")
        matrix = context.make_array(signature.args[0])(context, builder, args[0])
        vector = context.make_array(signature.args[2])(context, builder, args[2])
        row = builder.gep(matrix.data,
                          [builder.mul(args[1], builder.extract_value(matrix.strides, 0))])
        lanes = cgutils.alloca_once_value(builder, ir.Constant(ir.VectorType(f32, 8), None))
        with cgutils.for_range(builder, builder.extract_value(matrix.shape, 1)) as loop:
            block = _q8_0_block(builder, row, vector.data, loop.index)
            builder.store(builder.fadd(builder.load(lanes), block, flags=fast), lanes)
        lanes = builder.load(lanes)
        total = builder.extract_element(lanes, ir.Constant(i32, 0))
        for k in range(1, 8):
            total = builder.fadd(total, builder.extract_element(lanes, ir.Constant(i32, k)),
                                 flags=fast)
        return total
    return types.float32(W, i, x), codegen


def row(W, i, out):
    """out = W[i] as float32 (a row of the embedding), W as for dot_row."""


@overload(row, jit_options={"fastmath": FASTMATH})
def _row(W, i, out):
    if W.dtype == types.float32:
        def row_f32(W, i, out):
            out[:] = W[i]
        return row_f32
    if W.dtype == types.uint32:
        def row_bf16(W, i, out):
            for j in range(W.shape[1]):
                u = W[i, j]
                out[2 * j] = bits_to_float32(u << np.uint32(16))
                out[2 * j + 1] = bits_to_float32(u & np.uint32(0xFFFF0000))
        return row_bf16
    if W.dtype == types.int32:
        def row_f16(W, i, out):
            for j in range(W.shape[1]):
                out[2 * j] = float16_low(W[i, j])
                out[2 * j + 1] = float16_high(W[i, j])
        return row_f16
    if W.dtype == types.int8 and W.ndim == 3:
        def row_q8_0(W, i, out):
            scales = W.view(np.uint16)
            n = W.shape[2] - 2
            for b in range(W.shape[1]):
                d = float16_low(np.uint32(scales[i, b, 0]))
                for j in range(n):
                    out[b * n + j] = d * np.float32(W[i, b, 2 + j])
        return row_q8_0


@njit(fastmath=FASTMATH, cache=True)
def _rows(W, x, xs, out, lo, hi):
    for i in range(lo, hi):
        out[i] = dot_row(W, i, x, xs)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec(W, x, out, pairs):
    """out = W @ x, W (n, m) as stored. Rows in ROW_CHUNKS chunks, in parallel when the product is
    big enough to pay for the barrier; each row is one thread's sequential dot either way.
    pairs: (3, 2, M) scratch for split_pairs."""
    n = W.shape[0]
    xs = pairs[0]
    split_pairs(W, x, xs)
    step = (n + ROW_CHUNKS - 1) // ROW_CHUNKS
    if n * x.shape[0] < PARALLEL_FROM:
        _rows(W, x, xs, out, 0, n)
    else:
        for c in prange(ROW_CHUNKS):
            _rows(W, x, xs, out, min(n, c * step), min(n, (c + 1) * step))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec3(W1, x1, out1, W2, x2, out2, W3, x3, out3, pairs):
    """Three products of the same shape (receptance, key, value) in one parallel region: one
    barrier instead of three. Chunk c of 3 * ROW_CHUNKS belongs to product c // ROW_CHUNKS."""
    n = W1.shape[0]
    split_pairs(W1, x1, pairs[0])
    split_pairs(W2, x2, pairs[1])
    split_pairs(W3, x3, pairs[2])
    step = (n + ROW_CHUNKS - 1) // ROW_CHUNKS
    if 3 * n * x1.shape[0] < PARALLEL_FROM:
        _rows(W1, x1, pairs[0], out1, 0, n)
        _rows(W2, x2, pairs[1], out2, 0, n)
        _rows(W3, x3, pairs[2], out3, 0, n)
    else:
        for c in prange(3 * ROW_CHUNKS):
            lo, hi = min(n, (c % ROW_CHUNKS) * step), min(n, (c % ROW_CHUNKS + 1) * step)
            if c < ROW_CHUNKS:
                _rows(W1, x1, pairs[0], out1, lo, hi)
            elif c < 2 * ROW_CHUNKS:
                _rows(W2, x2, pairs[1], out2, lo, hi)
            else:
                _rows(W3, x3, pairs[2], out3, lo, hi)


# ----------------------------------------------------------------------------------------------
# Small vector steps (one thread)
# ----------------------------------------------------------------------------------------------

@njit(fastmath=FASTMATH, cache=True)
def layer_norm(x, w, b, out):
    """model.layer_norm for one (C,) vector, into out."""
    C = x.shape[0]
    mu = np.float32(0.0)
    for i in range(C):
        mu += x[i]
    mu /= C
    var = np.float32(0.0)
    for i in range(C):
        var += (x[i] - mu) * (x[i] - mu)
    inv = 1 / np.sqrt(var / C + np.float32(LN_EPS))
    for i in range(C):
        out[i] = (x[i] - mu) * inv * w[i] + b[i]


@njit(fastmath=FASTMATH, cache=True)
def sigmoid(u):
    return 1 / (1 + np.exp(-u))


@njit(fastmath=FASTMATH, cache=True)
def lora_down(x, A, lo, hi, acc):
    """acc[:D] = x[lo:hi] @ A[lo:hi], A (C, D): one row chunk of a LoRA's down-projection. Rows of
    A are contiguous, so the inner loop vectorises over D."""
    out = acc[:A.shape[1]]
    out[:] = 0
    for i in range(lo, hi):
        xi, a = x[i], A[i]
        for d in range(out.shape[0]):
            out[d] += xi * a[d]


@njit(fastmath=FASTMATH, cache=True)
def lora_up(mid, B, lo, hi, out):
    """out[lo:hi] = mid[:D] @ B[:, lo:hi], B (D, C): one column chunk of a LoRA's up-projection.
    Written with slices (views): indexed as out[j] and B[d, j] with j from lo, LLVM left the loop
    scalar (1.6 G multiply-adds/s against 13.8 with the views, one AMD EPYC core)."""
    o = out[lo:hi]
    o[:] = 0
    for d in range(B.shape[0]):
        md, b = mid[d], B[d, lo:hi]
        for j in range(o.shape[0]):
            o[j] += md * b[j]


@njit(cache=True)
def lora_chunks(C):
    """How many chunks a layer's LoRAs are split into: a function of the width only (never of the
    thread count, so that the sums' order is fixed), at least 64 rows or columns each."""
    return max(1, min(LORA_CHUNKS, C // 64))


@njit(fastmath=FASTMATH, cache=True)
def _loras_down(mixed, parts, c, lo, hi, w1, a1, g1, v1, with_v):
    lora_down(mixed[1], w1, lo, hi, parts[c, 0])
    lora_down(mixed[4], a1, lo, hi, parts[c, 1])
    lora_down(mixed[5], g1, lo, hi, parts[c, 2])
    if with_v:
        lora_down(mixed[3], v1, lo, hi, parts[c, 3])


@njit(fastmath=FASTMATH, cache=True)
def _loras_middle(parts, ranks, with_v, chunks):
    """parts[LORA_CHUNKS, k] = act_k(sum over chunks c, in order, of parts[c, k]): w tanh, a none,
    g sigmoid, v none."""
    for k in range(4 if with_v else 3):
        for d in range(ranks[k]):
            acc = parts[0, k, d]
            for c in range(1, chunks):
                acc += parts[c, k, d]
            if k == 0:
                acc = np.tanh(acc)
            elif k == 2:
                acc = sigmoid(acc)
            parts[LORA_CHUNKS, k, d] = acc


@njit(fastmath=FASTMATH, cache=True)
def _loras_up(parts, lo, hi, w2, a2, g2, v2, w_out, a_out, g_out, v_out, with_v):
    mid = parts[LORA_CHUNKS]
    lora_up(mid[0], w2, lo, hi, w_out)
    lora_up(mid[1], a2, lo, hi, a_out)
    lora_up(mid[2], g2, lo, hi, g_out)
    if with_v:
        lora_up(mid[3], v2, lo, hi, v_out)


@njit(fastmath=FASTMATH, cache=True)
def loras(l, W, mixed, parts, w_out, a_out, g_out, v_out, with_v):
    """The LoRAs of layer l's time mix for one token, from its lerped inputs mixed (6, C: r w k v
    a g): w_out = tanh(x_w @ w1) @ w2, a_out = (x_a @ a1) @ a2, g_out = sigmoid(x_g @ g1) @ g2 and,
    with with_v (every layer but the first), v_out = (x_v @ v1) @ v2. The biases w0, a0, v0 and
    what follows (model.time_mix) are the caller's. parts: (LORA_CHUNKS + 1, 4, max rank) scratch.

    The down-projections are split into `lora_chunks(C)` row chunks, summed afterwards in chunk
    order, and the up-projections into as many column chunks: two parallel regions when the work pays
    for them (LORA_PARALLEL_FROM). On one thread, a layer's LoRA matrices (~1.8 MB at C = 768,
    cold from memory after the big products) had taken a third of a token on 16 cores
    (benchmarks/decode_profile.py). The chunks are fixed, so the order of every sum, and so the
    result, is the same for any thread count and for a sequence in a batch."""
    ranks = (W.w1.shape[2], W.a1.shape[2], W.g1.shape[2], W.v1.shape[2])
    _loras_chunked(mixed, parts, ranks, W.w1[l], W.a1[l], W.g1[l], W.v1[l], W.w2[l], W.a2[l],
                   W.g2[l], W.v2[l], w_out, a_out, g_out, v_out, with_v)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _loras_chunked(mixed, parts, ranks, w1, a1, g1, v1, w2, a2, g2, v2, w_out, a_out, g_out,
                   v_out, with_v):
    C = mixed.shape[1]
    chunks = lora_chunks(C)
    step = (C + chunks - 1) // chunks
    work = 2 * C * (ranks[0] + ranks[1] + ranks[2] + ranks[3])
    if work < LORA_PARALLEL_FROM:
        for c in range(chunks):
            _loras_down(mixed, parts, c, min(C, c * step), min(C, (c + 1) * step), w1, a1, g1,
                        v1, with_v)
        _loras_middle(parts, ranks, with_v, chunks)
        for c in range(chunks):
            _loras_up(parts, min(C, c * step), min(C, (c + 1) * step), w2, a2, g2, v2, w_out,
                      a_out, g_out, v_out, with_v)
    else:
        for c in prange(chunks):
            _loras_down(mixed, parts, c, min(C, c * step), min(C, (c + 1) * step), w1, a1, g1,
                        v1, with_v)
        _loras_middle(parts, ranks, with_v, chunks)
        for c in prange(chunks):
            _loras_up(parts, min(C, c * step), min(C, (c + 1) * step), w2, a2, g2, v2, w_out,
                      a_out, g_out, v_out, with_v)


# ----------------------------------------------------------------------------------------------
# The time mix's WKV part, one head at a time
# ----------------------------------------------------------------------------------------------

@njit(fastmath=FASTMATH, cache=True)
def wkv_head(h, N, S, s, r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer):
    """Head h of the time mix from its projections to the gated output s.y (C,): removal key,
    replacement key, decay, value residual, WKV step, group norm, bonus, gate (model.py's
    removal_key ... output_gate). S (H, N, N) [value][key] updated in place. Heads touch
    disjoint slices of every scratch vector, so they run in parallel safely."""
    o = h * N
    norm = np.float32(0.0)
    for j in range(o, o + N):                                   # kappa_hat: unit length per head
        s.kk[j] = s.k[j] * k_k[j]
        norm += s.kk[j] * s.kk[j]
    norm = max(np.sqrt(norm), np.float32(1e-12))
    for j in range(o, o + N):
        s.kk[j] /= norm
        s.k_tilde[j] = s.k[j] * (1 + (s.a[j] - 1) * k_a[j])
        s.decay[j] = np.exp(-DECAY_SCALE * sigmoid(s.w_pre[j]))  # in (0.545, 1)
        s.beta[j] = s.kk[j] * s.a[j]
        if first_layer:
            s.v_res[j] = s.v[j]
            s.v_first[j] = s.v[j]
        else:
            s.v_res[j] = s.v[j] + (s.v_first[j] - s.v[j]) * sigmoid(s.v_gate[j])
    # The head's slices as local views, and the row's value hoisted: read through `s` inside the
    # loop, every load may alias the store to S (LLVM cannot tell), so nothing is hoisted or
    # vectorised; as views, the loop runs 3x faster (0.13 -> 0.04 ms for 12 heads of 64), same bits.
    kk, decay, beta = s.kk[o:o + N], s.decay[o:o + N], s.beta[o:o + N]
    k_tilde, r, v_res = s.k_tilde[o:o + N], s.r[o:o + N], s.v_res[o:o + N]
    for i in range(N):                             # S <- S diag(w) + (S alpha) beta^T + v k~^T
        S_i = S[h, i]                                           # row i: value channel i
        sa = np.float32(0.0)
        for j in range(N):
            sa -= S_i[j] * kk[j]                                # alpha = -kappa_hat
        v_i = v_res[i]
        yi = np.float32(0.0)
        for j in range(N):
            u = S_i[j] * decay[j] + sa * beta[j] + v_i * k_tilde[j]
            S_i[j] = u
            yi += u * r[j]                                      # y = S r
        s.y[o + i] = yi
    mu = np.float32(0.0)                                        # group norm over the head
    for i in range(o, o + N):
        mu += s.y[i]
    mu /= N
    var = np.float32(0.0)
    for i in range(o, o + N):
        var += (s.y[i] - mu) * (s.y[i] - mu)
    inv = 1 / np.sqrt(var / N + np.float32(GN_EPS))
    bonus = np.float32(0.0)                                     # r . (k~ * r_k) over the head
    for j in range(N):
        bonus += s.r[o + j] * s.k_tilde[o + j] * r_k[h, j]
    for i in range(o, o + N):
        s.y[i] = ((s.y[i] - mu) * inv * ln_x_w[i] + ln_x_b[i] + bonus * s.v_res[i]) * s.g[i]


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def wkv_heads(S, s, r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer):
    """Every head of one layer, in parallel when the state is big enough to pay for it."""
    H, N = r_k.shape
    if H * N * N * 4 < PARALLEL_FROM:
        for h in range(H):
            wkv_head(h, N, S, s, r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer)
    else:
        for h in prange(H):
            wkv_head(h, N, S, s, r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer)


# ----------------------------------------------------------------------------------------------
# One layer and one token
# ----------------------------------------------------------------------------------------------

@njit(fastmath=FASTMATH, cache=True)
def time_mix(l, W, s, att_shift, S):
    """model.time_mix for one token of layer l; adds its output to s.x. s.xa holds LN1(x)."""
    C = s.x.shape[0]
    for c in range(6):                               # lerps r w k v a g: (6, C)
        for i in range(C):
            s.mixed[c, i] = s.xa[i] + (att_shift[i] - s.xa[i]) * W.lerp[l, c, i]
    matvec3(W.Wr[l], s.mixed[0], s.r, W.Wk[l], s.mixed[2], s.k, W.Wv[l], s.mixed[3], s.v,
            s.pairs)
    loras(l, W, s.mixed, s.lora, s.w_pre, s.a, s.g, s.v_gate, l > 0)
    for i in range(C):
        s.w_pre[i] += W.w0[l, i]
        s.a[i] = sigmoid(W.a0[l, i] + s.a[i])                      # learning rate in (0, 1)
        s.v_gate[i] += W.v0[l, i]                                  # a pre-activation
    wkv_heads(S, s, W.r_k[l], W.k_k[l], W.k_a[l], W.ln_x_w[l], W.ln_x_b[l], l == 0)
    att_shift[:] = s.xa
    matvec(W.Wo[l], s.y, s.xk, s.pairs)                           # xk: free here, (C,)
    for i in range(C):
        s.x[i] += s.xk[i]


@njit(fastmath=FASTMATH, cache=True)
def channel_mix(l, W, s, ffn_shift):
    """model.channel_mix for one token of layer l (plain x070); adds its output to s.x."""
    C = s.x.shape[0]
    layer_norm(s.x, W.ln2_w[l], W.ln2_b[l], s.xf)
    for i in range(C):
        s.xk[i] = s.xf[i] + (ffn_shift[i] - s.xf[i]) * W.ffn_lerp[l, i]
    matvec(W.Wfk[l], s.xk, s.hidden, s.pairs)                     # (F,)
    for i in range(s.hidden.shape[0]):
        u = max(s.hidden[i], np.float32(0.0))
        s.hidden[i] = u * u                                        # squared ReLU
    matvec(W.Wfv[l], s.hidden, s.xk, s.pairs)                     # (C,)
    for i in range(C):
        s.x[i] += s.xk[i]
    ffn_shift[:] = s.xf


@njit(fastmath=FASTMATH, cache=True)
def decode_token(token, W, att_shift, wkv, ffn_shift, s, with_head):
    """One token through the whole model, in place: the state (att_shift (L, C), wkv (L, H, N, N),
    ffn_shift (L, C)) moves on by one token; s.x gets the hidden vector before ln_out and, with
    with_head, s.logits the logits (V,). W: DecodeWeights; s: Scratch.

    Not itself parallel=True: its parallel regions are in the callees that pay for a barrier
    (`matvec`, `wkv_heads`, each compiled parallel), and a prange here, over layers or vectors,
    would only add barriers (Numba warns when parallel=True finds nothing to parallelise)."""
    row(W.emb, token, s.xa)                          # emb[token] (C,)
    layer_norm(s.xa, W.ln0_w, W.ln0_b, s.x)                        # x0 (C,)
    for l in range(att_shift.shape[0]):
        layer_norm(s.x, W.ln1_w[l], W.ln1_b[l], s.xa)
        time_mix(l, W, s, att_shift[l], wkv[l])
        channel_mix(l, W, s, ffn_shift[l])
    if with_head:
        layer_norm(s.x, W.ln_out_w, W.ln_out_b, s.xf)
        matvec(W.head, s.xf, s.logits, s.pairs)                   # (V,)


# ----------------------------------------------------------------------------------------------
# Batched decode: B sequences one token each, every weight read once for all of them
# ----------------------------------------------------------------------------------------------
#
# In this file, not a module of its own, because of Numba's cache: a cached function is
# recompiled when its own file changes, not when a function it calls from another file does
# (numba/numba#8396, unmerged). Kernels in a second file would go on running the cached old
# `dot_row` or `wkv_head` after an edit of them here (seen: a 3x slower WKV step).

def make_batch_scratch(config, n_seq):
    """make_scratch's temporaries for n_seq sequences: a leading batch axis on every field but
    `mixed` (6, B, C) and `pairs` (3, B, 2, M), where it is second (module docstring). Allocated
    once per size: a step allocates nothing."""
    C, F, V = config.n_embd, config.dim_ffn, config.vocab_size
    D = max(config.d_decay, config.d_aaa, config.d_mv, config.d_gate, 1)
    vec = lambda: np.zeros((n_seq, C), np.float32)
    return Scratch(x=vec(), xa=vec(), xf=vec(), mixed=np.zeros((6, n_seq, C), np.float32),
                   r=vec(), k=vec(), v=vec(), w_pre=vec(), a=vec(), g=vec(), v_gate=vec(),
                   v_first=vec(), kk=vec(), k_tilde=vec(), decay=vec(), beta=vec(), v_res=vec(),
                   y=vec(), xk=vec(), hidden=np.zeros((n_seq, F), np.float32),
                   lora=np.zeros((n_seq, LORA_CHUNKS + 1, 4, D), np.float32),
                   pairs=np.zeros((3, n_seq, 2, max(C, F) // 2), np.float32),
                   logits=np.zeros((n_seq, V), np.float32))


@njit(fastmath=FASTMATH, cache=True)
def sequence(sb, b):
    """Sequence b's temporaries as a single sequence's Scratch of views (for `wkv_head`)."""
    return Scratch(sb.x[b], sb.xa[b], sb.xf[b], sb.mixed[:, b], sb.r[b], sb.k[b], sb.v[b],
                   sb.w_pre[b], sb.a[b], sb.g[b], sb.v_gate[b], sb.v_first[b], sb.kk[b],
                   sb.k_tilde[b], sb.decay[b], sb.beta[b], sb.v_res[b], sb.y[b], sb.xk[b],
                   sb.hidden[b], sb.lora[b], sb.pairs[:, b], sb.logits[b])


# ----------------------------------------------------------------------------------------------
# Products: each row read once for the whole batch
# ----------------------------------------------------------------------------------------------

@njit(fastmath=FASTMATH, cache=True)
def _rows_batch(W, X, XS, out, n_seq, lo, hi):
    """out[b, i] = W[i] . X[b] for rows lo..hi and every sequence: the loop over sequences is
    inside the loop over rows, so row i is fetched from memory once and stays in cache for all."""
    for i in range(lo, hi):
        for b in range(n_seq):
            out[b, i] = dot_row(W, i, X[b], XS[b])


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec_batch(W, X, out, pairs, n_seq):
    """out[b] = W @ X[b] for the first n_seq rows of X (n_seq, m), W (n, m) as stored; rows in
    ROW_CHUNKS chunks, in parallel when the batch's product is big enough. pairs: (3, B, 2, M)."""
    n = W.shape[0]
    XS = pairs[0]
    for b in range(n_seq):
        split_pairs(W, X[b], XS[b])
    step = (n + ROW_CHUNKS - 1) // ROW_CHUNKS
    if n * X.shape[1] * n_seq < PARALLEL_FROM:
        _rows_batch(W, X, XS, out, n_seq, 0, n)
    else:
        for c in prange(ROW_CHUNKS):
            _rows_batch(W, X, XS, out, n_seq, min(n, c * step), min(n, (c + 1) * step))


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def matvec3_batch(W1, X1, out1, W2, X2, out2, W3, X3, out3, pairs, n_seq):
    """matvec3 for a batch: receptance, key and value in one parallel region."""
    n = W1.shape[0]
    for b in range(n_seq):
        split_pairs(W1, X1[b], pairs[0, b])
        split_pairs(W2, X2[b], pairs[1, b])
        split_pairs(W3, X3[b], pairs[2, b])
    step = (n + ROW_CHUNKS - 1) // ROW_CHUNKS
    if 3 * n * X1.shape[1] * n_seq < PARALLEL_FROM:
        _rows_batch(W1, X1, pairs[0], out1, n_seq, 0, n)
        _rows_batch(W2, X2, pairs[1], out2, n_seq, 0, n)
        _rows_batch(W3, X3, pairs[2], out3, n_seq, 0, n)
    else:
        for c in prange(3 * ROW_CHUNKS):
            lo, hi = min(n, (c % ROW_CHUNKS) * step), min(n, (c % ROW_CHUNKS + 1) * step)
            if c < ROW_CHUNKS:
                _rows_batch(W1, X1, pairs[0], out1, n_seq, lo, hi)
            elif c < 2 * ROW_CHUNKS:
                _rows_batch(W2, X2, pairs[1], out2, n_seq, lo, hi)
            else:
                _rows_batch(W3, X3, pairs[2], out3, n_seq, lo, hi)


# ----------------------------------------------------------------------------------------------
# The WKV step over (sequence, head) pairs
# ----------------------------------------------------------------------------------------------

@njit(fastmath=FASTMATH, cache=True)
def _wkv_pair(pair, wkv, l, sb, r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer):
    H, N = r_k.shape
    b, h = pair // H, pair % H
    wkv_head(h, N, wkv[b, l], sequence(sb, b), r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer)


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def wkv_heads_batch(wkv, l, sb, n_seq, r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer):
    """Every head of layer l for every sequence; wkv (B, L, H, N, N) updated in place."""
    H, N = r_k.shape
    if n_seq * H * N * N * 4 < PARALLEL_FROM:
        for pair in range(n_seq * H):
            _wkv_pair(pair, wkv, l, sb, r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer)
    else:
        for pair in prange(n_seq * H):
            _wkv_pair(np.int64(pair), wkv, l, sb, r_k, k_k, k_a, ln_x_w, ln_x_b, first_layer)


# ----------------------------------------------------------------------------------------------
# One layer and one step
# ----------------------------------------------------------------------------------------------

@njit(fastmath=FASTMATH, cache=True)
def time_mix_batch(l, W, sb, n_seq, att_shift, wkv):
    """time_mix for every sequence: per-sequence lerps, then the batched r, k, v
    products, per-sequence LoRAs, the WKV heads, the batched output product. sb.xa holds LN1(x).
    att_shift (B, L, C), wkv (B, L, H, N, N) updated in place."""
    C = sb.x.shape[1]
    for b in range(n_seq):
        for c in range(6):                           # lerps r w k v a g
            for i in range(C):
                sb.mixed[c, b, i] = sb.xa[b, i] + (att_shift[b, l, i] - sb.xa[b, i]) * W.lerp[l, c, i]
    matvec3_batch(W.Wr[l], sb.mixed[0], sb.r, W.Wk[l], sb.mixed[2], sb.k, W.Wv[l], sb.mixed[3],
                  sb.v, sb.pairs, n_seq)
    for b in range(n_seq):
        loras(l, W, sb.mixed[:, b], sb.lora[b], sb.w_pre[b], sb.a[b], sb.g[b], sb.v_gate[b],
              l > 0)
        for i in range(C):
            sb.w_pre[b, i] += W.w0[l, i]
            sb.a[b, i] = sigmoid(W.a0[l, i] + sb.a[b, i])
            sb.v_gate[b, i] += W.v0[l, i]
    wkv_heads_batch(wkv, l, sb, n_seq, W.r_k[l], W.k_k[l], W.k_a[l], W.ln_x_w[l], W.ln_x_b[l],
                    l == 0)
    for b in range(n_seq):
        att_shift[b, l] = sb.xa[b]
    matvec_batch(W.Wo[l], sb.y, sb.xk, sb.pairs, n_seq)
    for b in range(n_seq):
        for i in range(C):
            sb.x[b, i] += sb.xk[b, i]


@njit(fastmath=FASTMATH, cache=True)
def channel_mix_batch(l, W, sb, n_seq, ffn_shift):
    """channel_mix for every sequence; ffn_shift (B, L, C) updated in place."""
    C = sb.x.shape[1]
    for b in range(n_seq):
        layer_norm(sb.x[b], W.ln2_w[l], W.ln2_b[l], sb.xf[b])
        for i in range(C):
            sb.xk[b, i] = sb.xf[b, i] + (ffn_shift[b, l, i] - sb.xf[b, i]) * W.ffn_lerp[l, i]
    matvec_batch(W.Wfk[l], sb.xk, sb.hidden, sb.pairs, n_seq)       # (B, F)
    for b in range(n_seq):
        for i in range(sb.hidden.shape[1]):
            u = max(sb.hidden[b, i], np.float32(0.0))
            sb.hidden[b, i] = u * u                                   # squared ReLU
    matvec_batch(W.Wfv[l], sb.hidden, sb.xk, sb.pairs, n_seq)       # (B, C)
    for b in range(n_seq):
        for i in range(C):
            sb.x[b, i] += sb.xk[b, i]
        ffn_shift[b, l] = sb.xf[b]


@njit(fastmath=FASTMATH, cache=True)
def decode_batch(tokens, W, att_shift, wkv, ffn_shift, sb, with_head):
    """One token for each of the len(tokens) sequences, in place: a BatchState's att_shift
    (B, L, C), wkv (B, L, H, N, N) and ffn_shift (B, L, C) move on by one token; sb.x[:B] gets
    the hidden vectors before ln_out and, with with_head, sb.logits[:B] the logits (B, V).
    W: DecodeWeights; sb: make_batch_scratch(config, at least B)."""
    n_seq = tokens.shape[0]
    for b in range(n_seq):
        row(W.emb, tokens[b], sb.xa[b])                                # emb[token]
        layer_norm(sb.xa[b], W.ln0_w, W.ln0_b, sb.x[b])                # x0
    for l in range(att_shift.shape[1]):
        for b in range(n_seq):
            layer_norm(sb.x[b], W.ln1_w[l], W.ln1_b[l], sb.xa[b])
        time_mix_batch(l, W, sb, n_seq, att_shift, wkv)
        channel_mix_batch(l, W, sb, n_seq, ffn_shift)
    if with_head:
        for b in range(n_seq):
            layer_norm(sb.x[b], W.ln_out_w, W.ln_out_b, sb.xf[b])
        matvec_batch(W.head, sb.xf, sb.logits, sb.pairs, n_seq)       # (B, V)
