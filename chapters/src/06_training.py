# %% [markdown]
# # 06 · Training: backpropagation through the recurrence
#
# **What you will build.** Every chapter so far ran RWKV-7 forwards. Here you differentiate it.
# You will write the backward pass of the WKV recurrence by hand, going back through time one
# token at a time, and check it against finite differences. You will see how far back in the text
# a gradient reaches depending on the decay, and keep memory bounded by recomputing states from
# checkpoints, checked bit for bit against keeping every state and against the library's
# `tinyrwkv.train.wkv_backward`. Then you will write the top of the whole model's backward (the
# loss, the head, `ln_out`) yourself, check it against the library's `tinyrwkv.train`, check the
# library's whole gradient by finite differences, train a tiny model for under a minute on a
# slice of children's stories, and watch the loss fall. Last, you will meet the same backward in
# chunked form, matrix products over whole chunks of tokens, check that it gives the same
# gradients, time both, and see why RWKV trains in parallel like a Transformer.
#
# **Prerequisites.** [01 · Time mixing](01_time_mixing.ipynb) for the WKV state and
# [04 · The whole model](04_whole_model.ipynb). Calculus used: the chain rule, and the gradient of
# a matrix product (if `Y = A B` then `dA = dY B^T` and `dB = A^T dY`).
#
# Names: `T` tokens, `N` head size, `S` the state of one head, `(N, N)`, with rows the **value**
# index and columns the **key** index (docs/architecture.md §5.1). The operator's inputs follow
# the official CUDA kernel: `r, w, k, v`, `alpha = -kappa_hat` and `beta = kappa_hat * a`
# (docs/architecture.md §3.11).

# %%
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from threadpoolctl import threadpool_limits

import tinyrwkv
from tinyrwkv import train
from tinyrwkv.synthetic import make_weights
from tinyrwkv.trainer import adamw_step, lr_at

CHAPTER_START = time.perf_counter()
np.set_printoptions(precision=4, suppress=True, linewidth=110)
rng = np.random.default_rng(0)

# %% [markdown]
# ## 1. The recurrence, one head
#
# One token of the WKV operator takes the state `S` to
#
#     S_t = S_{t-1} (diag(w_t) + alpha_t beta_t^T) + v_t k_t^T        y_t = S_t r_t
#
# The first term decays each key column by `w_t` and removes what the state held along the key
# `kappa_hat`. The second term writes the new association `v_t k_t^T`. We write it for one head
# and keep every state, so we can look at them.

# %%
def wkv_one_head(S0, r, w, k, v, alpha, beta):
    """S0 (N, N); inputs (T, N). Returns y (T, N) and the states S_0 .. S_T (T + 1, N, N)."""
    states = [S0]
    y = np.empty_like(r)
    for t in range(len(r)):
        S = states[-1]
        S = S * w[t] + np.outer(S @ alpha[t], beta[t]) + np.outer(v[t], k[t])
        states.append(S)
        y[t] = S @ r[t]
    return y, np.stack(states)


T, N = 12, 8
r, k, v = rng.standard_normal((3, T, N))
w = np.exp(-0.6065 * rng.uniform(0.05, 1, (T, N)))         # decays in (0.545, 0.97)
kappa = rng.standard_normal((T, N))
kappa /= np.linalg.norm(kappa, axis=1, keepdims=True)
alpha, beta = -kappa, kappa * rng.uniform(0, 1, (T, N))
S0 = 0.5 * rng.standard_normal((N, N))                       # a non-zero starting state
y, states = wkv_one_head(S0, r, w, k, v, alpha, beta)
print("y:", y.shape, " states:", states.shape)

# %% [markdown]
# ## 2. Going back through one token
#
# Take a loss `L` that depends on all the `y_t` (and possibly the last state). Going backwards,
# call `G` the gradient of `L` with respect to `S_t`: everything that happens later flows into
# `S_t` through `S_{t+1}`, and `y_t = S_t r_t` adds `dy_t r_t^T`. From one line of forward code,
# the chain rule gives every gradient of token `t`:
#
# * `y_t = S_t r_t`: `dr_t = S_t^T dy_t`
# * `v_t k_t^T`: `dv_t = G k_t` and `dk_t = G^T v_t`
# * `S_{t-1} * w_t` (columns scaled): `dw_t[j] = sum_i G[i, j] S_{t-1}[i, j]`
# * `(S_{t-1} alpha_t) beta_t^T`: `dbeta_t = G^T (S_{t-1} alpha_t)` and `dalpha_t = S_{t-1}^T (G beta_t)`
# * and what flows on to the token before: `dS_{t-1} = G diag(w_t) + (G beta_t) alpha_t^T`
#
# That last line is the recurrence run backwards. The gradient is carried by the transpose of the
# same transition matrix, so it decays just as the state does. We write one token's step as its
# own function, because section 5 reuses it.

