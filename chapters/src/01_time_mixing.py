# %% [markdown]
# # 01 · Time mixing: RWKV-7's attention as a state that learns in context
#
# **What you will build.** The time mix is the part of an RWKV-7 layer that looks back along the
# text. A transformer does that by attending to every earlier token. RWKV-7 instead keeps, per head,
# one small matrix $S$ (64 × 64 numbers) and changes it once per token. In this chapter you write
# every step of that, from scratch in NumPy, in the order the official code runs it: the token
# shift and its six mixes; the projections $r, k, v$ and the low-rank paths for $w, a, g$; the decay
# $w$ and why it can never fall below 0.545; the in-context learning rate $a$ and the two keys
# $\hat\kappa$ (which old memory to remove) and $\tilde k$ (where to write); the **generalised
# delta rule** that updates $S$; the read-out, group norm, bonus term and gate; and the value
# residual. Each piece is checked against the library's `tinyrwkv.model.time_mix_inputs`,
# `wkv_step` and `time_mix_output`, and at the end your own one-token time mix is checked against
# the library's `time_mix` on one token, for every layer of a model.
#
# **Prerequisites.** [00 · Quickstart](00_quickstart.ipynb) (what a model, a state and a token are).
# NumPy and a little linear algebra: matrix–vector products and outer products $v k^\top$.
#
# **The model here is untrained.** We build a small synthetic checkpoint with
# `tinyrwkv.synthetic.make_weights`: the RWKV-LM training code's initialisation plus small random
# noise (3 layers, `C = 256` channels, so `H = 4` heads of `N = 64`). It is not a language model,
# so what it "remembers" means nothing; but every number below is computed exactly as for a real
# model, and the trained model arrives later in the book. We work in float64 so that our code and
# the library can be compared to rounding error.
#
# Letters (as in `tinyrwkv/model.py`): `T` tokens, `C` channels, `H` heads, `N` head size
# (`C = H·N`), `L` layers. Vectors are rows. A stored Linear weight `W` has shape `(out, in)` and is
# applied as `x @ W.T`; the low-rank ("LoRA") matrices `w1, w2, ...` are applied as `x @ w1 @ w2`.
# The official code we follow is the pip package `rwkv` 0.8.32, file `rwkv/model.py`, function
# `RWKV_x070_TMix_one` (the same as BlinkDL/RWKV-LM `RWKV-v7/rwkv_v7_demo_rnn.py`).

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

import tinyrwkv
from tinyrwkv.model import (block, layer_norm, time_mix, time_mix_inputs, time_mix_output,
                            token_shift, wkv_step)
from tinyrwkv.synthetic import make_weights

CHAPTER_START = time.perf_counter()
np.set_printoptions(precision=4, suppress=True, linewidth=100)

weights = make_weights(n_layer=3, n_embd=256, vocab_size=1024, seed=0)  # {official key: array}
model = tinyrwkv.RWKV7(weights, dtype="float64")
L, C, H, N = (model.config.n_layer, model.config.n_embd, model.config.n_head,
              model.config.head_size)
print(model.config)

# %% [markdown]
# Real text goes in through the World tokenizer. Our toy model has only 1024 vocabulary rows (it
# keeps the chapter fast), so we take each token id **modulo 1024**; for an untrained model that
# loses nothing.
#
# To study one layer's time mix we need its input: the LN1 output of every token in that layer.
# `layer_inputs` runs the library's blocks (chapter 04 builds them) token by token and records, per
# layer, what the time mix received, plus layer 0's value `v_first` (section 7 needs it).

# %%
tok = tinyrwkv.WorldTokenizer()
sentence = "The quick brown fox jumps over the lazy dog, and then the fox runs back to the forest."
ids = [i % model.config.vocab_size for i in tok.encode(sentence)]
words = [tok.decode([i]) for i in tok.encode(sentence)]
T = len(ids)
print(T, "tokens:", words)


def layer_inputs(ids, state=None):
    """Run the library model token by token; return each layer's time-mix input.

    Returns X (L, T, C): the LN1 output of every token in every layer; v_first (T, C): layer 0's v;
    and the state after the last token.
    """
    state = model.zero_state() if state is None else state
    X = np.zeros((L, len(ids), C))                               # (L, T, C)
    V_first = np.zeros((len(ids), C))                            # (T, C)
    for t, token in enumerate(ids):
        x, v_first = layer_norm(model.emb[[token]], *model.ln0), None    # (1, C): T = 1 token
        for i, p in enumerate(model.blocks):
            X[i, t] = layer_norm(x[0], p["ln1.weight"], p["ln1.bias"])
            x, v_first = block(x, v_first, state, i, p, H)       # updates state[i] in place
            if i == 0:
                V_first[t] = v_first[0]
    return X, V_first, state


X, V_first, _ = layer_inputs(ids)
print("X", X.shape, " v_first", V_first.shape)

