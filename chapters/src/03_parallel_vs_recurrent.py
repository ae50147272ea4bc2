# %% [markdown]
# # 03 · Parallel vs recurrent: the same WKV, two ways
#
# **What you will build.** The WKV operator is the heart of RWKV-7's time mix: a matrix-valued
# state per head that decays, forgets along a removal key and writes a new association at every
# token. Chapter 01 ran it as a recurrence, one token after another. In this chapter you derive,
# step by step, a second form that computes *exactly the same numbers* for a whole chunk of tokens
# at once with matrix-matrix products (the "chunked", "WY" or "DPLR" form). You will build it from
# scratch with pairwise decays, prove it equal to the recurrence by computation, see why the
# library's version may factor those decays and why chunks must then stay short, and measure
# when each form is faster. At the end you know why training uses the parallel form and
# generation the recurrent one.
#
# **Prerequisites.** [00 · Quickstart](00_quickstart.ipynb) and
# [01 · Time mixing](01_time_mixing.ipynb), which introduces `r, w, k, v, kappa_hat, a` and the
# WKV state. Linear algebra used: matrix products, outer products, a triangular solve.
#
# Names (the library's glossary): `T` tokens, `H` heads, `N` head size (64 in released models),
# `S` the WKV state of one layer, `(H, N, N)`, indexed `S[h, i, j]` with `i` the **value** index
# (row) and `j` the **key** index (column), the layout of the official code.

# %%
import time
from dataclasses import replace

import matplotlib.pyplot as plt
import numpy as np

# DECAY_SCALE = e^{-1/2}: w = exp(-e^{-1/2} sigmoid(z)), so log w in (-0.6065, 0) (docs/architecture.md §3.10)
from tinyrwkv.model import DECAY_SCALE, RWKV7, STEPS, wkv_chunked, wkv_seq, wkv_step
from tinyrwkv.synthetic import make_weights

np.set_printoptions(precision=4, suppress=True, linewidth=110)


def rel_err(x, ref):
    """max|x - ref| / std(ref): the scale-aware error used throughout (1e-15 ~ float64 rounding)."""
    return float(np.abs(np.asarray(x, np.float64) - ref).max() / ref.std())


def realistic_wkv_inputs(T, H, N, rng, per_channel_decay=False):
    """Inputs of the WKV operator with the statistics of a real layer, float64, each (T, H, N):
    r, w, k, v, alpha = -kappa_hat, beta = kappa_hat * a (section 1).

    r, k, v: standard normal. kappa_hat: unit length per head (it is L2-normalised in the model).
    a: in (0, 1) (a sigmoid). w = exp(-e^{-1/2} sigmoid(z)) with z ~ U(-8, 3), the range the
    training init spreads the decay bias over (docs/architecture.md §10). per_channel_decay: draw z once per
    channel plus a small per-token jitter, as in a trained model where the bias w0 sets most of a
    channel's decay, so a fast channel is fast at *every* token (the worst case for long chunks).
    """
    r, k, v = rng.standard_normal((3, T, H, N))                          # (T, H, N) each
    kappa_hat = rng.standard_normal((T, H, N))
    kappa_hat /= np.linalg.norm(kappa_hat, axis=-1, keepdims=True)      # unit per head
    a = 1 / (1 + np.exp(-rng.standard_normal((T, H, N))))               # (T, H, N) in (0, 1)
    if per_channel_decay:
        z = rng.uniform(-8, 3, (1, H, N)) + 0.5 * rng.standard_normal((T, H, N))
    else:
        z = rng.uniform(-8, 3, (T, H, N))
    w = np.exp(-DECAY_SCALE / (1 + np.exp(-z)))                         # (T, H, N) in (0.545, 1)
    return r, w, k, v, -kappa_hat, kappa_hat * a


as32 = lambda arrays: [np.asarray(u, np.float32) for u in arrays]

# %% [markdown]
# ## 1. The recurrence, and why it is sequential
#
# Per head, with vectors as columns, the WKV state $S_t \in \mathbb{R}^{N\times N}$ (value × key)
# evolves as
#
# $$S_t = S_{t-1}\left(\operatorname{diag}(w_t) + \alpha_t\beta_t^\top\right) + v_t k_t^\top,
# \qquad y_t = S_t\, r_t,\qquad \alpha_t = -\hat\kappa_t,\quad \beta_t = \hat\kappa_t \odot a_t .$$
#
# Piece by piece: $\operatorname{diag}(w_t)$ decays each key column; $-S_{t-1}\alpha_t =
# S_{t-1}\hat\kappa_t$ is what the state currently returns for the removal key $\hat\kappa_t$, and adding
# $(S_{t-1}\alpha_t)\beta_t^\top$ removes that memory at learning rate $a_t$; then $v_t k_t^\top$
# writes the new key → value association and $r_t$ reads the new state. (This is docs/architecture.md
# §3.11-3.12; the official one-token code is the pip package's `rwkv/model.py`,
# `RWKV_x070_TMix_one`, and its CUDA kernel `wkv7s` in `cuda/rwkv7.cu`.)
#
# **Why it is inherently sequential.** $S_t$ needs $S_{t-1}$, which needs $S_{t-2}$, and so on:
# the $T$ updates form a chain of length $T$. The update is *linear* in $S$, so one could in
# principle multiply the transition matrices $M_t = \operatorname{diag}(w_t) + \alpha_t\beta_t^\top$
# together with a parallel scan, but a product of two $N\times N$ matrices costs $N^3$
# multiply-adds, about $N/5 \approx 13$ times a whole step of the recurrence, and a scan needs
# about $2T$ such products. The chunked form below
# avoids that by never multiplying transition matrices together: it uses their structure
# (diagonal plus rank one).
#
# **Cost per token:** each step passes over the state a handful of times: decay ($N^2$),
# $S\alpha$ ($N^2$), the two rank-one updates ($2N^2$) and $S r$ ($N^2$), so about
# $5\,H N^2$ multiply-adds per token and layer, O($HN^2$) whatever the position. **Memory:** only
# $S$, $H N^2$ numbers, whether the model has read 1 token or a million.
#
# From scratch, one token for all heads (the library's `wkv_step` is the same equation, with the
# same signature: the removal term enters as $\alpha_t$ and $\beta_t$, as in the official kernel):

