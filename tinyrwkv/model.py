"""RWKV-7 "Goose" (architecture x070) in NumPy: the readable reference forward pass.

This file is the model, written once, importing NumPy only. It reads top to bottom in the order
of the architecture, with docs/architecture.md numbering the same steps: 1. primitives; 2. the
steps of a layer, one small function each, gathered in `Steps`; 3. the WKV operator over a
sequence, recurrent (`wkv_seq`) and chunked (`wkv_chunked`); 4. the time mix and channel mix,
composed of those steps; 5. the block, the state and the model (`RWKV7`).

Every composition works on arrays of shape (..., T, C): one token is T = 1, a batch of sequences
(B, T, C) (the trainer's forward, tinyrwkv/train.py, calls these same functions). Each can fill an
`acts` dict with its named intermediates: that is how the oracle's traces and the trainer's
backward see inside the layer without a second copy of the math.

Glossary (one letter, one meaning)
    T tokens   C channels (n_embd)   H heads   N head size (C = H N)   L layers   V vocabulary
    F channel-mix width (4C)   Dw, Da, Dv, Dg LoRA ranks of w, a, v, g   D DeepEmbed rank
    r receptance   w decay   k key   v value   a in-context learning rate   g output gate
    kk = kappa_hat, the unit-length removal key   k_tilde, the key that is written
    S the WKV state of a layer, (H, N, N), S[h, i, j]: i = value channel, j = key channel
Checkpoint keys and shapes: docs/architecture.md §7. A stored Linear weight W (out, in) is applied
as x @ W.T, the LoRA matrices as x @ w1 @ w2, as stored. Checked against the official `rwkv`
package 0.8.32 (tests/test_model.py); the paper is arXiv:2503.14456.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Callable

import numpy as np


# ----------------------------------------------------------------------------------------------
# 1. Primitives
# ----------------------------------------------------------------------------------------------

LN_EPS = 1e-5       # every LayerNorm (ln0, ln1, ln2, ln_out), as torch's default
GN_EPS = 64e-5      # GroupNorm ln_x: 1e-5 * 8**2, the old "head_size_divisor 8" folded in. Not 1e-5!
L2_EPS = 1e-12      # torch F.normalize: u / max(|u|, 1e-12)
DECAY_SCALE = float(np.exp(-0.5))  # log w = -e^-0.5 * sigmoid(w_pre), in (-0.6065, 0)
# (A Python float: under NumPy 2 a float64 scalar would promote float32 arrays.) The official RNN
# code writes 0.606531; exact e^-0.5 is what its CUDA kernel, fla and llama.cpp use (3.4e-7 apart).


def layer_norm(x, weight, bias, eps=LN_EPS):
    """LayerNorm over the last axis with biased variance (torch F.layer_norm). (..., C) -> (..., C)"""
    mu = x.mean(axis=-1, keepdims=True)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)
    return (x - mu) / np.sqrt(var + eps) * weight + bias


def group_norm(x, weight, bias, n_groups, eps=GN_EPS):
    """GroupNorm with one group per head, for each token separately. (..., C) -> (..., C)"""
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
    """The previous token's vector at every position; x_prev before the first.
    (..., T, C), (..., C) -> (..., T, C)"""
    return np.concatenate([x_prev[..., None, :], x[..., :-1, :]], axis=-2)


def heads(u, n_head):
    """(..., C) -> (..., H, N): channels split into heads."""
    return u.reshape(*u.shape[:-1], n_head, -1)


# ----------------------------------------------------------------------------------------------
# 2. The steps of a layer (docs/architecture.md §3), each on (..., C) arrays
# ----------------------------------------------------------------------------------------------

def lerp(x, x_prev, mix):
    """Token-shift interpolation: mix = 0 keeps this token, mix = 1 takes the previous one."""
    return x + (x_prev - x) * mix


def log_decay(w_pre):
    """log w from the decay pre-activation: a soft clamp into (-e^-0.5, 0)."""
    return -DECAY_SCALE * sigmoid(w_pre)


def decay(w_pre):
    """The per-channel decay w in (e^-e^-0.5, 1) = (0.545, 1) that multiplies the state."""
    return np.exp(log_decay(w_pre))


def learning_rate(a_pre):
    """The in-context learning rate a in (0, 1): how much of the old value is replaced."""
    return sigmoid(a_pre)


def removal_key(k, k_k, n_head):
    """kappa_hat (kk): k scaled per channel, then unit length per head. (..., C) -> (..., C)"""
    return l2_normalize(heads(k * k_k, n_head)).reshape(k.shape)


def replacement_key(k, a, k_a):
    """k_tilde, the key written into the state: k where k_a = 0, k * a where k_a = 1."""
    return k * (1 + (a - 1) * k_a)


def value_residual(v, v_first, gate):
    """Every layer after the first mixes in layer 0's value, gated per channel."""
    return v + (v_first - v) * gate


