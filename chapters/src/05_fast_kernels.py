# %% [markdown]
# # 05 · Fast kernels: the same math, compiled
#
# The NumPy reference (`tinyrwkv/model.py`) is written to be read. The Numba backend
# (`tinyrwkv/backends/numba_cpu.py`) computes the same function faster, and this chapter shows
# how, and how we know it is the same function. What you will see:
#
# 1. why generating one token is limited by **memory bandwidth**, not arithmetic;
# 2. a matrix-vector kernel in a few lines of Numba, and the same kernel reading **bf16** weights
#    (half the bytes) by widening them on the fly;
# 3. the Numba backend checked against the float64 reference;
# 4. a measured comparison of the backends on a small model.
#
# Prerequisites: chapters 01-04. Numbers measured here are on whatever machine runs the
# notebook; `tinyrwkv bench` is the full benchmark beside the official package.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np
from numba import njit, prange

import tinyrwkv
from tinyrwkv.backends import numba_cpu
from tinyrwkv.synthetic import make_weights

rel_err = lambda got, ref: float(np.abs(np.asarray(got, np.float64) - ref).max() / np.std(ref))

# %% [markdown]
# ## 1. One token reads every weight once
#
# To produce one token, every Linear layer multiplies its weight matrix $W$ (out × in) by one
# vector: $2 \cdot \text{out} \cdot \text{in}$ flops for $4 \cdot \text{out} \cdot \text{in}$
# bytes of float32 weights. Half a flop per byte: a CPU does tens of flops in the time it reads
# one byte from memory, so decode speed is **bytes of weights / memory bandwidth**. Two ways to
# go faster follow: read the weights at full bandwidth, and read fewer bytes.

# %%
L, C, V = 4, 512, 4096
weights = make_weights(n_layer=L, n_embd=C, vocab_size=V, seed=0)
ref = tinyrwkv.RWKV7(weights, dtype="float64")          # the oracle
matrix_keys = [k for k in weights if k.endswith(numba_cpu.BIG_MATRICES) and k != "emb.weight"]
read_per_token = sum(weights[k].size for k in matrix_keys)
print(f"{L} layers, C={C}: {read_per_token / 1e6:.1f}M weights read per token "
      f"({4 * read_per_token / 1e6:.0f} MB in float32, {2 * read_per_token / 1e6:.0f} MB in bf16)")

# %% [markdown]
# ## 2. A matrix-vector kernel
#
# `out[i] = sum_j W[i, j] x[j]`, rows in parallel (`prange`). Numba compiles it with LLVM. One
# flag matters: `fastmath={"reassoc"}` lets the compiler add the products of a row in another
# order, which is what lets it use SIMD registers (8 float32 at a time). The result differs from
# NumPy's in the last bits, which is why the tests compare with a tolerance.

# %%
@njit(parallel=True, fastmath={"reassoc", "contract"})
def matvec_f32(W, x, out):
    for i in prange(W.shape[0]):
        acc = np.float32(0.0)
        for j in range(W.shape[1]):
            acc += W[i, j] * x[j]
        out[i] = acc


rng = np.random.default_rng(0)
W = rng.standard_normal((3072, 768)).astype(np.float32)       # (out, in), like ffn.key.weight
x = rng.standard_normal(768).astype(np.float32)
out = np.empty(3072, np.float32)
matvec_f32(W, x, out)
print("max|ours - W @ x| / std:", rel_err(out, W.astype(np.float64) @ x))
assert rel_err(out, W.astype(np.float64) @ x) < 1e-5

# %% [markdown]
# **bf16** keeps the top 16 bits of a float32: the same sign and exponent, 8 significant bits
# instead of 24. Widening is exact and costs one shift: `float32 bits = bf16 bits << 16`. Released
# RWKV-7 checkpoints are stored in bf16, so keeping them in bf16 loses nothing and halves the
# bytes read per token. The library's kernel (`numba_cpu._matvec_bf16`) widens a row into a small
# buffer and then takes the dot product; here is the idea in its simplest form.

# %%
@njit(parallel=True, fastmath={"reassoc", "contract"})
def matvec_bf16(Wb, x, out):
    for i in prange(Wb.shape[0]):
        bits = np.empty(Wb.shape[1], np.uint32)
        for j in range(Wb.shape[1]):
            bits[j] = np.uint32(Wb[i, j]) << np.uint32(16)      # exact widening
        row = bits.view(np.float32)
        acc = np.float32(0.0)
        for j in range(Wb.shape[1]):
            acc += row[j] * x[j]
        out[i] = acc