# %%
def back_one_token(G, dy_t, S_prev, S_t, r_t, w_t, k_t, v_t, alpha_t, beta_t):
    """One token backwards. G: dL/dS_t from the tokens after t, (N, N).
    Returns dL/dS_{t-1} (N, N) and token t's (dr, dw, dk, dv, dalpha, dbeta), each (N,)."""
    G = G + np.outer(dy_t, r_t)                          # y_t = S_t r_t adds its share
    dr = S_t.T @ dy_t
    dv, dk = G @ k_t, G.T @ v_t
    dw = (G * S_prev).sum(axis=0)
    dbeta = G.T @ (S_prev @ alpha_t)
    Gb = G @ beta_t
    dalpha = S_prev.T @ Gb
    return G * w_t + np.outer(Gb, alpha_t), (dr, dw, dk, dv, dalpha, dbeta)


def wkv_one_head_backward(dy, states, r, w, k, v, alpha, beta):
    """Gradients of sum(dy * y) for wkv_one_head, from all its states (T + 1, N, N).
    Returns dr, dw, dk, dv, dalpha, dbeta (each (T, N)) and dS0 (N, N)."""
    grads = [np.zeros_like(r) for _ in range(6)]
    G = np.zeros_like(states[0])
    for t in reversed(range(len(r))):
        G, token = back_one_token(G, dy[t], states[t], states[t + 1],
                                  r[t], w[t], k[t], v[t], alpha[t], beta[t])
        for g, d in zip(grads, token):
            g[t] = d
    return (*grads, G)


dy = rng.standard_normal((T, N))                  # L = sum(dy * y): its gradient wrt y is dy
grads = wkv_one_head_backward(dy, states, r, w, k, v, alpha, beta)

# %% [markdown]
# ## 3. Is it right? Central finite differences
#
# Nudge one input by `+h` and by `-h` and look at the change in `L`. The difference
# `(L(x + h) - L(x - h)) / 2h` is the derivative up to an error of about `h^2 |L'''| / 6` (the
# Taylor remainder) plus `eps |L| / h` (the rounding of `L` itself, `eps = 2.2e-16` in float64).
# With `h = 1e-5` both are around `1e-10`, so, measured against the typical size of each gradient
# (its root mean square), the analytic gradient must agree to better than `1e-6`. That leaves
# four orders of magnitude for harmless rounding, while a wrong or missing term in the backward
# would be off by the size of the gradient itself, an error near 1.

# %%
def loss(S0, r, w, k, v, alpha, beta):
    return float((dy * wkv_one_head(S0, r, w, k, v, alpha, beta)[0]).sum())


inputs = dict(r=r, w=w, k=k, v=v, alpha=alpha, beta=beta, S0=S0)
analytic = dict(zip(["r", "w", "k", "v", "alpha", "beta", "S0"], grads))
h = 1e-5
worst = {}
for name, x in inputs.items():
    g = analytic[name]
    errs = []
    for idx in map(tuple, rng.integers(0, x.shape, (5, x.ndim))):
        plus, minus = x.copy(), x.copy()
        plus[idx] += h
        minus[idx] -= h
        fd = (loss(**{**inputs, name: plus}) - loss(**{**inputs, name: minus})) / (2 * h)
        errs.append(abs(fd - g[idx]) / np.sqrt(np.mean(g ** 2)))
    worst[name] = max(errs)
print("largest |finite difference - analytic| / rms(gradient), per input:")
for name, e in worst.items():
    print(f"  {name:6s} {e:.1e}")
assert max(worst.values()) < 1e-6, worst

# %% [markdown]
# ## 4. How far back does a gradient reach?
#
# The gradient of the last output `y_T` with respect to an earlier value `v_t` has to pass
# through every transition between `t` and `T`. Each transition multiplies the key columns by
# their decay `w`. With slow decays the gradient reaches far back; with fast ones it dies within
# a few tokens. The plot uses a longer sequence and no removal term, to show the decay alone.
# Then the answer is exact: `v_t k_t^T` is multiplied by `w` once per later token, so
# `dL/dv_t[i] = sum_j k_t[j] w^(T-1-t) r_T[j]` for every `i`, and the code below asserts that the
# backward finds exactly this.