def wkv_step(S, r, w, k, v, alpha, beta):
    """One token of the WKV recurrence, the generalised delta rule, for every head:

        S <- S (diag(w) + alpha beta^T) + v k^T        y <- S r  (read out from the new state)

    In the model alpha = -kappa_hat and beta = kappa_hat * a, so S alpha is what the state holds
    under the removal key, and adding (S alpha) beta^T removes a share a of it before v k^T
    writes the new association. S[h] is (value, key): the decay w scales columns (key channels).

    Args: S (..., H, N, N); r, w, k, v, alpha, beta (..., H, N).  Returns S_new, y (..., H, N).
    This signature, (S, r, w, k, v, alpha, beta) -> (S, y) with S [value][key], is every WKV
    operator's in tinyrwkv: the sequence forms take (..., T, H, N) vectors instead.
    """
    s_alpha = (S @ alpha[..., :, None])[..., 0]                          # (..., H, N)
    S = S * w[..., None, :] + s_alpha[..., :, None] * beta[..., None, :] + v[..., :, None] * k[..., None, :]
    y = (S @ r[..., :, None])[..., 0]                                    # (..., H, N)
    return S, y


def bonus(r, k, v, r_k, n_head):
    """The current token's own value, weighted per head by r.(k r_k) (u in RWKV-4..6). (..., C)"""
    rk = (heads(r, n_head) * heads(k, n_head) * r_k).sum(axis=-1, keepdims=True)   # (..., H, 1)
    return (rk * heads(v, n_head)).reshape(v.shape)


def output_gate(y, g):
    return y * g


def squared_relu(u):
    return np.maximum(u, 0) ** 2


# ----------------------------------------------------------------------------------------------
# 3. The WKV operator over a sequence
# ----------------------------------------------------------------------------------------------

def wkv_seq(S, r, w, k, v, alpha, beta, step=wkv_step):
    """The WKV recurrence over T tokens, one `step` at a time.
    Args: S (..., H, N, N); r, w, k, v, alpha, beta (..., T, H, N). Returns S_T, y (..., T, H, N).
    """
    y = np.empty_like(r)
    for t in range(r.shape[-3]):
        S, y[..., t, :, :] = step(S, *(u[..., t, :, :] for u in (r, w, k, v, alpha, beta)))
    return S, y


# e^{-g} over a chunk reaches e^{0.6065 * chunk_len}; float32 overflows past e^{88.7}.
MAX_CHUNK_LEN = 144


def wkv_chunked(S, r, w, k, v, alpha, beta, chunk_len=16):
    """The same function as `wkv_seq`, a chunk of tokens at a time with matrix products (the
    parallel form, docs/architecture.md §6): only the state at each chunk's end is formed."""
    if not 1 <= chunk_len <= MAX_CHUNK_LEN:
        raise ValueError(f"chunk_len must be 1..{MAX_CHUNK_LEN}, got {chunk_len}: longer chunks "
                         "overflow float32 in the factored decays (see wkv_chunk)")
    y = np.empty_like(r)                                                  # (..., T, H, N)
    for start in range(0, r.shape[-3], chunk_len):
        c = (..., slice(start, start + chunk_len), slice(None), slice(None))
        S, y[c] = wkv_chunk(S, r[c], w[c], k[c], v[c], alpha[c], beta[c])
    return S, y


