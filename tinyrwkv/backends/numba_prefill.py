"""Prefill (T tokens at once) on the CPU: BLAS for the matrix products, Numba for the rest.

The reference's sequence form (model.block over (T, C) arrays) spends most of a prefill in its
matrix products, which NumPy hands to BLAS over the whole sequence: that part is already fast.
What is left is the position-wise work between the products, a dozen NumPy expressions per
layer, each a pass over (T, C) arrays with a temporary of its own. Here those passes are fused
into a few Numba kernels, each the twin of named reference steps (its docstring says which),
parallel over positions:

    norm_and_mix      (residual add,) layer_norm, token_shift, lerp: (T, C) -> the mixed inputs
    wkv_inputs        decay, learning_rate, removal_key, replacement_key, value_residual
    time_mix_output   group_norm, bonus, output_gate
    squared_relu_     squared_relu, in place

and `block` strings them between the matrix products (`x @ W.T` in float32, as the reference) in
the order of model.block. The WKV operator is passed in (backends/numba_cpu.py chooses it), with
the signature every WKV operator has: wkv(S, r, w, k, v, alpha, beta) -> (S_T, y).

Residual adds ride along: the time mix's output is added to x by the kernel that normalises x for
the channel mix, and the channel mix's output by the next layer's first kernel (`block` hands it
on as `pending`; the caller adds the last one).

Numerics: float32 with fastmath={"reassoc", "contract"}, as the other Numba kernels
(backends/numba_cpu.py explains why); each position is computed by one thread in a fixed order,
so these kernels give the same bits for any thread count. BLAS may not (OpenBLAS splits a
product differently for other thread counts): 1 and 2 threads agree within float32 rounding, not
bit for bit (tests/test_prefill.py).
"""

from __future__ import annotations

import numpy as np
from numba import njit, prange

from .. import model as ref
from .numba_decode import bits_to_float32, layer_norm   # layer_norm: one vector, per position

FASTMATH = {"reassoc", "contract"}
# error_model="numpy": x / 0 gives inf or NaN, as in NumPy, instead of Python's ZeroDivisionError,
# whose check in every division keeps LLVM from vectorising a loop (measured: 6x on the decay).
OPTIONS = dict(fastmath=FASTMATH, error_model="numpy", cache=True)
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
# Kernels, parallel over positions
# ----------------------------------------------------------------------------------------------

@njit(parallel=True, **OPTIONS)
def norm_and_mix(x, dx, ln_w, ln_b, x_before, lerps, normed, mixed):
    """The twin of model.block's residual add `x + dx`, then `layer_norm`, `token_shift` and one
    `lerp` per row of `lerps`:

        x += dx (in place; skipped when dx is None)      normed = layer_norm(x, ln_w, ln_b)
        mixed[m] = lerp(normed, token_shift(normed, x_before), lerps[m])

    x, dx (T, C); x_before (C,): the normed vector of the token before the first (the state's
    shift); lerps (M, C): six for the time mix (r w k v a g), one for the channel mix.
    Writes normed (T, C) and mixed (M, T, C)."""
    T, C = x.shape
    for t in prange(T):
        if dx is not None:
            for j in range(C):
                x[t, j] += dx[t, j]
        layer_norm(x[t], ln_w, ln_b, normed[t])
    for t in prange(T):                       # a second pass: row t - 1 must be normed first
        previous = x_before if t == 0 else normed[t - 1]
        for m in range(lerps.shape[0]):
            for j in range(C):
                mixed[m, t, j] = normed[t, j] + (previous[j] - normed[t, j]) * lerps[m, j]


@njit(parallel=True, **OPTIONS)
def wkv_inputs(k, v, w_lora, a_lora, v_lora, v_first, w0, a0, v0, k_k, k_a, n_head,
               decay, k_tilde, alpha, beta):
    """The twin of model.time_mix_inputs's position-wise steps after the products: `decay`,
    `learning_rate`, `removal_key`, `replacement_key`, `value_residual`, and time_mix's
    alpha = -kk, beta = kk * a.

    k, v (T, C): the key and value projections; w_lora, a_lora, v_lora (T, C): the LoRA outputs
    (x @ w1 -> tanh -> @ w2 and so on) without their biases w0, a0, v0 (C,); v_lora is None in
    layer 0, which has no value residual. v_first (T, C): layer 0's value (unused in layer 0).
    Writes decay, k_tilde, alpha, beta (T, C); v becomes the value after the residual, in place.
    """
    T, C = k.shape
    N = C // n_head
    for t in prange(T):
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


