"""Prefill (T tokens at once) on the CPU: BLAS for the matrix products, Numba for the rest, and
one set of threads for both.

The reference's sequence form (model.block over (T, C) arrays) spends most of a prefill in its
matrix products, which NumPy hands to BLAS over the whole sequence: that part is already fast.
What is left is the position-wise work between the products, a dozen NumPy expressions per
layer, each a pass over (T, C) arrays with a temporary of its own. Here those passes are fused
into a few Numba kernels, each the twin of named reference steps (its docstring says which):

    add_and_norm      the residual add, layer_norm
    mix               token_shift, lerp: the six mixed inputs of the time mix (one for the channel mix)
    wkv_inputs        decay, learning_rate, removal_key, replacement_key, value_residual
    wkv_head          wkv_seq, one head (the recurrence)
    time_mix_output   group_norm, bonus, output_gate
    squared_relu_     squared_relu, in place

and `block` strings them between the matrix products (`x @ W.T` in float32, as the reference) in
the order of model.block. The residual adds ride along: the time mix's output is added to x by
the kernel that normalises x for the channel mix, and the channel mix's output by the next
layer's first kernel (`block` hands it on as `pending`; the caller adds the last one).

Threads (`share`): every piece of work is cut into tasks (rows of a position-wise kernel, a slice
of a product's output features, a WKV head, a LoRA) that the caller and its helper threads take
one after the other; BLAS runs single-threaded inside a task and the kernels release the GIL.
BLAS's and Numba's own thread pools are not used: each spins for a while after a call, waiting
for the next, so when the two alternate they take the cores from each other, and a product split
in fixed halves waits for its slower half, which another busy process on the machine makes
several times slower. Measured on 2 cores: `share` docstring and benchmarks/prefill.py.

The WKV operator: the recurrence (`wkv_recurrent`, heads as tasks) unless the caller passes
another; the chunked form (model.wkv_chunked, NumPy) is 3-4x slower on the CPU at every length
measured (64 to 2048 tokens, numbers in backends/numba_cpu.py), so "auto" is the recurrence.

Numerics: float32 with fastmath={"reassoc", "contract"}, as the other Numba kernels
(backends/numba_cpu.py explains why), and a vectorisable exp (`exp_f32`, within 1e-7 relative).
Each position and each head is computed by one thread in a fixed order, so the kernels give the
same bits for any thread count; the products are cut by output features, each computed whole by
one BLAS call, so they too do not depend on the thread count, but on how many tasks a product is
cut into (TASKS_PER_THREAD x threads): 1 and 2 threads agree within float32 rounding, not
necessarily bit for bit (tests/test_prefill.py).
"""

from __future__ import annotations

import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache, partial

import numba
import numpy as np
from numba import njit

from .. import model as ref
from .numba_decode import bits_to_float32, layer_norm   # layer_norm: one vector, per position

FASTMATH = {"reassoc", "contract"}
# error_model="numpy": x / 0 gives inf or NaN, as in NumPy, instead of Python's ZeroDivisionError,
# whose check in every division keeps LLVM from vectorising a loop (measured: 6x on the decay).
# nogil: the kernels release the GIL, so that several Python threads run them at once (`share`).
OPTIONS = dict(fastmath=FASTMATH, error_model="numpy", nogil=True, cache=True)
# float32 constants: Numba types a Python float, or an int beside a float32, as float64, and one
# float64 operand turns a whole expression into float64 (half the vector width, or none).
DECAY_SCALE = np.float32(ref.DECAY_SCALE)
GN_EPS = np.float32(ref.GN_EPS)
L2_EPS = np.float32(ref.L2_EPS)
ONE = np.float32(1.0)


# ----------------------------------------------------------------------------------------------
# The exponential, vectorisable
# ----------------------------------------------------------------------------------------------