# %%
def wkv_step_scratch(S, r, w, k, v, alpha, beta):
    """One token of the WKV recurrence. S: (H, N, N) [value, key]; the rest (H, N), with
    alpha = -kappa_hat and beta = kappa_hat * a. Returns the new S (H, N, N) and y (H, N)."""
    z = np.einsum("hij,hj->hi", S, alpha)                                 # (H, N): S_{t-1} alpha_t
    S = S * w[:, None, :] + z[:, :, None] * beta[:, None, :] + v[:, :, None] * k[:, None, :]
    y = np.einsum("hij,hj->hi", S, r)                                     # (H, N): S_t r_t
    return S, y


rng = np.random.default_rng(0)
H, N = 3, 64
x1 = realistic_wkv_inputs(1, H, N, rng)
S0 = 0.3 * rng.standard_normal((H, N, N))                                 # a non-zero state
S1, y1 = wkv_step_scratch(S0, *(u[0] for u in x1))
S1_lib, y1_lib = wkv_step(S0, *(u[0] for u in x1))
print("S", S0.shape, "-> S", S1.shape, "  y", y1.shape)
print(f"one step vs library wkv_step: state {rel_err(S1, S1_lib):.1e}, y {rel_err(y1, y1_lib):.1e}")
assert np.allclose(S1, S1_lib, rtol=0, atol=1e-13) and np.allclose(y1, y1_lib, rtol=0, atol=1e-13)
print(f"cost per token per layer at H=12, N=64: about 5*H*N^2 = {5 * 12 * 64 ** 2:,} multiply-adds;"
      f" state {12 * 64 * 64:,} numbers, independent of T")

# %% [markdown]
# Over a sequence the library's `wkv_seq(S, r, w, k, v, alpha, beta)` is this step in a Python
# loop; inputs are `(T, H, N)`, it returns the final state and `y` of shape `(T, H, N)`. That
# loop is the oracle every faster form must match.
#
# ## 2. The chunked form, derived step by step
#
# (docs/architecture.md §6.) Take a chunk of tokens $t = 1,\dots,T$ that starts from a known state $S_0$.
#
# **Step 1: make the rank-one correction an input.** Define
#
# $$z_t = S_{t-1}\,\alpha_t \quad(\text{an } N\text{-vector in value space; the kernels call it } \texttt{sa}).$$
#
# Then the recurrence reads $S_t = S_{t-1}\operatorname{diag}(w_t) + v_t k_t^\top + z_t\beta_t^\top$:
# a plain diagonal decay driven by *two* rank-one writes, $(v_t, k_t)$ and $(z_t, \beta_t)$. The
# catch is that $z_t$ depends on the state, so we will have to solve for it.
#
# **Step 2: cumulative log decay.** Let $g_t = \sum_{\tau\le t}\log w_\tau$ (a vector over key
# channels, $g_0 = 0$) and $\Lambda_t = \operatorname{diag}(e^{g_t})$. Since $0 < w \le 1$, $g_t$
# only decreases, so $e^{g_t - g_s} \le 1$ whenever $s \le t$: it is the decay accumulated
# between token $s$ and token $t$.
#
# **Lemma.**
# $$S_t = S_0\Lambda_t + \sum_{s\le t}\left(v_s k_s^\top + z_s\beta_s^\top\right)\operatorname{diag}\!\left(e^{g_t-g_s}\right).$$
#
# *Proof by induction.* For $t = 1$ the right side is $S_0\operatorname{diag}(w_1) + v_1k_1^\top +
# z_1\beta_1^\top$ (because $g_1 = \log w_1$ and the exponent for $s = 1$ is $0$), which is the
# recurrence. Suppose it holds for $t$. The recurrence multiplies $S_t$ on the right by
# $\operatorname{diag}(w_{t+1})$: that turns $\Lambda_t$ into $\Lambda_{t+1}$ and every
# $\operatorname{diag}(e^{g_t-g_s})$ into $\operatorname{diag}(e^{g_{t+1}-g_s})$, since
# $g_{t+1} = g_t + \log w_{t+1}$. It then adds $v_{t+1}k_{t+1}^\top + z_{t+1}\beta_{t+1}^\top$, which
# is the new term $s = t+1$ with exponent $g_{t+1}-g_{t+1} = 0$. So it holds for $t+1$. ∎
#
# Check it numerically: run the recurrence, keep every $S_t$ and $z_t$, and compare with the
# lemma's right side for a few $t$. (In code, token $t$ is index `t - 1`.)

# %%
T = 12
x_chunk = realistic_wkv_inputs(T, H, N, rng)
r, w, k, v, alpha, beta = x_chunk                                         # (T, H, N) each

S_all, z_all, S = [], [], S0                                              # by the recurrence
for t in range(T):
    z_all.append(np.einsum("hij,hj->hi", S, alpha[t]))                   # (H, N): S_{t-1} alpha_t
    S, _ = wkv_step_scratch(S, r[t], w[t], k[t], v[t], alpha[t], beta[t])
    S_all.append(S)                                                       # S_t (H, N, N)
z_all = np.stack(z_all)                                                   # (T, H, N)

g = np.cumsum(np.log(w), axis=0)                                          # (T, H, N): g_t


def lemma_state(t):
    """The lemma's right side for token t (1-based), all heads. Returns (H, N, N)."""
    i = t - 1
    S_t = S0 * np.exp(g[i])[:, None, :]                                   # S_0 Lambda_t
    for s in range(t):                                                    # s = 1..t (index 0..i)
        decay = np.exp(g[i] - g[s])[:, None, :]                           # (H, 1, N), <= 1
        S_t = S_t + (v[s][:, :, None] * k[s][:, None, :]
                     + z_all[s][:, :, None] * beta[s][:, None, :]) * decay
    return S_t