def wkv_chunk(S, r, w, k, v, alpha, beta, acts=None):
    """One chunk of T tokens of the WKV recurrence in closed form (the WY / DPLR formulation).

    Per head the transition is diag(w_t) + alpha_t beta_t^T. Let z_t = S_{t-1} alpha_t and
    g_t = sum_{tau <= t} log w_tau (cumulative log decay per key channel). Unrolling gives
        S_t = S_0 diag(e^{g_t}) + sum_{s <= t} (v_s k_s^T + z_s beta_s^T) diag(e^{g_t - g_s}),
    so z_t, y_t = S_t r_t and S_T are sums over earlier tokens weighted by e^{g_t - g_s} =
    e^{g_t} e^{-g_s}: matrix products, with the z_t tied by one unit lower-triangular system.
    Safe in float32 because log w >= -0.6065 per token: e^{-g} <= e^{9.7} over 16 tokens, and
    chunks past MAX_CHUNK_LEN would overflow (§6.4). Chapter 03 derives this step by step.
    Args: S (..., H, N, N); r, w, k, v, alpha, beta (..., T, H, N). Returns S_T, y (..., T, H, N).
    `acts`, if a dict, receives the intermediates (in the (..., H, T, N) layout) that the training
    backward in chunked form needs (tinyrwkv/train.py, docs/architecture.md §6.6). Only np.*
    functions of the arrays given are used, so CuPy arrays stay on the GPU.
    """
    mT = lambda u: np.swapaxes(u, -1, -2)
    r, w, k, v, alpha, beta = (np.swapaxes(u, -3, -2) for u in (r, w, k, v, alpha, beta))  # (..., H, T, N)
    log_w = np.log(w)
    g = np.cumsum(log_w, axis=-2)                                         # g_t
    a_out, r_out = alpha * np.exp(g - log_w), r * np.exp(g)               # decayed from the start
    k_in, b_in = k * np.exp(-g), beta * np.exp(-g)                        # brought back to it
    A_ak, A_ab = np.tril(a_out @ mT(k_in), -1), np.tril(a_out @ mT(b_in), -1)   # s < t
    A_rk, A_rb = np.tril(r_out @ mT(k_in)), np.tril(r_out @ mT(b_in))           # s <= t
    S0_t = mT(S)                                                          # (..., H, key, value)
    # z_t = (alpha_t e^{g_{t-1}}) S_0^T + sum_{s<t} A_ak[t,s] v_s + A_ab[t,s] z_s, all t at once:
    M = np.tril(np.triu(np.ones_like(A_ab))) - A_ab     # I - A_ab (I made from an array: CuPy stays CuPy)
    z = np.linalg.solve(M, a_out @ S0_t + A_ak @ v)
    y = r_out @ S0_t + A_rk @ v + A_rb @ z                                # y_t = S_t r_t
    to_end = np.exp(g[..., -1:, :] - g)                                   # e^{g_T - g_s} <= 1
    S = S * np.exp(g[..., -1, :])[..., None, :] + mT(v) @ (k * to_end) + mT(z) @ (beta * to_end)
    if acts is not None:
        acts.update(log_w=log_w, g=g, a_out=a_out, r_out=r_out, k_in=k_in, b_in=b_in, A_ak=A_ak,
                    A_ab=A_ab, A_rk=A_rk, A_rb=A_rb, M=M, z=z, to_end=to_end)
    return S, np.swapaxes(y, -3, -2)


@dataclass(frozen=True)
class Steps:
    """The steps by name. The forward pass calls each one through this table, so a copy with one
    replaced, `replace(STEPS, decay=my_decay)`, is the model with one thing changed (the oracle's
    planted bugs); `wkv` is the sequence operator (recurrent, chunked, or a backend's kernel)."""
    layer_norm: Callable = layer_norm
    group_norm: Callable = group_norm
    lerp: Callable = lerp
    decay: Callable = decay
    learning_rate: Callable = learning_rate
    removal_key: Callable = removal_key
    replacement_key: Callable = replacement_key
    value_residual: Callable = value_residual
    wkv_step: Callable = wkv_step
    wkv: Callable = wkv_seq
    bonus: Callable = bonus
    output_gate: Callable = output_gate
    squared_relu: Callable = squared_relu
    matmul: Callable = np.matmul   # every weight product: the oracle emulates a precision here


STEPS = Steps()


# ----------------------------------------------------------------------------------------------
# 4. Time mix and channel mix (docs/architecture.md §3, §4)
# ----------------------------------------------------------------------------------------------

def time_mix_inputs(x, x_prev, v_first, p, layer_id, n_head, steps=STEPS, acts=None):
    """Everything of the time mix that is position-wise (docs/architecture.md §3.1-3.10).

    Args:
        x, x_prev: (..., C) LN1 output of the token(s) and of the token(s) before them
        v_first:   (..., C) layer 0's value for the same token(s); ignored in layer 0
        p:         this layer's weights, keyed by checkpoint name without 'blocks.{i}.'
    Returns: r, w, k_tilde, v (after the value residual), kk, a, g, v_first: each (..., C)
    """
    xr, xw, xk, xv, xa, xg = (steps.lerp(x, x_prev, p[f"att.x_{c}"]) for c in "rwkvag")
    mm = steps.matmul
    r = mm(xr, p["att.receptance.weight"].T)                           # (..., C)
    k = mm(xk, p["att.key.weight"].T)
    v = mm(xv, p["att.value.weight"].T)
    w_lora = np.tanh(mm(xw, p["att.w1"]))                              # (..., Dw)
    w_pre = p["att.w0"] + mm(w_lora, p["att.w2"])                      # (..., C)
    w = steps.decay(w_pre)
    a_lora = mm(xa, p["att.a1"])                                       # (..., Da)
    a = steps.learning_rate(p["att.a0"] + mm(a_lora, p["att.a2"]))
    g_lora = sigmoid(mm(xg, p["att.g1"]))                              # (..., Dg)
    g = mm(g_lora, p["att.g2"])                                        # sigmoid between g1 and g2
    kk = steps.removal_key(k, p["att.k_k"], n_head)                    # uses k before k_tilde
    k_tilde = steps.replacement_key(k, a, p["att.k_a"])
    v_lora = v_gate = None
    if layer_id == 0:
        v_first, v_res = v, v
    else:
        v_lora = mm(xv, p["att.v1"])                                   # (..., Dv)
        v_gate = sigmoid(p["att.v0"] + mm(v_lora, p["att.v2"]))
        v_res = steps.value_residual(v, v_first, v_gate)
    if acts is not None:
        acts.update(xr=xr, xw=xw, xk=xk, xv=xv, xa=xa, xg=xg, r=r, k=k, v=v, w_lora=w_lora,
                    w_pre=w_pre, w=w, a_lora=a_lora, a=a, g_lora=g_lora, g=g, kk=kk,
                    k_tilde=k_tilde, v_lora=v_lora, v_gate=v_gate, v_res=v_res)
    return r, w, k_tilde, v_res, kk, a, g, v_first


