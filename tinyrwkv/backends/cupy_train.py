"""CUDA kernels for training (kernels.cu: wkv_train_forward, wkv_train_backward), through CuPy:
twins of train.py's wkv_forward / wkv_backward (the contract in backends/__init__.py), on CuPy
float32 arrays.

train.loss_and_grad uses them by itself when the parameters are CuPy arrays; everything else of
the training step is train.py's own array code, run by CuPy (cuBLAS products, element-wise
kernels). A block per (sequence, head); see kernels.cu for the layout of the work.
"""

from __future__ import annotations

import numpy as np

from . import SAVE_EVERY
from .cupy_gpu import _module, check_available

check_available()
import cupy as cp  # noqa: E402  (after the clear error above)


def _f32(a):
    return cp.ascontiguousarray(a, dtype=cp.float32)


def _threads(N):
    return ((N + 31) // 32 * 32,)


def wkv_forward(S0, r, w, k, v, alpha, beta, chunk=SAVE_EVERY):
    """Same as train.wkv_forward (float32): (S_T, y, saved)."""
    B, T, H, N = r.shape
    y = cp.empty((B, T, H, N), cp.float32)
    S_out = cp.empty((B, H, N, N), cp.float32)
    saved = cp.empty(((T + chunk - 1) // chunk, B, H, N, N), cp.float32)
    _module(N, "float32").get_function("wkv_train_forward")(
        (B * H,), _threads(N),
        (np.int32(B), np.int32(T), np.int32(H), np.int32(chunk), _f32(S0), *map(_f32, (r, w, k, v, alpha, beta)),
         y, S_out, saved))
    return S_out, y, saved


def wkv_backward(dS_last, dy, saved, r, w, k, v, alpha, beta, chunk=SAVE_EVERY):
    """Same as train.wkv_backward (float32): (dS_0, dr, dw, dk, dv, dalpha, dbeta)."""
    B, T, H, N = r.shape
    outs = [cp.empty((B, T, H, N), cp.float32) for _ in range(6)]
    dS0 = cp.empty((B, H, N, N), cp.float32)
    states = cp.empty((B * H, chunk + 1, N, N), cp.float32)
    _module(N, "float32").get_function("wkv_train_backward")(
        (B * H,), _threads(N),
        (np.int32(B), np.int32(T), np.int32(H), np.int32(chunk), _f32(dy),
         np.uint64(0) if dS_last is None else _f32(dS_last), _f32(saved),
         *map(_f32, (r, w, k, v, alpha, beta)), states, *outs, dS0))
    return (dS0, *outs)


WKV_OPS = (wkv_forward, wkv_backward)