for t in (1, 2, 5, T):
    err = rel_err(lemma_state(t), S_all[t - 1])
    print(f"t = {t:2d}: lemma vs recurrence, max|Δ|/std = {err:.1e}")
    assert err < 1e-13

# %% [markdown]
# **Step 3: everything becomes sums over earlier tokens.** Write
# $\langle x, y\rangle_{t', s} = \sum_j x[j]\,y[j]\,e^{g_{t'}[j]-g_s[j]}$, an inner product in which
# each key channel is decayed from token $s$ to token $t'$. Apply the lemma to $S_{t-1}$ and
# multiply by $\alpha_t$, or to $S_t$ and multiply by $r_t$:
#
# $$z_t = S_0\big(\alpha_t\odot e^{g_{t-1}}\big) + \sum_{s<t}\langle\alpha_t,k_s\rangle_{t-1,s}\,v_s
#        + \sum_{s<t}\langle\alpha_t,\beta_s\rangle_{t-1,s}\,z_s ,$$
# $$y_t = S_0\big(r_t\odot e^{g_t}\big) + \sum_{s\le t}\langle r_t,k_s\rangle_{t,s}\,v_s
#        + \sum_{s\le t}\langle r_t,\beta_s\rangle_{t,s}\,z_s .$$
#
# Collect the scalar weights into four $T\times T$ lower-triangular matrices:
#
# | matrix | entry $[t, s]$ | where |
# |---|---|---|
# | $A_{ak}$ | $\langle\alpha_t,k_s\rangle_{t-1,s}$ | $s<t$ (strictly lower) |
# | $A_{ab}$ | $\langle\alpha_t,\beta_s\rangle_{t-1,s}$ | $s<t$ (strictly lower) |
# | $A_{rk}$ | $\langle r_t,k_s\rangle_{t,s}$ | $s\le t$ (diagonal included) |
# | $A_{rb}$ | $\langle r_t,\beta_s\rangle_{t,s}$ | $s\le t$ (diagonal included) |
#
# $z_t$ uses $S_{t-1}$, so only tokens before $t$ (strictly lower); $y_t$ reads $S_t$, which already
# contains token $t$'s own writes undecayed (diagonal included).
#
# Built from scratch with the **pairwise** decays $e^{g_{t'} - g_s}$ formed explicitly: every one
# is $\le 1$, so nothing can overflow. Entries outside the triangle get exponent $-\infty$, i.e.
# weight $0$. Arrays are head-first, `(H, T, N)`, so each head's matrices are one batch entry.

# %%
def pairwise_decayed_products(x, y, g_x, g_y, include_diagonal):
    """M[h, t, s] = sum_j x[h,t,j] y[h,s,j] exp(g_x[h,t,j] - g_y[h,s,j]) for s < t (or s <= t),
    0 elsewhere. x, y, g_x, g_y: (H, T, N). Returns (H, T, T)."""
    T = x.shape[1]
    keep = np.tril(np.ones((T, T), bool), 0 if include_diagonal else -1)          # (T, T)
    exponent = g_x[:, :, None, :] - g_y[:, None, :, :]                            # (H, T, T, N)
    decay = np.exp(np.where(keep[None, :, :, None], exponent, -np.inf))           # <= 1, 0 off
    return (x[:, :, None, :] * y[:, None, :, :] * decay).sum(axis=-1)             # (H, T, T)


head_first = lambda u: u.transpose(1, 0, 2)                               # (T, H, N) -> (H, T, N)
r_h, k_h, v_h, alpha_h, beta_h = map(head_first, (r, k, v, alpha, beta))  # (H, T, N)
g_h = head_first(g)                                                       # (H, T, N): g_t
g_prev_h = g_h - head_first(np.log(w))                                    # (H, T, N): g_{t-1}

A_ak = pairwise_decayed_products(alpha_h, k_h, g_prev_h, g_h, include_diagonal=False)
A_ab = pairwise_decayed_products(alpha_h, beta_h, g_prev_h, g_h, include_diagonal=False)
A_rk = pairwise_decayed_products(r_h, k_h, g_h, g_h, include_diagonal=True)
A_rb = pairwise_decayed_products(r_h, beta_h, g_h, g_h, include_diagonal=True)
print("A_ak, A_ab, A_rk, A_rb:", A_ak.shape, "(H, T, T) each")

fig, axes = plt.subplots(1, 4, figsize=(13, 3.2))
for ax, (name, A) in zip(axes, [("A_ak", A_ak), ("A_ab", A_ab), ("A_rk", A_rk), ("A_rb", A_rb)]):
    lim = np.abs(A[0]).max()
    im = ax.imshow(A[0], cmap="RdBu_r", vmin=-lim, vmax=lim)
    ax.set_title(f"{name}, head 0")
    ax.set_xlabel("earlier token s")
    ax.set_ylabel("token t")
    fig.colorbar(im, ax=ax, fraction=0.046)
fig.suptitle(f"The four weight matrices of one chunk (T = {T}): lower-triangular, "
             "strictly for the z-system")
plt.tight_layout()
plt.show()

# %% [markdown]
# **Step 4: solve for all $z_t$ at once.** With rows $z_t$ stacked into $Z$ ($T\times N$), and
# likewise $V$, and $\tilde A$ with rows $\alpha_t\odot e^{g_{t-1}}$, the $z$ equation is
# $Z = \tilde A S_0^\top + A_{ak}V + A_{ab}Z$, i.e.
#
# $$(I - A_{ab})\,Z = \tilde A S_0^\top + A_{ak} V .$$
#
# $I - A_{ab}$ is *unit lower-triangular* (ones on the diagonal, zeros above), so it is always
# invertible and **forward substitution** solves it: row $t$ needs only the rows before it,
# $z_t = b_t + \sum_{s<t} A_{ab}[t,s]\,z_s$. (Yes, that is a loop over tokens again, but over $T$
# rows of a $T\times N$ system, not over $N\times N$ states; libraries do it with a blocked
# triangular solve or inverse, fla calls the result the "WY" representation.) Implemented by hand
# once, and compared with `np.linalg.solve`, which the rest of the chapter uses:

