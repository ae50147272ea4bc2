"""Training RWKV-7 in NumPy: the forward pass with its caches, and every gradient written out.

    params = tinyrwkv.read_checkpoint("model.pth")                 # official key -> array
    loss, grads = tinyrwkv.train.loss_and_grad(params, ids, targets)  # ids, targets: (B, T)

`loss` is the mean cross-entropy in nats; `grads` has the keys and stored shapes of `params`.
float64 in, float64 out (float32 in, float32 out). The math is model.py's sequence form from a
zero state, batched over B sequences; each backward function sits under its forward and undoes it
step by step. Plain x070 only (DeepEmbed models are refused).

The WKV operator is the only part that is not a stack of array expressions: `wkv_forward` and
`wkv_backward` step through time. The backward needs the state before every token; instead of
keeping T states it keeps one every `WKV_CHUNK` tokens (checkpoints) and recomputes the states
of one chunk at a time while going backwards, so memory is T / WKV_CHUNK states, not T.
`tinyrwkv.train_fast` has Numba kernels with the same signatures (the trainer uses them).

Notation: B sequences, T tokens, C channels, H heads of N; the operator's inputs follow the
official CUDA kernel and fla: r, w (decay), k, v, alpha = -kappa_hat, beta = kappa_hat * a.
"""

from __future__ import annotations

import numpy as np

from . import model as ref

WKV_CHUNK = 16


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

def norm_forward(x, weight, bias, groups, eps):
    """LayerNorm (groups=1) or GroupNorm over the last axis. Returns y and the cache."""
    xp = array_module(x)
    shape = x.shape
    xg = x.reshape(*shape[:-1], groups, -1)
    mu = xg.mean(axis=-1, keepdims=True)
    var = ((xg - mu) ** 2).mean(axis=-1, keepdims=True)
    rstd = 1.0 / xp.sqrt(var + eps)
    xhat = ((xg - mu) * rstd).reshape(shape)
    return xhat * weight + bias, (xhat, rstd, weight, groups)


def norm_backward(dy, cache):
    """d/dx of (x - mean) / std over each group, then the affine. Returns dx, dweight, dbias."""
    xhat, rstd, weight, groups = cache
    shape = dy.shape
    axes = tuple(range(dy.ndim - 1))
    dweight, dbias = (dy * xhat).sum(axis=axes), dy.sum(axis=axes)
    g = lambda u: u.reshape(*shape[:-1], groups, -1)
    dxhat, xh = g(dy * weight), g(xhat)
    dx = rstd * (dxhat - dxhat.mean(axis=-1, keepdims=True)
                 - xh * (dxhat * xh).mean(axis=-1, keepdims=True))
    return dx.reshape(shape), dweight, dbias


def shift(x):
    """Token shift from a zero state: the previous token's vector, zeros for the first. (B, T, C)"""
    xp = array_module(x)
    out = xp.zeros_like(x)
    out[:, 1:] = x[:, :-1]
    return out


def shift_backward(d):
    xp = array_module(d)
    out = xp.zeros_like(d)
    out[:, :-1] = d[:, 1:]
    return out


def sigmoid(x):
    xp = array_module(x)
    return 1.0 / (1.0 + xp.exp(-x))


# ----------------------------------------------------------------------------------------------
# The WKV operator: forward with checkpoints, backward through time
# ----------------------------------------------------------------------------------------------

