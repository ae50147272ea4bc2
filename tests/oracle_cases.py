"""Correct implementations computed another way, and planted bugs: the oracle's test cases
(tests/test_oracle_calibrated.py) and its false-alarm benchmark (benchmarks/oracle_alarms.py).

A variant is model.Steps with some steps replaced by mathematically equal ones that round
differently; a bug is one that is not, with where it starts: (layer or None, op). Both run
through the reference's own forward pass (the planted-bug mechanism of tests/test_oracle.py).
"""
from dataclasses import replace

import numpy as np

import tinyrwkv
from tinyrwkv import model as M, oracle


# ---- correct variants: the same functions, computed another way (float32 arithmetic) ----

def layer_norm_one_pass(x, weight, bias, eps=M.LN_EPS):
    mu = x.mean(axis=-1, keepdims=True)
    var = np.maximum((x * x).mean(axis=-1, keepdims=True) - mu * mu, 0)  # E[x^2] - mu^2
    return (x - mu) * (1 / np.sqrt(var + eps)) * weight + bias


def group_norm_one_pass(x, weight, bias, n_groups, eps=M.GN_EPS):
    shape = x.shape
    g = x.reshape(*shape[:-1], n_groups, -1)
    mu = g.mean(axis=-1, keepdims=True)
    var = np.maximum((g * g).mean(axis=-1, keepdims=True) - mu * mu, 0)
    return ((g - mu) / np.sqrt(var + eps)).reshape(shape) * weight + bias


def wkv_step_fused(S, r, w, k, v, alpha, beta):
    """y from the old state: S_new r = (S w) r + (S alpha)(beta . r) + v (k . r)."""
    S_new, _ = M.wkv_step(S, r, w, k, v, alpha, beta)
    sa = (S @ alpha[..., :, None])[..., 0]
    y = ((S * w[..., None, :]) @ r[..., :, None])[..., 0] + sa * (beta * r).sum(-1, keepdims=True) \
        + v * (k * r).sum(-1, keepdims=True)
    return S_new, y.astype(S.dtype)


def matmul_blocked(x, W, block=64):
    """Products summed block by block in the array's dtype (a tiled GEMM's order)."""
    out = np.zeros(x.shape[:-1] + W.shape[-1:], np.result_type(x, W))
    for i in range(0, x.shape[-1], block):
        out += x[..., i:i + block] @ W[i:i + block]
    return out


def matmul_einsum(x, W):
    return np.einsum("...i,ij->...j", x, W)


OTHER_WAYS = dict(
    norms=dict(layer_norm=layer_norm_one_pass, group_norm=group_norm_one_pass),
    fused_wkv=dict(wkv_step=wkv_step_fused),
    products=dict(matmul=matmul_blocked),
    einsum=dict(matmul=matmul_einsum),
    pointwise=dict(lerp=lambda x, xp, mix: x * (1 - mix) + xp * mix,
                   squared_relu=lambda u: np.maximum(u, 0) * np.maximum(u, 0),
                   decay=lambda u: np.exp(-np.exp(np.log(M.DECAY_SCALE) - np.logaddexp(0, -u))),
                   learning_rate=lambda u: 0.5 * (1 + np.tanh(0.5 * u))),
)
OTHER_WAYS["all"] = {k: v for d in OTHER_WAYS.values() for k, v in d.items()
                     if k != "matmul"} | {"matmul": matmul_blocked}


def variant_steps(ways, dtype):
    steps = replace(M.STEPS, **OTHER_WAYS[ways]) if ways != "plain" else M.STEPS
    return steps if dtype == "fp32" else oracle.emulated_steps(dtype, base=steps)


# ---- planted bugs: (steps changes, state change, ids change, (layer, op) where it starts) ----

def chunk_readout_bug(T):
    """A chunked kernel that reads the last token of each 16-token chunk from the old state (the
    step is called T times per layer, layer after layer)."""
    t = [0]

    def step(S, r, *vs):
        S_new, y = M.wkv_step(S, r, *vs)
        t[0] += 1
        return S_new, ((S @ r[..., None])[..., 0] if (t[0] - 1) % T % 16 == 15 else y)
    return step


BUGS = {
    "group norm eps 1e-5": (dict(group_norm=lambda x, w, b, H: M.group_norm(x, w, b, H, eps=1e-5)), None, None, (0, "gn")),
    "lerp from the wrong side": (dict(lerp=lambda x, xp, mix: xp + (x - xp) * mix), None, None, (0, "xr")),
    "state transposed": (dict(wkv_step=lambda S, *vs: M.wkv_step(S.swapaxes(-1, -2), *vs)), None, None, (0, "state")),
    "value residual missing": (dict(value_residual=lambda v, vf, g: v), None, None, (1, "v_res")),
    "decay without e^-0.5": (dict(decay=lambda u: np.exp(-M.sigmoid(u))), None, None, (0, "w")),
    "decay constant 0.6065": (dict(decay=lambda u: np.exp(-0.6065 * M.sigmoid(u))), None, None, (0, "w")),
    "kappa not normalised": (dict(removal_key=lambda k, kk, H: k * kk), None, None, (0, "kk")),
    "bonus dropped": (dict(bonus=lambda r, k, v, rk, H: 0 * v), None, None, (0, "bonus")),
    "RMS norm for layer norm": (dict(layer_norm=lambda x, w, b: x / np.sqrt((x * x).mean(-1, keepdims=True) + 1e-5) * w + b), None, None, (None, "ln0")),
    "relu not squared": (dict(squared_relu=lambda u: np.maximum(u, 0)), None, None, (0, "ffn_hidden")),
    "k_tilde = k a": (dict(replacement_key=lambda k, a, ka: k * a), None, None, (0, "k_tilde")),
    "a through tanh": (dict(learning_rate=np.tanh), None, None, (0, "a")),
    "gate not applied": (dict(output_gate=lambda y, g: y), None, None, (0, "att")),
    "output before the update": (dict(wkv_step=lambda S, r, *vs: (M.wkv_step(S, r, *vs)[0], (S @ r[..., None])[..., 0])), None, None, (0, "y")),
    "layer norm eps 1e-3": (dict(layer_norm=lambda x, w, b: M.layer_norm(x, w, b, eps=1e-3)), None, None, (None, "ln0")),
    "chunk read-out (every 16th token)": ("chunk", None, None, (0, "y")),
    "shift slots swapped in the state": (None, "swap_shift", None, (0, "xr")),
    "imported state transposed": (None, "transpose", None, (0, "state")),
    "ids >= 32768 saturated (int16)": (None, None, "int16", (None, "ln0")),
}


def bug_trace(w, ids, state, bug, dtype="fp32", select=None):
    changes, state_change, ids_change, _ = BUGS[bug]
    steps = M.STEPS
    if changes == "chunk":
        steps = replace(steps, wkv_step=chunk_readout_bug(len(ids)))
    elif changes:
        steps = replace(steps, **changes)
    if state_change == "swap_shift":
        state = M.State(state.ffn_shift.copy(), state.wkv.copy(), state.att_shift.copy())
    elif state_change == "transpose":
        state = M.State(state.att_shift.copy(), state.wkv.swapaxes(-1, -2).copy(), state.ffn_shift.copy())
    if ids_change == "int16":
        ids = np.minimum(ids, 32767)           # a 16-bit signed id type, saturated
    if dtype != "fp32":
        steps = oracle.emulated_steps(dtype, base=steps)
    other = tinyrwkv.RWKV7(w, dtype="float32", steps=steps)
    return oracle.trace(other, ids, state=state, select=select)
