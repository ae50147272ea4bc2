"""Numba kernels for training: the WKV operator forward and backward (twins of train.py's
wkv_forward and wkv_backward: the signatures of the contract in backends/__init__.py), with the
(sequence, head) pairs in parallel.

    loss, grads = tinyrwkv.train.loss_and_grad(params, ids, targets, wkv_ops=WKV_OPS)

Everything else in training is matrix products and element-wise NumPy, already multi-threaded by
BLAS; the WKV recurrence is the one loop over time, and in NumPy it costs a dozen small array
operations per token. Here each (b, h) steps through its tokens with the state in a local array.
"""

from __future__ import annotations

import numba
import numpy as np

from . import SAVE_EVERY

_JIT = dict(parallel=True, cache=True, fastmath={"reassoc", "contract"})


@numba.njit(**_JIT)
def _forward(S0, r, w, k, v, alpha, beta, chunk, y, S_out, saved):
    B, T, H, N = r.shape
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        S = S0[b, h].copy()
        sa = np.empty(N, S.dtype)
        for t in range(T):
            if t % chunk == 0:
                saved[t // chunk, b, h] = S
            for i in range(N):
                acc = 0.0
                for j in range(N):
                    acc += S[i, j] * alpha[b, t, h, j]
                sa[i] = acc
            for i in range(N):
                acc = 0.0
                for j in range(N):
                    s = S[i, j] * w[b, t, h, j] + sa[i] * beta[b, t, h, j] + v[b, t, h, i] * k[b, t, h, j]
                    S[i, j] = s
                    acc += s * r[b, t, h, j]
                y[b, t, h, i] = acc
        S_out[b, h] = S


def wkv_forward(S0, r, w, k, v, alpha, beta, chunk=SAVE_EVERY):
    """Same as train.wkv_forward: (S_T, y, saved)."""
    B, T, H, N = r.shape
    y = np.empty_like(r)
    S_out = np.empty_like(S0)
    saved = np.empty(((T + chunk - 1) // chunk, B, H, N, N), r.dtype)
    args = [np.ascontiguousarray(a, r.dtype) for a in (S0, r, w, k, v, alpha, beta)]
    _forward(*args, chunk, y, S_out, saved)
    return S_out, y, saved


@numba.njit(**_JIT)
def _backward(dy, G0, saved, r, w, k, v, alpha, beta, chunk, dr, dw, dk, dv, dalpha, dbeta, dS0):
    B, T, H, N = r.shape
    for bh in numba.prange(B * H):
        b, h = bh // H, bh % H
        G = G0[b, h].copy()
        states = np.empty((chunk + 1, N, N), r.dtype)
        sa = np.empty(N, r.dtype)
        Gb = np.empty(N, r.dtype)
        for c in range(saved.shape[0] - 1, -1, -1):
            t0 = c * chunk
            t1 = min(t0 + chunk, T)
            states[0] = saved[c, b, h]
            for t in range(t0, t1):                     # recompute this chunk's states
                n = t - t0
                for i in range(N):
                    acc = 0.0
                    for j in range(N):
                        acc += states[n, i, j] * alpha[b, t, h, j]
                    sa[i] = acc
                for i in range(N):
                    for j in range(N):
                        states[n + 1, i, j] = (states[n, i, j] * w[b, t, h, j] + sa[i] * beta[b, t, h, j]
                                               + v[b, t, h, i] * k[b, t, h, j])
            for t in range(t1 - 1, t0 - 1, -1):
                n = t - t0
                for i in range(N):
                    for j in range(N):
                        G[i, j] += dy[b, t, h, i] * r[b, t, h, j]
                for j in range(N):
                    dr[b, t, h, j] = 0.0
                    dk[b, t, h, j] = 0.0
                    dw[b, t, h, j] = 0.0
                    dbeta[b, t, h, j] = 0.0
                    dalpha[b, t, h, j] = 0.0
                for i in range(N):
                    acc_sa, acc_gb, acc_dv = 0.0, 0.0, 0.0
                    for j in range(N):
                        acc_sa += states[n, i, j] * alpha[b, t, h, j]
                        acc_gb += G[i, j] * beta[b, t, h, j]
                        acc_dv += G[i, j] * k[b, t, h, j]
                    sa[i], Gb[i] = acc_sa, acc_gb
                    dv[b, t, h, i] = acc_dv
                for i in range(N):
                    for j in range(N):
                        g = G[i, j]
                        dr[b, t, h, j] += states[n + 1, i, j] * dy[b, t, h, i]
                        dk[b, t, h, j] += g * v[b, t, h, i]
                        dw[b, t, h, j] += g * states[n, i, j]
                        dbeta[b, t, h, j] += g * sa[i]
                        dalpha[b, t, h, j] += states[n, i, j] * Gb[i]
                for i in range(N):
                    for j in range(N):
                        G[i, j] = G[i, j] * w[b, t, h, j] + Gb[i] * alpha[b, t, h, j]
        dS0[b, h] = G


def wkv_backward(dS_last, dy, saved, r, w, k, v, alpha, beta, chunk=SAVE_EVERY):
    """Same as train.wkv_backward: (dS_0, dr, dw, dk, dv, dalpha, dbeta)."""
    B, T, H, N = r.shape
    dt = r.dtype
    G0 = np.zeros((B, H, N, N), dt) if dS_last is None else np.ascontiguousarray(dS_last, dt)
    out = [np.empty_like(r) for _ in range(6)]
    dS0 = np.empty((B, H, N, N), dt)
    args = [np.ascontiguousarray(a, dt) for a in (dy,)] + [G0, saved] + \
           [np.ascontiguousarray(a, dt) for a in (r, w, k, v, alpha, beta)]
    _backward(*args, chunk, *out, dS0)
    return (dS0, *out)


WKV_OPS = (wkv_forward, wkv_backward)