def time_mix_output(y, r, k, v, g, p, n_head, steps=STEPS, acts=None):
    """Group norm, bonus, gate and output projection (§3.13-3.15). y, r, k (k_tilde), v (after
    the value residual), g: (..., C). Returns (..., C)."""
    gn = steps.group_norm(y, p["att.ln_x.weight"], p["att.ln_x.bias"], n_head)
    b = steps.bonus(r, k, v, p["att.r_k"], n_head)
    out = steps.matmul(steps.output_gate(gn + b, g), p["att.output.weight"].T)
    if acts is not None:
        acts.update(y=y, gn=gn, bonus=b, att=out)
    return out


def time_mix(x, x_prev, S, v_first, p, layer_id, n_head, steps=STEPS, acts=None):
    """The time mix over T tokens. x, v_first: (..., T, C); x_prev: (..., C), the LN1 output of
    the token before the first; S: (..., H, N, N). Returns out (..., T, C), S_T, v_first."""
    x_shift = token_shift(x, x_prev)
    r, w, k, v, kk, a, g, v_first = time_mix_inputs(x, x_shift, v_first, p, layer_id, n_head,
                                                    steps, acts)
    split = lambda u: heads(u, n_head)                                 # (..., T, C) -> (..., T, H, N)
    S, y = steps.wkv(S, split(r), split(w), split(k), split(v), split(-kk), split(kk * a))
    out = time_mix_output(y.reshape(x.shape), r, k, v, g, p, n_head, steps, acts)
    if acts is not None:
        acts["x_shift"] = x_shift
    return out, S, v_first


def channel_mix(x, x_prev, p, s_emb=None, steps=STEPS, acts=None):
    """A two-layer MLP with squared ReLU, fed a lerp of this token and the previous one (§4.1).
    x, x_prev: (..., C) LN2 output of the token(s) and of the ones before; s_emb: (..., D*D)
    DeepEmbed rows of the token(s) (§4.2), None for plain x070. Returns (..., C)."""
    xk = steps.lerp(x, x_prev, p["ffn.x_k"])                           # (..., C)
    u = steps.matmul(xk, p["ffn.key.weight"].T)                        # (..., F)
    h = steps.squared_relu(u)
    if s_emb is not None:
        # DeepEmbed: each token brings its own D x D matrix M; the gate is (x s1) M s2 + s0.
        D = p["ffn.s1"].shape[1]
        m = (x @ p["ffn.s1"])[..., None, :]                            # (..., 1, D): from x, not xk
        M = s_emb.reshape(*s_emb.shape[:-1], D, D)                     # (..., D, D)
        h = h * ((m @ M)[..., 0, :] @ p["ffn.s2"] + p["ffn.s0"])       # (..., F)
    out = steps.matmul(h, p["ffn.value.weight"].T)                     # (..., C)
    if acts is not None:
        acts.update(ffn_x_prev=x_prev, ffn_xk=xk, ffn_key=u, ffn_hidden=h, ffn=out)
    return out


def deep_embed_rows(p, token_ids, x0):
    """DeepEmbed rows of the tokens: s_emb[token] + x0 @ s_emb_x^T, x0 = LN0(emb[token]) (§4.2).
    The official loader adds the second term to the whole table once; we add it per token."""
    return p["ffn.s_emb.weight"][token_ids] + x0 @ p["ffn.s_emb_x.weight"].T


# ----------------------------------------------------------------------------------------------
# 5. Block, state and model
# ----------------------------------------------------------------------------------------------