@njit(**OPTIONS)
def exp_f32(x):
    """e^x in float32 without a library call, so that a loop calling it vectorises (Numba's np.exp
    calls libm once per element and stops LLVM vectorising the whole loop: measured 3x slower on
    the decay and learning-rate pass). Cephes' expf: x = n ln2 + r with |r| <= ln2 / 2, e^r by a
    degree-7 polynomial, 2^n built in the exponent bits. Within 1e-7 relative of e^x (NumPy's
    float32 exp: 2e-7); NaN stays NaN, past 88.72 it overflows to inf; below -87.3 it returns
    e^-87.3 = 1.2e-38 instead of a subnormal or 0, which no step here can tell apart."""
    x = min(max(x, np.float32(-87.3)), np.float32(89.0))
    n = np.floor(x * np.float32(1.44269504088896341) + np.float32(0.5))    # round(x / ln2)
    r = x - n * np.float32(0.693359375) + n * np.float32(2.12194440e-4)    # x - n ln2, in 2 parts
    p = np.float32(1.9875691500e-4)
    p = p * r + np.float32(1.3981999507e-3)
    p = p * r + np.float32(8.3334519073e-3)
    p = p * r + np.float32(4.1665795894e-2)
    p = p * r + np.float32(1.6666665459e-1)
    p = p * r + np.float32(5.0000001201e-1)
    p = p * r * r + r + np.float32(1.0)                                     # e^r
    # 2^n as 2^h 2^(n-h), h = floor(n / 2): each factor a normal float32 for n in [-126, 128]
    n = np.int32(n)
    h = n >> np.int32(1)
    two_h = bits_to_float32((h + np.int32(127)) << np.int32(23))
    two_rest = bits_to_float32((n - h + np.int32(127)) << np.int32(23))
    return p * two_h * two_rest


@njit(**OPTIONS)
def sigmoid(x):
    """model.sigmoid with exp_f32."""
    return ONE / (ONE + exp_f32(-x))


# ----------------------------------------------------------------------------------------------
# Kernels: each on the rows lo:hi of (T, ...) arrays (or on one head), on the calling thread
# ----------------------------------------------------------------------------------------------

@njit(**OPTIONS)
def add_and_norm(x, dx, ln_w, ln_b, normed, lo, hi):
    """The twin of model.block's residual add and `layer_norm`, on rows lo:hi:
    x += dx (in place; skipped when dx is None), normed = layer_norm(x, ln_w, ln_b). x, dx (T, C)."""
    for t in range(lo, hi):
        if dx is not None:
            for j in range(x.shape[1]):
                x[t, j] += dx[t, j]
        layer_norm(x[t], ln_w, ln_b, normed[t])


@njit(**OPTIONS)
def mix(normed, x_before, lerps, mixed, lo, hi):
    """The twin of `token_shift` and one `lerp` per row of `lerps`, on rows lo:hi:
    mixed[m] = lerp(normed, token_shift(normed, x_before), lerps[m]).
    normed (T, C), every row of it already computed (row lo - 1 is read); x_before (C,): the
    normed vector of the token before the first (the state's shift); lerps (M, C): six for the
    time mix (r w k v a g), one for the channel mix. Writes mixed (M, T, C)."""
    for t in range(lo, hi):
        previous = x_before if t == 0 else normed[t - 1]
        for m in range(lerps.shape[0]):
            for j in range(normed.shape[1]):
                mixed[m, t, j] = normed[t, j] + (previous[j] - normed[t, j]) * lerps[m, j]


@njit(**OPTIONS)
def wkv_inputs(k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, n_head,
               decay, k_tilde, alpha, beta, lo, hi):
    """The twin of model.time_mix_inputs's position-wise steps after the products, on rows lo:hi:
    `decay`, `learning_rate`, `removal_key`, `replacement_key`, `value_residual`, and time_mix's
    alpha = -kk, beta = kk * a.

    k, v (T, C): the key and value projections; w_lora, a_lora, v_lora (T, C): the LoRA outputs
    (x @ w1 -> tanh -> @ w2 and so on) without their biases w0, a0, v0 (C,); v_lora is None in
    layer 0, which has no value residual. v_first (T, C): layer 0's value (unused in layer 0).
    Writes decay, k_tilde, alpha, beta (T, C); v becomes the value after the residual, in place.
    """
    C = k.shape[1]
    N = C // n_head
    for t in range(lo, hi):
        # One loop per step: a loop that reads and writes many arrays is not vectorised (LLVM
        # gives up on proving that they do not overlap), and each of these is (measured: 2x).
        for j in range(C):                                                # model.decay
            decay[t, j] = exp_f32(-DECAY_SCALE * sigmoid(w0[j] + w_lora[t, j]))
        for j in range(C):                                     # model.learning_rate: a, in beta
            beta[t, j] = sigmoid(a0[j] + a_lora[t, j])
        for j in range(C):                                                # model.replacement_key
            k_tilde[t, j] = k[t, j] * (ONE + (beta[t, j] - ONE) * k_a[j])
        for h in range(n_head):                       # model.removal_key: k * k_k, unit per head
            o = h * N
            norm = np.float32(0.0)
            for j in range(o, o + N):
                u = k[t, j] * k_k[j]
                norm += u * u
            scale = ONE / max(np.sqrt(norm), L2_EPS)
            for j in range(o, o + N):
                kk = k[t, j] * k_k[j] * scale
                alpha[t, j] = -kk
                beta[t, j] *= kk                                          # kk * a
        if v_lora is not None:                                            # model.value_residual
            for j in range(C):
                v[t, j] += (v_first[t, j] - v[t, j]) * sigmoid(v0[j] + v_lora[t, j])


