"""RWKV-7 "Goose" (architecture x070) in NumPy: the readable reference forward pass.

This file is the whole model. It imports NumPy only, reads top to bottom in the order of the
architecture (primitives, time mix, channel mix, block, model) and has two forms that compute
the same function:

  * the recurrent form, `forward_one`: one token at a time, exactly the paper's recurrence;
  * the sequence form, `forward_seq`: T tokens at once; token shift and every projection are
    matrix products over the whole sequence, and only the WKV recurrence steps token by token.

Both take an explicit `State` in and return a new one (the state passed in is never modified).
float32 by default; float64 on request (the oracle mode). Loading files, tokenizers, sampling and
the command line live in other modules.

Sources: the RWKV-7 paper (arXiv:2503.14456); the official pip package `rwkv` 0.8.32
(rwkv/model.py: `RWKV_x070`, `RWKV_x070_TMix_one`, `RWKV_x070_TMix_seq`, `RWKV_x070_CMix_one`);
BlinkDL/RWKV-LM RWKV-v7/rwkv_v7_demo_rnn.py and rwkv_v7a_demo.py (DeepEmbed). Equation numbers
below ("§2.3 step 7") refer to the facts sheet these were checked against (rwkv7.md).

Glossary (each letter is used for one thing only)
    T  tokens in the sequence            L  layers (n_layer)
    C  channels, model width (n_embd)    H  heads (n_head) = C / N
    N  head size (64 in released models) V  vocabulary rows of emb.weight
    F  channel-mix width (dim_ffn, 4C)   Dw, Da, Dv, Dg  LoRA ranks of w, a, v, g
    D  DeepEmbed rank (32: a 32x32 matrix per token)
    S  WKV state of one layer, (H, N, N), S[h, i, j] with i = value index, j = key index
    r  receptance (the paper's query)    w  decay (the multiplicative d_t of the recurrence)
    k  key                               v  value
    a  in-context learning rate          g  output gate
    kappa_hat  the normalised "removal" key (paper: kappa-hat); k_tilde  the key that is written

Checkpoint key (per layer, prefix blocks.{i}.)  ->  symbol  ->  shape as used here
    ln1.weight/bias, ln2.weight/bias            pre-norms              (C,)
    att.x_r x_w x_k x_v x_a x_g                 token-shift lerps      (C,)   stored (1, 1, C)
    att.receptance/key/value/output.weight      W_r W_k W_v W_o        (C, C) stored (out, in)
    att.w0, att.w1, att.w2                      decay bias and LoRA    (C,), (C, Dw), (Dw, C)
    att.a0, att.a1, att.a2                      a bias and LoRA        (C,), (C, Da), (Da, C)
    att.v0, att.v1, att.v2                      value-residual gate    (C,), (C, Dv), (Dv, C)
    att.g1, att.g2                              gate LoRA              (C, Dg), (Dg, C)
    att.k_k                                     kappa scale            (C,)
    att.k_a                                     k_tilde mix            (C,)
    att.r_k                                     bonus weights          (H, N)
    att.ln_x.weight/bias                        group norm affine      (C,)
    ffn.x_k                                     channel-mix lerp       (C,)
    ffn.key.weight, ffn.value.weight            W_key, W_value         (F, C), (C, F)
    ffn.s_emb.weight, ffn.s_emb_x.weight        DeepEmbed tables       (V, D*D), (D*D, C)
    ffn.s0, ffn.s1, ffn.s2                      DeepEmbed gate         (F,), (C, D), (D, F)
  and once: emb.weight (V, C), blocks.0.ln0.weight/bias (C,), ln_out.weight/bias (C,), head.weight (V, C).
Vectors are rows; a stored Linear weight W (out, in) is applied as x @ W.T, the LoRA matrices
(w1, w2, ...) as x @ w1 @ w2 without transposes, exactly as in the checkpoint.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

# ----------------------------------------------------------------------------------------------
# Primitives
# ----------------------------------------------------------------------------------------------

LN_EPS = 1e-5       # every LayerNorm (ln0, ln1, ln2, ln_out), as torch's default
GN_EPS = 64e-5      # GroupNorm ln_x: 1e-5 * 8**2, the old "head_size_divisor 8" folded in. Not 1e-5!
L2_EPS = 1e-12      # torch F.normalize: u / max(|u|, 1e-12)
DECAY_SCALE = float(np.exp(-0.5))  # w = exp(-e^-0.5 * sigmoid(.)): log w in (-0.6065, 0).
# (A Python float, not np.float64: under NumPy 2 a float64 scalar would promote float32 arrays.)
# The official RNN code writes this constant as 0.606531; we use exact e^-0.5 like its CUDA kernel,
# fla and llama.cpp (a 3.4e-7 difference in the constant, far below float32 agreement).


def layer_norm(x, weight, bias, eps=LN_EPS):
    """LayerNorm over the last axis with biased variance (torch F.layer_norm). (..., C) -> (..., C)"""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def group_norm(x, weight, bias, n_groups, eps=GN_EPS):
    """GroupNorm with one group per head, applied to each token separately. (..., C) -> (..., C)"""
    shape = x.shape
    x = x.reshape(*shape[:-1], n_groups, -1)                     # (..., H, N)
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    x = ((x - mu) / np.sqrt(var + eps)).reshape(shape)          # (..., H, N) -> (..., C)
    return x * weight + bias


def sigmoid(x):
    return 1.0 / (1.0 + np.exp(-x))


def l2_normalize(x, eps=L2_EPS):
    """u / max(|u|_2, eps) along the last axis (torch F.normalize)."""
    return x / np.maximum(np.linalg.norm(x, axis=-1, keepdims=True), eps)


def token_shift(x, x_prev):
    """The previous token's input for every position: x_prev for the first. (T, C), (C,) -> (T, C)"""
    return np.concatenate([x_prev[None, :], x[:-1]], axis=0)


