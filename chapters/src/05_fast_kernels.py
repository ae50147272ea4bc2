# %% [markdown]
# # 05 · Fast kernels: the same math, compiled, and what limits its speed
#
# **What you will build.** The NumPy reference (`tinyrwkv/model.py`) is written to be read; the
# Numba backend (`tinyrwkv/backends/numba_cpu.py` and `numba_decode.py`) computes the same
# function faster. In this chapter you write the kernel that does most of that work yourself, and
# you measure what limits it. You will:
#
# 1. count the bytes one generated token reads, for each way the library can store the weights
#    (float32, bfloat16, float16, int8 as GGUF Q8_0), on the trained model in `weights/`;
# 2. time things honestly: every timing here prints the **conditions** it ran under (the load
#    average, CPU time against wall time, and how often the system took a core away from us);
# 3. measure **this machine's memory bandwidth** (GB/s, at sizes from the caches to main memory);
# 4. write a matrix-vector kernel in Numba, rows in parallel (`prange`), check it against the
#    reference within a stated float32 bound, and see why its results do not depend on the
#    number of threads;
# 5. write the same kernel reading **bf16** and **Q8_0** weights (half and about a quarter of
#    float32's bytes) and time all three against the bandwidth;
# 6. put the decode rates of the trained model against the bandwidth (bytes per token / time
#    per token);
# 7. see why parallel code **collapses on a busy machine**, and what the library does about it.
#
# **Prerequisites.** [04 · The whole model](04_whole_model.ipynb). No Numba experience needed.
#
# **A word on speed claims.** Speeds depend on the machine and on what else runs on it: on a busy
# machine the order of two backends can reverse. So in this chapter every speed is *printed with
# its conditions* and never asserted; what is asserted is correctness (the kernels compute the
# reference's numbers) and arithmetic (byte counts). Numba is optional: without it the kernel
# sections say so and are skipped, and the rest runs.

# %%
import os
import subprocess
import sys
import time
from typing import NamedTuple

import matplotlib.pyplot as plt
import numpy as np
from threadpoolctl import threadpool_limits

import tinyrwkv
from tinyrwkv.backends.thread_governor import ThreadGovernor
from tinyrwkv.formats import to_bf16_bits
from tinyrwkv.formats.q8_0 import quantize_q8_0

try:
    import resource                      # Unix only: counts how often the OS preempted us
except ImportError:
    resource = None
try:
    import numba
    from numba import njit, prange
except ImportError:
    numba = None
    print("numba is not installed: sections 4, 5 and 7 and the Numba half of 6 are skipped. "
          "pip install numba to run them.")

CHAPTER_START = time.perf_counter()
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. One token reads every weight once
#
# To produce one token, each Linear layer multiplies its weight matrix $W$ (out × in) by one
# vector: $2 \cdot \text{out} \cdot \text{in}$ floating-point operations for
# $4 \cdot \text{out} \cdot \text{in}$ bytes of float32 weights, **half an operation per byte**. A
# CPU core can do several operations in the time one byte arrives from memory, so the arithmetic
# waits for the bytes, and the time of a token is at least
#
# $$ t_{\text{token}} \;\ge\; \frac{\text{bytes read per token}}{\text{memory bandwidth}}. $$
#
# Two ways to go faster follow: read the bytes at the full bandwidth (section 4), and read
# **fewer bytes** (section 5). The library keeps the large matrices in one of four storage types
# (README, "Backends and speed"; `tinyrwkv/backends/numba_cpu.py`'s docstring):
#
# | storage | bytes a weight | what it is |
# |---|---|---|
# | float32 | 4 | the reference's numbers |
# | bfloat16 | 2 | the top half of a float32; released RWKV-7 files are bf16 (docs/architecture.md §9.1) |
# | float16 | 2 | IEEE half: 11 significant bits, range ±65504 |
# | int8 (GGUF Q8_0) | 34/32 | blocks of 32 int8 weights sharing one float16 scale (docs/formats.md §4.5) |
#
# Everything else (the small LoRA matrices, the vectors, the state) stays float32. Here are the
# bytes per token of the trained model in `weights/` (6 layers, `C = 256`, 4096 tokens):

# %%
model = tinyrwkv.load(backend="numpy")          # the reference, float32; weights/ is bf16 on disk
cfg, tok = model.config, model.tokenizer
L, C, H, N, F, V = cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dim_ffn, cfg.vocab_size
print(f"L={L} C={C} H={H} N={N} F={F} V={V}")

BYTES_PER_WEIGHT = {"float32": 4.0, "bfloat16": 2.0, "float16": 2.0, "int8": 34 / 32}
BIG = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
       "ffn.key.weight", "ffn.value.weight", "head.weight")      # kept in the storage type


def bytes_per_token(model, storage):
    """Bytes one decode step reads: every big matrix in `storage`, one embedding row, every other
    tensor (LoRAs, vectors) in float32, and the state (read and written back)."""
    total = 0.0
    for key, a in model.stored_tensors().items():
        if key == "emb.weight":
            total += C * BYTES_PER_WEIGHT[storage]                    # one row of (V, C)
        elif key.endswith(BIG):
            total += a.size * BYTES_PER_WEIGHT[storage]
        else:
            total += a.size * 4
    state = L * (2 * C + H * N * N) * 4                              # att/ffn shift + WKV, float32
    return total + 2 * state