@njit(**OPTIONS)
def wkv_head(S, r, w, k, v, alpha, beta, y, h):
    """The twin of model.wkv_seq for head h: its recurrence over the T tokens, one `wkv_step` at
    a time. S (H, N, N) [value][key], updated in place; r, w, k, v, alpha, beta, y (T, H, N)."""
    T, H, N = r.shape
    for t in range(T):
        for i in range(N):                                   # state row i: value channel i
            sa = np.float32(0.0)
            for j in range(N):
                sa += S[h, i, j] * alpha[t, h, j]                       # (S alpha)_i
            yi = np.float32(0.0)
            for j in range(N):
                s = S[h, i, j] * w[t, h, j] + sa * beta[t, h, j] + v[t, h, i] * k[t, h, j]
                S[h, i, j] = s
                yi += s * r[t, h, j]
            y[t, h, i] = yi


@njit(**OPTIONS)
def time_mix_output(y, r, k_tilde, v, g, ln_x_w, ln_x_b, r_k, out, lo, hi):
    """The twin of model.time_mix_output up to the output projection, on rows lo:hi: `group_norm`
    of the WKV output y, plus the `bonus` r.(k_tilde r_k) v per head, times the gate
    (`output_gate`). y, r, k_tilde, v (after the value residual), g: (T, C); r_k (H, N).
    Writes out (T, C)."""
    H, N = r_k.shape
    for t in range(lo, hi):
        for h in range(H):
            o = h * N
            mu = np.float32(0.0)
            for i in range(o, o + N):
                mu += y[t, i]
            mu /= np.float32(N)
            var = np.float32(0.0)
            for i in range(o, o + N):
                var += (y[t, i] - mu) * (y[t, i] - mu)
            inv = ONE / np.sqrt(var / np.float32(N) + GN_EPS)
            bonus = np.float32(0.0)
            for j in range(N):
                bonus += r[t, o + j] * k_tilde[t, o + j] * r_k[h, j]
            for i in range(o, o + N):
                normed = (y[t, i] - mu) * inv * ln_x_w[i] + ln_x_b[i]
                out[t, i] = (normed + bonus * v[t, i]) * g[t, i]


@njit(**OPTIONS)
def squared_relu_(u, lo, hi):
    """The twin of model.squared_relu, in place on rows lo:hi: u = max(u, 0)^2. u (T, F)."""
    for t in range(lo, hi):
        for j in range(u.shape[1]):
            z = max(u[t, j], np.float32(0.0))
            u[t, j] = z * z


# ----------------------------------------------------------------------------------------------
# Threads: one set of them shares every piece of work
# ----------------------------------------------------------------------------------------------

_helpers = None     # the helper threads, started on first use and shared by every model


def share(tasks, threads):
    """Run every task (a function of no arguments) once, on `threads` threads: the caller and
    threads - 1 helpers, each taking the next task as soon as it is done with one, and sleeping,
    not spinning, when there is none. Returns when all are done.

    Why not BLAS's and Numba's own threads: each keeps its threads spinning for a while after a
    call, waiting for the next, so when BLAS and Numba alternate, the two sets of threads take
    the cores from each other; and a BLAS product split in equal halves waits, spinning, for the
    slower half, so another busy process on the machine slows it down several times over.
    Here there is one set of threads, BLAS runs single-threaded inside each task, and a thread
    slowed down by another process simply takes fewer tasks.

    Measured with benchmarks/prefill.py and variants of it (0.1B, T=512, 2 threads of a 2-core
    AMD EPYC, tokens/s; one thread: 413): the fused kernels in parallel on Numba's threads
    between products on BLAS's two: 435, worse than the path before fusing (588); the kernels
    on one thread, BLAS on two: 690-705; `share`: 693-707. With other processes keeping the
    cores busy, the first ones fall to 110-150 and `share` keeps 370-385; beside one busy
    process, the path before 257, `share` 424 (it gains nothing there over one thread, but
    loses nothing either)."""
    global _helpers
    if threads <= 1 or len(tasks) == 1:
        for task in tasks:
            task()
        return
    if _helpers is None:
        _helpers = ThreadPoolExecutor(max(1, numba.config.NUMBA_NUM_THREADS - 1),
                                      thread_name_prefix="tinyrwkv-prefill")
    queue = iter(tasks)
    lock = threading.Lock()

    def work():
        while True:
            with lock:
                task = next(queue, None)
            if task is None:
                return
            task()
    helpers = [_helpers.submit(work) for _ in range(min(threads, len(tasks)) - 1)]
    work()
    for helper in helpers:
        helper.result()                                # re-raises a helper's exception


