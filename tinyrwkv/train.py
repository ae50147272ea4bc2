"""Training RWKV-7 in NumPy: the forward pass with its caches, and every gradient written out.

    params = tinyrwkv.read_checkpoint("model.pth")                 # official key -> array
    loss, grads = tinyrwkv.train.loss_and_grad(params, ids, targets)  # ids, targets: (B, T)

`loss` is the mean cross-entropy in nats; `grads` has the keys and stored shapes of `params`.
float64 in, float64 out (float32 in, float32 out). The forward pass is model.py's own functions
(`model.block`) run on (B, T, C) arrays from a zero state, filling a dict of activations per
layer with what the backward needs (llm.c's pattern); the backward below undoes it step by step.
Plain x070 only (DeepEmbed models are refused).

The WKV operator is the only part that is not a stack of array expressions: `wkv_forward` and
`wkv_backward` step through time with model.wkv_step. The backward needs the state before every
token; instead of keeping T states the forward saves one every SAVE_EVERY tokens and the backward
recomputes one stretch at a time, so memory is T / SAVE_EVERY states, not T.
tinyrwkv/backends/numba_train.py and cupy_train.py are its twins (the trainer uses them).
`wkv_chunked_forward` and `wkv_chunked_backward` (CHUNKED_WKV) compute the same with the same
contract in chunked form, matrix products over whole chunks (docs/architecture.md §6.6);
`choose_wkv_ops` says which pair is faster where.

Fine-tuning (docs/training.md §2) needs nothing new in the backward: a `blocks.{i}.att.time_state`
among the parameters is every sequence's initial WKV state, whose gradient is the dS_0 the
backward through time ends with (state tuning); `lora_loss_and_grad` pulls the model's own
gradient of each merged matrix W + (alpha / r) B A back to A and B (LoRA); `want=` skips the
weight products of frozen matrices.

Notation: B sequences, T tokens, C channels, H heads of N; the operator's inputs follow the
official CUDA kernel and fla: r, w (decay), k, v, alpha = -kappa_hat, beta = kappa_hat * a.
"""

from __future__ import annotations

from dataclasses import replace

import numpy as np

from . import model as ref
from .backends import SAVE_EVERY


def array_module(a):
    """NumPy, or CuPy for CuPy arrays: the same code trains on a GPU (`tinyrwkv train --backend
    cupy`). CuPy is imported only when a CuPy array is seen."""
    if type(a).__module__.split(".")[0] == "cupy":
        import cupy
        return cupy
    return np


# ----------------------------------------------------------------------------------------------
# Small pieces and their gradients
# ----------------------------------------------------------------------------------------------

def norm_backward(dy, x, weight, groups, eps):
    """Gradients of model.layer_norm (groups=1) or model.group_norm at input x: d/dx of
    (x - mean) / std over each group, then the affine. Returns dx, dweight, dbias."""
    xp = array_module(x)
    shape = x.shape
    g = lambda u: u.reshape(*shape[:-1], groups, -1)
    xg = g(x)
    mu = xg.mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(((xg - mu) ** 2).mean(axis=-1, keepdims=True) + eps)
    xh = (xg - mu) * rstd                                               # x normalised, per group
    axes = tuple(range(dy.ndim - 1))
    dweight, dbias = (dy * xh.reshape(shape)).sum(axis=axes), dy.sum(axis=axes)
    dxhat = g(dy * weight)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xh * (dxhat * xh).mean(axis=-1, keepdims=True))
    return dx.reshape(shape), dweight, dbias


def shift_backward(d):
    """Gradient of model.token_shift from a zero state: each position's gradient goes to the one
    before it. (B, T, C)"""
    xp = array_module(d)
    out = xp.zeros_like(d)
    out[:, :-1] = d[:, 1:]
    return out


# ----------------------------------------------------------------------------------------------
# The WKV operator: forward with saved states, backward through time
# ----------------------------------------------------------------------------------------------