# ----------------------------------------------------------------------------------------------
# Configuration and state
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Config:
    """Sizes of a model, read from its weight shapes (never typed by hand)."""
    n_layer: int      # L
    n_embd: int       # C
    n_head: int       # H
    head_size: int    # N
    vocab_size: int   # V
    dim_ffn: int      # F
    d_decay: int      # Dw
    d_aaa: int        # Da
    d_mv: int         # Dv (0 for a one-layer model: layer 0 has no value residual)
    d_gate: int       # Dg
    variant: str      # "x070" or "x070-deepembed"
    d_deepembed: int = 0  # D (DeepEmbed only)

    @classmethod
    def from_weights(cls, weights):
        """weights: dict official key -> array (any of the stored or squeezed shapes)."""
        V, C = weights["emb.weight"].shape
        H, N = weights["blocks.0.att.r_k"].shape
        L = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("blocks."))
        deep = "blocks.0.ffn.s1" in weights
        cfg = cls(
            n_layer=L, n_embd=C, n_head=H, head_size=N, vocab_size=V,
            dim_ffn=weights["blocks.0.ffn.key.weight"].shape[0],
            d_decay=weights["blocks.0.att.w1"].shape[1],
            d_aaa=weights["blocks.0.att.a1"].shape[1],
            d_mv=weights["blocks.1.att.v1"].shape[1] if L > 1 else 0,  # layer 0's v1 is unused
            d_gate=weights["blocks.0.att.g1"].shape[1],
            variant="x070-deepembed" if deep else "x070",
            d_deepembed=weights["blocks.0.ffn.s1"].shape[1] if deep else 0,
        )
        assert H * N == C, f"heads x head size = {H} x {N} != n_embd {C}"
        return cfg