def row_tasks(kernel, T, threads, *args):
    """Tasks that run kernel(*args, lo, hi) over rows 0:T, in slices of at least MIN_ROWS rows."""
    return [partial(kernel, *args, lo, hi) for lo, hi in _cuts(T, threads, MIN_ROWS)]


def linear_tasks(x, W, out, threads):
    """Tasks that compute out = x @ W.T (float32 BLAS, as the reference), each for a slice of the
    output: of its rows (positions) when there are more positions than output features, else of
    its columns (features). BLAS packs both operands of each call into its own layout; the one
    every task packs again whole is the other one, so the cut is along the longer axis (measured,
    8 tasks, one thread: 768 x 768 at T=2048 cut by features 15% slower than by positions)."""
    T, n_out = out.shape
    if T > n_out:
        return [partial(_product_rows, x, W, out, lo, hi) for lo, hi in _cuts(T, threads, 64)]
    return [partial(_product_features, x, W, out, lo, hi)
            for lo, hi in _cuts(n_out, threads, MIN_FEATURES)]


def _product_rows(x, W, out, lo, hi):
    np.matmul(x[lo:hi], W.T, out=out[lo:hi])


def _product_features(x, W, out, lo, hi):
    np.matmul(x, W[lo:hi].T, out=out[:, lo:hi])