def wkv_forward(S0, r, w, k, v, alpha, beta, chunk=SAVE_EVERY):
    """model.wkv_seq, saving what the backward needs.

    Args: S0 (B, H, N, N) [value][key]; r, w, k, v, alpha, beta (B, T, H, N).
    Returns: the last state (B, H, N, N), y (B, T, H, N), and `saved` (ceil(T/chunk), B, H, N, N):
    the state before token c * chunk.
    """
    xp = array_module(r)
    B, T, H, N = r.shape
    S, y = S0, xp.empty_like(r)
    saved = xp.empty(((T + chunk - 1) // chunk, B, H, N, N), r.dtype)
    for t in range(T):
        if t % chunk == 0:
            saved[t // chunk] = S
        S, y[:, t] = ref.wkv_step(S, r[:, t], w[:, t], k[:, t], v[:, t], alpha[:, t], beta[:, t])
    return S, y, saved


def wkv_backward(dS_last, dy, saved, r, w, k, v, alpha, beta, chunk=SAVE_EVERY):
    """Gradients of wkv_forward. dS_last (B, H, N, N) or None; dy (B, T, H, N).

    Going back through token t with G = dL/dS_t (everything later, plus y_t's share dy_t r_t^T):
        dr_t = S_t^T dy_t,  dv_t = G k_t,  dk_t = G^T v_t,
        dw_t[j] = sum_i G[i, j] S_{t-1}[i, j],  dbeta_t = G^T (S_{t-1} alpha_t),
        dalpha_t = S_{t-1}^T (G beta_t),  and  dL/dS_{t-1} = G diag(w_t) + (G beta_t) alpha_t^T.
    Returns dS0 (B, H, N, N) and dr, dw, dk, dv, dalpha, dbeta (B, T, H, N).
    """
    xp = array_module(r)
    B, T, H, N = r.shape
    dr, dw, dk, dv, dalpha, dbeta = (xp.zeros_like(r) for _ in range(6))
    G = xp.zeros((B, H, N, N), r.dtype) if dS_last is None else dS_last.copy()
    for c in reversed(range(len(saved))):
        t0, t1 = c * chunk, min((c + 1) * chunk, T)
        states = [saved[c]]                                  # recompute S_{t0-1} .. S_{t1-1}
        for t in range(t0, t1):
            states.append(ref.wkv_step(states[-1], r[:, t], w[:, t], k[:, t], v[:, t],
                                       alpha[:, t], beta[:, t])[0])
        for t in reversed(range(t0, t1)):
            S_prev, S_t = states[t - t0], states[t - t0 + 1]
            G = G + dy[:, t, :, :, None] * r[:, t, :, None, :]                    # + dy_t r_t^T
            dr[:, t] = xp.einsum("bhij,bhi->bhj", S_t, dy[:, t])
            dv[:, t] = xp.einsum("bhij,bhj->bhi", G, k[:, t])
            dk[:, t] = xp.einsum("bhij,bhi->bhj", G, v[:, t])
            dw[:, t] = (G * S_prev).sum(axis=-2)
            sa = xp.einsum("bhij,bhj->bhi", S_prev, alpha[:, t])
            dbeta[:, t] = xp.einsum("bhij,bhi->bhj", G, sa)
            Gb = xp.einsum("bhij,bhj->bhi", G, beta[:, t])                       # G beta (B,H,N)
            dalpha[:, t] = xp.einsum("bhij,bhi->bhj", S_prev, Gb)
            G = G * w[:, t, :, None, :] + Gb[..., None] * alpha[:, t, :, None, :]
    return G, dr, dw, dk, dv, dalpha, dbeta


# ----------------------------------------------------------------------------------------------
# The WKV operator in chunked form: the same contract, matrix products over whole chunks
# ----------------------------------------------------------------------------------------------

def _check_chunk(chunk):
    if not 1 <= chunk <= ref.MAX_CHUNK_LEN:
        raise ValueError(f"chunk must be 1..{ref.MAX_CHUNK_LEN}, got {chunk}: longer chunks overflow "
                         "float32 in the chunked form's factored decays (docs/architecture.md §6.4); "
                         f"use the default {SAVE_EVERY}")


def _chunks(xp, chunk, T, *us):
    """(B, T, H, N) arrays -> (B, nC, chunk, H, N), padded at the end with tokens that change
    nothing (w = 1, all else 0: the state passes through, y = 0). The first array must be w."""
    pad = -T % chunk
    out = []
    for n, u in enumerate(us):
        if pad:
            fill = xp.ones if n == 0 else xp.zeros
            u = xp.concatenate([u, fill((u.shape[0], pad) + u.shape[2:], u.dtype)], axis=1)
        out.append(u.reshape(u.shape[0], -1, chunk, *u.shape[2:]))
    return out


def _unchunk(u, T):
    """(B, nC, H, chunk, N), model.wkv_chunk's inner layout -> (B, T, H, N)."""
    B, nC, H, L, N = u.shape
    return u.swapaxes(2, 3).reshape(B, nC * L, H, N)[:, :T]


def _chunk_parts(xp, S, w, r, k, v, alpha, beta):
    """model.wkv_chunk on every chunk at once (S: each chunk's start state, (B, nC, H, N, N);
    the vectors (B, nC, L, H, N)), keeping its intermediates, plus what makes a chunk an affine
    map of its start state S_0 (wkv_chunk is linear in S_0: its S_0 terms are a_out S_0^T inside
    the solve, r_out S_0^T in y and S_0 diag(e^{g_L}) in S_end):
        z     = Wa S_0^T + z(S_0 = 0),          Wa = (I - A_ab)^{-1} a_out     (L x N)
        S_end = S_0 A + S_end(S_0 = 0),          A = diag(e^{g_L}) + Wa^T (beta e^{g_L - g})  (N x N)
        y     = Ry S_0^T + y(S_0 = 0),          Ry = r_out + A_rb Wa           (L x N)
    Returns S_end, y in the (B, nC, H, L, N) layout, and the dict of intermediates."""
    acts = {}
    S_end, y = ref.wkv_chunk(S, r, w, k, v, alpha, beta, acts=acts)
    Wa = xp.linalg.solve(acts["M"], acts["a_out"])
    e_end = xp.exp(acts["g"][..., -1, :])                                  # e^{g_L}, (..., H, N)
    A = Wa.swapaxes(-1, -2) @ (beta.swapaxes(-3, -2) * acts["to_end"])
    idx = xp.arange(A.shape[-1])
    A[..., idx, idx] += e_end
    acts.update(Wa=Wa, A=A, Ry=acts["r_out"] + acts["A_rb"] @ Wa, e_end=e_end)
    return S_end, y.swapaxes(-3, -2), acts


def wkv_chunked_forward(S0, r, w, k, v, alpha, beta, chunk=SAVE_EVERY):
    """wkv_forward's function and contract (the same S_T, y and `saved`: the state before every
    chunk-th token), computed in closed form a chunk at a time (model.wkv_chunk,
    docs/architecture.md §6), all chunks at once.

    Each chunk is an affine map of its start state, S_end = S_start A_c + U_c (_chunk_parts).
    One model.wkv_chunk call from zero states gives every chunk's U_c and y_c(0) in parallel;
    the only sequential work is the chain of T / chunk products S_{c+1} = S_c A_c + U_c (N x N
    each); then y_c = y_c(0) + Ry_c S_c^T for all chunks at once. chunk <= model.MAX_CHUNK_LEN
    (§6.4). NumPy or CuPy arrays (the same code runs on a GPU).
    """
    _check_chunk(chunk)
    xp = array_module(r)
    B, T, H, N = r.shape
    w, r, k, v, alpha, beta = _chunks(xp, chunk, T, w, r, k, v, alpha, beta)
    nC = w.shape[1]
    U, y0, acts = _chunk_parts(xp, xp.zeros((B, nC, H, N, N), r.dtype), w, r, k, v, alpha, beta)
    saved = xp.empty((nC, B, H, N, N), r.dtype)
    S = S0
    for c in range(nC):                                       # the sequential part: nC steps
        saved[c] = S
        S = S @ acts["A"][:, c] + U[:, c]
    y = y0 + acts["Ry"] @ saved.transpose(1, 0, 2, 4, 3)      # + Ry S_c^T, (B, nC, H, L, N)
    return S, _unchunk(y, T), saved


def wkv_chunked_backward(dS_last, dy, saved, r, w, k, v, alpha, beta, chunk=SAVE_EVERY):
    """wkv_backward's function and contract, in chunked form: reverse mode through
    model.wkv_chunk's closed form, every chunk at once from its saved start state.

    1. Recompute every chunk's intermediates from `saved` (one model.wkv_chunk call).
    2. The sequential part, backwards over chunks: with G_c = dL/dS at the end of chunk c,
           G_{c-1} = G_c A_c^T + dy_c^T Ry_c          (the transpose of the forward's chain).
    3. Each chunk's own gradients given dy_c and G_c, all chunks at once, matrix products only:
       reverse mode through S_end = S_0 diag(e^{g_L}) + V^T (K e^{g_L-g}) + Z^T (B e^{g_L-g}),
       y = R~ S_0^T + A_rk V + A_rb Z and the solve (I - A_ab) Z = A~ S_0^T + A_ak V. The solve's
       backward is a solve with the transpose, d rhs = (I - A_ab)^{-T} dZ, and dA_ab =
       tril(d rhs Z^T, -1); a masked product A = tril(X Y^T) gives dX = dA Y, dY = dA^T X; the
       factors e^{±g} pass their gradient to g, and g = cumsum(log w) to log w by a reversed
       cumulative sum.
    docs/architecture.md §6.6 writes it out. dS_last (B, H, N, N) or None; dy (B, T, H, N).
    Returns dS0 (B, H, N, N) and dr, dw, dk, dv, dalpha, dbeta (B, T, H, N).
    """
    _check_chunk(chunk)
    xp = array_module(r)
    mT = lambda u: u.swapaxes(-1, -2)
    B, T, H, N = r.shape
    chunked = _chunks(xp, chunk, T, w, r, k, v, alpha, beta, dy)
    nC = chunked[0].shape[1]
    S0 = saved.transpose(1, 0, 2, 3, 4)                                     # (B, nC, H, N, N)
    _, _, c = _chunk_parts(xp, S0, *chunked[:6])
    w, r, k, v, alpha, beta, dy = (u.swapaxes(-3, -2) for u in chunked)     # (B, nC, H, L, N)
    # 2. dL/dS at every chunk's end, backwards over chunks
    Q = mT(dy) @ c["Ry"]                                                    # dy^T Ry
    G_end = xp.empty((B, nC, H, N, N), r.dtype)
    G = xp.zeros((B, H, N, N), r.dtype) if dS_last is None else dS_last
    for i in reversed(range(nC)):
        G_end[:, i] = G
        G = G @ mT(c["A"][:, i]) + Q[:, i]
    # 3. every chunk's own backward; GT = dL/dS_end, S0 = the chunk's start state (the S0
    #    terms' own gradients are G above: the chain already carried them)
    GT, z, te, e_end = G_end, c["z"], c["to_end"], c["e_end"]
    a_out, r_out, k_in, b_in = c["a_out"], c["r_out"], c["k_in"], c["b_in"]
    # S_end = S0 diag(e^{g_L}) + v^T (k te) + z^T (beta te), te = e^{g_L - g}
    dv, dz = (k * te) @ mT(GT), (beta * te) @ mT(GT)
    dK, dB = v @ GT, z @ GT                                        # d(k te), d(beta te)
    dk, dbeta = dK * te, dB * te
    dlog_te = (dK * k + dB * beta) * te                            # dL/d(g_L - g)
    dg_end = (GT * S0).sum(axis=-2) * e_end + dlog_te.sum(axis=-2)
    dg = -dlog_te
    # y = r_out S0^T + A_rk v + A_rb z
    dr_out = dy @ S0
    dA_rk, dA_rb = xp.tril(dy @ mT(v)), xp.tril(dy @ mT(z))
    dv = dv + mT(c["A_rk"]) @ dy
    dz = dz + mT(c["A_rb"]) @ dy
    # z = M^{-1} rhs, M = I - A_ab, rhs = a_out S0^T + A_ak v
    drhs = xp.linalg.solve(mT(c["M"]), dz)
    dA_ab = xp.tril(drhs @ mT(z), -1)
    da_out = drhs @ S0
    dA_ak = xp.tril(drhs @ mT(v), -1)
    dv = dv + mT(c["A_ak"]) @ drhs
    # the four masked products A = tril(X Y^T): dX = dA Y, dY = dA^T X
    da_out = da_out + dA_ak @ k_in + dA_ab @ b_in
    dr_out = dr_out + dA_rk @ k_in + dA_rb @ b_in
    dk_in = mT(dA_ak) @ a_out + mT(dA_rk) @ r_out
    db_in = mT(dA_ab) @ a_out + mT(dA_rb) @ r_out
    # a_out = alpha e^{g - log w}, r_out = r e^{g}, k_in = k e^{-g}, b_in = beta e^{-g}
    g, log_w = c["g"], c["log_w"]
    dalpha = da_out * xp.exp(g - log_w)
    dr = dr_out * xp.exp(g)
    dk = dk + dk_in * xp.exp(-g)
    dbeta = dbeta + db_in * xp.exp(-g)
    dg = dg + da_out * a_out + dr_out * r_out - dk_in * k_in - db_in * b_in
    dg[..., -1, :] += dg_end
    dlog_w = xp.flip(xp.cumsum(xp.flip(dg, -2), axis=-2), -2) - da_out * a_out   # g = cumsum(log w)
    dw = dlog_w / w
    grads = (_unchunk(u, T) for u in (dr, dw, dk, dv, dalpha, dbeta))
    return (G, *grads)


RECURRENT_WKV = (wkv_forward, wkv_backward)
CHUNKED_WKV = (wkv_chunked_forward, wkv_chunked_backward)

# From T = this many tokens on, CuPy training uses the chunked pair (see choose_wkv_ops).
CUPY_CHUNKED_FROM = None     # never, on the H200 measured (choose_wkv_ops)


def choose_wkv_ops(backend, T):
    """The WKV (forward, backward) pair for training on `backend` ("numpy", "numba" or "cupy")
    with sequences of T tokens: the faster one where it was measured
    (benchmarks/train_wkv.py, results in benchmarks/results/train_wkv_*.md; the shipped model's
    shape, B = 4096 / T sequences, T = 128, 512, 2048). Both pairs compute the same function to
    float rounding (tests/test_train_chunked.py), so this is a speed choice only.

    numpy: CHUNKED_WKV at every T. On the 2-core AMD EPYC (train_wkv_vm_t1.md, one thread) the
        chunked pair ran the operator 1.8-2.0x as fast as the recurrent NumPy pair (13 k against
        6.5-7.6 k tokens/s) and a whole training step 1.3-1.4x (806-848 against 596-661): the
        recurrent pair makes a dozen small array operations per token, the chunked one a fixed
        number of batched products plus two N x N products per chunk of 16.
    numba: backends.numba_train.WKV_OPS (recurrent) at every T: the compiled recurrence has no
        per-token Python cost; it ran the operator 2.3x as fast as the NumPy chunked pair (30 k
        against 13 k tokens/s on one thread; 27-57 k on two) and a step 1.3-1.4x (1.10-1.14 k
        against 0.81-0.85 k tokens/s).
    cupy: backends.cupy_train.WKV_OPS (the CUDA recurrence) at every T measured. On an H200
        (train_wkv_h200.md) the CUDA kernel beat the chunked pair on CuPy everywhere: operator
        1.24 M against 0.25 M tokens/s at T = 128, 336 k against 187 k at 512, 87 k against 80 k
        at 2048; whole step 38 k against 19 k, 31 k against 18 k, 12.4 k against 10.2 k. The
        kernel runs one block per (sequence, head), so its lead shrinks as T grows at a fixed
        B T (B H blocks: 128 at T = 128, 8 at T = 2048): the chunked pair may win past 2048
        tokens, not measured; CUPY_CHUNKED_FROM stays None (never) until it is.
    """
    if backend == "numpy":
        return CHUNKED_WKV
    if backend == "numba":
        from .backends.numba_train import WKV_OPS
        return WKV_OPS
    if backend == "cupy":
        if CUPY_CHUNKED_FROM is not None and T >= CUPY_CHUNKED_FROM:
            return CHUNKED_WKV
        from .backends.cupy_train import WKV_OPS
        return WKV_OPS
    raise ValueError(f"unknown backend {backend!r}: choose_wkv_ops knows numpy, numba and cupy")


# ----------------------------------------------------------------------------------------------
# The model: forward (model.py's functions, keeping activations), backward
# ----------------------------------------------------------------------------------------------

LERPS = ("x_r", "x_w", "x_k", "x_v", "x_a", "x_g")


def _prepare(params):
    """Check the model is plain x070; read its config and dtype."""
    if any(key.endswith("ffn.s1") for key in params):
        raise ValueError("training supports plain x070 models, not DeepEmbed")
    config = ref.Config.from_weights(params)
    dtype = np.result_type(*(p.dtype for p in params.values()))
    if dtype not in (np.float32, np.float64):
        dtype = np.dtype(np.float32)
    return config, dtype


def _block_forward(x, v_first, state, p, i, H, wkv_ops):
    """One layer over (B, T, C): model.block, keeping its activations (and the WKV states the
    backward needs) in a dict. Returns x, v_first, acts."""
    acts = {"x_in": x, "v_first_in": v_first}

    def wkv(S, r, w, k, v, alpha, beta):
        S, y, acts["wkv_saved"] = wkv_ops[0](S, r, w, k, v, alpha, beta)
        return S, y
    x, v_first = ref.block(x, v_first, state, i, p, H, steps=replace(ref.STEPS, wkv=wkv), acts=acts)
    return x, v_first, acts


def _block_backward(dx, dv_first, p, i, H, c, wkv_ops, wanted=lambda key: True):
    """Gradients of one layer. dx: dL/d(layer output) (B, T, C); dv_first: dL/dv_first from the
    layers above (None for the last). Returns dL/d(layer input), dL/dv_first (layer 0: None, it is
    folded into dv), and the param gradients keyed like p, plus "att.time_state": dL/d(the
    layer's initial WKV state) summed over the batch (H, N, N). `wanted(key)`: False skips the
    weight products of that matrix's gradient (a frozen matrix costs nothing); cheap vectors are
    always computed."""
    xp = array_module(dx)
    B, T, C = dx.shape
    gp = {}

    def outer(key, d, x):                   # gp[key] = d^T x over all (b, t), when wanted
        if wanted(key):
            gp[key] = d.reshape(-1, d.shape[-1]).T @ x.reshape(-1, x.shape[-1])
    heads = lambda u: u.reshape(B, T, H, -1)
    x_mid = c["x_in"] + c["att"]                                            # input of ln2
    # channel mix: x_out = x_mid + relu(xk2 Wk^T)^2 Wv^T
    h = c["ffn_hidden"]
    outer("ffn.value.weight", dx, h)
    dh = dx @ p["ffn.value.weight"]
    du = dh * 2 * xp.maximum(c["ffn_key"], 0)
    outer("ffn.key.weight", du, c["ffn_xk"])
    dxk2 = du @ p["ffn.key.weight"]
    gp["ffn.x_k"] = (dxk2 * (c["ffn_x_prev"] - c["ln2"])).sum(axis=(0, 1))
    dxf = dxk2 * (1 - p["ffn.x_k"]) + shift_backward(dxk2 * p["ffn.x_k"])
    dmid, gp["ln2.weight"], gp["ln2.bias"] = norm_backward(dxf, x_mid, p["ln2.weight"], 1, ref.LN_EPS)
    dx = dx + dmid                                                          # dL/dx_mid
    # time mix output: x_mid = x_in + o Wo^T, o = (yn + bonus) * g
    o = ref.output_gate(c["gn"] + c["bonus"], c["g"])
    outer("att.output.weight", dx, o)
    do = dx @ p["att.output.weight"]
    dg = do * (c["gn"] + c["bonus"])
    dsum = do * c["g"]
    dy, gp["att.ln_x.weight"], gp["att.ln_x.bias"] = norm_backward(
        dsum, c["y"], p["att.ln_x.weight"], H, ref.GN_EPS)
    # bonus = rk * v, rk = sum_head(r * kt * r_k)
    rk = (heads(c["r"]) * heads(c["k_tilde"]) * p["att.r_k"]).sum(axis=-1, keepdims=True)
    drk = (heads(dsum) * heads(c["v_res"])).sum(axis=-1, keepdims=True)     # (B, T, H, 1)
    dv = (heads(dsum) * rk).reshape(B, T, C)
    rkflat = p["att.r_k"].reshape(-1)
    drk_c = xp.broadcast_to(drk, (B, T, H, C // H)).reshape(B, T, C)
    dr = drk_c * c["k_tilde"] * rkflat
    dkt = drk_c * c["r"] * rkflat
    gp["att.r_k"] = (drk_c * c["r"] * c["k_tilde"]).sum(axis=(0, 1)).reshape(p["att.r_k"].shape)
    # WKV
    a, kh = c["a"], c["kk"]
    dS0, dr_w, dw, dkt_w, dv_w, dalpha, dbeta = wkv_ops[1](
        None, heads(dy), c["wkv_saved"], heads(c["r"]), heads(c["w"]), heads(c["k_tilde"]),
        heads(c["v_res"]), heads(-kh), heads(kh * a))
    flat = lambda u: u.reshape(B, T, C)
    dr = dr + flat(dr_w)
    dkt = dkt + flat(dkt_w)
    dv = dv + flat(dv_w)
    dkh = -flat(dalpha) + flat(dbeta) * a
    da = flat(dbeta) * kh
    # decay: w = exp(-DECAY_SCALE * sigmoid(w_pre))
    sw = ref.sigmoid(c["w_pre"])
    dw_pre = flat(dw) * c["w"] * (-ref.DECAY_SCALE) * sw * (1 - sw)
    # value residual
    if i == 0:
        dv_raw = dv + (dv_first if dv_first is not None else 0)
    else:
        vg, v_raw, v_first = c["v_gate"], c["v"], c["v_first_in"]
        dv_raw = dv * (1 - vg)
        dv_first_here = dv * vg
        dvg_pre = dv * (v_first - v_raw) * vg * (1 - vg)
        gp["att.v0"] = dvg_pre.sum(axis=(0, 1))
        outer("att.v2", c["v_lora"], dvg_pre)
        dhv = dvg_pre @ p["att.v2"].T
        dv_first = dv_first_here + (dv_first if dv_first is not None else 0)
    # kt = k * (1 + (a - 1) * k_a)
    k = c["k"]
    dk = dkt * (1 + (a - 1) * p["att.k_a"])
    da = da + dkt * k * p["att.k_a"]
    gp["att.k_a"] = (dkt * k * (a - 1)).sum(axis=(0, 1))
    # kh = kk / |kk| per head, kk = k * k_k
    khh, dkhh = heads(kh), heads(dkh)
    norm = xp.maximum(xp.sqrt((heads(k * p["att.k_k"]) ** 2).sum(axis=-1, keepdims=True)), ref.L2_EPS)
    dkk = (dkhh - khh * (dkhh * khh).sum(axis=-1, keepdims=True)) / norm
    dkk = flat(dkk)
    dk = dk + dkk * p["att.k_k"]
    gp["att.k_k"] = (dkk * k).sum(axis=(0, 1))
    # LoRAs
    gp["att.w0"] = dw_pre.sum(axis=(0, 1))
    outer("att.w2", c["w_lora"], dw_pre)
    dhw_pre = (dw_pre @ p["att.w2"].T) * (1 - c["w_lora"] ** 2)
    da_pre = da * a * (1 - a)
    gp["att.a0"] = da_pre.sum(axis=(0, 1))
    outer("att.a2", c["a_lora"], da_pre)
    dha = da_pre @ p["att.a2"].T
    outer("att.g2", c["g_lora"], dg)
    dhg_pre = (dg @ p["att.g2"].T) * c["g_lora"] * (1 - c["g_lora"])
    # projections back to the six mixed inputs
    xr, xw, xk, xv, xa_, xg = (c[n] for n in ("xr", "xw", "xk", "xv", "xa", "xg"))
    outer("att.receptance.weight", dr, xr)
    outer("att.key.weight", dk, xk)
    outer("att.value.weight", dv_raw, xv)
    outer("att.w1", xw, dhw_pre)
    outer("att.a1", xa_, dha)
    outer("att.g1", xg, dhg_pre)
    dmixed = [dr @ p["att.receptance.weight"], dhw_pre @ p["att.w1"].T,
              dk @ p["att.key.weight"], dv_raw @ p["att.value.weight"],
              dha @ p["att.a1"].T, dhg_pre @ p["att.g1"].T]
    if i > 0:
        outer("att.v1", xv, dhv)
        dmixed[3] = dmixed[3] + dhv @ p["att.v1"].T
    # lerps: m = xa + (prev - xa) * mix
    dxa = xp.zeros_like(dx)
    dprev = xp.zeros_like(dx)
    for name, dm in zip(LERPS, dmixed):
        mix = p["att." + name]
        gp["att." + name] = (dm * (c["x_shift"] - c["ln1"])).sum(axis=(0, 1))
        dxa += dm * (1 - mix)
        dprev += dm * mix
    dxa += shift_backward(dprev)
    dln, gp["ln1.weight"], gp["ln1.bias"] = norm_backward(dxa, c["x_in"], p["ln1.weight"], 1,
                                                           ref.LN_EPS)
    gp["att.time_state"] = dS0.sum(axis=0)
    return dx + dln, (None if i == 0 else dv_first), gp


TIME_STATE = "att.time_state"      # blocks.{i}.att.time_state: RWKV-PEFT's state-tuning key


def loss_and_grad(params, ids, targets, wkv_ops=None, want=None):
    """Mean cross-entropy (nats) of predicting `targets` from `ids`, and its gradient.

    Args:
        params: dict official key -> array, stored shapes ((1, 1, C) lerps etc.), as
            read_checkpoint returns them. float64 gives a float64 computation, float32 float32.
            It may also hold `blocks.{i}.att.time_state` (H, N, N) for every layer: the initial
            WKV state of each sequence (state tuning, docs/formats.md §6), else zeros.
        ids, targets: (B, T) integer arrays (a 1-D array is one sequence).
        wkv_ops: (forward, backward) for the WKV operator; default: this module's NumPy pair for
            NumPy arrays, the CUDA kernels (`tinyrwkv.backends.cupy_train.WKV_OPS`) for CuPy
            arrays (`tinyrwkv.backends.numba_train.WKV_OPS` is the Numba pair). Params as CuPy arrays run the
            whole computation on the GPU and return CuPy gradients.
        want: None for every gradient; else the keys whose gradients are needed (frozen
            matrices then cost no weight product; an empty collection: the loss only, no
            backward at all).
    Returns:
        loss (a Python float), grads: dict with the keys and shapes of params (layer 0's unused
        v0/v1/v2 get zeros), or of `want`.
    """
    tuned = {k: v for k, v in params.items() if k.endswith("." + TIME_STATE)}
    params = {k: v for k, v in params.items() if k not in tuned}
    config, dtype = _prepare(params)
    xp = array_module(next(iter(params.values())))
    ids, targets = xp.atleast_2d(xp.asarray(ids)), xp.atleast_2d(xp.asarray(targets))
    if ids.shape != targets.shape:
        raise ValueError(f"ids {ids.shape} and targets {targets.shape} must have the same shape")
    V = config.vocab_size
    if int(ids.min()) < 0 or int(ids.max()) >= V or int(targets.min()) < 0 or int(targets.max()) >= V:
        raise ValueError(f"token ids must be in 0..{V - 1}")
    if wkv_ops is None:
        if xp is np:
            wkv_ops = (wkv_forward, wkv_backward)
        else:
            from .backends.cupy_train import WKV_OPS as wkv_ops
    H = config.n_head
    P = {key: xp.asarray(value, dtype).reshape(-1) if value.ndim == 3
         else xp.asarray(value, dtype) for key, value in params.items()}
    layers = [{key[len(f"blocks.{i}."):]: value for key, value in P.items()
               if key.startswith(f"blocks.{i}.")} for i in range(config.n_layer)]
    want = None if want is None else set(want)
    wanted = (lambda key: True) if want is None else want.__contains__

    # forward: model.py's functions on (B, T, C), from a zero state (or the tuned WKV states)
    B, T = ids.shape
    L, C, N = config.n_layer, config.n_embd, config.head_size
    state = ref.State(xp.zeros((L, B, C), dtype), xp.zeros((L, B, H, N, N), dtype),
                      xp.zeros((L, B, C), dtype))
    if tuned:
        if len(tuned) != L:
            raise ValueError(f"time_state for {len(tuned)} of {L} layers: state tuning trains "
                             "every layer's initial state")
        for i in range(L):
            S0 = xp.asarray(tuned[f"blocks.{i}.{TIME_STATE}"], dtype)
            if S0.shape != (H, N, N):
                raise ValueError(f"blocks.{i}.{TIME_STATE} is {S0.shape}; this model's layer "
                                 f"state is {(H, N, N)}")
            state.wkv[i] = S0
    emb_rows = P["emb.weight"][ids]                                           # (B, T, C)
    x = ref.layer_norm(emb_rows, P["blocks.0.ln0.weight"], P["blocks.0.ln0.bias"])
    caches, v_first = [], None
    for i, p in enumerate(layers):
        x, v_first, c = _block_forward(x, v_first, state, p, i, H, wkv_ops)
        caches.append(c)
    x_last = x
    xo = ref.layer_norm(x, P["ln_out.weight"], P["ln_out.bias"])
    logits = xo @ P["head.weight"].T                                          # (B, T, V)
    m = logits.max(axis=-1, keepdims=True)
    e = xp.exp(logits - m)
    z = e.sum(axis=-1, keepdims=True)
    logp_target = xp.take_along_axis(logits - m - xp.log(z), targets[..., None], axis=-1)
    n = targets.size
    loss = float(-logp_target.sum() / n)
    if want is not None and not want:
        return loss, {}

    # backward
    grads = {}
    dlogits = e / z
    dlogits.reshape(-1, V)[xp.arange(n), targets.reshape(-1)] -= 1         # softmax - one-hot
    dlogits /= n
    if wanted("head.weight"):
        grads["head.weight"] = dlogits.reshape(-1, V).T @ xo.reshape(-1, xo.shape[-1])
    dxo = dlogits @ P["head.weight"]
    dx, grads["ln_out.weight"], grads["ln_out.bias"] = norm_backward(
        dxo, x_last, P["ln_out.weight"], 1, ref.LN_EPS)
    dv_first = None
    for i in reversed(range(config.n_layer)):
        prefix = f"blocks.{i}."
        dx, dv_first, gp = _block_backward(dx, dv_first, layers[i], i, H, caches[i], wkv_ops,
                                           lambda key: wanted(prefix + key))
        for key, value in gp.items():
            grads[prefix + key] = value
    demb, grads["blocks.0.ln0.weight"], grads["blocks.0.ln0.bias"] = norm_backward(
        dx, emb_rows, P["blocks.0.ln0.weight"], 1, ref.LN_EPS)
    if wanted("emb.weight"):
        # emb[ids] read rows, some more than once: their gradients add up (np.add.at / cupy.add.at)
        grads["emb.weight"] = xp.zeros_like(P["emb.weight"])
        xp.add.at(grads["emb.weight"], ids.reshape(-1), demb.reshape(-1, demb.shape[-1]))
    out = {}
    for key, value in {**params, **tuned}.items():
        if want is not None and key not in want:
            continue
        g = grads.get(key)
        if g is None:                       # layer 0's v0/v1/v2: unused, zero gradient
            g = xp.zeros(value.shape, dtype)
        out[key] = g.reshape(value.shape).astype(dtype, copy=False)
    return loss, out


# ----------------------------------------------------------------------------------------------
# Fine-tuning: LoRA factors and the initial state (RWKV-PEFT's two methods)
# ----------------------------------------------------------------------------------------------

LORA_TARGETS = ("att.receptance", "att.key", "att.value", "att.output", "ffn.key", "ffn.value")


def lora_loss_and_grad(base, lora, alpha, ids, targets, wkv_ops=None):
    """loss_and_grad of a base model with a LoRA adapter, and the adapter's gradients.

    Args:
        base: the frozen model, dict official key -> array.
        lora: the trained tensors, RWKV-PEFT's names: `X.lora_A` (r, in) and `X.lora_B`
            (out, r) for a matrix `X.weight` of base, and any other key (e.g. a layer norm
            trained in full, or blocks.{i}.att.time_state) that replaces base's.
        alpha: the LoRA scale numerator: X.weight is used as W + (alpha / r) B A
            (formats/lora.py `lora_weight`, the same function merge-lora applies).
    Returns:
        loss, grads keyed like `lora`. With W' = W + s B A (s = alpha / r), dL/dA = s B^T dL/dW'
        and dL/dB = s dL/dW' A^T: the model's own gradient of the merged matrix, pulled back.
    """
    stems = sorted(k[:-len(".lora_A")] for k in lora if k.endswith(".lora_A"))
    model = lora_merged(base, lora, alpha)
    want = {k for k in lora if not k.endswith((".lora_A", ".lora_B"))}
    want |= {stem + ".weight" for stem in stems}
    loss, g = loss_and_grad(model, ids, targets, wkv_ops, want=want)
    grads = {k: g[k] for k in lora if k in g}
    for stem in stems:
        A, B = lora[stem + ".lora_A"], lora[stem + ".lora_B"]
        s = alpha / B.shape[1]
        dW = g[stem + ".weight"]
        grads[stem + ".lora_A"] = (s * (B.T @ dW)).astype(dW.dtype, copy=False)
        grads[stem + ".lora_B"] = (s * (dW @ A.T)).astype(dW.dtype, copy=False)
    return loss, grads


def lora_merged(base, lora, alpha):
    """The model an adapter makes of `base`: each X.weight with X.lora_A / X.lora_B in `lora`
    replaced by formats.lora.lora_weight (W + (alpha / r) B A), and any other tensor of `lora`
    (trained in full) replacing base's. In the arrays' own precision (NumPy or CuPy)."""
    from .formats.lora import lora_weight
    model = dict(base)
    model.update({k: v for k, v in lora.items() if not k.endswith((".lora_A", ".lora_B"))})
    for key in lora:
        if key.endswith(".lora_A"):
            stem = key[:-len(".lora_A")]
            model[stem + ".weight"] = lora_weight(base[stem + ".weight"], lora[key],
                                                  lora[stem + ".lora_B"], alpha)
    return model


def init_lora(base, rank, targets=LORA_TARGETS, seed=0, dtype=np.float32):
    """A fresh LoRA adapter as RWKV-PEFT makes one: for every layer's matrix in `targets`,
    lora_A (r, in) kaiming-uniform (torch's nn.Linear default: U(-1/sqrt(in), 1/sqrt(in))) and
    lora_B (out, r) zero, so training starts from the base model exactly."""
    rng = np.random.default_rng(seed)
    lora = {}
    for key in sorted(base, key=_layer_order):
        stem = key[:-len(".weight")]
        if key.endswith(".weight") and stem.split(".", 2)[-1] in targets and key.startswith("blocks."):
            out_dim, in_dim = base[key].shape
            bound = 1 / np.sqrt(in_dim)
            lora[stem + ".lora_A"] = rng.uniform(-bound, bound, (rank, in_dim)).astype(dtype)
            lora[stem + ".lora_B"] = np.zeros((out_dim, rank), dtype)
    return lora


def init_state(base, dtype=np.float32):
    """Zero initial WKV states, blocks.{i}.att.time_state (H, N, N) for every layer (RWKV-PEFT
    starts state tuning from zeros: the base model's own start)."""
    config = ref.Config.from_weights(base)
    H, N = config.n_head, config.head_size
    return {f"blocks.{i}.{TIME_STATE}": np.zeros((H, N, N), dtype) for i in range(config.n_layer)}


def _layer_order(key):
    parts = key.split(".")
    return (int(parts[1]), key) if parts[0] == "blocks" else (-1, key)