@dataclass
class State:
    """The recurrent state: everything the model remembers about the tokens it has read.

    Per layer, three tensors (the official package's state[3i+0], [3i+1], [3i+2]):
        att_shift (L, C)        the LN1 output of the last token (time-mix token shift)
        wkv       (L, H, N, N)  the WKV matrix, [head][value i][key j] (the official layout;
                                fla and some kernels store its transpose [head][key][value])
        ffn_shift (L, C)        the LN2 output of the last token (channel-mix token shift)
    Its size does not grow with the context: L * C * (N + 2) numbers.
    """
    att_shift: np.ndarray
    wkv: np.ndarray
    ffn_shift: np.ndarray

    FORMAT = "tinyrwkv-state-v1"  # written into saved files; class attribute, not a field

    @classmethod
    def zeros(cls, config, dtype=np.float32):
        L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
        return cls(np.zeros((L, C), dtype), np.zeros((L, H, N, N), dtype), np.zeros((L, C), dtype))

    def copy(self):
        return State(self.att_shift.copy(), self.wkv.copy(), self.ffn_shift.copy())

    @property
    def nbytes(self):
        """Memory the state takes, whatever the length of the text it has read."""
        return self.att_shift.nbytes + self.wkv.nbytes + self.ffn_shift.nbytes

    def wkv_key_value(self):
        """The WKV state transposed to [layer][head][key][value], the layout fla kernels use."""
        return self.wkv.transpose(0, 1, 3, 2)

    def to_host(self):
        """This state with NumPy arrays (the GPU backend's states hold CuPy arrays, which have
        `.get()`); a NumPy state is returned as it is."""
        host = lambda a: a if isinstance(a, np.ndarray) else a.get()
        return State(host(self.att_shift), host(self.wkv), host(self.ffn_shift))

    def save(self, path):
        """Save as .npz: att_shift, wkv ([head][value][key]), ffn_shift and a format tag."""
        s = self.to_host()
        np.savez(path, format=np.array(self.FORMAT), att_shift=s.att_shift, wkv=s.wkv,
                 ffn_shift=s.ffn_shift)

    @classmethod
    def load(cls, path, config=None):
        """Load a state saved by `save`; with `config`, check that it fits that model."""
        with np.load(path, allow_pickle=False) as f:
            if "format" not in f or str(f["format"]) != cls.FORMAT:
                raise ValueError(f"{path} is not a tinyrwkv state file (no '{cls.FORMAT}' tag)")
            state = cls(f["att_shift"], f["wkv"], f["ffn_shift"])
        if config is not None:
            state.check_fits(config, where=f"state file {path}: ")
        return state

    def check_fits(self, config, where=""):
        """Raise ValueError unless every tensor has the shape `config`'s model needs."""
        want = State.zeros(config)
        for name in ("att_shift", "wkv", "ffn_shift"):
            got, need = getattr(self, name).shape, getattr(want, name).shape
            if got != need:
                raise ValueError(f"{where}{name} has shape {got}, this model needs {need}")


# ----------------------------------------------------------------------------------------------
# Time mix (the "attention" of RWKV): §2.3 of the facts sheet, in order
# ----------------------------------------------------------------------------------------------

def time_mix_inputs(x, x_prev, v_first, p, layer_id, n_head):
    """Steps 1-10: everything of the time mix that is position-wise, for one token or T tokens.

    Args:
        x:       (..., C) LN1 output of the current token(s)
        x_prev:  (..., C) LN1 output of the previous token(s) (token shift)
        v_first: (..., C) layer 0's value for the same token(s); ignored in layer 0
        p:       this layer's weights, keyed by checkpoint name without 'blocks.{i}.'
    Returns:
        r, w, k_tilde, v, kappa_hat, a, g: each (..., C); v_first: (..., C)
    """
    dx = x_prev - x                                          # (..., C)
    xr = x + dx * p["att.x_r"]                               # lerp towards the previous token,
    xw = x + dx * p["att.x_w"]                               # one mix per use
    xk = x + dx * p["att.x_k"]
    xv = x + dx * p["att.x_v"]
    xa = x + dx * p["att.x_a"]
    xg = x + dx * p["att.x_g"]

    r = xr @ p["att.receptance.weight"].T                    # (..., C)
    k = xk @ p["att.key.weight"].T                           # (..., C)
    v = xv @ p["att.value.weight"].T                         # (..., C)
    w_pre = p["att.w0"] + np.tanh(xw @ p["att.w1"]) @ p["att.w2"]       # (..., C) via (..., Dw)
    a = sigmoid(p["att.a0"] + (xa @ p["att.a1"]) @ p["att.a2"])         # (..., C) in (0, 1)
    g = sigmoid(xg @ p["att.g1"]) @ p["att.g2"]              # (..., C): sigmoid between g1 and g2

    # The removal key: k scaled per channel, then unit length per head (uses k before step 8).
    kk = (k * p["att.k_k"]).reshape(*k.shape[:-1], n_head, -1)          # (..., H, N)
    kappa_hat = l2_normalize(kk).reshape(k.shape)            # (..., H, N) -> (..., C)
    # The written key: k where k_a = 0, k * a where k_a = 1.
    k_tilde = k * (1 + (a - 1) * p["att.k_a"])               # (..., C)

    # Value residual: every layer after the first mixes in layer 0's value, gated per channel.
    if layer_id == 0:
        v_first = v
    else:
        v = v + (v_first - v) * sigmoid(p["att.v0"] + (xv @ p["att.v1"]) @ p["att.v2"])

    # Decay in (e^-e^-0.5, 1) = (0.545, 1): computed from w_pre, never more than 0.6065 in log.
    w = np.exp(-DECAY_SCALE * sigmoid(w_pre))                # (..., C)
    return r, w, k_tilde, v, kappa_hat, a, g, v_first