token_bytes = {s: bytes_per_token(model, s) for s in BYTES_PER_WEIGHT}
big_weights = sum(a.size for k, a in model.stored_tensors().items() if k.endswith(BIG))
for s, b in token_bytes.items():
    print(f"{s:9s} {b / 1e6:6.2f} MB per token")
print(f"the big matrices are {big_weights / 1e6:.2f}M of the model's {model.n_params / 1e6:.2f}M weights")
# bf16 saves exactly 2 bytes per big-matrix weight and per value of the embedding row:
assert np.isclose(token_bytes["float32"] - token_bytes["bfloat16"], 2 * (big_weights + C))
assert token_bytes["float16"] == token_bytes["bfloat16"]

# %% [markdown]
# ## 2. Timing with its conditions
#
# A timer that only reports seconds hides why they were slow. `timed` runs a function several
# times after one warm-up call and reports the **fastest** call: on a shared machine the slower
# calls are slower because something else had the core or the memory, so the fastest one is the
# best estimate of what the code itself costs. Beside it, it reports:
#
# * the **load average** (`os.getloadavg`): how many processes wanted a core, averaged over the
#   last minute, to compare with the number of cores (`os.cpu_count()`);
# * **CPU time / wall time** of this process (`time.process_time` counts every thread of it):
#   about 1.0 for one thread that had its core the whole time, about 2.0 for two; less means
#   our threads waited, for a core or for memory... or for each other (section 7);
# * **preemptions**: involuntary context switches (`resource.getrusage`), the times the
#   operating system took a core away from one of our threads to run something else.
#
# The load average reacts slowly (it is an average over a minute); CPU/wall and preemptions
# describe exactly the calls that were timed.

# %%
class Timing(NamedTuple):
    seconds: float          # the fastest call, in seconds
    calls: int
    cpu_per_wall: float     # CPU seconds of all our threads / wall seconds
    load: float             # the 1-minute load average (the larger of before and after)
    preemptions: int        # involuntary context switches while timing

    def conditions(self):
        return (f"{self.calls} calls: load {self.load:.1f} on {os.cpu_count()} cores, "
                f"CPU/wall {self.cpu_per_wall:.2f}, {self.preemptions} preemptions")


def load_average():
    return os.getloadavg()[0] if hasattr(os, "getloadavg") else float("nan")


def preemptions():
    return resource.getrusage(resource.RUSAGE_SELF).ru_nivcsw if resource else 0


def timed(fn, min_calls=5, min_seconds=0.05):
    """The fastest wall-clock seconds of fn() over at least min_calls calls and min_seconds,
    after one untimed call, and the conditions they ran under (a Timing)."""
    fn()
    load, wall0, cpu0, pre0 = load_average(), time.perf_counter(), time.process_time(), preemptions()
    times = []
    while len(times) < min_calls or time.perf_counter() - wall0 < min_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return Timing(min(times), len(times), cpu / wall, max(load, load_average()),
                  preemptions() - pre0)


print("right now:", timed(lambda: sum(range(10_000))).conditions())

# %% [markdown]
# ## 3. This machine's memory bandwidth
#
# The bandwidth is measured, not looked up: we read arrays of growing size and divide the bytes by
# the time. The probe is the dot product of an array with itself, `np.dot(a, a)` (BLAS's `sdot`),
# on one thread: it reads each byte once and does one multiply-add per 4-byte number, exactly the
# work per byte of a matrix-vector product, so it is the most such a product can hope for. Small
# arrays stay in the CPU's caches between calls and are read fast; an array larger than the last
# cache comes from main memory every time. Where this machine's steps are depends on its caches
# (printed below, when the operating system says).

# %%
def cache_sizes():
    """{'L1d': bytes, ...} from Linux's sysfs, or {} where it is not available."""
    sizes = {}
    for index in range(8):
        path = f"/sys/devices/system/cpu/cpu0/cache/index{index}/"
        try:
            level = open(path + "level").read().strip()
            kind = open(path + "type").read().strip()
            size = open(path + "size").read().strip()
        except OSError:
            break
        if kind != "Instruction":
            sizes[f"L{level}"] = int(size[:-1]) * 1024 if size.endswith("K") else int(size)
    return sizes