# %%
def forward_substitution(L, B):
    """Solve (I - L) Z = B for strictly lower-triangular L, batched over heads.
    L: (H, T, T), B: (H, T, N). Returns Z (H, T, N)."""
    Z = np.empty_like(B)
    for t in range(B.shape[1]):
        Z[:, t] = B[:, t] + np.einsum("hs,hsn->hn", L[:, t, :t], Z[:, :t])   # rows s < t are known
    return Z


S0_t = S0.transpose(0, 2, 1)                                              # (H, N key, N value) = S_0^T
alpha_tilde = alpha_h * np.exp(g_prev_h)                                  # (H, T, N), rows a_t e^{g_{t-1}}
rhs = alpha_tilde @ S0_t + A_ak @ v_h                                     # (H, T, N)
Z_loop = forward_substitution(A_ab, rhs)                                  # (H, T, N)
Z_solve = np.linalg.solve(np.eye(T) - A_ab, rhs)                          # (H, T, N)
print("Z", Z_loop.shape)
print(f"forward substitution vs np.linalg.solve: {rel_err(Z_loop, Z_solve):.1e}")
print(f"Z vs the z_t the recurrence produced:      {rel_err(Z_solve, head_first(z_all)):.1e}")
assert rel_err(Z_loop, Z_solve) < 1e-13 and rel_err(Z_solve, head_first(z_all)) < 1e-13

# %% [markdown]
# **Step 5: outputs and end state.** With $\tilde R$ rows $r_t\odot e^{g_t}$:
#
# $$Y = \tilde R S_0^\top + A_{rk}V + A_{rb}Z, \qquad
#   S_T = S_0\Lambda_T + V^\top (K\odot E) + Z^\top (B\odot E),\quad E[s] = e^{g_T - g_s},$$
#
# where $K, B$ stack the $k_s, \beta_s$ as rows (the end state is the lemma at $t = T$ with the sum
# written as two matrix products). Every piece is now a matrix-matrix product; the $N\times N$
# state is touched only at the start and the end of the chunk. Put together, one chunk and then
# the chunk loop that carries $S_T$ into the next chunk:

# %%
def wkv_chunk_pairwise(S0, r, w, k, v, alpha, beta):
    """One chunk of the WKV recurrence in closed form, with explicit pairwise decays.
    S0: (H, N, N) [value, key]; r, w, k, v, alpha, beta: (T, H, N).
    Returns the state after the chunk (H, N, N) and y (T, H, N)."""
    r, w, k, v, alpha, beta = (u.transpose(1, 0, 2) for u in (r, w, k, v, alpha, beta))  # (H, T, N)
    g = np.cumsum(np.log(w), axis=1)                                      # (H, T, N): g_t
    g_prev = g - np.log(w)                                                # (H, T, N): g_{t-1}
    A_ak = pairwise_decayed_products(alpha, k, g_prev, g, include_diagonal=False)   # (H, T, T)
    A_ab = pairwise_decayed_products(alpha, beta, g_prev, g, include_diagonal=False)
    A_rk = pairwise_decayed_products(r, k, g, g, include_diagonal=True)
    A_rb = pairwise_decayed_products(r, beta, g, g, include_diagonal=True)
    S0_t = S0.transpose(0, 2, 1)                                          # (H, N key, N value)
    T = r.shape[1]
    # (I - A_ab) Z = A~ S_0^T + A_ak V; forward substitution gives the same Z (checked above),
    # np.linalg.solve does it in one LAPACK call instead of a Python loop over rows.
    Z = np.linalg.solve(np.eye(T, dtype=r.dtype) - A_ab,
                        (alpha * np.exp(g_prev)) @ S0_t + A_ak @ v)       # (H, T, N)
    y = (r * np.exp(g)) @ S0_t + A_rk @ v + A_rb @ Z                      # (H, T, N)
    E = np.exp(g[:, -1:, :] - g)                                          # (H, T, N): e^{g_T - g_s} <= 1
    S_T = (S0 * np.exp(g[:, -1])[:, None, :]                              # S_0 Lambda_T
           + v.transpose(0, 2, 1) @ (k * E) + Z.transpose(0, 2, 1) @ (beta * E))    # (H, N, N)
    return S_T, y.transpose(1, 0, 2)                                      # (H, N, N), (T, H, N)


def wkv_chunked_pairwise(S, r, w, k, v, alpha, beta, chunk_len=16):
    """The WKV operator over T tokens, chunk by chunk. Same signature as `wkv_seq`.
    S: (H, N, N); r, ..., beta: (T, H, N). Returns the final S (H, N, N) and y (T, H, N)."""
    y = np.empty_like(r)                                                  # (T, H, N)
    for start in range(0, len(r), chunk_len):
        part = slice(start, start + chunk_len)                            # the last may be shorter
        S, y[part] = wkv_chunk_pairwise(S, r[part], w[part], k[part], v[part], alpha[part],
                                        beta[part])
    return S, y


S_ref, y_ref = wkv_seq(S0, *x_chunk)
S_mine, y_mine = wkv_chunk_pairwise(S0, *x_chunk)
print("one chunk: y", y_mine.shape, " S_T", S_mine.shape)
print(f"pairwise chunk vs wkv_seq: y {rel_err(y_mine, y_ref):.1e}, S_T {rel_err(S_mine, S_ref):.1e}")
assert rel_err(y_mine, y_ref) < 1e-13 and rel_err(S_mine, S_ref) < 1e-13