Wb = numba_cpu.bf16_bits(W)                                     # round to nearest even
print("bf16 storage:", Wb.dtype, Wb.nbytes // 2**20, "MiB instead of", W.nbytes // 2**20, "MiB")
matvec_bf16(Wb, x, out)
exact = numba_cpu.widen(Wb).astype(np.float64) @ x              # the bf16 weights, exactly
assert rel_err(out, exact) < 1e-5 and rel_err(numba_cpu.matvec(Wb, x), exact) < 1e-5
print("rounding the weights to bf16 moved this product by", f"{rel_err(exact, W.astype(np.float64) @ x):.1e}", "of its std")

# %% [markdown]
# One more lesson, learned the hard way: **don't mix thread pools in a hot loop.** NumPy's `@`
# calls BLAS, whose threads keep spinning for a while after each call; if a Numba kernel starts
# then, its threads fight the spinning ones for the same cores. The first version of the decode
# path used `@` for the small LoRA matrices between Numba kernels and ran 2-3x slower than now;
# `numba_cpu.vecmat` replaced them.
#
# ## 3. Same function as the reference
#
# The Numba backend must compute what `model.py` computes. Checked here on a model with a
# random non-zero state, in both forms, against the float64 reference; `tests/test_fast.py`
# does the same on many shapes and on the official package's outputs.

# %%
state = tinyrwkv.State.zeros(ref.config)
state.wkv[:] = 0.3 * rng.standard_normal(state.wkv.shape)
ids = rng.integers(0, V, 24)
expect, s_ref = ref.forward(ids, state, full_output=True)
errors = {}
for storage in ("float32", "bfloat16"):
    model = numba_cpu.RWKV7Numba(weights, storage=storage)
    for mode in ("sequence", "recurrent"):
        got, s = model.forward(ids, state, full_output=True, mode=mode)
        errors[(storage, mode)] = rel_err(got, expect)
for key, err in errors.items():
    print(key, f"max|dlogit|/std = {err:.1e}")
assert errors[("float32", "sequence")] < 5e-5 and errors[("float32", "recurrent")] < 5e-5
assert errors[("bfloat16", "recurrent")] < 5e-2      # the cost of rounding float32 weights to bf16

# %% [markdown]
# float32 storage agrees to float32 rounding. bf16 storage of these *float32* synthetic weights
# costs about 1% of the logits' spread: each weight was rounded to 8 bits. For a bf16 checkpoint
# that cost is zero, because the weights already are bf16.
#
# ## 4. Measured here
#
# Decode speed of the three backends on this model (medians of several tokens, after warm-up).

# %%
def decode_speed(model, n=20):
    logits, st = model.forward(ids[:8])
    for _ in range(3):
        logits, st = model.forward([int(np.argmax(logits))], st)
    times = []
    for _ in range(n):
        t0 = time.perf_counter()
        logits, st = model.forward([int(np.argmax(logits))], st)
        times.append(time.perf_counter() - t0)
    return 1 / np.median(times)


backends = {"numpy (reference)": tinyrwkv.RWKV7(weights),
            "numba float32": numba_cpu.RWKV7Numba(weights),
            "numba bf16": numba_cpu.RWKV7Numba(weights, storage="bfloat16")}
speeds = {name: decode_speed(m) for name, m in backends.items()}
for name, s in speeds.items():
    print(f"{name:18s} {s:7.1f} tok/s")

fig, ax = plt.subplots(figsize=(6, 3))
ax.barh(list(speeds), list(speeds.values()), color=["tab:gray", "tab:blue", "tab:green"])
ax.set_xlabel("decode tokens per second (this machine)")
ax.set_title(f"One token at a time, L={L} C={C} V={V}")
plt.tight_layout()
plt.show()

# %% [markdown]
# On a model this small the weights fit in the CPU's cache, so the picture differs from a real
# model's; `tinyrwkv bench` measures the 0.1B, 0.4B and 1.5B shapes beside the official package,
# with the machine's bandwidth, and the README has its table.
#
# ## Summary
#
# * Decode reads every weight once per token: its speed is set by memory bandwidth.
# * The Numba kernels are the reference's math, compiled; `fastmath` only reorders sums.
# * bf16 storage halves the bytes; it is exact for bf16 checkpoints.
# * Every kernel is tested against the float64 reference before it is timed.

# %%
assert all(np.isfinite(list(speeds.values())))
assert errors[("float32", "sequence")] < 5e-5