# %% [markdown]
# ## 1 · Token shift and the six mixes
#
# Before anything else, every token looks one step back. The layer keeps the previous token's
# input $x_{t-1}$ (the "token shift" part of the state, zeros before the first token) and makes six
# blends of it with the current input $x_t$, one per quantity it is about to compute:
#
# $$x^{\diamond}_t = x_t + (x_{t-1} - x_t) \odot \mu_\diamond, \qquad
#   \diamond \in \{r, w, k, v, a, g\},$$
#
# where $\mu_\diamond$ is a learned vector (`att.x_r`, `att.x_w`, ..., stored `(1, 1, C)`). Channel
# $c$ with $\mu_\diamond[c] = 0$ sees only the current token, with $1$ only the previous one. It is
# a learned two-tap convolution along time, and it is almost free.
#
# **Why it helps.** Every later step sees one token at a time. With the shift, a key or a value
# can depend on a *pair* of tokens: "fox" after "brown" can get a different key from "fox" after
# "the". That is how a layer can store "what followed X" (key from the previous token, value from
# the current one), which is the raw material of copying patterns from earlier in the text. In
# RWKV-7 the six $\mu$ are fixed per channel after training (RWKV-6 made them depend on the input).

# %%
def shift(x):
    """The previous token's input for every position, zeros before the first. (T, C) -> (T, C)"""
    return np.concatenate([np.zeros((1, x.shape[1])), x[:-1]], axis=0)


def mix(x, x_prev, mu):
    """Lerp from the current token towards the previous one, per channel. (..., C) -> (..., C)"""
    return x + (x_prev - x) * mu


p = model.blocks[0]
x, x_prev = X[0], shift(X[0])                                    # (T, C) each
mixes = {c: mix(x, x_prev, p[f"att.x_{c}"]) for c in "rwkvag"}   # six (T, C) arrays
print("x", x.shape, " x_prev", x_prev.shape, " att.x_r", p["att.x_r"].shape,
      "(stored", weights["blocks.0.att.x_r"].shape, ")")
print({c: m.shape for c, m in mixes.items()})
assert np.array_equal(x_prev, token_shift(x, np.zeros(C)))       # the library's token shift
print("shift == tinyrwkv.model.token_shift: OK")

# %% [markdown]
# The mixing coefficients of this (untrained) model come from the training code's initialisation:
# $\mu[c] = 1 - (c/C)^{p}$ with an exponent $p$ that differs per mix and shrinks with depth, plus
# noise. So low channels lean on the previous token, high channels on the current one, and deeper
# layers lean less on the past. A trained model moves them, but it starts here.

# %%
fig, axes = plt.subplots(1, 3, figsize=(13, 3.2), sharey=True)
for i, ax in enumerate(axes):
    for c in "rwkvag":
        ax.plot(model.blocks[i][f"att.x_{c}"], lw=0.8, label=f"x_{c}")
    ax.set_title(f"layer {i}: token-shift mixes")
    ax.set_xlabel("channel c")