# %% [markdown]
# ### The factored decays the library uses, and why chunks stay short
#
# The pairwise form builds a `(H, T, T, N)` tensor of decays and reduces it, which is wasteful.
# The library's `wkv_chunk` instead uses $e^{g_t-g_s} = e^{g_t}\cdot e^{-g_s}$, so that, e.g.,
#
# $$A_{rk}[t,s] = \sum_j \big(r_t[j]e^{g_t[j]}\big)\big(k_s[j]e^{-g_s[j]}\big)
#   \;\Rightarrow\; A_{rk} = \operatorname{tril}\!\big(\tilde R\,\tilde K^\top\big),$$
#
# one ordinary matrix product per matrix (then the upper triangle is masked). The price: the
# factors are no longer bounded by 1. $e^{-g_s}$ *grows* along the chunk. The decay's soft clamp
# gives $\log w \ge -e^{-1/2} = -0.6065$ per token, so within a chunk of $L$ tokens
# $e^{-g_s} \le e^{0.6065\,L}$: $e^{9.7}\approx 1.6\cdot10^4$ at $L = 16$, harmless; $e^{38.8}$ at
# 64; and float32 overflows above $e^{88.7}$ (3.4e38), i.e. from about $88.7/0.6065 \approx 146$
# tokens at the clamp, while $e^{g_t}$ sinks into float32's subnormals below $e^{-87.3}$. Once an
# $e^{-g_s}$ is `inf` and the matching $e^{g_t}$ is `0`, their product is `nan`.
#
# The experiment: a 256-token sequence in float32, run as chunks of growing length by the
# library's factored `wkv_chunked` and by our pairwise form, each compared with the float64
# recurrence. Decays are drawn per channel (a fast channel is fast at every token, as in a
# trained model), the worst case for the factors.

# %%
T_long, H_long = 256, 2
x_long = realistic_wkv_inputs(T_long, H_long, N, rng, per_channel_decay=True)
S0_long = 0.3 * rng.standard_normal((H_long, N, N))
S_ref_long, y_ref_long = wkv_seq(S0_long, *x_long)                        # float64 oracle
_, y_seq32 = wkv_seq(S0_long.astype(np.float32), *as32(x_long))
print(f"float32 recurrence itself vs float64: {rel_err(y_seq32, y_ref_long):.1e}")

chunk_lens = [16, 32, 64, 128, 144, 160, 256]
worst_neg_g, err_factored, err_pairwise = [], [], []
for L in chunk_lens:
    neg_g = -np.log(x_long[1][:L]).sum(axis=0).min()                      # largest -g_L, first chunk
    with np.errstate(all="ignore"):                                       # overflow is the point here
        try:
            _, y_fac = wkv_chunked(S0_long.astype(np.float32), *as32(x_long), chunk_len=L)
            e_fac = rel_err(y_fac, y_ref_long)
        except ValueError:                      # the library refuses chunks past MAX_CHUNK_LEN,
            e_fac = np.nan                      # exactly where float32 would give inf/nan
    _, y_pair = wkv_chunked_pairwise(S0_long.astype(np.float32), *as32(x_long), chunk_len=L)
    e_pair = rel_err(y_pair, y_ref_long)
    worst_neg_g.append(neg_g)
    err_factored.append(e_fac)
    err_pairwise.append(e_pair)
    status = "" if np.isfinite(e_fac) else "   <- refused by the library (float32 would overflow)"
    print(f"chunk {L:3d}: max -g = {neg_g:6.1f}   float32 max|Δ|/std  factored {e_fac:8.1e}"
          f"   pairwise {e_pair:8.1e}{status}")
assert err_factored[0] < 2e-5 and err_pairwise[-1] < 1e-4   # chunk 16 is safe; pairwise always is

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
ax1.plot(chunk_lens, worst_neg_g, "o-", label="largest $-g_L$ in the first chunk (measured)")
ax1.plot(chunk_lens, [0.6065 * L for L in chunk_lens], "--", label="bound $0.6065\\,L$")
ax1.axhline(np.log(np.finfo(np.float32).max), color="red", label="float32 overflow, ln(3.4e38) = 88.7")
ax1.set_xlabel("chunk length L")
ax1.set_ylabel("exponent of the factor $e^{-g_s}$")
ax1.set_title("How large the factored decays get")
ax1.legend(fontsize=8)
fac = np.array(err_factored)
ok = np.isfinite(fac)
ax2.semilogy(np.array(chunk_lens)[ok], fac[ok], "o-", label="factored $e^{g_t}e^{-g_s}$ (library)")
ax2.semilogy(np.array(chunk_lens)[~ok], np.full((~ok).sum(), 1.0), "rx", ms=10,
             label="factored: refused, past float32's range (plotted at 1)")
ax2.semilogy(chunk_lens, err_pairwise, "s--", label="pairwise $e^{g_t-g_s}$ (ours)")
ax2.axhline(rel_err(y_seq32, y_ref_long), color="gray", ls=":", label="float32 recurrence")
ax2.set_xlabel("chunk length L")
ax2.set_ylabel("max|Δy| / std(y) vs float64 recurrence")
ax2.set_title("float32 error of the chunked forms, T = 256")
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# What the numbers show (they are recomputed on every run):
#
# * While the factors stay in float32's range, the factored form is as accurate as the pairwise
#   one: every product $e^{g_t}e^{-g_s}$ is rounded relative to its own size, just as
#   $e^{g_t-g_s}$ is. Both drift up slowly with the chunk length because $g$ is a float32
#   cumulative sum whose rounding error grows with its magnitude, and the pairwise exponent
#   $g_t - g_s$ inherits it.
# * Past the overflow line the factored form would not degrade gracefully; it would break: `inf`
#   factors, `nan` products, a "singular" triangular system. So the library refuses chunks longer
#   than `MAX_CHUNK_LEN` = 144 tokens with a clear error (those are the points marked above). The
#   pairwise form never breaks.
#
# So the factored form is safe only while $0.6065\,L \ll 88.7$. The library keeps $L = 16$
# (largest factor $e^{9.7}$) by default and docstrings say so; fla, which chunks by 64, adds a lower bound on
# the decay and a "safe gate" for the same reason (docs/architecture.md §11.4). Short chunks are also cheaper:
# the $T\times T$ matrices cost $O(L)$ work per token, measured in section 4.
#
# ## 3. Proof by computation
#
# Our pairwise chunked form and the library's `wkv_chunked` against the recurrence `wkv_seq`, on
# awkward lengths (1 token, one short of a chunk, exactly one, one more, and a prime), from a
# non-zero initial state, with realistic decays ($z\sim U(-8, 3)$). Reference: float64 `wkv_seq`.
# In float32, the float32 recurrence's own error is printed beside, as the yardstick.