def wkv_step(S, r, w, k, v, kappa_hat, a):
    """Step 11-12: one token of the WKV recurrence (the generalised delta rule), all heads.

        S <- S diag(w) + (S a) b^T + v k^T   with a = -kappa_hat, b = kappa_hat * a_lr
        y <- S r                             (read out with the new state)

    S[h] is (value x key): column j belongs to key channel j, so the decay w scales columns.
    `S a` is what the state currently stores under the removal key; adding (S a) b^T removes
    that much (scaled by the learning rate a) before v k^T writes the new association.

    Args:
        S: (H, N, N) state; r, w, k, v, kappa_hat, a: (H, N) this token's per-head vectors.
    Returns:
        S_new (H, N, N), y (H, N)
    """
    sa = S @ -kappa_hat[:, :, None]                                   # (H, N, 1) = S a
    S = S * w[:, None, :] + sa * (kappa_hat * a)[:, None, :] + v[:, :, None] * k[:, None, :]
    y = (S @ r[:, :, None])[:, :, 0]                                  # (H, N, 1) -> (H, N)
    return S, y


def time_mix_output(y, r, k, v, g, p, n_head):
    """Steps 13-15: group norm, the bonus term, the gate and the output projection.

    Args: y, r, k, v, g: (..., C) (k is k_tilde, v after the value residual). Returns (..., C).
    """
    y = group_norm(y, p["att.ln_x.weight"], p["att.ln_x.bias"], n_head)      # (..., C)
    # Bonus: the current token's own value, weighted by a per-head r.k similarity (u in RWKV-4..6).
    rk = (r * k).reshape(*r.shape[:-1], n_head, -1) * p["att.r_k"]           # (..., H, N)
    bonus = rk.sum(axis=-1, keepdims=True) * v.reshape(rk.shape)             # (..., H, N)
    y = y + bonus.reshape(y.shape)                                           # (..., C)
    return (y * g) @ p["att.output.weight"].T                                # (..., C)


def time_mix_one(x, x_prev, S, v_first, p, layer_id, n_head):
    """Recurrent form: one token. x, x_prev, v_first: (C,); S: (H, N, N).
    Returns out (C,), the new S (H, N, N), v_first (C,)."""
    r, w, k, v, kappa_hat, a, g, v_first = time_mix_inputs(x, x_prev, v_first, p, layer_id, n_head)
    heads = lambda u: u.reshape(n_head, -1)                               # (C,) -> (H, N)
    S, y = wkv_step(S, heads(r), heads(w), heads(k), heads(v), heads(kappa_hat), heads(a))
    out = time_mix_output(y.reshape(-1), r, k, v, g, p, n_head)
    return out, S, v_first


def time_mix_seq(x, x_prev, S, v_first, p, layer_id, n_head, wkv=None):
    """Sequence form: T tokens. Every projection is one matrix product over the whole sequence;
    only the WKV operator works through the tokens, with `wkv` = `wkv_seq` (token by token, the
    default) or `wkv_chunked` (chunks of tokens with matrix products; same result).
    x, v_first: (T, C); x_prev: (C,); S: (H, N, N). Returns out (T, C), the new S, v_first (T, C)."""
    T, C = x.shape
    r, w, k, v, kappa_hat, a, g, v_first = time_mix_inputs(
        x, token_shift(x, x_prev), v_first, p, layer_id, n_head)
    heads = lambda u: u.reshape(T, n_head, -1)                            # (T, C) -> (T, H, N)
    S, y = (wkv or wkv_seq)(S, *map(heads, (r, w, k, v, kappa_hat, a)))   # y: (T, H, N)
    out = time_mix_output(y.reshape(T, C), r, k, v, g, p, n_head)
    return out, S, v_first


# ----------------------------------------------------------------------------------------------
# The WKV operator over a sequence: recurrent, and chunked (the parallel form, §3.6)
# ----------------------------------------------------------------------------------------------