axes[0].set_ylabel("μ[c]  (0 = this token, 1 = previous)")
axes[-1].legend(ncol=2, fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 2 · The projections $r, k, v$ and the low-rank paths for $w, a, g$
#
# Three full $C \times C$ matrices make the receptance (the query), the key and the value:
#
# $$r = x^r W_r^\top, \qquad k = x^k W_k^\top, \qquad v = x^v W_v^\top .$$
#
# Three more quantities get a cheap **low-rank** path, $C \to D \to C$ with a small $D$
# (checkpoint names `w1, w2`, `a1, a2`, `g1, g2`; $D$ is 32 or 64 here, 64 to 128 in the 0.1B model):
#
# $$\omega = w_0 + \tanh(x^w w_1)\, w_2, \qquad
#   \alpha_{\text{pre}} = a_0 + (x^a a_1)\, a_2, \qquad
#   g = \sigma(x^g g_1)\, g_2 .$$
#
# $\omega$ becomes the decay (section 3) and $\alpha_{\text{pre}}$ the learning rate (section 4).
# Note where the nonlinearities sit: `tanh` in the middle of the decay path, none in the middle of
# the `a` path (its sigmoid comes after the bias), and for the gate a sigmoid **between** `g1` and
# `g2` with nothing after `g2`, so $g$ can be negative or larger than 1. Each of these is a per-token,
# per-channel number: the model decides, token by token, how fast each channel forgets, how much it
# overwrites, and how much of the output it lets through.

# %%
def sigmoid(z):
    return 1 / (1 + np.exp(-z))


def projections(x, x_prev, p):
    """r, k, v and the pre-activations of w and a, and the gate g. (..., C) -> six (..., C)"""
    dx = x_prev - x                                              # (..., C)
    xr, xw, xk, xv, xa, xg = (x + dx * p[f"att.x_{c}"] for c in "rwkvag")
    r = xr @ p["att.receptance.weight"].T                        # (..., C)
    k = xk @ p["att.key.weight"].T                               # (..., C)
    v = xv @ p["att.value.weight"].T                             # (..., C)
    w_pre = p["att.w0"] + np.tanh(xw @ p["att.w1"]) @ p["att.w2"]       # (..., Dw) -> (..., C)
    a_pre = p["att.a0"] + (xa @ p["att.a1"]) @ p["att.a2"]              # (..., Da) -> (..., C)
    g = sigmoid(xg @ p["att.g1"]) @ p["att.g2"]                         # (..., Dg) -> (..., C)
    return r, k, v, w_pre, a_pre, g


for key in ["att.receptance.weight", "att.key.weight", "att.value.weight",
            "att.w1", "att.w2", "att.a1", "att.a2", "att.g1", "att.g2"]:
    print(f"{key:22s} {p[key].shape}")
r, k, v, w_pre, a_pre, g = projections(x, x_prev, p)
print("r, k, v, w_pre, a_pre, g:", r.shape, k.shape, v.shape, w_pre.shape, a_pre.shape, g.shape)
print(f"g ranges over [{g.min():.3f}, {g.max():.3f}]: no squashing after g2")

# The library computes the same (for layer 0 the value is not yet mixed with anything).
lib = dict(zip(["r", "w", "k_tilde", "v", "kappa_hat", "a", "g", "v_first"],
               time_mix_inputs(x, x_prev, None, p, 0, H)))
for name, ours in [("r", r), ("v", v), ("g", g)]:
    print(f"{name}: max|Δ| = {np.abs(ours - lib[name]).max():.1e}")
    assert np.allclose(ours, lib[name], rtol=0, atol=1e-12)

# %% [markdown]
# ## 3 · The decay $w$, a soft clamp to (0.545, 1)
#
# Each key channel $j$ of the state is multiplied by $w[j]$ every token, so $w$ decides how fast
# the state forgets. It is made from $\omega$ by
#
# $$w = \exp\!\bigl(-e^{-1/2}\,\sigma(\omega)\bigr).$$
#
# Since $\sigma(\omega) \in (0, 1)$, the exponent lies in $(-e^{-1/2}, 0) = (-0.6065, 0)$, so
#
# $$w \in \bigl(e^{-e^{-1/2}},\ 1\bigr) = (0.5452,\ 1).$$
#
# This is a **soft clamp**: however large $\omega$ gets, one token can erase at most 45 % of what a
# channel holds; a half-life $-\ln 2 / \ln w$ is never shorter than $\ln 2 / e^{-1/2} = 1.14$
# tokens. Why bound it? Memory then fades smoothly instead of being wiped in one step, and the
# parallel (chunked) form of chapter 03 can
# divide by products of decays over 16 tokens ($\le e^{16 \cdot 0.6065} \approx 1.6\cdot 10^4$)
# without overflow. The official CUDA path writes the same function as
# $\hat w = -\mathrm{softplus}(-\omega) - \tfrac12 = \log\sigma(\omega) - \tfrac12$ and
# $w = \exp(-e^{\hat w})$: there the clamp is visible as $\hat w < -\tfrac12$.
#
# The official RNN code (`RWKV_x070_TMix_one`) writes the constant as `0.606531`, rounded from
# $e^{-1/2} = 0.60653066\ldots$; the library (like the official CUDA kernel, fla and llama.cpp)
# uses the exact value. The constants differ by $3.4\cdot10^{-7}$, and $w$ by at most about
# $2\cdot10^{-7}$: a few float32 rounding steps, far less than two float32 implementations of the
# whole layer differ anyway (the check below measures it).

# %%
def decay(w_pre):
    """w = exp(-e^{-1/2} sigmoid(w_pre)), in (0.5452, 1). (..., C) -> (..., C)"""
    return np.exp(-np.exp(-0.5) * sigmoid(w_pre))


w = decay(w_pre)                                                 # (T, C)
print("w", w.shape, f" range [{w.min():.4f}, {w.max():.6f}]  bound ({np.exp(-np.exp(-0.5)):.4f}, 1)")
print(f"max|Δ| vs library: {np.abs(w - lib['w']).max():.1e}")
assert np.allclose(w, lib["w"], rtol=0, atol=1e-12)

# The kernel form and the official rounded constant give the same decay.
w_kernel = np.exp(-np.exp(-np.logaddexp(0, -w_pre) - 0.5))      # softplus(z) = log(1 + e^z)
w_official = np.exp(-0.606531 * sigmoid(w_pre))
print(f"kernel form: max|Δ| = {np.abs(w_kernel - w).max():.1e}")
print(f"0.606531 instead of e^-0.5: max|Δw| = {np.abs(w_official - w).max():.1e}"
      f" = {np.abs(w_official - w).max() / 2**-24:.1f} float32 steps just below 1 (2^-24)")
assert np.allclose(w_kernel, w, rtol=0, atol=1e-14)
# The bound holds for any pre-activation, even absurd ones:
extreme = decay(np.array([-50.0, -10.0, 0.0, 10.0, 50.0]))
print("w at ω = -50, -10, 0, 10, 50:", extreme)
assert np.all((extreme >= np.exp(-np.exp(-0.5))) & (extreme <= 1))

# %% [markdown]
# **How fast does each head forget?** The half-life in tokens, $-\ln 2 / \ln w$, for every channel
# of every token of our sentence, grouped by head, in the first and the last layer. The spread
# comes from the training code's initialisation of $w_0$ (it ramps across the channels and zigzags
# inside each head, docs/architecture.md §10), so in this untrained model the first head remembers longest and
# the last head forgets within a few tokens. A trained model moves these, but keeps the idea:
# each head mixes fast and slow channels.

# %%
layers_shown = [0, L - 1]
fig, axes = plt.subplots(1, len(layers_shown), figsize=(11, 3.8), sharey=True)
half_life_median = {}
for ax, i in zip(axes, layers_shown):
    r_i, k_i, v_i, w_pre_i, a_pre_i, g_i = projections(X[i], shift(X[i]), model.blocks[i])
    half_life = -np.log(2) / np.log(decay(w_pre_i))              # (T, C) tokens
    per_head = half_life.reshape(T, H, N).transpose(1, 0, 2).reshape(H, -1)   # (H, T*N)
    half_life_median[i] = np.median(per_head, axis=1)
    ax.boxplot(list(per_head), whis=(1, 99), showfliers=False)
    ax.set_yscale("log")
    ax.axhline(np.log(2) / np.exp(-0.5), color="r", lw=0.8, ls="--", label="floor 1.14 tokens")
    ax.set_xticks(range(1, H + 1), [f"head {h}" for h in range(H)])
    ax.set_title(f"layer {i}: decay half-life per head ({T} tokens × {N} channels)")
axes[0].set_ylabel("half-life  −ln2 / ln w  (tokens)")
axes[0].legend(loc="upper right", fontsize=8)
plt.tight_layout()
plt.show()
for i in layers_shown:
    print(f"layer {i}: median half-life per head", half_life_median[i].round(1))

# %% [markdown]
# ## 4 · The learning rate $a$, the removal key $\hat\kappa$ and the written key $\tilde k$
#
# The **in-context learning rate** says, per channel and per token, how much of the old memory to
# replace:
#
# $$a = \sigma(\alpha_{\text{pre}}) = \sigma\bigl(a_0 + (x^a a_1)\, a_2\bigr) \in (0, 1)^C .$$
#
# The **removal key** says *which* memory: the key scaled per channel by `att.k_k`, then made unit
# length in each head,
#
# $$\hat\kappa_h = \frac{(k \odot k_k)_h}{\max(\lVert (k \odot k_k)_h \rVert_2,\ 10^{-12})}.$$
#
# Unit length matters: with $\lVert\hat\kappa\rVert = 1$, $S\hat\kappa$ is exactly "what is stored
# along direction $\hat\kappa$", and $S(I - \hat\kappa\hat\kappa^\top)$ removes exactly that
# (section 5). The **written key** is the key itself, scaled channel by channel towards $k \odot a$:
#
# $$\tilde k = k \odot \bigl(1 + (a - 1) \odot k_a\bigr),$$
#
# so where `att.k_a` = 0 the key is written as is, and where `att.k_a` = 1 it is written as
# $k \odot a$: a channel that removes little also writes little. $\hat\kappa$ is made from the
# *unmodified* $k$; only then is $k$ replaced by $\tilde k$.

# %%
def l2_normalize(u, eps=1e-12):
    """u / max(|u|, eps) over the last axis (torch F.normalize)."""
    return u / np.maximum(np.linalg.norm(u, axis=-1, keepdims=True), eps)


def learning_rate_and_keys(k, a_pre, p, n_head):
    """a, kappa_hat (unit length per head) and k_tilde. (..., C) -> three (..., C)"""
    a = sigmoid(a_pre)                                           # (..., C) in (0, 1)
    kk = (k * p["att.k_k"]).reshape(*k.shape[:-1], n_head, -1)   # (..., C) -> (..., H, N)
    kappa_hat = l2_normalize(kk).reshape(k.shape)                # (..., H, N) -> (..., C)
    k_tilde = k * (1 + (a - 1) * p["att.k_a"])                   # (..., C)
    return a, kappa_hat, k_tilde


a, kappa_hat, k_tilde = learning_rate_and_keys(k, a_pre, p, H)
print("a", a.shape, f"in [{a.min():.3f}, {a.max():.3f}];  kappa_hat", kappa_hat.shape,
      " k_tilde", k_tilde.shape)
print("|kappa_hat| per head, first 3 tokens:\n",
      np.linalg.norm(kappa_hat.reshape(T, H, N), axis=-1)[:3])
print(f"att.k_a mean {p['att.k_a'].mean():.3f}: so k_tilde ≈ k ⊙ a, "
      f"mean |k_tilde / (k a) - 1| = {np.mean(np.abs(k_tilde / (k * a) - 1)):.3f}")
for name, ours in [("a", a), ("kappa_hat", kappa_hat), ("k_tilde", k_tilde)]:
    print(f"{name}: max|Δ| vs library = {np.abs(ours - lib[name]).max():.1e}")
    assert np.allclose(ours, lib[name], rtol=0, atol=1e-12)

# %% [markdown]
# ## 5 · The generalised delta rule
#
# Now the heart of RWKV-7. Per head, the state $S$ is an $N \times N$ matrix; **row $i$ belongs to
# value channel $i$, column $j$ to key channel $j$** (the official layout `[head][value][key]`;
# fla and some kernels store the transpose). Writing a value $v$ under a key $k$ adds the outer
# product $v k^\top$; reading with a query $q$ computes $S q$, which returns $v\,(k^\top q)$: the
# value, weighted by how well the query matches the key. A sum of such outer products is an
# associative memory of value × key pairs.
#
# Plain linear attention only ever adds, so old pairs pile up. RWKV-7 updates each head with
# (vectors are columns here)
#
# $$S_t = S_{t-1}\,\mathrm{diag}(w_t) + (S_{t-1}\,\mathbf a_t)\,\mathbf b_t^\top + v_t \tilde k_t^\top,
#   \qquad \mathbf a_t = -\hat\kappa_t,\quad \mathbf b_t = \hat\kappa_t \odot a_t,$$
#
# $$y_t = S_t\, r_t .$$
#
# Read the three terms from left to right:
#
# 1. $S\,\mathrm{diag}(w)$ multiplies column $j$ by $w[j]$: every key channel fades at its own rate.
# 2. $S\hat\kappa$ is what the memory currently returns for the removal key: the old value stored
#    under $\hat\kappa$. The term $-(S\hat\kappa)(\hat\kappa \odot a)^\top$ subtracts it, along
#    $\hat\kappa$, scaled per key channel by the learning rate $a$. With $a = 1$ it is the
#    projection $S(I - \hat\kappa\hat\kappa^\top)$: the old value under $\hat\kappa$ is gone, every
#    direction orthogonal to $\hat\kappa$ is untouched.
# 3. $v\tilde k^\top$ writes the new value.
#
# Together, $S_t = S_{t-1}\bigl(\mathrm{diag}(w_t) - \hat\kappa_t(\hat\kappa_t \odot a_t)^\top\bigr)
# + v_t\tilde k_t^\top$: the transition is a diagonal plus a rank-one matrix, which is what
# chapter 03 exploits. With $w = 1$, $a = 1$ and $\tilde k = \hat\kappa$ this is exactly the
# **delta rule** $S \leftarrow S + (v - S\hat\kappa)\hat\kappa^\top$: move the stored value towards
# the new one: one gradient-descent step on $\tfrac12\lVert S\hat\kappa - v\rVert^2$ with step
# size 1. The state takes one learning step per token, which is why $a$, the step size per channel,
# is called the *in-context learning rate*. The read-out uses the **new**
# state, so the current token's own value is already in it.
#
# Elementwise, with the old $S$ on the right: $S'[i,j] = S[i,j]\,w[j] - \bigl(\sum_l S[i,l]\,
# \hat\kappa[l]\bigr)\,\hat\kappa[j]\,a[j] + v[i]\,\tilde k[j]$. In NumPy, for all heads at once:

# %%
def delta_rule_step(S, r, w, k_tilde, v, kappa_hat, a):
    """One token of the WKV recurrence for every head.

    Args: S (H, N, N) [head, value i, key j]; r, w, k_tilde, v, kappa_hat, a: (H, N).
    Returns: the new S (H, N, N) and y = S_new r (H, N).
    """
    old = np.einsum("hij,hj->hi", S, kappa_hat)                  # (H, N): S kappa_hat, per head
    S = (S * w[:, None, :]                                       # decay: column j times w[j]
         - old[:, :, None] * (kappa_hat * a)[:, None, :]         # remove a fraction a of it
         + v[:, :, None] * k_tilde[:, None, :])                  # write v k_tilde^T
    y = np.einsum("hij,hj->hi", S, r)                            # (H, N): read with the new S
    return S, y

# %% [markdown]
# ### A hand-made memory: replace, don't accumulate
#
# One head with $N = 4$, no decay ($w = 1$). Two orthogonal unit keys, $\hat\kappa_1$ and
# $\hat\kappa_2$. We store value $u$ under $\hat\kappa_2$ and value $v_1$ under $\hat\kappa_1$,
# then write a *new* value $v_2$ under $\hat\kappa_1$, and read both keys back. To see the removal
# on its own we pass the written key directly ($\tilde k = \hat\kappa_1$). In the model the two are
# coupled: $\tilde k \approx k \odot a$, so a channel with $a \approx 0$ writes almost nothing too.

# %%
kappa_1 = np.array([1.0, 1.0, 0.0, 0.0]) / np.sqrt(2)            # (N,) unit keys, orthogonal
kappa_2 = np.array([0.0, 0.0, 1.0, -1.0]) / np.sqrt(2)
u, v_1, v_2 = np.array([5.0, 5, 5, 5]), np.array([1.0, 2, 3, 4]), np.array([-1.0, 0, 5, 0])
one = lambda vec: vec[None, :]                                   # (N,) -> (H=1, N)
no_decay, zero = np.ones(4), np.zeros(4)


def write(S, value, key, lr):
    """Write value under key (removal key = written key = key), learning rate lr for all channels."""
    return delta_rule_step(S, one(zero), one(no_decay), one(key), one(value), one(key),
                           one(np.full(4, lr)))[0]


read = lambda S, key: (S @ key)[0]                               # (1, N, N) @ (N,) -> (N,)
for lr in [1.0, 0.5, 0.0]:
    S = np.zeros((1, 4, 4))                                      # (H=1, N, N)
    S = write(S, u, kappa_2, lr)
    S = write(S, v_1, kappa_1, lr)
    first = read(S, kappa_1)
    S = write(S, v_2, kappa_1, lr)
    print(f"a = {lr}:  under κ1 after v1: {first},  after v2: {read(S, kappa_1)},"
          f"  under κ2: {read(S, kappa_2)}")
    assert np.allclose(read(S, kappa_2), u)                      # the other memory is untouched
    assert np.allclose(read(S, kappa_1), v_2 + (1 - lr) * v_1)   # a fraction a of v1 was removed
print("a = 1 replaces v1 by v2; a = 0 accumulates v1 + v2 (plain linear attention)")

# %% [markdown]
# With $a = 1$ the second write **replaces** $v_1$ by $v_2$; with $a = 0$ the memory returns the
# sum $v_1 + v_2$, as linear attention with or without a decay (RWKV-4 to 6) would; $a = 0.5$
# keeps half of the old value. The pair stored under the orthogonal key $\hat\kappa_2$ survives
# all three. This is what lets a fixed-size state keep a clean memory over a long text: it can
# overwrite an association instead of blurring it.
#
# ### The same step on the model's numbers
#
# Now the real inputs of layer 0, split into heads `(C,) -> (H, N)`, from a random non-zero state,
# against the library's `wkv_step`. It takes the removal term as the pair of the equation above,
# $\mathbf a = -\hat\kappa$ and $\mathbf b = \hat\kappa \odot a$ (the form of the official CUDA
# kernel, which chapter 03 uses), instead of $\hat\kappa$ and $a$:

# %%
heads = lambda vec: vec.reshape(H, N)                            # (C,) -> (H, N)
rng = np.random.default_rng(0)
S0 = rng.standard_normal((H, N, N)) * 0.1                        # (H, N, N) a non-zero state
t = 5
inputs = [heads(u_[t]) for u_ in (r, w, k_tilde, v, kappa_hat, a)]
S_ours, y_ours = delta_rule_step(S0, *inputs)
r_t, w_t, k_t, v_t, kappa_t, a_t = inputs
S_lib, y_lib = wkv_step(S0, r_t, w_t, k_t, v_t, -kappa_t, kappa_t * a_t)  # ..., alpha, beta
print("S", S_ours.shape, " y", y_ours.shape)
print(f"max|ΔS| = {np.abs(S_ours - S_lib).max():.1e},  max|Δy| = {np.abs(y_ours - y_lib).max():.1e}")
assert np.allclose(S_ours, S_lib, rtol=0, atol=1e-12) and np.allclose(y_ours, y_lib, rtol=0, atol=1e-12)

# %% [markdown]
# ### Watching one head's memory fill up
#
# We run our step over the whole sentence in layer 0, from the zero state, and keep the state of
# one head after some of the tokens. Rows are value channels, columns key channels. Each token adds
# a rank-one pattern $v\tilde k^\top$; the decay then fades each column at its own rate. In this
# model the key channels at the right end of each head have the fastest decay (the zigzag of $w_0$),
# so the right-hand columns should hold only the last few tokens; the printout below measures it.

# %%
head = 1
S = np.zeros((H, N, N))                                          # (H, N, N)
snapshots = {}
for t in range(T):
    S, _ = delta_rule_step(S, *[heads(u_[t]) for u_ in (r, w, k_tilde, v, kappa_hat, a)])
    snapshots[t] = S[head].copy()                                # (N, N)

shown = [0, 2, 5, 9, 14, T - 1]
vmax = np.percentile(np.abs(snapshots[T - 1]), 99.5)             # one colour scale for all panels
fig, axes = plt.subplots(2, 3, figsize=(12, 8), constrained_layout=True)
for ax, t in zip(axes.flat, shown):
    im = ax.imshow(snapshots[t], cmap="RdBu_r", vmin=-vmax, vmax=vmax)
    ax.set_title(f"after token {t}: {words[t]!r}", fontsize=10)
    ax.set_xlabel("key channel j")
    ax.set_ylabel("value channel i")
fig.colorbar(im, ax=axes, shrink=0.6, label="S[i, j]")
fig.suptitle(f"Layer 0, head {head}: the state S as the sentence is read (untrained model)")
plt.show()

# How much of the final state's magnitude sits in slow- vs fast-decaying key channels:
w_head = heads(w.mean(axis=0))[head]                             # (N,) mean decay per key channel
slow, fast = np.argsort(w_head)[-16:], np.argsort(w_head)[:16]
final = np.abs(snapshots[T - 1]).mean(axis=0)                    # (N,) mean |S| per column
print(f"16 slowest key channels (mean w {w_head[slow].mean():.3f}): mean |S| {final[slow].mean():.4f}")
print(f"16 fastest key channels (mean w {w_head[fast].mean():.3f}): mean |S| {final[fast].mean():.4f}")

# %% [markdown]
# ## 6 · Read-out, group norm, bonus, gate and output
#
# The step above already returned $y_h = S_h r_h$ per head. Four things turn it into the layer's
# output:
#
# 1. **Group norm per head** (`att.ln_x`): each head's $N$ numbers are normalised to mean 0 and
#    variance 1, with $\epsilon = 64\cdot 10^{-5}$, then scaled and shifted per channel. Heads whose
#    memory is faint and heads whose memory is loud then speak equally loud.
# 2. **Bonus**: the current token's own value, weighted per head by a learned $r \cdot k$ match:
#    $y_h \mathrel{+}= \bigl(\sum_j r_h[j]\,\tilde k_h[j]\,r_k[h, j]\bigr)\, v_h$ (`att.r_k`,
#    shape `(H, N)`; RWKV-4 to 6 had a similar "u" bonus). It is added after the norm, so it is not
#    rescaled with the memory.
# 3. **Gate**: multiply by $g$ from section 2.
# 4. **Output projection**: $\text{out} = (y \odot g)\,W_o^\top$.
#
# **Why $\epsilon = 64\cdot 10^{-5}$ and not torch's default $10^{-5}$?** Older RWKV code divided
# $y$ by a "head_size_divisor" of 8 before a GroupNorm with $\epsilon = 10^{-5}$. Dividing by 8
# divides the variance by 64, so that is the same as $\epsilon = 64 \cdot 10^{-5}$ on the undivided
# $y$; RWKV-7 folds it in. The released weights were trained with it, and the difference is not
# small: $\epsilon$ matters exactly when a head's variance is small, as at the first tokens, when
# the state is nearly empty. Both claims are measured below.

# %%
def group_norm(y, weight, bias, n_head, eps=64e-5):
    """Normalise each head's N channels of each token, then a per-channel affine. (..., C) -> (..., C)"""
    yh = y.reshape(*y.shape[:-1], n_head, -1)                    # (..., H, N)
    mu = yh.mean(axis=-1, keepdims=True)
    var = ((yh - mu) ** 2).mean(axis=-1, keepdims=True)          # biased, as torch
    return ((yh - mu) / np.sqrt(var + eps)).reshape(y.shape) * weight + bias


def output(y, r, k_tilde, v, g, p, n_head):
    """Group norm, bonus, gate, output projection. y, r, k_tilde, v, g: (..., C) -> (..., C)"""
    y = group_norm(y, p["att.ln_x.weight"], p["att.ln_x.bias"], n_head)          # (..., C)
    rk = (r * k_tilde).reshape(*r.shape[:-1], n_head, -1) * p["att.r_k"]         # (..., H, N)
    bonus = rk.sum(axis=-1, keepdims=True) * v.reshape(rk.shape)                 # (..., H, N)
    return ((y + bonus.reshape(y.shape)) * g) @ p["att.output.weight"].T         # (..., C)


# y for every token of the sentence (layer 0, from the zero state), then the output.
S, Y = np.zeros((H, N, N)), np.zeros((T, C))                     # Y: (T, C)
for t in range(T):
    S, y_t = delta_rule_step(S, *[heads(u_[t]) for u_ in (r, w, k_tilde, v, kappa_hat, a)])
    Y[t] = y_t.reshape(C)                                        # (H, N) -> (C,)
out = output(Y, r, k_tilde, v, g, p, H)                          # (T, C)
out_lib = time_mix_output(Y, r, k_tilde, v, g, p, H)
print("y", Y.shape, " r_k", p["att.r_k"].shape, " out", out.shape)
print(f"max|Δ| vs library time_mix_output: {np.abs(out - out_lib).max():.1e}")
assert np.allclose(out, out_lib, rtol=0, atol=1e-12)

# eps 64e-5 on y is GroupNorm(y / 8) with eps 1e-5:
ones, zeros = np.ones(C), np.zeros(C)
print("GN(y, 64e-5) vs GN(y/8, 1e-5): max|Δ| =",
      f"{np.abs(group_norm(Y, ones, zeros, H) - group_norm(Y / 8, ones, zeros, H, 1e-5)).max():.1e}")
# ... and using 1e-5 instead changes the normalised output, most where the variance is small:
var_first = Y[0].reshape(H, N).var(axis=-1)                   # (H,)
gap = np.abs(group_norm(Y, ones, zeros, H, 1e-5) - group_norm(Y, ones, zeros, H)).max(axis=-1)
print("per-head variance of y at token 0:", [f"{s:.1e}" for s in var_first])
print(f"max|Δ| of the normalised y with eps 1e-5: token 0: {gap[0]:.3f},  last token: {gap[-1]:.3f}")

# %% [markdown]
# ## 7 · The value residual
#
# Layer 0's value $v$ (the official code calls it `v_first`) travels up the stack with the token.
# Every later layer mixes it into its own value with a learned, per-channel, per-token gate:
#
# $$v \leftarrow v + (v_{\text{first}} - v) \odot \sigma\bigl(v_0 + (x^v v_1)\, v_2\bigr).$$
#
# It is a lerp: gate 0 keeps this layer's value, gate 1 takes layer 0's. Deep layers thus have a
# direct line to the token's first, least processed value, whatever the layers in between did to
# the residual stream. Layer 0 has nothing to mix in, so it only *produces* $v_{\text{first}}$ and its
# `att.v0, v1, v2` are never read. Checkpoints may contain them anyway (released files do, and so
# does our synthetic one); the library leaves them out when it loads a model.

# %%
def value_residual(v, v_first, xv, p, layer_id):
    """Layer 0: v becomes v_first. Later layers: lerp v towards v_first. Returns v, v_first (..., C)."""
    if layer_id == 0:
        return v, v
    gate = sigmoid(p["att.v0"] + (xv @ p["att.v1"]) @ p["att.v2"])      # (..., Dv) -> (..., C)
    return v + (v_first - v) * gate, v_first


print("in the file: blocks.0.att.v1", weights["blocks.0.att.v1"].shape,
      "   in model.blocks[0]:", "att.v1" in model.blocks[0])
for i in range(1, L):
    p_i, x_i = model.blocks[i], X[i]
    x_prev_i = shift(x_i)
    r_i, k_i, v_i, w_pre_i, a_pre_i, g_i = projections(x_i, x_prev_i, p_i)
    xv_i = mix(x_i, x_prev_i, p_i["att.x_v"])                    # (T, C)
    v_mixed, _ = value_residual(v_i, V_first, xv_i, p_i, i)
    gate = sigmoid(p_i["att.v0"] + (xv_i @ p_i["att.v1"]) @ p_i["att.v2"])
    v_lib = time_mix_inputs(x_i, x_prev_i, V_first, p_i, i, H)[3]
    print(f"layer {i}: gate mean {gate.mean():.3f} in [{gate.min():.3f}, {gate.max():.3f}],"
          f"  max|Δv| vs library = {np.abs(v_mixed - v_lib).max():.1e}")
    assert np.allclose(v_mixed, v_lib, rtol=0, atol=1e-12)

# %% [markdown]
# ## 8 · Putting it together: one token of the time mix
#
# In the official order (`RWKV_x070_TMix_one`): mixes and projections; $\hat\kappa$ from the raw
# $k$, then $\tilde k$; the value residual; the decay; the delta-rule step and read-out; group norm,
# bonus, gate and output. The token-shift state becomes this token's input, the WKV state becomes
# the new $S$.

# %%
def my_time_mix_one(x, x_prev, S, v_first, p, layer_id, n_head):
    """One token of RWKV-7's time mix, built from this chapter's pieces.

    Args: x, x_prev, v_first: (C,); S: (H, N, N); p: the layer's weights.
    Returns: out (C,), the new S (H, N, N), v_first (C,).
    """
    r, k, v, w_pre, a_pre, g = projections(x, x_prev, p)
    a, kappa_hat, k_tilde = learning_rate_and_keys(k, a_pre, p, n_head)
    v, v_first = value_residual(v, v_first, mix(x, x_prev, p["att.x_v"]), p, layer_id)
    w = decay(w_pre)
    split = lambda u: u.reshape(n_head, -1)                      # (C,) -> (H, N)
    S, y = delta_rule_step(S, *map(split, (r, w, k_tilde, v, kappa_hat, a)))
    return output(y.reshape(-1), r, k_tilde, v, g, p, n_head), S, v_first

# %% [markdown]
# The final check: read the sentence to get a non-zero state, then feed a few more tokens, one at
# a time. For each token and **every layer** we give our function and the library's `time_mix`
# the same inputs (the layer's LN1 output, its token-shift and WKV state, `v_first`), compare all
# three results, and then let the library's block advance the state. The library's `time_mix` and
# `block` work on a sequence, arrays of shape `(T, C)`; one token is `T = 1`, a `(1, C)` array.

# %%
_, _, state = layer_inputs(ids)                                  # the state after the sentence
more = [i % model.config.vocab_size for i in tok.encode(" The dog sleeps all day.")]
worst = {"out": 0.0, "S": 0.0, "v_first": 0.0}
for token in more:
    x, v_first_ours, v_first_lib = layer_norm(model.emb[[token]], *model.ln0), None, None  # (1, C)
    for i, p in enumerate(model.blocks):
        x_in = layer_norm(x, p["ln1.weight"], p["ln1.bias"])    # (1, C)
        ours = my_time_mix_one(x_in[0], state.att_shift[i], state.wkv[i], v_first_ours, p, i, H)
        out, S_lib, v_first_lib = time_mix(x_in, state.att_shift[i], state.wkv[i], v_first_lib,
                                           p, i, H)              # (1, C), (H, N, N), (1, C)
        theirs = (out[0], S_lib, v_first_lib[0])
        for name, o, l in zip(worst, ours, theirs):
            worst[name] = max(worst[name], np.abs(o - l).max())
        v_first_ours = ours[2]
        x, _ = block(x, v_first_lib, state, i, p, H)             # advance the library's state
print(f"{len(more)} tokens × {L} layers from a non-zero state (|S| up to {np.abs(state.wkv).max():.2f})")
print("max|Δ| ours vs time_mix on one token:", {name: f"{d:.1e}" for name, d in worst.items()})
assert all(d < 1e-12 for d in worst.values())
print("my_time_mix_one == tinyrwkv.model.time_mix on one token: OK")

# %% [markdown]
# ## Summary
#
# One token of RWKV-7's time mix, per layer:
#
# | step | equation | code here |
# |---|---|---|
# | token shift | $x^\diamond = x + (x_{t-1} - x)\odot\mu_\diamond$, six times | `mix` |
# | projections | $r, k, v = x^{r,k,v} W^\top$; $\omega$, $\alpha_{\text{pre}}$, $g$ by low-rank paths | `projections` |
# | decay | $w = \exp(-e^{-1/2}\sigma(\omega)) \in (0.545, 1)$ | `decay` |
# | keys | $a = \sigma(\alpha_{\text{pre}})$, $\hat\kappa = \mathrm{normalize}_h(k\odot k_k)$, $\tilde k = k\odot(1+(a-1)\odot k_a)$ | `learning_rate_and_keys` |
# | value residual | $v \leftarrow \mathrm{lerp}(v, v_{\text{first}}, \sigma(\cdot))$, layers ≥ 1 | `value_residual` |
# | state | $S \leftarrow S\,\mathrm{diag}(w) - (S\hat\kappa)(\hat\kappa\odot a)^\top + v\tilde k^\top$, $y = Sr$ | `delta_rule_step` |
# | output | GroupNorm(eps $64\cdot10^{-5}$) + bonus, $\odot g$, $W_o$ | `output` |
#
# The state is a per-head value × key memory that fades per key channel and, unlike linear
# attention, can *replace* what it stored under a key (the delta rule), with a learning rate the
# model chooses per token. Chapter 02 builds the other half of a layer, the channel mix;
# chapter 03 computes the same recurrence for a whole sequence at once.
#
# The final assert, again in one place: every piece built here agrees with the library to
# rounding error in float64.

# %%
assert all(d < 1e-12 for d in worst.values())
print(f"chapter ran in {time.perf_counter() - CHAPTER_START:.1f} s")