# %%
T_long = 64
fig, ax = plt.subplots(figsize=(7, 3.2))
for decay in (0.99, 0.9, 0.7, 0.545):
    w_c = np.full((T_long, N), decay)
    rr, kk_, vv = rng.standard_normal((3, T_long, N))
    zero = np.zeros((T_long, N))
    _, st = wkv_one_head(np.zeros((N, N)), rr, w_c, kk_, vv, zero, zero)
    dyT = np.zeros((T_long, N))
    dyT[-1] = 1.0                                        # L = sum(y_T)
    g = wkv_one_head_backward(dyT, st, rr, w_c, kk_, vv, zero, zero)
    fade = decay ** (T_long - 1 - np.arange(T_long))                 # w^(T-1-t), (T,)
    expected = (kk_ * fade[:, None]) @ rr[-1]                           # (T,)
    terms = (np.abs(kk_) * fade[:, None]) @ np.abs(rr[-1])              # sum of |terms|, (T,)
    # float64 rounding of a sum of N terms, relative to the sum of their sizes
    assert np.all(np.abs(g[3] - expected[:, None]) <= 1e-12 * terms[:, None]), decay
    ax.semilogy(np.arange(T_long), np.abs(g[3]).max(axis=1) + 1e-300, label=f"w = {decay}")
ax.set_xlabel("token t")
ax.set_ylabel("max |dL / dv_t|")
ax.set_ylim(1e-12, 1e2)
ax.set_title("gradient of the last output reaching back to each value")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 5. Memory: checkpoints instead of every state
#
# The backward needs `S_{t-1}` at every token. Keeping them all costs `T N^2` numbers per head,
# so a 4096-token sequence of a 64-wide head would take 64 MiB (4096 × 64 × 64 × 4 bytes) of
# float32 per head and layer. Instead, the forward can keep only the state at the start of each
# **chunk** of tokens (a checkpoint), and the backward, arriving at a chunk, recomputes that
# chunk's states from its checkpoint and goes back through them. That costs one more forward
# pass, and holds `ceil(T / chunk)` checkpoints plus one chunk of states instead of `T + 1`
# states.
#
# Recomputing runs the same operations on the same numbers in the same order, so the recomputed
# states are the stored ones, bit for bit, and so are the gradients.

# %%
def wkv_one_head_checkpointed(S0, r, w, k, v, alpha, beta, chunk):
    """wkv_one_head, keeping only the state before tokens 0, chunk, 2 chunk, ...
    Returns y (T, N) and the checkpoints (ceil(T / chunk), N, N)."""
    saved, y = [], np.empty_like(r)
    for t0 in range(0, len(r), chunk):
        saved.append(S0)
        part = slice(t0, t0 + chunk)
        y[part], chunk_states = wkv_one_head(S0, r[part], w[part], k[part], v[part],
                                             alpha[part], beta[part])
        S0 = chunk_states[-1]                    # the chunk's other states are dropped here
    return y, np.stack(saved)


def wkv_one_head_backward_checkpointed(dy, saved, chunk, r, w, k, v, alpha, beta):
    """wkv_one_head_backward from checkpoints: each chunk's states recomputed on the way back."""
    grads = [np.zeros_like(r) for _ in range(6)]
    G = np.zeros_like(saved[0])
    for c in reversed(range(len(saved))):
        t0 = c * chunk
        part = slice(t0, t0 + chunk)
        _, chunk_states = wkv_one_head(saved[c], r[part], w[part], k[part], v[part],
                                       alpha[part], beta[part])     # S_{t0} .. S_{t0 + chunk}
        for t in reversed(range(t0, min(t0 + chunk, len(r)))):
            G, token = back_one_token(G, dy[t], chunk_states[t - t0], chunk_states[t - t0 + 1],
                                      r[t], w[t], k[t], v[t], alpha[t], beta[t])
            for g, d in zip(grads, token):
                g[t] = d
    return (*grads, G)


chunk = 4
y_ck, saved = wkv_one_head_checkpointed(S0, r, w, k, v, alpha, beta, chunk)
grads_ck = wkv_one_head_backward_checkpointed(dy, saved, chunk, r, w, k, v, alpha, beta)
print(f"T = {T}: {len(states)} states kept, or {len(saved)} checkpoints + {chunk + 1} states "
      f"of one chunk at a time")