def wkv_seq(S, r, w, k, v, kappa_hat, a):
    """The WKV recurrence over T tokens, one `wkv_step` at a time.

    Args: S (H, N, N) initial state; r, w, k, v, kappa_hat, a: (T, H, N).
    Returns: the state after the last token (H, N, N), and y (T, H, N).
    """
    y = np.empty_like(r)                                                  # (T, H, N)
    for t in range(len(r)):
        S, y[t] = wkv_step(S, r[t], w[t], k[t], v[t], kappa_hat[t], a[t])
    return S, y


# e^{-g} over a chunk reaches e^{0.6065 * chunk_len}; float32 overflows past e^{88.7}.
MAX_CHUNK_LEN = 144


def wkv_chunked(S, r, w, k, v, kappa_hat, a, chunk_len=16):
    """The same function as `wkv_seq`, a chunk of tokens at a time with matrix products.

    Within a chunk the state is never formed token by token; only the state at the end of each
    chunk is, and carried into the next. Same signature and result as `wkv_seq` (up to rounding).
    """
    if not 1 <= chunk_len <= MAX_CHUNK_LEN:
        raise ValueError(f"chunk_len must be 1..{MAX_CHUNK_LEN}, got {chunk_len}: longer chunks "
                         "overflow float32 in the factored decays (see wkv_chunk)")
    y = np.empty_like(r)                                                  # (T, H, N)
    for start in range(0, len(r), chunk_len):
        c = slice(start, start + chunk_len)
        S, y[c] = wkv_chunk(S, r[c], w[c], k[c], v[c], kappa_hat[c], a[c])
    return S, y



def wkv_chunk(S, r, w, k, v, kappa_hat, a):
    """One chunk of T tokens of the WKV recurrence in closed form (the WY / DPLR formulation).

    Per head, the transition is diag(w_t) + alpha_t beta_t^T with alpha = -kappa_hat,
    beta = kappa_hat * a. Let z_t = S_{t-1} alpha_t (what the state holds under the removal key) and
    g_t = sum_{tau <= t} log w_tau (cumulative log decay per key channel, g_0 = 0). Unrolling gives
        S_t = S_0 diag(e^{g_t}) + sum_{s <= t} (v_s k_s^T + z_s beta_s^T) diag(e^{g_t - g_s}),
    so z_t, y_t = S_t r_t and S_T are sums over earlier tokens weighted by pairwise decays
    e^{g_t - g_s}. Those weights factor as e^{g_t} * e^{-g_s}, which turns every sum into a matrix
    product; the z_t depend on each other only through a unit lower-triangular system, solved once.
    Chapter 03 derives this step by step.

    Why factoring is safe here: log w >= -e^{-1/2} = -0.6065 per token (the decay's soft clamp),
    so within a chunk of 16 tokens e^{-g_s} <= e^{9.7} ~ 1.6e4, far inside float32's range, and each
    product is rounded relative to its own (bounded) size. Chunks past MAX_CHUNK_LEN = 144 tokens
    would overflow float32 (e^{0.6065 * 146} > 3.4e38); chapter 03 measures where it breaks.

    Args: S (H, N, N) state [value, key]; r, w, k, v, kappa_hat, a: (T, H, N).
    Returns: S_T (H, N, N), y (T, H, N).
    """
    r, w, k, v, kappa_hat, a = (u.transpose(1, 0, 2) for u in (r, w, k, v, kappa_hat, a))  # (H, T, N)
    T = r.shape[1]
    alpha, beta = -kappa_hat, kappa_hat * a                               # (H, T, N)
    log_w = np.log(w)
    g = np.cumsum(log_w, axis=1)                                          # (H, T, N): g_t
    g_prev = g - log_w                                                    # (H, T, N): g_{t-1}

    # Queries decayed forward from the chunk start, keys brought back to it.
    a_out, r_out = alpha * np.exp(g_prev), r * np.exp(g)                  # (H, T, N)
    k_in, b_in = k * np.exp(-g), beta * np.exp(-g)                        # (H, T, N)
    before = np.tril(np.ones((T, T), bool), -1)                           # s < t
    upto = np.tril(np.ones((T, T), bool))                                 # s <= t
    mT = lambda u: u.transpose(0, 2, 1)                                   # (H, T, N) -> (H, N, T)
    A_ak = np.where(before, a_out @ mT(k_in), 0)                          # (H, T, T)
    A_ab = np.where(before, a_out @ mT(b_in), 0)
    A_rk = np.where(upto, r_out @ mT(k_in), 0)
    A_rb = np.where(upto, r_out @ mT(b_in), 0)

    S0_t = mT(S)                                                          # (H, N key, N value)
    # z_t = (alpha_t e^{g_{t-1}}) S_0^T + sum_{s<t} A_ak[t,s] v_s + A_ab[t,s] z_s, for all t at once:
    z = np.linalg.solve(np.eye(T, dtype=r.dtype) - A_ab, a_out @ S0_t + A_ak @ v)   # (H, T, N)
    # y_t = S_t r_t = (r_t e^{g_t}) S_0^T + sum_{s<=t} A_rk[t,s] v_s + A_rb[t,s] z_s
    y = r_out @ S0_t + A_rk @ v + A_rb @ z                                # (H, T, N)
    # S_T = S_0 diag(e^{g_T}) + sum_s (v_s k_s^T + z_s beta_s^T) diag(e^{g_T - g_s})
    to_end = np.exp(g[:, -1:, :] - g)                                     # (H, T, N), <= 1
    S = S * np.exp(g[:, -1])[:, None, :] + mT(v) @ (k * to_end) + mT(z) @ (beta * to_end)
    return S, y.transpose(1, 0, 2)                                        # (H, N, N), (T, H, N)