# %%
H3 = 3
print(f"{'T':>4} | float64: ours   library | float32: ours   library   recurrence | state (f64, ours)")
for T_test in (1, 15, 16, 17, 97):
    xs = realistic_wkv_inputs(T_test, H3, N, rng)
    S_init = 0.3 * rng.standard_normal((H3, N, N))
    S_ref, y_ref = wkv_seq(S_init, *xs)
    S_a, y_a = wkv_chunked_pairwise(S_init, *xs)
    S_b, y_b = wkv_chunked(S_init, *xs)
    _, y_a32 = wkv_chunked_pairwise(S_init.astype(np.float32), *as32(xs))
    _, y_b32 = wkv_chunked(S_init.astype(np.float32), *as32(xs))
    _, y_s32 = wkv_seq(S_init.astype(np.float32), *as32(xs))
    e64 = [rel_err(y_a, y_ref), rel_err(y_b, y_ref), rel_err(S_a, S_ref), rel_err(S_b, S_ref)]
    e32 = [rel_err(y_a32, y_ref), rel_err(y_b32, y_ref), rel_err(y_s32, y_ref)]
    print(f"{T_test:4d} |      {e64[0]:7.1e}  {e64[1]:7.1e} |      {e32[0]:7.1e}  {e32[1]:7.1e}"
          f"   {e32[2]:7.1e}  | {e64[2]:7.1e}")
    assert max(e64) < 1e-13      # float64: only rounding, ~1e-15
    assert max(e32) < 2e-5       # float32: eps 6e-8 times a few hundred operations per output

# %% [markdown]
# ## 4. Cost: measured
#
# Both forms do work proportional to $T$: the recurrence about $5N^2$ multiply-adds per token and
# head. The chunked form, per chunk of $L$ tokens and head: four $L\times L$ weight matrices
# ($4L^2N$), the triangular solve ($\approx L^3/3 + L^2N$), three more $L\times L$ by $L\times N$
# products ($3L^2N$) and four $L\times N$ by $N\times N$ ones, $\tilde A S_0^\top$,
# $\tilde R S_0^\top$ and the two of the end state ($4LN^2$). Per token that is about
# $4N^2 + 8LN$: 24.6k against the recurrence's 20.5k for $N = 64$, $L = 16$, the same order. The
# difference is *how* the work is done: the recurrence does it as many small matrix-vector and
# elementwise operations on the state, each a separate NumPy call that streams the whole
# $H\times N\times N$ state through memory; the chunked form does it as a few matrix-matrix
# products that BLAS runs at full speed. Let's time both at the size of a real layer
# (H = 12, N = 64, float32), taking the median of several repeats (short calls are batched so
# that each timing lasts at least 2 ms).

# %%
def seconds_per_call(functions, args, repeats=7, min_batch_s=2e-3):
    """Median wall time per call of each f(*args), over `repeats` rounds. Within a round the
    functions take turns, so a burst of load on the machine hits all of them alike; calls shorter
    than `min_batch_s` are repeated in a batch and the batch time divided."""
    batch = []
    for f in functions:
        f(*args)                                                          # warm up
        t0 = time.perf_counter()
        f(*args)
        batch.append(max(1, int(min_batch_s / max(time.perf_counter() - t0, 1e-7))))
    times = np.empty((repeats, len(functions)))
    for i in range(repeats):
        for j, (f, n) in enumerate(zip(functions, batch)):
            t0 = time.perf_counter()
            for _ in range(n):
                f(*args)
            times[i, j] = (time.perf_counter() - t0) / n
    return np.median(times, axis=0)                                       # one per function


H12 = 12
Ts = [1, 2, 3, 4, 5, 6, 8, 12, 16, 24, 32, 48, 64, 96, 128, 192, 256, 384, 512, 768, 1024]
x_big = as32(realistic_wkv_inputs(max(Ts), H12, N, rng))
S_big = np.zeros((H12, N, N), np.float32)
t_seq, t_chunk = [], []
clock = time.perf_counter()
for T_run in Ts:
    args = (S_big, *(u[:T_run] for u in x_big))
    ts, tc = seconds_per_call([wkv_seq, wkv_chunked], args)
    t_seq.append(ts)
    t_chunk.append(tc)
measuring_s = time.perf_counter() - clock
t_seq, t_chunk = np.array(t_seq), np.array(t_chunk)
ratio = t_seq / t_chunk
faster = ratio > 1
# crossover: the first T from which the chunked form is faster at every larger T measured
crossover = next(T_run for i, T_run in enumerate(Ts) if faster[i:].all()) if faster[-1] else None

print(f"measured in {measuring_s:.1f} s (H={H12}, N={N}, float32)")
print(f"{'T':>5} {'wkv_seq ms':>11} {'wkv_chunked ms':>15} {'speed-up':>9}")
for T_run, ts, tc, q in zip(Ts, t_seq, t_chunk, ratio):
    print(f"{T_run:5d} {1e3 * ts:11.3f} {1e3 * tc:15.3f} {q:8.2f}x")
print(f"\nmeasured crossover: chunked is faster from T = {crossover} on;"
      f" the library switches at RWKV7.CHUNKED_FROM = {RWKV7.CHUNKED_FROM}")
print(f"per token at T = {Ts[-1]}: recurrence {1e6 * t_seq[-1] / Ts[-1]:.1f} us,"
      f" chunked {1e6 * t_chunk[-1] / Ts[-1]:.1f} us")

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4))
ax1.loglog(Ts, 1e3 * t_seq, "o-", label="wkv_seq (recurrence)")
ax1.loglog(Ts, 1e3 * t_chunk, "s-", label="wkv_chunked (chunks of 16)")
ax1.loglog(Ts, 3e3 * t_seq[-1] * np.array(Ts) / Ts[-1], ":", color="gray",
           label="slope 1 (time linear in T), for reference")
ax1.set_xlabel("sequence length T (tokens)")
ax1.set_ylabel("time per call (ms)")
ax1.set_title(f"WKV operator, H={H12}, N={N}, float32, NumPy")
ax1.legend()
ax2.semilogx(Ts, ratio, "o-")
ax2.axhline(1, color="gray", ls=":")
if crossover is not None:
    ax2.axvline(crossover, color="green", ls="--", label=f"measured crossover T = {crossover}")
