"""`tinyrwkv.ops.wkv7`: the WKV operator alone, in float64, forward and backward, in the argument
conventions other implementations use, so a kernel can be checked against it directly.

    y, S = tinyrwkv.ops.wkv7(r, w, k, v, a, b, state, **tinyrwkv.ops.FLA)
    grads = tinyrwkv.ops.wkv7_backward(dy, dS, r, w, k, v, a, b, state, **tinyrwkv.ops.FLA)

The operator, per head (S is [value][key]):
    S_t = S_{t-1} (diag(decay_t) + a_t b_t^T) + v_t k_t^T,   y_t = S_t r_t
with a = -kappa_hat and b = kappa_hat * (in-context learning rate) in the model.

| convention          | `w` means                                  | tensor layout      | state       |
|---------------------|--------------------------------------------|--------------------|-------------|
| tinyrwkv, official RNN (`TINYRWKV`) | the decay itself, in (0, 1) | (B, T, H, N)      | [V][K]      |
| official CUDA `wkv7s` (`OFFICIAL_CUDA`) | w with decay = exp(-exp(w)) | (B, T, H, N) = (T, C) per B | [V][K] |
| fla `chunk_rwkv7` / `fused_recurrent_rwkv7` (`FLA`) | log decay, in (-e^-0.5, 0) | (B, T, H, N); `head_first=True`: (B, H, T, N) | [K][V] |

Inputs may also be (T, H, N) (one sequence). All computation is float64; inputs are converted.
"""

from __future__ import annotations

import numpy as np

from . import train

TINYRWKV = dict(w_form="decay", state_layout="VK", head_first=False)
OFFICIAL_CUDA = dict(w_form="cuda", state_layout="VK", head_first=False)
FLA = dict(w_form="log", state_layout="KV", head_first=False)


def _decay(w, w_form):
    if w_form == "decay":
        return w
    if w_form == "log":
        return np.exp(w)
    if w_form == "cuda":
        return np.exp(-np.exp(w))
    raise ValueError(f"w_form must be 'decay', 'log' or 'cuda', not {w_form!r}")


def _to_btHN(x, head_first):
    x = np.asarray(x, np.float64)
    if x.ndim == 3:
        x = x[None]
    return x.transpose(0, 2, 1, 3) if head_first else x


def _from_btHN(x, head_first, squeeze):
    x = x.transpose(0, 2, 1, 3) if head_first else x
    return x[0] if squeeze else x


def _state_in(S, shape, state_layout):
    B, _, H, N = shape
    if S is None:
        return np.zeros((B, H, N, N))
    S = np.asarray(S, np.float64)
    S = S[None] if S.ndim == 3 else S
    return np.swapaxes(S, -1, -2) if state_layout == "KV" else S


def _state_out(S, state_layout, squeeze):
    S = np.swapaxes(S, -1, -2) if state_layout == "KV" else S
    return S[0] if squeeze else S


def wkv7(r, w, k, v, a, b, state=None, *, w_form="decay", state_layout="VK", head_first=False):
    """Forward. Returns y (same layout as r) and the final state (in `state_layout`)."""
    squeeze = np.ndim(r) == 3
    r, w, k, v, a, b = (_to_btHN(x, head_first) for x in (r, w, k, v, a, b))
    S0 = _state_in(state, r.shape, state_layout)
    S, y, _ = train.wkv_forward(S0, r, _decay(w, w_form), k, v, a, b)
    return _from_btHN(y, head_first, squeeze), _state_out(S, state_layout, squeeze)


def wkv7_backward(dy, dstate, r, w, k, v, a, b, state=None, *, w_form="decay", state_layout="VK",
                  head_first=False):
    """Gradients of sum(dy * y) + sum(dstate * final state) with respect to r, w (in its own
    form), k, v, a, b and the initial state, each in the layout of its input."""
    squeeze = np.ndim(r) == 3
    r, w, k, v, a, b, dy = (_to_btHN(x, head_first) for x in (r, w, k, v, a, b, dy))
    S0 = _state_in(state, r.shape, state_layout)
    dS = None if dstate is None else _state_in(dstate, r.shape, state_layout)
    decay = _decay(w, w_form)
    _, _, saved = train.wkv_forward(S0, r, decay, k, v, a, b)
    dS0, dr, ddecay, dk, dv, da, db = train.wkv_backward(dS, dy, saved, r, decay, k, v, a, b)
    if w_form == "log":                                   # decay = e^w
        dw = ddecay * decay
    elif w_form == "cuda":                                # decay = exp(-e^w)
        dw = ddecay * decay * -np.exp(w)
    else:
        dw = ddecay
    out = {name: _from_btHN(g, head_first, squeeze)
           for name, g in (("r", dr), ("w", dw), ("k", dk), ("v", dv), ("a", da), ("b", db))}
    out["state"] = _state_out(dS0, state_layout, squeeze)
    return out