@njit(parallel=True, **OPTIONS)
def time_mix_output(y, r, k_tilde, v, g, ln_x_w, ln_x_b, r_k, out):
    """The twin of model.time_mix_output up to the output projection: `group_norm` of the WKV
    output y, plus the `bonus` r.(k_tilde r_k) v per head, times the gate (`output_gate`).
    y, r, k_tilde, v (after the value residual), g: (T, C); r_k (H, N). Writes out (T, C)."""
    T, C = y.shape
    H, N = r_k.shape
    for t in prange(T):
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


@njit(parallel=True, **OPTIONS)
def squared_relu_(u):
    """The twin of model.squared_relu, in place: u = max(u, 0)^2. u (T, F)."""
    for t in prange(u.shape[0]):
        for j in range(u.shape[1]):
            z = max(u[t, j], np.float32(0.0))
            u[t, j] = z * z


# ----------------------------------------------------------------------------------------------
# One layer
# ----------------------------------------------------------------------------------------------

def block(x, pending, v_first, state, layer_id, p, lerps, n_head, wkv, s_emb=None):
    """model.block over T tokens with the fused kernels; x (T, C) float32 is updated in place.

    pending: the previous layer's channel-mix output, not yet added to x (None in layer 0);
    p: this layer's weights as float32 (keys as in model.RWKV7.blocks); lerps (6, C): the time
    mix's lerp vectors r w k v a g stacked; wkv: the WKV operator; s_emb (T, D*D): DeepEmbed rows.
    Updates layer `layer_id` of `state` in place. Returns (this layer's channel-mix output, to be
    added to x, and v_first).
    """
    T, C = x.shape
    H = n_head
    empty = lambda *shape: np.empty(shape, np.float32)

    # time mix (model.time_mix): inputs, projections, position-wise steps, WKV, output
    xa, mixed = empty(T, C), empty(6, T, C)
    norm_and_mix(x, pending, p["ln1.weight"], p["ln1.bias"], state.att_shift[layer_id], lerps,
                 xa, mixed)
    xr, xw, xk, xv, x_a, xg = mixed
    r = xr @ p["att.receptance.weight"].T
    k = xk @ p["att.key.weight"].T
    v = xv @ p["att.value.weight"].T
    w_lora = np.tanh(xw @ p["att.w1"]) @ p["att.w2"]
    a_lora = (x_a @ p["att.a1"]) @ p["att.a2"]
    g = ref.sigmoid(xg @ p["att.g1"]) @ p["att.g2"]
    if layer_id == 0:
        v_first, v_lora = v.copy(), None           # v itself becomes the value after the residual
    else:
        v_lora = (xv @ p["att.v1"]) @ p["att.v2"]
    decay, k_tilde, alpha, beta = empty(T, C), empty(T, C), empty(T, C), empty(T, C)
    wkv_inputs(k, v, w_lora, a_lora, v_lora, v_first, p["att.w0"], p["att.a0"],
               p.get("att.v0", p["att.a0"]), p["att.k_k"], p["att.k_a"], H,
               decay, k_tilde, alpha, beta)
    heads = lambda u: u.reshape(T, H, C // H)
    state.wkv[layer_id], y = wkv(state.wkv[layer_id], heads(r), heads(decay), heads(k_tilde),
                                 heads(v), heads(alpha), heads(beta))
    gated = empty(T, C)
    time_mix_output(np.ascontiguousarray(y.reshape(T, C)), r, k_tilde, v, g,
                    p["att.ln_x.weight"], p["att.ln_x.bias"], p["att.r_k"], gated)
    att = gated @ p["att.output.weight"].T
    state.att_shift[layer_id] = xa[-1]

    # channel mix (model.channel_mix), after x += att
    xf, xk = empty(T, C), empty(1, T, C)
    norm_and_mix(x, att, p["ln2.weight"], p["ln2.bias"], state.ffn_shift[layer_id],
                 p["ffn.x_k"].reshape(1, C), xf, xk)
    hidden = xk[0] @ p["ffn.key.weight"].T                             # (T, F)
    squared_relu_(hidden)
    if s_emb is not None:                         # DeepEmbed's gate, as model.channel_mix
        D = p["ffn.s1"].shape[1]
        m = (xf @ p["ffn.s1"])[:, None, :]                              # (T, 1, D)
        hidden *= (m @ s_emb.reshape(T, D, D))[:, 0, :] @ p["ffn.s2"] + p["ffn.s0"]
    state.ffn_shift[layer_id] = xf[-1]
    return hidden @ p["ffn.value.weight"].T, v_first