# ----------------------------------------------------------------------------------------------
# Channel mix (the MLP): §2.4; DeepEmbed gate §5.2
# ----------------------------------------------------------------------------------------------

def channel_mix(x, x_prev, p, s_emb=None):
    """A two-layer MLP with squared ReLU, fed a lerp of this token and the previous one.

    Args:
        x, x_prev: (..., C) LN2 output of the current and the previous token(s)
        s_emb:     (..., D*D) DeepEmbed rows of the current token(s); None for plain x070
    Returns: (..., C)
    """
    xk = x + (x_prev - x) * p["ffn.x_k"]                       # (..., C)
    h = np.maximum(xk @ p["ffn.key.weight"].T, 0) ** 2         # (..., F)
    if s_emb is not None:
        # DeepEmbed: each token brings its own D x D matrix M; the gate is (x s1) M s2 + s0.
        D = p["ffn.s1"].shape[1]
        u = (x @ p["ffn.s1"])[..., None, :]                    # (..., 1, D): from x, not xk
        M = s_emb.reshape(*s_emb.shape[:-1], D, D)             # (..., D*D) -> (..., D, D)
        h = h * ((u @ M)[..., 0, :] @ p["ffn.s2"] + p["ffn.s0"])           # (..., F)
    return h @ p["ffn.value.weight"].T                         # (..., C)


def deep_embed_rows(p, token_ids, x0):
    """DeepEmbed rows for the given tokens: s_emb[token] + x0 @ s_emb_x^T, where x0 = LN0(emb[token]).
    The official loader adds the second term to the whole table once; we add it per token. (..., D*D)"""
    return p["ffn.s_emb.weight"][token_ids] + x0 @ p["ffn.s_emb_x.weight"].T


# ----------------------------------------------------------------------------------------------
# Block: pre-norm residual time mix, then pre-norm residual channel mix (§2.2)
# ----------------------------------------------------------------------------------------------

def block_one(x, v_first, state, layer_id, p, n_head, s_emb=None):
    """One layer for one token, recurrent form. x, v_first: (C,); updates layer `layer_id` of
    `state` in place. Returns the new residual x (C,) and v_first (C,)."""
    xa = layer_norm(x, p["ln1.weight"], p["ln1.bias"])                    # (C,)
    dx, state.wkv[layer_id], v_first = time_mix_one(
        xa, state.att_shift[layer_id], state.wkv[layer_id], v_first, p, layer_id, n_head)
    state.att_shift[layer_id] = xa
    x = x + dx
    xf = layer_norm(x, p["ln2.weight"], p["ln2.bias"])                    # (C,)
    x = x + channel_mix(xf, state.ffn_shift[layer_id], p, s_emb)
    state.ffn_shift[layer_id] = xf
    return x, v_first