def _cuts(n, threads, smallest):
    """(lo, hi) slices of range(n): one per task, TASKS_PER_THREAD per thread (one at one thread),
    none shorter than `smallest`, the cuts at multiples of 16 (whole vectors)."""
    parts = 1 if threads == 1 else max(1, min(TASKS_PER_THREAD * threads, n // smallest))
    bounds = [n * i // parts // 16 * 16 for i in range(parts)] + [n]
    return [(lo, hi) for lo, hi in zip(bounds[:-1], bounds[1:]) if hi > lo]


TASKS_PER_THREAD = 4
MIN_ROWS = 16           # positions per task of a position-wise kernel, at least
MIN_FEATURES = 128      # output features per task of a matrix product, at least


def single_threaded_blas():
    """A context in which BLAS runs on the calling thread only (threadpoolctl), restored after."""
    return _blas_controller().limit(limits=1, user_api="blas")


@lru_cache(maxsize=1)
def _blas_controller():
    import threadpoolctl
    return threadpoolctl.ThreadpoolController()


# ----------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------

def wkv_recurrent(S, r, w, k, v, alpha, beta, threads=1):
    """Numba twin of `model.wkv_seq` (same signature and result), the heads shared among `threads`
    threads: S (H, N, N); r, w, k, v, alpha, beta (T, H, N). Returns S_T, y (T, H, N)."""
    S = np.array(S, dtype=np.float32)                     # a copy: the input is not modified
    args = [np.ascontiguousarray(u, dtype=np.float32) for u in (r, w, k, v, alpha, beta)]
    y = np.empty_like(args[0])
    share([partial(wkv_head, S, *args, y, h) for h in range(r.shape[1])], threads)
    return S, y


def block(x, pending, v_first, state, layer_id, p, lerps, n_head, threads, wkv=None, s_emb=None):
    """model.block over T tokens with the fused kernels, on `threads` threads (the caller runs
    BLAS single-threaded: `single_threaded_blas`); x (T, C) float32 is updated in place.

    pending: the previous layer's channel-mix output, not yet added to x (None in layer 0);
    p: this layer's weights as float32 (keys as in model.RWKV7.blocks); lerps (6, C): the time
    mix's lerp vectors r w k v a g stacked; wkv: a WKV operator (S, r, w, k, v, alpha, beta) ->
    (S, y), or None for `wkv_recurrent` on these threads; s_emb (T, D*D): DeepEmbed rows.
    Updates layer `layer_id` of `state` in place. Returns (this layer's channel-mix output, to be
    added to x, and v_first).
    """
    T, C = x.shape
    H = n_head
    empty = lambda *shape: np.empty(shape, np.float32)
    rows = lambda kernel, *args: share(row_tasks(kernel, T, threads, *args), threads)

    # time mix (model.time_mix): x += pending; LN1 and the six lerps
    xa, mixed = empty(T, C), empty(6, T, C)
    rows(add_and_norm, x, pending, p["ln1.weight"], p["ln1.bias"], xa)
    rows(mix, xa, state.att_shift[layer_id], lerps, mixed)
    xr, xw, xk, xv, x_a, xg = mixed
    # the seven products of the inputs as one set of tasks: r, k, v (cut in slices) and the LoRAs
    r, k, v, w_lora, a_lora, g = (empty(T, C) for _ in range(6))
    v_lora = None if layer_id == 0 else empty(T, C)
    tasks = (linear_tasks(xr, p["att.receptance.weight"], r, threads)
             + linear_tasks(xk, p["att.key.weight"], k, threads)
             + linear_tasks(xv, p["att.value.weight"], v, threads)
             + [lambda: np.matmul(np.tanh(xw @ p["att.w1"]), p["att.w2"], out=w_lora),
                lambda: np.matmul(x_a @ p["att.a1"], p["att.a2"], out=a_lora),
                lambda: np.matmul(ref.sigmoid(xg @ p["att.g1"]), p["att.g2"], out=g)])
    if v_lora is not None:
        tasks.append(lambda: np.matmul(xv @ p["att.v1"], p["att.v2"], out=v_lora))
    share(tasks, threads)
    if layer_id == 0:
        v_first = v.copy()                         # v itself becomes the value after the residual
    decay, k_tilde, alpha, beta = empty(T, C), empty(T, C), empty(T, C), empty(T, C)
    rows(wkv_inputs, k, v, w_lora, a_lora, v_lora, v_first, p["att.w0"], p["att.a0"],
         p["att.v0"] if v_lora is not None else p["att.a0"],        # (layer 0 has no v0: unread)
         p["att.k_k"], p["att.k_a"], H, decay, k_tilde, alpha, beta)
    heads = lambda u: u.reshape(T, H, C // H)
    wkv_args = (state.wkv[layer_id], heads(r), heads(decay), heads(k_tilde), heads(v),
                heads(alpha), heads(beta))
    S, y = wkv_recurrent(*wkv_args, threads=threads) if wkv is None else wkv(*wkv_args)
    state.wkv[layer_id] = S
    gated, att = empty(T, C), empty(T, C)
    rows(time_mix_output, np.ascontiguousarray(y.reshape(T, C), dtype=np.float32), r, k_tilde, v,
         g, p["att.ln_x.weight"], p["att.ln_x.bias"], p["att.r_k"], gated)
    share(linear_tasks(gated, p["att.output.weight"], att, threads), threads)
    state.att_shift[layer_id] = xa[-1]

    # channel mix (model.channel_mix): x += att; LN2 and its lerp; key, squared ReLU, value
    xf, xk = empty(T, C), empty(1, T, C)
    rows(add_and_norm, x, att, p["ln2.weight"], p["ln2.bias"], xf)
    rows(mix, xf, state.ffn_shift[layer_id], p["ffn.x_k"].reshape(1, C), xk)
    hidden = empty(T, p["ffn.key.weight"].shape[0])                        # (T, F)
    share(linear_tasks(xk[0], p["ffn.key.weight"], hidden, threads), threads)
    rows(squared_relu_, hidden)
    if s_emb is not None:                         # DeepEmbed's gate, as model.channel_mix
        D = p["ffn.s1"].shape[1]
        m = (xf @ p["ffn.s1"])[:, None, :]                              # (T, 1, D)
        hidden *= (m @ s_emb.reshape(T, D, D))[:, 0, :] @ p["ffn.s2"] + p["ffn.s0"]
    state.ffn_shift[layer_id] = xf[-1]
    out = empty(T, C)
    share(linear_tasks(hidden, p["ffn.value.weight"], out, threads), threads)
    return out, v_first
