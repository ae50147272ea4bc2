# %% [markdown]
# # 06 · Training: backpropagation through the recurrence
#
# **What you will build.** Every chapter so far ran RWKV-7 forwards. Here you differentiate it.
# You will write the backward pass of the WKV recurrence by hand, going back through time one
# token at a time. You will check it against finite differences, see how far back in the text a
# gradient reaches depending on the decay, and keep memory bounded by recomputing states from
# checkpoints. Then you will check the whole model's hand-written gradient (`tinyrwkv.train`)
# the same way, train a tiny model for a minute, and watch the loss fall.
#
# **Prerequisites.** [01 · Time mixing](01_time_mixing.ipynb) for the WKV state and
# [04 · The whole model](04_whole_model.ipynb). Calculus used: the chain rule, and the gradient of
# a matrix product (if `Y = A B` then `dA = dY B^T` and `dB = A^T dY`).
#
# Names: `T` tokens, `N` head size, `S` the state of one head, `(N, N)`, with rows the **value**
# index and columns the **key** index. The operator's inputs follow the official CUDA kernel:
# `r, w, k, v`, `alpha = -kappa_hat` and `beta = kappa_hat * a`.

# %%
import time

import matplotlib.pyplot as plt
import numpy as np

from tinyrwkv import train
from tinyrwkv.synthetic import make_weights
from tinyrwkv.trainer import adamw_step, lr_at

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
# same transition matrix, so it decays just as the state does.

# %%
def wkv_one_head_backward(dy, states, r, w, k, v, alpha, beta):
    """Gradients of sum(dy * y) for wkv_one_head. Returns dr, dw, dk, dv, dalpha, dbeta, dS0."""
    grads = [np.zeros_like(r) for _ in range(6)]
    dr, dw, dk, dv, dalpha, dbeta = grads
    G = np.zeros_like(states[0])
    for t in reversed(range(len(r))):
        S_prev, S_t = states[t], states[t + 1]
        G = G + np.outer(dy[t], r[t])
        dr[t] = S_t.T @ dy[t]
        dv[t], dk[t] = G @ k[t], G.T @ v[t]
        dw[t] = (G * S_prev).sum(axis=0)
        dbeta[t] = G.T @ (S_prev @ alpha[t])
        Gb = G @ beta[t]
        dalpha[t] = S_prev.T @ Gb
        G = G * w[t] + np.outer(Gb, alpha[t])
    return dr, dw, dk, dv, dalpha, dbeta, G


dy = rng.standard_normal((T, N))                  # L = sum(dy * y): its gradient wrt y is dy
grads = wkv_one_head_backward(dy, states, r, w, k, v, alpha, beta)

# %% [markdown]
# ## 3. Is it right? Central finite differences
#
# Nudge one input by `+h` and by `-h` and look at the change in `L`. The difference
# `(L(x + h) - L(x - h)) / 2h` is the derivative up to `O(h^2)`. In float64 with `h = 1e-5`
# it agrees with the exact gradient to about `1e-10`. A wrong term in the backward would be off
# by the size of the gradient itself.

# %%
def loss(S0, r, w, k, v, alpha, beta):
    return float((dy * wkv_one_head(S0, r, w, k, v, alpha, beta)[0]).sum())


inputs = dict(r=r, w=w, k=k, v=v, alpha=alpha, beta=beta)
names = list(inputs) + ["S0"]
worst = {}
h = 1e-5
for n, name in enumerate(names):
    x = S0 if name == "S0" else inputs[name]
    g = grads[n]
    errs = []
    for idx in map(tuple, rng.integers(0, x.shape, (5, x.ndim))):
        xp, xm = x.copy(), x.copy()
        xp[idx] += h
        xm[idx] -= h
        args_p = {**inputs, **({name: xp} if name != "S0" else {})}
        args_m = {**inputs, **({name: xm} if name != "S0" else {})}
        fp = loss(xp if name == "S0" else S0, **args_p)
        fm = loss(xm if name == "S0" else S0, **args_m)
        errs.append(abs((fp - fm) / (2 * h) - g[idx]))
    worst[name] = max(errs)