def block(x, v_first, state, layer_id, p, n_head, s_emb=None, steps=STEPS, acts=None):
    """One layer over T tokens: pre-norm residual time mix, then channel mix (§2.2). x, v_first:
    (..., T, C). Updates layer `layer_id` of `state` in place (its arrays may carry the same
    leading axes as x). Returns x, v_first."""
    xa = steps.layer_norm(x, p["ln1.weight"], p["ln1.bias"])          # (..., T, C)
    dx, state.wkv[layer_id], v_first = time_mix(
        xa, state.att_shift[layer_id], state.wkv[layer_id], v_first, p, layer_id, n_head,
        steps, acts)
    x = x + dx
    xf = steps.layer_norm(x, p["ln2.weight"], p["ln2.bias"])          # (..., T, C)
    x = x + channel_mix(xf, token_shift(xf, state.ffn_shift[layer_id]), p, s_emb, steps, acts)
    state.att_shift[layer_id], state.ffn_shift[layer_id] = xa[..., -1, :], xf[..., -1, :]
    if acts is not None:
        acts.update(ln1=xa, ln2=xf, block=x)
    return x, v_first


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
        """weights: dict checkpoint key -> array (stored or squeezed shapes)."""
        V, C = weights["emb.weight"].shape
        H, N = weights["blocks.0.att.r_k"].shape[-2:]                   # stored (H, N)
        L = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("blocks."))
        deep = "blocks.0.ffn.s1" in weights
        shape = lambda key, axis: weights[key].shape[axis]
        if H * N != C:
            raise ValueError(f"heads x head size = {H} x {N} != n_embd {C}")
        return cls(n_layer=L, n_embd=C, n_head=H, head_size=N, vocab_size=V,
                   dim_ffn=shape("blocks.0.ffn.key.weight", 0),
                   d_decay=shape("blocks.0.att.w1", 1), d_aaa=shape("blocks.0.att.a1", 1),
                   d_mv=shape("blocks.1.att.v1", 1) if L > 1 else 0,  # layer 0's v1 is unused
                   d_gate=shape("blocks.0.att.g1", 1),
                   variant="x070-deepembed" if deep else "x070",
                   d_deepembed=shape("blocks.0.ffn.s1", 1) if deep else 0)


@dataclass
class State:
    """The recurrent state: everything the model remembers about the tokens it has read.

    Per layer, three tensors (the official package's state[3i+0], [3i+1], [3i+2]):
        att_shift (L, C)        the LN1 output of the last token (time-mix token shift)
        wkv       (L, H, N, N)  the WKV state, [head][value i][key j] (fla stores the transpose)
        ffn_shift (L, C)        the LN2 output of the last token (channel-mix token shift)
    Its size does not grow with the context: L * C * (N + 2) numbers (docs/architecture.md §5).
    Files: tinyrwkv.save_state / tinyrwkv.load_state (tinyrwkv/formats/state_file.py; model.py
    imports NumPy only).
    """
    att_shift: np.ndarray
    wkv: np.ndarray
    ffn_shift: np.ndarray

    @classmethod
    def zeros(cls, config, dtype=np.float32, batch=()):
        """The zero state; batch=(B,) gives B states at once, (L, B, ...)."""
        L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
        z = lambda *shape: np.zeros((L, *batch, *shape), dtype)
        return cls(z(C), z(H, N, N), z(C))

    def copy(self):
        return State(self.att_shift.copy(), self.wkv.copy(), self.ffn_shift.copy())

    def __repr__(self):
        """<State L6 H4x64 float32 393.2 kB, zeros>: the facts, not the numbers."""
        batch = "".join(f" x{b}" for b in self.wkv.shape[1:-3])      # State.zeros(batch=(B,))
        return f"<State{batch} {_describe_state(self.wkv, self.nbytes, self.is_zero())}>"

    def is_zero(self):
        """True when nothing has been read into this state (every number is 0)."""
        return not any(bool(a.any()) for a in (self.att_shift, self.wkv, self.ffn_shift))

    @property
    def nbytes(self):
        """Memory the state takes, whatever the length of the text it has read."""
        return self.att_shift.nbytes + self.wkv.nbytes + self.ffn_shift.nbytes

    def wkv_key_value(self):
        """The WKV state transposed to [layer][head][key][value], the layout fla kernels use."""
        return self.wkv.swapaxes(-1, -2)

    def to_host(self):
        """This state with NumPy arrays (a GPU backend's state holds arrays with `.get()`)."""
        host = lambda a: a if isinstance(a, np.ndarray) else a.get()
        return State(host(self.att_shift), host(self.wkv), host(self.ffn_shift))

    def check_fits(self, config, where=""):
        """Raise ValueError unless every tensor has the shape `config`'s model needs and holds
        real numbers (a complex state would lose its imaginary part in the cast to the model's
        dtype, silently)."""
        want = State.zeros(config)
        for name in ("att_shift", "wkv", "ffn_shift"):
            got, need = getattr(self, name).shape, getattr(want, name).shape
            if got != need:
                raise ValueError(f"{where}{name} has shape {got}, this model needs {need}")
            if np.iscomplexobj(getattr(self, name)):
                raise ValueError(f"{where}{name} is complex ({getattr(self, name).dtype}); a "
                                 "state holds real numbers: pass a real state")


def _describe_state(wkv, nbytes, zero):
    """'L6 H4x64 float32 393.2 kB[, zeros]' for a (L, ..., H, N, N) WKV state."""
    L, H, N = wkv.shape[0], wkv.shape[-3], wkv.shape[-1]
    tail = "" if zero is None else ", zeros" if zero else ", not zeros"
    return f"L{L} H{H}x{N} {np.dtype(wkv.dtype).name} {human_bytes(nbytes)}{tail}"