def wkv_forward(S0, r, w, k, v, alpha, beta, chunk=WKV_CHUNK):
    """S_t = S_{t-1} (diag(w_t) + alpha_t beta_t^T) + v_t k_t^T;  y_t = S_t r_t.

    Args: S0 (B, H, N, N) [value][key]; r, w, k, v, alpha, beta (B, T, H, N).
    Returns: y (B, T, H, N), the last state (B, H, N, N), checkpoints (n_chunks, B, H, N, N):
    the state before token c * chunk, for the backward.
    """
    xp = array_module(r)
    B, T, H, N = r.shape
    S = S0.copy()
    y = xp.empty_like(r)
    ckpt = xp.empty(((T + chunk - 1) // chunk, B, H, N, N), r.dtype)
    for t in range(T):
        if t % chunk == 0:
            ckpt[t // chunk] = S
        sa = xp.einsum("bhij,bhj->bhi", S, alpha[:, t])                 # S alpha   (B, H, N)
        S = S * w[:, t, :, None, :] + sa[..., None] * beta[:, t, :, None, :] \
            + v[:, t, :, :, None] * k[:, t, :, None, :]
        y[:, t] = xp.einsum("bhij,bhj->bhi", S, r[:, t])
    return y, S, ckpt


def wkv_backward(dy, dS_last, ckpt, r, w, k, v, alpha, beta, chunk=WKV_CHUNK):
    """Gradients of wkv_forward. dy (B, T, H, N); dS_last (B, H, N, N) or None.

    Going back through token t with G = dL/dS_t (everything later, plus y_t's share dy_t r_t^T):
        dr_t = S_t^T dy_t,  dv_t = G k_t,  dk_t = G^T v_t,
        dw_t[j] = sum_i G[i, j] S_{t-1}[i, j],  dbeta_t = G^T (S_{t-1} alpha_t),
        dalpha_t = S_{t-1}^T (G beta_t),  and  dL/dS_{t-1} = G diag(w_t) + (G beta_t) alpha_t^T.
    Returns dr, dw, dk, dv, dalpha, dbeta (B, T, H, N) and dS0 (B, H, N, N).
    """
    xp = array_module(r)
    B, T, H, N = r.shape
    grads = [xp.zeros_like(r) for _ in range(6)]
    dr, dw, dk, dv, dalpha, dbeta = grads
    G = xp.zeros((B, H, N, N), r.dtype) if dS_last is None else dS_last.copy()
    for c in reversed(range(len(ckpt))):
        t0, t1 = c * chunk, min((c + 1) * chunk, T)
        states = [ckpt[c]]                                   # recompute S_{t0-1} .. S_{t1-1}
        for t in range(t0, t1):
            S = states[-1]
            sa = xp.einsum("bhij,bhj->bhi", S, alpha[:, t])
            states.append(S * w[:, t, :, None, :] + sa[..., None] * beta[:, t, :, None, :]
                          + v[:, t, :, :, None] * k[:, t, :, None, :])
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
    return dr, dw, dk, dv, dalpha, dbeta, G


# ----------------------------------------------------------------------------------------------
# The model: forward with caches, backward
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


def _block_forward(x, v_first, p, i, H, wkv_ops):
    """One layer over (B, T, C). p: this layer's params keyed like 'att.x_r' (squeezed)."""
    xp = array_module(x)
    B, T, C = x.shape
    c = {}
    xa, c["ln1"] = norm_forward(x, p["ln1.weight"], p["ln1.bias"], 1, ref.LN_EPS)
    dxp = shift(xa) - xa                                                    # prev - x
    mixed = [xa + dxp * p["att." + m] for m in LERPS]                       # 6 x (B, T, C)
    xr, xw, xk, xv, xa_, xg = mixed
    r = xr @ p["att.receptance.weight"].T
    k = xk @ p["att.key.weight"].T
    v = xv @ p["att.value.weight"].T
    hw = xp.tanh(xw @ p["att.w1"])                                          # (B, T, Dw)
    w_pre = p["att.w0"] + hw @ p["att.w2"]
    ha = xa_ @ p["att.a1"]
    a = sigmoid(p["att.a0"] + ha @ p["att.a2"])
    hg = sigmoid(xg @ p["att.g1"])
    g = hg @ p["att.g2"]
    kk = (k * p["att.k_k"]).reshape(B, T, H, -1)
    norm = xp.maximum(xp.sqrt((kk * kk).sum(axis=-1, keepdims=True)), ref.L2_EPS)
    kh = (kk / norm).reshape(B, T, C)
    kt = k * (1 + (a - 1) * p["att.k_a"])
    if i == 0:
        v_first, hv, vg, v_raw = v, None, None, v
    else:
        hv = xv @ p["att.v1"]
        vg = sigmoid(p["att.v0"] + hv @ p["att.v2"])
        v_raw, v = v, v + (v_first - v) * vg
    sw = sigmoid(w_pre)
    w = xp.exp(-ref.DECAY_SCALE * sw)
    heads = lambda u: u.reshape(B, T, H, -1)
    S0 = xp.zeros((B, H, C // H, C // H), x.dtype)
    y, _, ckpt = wkv_ops[0](S0, heads(r), heads(w), heads(kt), heads(v), heads(-kh),
                            heads(kh * a))
    y = y.reshape(B, T, C)
    yn, c["gn"] = norm_forward(y, p["att.ln_x.weight"], p["att.ln_x.bias"], H, ref.GN_EPS)
    rk = (r * kt * p["att.r_k"].reshape(-1)).reshape(B, T, H, -1).sum(axis=-1, keepdims=True)
    bonus = (rk * heads(v)).reshape(B, T, C)
    o = (yn + bonus) * g
    x = x + o @ p["att.output.weight"].T
    xf, c["ln2"] = norm_forward(x, p["ln2.weight"], p["ln2.bias"], 1, ref.LN_EPS)
    dxf = shift(xf) - xf
    xk2 = xf + dxf * p["ffn.x_k"]
    u = xk2 @ p["ffn.key.weight"].T
    h = xp.maximum(u, 0) ** 2
    x = x + h @ p["ffn.value.weight"].T
    c.update(dxp=dxp, mixed=mixed, r=r, k=k, v=v, v_raw=v_raw, hw=hw, ha=ha, a=a, hg=hg, g=g,
             kk=kk, norm=norm, kh=kh, kt=kt, hv=hv, vg=vg, sw=sw, w=w, ckpt=ckpt, yn=yn, rk=rk,
             bonus=bonus, o=o, dxf=dxf, xk2=xk2, u=u, h=h, v_first=v_first)
    return x, v_first, c


def _block_backward(dx, dv_first, p, i, H, c, wkv_ops):
    """Gradients of one layer. dx: dL/d(layer output) (B, T, C); dv_first: dL/dv_first from the
    layers above (None for the last). Returns dL/d(layer input), dL/dv_first (layer 0: None, it is
    folded into dv), and the param gradients keyed like p."""
    xp = array_module(dx)
    B, T, C = dx.shape
    gp = {}
    heads = lambda u: u.reshape(B, T, H, -1)
    # channel mix: x_out = x_mid + relu(xk2 Wk^T)^2 Wv^T
    gp["ffn.value.weight"] = (dx.reshape(-1, dx.shape[-1]).T @ c["h"].reshape(-1, c["h"].shape[-1]))
    dh = dx @ p["ffn.value.weight"]
    du = dh * 2 * xp.maximum(c["u"], 0)
    gp["ffn.key.weight"] = du.reshape(-1, du.shape[-1]).T @ c["xk2"].reshape(-1, C)
    dxk2 = du @ p["ffn.key.weight"]
    gp["ffn.x_k"] = (dxk2 * c["dxf"]).sum(axis=(0, 1))
    dxf = dxk2 * (1 - p["ffn.x_k"]) + shift_backward(dxk2 * p["ffn.x_k"])
    dmid, gp["ln2.weight"], gp["ln2.bias"] = norm_backward(dxf, c["ln2"])
    dx = dx + dmid                                                          # dL/dx_mid
    # time mix output: x_mid = x_in + o Wo^T, o = (yn + bonus) * g
    gp["att.output.weight"] = dx.reshape(-1, C).T @ c["o"].reshape(-1, C)
    do = dx @ p["att.output.weight"]
    dg = do * (c["yn"] + c["bonus"])
    dsum = do * c["g"]
    dy, gp["att.ln_x.weight"], gp["att.ln_x.bias"] = norm_backward(dsum, c["gn"])
    # bonus = rk * v, rk = sum_head(r * kt * r_k)
    drk = (heads(dsum) * heads(c["v"])).sum(axis=-1, keepdims=True)         # (B, T, H, 1)
    dv = (heads(dsum) * c["rk"]).reshape(B, T, C)
    rkflat = p["att.r_k"].reshape(-1)
    drk_c = xp.broadcast_to(drk, (B, T, H, C // H)).reshape(B, T, C)
    dr = drk_c * c["kt"] * rkflat
    dkt = drk_c * c["r"] * rkflat
    gp["att.r_k"] = (drk_c * c["r"] * c["kt"]).sum(axis=(0, 1)).reshape(p["att.r_k"].shape)
    # WKV
    a, kh = c["a"], c["kh"]
    dr_w, dw, dkt_w, dv_w, dalpha, dbeta, _ = wkv_ops[1](
        heads(dy), None, c["ckpt"], heads(c["r"]), heads(c["w"]), heads(c["kt"]), heads(c["v"]),
        heads(-kh), heads(kh * a))
    flat = lambda u: u.reshape(B, T, C)
    dr = dr + flat(dr_w)
    dkt = dkt + flat(dkt_w)
    dv = dv + flat(dv_w)
    dkh = -flat(dalpha) + flat(dbeta) * a
    da = flat(dbeta) * kh
    # decay: w = exp(-DECAY_SCALE * sigmoid(w_pre))
    dw_pre = flat(dw) * c["w"] * (-ref.DECAY_SCALE) * c["sw"] * (1 - c["sw"])
    # value residual
    if i == 0:
        dv_raw = dv + (dv_first if dv_first is not None else 0)
    else:
        vg, v_raw, v_first = c["vg"], c["v_raw"], c["v_first"]
        dv_raw = dv * (1 - vg)
        dv_first_here = dv * vg
        dvg_pre = dv * (v_first - v_raw) * vg * (1 - vg)
        gp["att.v0"] = dvg_pre.sum(axis=(0, 1))
        gp["att.v2"] = c["hv"].reshape(-1, c["hv"].shape[-1]).T @ dvg_pre.reshape(-1, C)
        dhv = dvg_pre @ p["att.v2"].T
        dv_first = dv_first_here + (dv_first if dv_first is not None else 0)
    # kt = k * (1 + (a - 1) * k_a)
    k = c["k"]
    dk = dkt * (1 + (a - 1) * p["att.k_a"])
    da = da + dkt * k * p["att.k_a"]
    gp["att.k_a"] = (dkt * k * (a - 1)).sum(axis=(0, 1))
    # kh = kk / |kk| per head, kk = k * k_k
    khh, dkhh = heads(kh), heads(dkh)
    dkk = (dkhh - khh * (dkhh * khh).sum(axis=-1, keepdims=True)) / c["norm"]
    dkk = flat(dkk)
    dk = dk + dkk * p["att.k_k"]
    gp["att.k_k"] = (dkk * k).sum(axis=(0, 1))
    # LoRAs
    two = lambda u: u.reshape(-1, u.shape[-1])
    gp["att.w0"] = dw_pre.sum(axis=(0, 1))
    gp["att.w2"] = two(c["hw"]).T @ two(dw_pre)
    dhw_pre = (dw_pre @ p["att.w2"].T) * (1 - c["hw"] ** 2)
    da_pre = da * a * (1 - a)
    gp["att.a0"] = da_pre.sum(axis=(0, 1))
    gp["att.a2"] = two(c["ha"]).T @ two(da_pre)
    dha = da_pre @ p["att.a2"].T
    gp["att.g2"] = two(c["hg"]).T @ two(dg)
    dhg_pre = (dg @ p["att.g2"].T) * c["hg"] * (1 - c["hg"])
    # projections back to the six mixed inputs
    xr, xw, xk, xv, xa_, xg = c["mixed"]
    gp["att.receptance.weight"] = two(dr).T @ two(xr)
    gp["att.key.weight"] = two(dk).T @ two(xk)
    gp["att.value.weight"] = two(dv_raw).T @ two(xv)
    gp["att.w1"] = two(xw).T @ two(dhw_pre)
    gp["att.a1"] = two(xa_).T @ two(dha)
    gp["att.g1"] = two(xg).T @ two(dhg_pre)
    dmixed = [dr @ p["att.receptance.weight"], dhw_pre @ p["att.w1"].T,
              dk @ p["att.key.weight"], dv_raw @ p["att.value.weight"],
              dha @ p["att.a1"].T, dhg_pre @ p["att.g1"].T]
    if i > 0:
        gp["att.v1"] = two(xv).T @ two(dhv)
        dmixed[3] = dmixed[3] + dhv @ p["att.v1"].T
    # lerps: m = xa + (prev - xa) * mix
    dxa = xp.zeros_like(dx)
    dprev = xp.zeros_like(dx)
    for name, dm in zip(LERPS, dmixed):
        mix = p["att." + name]
        gp["att." + name] = (dm * c["dxp"]).sum(axis=(0, 1))
        dxa += dm * (1 - mix)
        dprev += dm * mix
    dxa += shift_backward(dprev)
    dln, gp["ln1.weight"], gp["ln1.bias"] = norm_backward(dxa, c["ln1"])
    return dx + dln, (None if i == 0 else dv_first), gp


def loss_and_grad(params, ids, targets, wkv_ops=None):
    """Mean cross-entropy (nats) of predicting `targets` from `ids`, and its gradient.

    Args:
        params: dict official key -> array, stored shapes ((1, 1, C) lerps etc.), as
            read_checkpoint returns them. float64 gives a float64 computation, float32 float32.
        ids, targets: (B, T) integer arrays (a 1-D array is one sequence).
        wkv_ops: (forward, backward) for the WKV operator; default: this module's NumPy pair for
            NumPy arrays, the CUDA kernels (`tinyrwkv.train_gpu.WKV_OPS`) for CuPy arrays
            (`tinyrwkv.train_fast.WKV_OPS` is the Numba pair). Params as CuPy arrays run the
            whole computation on the GPU and return CuPy gradients.
    Returns:
        loss (a Python float), grads: dict with the keys and shapes of params (layer 0's unused
        v0/v1/v2 get zeros).
    """
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
            from .train_gpu import WKV_OPS as wkv_ops
    H = config.n_head
    P = {key: xp.asarray(value, dtype).reshape(-1) if value.ndim == 3
         else xp.asarray(value, dtype) for key, value in params.items()}
    layers = [{key[len(f"blocks.{i}."):]: value for key, value in P.items()
               if key.startswith(f"blocks.{i}.")} for i in range(config.n_layer)]

    # forward
    emb = P["emb.weight"]
    x, c0 = norm_forward(emb[ids], P["blocks.0.ln0.weight"], P["blocks.0.ln0.bias"], 1, ref.LN_EPS)
    caches, v_first = [], None
    for i, p in enumerate(layers):
        x, v_first, c = _block_forward(x, v_first, p, i, H, wkv_ops)
        caches.append(c)
    xo, c_out = norm_forward(x, P["ln_out.weight"], P["ln_out.bias"], 1, ref.LN_EPS)
    logits = xo @ P["head.weight"].T                                          # (B, T, V)
    m = logits.max(axis=-1, keepdims=True)
    e = xp.exp(logits - m)
    z = e.sum(axis=-1, keepdims=True)
    logp_target = xp.take_along_axis(logits - m - xp.log(z), targets[..., None], axis=-1)
    n = targets.size
    loss = float(-logp_target.sum() / n)

    # backward
    grads = {key: xp.zeros_like(value) for key, value in P.items()}
    dlogits = e / z
    dlogits.reshape(-1, V)[xp.arange(n), targets.reshape(-1)] -= 1         # softmax - one-hot
    dlogits /= n
    grads["head.weight"] = dlogits.reshape(-1, V).T @ xo.reshape(-1, xo.shape[-1])
    dxo = dlogits @ P["head.weight"]
    dx, grads["ln_out.weight"], grads["ln_out.bias"] = norm_backward(dxo, c_out)
    dv_first = None
    for i in reversed(range(config.n_layer)):
        dx, dv_first, gp = _block_backward(dx, dv_first, layers[i], i, H, caches[i], wkv_ops)
        for key, value in gp.items():
            grads[f"blocks.{i}.{key}"] = value
    demb, grads["blocks.0.ln0.weight"], grads["blocks.0.ln0.bias"] = norm_backward(dx, c0)
    # emb[ids] read rows, some more than once: their gradients add up (np.add.at / cupy.add.at)
    xp.add.at(grads["emb.weight"], ids.reshape(-1), demb.reshape(-1, demb.shape[-1]))
    out = {}
    for key, value in params.items():
        out[key] = grads[key].reshape(value.shape).astype(dtype, copy=False)
    return loss, out