print("largest |finite difference - analytic| per input:")
for name, e in worst.items():
    print(f"  {name:6s} {e:.1e}")

# %% [markdown]
# ## 4. How far back does a gradient reach?
#
# The gradient of the last output `y_T` with respect to an earlier value `v_t` has to pass
# through every transition between `t` and `T`. Each transition multiplies the key columns by
# their decay `w`. With slow decays the gradient reaches far back; with fast ones it dies within
# a few tokens. (The plot uses a longer sequence and no removal term, to show the decay alone.)

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
# so a 4096-token sequence of a 64-wide head would take 64 MB of float32 per head and layer.
# `tinyrwkv.train.wkv_forward` keeps only the state at the start of each chunk of 16 tokens.
# `wkv_backward` then recomputes the 16 states of one chunk at a time, on the way back. That is
# one extra forward pass, in exchange for 16x less memory. The result is the same to the last bit.

# %%
B, H = 2, 3
batch = lambda *s: rng.standard_normal((B, 40, H, N))
rb, kb, vb = batch(), batch(), batch()
wb = np.exp(-0.6065 * rng.uniform(0.05, 1, (B, 40, H, N)))
kap = batch()
kap /= np.linalg.norm(kap, axis=-1, keepdims=True)
ab, bb = -kap, kap * rng.uniform(0, 1, (B, 40, H, N))
S0b = rng.standard_normal((B, H, N, N))
dyb = batch()
for chunk in (1, 16):
    S_last, yb, ckpt = train.wkv_forward(S0b, rb, wb, kb, vb, ab, bb, chunk=chunk)
    # no gradient from the last state (None); returns dS0, dr, dw, dk, dv, dalpha, dbeta
    gb = train.wkv_backward(None, dyb, ckpt, rb, wb, kb, vb, ab, bb, chunk=chunk)
    print(f"chunk {chunk:2d}: {ckpt.shape[0]:2d} stored states, "
          f"{ckpt.nbytes / 1e3:6.1f} kB;  |dv| sum = {np.abs(gb[4]).sum():.12f}")

# %% [markdown]
# ## 6. The whole model
#
# `tinyrwkv.train.loss_and_grad(params, ids, targets)` runs the batched sequence form with a
# cache of every intermediate. Then it goes back through the loss, the head, `ln_out` and each
# layer in reverse. A layer's backward undoes the channel mix (squared ReLU and token shift), the
# output projection, the group norm and bonus, the WKV operator (section 2), the `kappa_hat`
# normalisation, the value residual that feeds layer 0's value into every later layer, the four
# LoRA paths, and the six token-shift lerps. The same finite-difference check on a tiny model,
# for a few tensors:

# %%
params = make_weights(2, 32, 37, head_size=16, dim_ffn=48, ranks=(8, 8, 4, 8), seed=1,
                      dtype=np.float64)
ids, targets = rng.integers(0, 37, (2, 7)), rng.integers(0, 37, (2, 7))
L0, grad = train.loss_and_grad(params, ids, targets)
print(f"loss {L0:.4f} nats (uniform guessing: ln 37 = {np.log(37):.4f})")
for key in ("blocks.1.att.w0", "blocks.1.att.v2", "blocks.0.att.k_k", "blocks.0.ffn.key.weight",
            "head.weight"):
    idx = tuple(rng.integers(0, params[key].shape))
    step = 1e-4
    p_plus, p_minus = dict(params), dict(params)
    p_plus[key], p_minus[key] = params[key].copy(), params[key].copy()
    p_plus[key][idx] += step
    p_minus[key][idx] -= step
    fd = (train.loss_and_grad(p_plus, ids, targets)[0]
          - train.loss_and_grad(p_minus, ids, targets)[0]) / (2 * step)
    print(f"  {key:26s} analytic {grad[key][idx]: .6e}   numeric {fd: .6e}")