def human_bytes(n):
    """1234567 -> '1.2 MB' (decimal units)."""
    for unit, size in (("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= size:
            return f"{n / size:.1f} {unit}"
    return f"{int(n)} B"


def human_count(n):
    """7318016 -> '7.3M', 191e6 -> '191.0M', 1.5e9 -> '1.50B'."""
    if n >= 1e9:
        return f"{n / 1e9:.2f}B"
    return f"{n / 1e6:.1f}M" if n >= 1e5 else f"{n / 1e3:.1f}k"


@dataclass
class BatchState:
    """The states of B sequences side by side, for decoding them together (`RWKV7.forward_batch`).

        att_shift (B, L, C)   wkv (B, L, H, N, N)   ffn_shift (B, L, C)

    Sequence-major: sequence b's state is one contiguous block, so `batch[b]` is its State as a
    view (nothing is copied to hand it out or to write it back) and a batched kernel walks the
    sequences with one stride. (`State.zeros(config, batch=(B,))` is layer-major, (L, B, ...):
    the layout of the sequence form and the trainer, where a layer of the whole batch is one
    array operation.) Made by `RWKV7.batch_state(states)`; `split()` gives B States back.
    """
    att_shift: np.ndarray
    wkv: np.ndarray
    ffn_shift: np.ndarray

    @classmethod
    def zeros(cls, config, n_seq, dtype=np.float32):
        L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
        return cls(np.zeros((n_seq, L, C), dtype), np.zeros((n_seq, L, H, N, N), dtype),
                   np.zeros((n_seq, L, C), dtype))

    def __len__(self):
        return self.wkv.shape[0]

    def __repr__(self):
        """<BatchState B3 L6 H4x64 float32 1.2 MB, 1 of 3 zeros>"""
        zeros = sum(self[b].is_zero() for b in range(len(self)))
        return (f"<BatchState B{len(self)} {_describe_state(self.wkv[0] if len(self) else self.wkv, self.nbytes, None)}"
                f", {zeros} of {len(self)} zeros>")

    def __getitem__(self, b):
        """Sequence b's State: a view, so changing it changes the batch."""
        return State(self.att_shift[b], self.wkv[b], self.ffn_shift[b])

    def __setitem__(self, b, state):
        """Copy `state` (a State of the model's shapes; a GPU state is brought to the host) into
        sequence b's place, cast to the batch's dtype."""
        host = state.to_host()
        self.att_shift[b], self.wkv[b], self.ffn_shift[b] = host.att_shift, host.wkv, host.ffn_shift

    def split(self):
        """The B States, copied out of the batch (they outlive it and do not share its memory)."""
        return [self[b].copy() for b in range(len(self))]

    def take(self, rows):
        """A new BatchState of the sequences `rows` (indices, in that order), copied: how a
        sequence that has finished leaves the batch."""
        rows = np.asarray(rows, dtype=np.int64)
        return BatchState(self.att_shift[rows], self.wkv[rows], self.ffn_shift[rows])

    @property
    def nbytes(self):
        return self.att_shift.nbytes + self.wkv.nbytes + self.ffn_shift.nbytes

    def check_fits(self, config):
        """Raise ValueError unless the three arrays hold the same number of sequences, each
        with the shapes of `config`'s State."""
        n_seq, want = len(self), State.zeros(config)
        for name in ("att_shift", "wkv", "ffn_shift"):
            got, need = getattr(self, name).shape, (n_seq, *getattr(want, name).shape)
            if got != need:
                raise ValueError(f"BatchState.{name} has shape {got}; {n_seq} sequences of this "
                                 f"model need {need} (make it with model.batch_state(states))")


class RWKV7:
    """An RWKV-7 model: its weights, its config, and the two forward forms.

    `weights`: dict checkpoint key -> array, as `tinyrwkv.read_checkpoint` returns it. Preparing
    them only squeezes (1, 1, C) vectors to (C,), casts to `dtype` and groups keys per layer.
    `steps`: the table of steps (default STEPS); `wkv_method`: how the sequence form runs the
    WKV operator, "recurrent", "chunked" or "auto" (chunked from CHUNKED_FROM tokens on).
    """

    # From this many tokens on the chunked WKV is faster in NumPy (2 cores: 1.2-1.6x at 3 tokens,
    # 2-2.5x from 8 on; chapter 03 re-measures it).
    CHUNKED_FROM = 4
    backend = "numpy"
    storage = "float32"   # how the big matrices are kept; the NumPy reference keeps `dtype`
    tokenizer = None      # set by tinyrwkv.load: what text prompts are encoded with
    tokenizer_error = None
    path = None

    def __init__(self, weights, dtype="float32", name=None, wkv_method="auto", steps=STEPS):
        if wkv_method not in ("auto", "recurrent", "chunked"):
            raise ValueError(f"wkv_method must be 'auto', 'recurrent' or 'chunked', "
                             f"not {wkv_method!r}")
        self.wkv_method, self.steps, self.name = wkv_method, steps, name
        self.dtype = np.dtype(dtype)
        if self.dtype not in (np.float32, np.float64):
            raise ValueError(f"dtype must be float32 or float64, not {self.dtype}")
        self.config = Config.from_weights(weights)
        H, N = self.config.n_head, self.config.head_size
        get = lambda key: self.prepare_weight(key, weights[key])
        self.emb, self.head = get("emb.weight"), get("head.weight")        # (V, C) each
        self.ln0 = (get("blocks.0.ln0.weight"), get("blocks.0.ln0.bias"))
        self.ln_out = (get("ln_out.weight"), get("ln_out.bias"))
        self.blocks = []
        for i in range(self.config.n_layer):
            prefix = f"blocks.{i}."
            unused = ("ln0.", "att.v0", "att.v1", "att.v2") if i == 0 else ("ln0.",)
            p = {key[len(prefix):]: get(key) for key in weights
                 if key.startswith(prefix) and not key[len(prefix):].startswith(unused)}
            for key, a in p.items():      # (1, 1, C) -> (C,); r_k (H, N) however it was stored
                if key == "att.r_k":
                    p[key] = a.reshape(H, N)
                elif a.ndim == 3 or key == "ffn.s0":
                    p[key] = a.reshape(-1)
            self.blocks.append(p)

    def prepare_weight(self, key, array):
        """One tensor as the forward pass uses it, cast to the model's dtype (no copy when it
        already is: a float32 file stays memory-mapped). Backends override this (and may be
        given other array-likes: the numba backend takes int8 tensors as Q8_0 blocks)."""
        return np.asarray(array).astype(self.dtype, copy=False)

    def stored_tensors(self):
        """{checkpoint key: NumPy array}: the numbers this model computes with, as floats (the
        backend contract: tinyrwkv/backends/__init__.py). The oracle traces through these."""
        out = {"emb.weight": self.emb, "head.weight": self.head,
               "blocks.0.ln0.weight": self.ln0[0], "blocks.0.ln0.bias": self.ln0[1],
               "ln_out.weight": self.ln_out[0], "ln_out.bias": self.ln_out[1]}
        for i, p in enumerate(self.blocks):
            out.update({f"blocks.{i}.{key}": a for key, a in p.items()})
        return out

    # ---- the two forms ----

    def __repr__(self):
        """<RWKV7 'model.safetensors' L6 C256 H4 V4096 7.3M params, numba float32>"""
        c = self.config
        name = f" {self.name!r}" if self.name else ""
        storage = self.dtype.name if self.backend == "numpy" else self.storage
        return (f"<RWKV7{name} L{c.n_layer} C{c.n_embd} H{c.n_head} V{c.vocab_size} "
                f"{human_count(self.n_params)} params, {self.backend.split('-')[0]} {storage}>")

    def check_ids(self, ids):
        if isinstance(ids, str) or (isinstance(ids, (list, tuple)) and ids
                                    and isinstance(ids[0], str)):
            raise ValueError("this takes token ids, not text: encode it first "
                             "(model.tokenizer.encode(text)); model.embed and tinyrwkv.generate "
                             "take text as well")
        ids = np.asarray(ids)
        ids = ids[None] if ids.ndim == 0 else ids
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

    def check_state(self, state):
        """A copy of `state` in the model's dtype (the caller's is never modified), or zeros."""
        if state is None:
            return State.zeros(self.config, self.dtype)
        state.check_fits(self.config, where="state.")
        host = state.to_host()
        return State(*(np.array(getattr(host, n), dtype=self.dtype)
                       for n in ("att_shift", "wkv", "ffn_shift")))

    def forward_seq(self, ids, state, steps=None, acts=None):
        """Sequence form: T tokens at once. Returns the hidden vectors (T, C) before ln_out and the
        new state (`state` is updated in place; `forward` hands it a copy). `acts`, if given, is
        filled with ln0 and a dict of named intermediates per layer."""
        steps = steps or self.steps
        chunked = self.wkv_method == "chunked" or (
            self.wkv_method == "auto" and len(ids) >= self.CHUNKED_FROM)
        if chunked and steps.wkv is wkv_seq:
            steps = replace(steps, wkv=wkv_chunked)
        x0 = steps.layer_norm(self.emb[ids], *self.ln0)                  # (T, C)
        x, v_first = x0, None
        for i, p in enumerate(self.blocks):
            s_emb = deep_embed_rows(p, ids, x0) if "ffn.s1" in p else None   # (T, D*D)
            layer_acts = None if acts is None else acts.setdefault(f"L{i}", {})
            x, v_first = block(x, v_first, state, i, p, self.config.n_head, s_emb, steps, layer_acts)
        if acts is not None:
            acts["ln0"] = x0
        return x, state

    def forward_one(self, token, state):
        """Recurrent form: one token, the paper's recurrence. Returns the hidden vector (C,) before
        ln_out and the new state (updated in place)."""
        x, state = self.forward_seq(np.array([token]), state)
        return x[0], state

    def hidden(self, ids, state=None, mode="sequence"):
        """The normalised final hidden vectors ln_out(x), (T, C), and the new state."""
        ids, state = self.check_ids(ids), self.check_state(state)
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
            full_output: logits for every position (T, V) instead of the last (V,)
            mode: "sequence" (default, faster) or "recurrent" (one token at a time)
        Returns: logits (V,) or (T, V) in the model's dtype, the new State
        """
        h, state = self.hidden(ids, state, mode)
        return self.logits(h if full_output else h[-1]), state

    def logits(self, h):
        """The LM head: (..., C) normalised hidden vectors -> (..., V) logits."""
        return h @ self.head.T

    # ---- several sequences, one token each ----

    def batch_state(self, states):
        """B states (each a State as `forward` takes it, or None for the zero state) as one
        BatchState in the model's dtype. A copy: the given states are not modified."""
        states = list(states)
        if not states:
            raise ValueError("a batch needs at least one state (None for a zero state)")
        batch = BatchState.zeros(self.config, len(states), self.dtype)
        for b, state in enumerate(states):
            if state is not None:
                state.check_fits(self.config, where=f"states[{b}].")
                batch[b] = state
        return batch

    def check_batch(self, tokens, states):
        """The B next tokens as an int64 array (checked as check_ids does), one per state."""
        tokens = self.check_ids(tokens)
        if len(tokens) != len(states):
            raise ValueError(f"forward_batch got {len(tokens)} tokens for {len(states)} states: "
                             "give one next token per sequence")
        return tokens

    def forward_batch(self, tokens, states):
        """One token for each of B sequences: their logits (B, V) and their states moved on.

        Args:
            tokens: B token ids, the next token of each sequence
            states: either a list of B States (None: the zero state), each as `forward` takes
                it: they are not modified and the new States are returned, as `forward` returns
                its state; or a BatchState (`batch_state`): moved on in place and returned,
                with no copy of the states (the form to keep across the steps of a generation)
        Returns: logits (B, V) in the model's dtype, and the states in the form they were given.

        Here it is the plain composition, each sequence through `forward` in turn, so the math
        stays written once. A backend may run the whole batch in one pass (RWKV7Numba reads each
        weight once per step for all B sequences); its result must be this loop's. Sequences of
        different lengths are prefilled one by one (`forward` on each prompt), then decoded
        together with this.
        """
        tokens = self.check_batch(tokens, states)
        if isinstance(states, BatchState):
            rows = []
            for b, token in enumerate(tokens):
                logits, states[b] = self.forward([token], states[b])   # states[b]: a view
                rows.append(logits)
            return np.stack(rows), states
        results = [self.forward([token], state) for token, state in zip(tokens, states)]
        return np.stack([logits for logits, _ in results]), [state for _, state in results]

    def embed(self, prompt, state=None, pool="last", normalize=True, tokenizer=None):
        """A sentence embedding: the final hidden vector (after ln_out) of the last token
        (pool="last", the one the head reads) or the mean over tokens (pool="mean"), unit length
        with normalize=True. (C,) in the model's dtype; quality depends on the model.

        prompt: token ids, or text (encoded with `tokenizer`, default `model.tokenizer`), or a
        list of those: then a (B, C) array, row i the embedding of prompt i (each read on its
        own: prompts differ in length, and an embedding is a prefill, no decode to batch)."""
        if pool not in ("last", "mean"):
            raise ValueError(f"pool must be 'last' or 'mean', not {pool!r}")
        if isinstance(prompt, (list, tuple)) and prompt and all(
                isinstance(p, (str, list, tuple, np.ndarray)) for p in prompt):   # several
            return np.stack([self.embed(p, state, pool, normalize, tokenizer) for p in prompt])
        if isinstance(prompt, str):
            tokenizer = tokenizer or self.tokenizer
            if tokenizer is None:
                raise ValueError("cannot embed text: this model has no tokenizer; pass tokenizer= "
                                 "(anything with .encode(text)), load the model with "
                                 "tinyrwkv.load, or give token ids")
            prompt = tokenizer.encode(prompt)
        h, _ = self.hidden(prompt, state)                     # (T, C)
        e = h[-1] if pool == "last" else h.mean(axis=0)
        return e / np.linalg.norm(e) if normalize else e

    def zero_state(self):
        return State.zeros(self.config, self.dtype)

    @property
    def n_params(self):
        """Numbers the forward pass reads (layer 0's unused v0/v1/v2 are not counted)."""
        return sum(int(np.size(a)) for a in self.stored_tensors().values())