ax2.axvline(RWKV7.CHUNKED_FROM, color="red", ls=":", label=f"RWKV7.CHUNKED_FROM = {RWKV7.CHUNKED_FROM}")
ax2.set_xlabel("sequence length T (tokens)")
ax2.set_ylabel("time(wkv_seq) / time(wkv_chunked)")
ax2.set_title("Speed-up of the chunked form")
ax2.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# How to read the plot:
#
# * **Both lines end parallel to the slope-1 guide**: total time is linear in $T$ for both forms,
#   as the operation counts say. Neither is quadratic; the chunked form's $L^2$ terms are per
#   chunk, with $L$ fixed.
# * **At small $T$ the recurrence wins or ties.** One token is one `wkv_step`; the chunked form
#   pays a fixed set of calls (cumulative sums, exponentials, four masked products, a solve) for
#   even a single token. Around a few tokens the fixed cost is repaid, which is the crossover
#   printed above; `RWKV7.CHUNKED_FROM` is the library's measured choice of that point for a
#   whole model's sequence form (the printout says whether this machine agrees).
# * **Up to 16 tokens the chunked line rises slowly** (one chunk whose matrices grow, the fixed
#   calls unchanged); beyond, each further chunk adds the same cost, and the speed-up settles
#   at a roughly constant factor for long sequences (single points may jump when the machine is
#   busy; the medians damp that but cannot remove it).
#
# Where does the recurrence's time go? Split one step into a fixed per-call cost (Python and
# NumPy call overhead, measured with a tiny state) and the work on the real state:

# %%
def step_time(H_, N_):
    S_ = np.zeros((H_, N_, N_), np.float32)
    vecs = as32(u[0] for u in realistic_wkv_inputs(1, H_, N_, rng))
    return seconds_per_call([wkv_step], (S_, *vecs))[0]


overhead, full_step = step_time(1, 4), step_time(H12, N)
print(f"one wkv_step: tiny state (H=1, N=4) {1e6 * overhead:.1f} us, "
      f"real layer (H={H12}, N={N}) {1e6 * full_step:.1f} us "
      f"-> fixed overhead is {overhead / full_step:.0%} of a step")
print(f"the real step moves 5*H*N^2 = {5 * H12 * N * N:,} multiply-adds: "
      f"{5 * H12 * N * N / full_step / 1e9:.2f} G multiply-adds/s")

# chunk length trade-off for the library's factored form (safe up to ~146, see section 2)
T_cl = 1024
print(f"\nwkv_chunked at T = {T_cl} by chunk length:")
for L in (4, 8, 16, 32, 64, 128):
    t_L = seconds_per_call([lambda *xs: wkv_chunked(*xs, chunk_len=L)], (S_big, *x_big), repeats=3)[0]
    print(f"  chunk {L:3d}: {1e3 * t_L:6.1f} ms")

# %% [markdown]
# Read the split with your numbers. With a tiny state a step costs only its fixed overhead: the
# Python loop iteration and a handful of NumPy calls, each with its own dispatch cost. With a real
# layer's state it costs that plus several passes over $H N^2$ numbers, each a NumPy elementwise
# operation with its own temporary array, running at memory speed rather than arithmetic speed.
# At H = 12, N = 64 the overhead is the minority share printed above (about a tenth when this was
# written): the recurrence is slow here mostly because matrix-vector and elementwise work cannot
# use BLAS's blocked matrix-matrix kernels. For smaller states (few or small heads) the overhead
# share grows until it dominates. The chunked form pays its overhead once per 16 tokens and turns
# the state work into matrix-matrix products.
#
# The chunk-length table shows the other side: very short chunks bring back the per-call
# overhead, long chunks add $O(L)$ work per token in the $L\times L$ matrices (and, for the
# factored form, the overflow of section 2). The library's 16 sits near the bottom of that
# curve (on the machine this chapter was written on, 16 and 32 were the fastest, within the
# noise; your table is printed above), and 16 is also the state-checkpoint interval of RWKV-LM's training kernel and fla's
# default chunk size (docs/architecture.md §11.3-11.4).
#
# ## 5. Training, generation and prefill
#
# The two forms compute the same function, so the choice is purely about speed and memory:
#
# * **Training** sees whole documents: all $T$ tokens are known before the forward pass starts.
#   A chunked form turns the work into matrix-matrix products, which is what GPU matrix units
#   (tensor cores) are built for, and it parallelises over the tokens of a chunk rather than
#   walking them one by one. The backward pass also becomes matrix products through each chunk,
#   and only the states at chunk boundaries ($T/L$ of them, not $T$) must be stored; the inside of
#   a chunk is recomputed from them. This is what fla's `chunk_rwkv7` does. (BlinkDL's own training
#   kernel, RWKV-LM `rwkv7_clampw.cu`, instead runs the recurrence inside one fused CUDA kernel,
#   parallel over batch, heads and state rows, and checkpoints the state every 16 tokens for the
#   backward pass: with the state in fast on-chip memory, the sequential form is fast too. The
#   chunked form is a choice, not a necessity.)
# * **Generation** produces one token at a time: token $t+1$ is sampled from the output at token
#   $t$, so there is nothing to batch over time. The recurrence does O($HN^2$) work per token per
#   layer and keeps a state of fixed size, no matter how long the text. A transformer instead keeps
#   a KV cache that grows with every token and makes each step read all of it.
# * **Prefill** (reading the prompt before generating) knows all prompt tokens at once, so it can
#   use either form: the chunked one is faster for long prompts, and because both end in the same
#   state, generation continues from it with the recurrence. The cell below checks exactly that
#   on a small model, and compares the memory a state needs with a transformer's KV cache.
#
# The model is a small synthetic one from `make_weights` (2 layers, 128 channels, 2 heads of 64,
# 300-token vocabulary), **untrained**: the tokens it produces would be meaningless, but every
# number is computed exactly as for a real model. float64, so agreement is at rounding level.