assert len(saved) == -(-T // chunk)                                  # ceil(T / chunk)
assert np.array_equal(y_ck, y)                                       # the same outputs, bit for bit
assert all(np.array_equal(a, b) for a, b in zip(grads_ck, grads))    # and the same gradients
print("checkpointed backward == backward from every state: identical bits")

# %% [markdown]
# The library's `tinyrwkv.train.wkv_forward` and `wkv_backward` are the same two functions for a
# batch of sequences and all heads at once, on `(B, T, H, N)` arrays: the forward returns the
# checkpoints (`saved`), one every `chunk` tokens (16 by default), and the backward recomputes a
# chunk at a time. Checked here against yours, head by head, and against itself with `chunk=1`
# (every state kept):

# %%
B, Hb, Tb = 2, 3, 40
batch = lambda: rng.standard_normal((B, Tb, Hb, N))
rb, kb, vb, dyb = batch(), batch(), batch(), batch()
wb = np.exp(-0.6065 * rng.uniform(0.05, 1, (B, Tb, Hb, N)))
kap = batch()
kap /= np.linalg.norm(kap, axis=-1, keepdims=True)
ab, bb = -kap, kap * rng.uniform(0, 1, (B, Tb, Hb, N))
S0b = rng.standard_normal((B, Hb, N, N))
library = {}
for ck in (1, 16):
    S_last, yb, saved_b = train.wkv_forward(S0b, rb, wb, kb, vb, ab, bb, chunk=ck)
    # no gradient from the last state (None); returns dS0, dr, dw, dk, dv, dalpha, dbeta
    library[ck] = (yb, train.wkv_backward(None, dyb, saved_b, rb, wb, kb, vb, ab, bb, chunk=ck))
    assert saved_b.shape == (-(-Tb // ck), B, Hb, N, N)          # ceil(T / chunk) checkpoints
    print(f"library, chunk {ck:2d}: {saved_b.shape[0]:2d} checkpoints of (B, H, N, N), "
          f"{saved_b.nbytes / 1e3:5.1f} kB")
assert all(np.array_equal(a, b) for a, b in zip(library[1][1], library[16][1]))   # bit for bit
worst_lib = 0.0
for b in range(B):
    for hh in range(Hb):
        one = lambda u: u[b, :, hh]                                                   # (T, N)
        y_mine, st = wkv_one_head(S0b[b, hh], *map(one, (rb, wb, kb, vb, ab, bb)))
        mine = wkv_one_head_backward(one(dyb), st, *map(one, (rb, wb, kb, vb, ab, bb)))
        lib_y, lib_g = library[16]
        theirs = [one(g) for g in lib_g[1:]] + [lib_g[0][b, hh]]       # dr .. dbeta, then dS0
        for a, c in zip((y_mine, *mine), (one(lib_y), *theirs)):
            worst_lib = max(worst_lib, np.abs(a - c).max() / np.abs(c).max())
print(f"yours vs tinyrwkv.train (y and every gradient): max|Δ| / max|value| = {worst_lib:.1e}")
assert worst_lib < 1e-12      # float64; einsum adds in another order than @: last bits only

# %% [markdown]
# ## 6. The whole model
#
# `tinyrwkv.train.loss_and_grad(params, ids, targets)` runs the sequence form on a batch, keeping
# every intermediate it will need, then goes back through the loss, the head, `ln_out` and each
# layer in reverse. We first write **the top of that backward** ourselves, on a tiny float64 model,
# from the hidden vectors the library's forward pass produces (`RWKV7.forward_seq`: the output
# of the last layer, before `ln_out`).
#
# * The loss is the mean over the `n = B T` positions of $-\log \mathrm{softmax}(\text{logits})_{\text{target}}$;
#   its gradient with respect to the logits is `(softmax - one_hot(target)) / n`.
# * `logits = xo @ head.T`, so `dhead = dlogits^T xo` and `dxo = dlogits @ head`.
# * `xo = xhat * ln_out.weight + ln_out.bias` (`xhat`: the normalised `x`), so
#   `d ln_out.bias = sum(dxo)` and `d ln_out.weight = sum(dxo * xhat)` over the positions.

# %%
V_tiny = 37
params = make_weights(2, 32, V_tiny, head_size=16, dim_ffn=48, ranks=(8, 8, 4, 8), seed=1,
                      dtype=np.float64)
ids, targets = rng.integers(0, V_tiny, (2, 7)), rng.integers(0, V_tiny, (2, 7))     # (B, T)
L0, grad = train.loss_and_grad(params, ids, targets)

reference = tinyrwkv.RWKV7(params, dtype="float64")
x_last = np.stack([reference.forward_seq(seq, reference.zero_state())[0] for seq in ids])  # (B, T, C)
mu = x_last.mean(axis=-1, keepdims=True)
xhat = (x_last - mu) / np.sqrt(x_last.var(axis=-1, keepdims=True) + 1e-5)   # LayerNorm eps 1e-5
xo = xhat * params["ln_out.weight"] + params["ln_out.bias"]                   # (B, T, C)
logits = xo @ params["head.weight"].T                                         # (B, T, V)
logp = logits - logits.max(axis=-1, keepdims=True)
logp -= np.log(np.exp(logp).sum(axis=-1, keepdims=True))                      # log softmax
n = targets.size
my_loss = -np.take_along_axis(logp, targets[..., None], axis=-1).sum() / n
dlogits = np.exp(logp)                                                        # softmax (B, T, V)
np.put_along_axis(dlogits, targets[..., None],
                  np.take_along_axis(dlogits, targets[..., None], axis=-1) - 1, axis=-1)
dlogits /= n
dhead = dlogits.reshape(n, -1).T @ xo.reshape(n, -1)                          # (V, C)
dxo = dlogits @ params["head.weight"]                                         # (B, T, C)
mine = {"head.weight": dhead, "ln_out.bias": dxo.sum(axis=(0, 1)),
        "ln_out.weight": (dxo * xhat).sum(axis=(0, 1))}
print(f"loss: yours {my_loss:.12f}, library {L0:.12f} nats (uniform guessing: ln {V_tiny} = "
      f"{np.log(V_tiny):.4f})")
assert abs(my_loss - L0) < 1e-12 * L0          # float64; the chunked and batched forms round apart
for key, g in mine.items():
    err = np.abs(g - grad[key]).max() / np.abs(grad[key]).max()
    print(f"  {key:14s} yours vs library: max|Δ| / max|grad| = {err:.1e}")
    assert err < 1e-10, key                    # float64, same math in another summation order

# %% [markdown]
# From `dxo` the library goes on down: `norm_backward` takes it through `ln_out` to the last
# layer's output, and `_block_backward` undoes one layer, bottom line of `model.block` first: the
# channel mix (squared ReLU and token shift), the output projection, the group norm and bonus,
# the WKV operator (sections 2 and 5), the `kappa_hat` normalisation, the value residual that
# feeds layer 0's value into every later layer, the four LoRA paths, and the six token-shift
# lerps. Each is the chain rule applied to one or two lines of `tinyrwkv/model.py`, as you did
# above; `tinyrwkv/train.py` reads best side by side with it.
#
# Is all of it right? One finite difference can check **every** tensor at once: move all the
# parameters along one random unit direction `D` and compare the change of the loss with
# `sum(grad * D)`, the derivative along `D`. A wrong tensor would show up, though not which one;
# spot checks on single entries of a few tensors then point at a culprit.
#
# The step `h` needs more care here than in section 3, because the error of a central difference
# has two parts that pull in opposite directions: the Taylor remainder `h^2 |L'''| / 6` grows with
# `h`, the rounding of the loss `eps |L| / h` (about `1e-15 / h` here) shrinks with it. The
# embedding starts tiny (uniform in ±1e-4, RWKV-LM's initialisation, docs/architecture.md §10)
# and `ln0` divides it by its own spread, so the loss bends sharply along it: its `L'''` is huge.
# The check along `D`, which includes the embedding, therefore takes a small step, `h = 1e-6`
# (rounding then costs about `1e-9` on a derivative of order 1). The spot checks leave the
# embedding out; their gradients are as small as `1e-5` per entry, so they take `h = 1e-4`, where
# rounding costs about `1e-11`. Both are held to a relative error of `1e-6` (along `D`) and
# `1e-5` of the tensor's typical gradient (spot checks): 100 times what the two error terms
# allow here, and far below the error of a wrong term.

# %%
def loss_at(p):
    return train.loss_and_grad(p, ids, targets)[0]


D = {key: rng.standard_normal(p.shape) for key, p in params.items()}
length = np.sqrt(sum((d ** 2).sum() for d in D.values()))
D = {key: d / length for key, d in D.items()}                       # a unit step in all of them
along = lambda s: {key: p + s * D[key] for key, p in params.items()}
h = 1e-6
fd = (loss_at(along(h)) - loss_at(along(-h))) / (2 * h)
exact = sum(float((grad[key] * D[key]).sum()) for key in params)
print(f"along a random direction: finite difference {fd:.10f}, sum(grad * D) {exact:.10f}, "
      f"relative error {abs(fd - exact) / abs(exact):.1e}")
assert abs(fd - exact) < 1e-6 * abs(exact)

h = 1e-4
for key in ("blocks.1.att.w0", "blocks.1.att.v2", "blocks.0.att.k_k", "blocks.0.ffn.key.weight",
            "blocks.1.att.a1", "head.weight"):
    scale = np.sqrt(np.mean(grad[key] ** 2))                       # the typical size of this gradient
    errs = []
    for idx in map(tuple, rng.integers(0, params[key].shape, (3, params[key].ndim))):
        p_plus, p_minus = dict(params), dict(params)
        p_plus[key], p_minus[key] = params[key].copy(), params[key].copy()
        p_plus[key][idx] += h
        p_minus[key][idx] -= h
        fd = (loss_at(p_plus) - loss_at(p_minus)) / (2 * h)
        errs.append(abs(fd - grad[key][idx]) / scale)
    print(f"  {key:24s} typical gradient {scale:.1e}; |numeric - analytic| up to {max(errs):.1e} of it")
    assert max(errs) < 1e-5, key

# %% [markdown]
# ## 7. Under a minute of training
#
# A tiny model (2 layers, 64 wide) on a 40 KB slice of TinyStories that ships with this
# repository, `chapters/data/stories_slice.txt` (52 short stories; its source and licence,
# CDLA-Sharing-1.0, are in `chapters/data/README.md`). It is the beginning of the text the model
# in `weights/` was trained on. We work at the byte level: each byte is a token, so no tokenizer
# has to be trained. The loop is plain AdamW, the same update `tinyrwkv train` uses
# (`tinyrwkv/trainer.py`). It takes random 32-byte windows, four at a time, with warm-up, cosine
# decay and gradient clipping.
#
# One practical detail: the matrix products here are tiny (a few thousand numbers), and NumPy's
# BLAS would share each one among all the cores. On a busy machine that is the collapse of
# chapter 05 §7: every product waits at a barrier for a thread that is off its core, and a step
# can take many times longer. So the loop runs BLAS on one thread (`threadpool_limits(1)`,
# from `threadpoolctl`, a dependency of tinyrwkv); for products this small one thread is also
# the faster choice on a quiet machine.

# %%
data_file = Path("data") / "stories_slice.txt"         # relative to chapters/, where this runs
if not data_file.is_file():
    raise FileNotFoundError(f"{data_file.resolve()} not found: it ships with the repository in "
                            "chapters/data/. Run this notebook from the chapters/ folder.")
text = data_file.read_bytes()
data = np.frombuffer(text, np.uint8).astype(np.int64)     # (bytes,) one token per byte
print(f"{len(text):,} bytes, {text.count(b'<|endoftext|>')} stories; the first: "
      f"{text[:120].decode()!r}...")
V = 256


class Args:                      # the trainer's optimiser settings
    lr, min_lr_ratio, warmup, steps = 4e-3, 0.1, 10, 300
    beta1, beta2, eps, weight_decay = 0.9, 0.99, 1e-8, 0.1


params = make_weights(2, 64, V, head_size=32, training_init=True, seed=0)
opt = {"m": {k: np.zeros_like(p) for k, p in params.items()},
       "v": {k: np.zeros_like(p) for k, p in params.items()}, "t": 0}
losses, t0 = [], time.perf_counter()
with threadpool_limits(1):                                         # BLAS on one thread
    for step in range(Args.steps):
        starts = rng.integers(0, len(data) - 33, 4)
        inp = np.stack([data[s:s + 32] for s in starts])           # (4, 32)
        tgt = np.stack([data[s + 1:s + 33] for s in starts])       # (4, 32): the next bytes
        loss_value, g = train.loss_and_grad(params, inp, tgt)
        norm = np.sqrt(sum((gi.astype(np.float64) ** 2).sum() for gi in g.values()))
        if norm > 1.0:
            g = {k: gi / norm for k, gi in g.items()}
        adamw_step(params, g, opt, lr_at(step, Args), Args)
        losses.append(loss_value)
losses = np.array(losses)
print(f"{Args.steps} steps in {time.perf_counter() - t0:.0f} s; loss {losses[:10].mean():.2f} -> "
      f"{losses[-10:].mean():.2f} nats/byte")

# %% [markdown]
# The curve below smooths the noisy per-step loss with a moving average of `k = 10` steps. A
# "valid" convolution returns `len(losses) - k + 1` averages, and average `j` covers steps
# `j .. j + k - 1`; drawing it at `x = j` would put each average `k - 1` steps before the last
# step it includes, and shift the whole curve 9 steps to the left. So it is drawn at its last
# step: the smoothed value at step `i` is the mean of steps `i - k + 1 .. i`, which the code
# asserts.

# %%
k = 10
smooth = np.convolve(losses, np.ones(k) / k, mode="valid")      # (len(losses) - k + 1,)
smooth_steps = np.arange(k - 1, len(losses))                    # each average at its last step
assert len(smooth_steps) == len(smooth)
for i, value in zip(smooth_steps, smooth):
    assert np.isclose(value, losses[i - k + 1: i + 1].mean())   # steps i-k+1 .. i

fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(losses, lw=0.8, label="loss per step")
ax.plot(smooth_steps, smooth, lw=2, label=f"mean of the last {k} steps")
ax.axhline(np.log(256), ls="--", color="gray", label="uniform over 256 bytes")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats/byte)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# What has it learnt? We continue the start of a story with the reference forward pass on the
# trained parameters, twice: greedily (always the most likely next byte), and by sampling
# (`tinyrwkv.sample_logits`, temperature 1 and top-p 0.85, with a fixed seed).

# %%
tiny = tinyrwkv.RWKV7(params)
prompt = b"Once upon a time"
first_logits, first_state = tiny.forward(list(prompt))
draw = np.random.default_rng(1)
for name, pick in (("greedy", lambda l: int(np.argmax(l))),
                   ("sampled", lambda l: tinyrwkv.sample_logits(l, 1.0, 0.85, rng=draw))):
    logits, state, story = first_logits, first_state, bytearray(prompt)
    for _ in range(120):
        story.append(pick(logits))
        logits, state = tiny.forward([story[-1]], state)
    print(f"{name:8s}", repr(story.decode("utf-8", errors="replace")))

# %% [markdown]
# The loss starts near `ln 256 = 5.5` nats per byte: at RWKV-LM's initialisation the logits are
# small, so the first guess is close to uniform over the 256 bytes. Over 300 steps it falls by
# well over a nat: the model learns which bytes are common in English, then frequent pairs and
# short words. That is about what a few hundred small steps on 40 KB can teach. Greedy decoding
# of a model this weak tends to fall into a loop of its most likely words; sampling shows more of
# what it learnt: word-like pieces, spaces and punctuation in roughly the right places, but no
# story yet. `tinyrwkv train` does the same at scale: a BPE tokenizer, bigger batches, Numba or
# CUDA kernels for the WKV backward, validation and checkpoints. The model in `weights/` was
# trained with it; its model card (`weights/MODEL_CARD.md`) records how.

# %% [markdown]
# ## 8. Training in parallel: the backward in chunked form
#
# The backward of section 5 walks back through the tokens one at a time: `T` steps, each a handful
# of small array operations, and none can start before the one after it has finished. Chapter 03
# showed the forward does not have to work that way: `model.wkv_chunk` computes a whole chunk of
# `L` tokens (16) in closed form, with matrix products (docs/architecture.md §6.3). The backward
# can be the same closed form differentiated, a chunk at a time (docs/architecture.md §6.6):
#
# * A chunk is an **affine map of its start state**: `S_end = S_start A + U`, where the `N x N`
#   matrix `A` and `U` (the chunk run from a zero state) depend only on the chunk's own tokens.
#   So every chunk's `A`, `U` and its outputs from a zero state can be computed at once, for all
#   chunks and heads in one batch of matrix products. Only the chain
#   `S_{c+1} = S_c A_c + U_c`, `T / L` products of `N x N` matrices, is sequential.
# * The backward runs that chain transposed, from the end: `G_{c-1} = G_c A_c^T + dY_c^T R_c`
#   (`G_c` is dL/dS at the end of chunk `c`). Given every `G_c`, each chunk's gradients come from
#   the chain rule through the closed form, again all chunks at once: gradients of matrix
#   products (`dA = dY B^T`, `dB = A^T dY`), masked to the lower triangle, and for the one linear
#   solve `(I - A_ab) Z = rhs`, a solve with the transpose: `d rhs = (I - A_ab)^{-T} dZ`.
#
# `tinyrwkv.train.wkv_chunked_forward` and `wkv_chunked_backward` are this, with the contract
# of `wkv_forward` / `wkv_backward` (the same `saved` checkpoints), so either pair can go into
# `loss_and_grad(..., wkv_ops=...)`: `train.RECURRENT_WKV` or `train.CHUNKED_WKV`. First, they
# compute the same thing: on the batch of section 5, with a gradient arriving at the last state
# too, float64:

# %%
dS_last = rng.standard_normal(S0b.shape)
pairs = {"recurrent": train.RECURRENT_WKV, "chunked": train.CHUNKED_WKV}
results = {}
for name, (forward, backward) in pairs.items():
    S_last, y_pair, saved_pair = forward(S0b, rb, wb, kb, vb, ab, bb)
    results[name] = (S_last, y_pair, *backward(dS_last, dyb, saved_pair, rb, wb, kb, vb, ab, bb))
labels = ("S_T", "y", "dS0", "dr", "dw", "dk", "dv", "dalpha", "dbeta")
worst_chunked = 0.0
for label, a, c in zip(labels, results["chunked"], results["recurrent"]):
    err = np.abs(a - c).max() / np.abs(c).max()
    worst_chunked = max(worst_chunked, err)
    print(f"  {label:7s} chunked vs recurrent: max|Δ| / max|value| = {err:.1e}")
assert worst_chunked < 1e-12           # float64: the same function summed in another order

# %% [markdown]
# Where does the time go? Both are NumPy, on the same inputs: a batch of `B` sequences of `T`
# tokens with `B T` = 2048 tokens in all, 4 heads of 64 (the shipped model's), float32 (what
# training uses), forward and backward together, the best of two runs on this machine. The
# recurrent pair makes `T` trips through Python per pass, each a dozen operations on
# `(B, H, N, N)` arrays; the chunked pair makes `T / 16` trips for its chain and does the rest in
# a fixed number of large batched products. At a fixed number of tokens, a longer `T` means
# more trips on smaller arrays for the recurrent pair, and the same batched products for the
# chunked one.

# %%
def seconds(forward, backward, args, dy, repeats=2):
    best = np.inf
    for _ in range(repeats):
        t = time.perf_counter()
        _, _, sv = forward(*args)
        backward(None, dy, sv, *args[1:])
        best = min(best, time.perf_counter() - t)
    return best


Hs, Ns, total = 4, 64, 2048
Ts = (32, 128, 512, 2048)
speed = {name: [] for name in pairs}
print(f"{'T':>5} {'B':>3} {'recurrent tok/s':>16} {'chunked tok/s':>14} {'ratio':>6}")
for Tt in Ts:
    Bt = total // Tt
    vecs = [rng.standard_normal((Bt, Tt, Hs, Ns)) for _ in range(4)]            # r, k, v, dy
    w_t = np.exp(-0.6065 * rng.uniform(0.05, 1, (Bt, Tt, Hs, Ns)))
    kap_t = rng.standard_normal((Bt, Tt, Hs, Ns))
    kap_t /= np.linalg.norm(kap_t, axis=-1, keepdims=True)
    args = (np.zeros((Bt, Hs, Ns, Ns)), vecs[0], w_t, vecs[1], vecs[2], -kap_t,
            kap_t * rng.uniform(0, 1, (Bt, Tt, Hs, Ns)))
    args, dy_t = tuple(a.astype(np.float32) for a in args), vecs[3].astype(np.float32)
    for name, (forward, backward) in pairs.items():
        speed[name].append(total / seconds(forward, backward, args, dy_t))
    print(f"{Tt:5d} {Bt:3d} {speed['recurrent'][-1]:16,.0f} {speed['chunked'][-1]:14,.0f} "
          f"{speed['chunked'][-1] / speed['recurrent'][-1]:6.1f}")

fig, ax = plt.subplots(figsize=(6, 3))
for name in pairs:
    ax.plot(Ts, speed[name], "o-", label=f"{name} (NumPy)")
ax.set_xscale("log", base=2)
ax.set_xlabel(f"sequence length T (B = {total} / T sequences)")
ax.set_ylabel("tokens/s, forward + backward")
ax.set_ylim(bottom=0)
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# **Why RWKV trains like a Transformer.** Run as an RNN, RWKV-7 needs the state of token `t - 1`
# before it can process token `t`; trained that way, `T` tokens are `T` steps one after
# another. The chunked form removes almost all of that: inside a chunk every token's output
# and gradient are matrix products over the whole chunk (`L x L` matrices of pairwise weights,
# the same shape of work as attention over a block of `L` tokens), and across chunks only the
# state is handed on: `T / L` steps of one `N x N` product each, forward and back. Matrix
# products over whole chunks are what BLAS on a CPU and tensor cores on a GPU are built for,
# and that is how RWKV-7 is trained at scale (RWKV-LM's and fla's chunked kernels): in parallel
# over the sequence like a Transformer, while it still runs as an RNN with a fixed-size state.
#
# The ratio above is NumPy against NumPy. A compiled recurrent kernel (`tinyrwkv train` uses
# Numba's on the CPU and a CUDA kernel on the GPU) has no Python overhead per token, so which
# pair is faster in the trainer depends on the backend and `T`: `train.choose_wkv_ops` picks,
# from the measurements in `benchmarks/results/train_wkv_*.md`.

# %% [markdown]
# ## Checks
#
# Everything this chapter claims is asserted where it is shown; the key ones again, in one place:

# %%
assert max(worst.values()) < 1e-6                       # section 3: backward = finite differences
assert all(np.array_equal(a, b) for a, b in zip(grads_ck, grads))    # section 5: checkpoints
assert worst_lib < 1e-12                                 # section 5: yours = tinyrwkv.train
assert worst_chunked < 1e-12                             # section 8: chunked = recurrent
assert abs(losses[0] - np.log(256)) < 0.2                # starts near uniform (small logits)
assert losses[-10:].mean() < losses[:10].mean() - 1.0    # and has learnt more than a nat per byte
print(f"all checks passed; chapter ran in {time.perf_counter() - CHAPTER_START:.1f} s")