# %% [markdown]
# ## 7. A minute of training
#
# A tiny model (2 layers, 64 wide) on a slice of tinyshakespeare, at the character level: each
# byte is a token, so no tokenizer has to be trained. The loop is plain AdamW, the same update
# `tinyrwkv train` uses. It takes random 32-token windows, four at a time, with warm-up, cosine
# decay and gradient clipping.

# %%
from pathlib import Path

data_file = Path("../../shared/data/tinyshakespeare/train.txt")
if not data_file.exists():
    data_file = Path("../shared/data/tinyshakespeare/train.txt")
text = data_file.read_bytes()[:200_000] if data_file.exists() else \
    b"To be, or not to be, that is the question. " * 2000
data = np.frombuffer(text, np.uint8).astype(np.int64)
V = 256


class Args:                      # the trainer's optimiser settings
    lr, min_lr_ratio, warmup, steps = 4e-3, 0.1, 10, 150
    beta1, beta2, eps, weight_decay = 0.9, 0.99, 1e-8, 0.1


params = make_weights(2, 64, V, head_size=32, training_init=True, seed=0)
opt = {"m": {k: np.zeros_like(p) for k, p in params.items()},
       "v": {k: np.zeros_like(p) for k, p in params.items()}, "t": 0}
losses, t0 = [], time.perf_counter()
for step in range(Args.steps):
    starts = rng.integers(0, len(data) - 33, 4)
    inp = np.stack([data[s:s + 32] for s in starts])
    tgt = np.stack([data[s + 1:s + 33] for s in starts])
    loss_value, g = train.loss_and_grad(params, inp, tgt)
    norm = np.sqrt(sum((gi.astype(np.float64) ** 2).sum() for gi in g.values()))
    if norm > 1.0:
        g = {k: gi / norm for k, gi in g.items()}
    adamw_step(params, g, opt, lr_at(step, Args), Args)
    losses.append(loss_value)
print(f"{Args.steps} steps in {time.perf_counter() - t0:.0f} s; loss {np.mean(losses[:10]):.2f} -> "
      f"{np.mean(losses[-10:]):.2f} nats/byte")

fig, ax = plt.subplots(figsize=(7, 3))
ax.plot(losses, lw=0.8, label="loss per step")
ax.plot(np.convolve(losses, np.ones(10) / 10, mode="valid"), lw=2, label="mean of 10")
ax.axhline(np.log(256), ls="--", color="gray", label="uniform over 256 bytes")
ax.set_xlabel("step")
ax.set_ylabel("cross-entropy (nats/byte)")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# The loss falls from `ln 256 = 5.5` (a uniform guess) towards the byte statistics of English
# within a minute. `tinyrwkv train` does the same at scale: a BPE tokenizer, bigger batches,
# Numba kernels for the WKV backward, validation and checkpoints. The model in `weights/` was
# trained with it; its model card records how.
#
# ## Checks against the library

# %%
assert max(worst.values()) < 1e-8, worst
one = train.wkv_forward(S0[None, None], r[None, :, None], w[None, :, None], k[None, :, None],
                        v[None, :, None], alpha[None, :, None], beta[None, :, None])
assert np.allclose(one[1][0, :, 0], y)                   # section 1's loop = the library's
lib = train.wkv_backward(None, dy[None, :, None], one[2], r[None, :, None], w[None, :, None],
                         k[None, :, None], v[None, :, None], alpha[None, :, None],
                         beta[None, :, None])         # dS0, then dr, dw, dk, dv, dalpha, dbeta
assert all(np.allclose(a[0, :, 0], b) for a, b in zip(lib[1:], grads[:6]))
assert np.allclose(lib[0][0, 0], grads[6])
assert np.mean(losses[-10:]) < np.mean(losses[:10]) - 1.0
print("all checks passed")