# %%
weights = make_weights(n_layer=2, n_embd=128, vocab_size=300, seed=0)
model_chunked = RWKV7(weights, dtype="float64", wkv_method="chunked")
model_recurrent = RWKV7(weights, dtype="float64", wkv_method="recurrent")
cfg = model_chunked.config
print(cfg)

ids_rng = np.random.default_rng(1)
prompt = ids_rng.integers(0, cfg.vocab_size, 40)                          # 40 ids: 2.5 chunks
continuation = ids_rng.integers(0, cfg.vocab_size, 5)

# prefill with the chunked form, then generate-style: one token at a time, recurrent form
logits, state = model_chunked.forward(prompt)
stepped = []
for token in continuation:
    logits, state = model_chunked.forward([int(token)], state, mode="recurrent")
    stepped.append(logits)
stepped = np.stack(stepped)                                               # (5, V)
# the same 45 tokens, all through the recurrence
all_recurrent, _ = model_recurrent.forward(np.concatenate([prompt, continuation]),
                                           full_output=True, mode="recurrent")
err = rel_err(stepped, all_recurrent[-len(continuation):])
print(f"chunked prefill + recurrent steps vs all recurrent: max|Δlogit|/std = {err:.1e}")
assert err < 1e-12

L_, C_, N_ = 12, 768, 64                                                  # the 0.1B World model's sizes
state_numbers = L_ * C_ * (N_ + 2)                                        # docs/architecture.md §5
for ctx in (1024, 4096, 16384):
    kv_cache = 2 * L_ * ctx * C_                                          # keys and values, every layer
    print(f"context {ctx:6d}: RWKV-7 state {state_numbers:,} numbers (fixed); a transformer of the "
          f"same width and depth caches {kv_cache:,}")

# %% [markdown]
# ## 6. Summary and final check
#
# * The recurrence $S_t = S_{t-1}(\operatorname{diag}(w_t) + \alpha_t\beta_t^\top) + v_tk_t^\top$ is
#   a chain: O($HN^2$) per token, a fixed-size state, no way to skip ahead without $N^3$ matrix
#   products.
# * Making $z_t = S_{t-1}\alpha_t$ an unknown turns a chunk into a diagonal-decay recurrence with
#   two rank-one inputs. The lemma unrolls it with decays $e^{g_t-g_s}$; four lower-triangular
#   matrices and one unit lower-triangular solve give all $z_t$, all outputs $y_t$ and the end state
#   with matrix-matrix products.
# * Pairwise decays are bounded by 1 and always safe; the library factors them as
#   $e^{g_t}e^{-g_s}$ to get plain matrix products, which is exact in float32 while
#   $0.6065\,L$ stays well below 88.7, so chunks are 16 tokens.
# * Same numbers either way: ~1e-15 in float64, ~1e-6 in float32. The chunked form is faster
#   from a few tokens on (in NumPy here, by the factor measured above); the recurrence is the
#   right form for generation, either form for prefill.
#
# The final asserts: our pairwise chunked WKV equals the library's `wkv_chunked` and `wkv_seq`;
# a whole model gives the same logits and state with `wkv_method="chunked"`, with
# `wkv_method="recurrent"`, with `mode="recurrent"`, and with our own WKV plugged into the model.
# The model calls its WKV operator through its table of steps (`tinyrwkv.model.STEPS`), so
# `replace(STEPS, wkv=wkv_chunked_pairwise)` is the same model with our operator in the place of
# the library's: it only has to have the same signature, `(S, r, w, k, v, alpha, beta) -> (S, y)`.

# %%
xs = realistic_wkv_inputs(97, H3, N, rng)
S_init = 0.3 * rng.standard_normal((H3, N, N))
S_ref, y_ref = wkv_seq(S_init, *xs)
S_mine, y_mine = wkv_chunked_pairwise(S_init, *xs)
S_lib, y_lib = wkv_chunked(S_init, *xs)
print(f"WKV, T=97, float64: ours vs wkv_chunked {rel_err(y_mine, y_lib):.1e}, "
      f"ours vs wkv_seq {rel_err(y_mine, y_ref):.1e}, wkv_chunked vs wkv_seq {rel_err(y_lib, y_ref):.1e}")
assert np.allclose(y_mine, y_lib, rtol=0, atol=1e-12 * y_ref.std())
assert np.allclose(y_mine, y_ref, rtol=0, atol=1e-12 * y_ref.std())
assert np.allclose(S_mine, S_lib, rtol=0, atol=1e-12 * S_ref.std())
assert np.allclose(S_mine, S_ref, rtol=0, atol=1e-12 * S_ref.std())

# a whole model, 40 tokens, from a non-zero state (after reading 7 other tokens)
_, start = model_recurrent.forward(ids_rng.integers(0, cfg.vocab_size, 7))
logits_chunked, state_chunked = model_chunked.forward(prompt, start, full_output=True)
logits_wkv_rec, state_wkv_rec = model_recurrent.forward(prompt, start, full_output=True)
logits_mode_rec, state_mode_rec = model_recurrent.forward(prompt, start, full_output=True,
                                                          mode="recurrent")
# the same weights with our pairwise chunked WKV in the place of the library's operator
model_ours = RWKV7(weights, dtype="float64", steps=replace(STEPS, wkv=wkv_chunked_pairwise))
logits_ours, state_ours = model_ours.forward(prompt, start, full_output=True)
print("logits", logits_chunked.shape)
for name, lg, st in [("wkv_method='recurrent'", logits_wkv_rec, state_wkv_rec),
                     ("mode='recurrent'", logits_mode_rec, state_mode_rec),
                     ("our pairwise WKV", logits_ours, state_ours)]:
    e_logits, e_state = rel_err(lg, logits_chunked), rel_err(st.wkv, state_chunked.wkv)
    print(f"wkv_method='chunked' vs {name:22s}: logits {e_logits:.1e}, WKV state {e_state:.1e}")
    assert e_logits < 1e-12 and e_state < 1e-12
print("All checks passed: the parallel (chunked) and recurrent forms compute the same WKV.")