caches = cache_sizes()
print("caches of core 0:", {k: f"{v >> 10} KiB" for k, v in caches.items()} or "unknown")
sizes = 2 ** np.arange(16, 29)                        # 64 KiB ... 256 MiB
big_array = np.ones(sizes[-1] // 4, np.float32)
read_rate = []                                        # bytes per second, one thread
with threadpool_limits(1):                            # BLAS on one thread
    for nbytes in sizes:
        a = big_array[: nbytes // 4]
        t = timed(lambda: np.dot(a, a), min_seconds=0.03)
        read_rate.append(nbytes / t.seconds)
read_rate = np.array(read_rate)
memory_bandwidth = read_rate[-1]                      # the largest array: main memory
print(f"read bandwidth, one thread: {read_rate.max() / 1e9:.1f} GB/s at best (in cache), "
      f"{memory_bandwidth / 1e9:.1f} GB/s from main memory ({sizes[-1] >> 20} MiB); {t.conditions()}")


def bandwidth_at(nbytes):
    """The measured one-thread read bandwidth for a working set of nbytes (log interpolation)."""
    return float(np.exp(np.interp(np.log(nbytes), np.log(sizes), np.log(read_rate))))


for s in ("float32", "int8"):
    b = token_bytes[s]
    print(f"{s:8s}: {b / 1e6:5.1f} MB/token -> at most {bandwidth_at(b) / b:6.0f} tok/s if a token "
          f"did nothing but read its bytes (bandwidth at that size {bandwidth_at(b) / 1e9:.1f} GB/s)")

# %% [markdown]
# The trained model is small: its bytes per token (section 1) fit in a large last-level cache
# (this machine's are printed above), so decoding it repeatedly reads them from the cache, not
# from memory. The 0.1B models of the README's tables read 0.56 GB per token in float32 and live
# in main memory: that is the regime where "fewer bytes per token" is the speed. Section 5 times
# a matrix of that kind.
#
# ## 4. A matrix-vector kernel, rows in parallel
#
# `out[i] = sum_j W[i, j] x[j]`. The rows are independent, so they can run on different threads.
# Numba compiles the Python below with LLVM; `prange` marks the loop whose iterations are shared
# among the threads. We cut the `n` rows into `ROW_CHUNKS` fixed chunks and give each chunk to
# one task; a row is always one sequential loop inside one task.
#
# One flag matters: `fastmath={"reassoc", "contract"}` lets the compiler add a row's products in
# another order (several partial sums in SIMD registers, then combined) and fuse multiply-adds. The
# result then differs from NumPy's in the last bits, so we compare it with a **bound**, not with
# `==`. For a dot product of length `m` summed in float32 in *any* order, each of the at most `m`
# roundings (unit roundoff $u = 2^{-24}$) is relative to a partial sum no larger than
# $\sum_j |W_{ij} x_j|$, which gives
#
# $$ |\text{out}_i - (Wx)_i| \;\le\; \gamma_m \sum_j |W_{ij}\, x_j|, \qquad \gamma_m = \frac{m u}{1 - m u}. $$
#
# This holds whatever order the compiler picks, so it is the right tolerance for a reordered sum,
# and a wrong index or a missing term breaks it by orders of magnitude.

# %%
ROW_CHUNKS = 64                     # tasks per product: fixed, whatever the number of threads
FASTMATH = {"reassoc", "contract"}  # reorder sums, fuse multiply-adds; no approximate functions
U = 2.0 ** -24                      # float32 unit roundoff


def within_float32_bound(got, W, x):
    """True if every output is within the float32 dot-product bound of the exact product.
    W (n, m) as float64 (exactly the stored numbers), x (m,). Returns (ok, worst fraction of bound)."""
    exact = W @ x.astype(np.float64)                               # (n,): float64, ~exact
    m = W.shape[1]
    bound = m * U / (1 - m * U) * (np.abs(W) @ np.abs(x.astype(np.float64)))
    ratio = np.abs(got - exact) / np.maximum(bound, 1e-300)
    return bool(np.all(ratio <= 1)), float(ratio.max())


if numba:
    @njit(parallel=True, fastmath=FASTMATH)
    def matvec_f32(W, x, out):
        """out = W @ x. W (n, m) float32, x (m,) float32, out (n,) float32."""
        n, m = W.shape
        step = (n + ROW_CHUNKS - 1) // ROW_CHUNKS
        for c in prange(ROW_CHUNKS):                    # chunk c: rows [c*step, (c+1)*step)
            for i in range(c * step, min(n, (c + 1) * step)):
                acc = np.float32(0.0)
                for j in range(m):                      # one row: one thread, in a fixed order
                    acc += W[i, j] * x[j]
                out[i] = acc
else:
    print("skipped: section 4 needs numba")

# %% [markdown]
# Checked on every big matrix of the trained model (6 per layer, and the head), with an input
# vector of the size and spread of a layer-normalised activation:

# %%
matrices = {f"blocks.{i}.{k}": p[k] for i, p in enumerate(model.blocks) for k in BIG[:-1]}
matrices["head.weight"] = model.head
print(len(matrices), "matrices, shapes", sorted({W.shape for W in matrices.values()}))
inputs = {m: rng.standard_normal(m).astype(np.float32) for m in (C, F)}       # x (m,)
if numba:
    numba.set_num_threads(1)
    worst = 0.0
    for key, W in matrices.items():
        x = inputs[W.shape[1]]
        out = np.empty(W.shape[0], np.float32)
        matvec_f32(W, x, out)
        ok, ratio = within_float32_bound(out, W.astype(np.float64), x)
        assert ok, (key, ratio)
        worst = max(worst, ratio)
    print(f"matvec_f32 = W @ x within the float32 bound on all {len(matrices)} matrices "
          f"(largest error: {worst:.1e} of the bound)")

# %% [markdown]
# **Why the thread count cannot change the result.** Each output row is computed by exactly one
# task, in the same order, whichever thread runs that task; and the chunks are fixed by the
# matrix (`ROW_CHUNKS`), not by the number of threads. So 1 thread and 2 threads produce the same
# bits. The library's decode kernels are built the same way (`numba_decode.py`: "Each output row,
# each head and each LoRA chunk is computed by one thread in a fixed order"), which is why it can
# change its thread count while it runs without changing the text (section 7).
#
# The other way to parallelise a product is to split each **sum** among the threads and add their
# partial sums, which is what `prange` does with a loop that accumulates into one variable (a
# "reduction"). Then the order of the additions depends on how many threads share the sum, and
# the last bits can change with the thread count. Both are correct to the float32 bound; only one
# is reproducible.

# %%
if numba:
    @njit(parallel=True, fastmath=FASTMATH)
    def dot_split_sum(a, b):
        """sum(a * b), the sum itself shared among the threads (a prange reduction)."""
        acc = np.float32(0.0)
        for j in prange(a.shape[0]):
            acc += a[j] * b[j]
        return acc

    most = numba.config.NUMBA_NUM_THREADS           # threads Numba started: at most the cores
    a_long, b_long = rng.standard_normal((2, 1 << 20)).astype(np.float32)
    W, x = matrices["head.weight"], inputs[C]
    rows, sums = {}, {}
    for n in sorted({1, min(2, most)}):
        numba.set_num_threads(n)
        rows[n] = np.empty(W.shape[0], np.float32)
        matvec_f32(W, x, rows[n])
        sums[n] = dot_split_sum(a_long, b_long)
        assert within_float32_bound(np.array([sums[n]]), a_long[None].astype(np.float64), b_long)[0]
    if most >= 2:
        assert np.array_equal(rows[1], rows[2])      # rows: the same bits on 1 and 2 threads
        print("matvec_f32, 1 vs 2 threads: identical bits")
        print(f"dot_split_sum, 1 vs 2 threads: {sums[1]!r} vs {sums[2]!r} "
              f"({'the same bits' if sums[1] == sums[2] else 'different last bits'} on this run)")
    else:
        print("only one thread is available here: the 1-vs-2-threads check is skipped")

# %% [markdown]
# ## 5. Fewer bytes: bf16 and Q8_0 weights
#
# **bf16** keeps the top 16 bits of a float32: the same sign and exponent, 8 significant bits
# instead of 24. Widening back is exact and costs one shift, `float32 bits = bf16 bits << 16`.
# Rounding a float32 to bf16 (to nearest, ties to even, as torch does) is three integer
# operations. The trained model was saved in bf16 (weights/MODEL_CARD.md), so its float32 weights
# are bf16 numbers already, and rounding them changes nothing.

# %%
def to_bf16(x):
    """float32 -> bf16 bit patterns (uint16), round to nearest, ties to even. Any shape."""
    bits = np.ascontiguousarray(x, np.float32).view(np.uint32)
    round_up = np.uint32(0x7FFF) + ((bits >> np.uint32(16)) & np.uint32(1))   # ties to even
    return ((bits + round_up) >> np.uint32(16)).astype(np.uint16)


def from_bf16(bits):
    """bf16 bit patterns (uint16) -> float32, exact."""
    return (bits.astype(np.uint32) << np.uint32(16)).view(np.float32)


ties = (rng.integers(0x3000, 0x4F00, 1000).astype(np.uint32) << np.uint32(16)) | np.uint32(0x8000)
probe = np.concatenate([rng.standard_normal(10_000).astype(np.float32),     # ordinary values
                        ties.view(np.float32)])              # exactly half-way between two bf16
assert np.array_equal(to_bf16(probe), to_bf16_bits(probe))         # = the library's rounding
for key, W in matrices.items():
    assert np.array_equal(from_bf16(to_bf16(W)), W), key           # trained weights: already bf16
print("to_bf16 = tinyrwkv.formats.to_bf16_bits; the trained model's weights are exact bf16 numbers")

# %% [markdown]
# **Q8_0** (ggml's 8-bit format, the one llama.cpp's GGUF files use; docs/formats.md §4.5) cuts
# each row into blocks of 32 weights. A block stores one scale $d = \max|x| / 127$ as float16 and
# 32 integers $q = \text{round}(x / d)$ in $[-127, 127]$; the weight is $d \cdot q$. That is
# 2 + 32 = 34 bytes for 32 weights. Unlike bf16, it rounds the trained model's weights, by about
# half a step $d/2$ each. Our quantiser follows ggml's rule (`tinyrwkv/formats/q8_0.py`'s
# docstring: the scale is computed in float32, `1/d` is used to divide, halves round away from
# zero) and we check that it gives the library's bytes, which are the bytes of a Q8_0 GGUF.

# %%
def quantize_q8_0_mine(W):
    """W (n, m) float -> d (n, m/32) float16 scales, q (n, m/32, 32) int8 quants."""
    blocks = W.astype(np.float32).reshape(W.shape[0], -1, 32)          # (n, m/32, 32)
    d = np.abs(blocks).max(axis=-1) / np.float32(127)                   # (n, m/32) float32
    inv = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d > 0)
    scaled = (blocks * inv[..., None]).astype(np.float64)              # float32 product, as ggml
    q = np.sign(scaled) * np.floor(np.abs(scaled) + 0.5)     # round half away from 0 (exact in
    return d.astype(np.float16), q.astype(np.int8)           # float64; + 0.5 in float32 is not)


def gguf_bytes(d, q):
    """d, q -> the Q8_0 blocks as stored in a GGUF file: per block 2 bytes of d, 32 of q."""
    n, nb = d.shape
    out = np.empty((n, nb, 34), np.uint8)
    out[..., :2] = d.view(np.uint8).reshape(n, nb, 2)                 # little-endian float16
    out[..., 2:] = q.view(np.uint8)
    return out.reshape(n, nb * 34)


q8 = {key: quantize_q8_0_mine(W) for key, W in matrices.items()}
for key, W in matrices.items():
    assert np.array_equal(gguf_bytes(*q8[key]), quantize_q8_0(W)), key   # = the library's bytes
step_error = 0.0                             # the largest |d q - w| / d over every weight
for key, W in matrices.items():
    d, q = q8[key]
    dequantised = d.astype(np.float32)[..., None] * q                      # (n, m/32, 32), exact
    error = np.abs(dequantised.reshape(W.shape) - W) / np.repeat(d.astype(np.float32), 32, axis=1)
    step_error = max(step_error, float(error.max()))
print(f"Q8_0 = tinyrwkv.formats.q8_0.quantize_q8_0 on all {len(matrices)} matrices; "
      f"largest rounding error {step_error:.3f} of a step d")
# Half a step from rounding q, plus the scale's own rounding: q was computed with the float32 d,
# which is then stored as float16 (relative error up to 2^-11), and |q| <= 127 multiplies that.
assert step_error <= 0.5 + 127 * 2.0 ** -11

# %% [markdown]
# The kernels read the stored form and widen each weight to float32 as it is read; the
# arithmetic is float32, as in `matvec_f32`. The Q8_0 kernel keeps 32 partial sums, one per
# position in a block, and adds them once at the end of the row. The obvious version, which sums
# each block's 32 products and then multiplies by its scale, has to add across the SIMD register
# once per block; 32 running sums avoid that. (The library's kernels go further: they widen
# 16-bit weights in registers, two at a time, and write the Q8_0 product in LLVM IR;
# `numba_decode.py`'s docstring explains both.)

# %%
if numba:
    @njit(parallel=True, fastmath=FASTMATH)
    def matvec_bf16(Wb, x, out):
        """out = W @ x for bf16 bit patterns Wb (n, m) uint16; x (m,) float32."""
        n, m = Wb.shape
        step = (n + ROW_CHUNKS - 1) // ROW_CHUNKS
        for c in prange(ROW_CHUNKS):
            bits = np.empty(m, np.uint32)               # this task's row, widened
            row = bits.view(np.float32)
            for i in range(c * step, min(n, (c + 1) * step)):
                for j in range(m):
                    bits[j] = np.uint32(Wb[i, j]) << np.uint32(16)     # exact widening
                acc = np.float32(0.0)
                for j in range(m):
                    acc += row[j] * x[j]
                out[i] = acc

    @njit(parallel=True, fastmath=FASTMATH)
    def matvec_q8_0(d, q, x, out):
        """out = W @ x for W in Q8_0: d (n, m/32) float32 scales, q (n, m/32, 32) int8."""
        n, nb = d.shape
        step = (n + ROW_CHUNKS - 1) // ROW_CHUNKS
        for c in prange(ROW_CHUNKS):
            lanes = np.empty(32, np.float32)            # one partial sum per position in a block
            for i in range(c * step, min(n, (c + 1) * step)):
                lanes[:] = 0.0
                for b in range(nb):
                    for j in range(32):                 # no sum across j: SIMD-friendly
                        lanes[j] += d[i, b] * np.float32(q[i, b, j]) * x[32 * b + j]
                out[i] = lanes.sum()                    # the 32 partial sums, in a fixed order

    numba.set_num_threads(1)
    for key, W in matrices.items():
        x, out = inputs[W.shape[1]], np.empty(W.shape[0], np.float32)
        matvec_bf16(to_bf16(W), x, out)
        assert within_float32_bound(out, W.astype(np.float64), x)[0], key
        d, q = q8[key]
        matvec_q8_0(d.astype(np.float32), q, x, out)
        W_q = (d.astype(np.float64)[..., None] * q).reshape(W.shape)   # the stored numbers
        assert within_float32_bound(out, W_q, x)[0], key
    print(f"matvec_bf16 and matvec_q8_0 within the float32 bound on all {len(matrices)} matrices")
else:
    print("skipped: the bf16 and Q8_0 kernels need numba")

# %% [markdown]
# (The Q8_0 kernel here is given its float16 scales widened to float32, 4 bytes per 32 weights
# instead of 2, because Numba does not convert float16 numbers in compiled CPU code (version 0.68
# raises NotImplementedError); the bytes counted below are what it really reads.)
#
# **Timed.** Two workloads, on one thread, each kernel in each storage: all the products of one
# token of the trained model (its 37 matrices, about the size of a last-level cache), and one
# matrix of 128 MiB in float32 (16384 × 2048: larger than any cache, like the matrices of a 0.1B
# model). The rate is the bytes the kernel read divided by its fastest time, against the
# bandwidth measured in section 3 at the same size.

# %%
if numba:
    numba.set_num_threads(1)
    W_big = rng.standard_normal((16384, 2048), dtype=np.float32)       # 128 MiB
    x_big, out_big = rng.standard_normal(2048).astype(np.float32), np.empty(16384, np.float32)
    big = {"float32": (W_big,), "bfloat16": (to_bf16(W_big),),
           "int8": tuple(a.astype(np.float32) if a.dtype == np.float16 else a
                         for a in quantize_q8_0_mine(W_big))}
    del W_big
    model_stored = {"float32": {k: (W,) for k, W in matrices.items()},
                    "bfloat16": {k: (to_bf16(W),) for k, W in matrices.items()},
                    "int8": {k: (d.astype(np.float32), q) for k, (d, q) in q8.items()}}
    kernel = {"float32": matvec_f32, "bfloat16": matvec_bf16, "int8": matvec_q8_0}
    outs = {n: np.empty(n, np.float32) for n in (C, F, V)}

    def token_products(storage):
        for key, stored in model_stored[storage].items():
            W = matrices[key]
            kernel[storage](*stored, inputs[W.shape[1]], outs[W.shape[0]])

    kernel_points = []                      # (label, bytes read, bytes per second)
    for storage in ("float32", "bfloat16", "int8"):
        nbytes = sum(a.nbytes for stored in model_stored[storage].values() for a in stored)
        t = timed(lambda: token_products(storage))
        kernel_points.append((f"{storage}, one token's products", nbytes, nbytes / t.seconds))
        print(f"{storage:8s} one token's products: {nbytes / 1e6:6.1f} MB in {t.seconds * 1e3:6.2f} ms"
              f" = {nbytes / t.seconds / 1e9:5.1f} GB/s ({nbytes / t.seconds / bandwidth_at(nbytes):4.0%}"
              f" of the read bandwidth at that size); {t.conditions()}")
        nbytes = sum(a.nbytes for a in big[storage])
        t = timed(lambda: kernel[storage](*big[storage], x_big, out_big), min_calls=3)
        kernel_points.append((f"{storage}, a 128 MiB matrix", nbytes, nbytes / t.seconds))
        print(f"{storage:8s} 16384 x 2048 product:  {nbytes / 1e6:6.1f} MB in {t.seconds * 1e3:6.2f} ms"
              f" = {nbytes / t.seconds / 1e9:5.1f} GB/s ({nbytes / t.seconds / bandwidth_at(nbytes):4.0%}"
              f" of the read bandwidth at that size); {t.conditions()}")
    del big
else:
    kernel_points = []
    print("skipped: timing the kernels needs numba")

# %% [markdown]
# Read the percentages, not only the milliseconds. Near 100%, a kernel reads at the speed of the
# memory it reads from, and only fewer bytes can make it faster: the bf16 and Q8_0 products of
# the large matrix then take about 1/2 and 1/3.5 of float32's time (this Q8_0 kernel reads
# 4-byte scales, 36 bytes per 32 weights). Well below 100%, something other than reading is the
# limit: widening each weight (one shift for bf16; a conversion and a multiply for Q8_0), the
# per-row buffer of `matvec_bf16`, or the overhead of a Python call per matrix on the small
# model. Which of these you see depends on this machine and this moment; the
# conditions are printed beside each line.
#
# ## 6. Decode rates against the bandwidth
#
# Now whole tokens: the NumPy reference and the library's Numba decode (one compiled call per
# token, `numba_decode.decode_token`), each on one thread, on the trained model. The Numba decode
# keeps the model in bfloat16, the type it was saved in. Each storage type compiles its own
# decode step the first time it runs (tens of seconds, then cached on disk), so the other two are
# behind a flag: set `ALL_STORAGES = True` to add float32 and int8. Every fast path is first
# checked against the reference on the same tokens (validate first, then time). Decode rate ×
# bytes per token = the bytes per second a token really moved, which we put against the
# bandwidth at that size.

# %%
ALL_STORAGES = False               # True: also time the Numba decode in float32 and int8
prompt = tok.encode("Once upon a time, there was a little girl named Lily. She")
check_ids = prompt + tok.encode(" liked to play in the park.")


def decode_timing(m):
    state = None
    for t in prompt:                # one token at a time, as decode runs
        logits, state = m.forward([t], state)
    token = [int(np.argmax(logits))]

    def one_token():
        nonlocal state
        logits, state = m.forward(token, state)
        token[0] = int(np.argmax(logits))
    return timed(one_token, min_calls=20, min_seconds=0.2)


def token_by_token(m, ids):
    """Logits (T, V) of each token, fed one at a time through m.forward: the decode path."""
    state, rows = None, []
    for t in ids:
        logits, state = m.forward([t], state)
        rows.append(logits)
    return np.stack(rows)


rel_err = lambda got, ref: float(np.abs(got - ref).max() / ref.std())
expect = token_by_token(tinyrwkv.load(backend="numpy", dtype="float64"), check_ids)   # (T, V)
decoders = {"numpy float32": model}
# float32 and bfloat16 hold the same numbers (the file is bf16), so only float32 rounding
# separates them from float64: README's "Backends and speed" table measured 3.8e-6 on this model.
# int8 rounds every weight to a Q8_0 step: 3.8e-2 there, so 0.1 catches a broken kernel.
tolerance = {"numpy float32": 2e-5}
if numba:
    storages = (("float32", 2e-5), ("bfloat16", 2e-5), ("int8", 0.1)) if ALL_STORAGES else \
        (("bfloat16", 2e-5),)
    for storage, tol in storages:
        decoders[f"numba {storage}"] = tinyrwkv.load(backend="numba", storage=storage, threads=1)
        tolerance[f"numba {storage}"] = tol
else:
    print("skipped: the numba decoders need numba (only the NumPy reference is timed)")

decode_rows = []
for name, m in decoders.items():
    err = rel_err(token_by_token(m, check_ids), expect)
    assert err < tolerance[name], (name, err)
    storage = name.split()[1]
    with threadpool_limits(1):                    # the NumPy reference's BLAS on one thread too
        t = decode_timing(m)
    moved = token_bytes[storage] / t.seconds
    decode_rows.append((name, storage, 1 / t.seconds, moved))
    print(f"{name:15s} logits within {err:.1e} of float64; {1 / t.seconds:7.1f} tok/s, "
          f"{token_bytes[storage] / 1e6:5.1f} MB/token = {moved / 1e9:5.1f} GB/s "
          f"({moved / bandwidth_at(token_bytes[storage]):4.0%} of the bandwidth at that size); "
          f"{t.conditions()}")

# %%
colour = {"float32": "tab:blue", "bfloat16": "tab:orange", "int8": "tab:green"}
shape = {"one token's products": "o", "a 128 MiB matrix": "s", "decode": "D"}
fig, (ax, bx) = plt.subplots(1, 2, figsize=(12, 4.4), gridspec_kw={"width_ratios": [1.3, 1]})
ax.loglog(sizes, read_rate / 1e9, "k.-", lw=1.5)
for level, size in caches.items():
    ax.axvline(size, color="gray", lw=0.6, ls=":")
    ax.text(size * 1.05, read_rate.max() / 1e9, f"{level}\n{size >> 10} KiB", color="gray",
            fontsize=7, va="top")
for label, nbytes, rate in kernel_points:
    storage, kind = label.split(", ")
    ax.loglog(nbytes, rate / 1e9, shape[kind], ms=8, mfc="none", mew=1.5, color=colour[storage])
for name, storage, tok_s, moved in decode_rows:
    ax.loglog(token_bytes[storage], moved / 1e9, shape["decode"], ms=7,
              color="tab:gray" if name.startswith("numpy") else colour[storage])
handles = [plt.Line2D([], [], color="k", marker=".", label="read bandwidth: np.dot(a, a), 1 thread")]
handles += [plt.Line2D([], [], ls="", marker="o", color=c, label=s) for s, c in colour.items()]
handles += [plt.Line2D([], [], ls="", marker=m, color="k", mfc="none" if k != "decode" else "k",
                       label=("your kernel: " + k) if k != "decode" else "decode (gray: NumPy)")
            for k, m in shape.items()]
ax.legend(handles=handles, fontsize=7, loc="lower left")
ax.set_xlabel("bytes read (per call, or per token)")
ax.set_ylabel("GB/s")
ticks = [v for v in (1, 2, 5, 10, 20, 50, 100, 200) if read_rate.min() / 3e9 < v < read_rate.max() * 2e-9]
ax.set_yticks(ticks, [f"{v:g}" for v in ticks])
ax.yaxis.set_minor_formatter(plt.NullFormatter())
ax.set_title("Kernels and decode against this machine's read bandwidth", fontsize=10)
names = [r[0] for r in decode_rows]
ceiling = [bandwidth_at(token_bytes[r[1]]) / token_bytes[r[1]] for r in decode_rows]
bx.barh(names, [r[2] for r in decode_rows],
        color=["tab:gray" if n.startswith("numpy") else colour[r[1]] for n, r in zip(names, decode_rows)],
        label="measured (fastest token)")
bx.plot(ceiling, names, "k|", ms=25, mew=2, label="bandwidth at that size / bytes per token")
bx.set_xlabel("tokens per second (one thread, this machine, this run)")
bx.set_title("Decode of the trained model", fontsize=10)
bx.legend(fontsize=7, loc="lower right")
plt.tight_layout()
plt.show()
print(f"load average at the end of the measurements: {load_average():.1f} on {os.cpu_count()} cores")

# %% [markdown]
# How to read it. The black curve is the machine; each marker is a piece of code. A marker close
# to the curve reads its bytes about as fast as the machine allows, and there only fewer bytes
# make it faster: that is why the library offers bf16 (exact for bf16 checkpoints such as this
# one) and int8. A marker far below the curve loses its time elsewhere. The NumPy reference runs
# dozens of small NumPy operations per layer, each with microseconds of Python overhead, for
# only a few MB of weights on this model; the fused Numba step runs a whole token in one
# compiled call, without that overhead. How close each comes to the curve is what this run
# printed. On a 0.1B model (0.56 GB per token in float32, from main memory) the bytes dominate:
# the README's single-thread table ("Backends and speed", a busy 2-core machine) has float32 at
# 33.0 tok/s, bfloat16 at 51.9 and int8 at 64.5. If this run's markers disagree with what you
# expect, look first at the conditions printed beside them.
#
# ## 7. A busy machine, and why parallel code collapses on it
#
# A `prange` loop is a **parallel region**: the tasks are shared among the threads, and the loop
# ends at a **barrier** where every thread waits until the last task is done. When another
# program holds one of the cores, the operating system runs our thread on that core only for part
# of the time; the thread that was taken off the core finishes its tasks one scheduler time slice
# (milliseconds) later, and every other thread waits for it at the barrier. A product that takes
# 0.1 ms on a quiet machine can then take several ms. A decode step has dozens of barriers (each
# layer's products, its WKV heads, its LoRAs), so one busy process can make many threads *slower
# than one*: the library measured the shipped model falling from about 600 tok/s on one thread to
# 3.8 tok/s on two, on a 2-core machine with one busy process beside it
# (`tinyrwkv/backends/thread_governor.py`'s docstring).
#
# We can watch it happen with our own kernel: we time many calls of `matvec_f32` on the head
# matrix (a few MB, a fraction of a millisecond a call), on one thread and on all of Numba's
# threads, first as the machine is, then with one busy process of our own beside it (a Python
# loop that spins; we stop it ourselves after the measurement).

# %%
def call_times(fn, calls, max_seconds=1.5):
    """Seconds of each call of fn (after one warm-up): `calls` calls, or fewer if they take
    more than max_seconds in all. Returns the times and the conditions (a Timing)."""
    fn()
    load, wall0, cpu0, pre0 = load_average(), time.perf_counter(), time.process_time(), preemptions()
    times = []
    while len(times) < calls and time.perf_counter() - wall0 < max_seconds:
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    wall, cpu = time.perf_counter() - wall0, time.process_time() - cpu0
    return np.array(times), Timing(min(times), len(times), cpu / wall, max(load, load_average()),
                                   preemptions() - pre0)


most = numba.config.NUMBA_NUM_THREADS if numba else 1
runs = {}
if numba and most >= 2:
    W, x = matrices["head.weight"], inputs[C]
    out = np.empty(W.shape[0], np.float32)
    product = lambda: matvec_f32(W, x, out)

    def measure_both(label):
        for n in (1, most):
            numba.set_num_threads(n)
            runs[(label, n)] = call_times(product, 400)        # at most 1.5 s each

    measure_both("as the machine is")
    busy = subprocess.Popen([sys.executable, "-c",                       # spins for at most 60 s
                             "import time\nend = time.monotonic() + 60\n"
                             "while time.monotonic() < end: pass"])
    try:
        time.sleep(0.3)                                                  # let it start spinning
        measure_both("with one busy process")
        # what the library does about it: a ThreadGovernor choosing the count for each call
        governor = ThreadGovernor(most)
        governed = []
        for _ in range(400):
            n = governor.threads()
            numba.set_num_threads(n)
            start = time.perf_counter()
            product()
            governor.record(n, time.perf_counter() - start)
            governed.append(n)
    finally:
        busy.kill()                                                      # the process we started
        busy.wait()
    for (label, n), (times, t) in runs.items():
        print(f"{label:22s} {n} thread{'s' if n > 1 else ' '}: median {np.median(times) * 1e3:6.3f} ms, "
              f"mean {times.mean() * 1e3:6.3f} ms, slowest 1% {np.quantile(times, 0.99) * 1e3:6.2f} ms; "
              f"{t.conditions()}")
    print(f"governor, with the busy process: {governed.count(1)} of {len(governed)} calls on 1 thread, "
          f"now {governor.describe()}; its changes (call, from, to, why), the first three of "
          f"{len(governor.history)}: {governor.history[:3]}")

    fig, ax = plt.subplots(figsize=(7, 3.6))
    for (label, n), (times, _) in runs.items():
        ax.semilogy(np.linspace(0, 100, len(times)), np.sort(times) * 1e3,
                    ls="-" if n == 1 else "--", color="tab:blue" if "busy" not in label else "tab:red",
                    label=f"{label}, {n} thread{'s' if n > 1 else ''}")
    ax.set_xlabel("% of calls (sorted by time)")
    ax.set_ylabel("ms per call")
    ax.set_title(f"matvec_f32 on the head ({W.shape[0]} x {W.shape[1]}), this machine, this run")
    ax.legend(fontsize=8)
    plt.tight_layout()
    plt.show()
else:
    print("skipped: the busy-machine demonstration needs numba and at least 2 threads")

# %% [markdown]
# What to look for: when one of our threads is preempted at a barrier, the curves for several
# threads rise at the right end: those calls waited a time slice. The one-thread curve shares the
# machine too, but it has no barrier to wait at. Which curve is lower can differ from run to run
# and from machine to machine; the printed CPU/wall and preemptions say how contested each run
# was (the load average lags by a minute and barely notices a process that ran for three
# seconds). That is the point. On a quiet machine more threads are faster; on a busy one they can be much
# slower, and a program cannot know in advance which machine it will find.
#
# **What the library does about it** (`tinyrwkv/backends/thread_governor.py`). Decode does the same
# work for every token, so token times are comparable from one token to the next. A
# `ThreadGovernor` decodes at its current thread count, and every so often tries its neighbours
# (half and double) for a few tokens and moves to whichever was fastest; a run of slow tokens (the
# machine just got busy) triggers a look at once. Above, the same governor picked the thread count
# for each call of your kernel. Switching is safe only because the results do not depend on the
# thread count, which section 4 asserted for your kernel and `tests/test_numba_decode.py` asserts
# for the library's. `tinyrwkv.load(..., threads=N)` fixes N threads instead.
#
# ## Summary
#
# * A generated token reads every weight once: its time is at least bytes / bandwidth. This
#   machine's bandwidth was measured above, at every size from the caches to main memory.
# * Fewer bytes is the speed when reading is the limit: bf16 (2 bytes, exact for bf16
#   checkpoints), float16 (2), int8 as GGUF Q8_0 (34/32 bytes, rounds each weight to a step).
# * Your kernels compute the reference's product within the float32 dot-product bound, and the
#   float32 one gives the same bits on 1 and 2 threads because each row is one thread's
#   sequential loop in fixed chunks.
# * Speeds are measurements of a machine at a moment: print them with their conditions (load,
#   CPU/wall, preemptions), and assert only what must hold anywhere.
# * Parallel regions wait at barriers for a preempted thread, so on a busy machine more threads
#   can be much slower; the library's thread governor measures and adapts.

# %%
# The chapter's checks again, in one place (each was asserted where it was shown):
assert np.isclose(token_bytes["float32"] - token_bytes["bfloat16"], 2 * (big_weights + C))
if numba:
    assert worst <= 1                                   # your kernel within the float32 bound
    if most >= 2:
        assert np.array_equal(rows[1], rows[2])         # and the same bits on 1 and 2 threads
print(f"all checks passed; chapter ran in {time.perf_counter() - CHAPTER_START:.1f} s")