def block_seq(x, v_first, state, layer_id, p, n_head, s_emb=None, wkv=None):
    """One layer for T tokens, sequence form. x, v_first: (T, C); updates layer `layer_id` of
    `state` in place (token shifts become the last token's LN outputs). Returns x, v_first (T, C).
    `wkv`: the WKV operator over the sequence (`wkv_seq` by default, or `wkv_chunked`)."""
    xa = layer_norm(x, p["ln1.weight"], p["ln1.bias"])                    # (T, C)
    dx, state.wkv[layer_id], v_first = time_mix_seq(
        xa, state.att_shift[layer_id], state.wkv[layer_id], v_first, p, layer_id, n_head, wkv)
    x = x + dx
    xf = layer_norm(x, p["ln2.weight"], p["ln2.bias"])                    # (T, C)
    x = x + channel_mix(xf, token_shift(xf, state.ffn_shift[layer_id]), p, s_emb)
    state.att_shift[layer_id], state.ffn_shift[layer_id] = xa[-1], xf[-1]
    return x, v_first


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

class RWKV7:
    """An RWKV-7 model: its weights, its config, and the two forward forms.

    `weights` is a dict from official checkpoint key to array, as `tinyrwkv.read_checkpoint` returns
    it (or as stored in a .pth). Preparation (below) only squeezes (1, 1, C) lerp vectors to (C,),
    casts to `dtype` and groups keys per layer; matrices stay exactly as stored.
    """

    # Sequence form: from this many tokens on, the chunked WKV is faster than stepping (measured
    # in NumPy on 2 cores: 1.2-1.6x at 3 tokens, 2-2.5x from 8 on; chapter 03 re-measures it).
    CHUNKED_FROM = 4

    def __init__(self, weights, dtype="float32", name=None, wkv="auto"):
        """wkv: how the sequence form runs the WKV operator: "recurrent" (token by token),
        "chunked" (matrix products over chunks of 16 tokens), or "auto" (chunked from
        CHUNKED_FROM tokens on). All three compute the same function."""
        if wkv not in ("auto", "recurrent", "chunked"):
            raise ValueError(f"wkv must be 'auto', 'recurrent' or 'chunked', not {wkv!r}")
        self.wkv = wkv
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, not {self.dtype}")
        self.config = Config.from_weights(weights)
        self.name = name
        self.backend = "numpy"
        cast = lambda key: self.prepare_weight(key, np.asarray(weights[key]))
        squeeze = lambda a: a.reshape(-1) if a.ndim == 3 else a           # (1, 1, C) -> (C,)
        self.emb = cast("emb.weight")                                     # (V, C)
        self.ln0 = (cast("blocks.0.ln0.weight"), cast("blocks.0.ln0.bias"))
        self.ln_out = (cast("ln_out.weight"), cast("ln_out.bias"))
        self.head = cast("head.weight")                                   # (V, C)
        self.blocks = []
        for i in range(self.config.n_layer):
            prefix = f"blocks.{i}."
            p = {key[len(prefix):]: squeeze(cast(key)) for key in weights
                 if key.startswith(prefix) and not key.startswith(prefix + "ln0.")}
            if i == 0:  # layer 0 never uses its value-residual weights (may be absent)
                for unused in ("att.v0", "att.v1", "att.v2"):
                    p.pop(unused, None)
            p["att.r_k"] = p["att.r_k"].reshape(self.config.n_head, self.config.head_size)  # (H, N)
            if "ffn.s0" in p:
                p["ffn.s0"] = p["ffn.s0"].reshape(-1)                                     # (F,)
            self.blocks.append(p)

    def prepare_weight(self, key, array):
        """One tensor as the forward pass uses it: cast to the model's dtype (no copy when it
        already is; a float32 checkpoint stays memory-mapped). Fast backends override this."""
        return array.astype(self.dtype, copy=False)

    # ---- the two forms ----

    def _check_ids(self, ids):
        ids = np.asarray(ids)
        if ids.ndim == 0:
            ids = ids[None]
        if ids.ndim != 1 or ids.size == 0:
            raise ValueError("token ids must be a non-empty list of integers")
        if not np.issubdtype(ids.dtype, np.integer):
            raise ValueError(f"token ids must be integers, got {ids.dtype}")
        V = self.config.vocab_size
        bad = ids[(ids < 0) | (ids >= V)]
        if bad.size:
            raise ValueError(f"token id {int(bad[0])} is out of range for this model's vocabulary "
                             f"(0..{V - 1}): was the text encoded with another model's tokenizer?")
        return ids.astype(np.int64)

    def _check_state(self, state):
        if state is None:
            return State.zeros(self.config, self.dtype)
        state.check_fits(self.config, where="state.")
        # A copy in the model's dtype: the caller's state is never modified.
        return State(*(np.array(getattr(state, n), dtype=self.dtype)
                       for n in ("att_shift", "wkv", "ffn_shift")))

    def forward_one(self, token, state):
        """Recurrent form: one token. Returns the final hidden vector (C,) before ln_out and the new
        state. `state` is updated in place; the public `forward` hands it a copy."""
        x0 = layer_norm(self.emb[token], *self.ln0)               # (C,) ln0 on the embedding
        x, v_first = x0, None
        for i, p in enumerate(self.blocks):
            s_emb = deep_embed_rows(p, token, x0) if "ffn.s1" in p else None      # (D*D,)
            x, v_first = block_one(x, v_first, state, i, p, self.config.n_head, s_emb)
        return x, state

    def forward_seq(self, ids, state):
        """Sequence form: T tokens at once. Returns the hidden vectors (T, C) before ln_out and the
        new state. `state` is updated in place; the public `forward` hands it a copy."""
        chunked = self.wkv == "chunked" or (self.wkv == "auto" and len(ids) >= self.CHUNKED_FROM)
        wkv = wkv_chunked if chunked else wkv_seq
        x0 = layer_norm(self.emb[ids], *self.ln0)                 # (T, C)
        x, v_first = x0, None
        for i, p in enumerate(self.blocks):
            s_emb = deep_embed_rows(p, ids, x0) if "ffn.s1" in p else None        # (T, D*D)
            x, v_first = block_seq(x, v_first, state, i, p, self.config.n_head, s_emb, wkv)
        return x, state

    def hidden(self, ids, state=None, mode="sequence"):
        """The normalised final hidden vectors ln_out(x), (T, C), and the new state."""
        ids, state = self._check_ids(ids), self._check_state(state)
        if mode not in ("sequence", "recurrent"):
            raise ValueError(f"mode must be 'sequence' or 'recurrent', not {mode!r}")
        if mode == "sequence" and len(ids) > 1:  # one token takes the recurrent form (as official)
            x, state = self.forward_seq(ids, state)
        else:
            x = np.stack([self.forward_one(int(t), state)[0] for t in ids])   # (T, C)
        return layer_norm(x, *self.ln_out), state

    def forward(self, ids, state=None, full_output=False, mode="sequence"):
        """Logits and the new state.

        Args:
            ids: token ids (a list, an int array, or one int)
            state: a State to continue from (not modified); None = the zero state
            full_output: return logits for every position (T, V) instead of the last (V,)
            mode: "sequence" (default, faster) or "recurrent" (one token at a time)
        Returns:
            logits (V,) or (T, V) in the model's dtype, new State
        """
        h, state = self.hidden(ids, state, mode)
        if not full_output:
            h = h[-1]                                         # (C,)
        return self.logits(h), state                          # (V,) or (T, V)

    def logits(self, h):
        """The LM head: (..., C) normalised hidden vectors -> (..., V) logits."""
        return h @ self.head.T

    def embed(self, ids, state=None, pool="last", normalize=True):
        """A sentence embedding: the model's final hidden state (after ln_out) for the text.

        pool="last" returns the vector of the last token, which has read the whole text (the
        vector the LM head turns into next-token logits); pool="mean" averages over the tokens.
        normalize=True scales it to unit L2 norm, so a dot product is a cosine similarity.
        Returns (C,) in the model's dtype. Untrained for similarity: quality depends on the model.
        """
        h, _ = self.hidden(ids, state)                        # (T, C)
        if pool == "last":
            e = h[-1]
        elif pool == "mean":
            e = h.mean(axis=0)
        else:
            raise ValueError(f"pool must be 'last' or 'mean', not {pool!r}")
        return e / np.linalg.norm(e) if normalize else e

    def zero_state(self):
        return State.zeros(self.config, self.dtype)

    @property
    def n_params(self):
        """Numbers the forward pass reads (layer-0 v0/v1/v2 are not counted: they are never used)."""
        arrays = [self.emb, self.head, *self.ln0, *self.ln_out]
        return sum(a.size for a in arrays) + sum(a.size for p in self.blocks for a in p.values())
