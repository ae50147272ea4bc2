"""The test oracle: named traces of every intermediate, and a compare tool that says where another
implementation first goes wrong.

    trace = tinyrwkv.oracle.trace(model, ids)              # {name: array}, float64 by default
    tinyrwkv.oracle.save_trace("ref.npz", trace)
    report = tinyrwkv.oracle.compare(load_trace("ref.npz"), load_trace("mine.npz"), "fp32")

Trace names (per layer `L{i}.`; every array has the token axis first, T rows):

    ln0                     LN0 of the embedding                      (T, C)
    L{i}.ln1                LN1 output (time-mix input)               (T, C)
    L{i}.xr .xw .xk .xv .xa .xg   the six token-shift lerps           (T, C)
    L{i}.r                  receptance                                (T, C)
    L{i}.w_pre              w0 + tanh(xw w1) w2                       (T, C)
    L{i}.w                  decay in (0, 1), the official RNN form    (T, C)
    L{i}.w_log              log of the decay, in (-e^-0.5, 0): fla, llama.cpp  (T, C)
    L{i}.w_cuda             the official CUDA kernel's input: decay = exp(-exp(w_cuda))  (T, C)
    L{i}.k                  key before the k_a mix                    (T, C)
    L{i}.v                  value before the residual                 (T, C)
    L{i}.a                  in-context learning rate, sigmoid         (T, C)
    L{i}.g                  output gate                               (T, C)
    L{i}.kk                 kappa_hat: (k * k_k) normalised per head  (T, C)
    L{i}.k_tilde            the key written: k * (1 + (a - 1) k_a)    (T, C)
    L{i}.v_res              value after the value residual            (T, C)
    L{i}.state              WKV state after the token, [head][value][key]  (T, H, N, N)
    L{i}.wkv                WKV output y = S r                        (T, C)
    L{i}.gn                 group-norm output                         (T, C)
    L{i}.bonus              (r . k_tilde r_k) v per head              (T, C)
    L{i}.att                attention output ((gn + bonus) g) Wo^T    (T, C)
    L{i}.ffn_hidden         relu(xk Wk^T)^2 (DeepEmbed: times the gate)  (T, F)
    L{i}.ffn                channel-mix output                        (T, C)
    L{i}.block              the residual stream after the layer       (T, C)
    logits                                                            (T, V)

The trace runs the recurrent form, one token at a time, through `OPS`: a table of the small
functions the model is made of. A copy of the table with one entry replaced is a copy of the
model with one thing changed (tests/test_oracle.py plants bugs that way).
"""

from __future__ import annotations

import json

import numpy as np

from . import model as ref

# ----------------------------------------------------------------------------------------------
# The forward pass as a table of pieces
# ----------------------------------------------------------------------------------------------


def _lerps(x, x_prev, p):
    return {c: x + (x_prev - x) * p[f"att.x_{c[1]}"] for c in ("xr", "xw", "xk", "xv", "xa", "xg")}


def _kappa_hat(k, p, H):
    return ref.l2_normalize((k * p["att.k_k"]).reshape(H, -1)).reshape(-1)


OPS = {
    "layer_norm": lambda x, w, b: ref.layer_norm(x, w, b),
    "group_norm": lambda x, w, b, H: ref.group_norm(x, w, b, H),
    "lerps": _lerps,                                   # (x, previous token's x, p) -> dict
    "decay": lambda w_pre: np.exp(-ref.DECAY_SCALE * ref.sigmoid(w_pre)),
    "a": lambda u: ref.sigmoid(u),
    "kappa_hat": _kappa_hat,
    "k_tilde": lambda k, a, p: k * (1 + (a - 1) * p["att.k_a"]),
    "value_residual": lambda v, v_first, gate: v + (v_first - v) * gate,
    "wkv_step": lambda S, r, w, k, v, kh, a: ref.wkv_step(S, r, w, k, v, kh, a),
    "bonus": lambda r, k, v, p, H: ((r * k).reshape(H, -1) * p["att.r_k"]).sum(-1, keepdims=True)
                                   * v.reshape(H, -1),
    "gate": lambda y, g: y * g,
    "ffn_act": lambda u: np.maximum(u, 0) ** 2,
    "ln0": lambda x, w, b: ref.layer_norm(x, w, b),
}


def trace(model, ids, state=None, ops=None):
    """Every intermediate of the forward pass over `ids`, by name (module docstring), in the
    model's dtype; run it on an RWKV7(..., dtype="float64") for the oracle. Also returns the
    state after the last token as `final.att_shift`, `final.wkv`, `final.ffn_shift`."""
    ops = ops or OPS
    cfg = model.config
    H = cfg.n_head
    ids = model._check_ids(ids)
    st = model._check_state(state)
    rows = {}
    put = lambda name, value: rows.setdefault(name, []).append(np.array(value))
    for token in ids:
        token = int(token)
        x0 = ops["ln0"](model.emb[token], *model.ln0)
        put("ln0", x0)
        x, v_first = x0, None
        for i, p in enumerate(model.blocks):
            n = f"L{i}."
            xa = ops["layer_norm"](x, p["ln1.weight"], p["ln1.bias"])
            put(n + "ln1", xa)
            m = ops["lerps"](xa, st.att_shift[i], p)
            for name in ("xr", "xw", "xk", "xv", "xa", "xg"):
                put(n + name, m[name])
            r = m["xr"] @ p["att.receptance.weight"].T
            k = m["xk"] @ p["att.key.weight"].T
            v = m["xv"] @ p["att.value.weight"].T
            w_pre = p["att.w0"] + np.tanh(m["xw"] @ p["att.w1"]) @ p["att.w2"]
            w = ops["decay"](w_pre)
            a = ops["a"](p["att.a0"] + (m["xa"] @ p["att.a1"]) @ p["att.a2"])
            g = ref.sigmoid(m["xg"] @ p["att.g1"]) @ p["att.g2"]
            kh = ops["kappa_hat"](k, p, H)
            kt = ops["k_tilde"](k, a, p)
            if i == 0:
                v_first, v_res = v, v
            else:
                gate = ref.sigmoid(p["att.v0"] + (m["xv"] @ p["att.v1"]) @ p["att.v2"])
                v_res = ops["value_residual"](v, v_first, gate)
            # The two other forms of the decay, from w_pre directly (log(-log(w)) would lose
            # float32 precision where w is near 1): log w = -e^-0.5 sigmoid(w_pre), and the CUDA
            # kernel's log(-log w) = -0.5 + log sigmoid(w_pre) = -0.5 - softplus(-w_pre).
            w_log = -ref.DECAY_SCALE * ref.sigmoid(w_pre)
            w_cuda = -0.5 - np.logaddexp(0, -w_pre)
            for name, value in (("r", r), ("w_pre", w_pre), ("w", w), ("w_log", w_log),
                                ("w_cuda", w_cuda), ("k", k), ("v", v), ("a", a),
                                ("g", g), ("kk", kh), ("k_tilde", kt), ("v_res", v_res)):
                put(n + name, value)
            hd = lambda u: u.reshape(H, -1)
            S, y = ops["wkv_step"](st.wkv[i], hd(r), hd(w), hd(kt), hd(v_res), hd(kh), hd(a))
            st.wkv[i] = S
            put(n + "state", S)
            y = y.reshape(-1)
            put(n + "wkv", y)
            gn = ops["group_norm"](y, p["att.ln_x.weight"], p["att.ln_x.bias"], H)
            put(n + "gn", gn)
            bonus = ops["bonus"](r, kt, v_res, p, H).reshape(-1)
            put(n + "bonus", bonus)
            att = ops["gate"](gn + bonus, g) @ p["att.output.weight"].T
            put(n + "att", att)
            st.att_shift[i] = xa
            x = x + att
            xf = ops["layer_norm"](x, p["ln2.weight"], p["ln2.bias"])
            xk = xf + (st.ffn_shift[i] - xf) * p["ffn.x_k"]
            h = ops["ffn_act"](xk @ p["ffn.key.weight"].T)
            if "ffn.s1" in p:
                s_emb = ref.deep_embed_rows(p, token, x0)
                D = p["ffn.s1"].shape[1]
                h = h * ((xf @ p["ffn.s1"]) @ s_emb.reshape(D, D) @ p["ffn.s2"] + p["ffn.s0"])
            put(n + "ffn_hidden", h)
            ffn = h @ p["ffn.value.weight"].T
            put(n + "ffn", ffn)
            st.ffn_shift[i] = xf
            x = x + ffn
            put(n + "block", x)
        put("logits", ref.layer_norm(x, *model.ln_out) @ model.head.T)
    out = {name: np.stack(values) for name, values in rows.items()}
    out.update({"final.att_shift": st.att_shift, "final.wkv": st.wkv,
                "final.ffn_shift": st.ffn_shift})
    return out


def order(names):
    """Forward order of trace names: ln0, then layer by layer in the order computed, logits."""
    per_layer = ["ln1", "xr", "xw", "xk", "xv", "xa", "xg", "r", "w_pre", "w", "w_log", "w_cuda",
                 "k", "v", "a", "g", "kk", "k_tilde", "v_res", "state", "wkv", "gn", "bonus",
                 "att", "ffn_hidden", "ffn", "block"]

    def key(name):
        if name == "ln0":
            return (-1, 0)
        if name.startswith("L") and "." in name:
            layer, op = name[1:].split(".", 1)
            return (int(layer), per_layer.index(op) if op in per_layer else len(per_layer))
        return (10 ** 6, 0 if name == "logits" else 1)
    return sorted(names, key=key)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

TRACE_FORMAT = "tinyrwkv-trace-v1"


def save_trace(path, tr, state_layout="VK", meta=None):
    """Write a trace as .npz: the arrays by name plus `__format__`, `__state_layout__` ("VK":
    [value][key], the official layout; "KV": fla's) and `__meta__` (JSON)."""
    np.savez(path, __format__=np.array(TRACE_FORMAT), __state_layout__=np.array(state_layout),
             __meta__=np.array(json.dumps(meta or {})), **tr)


def load_trace(path):
    """{name: array} from a trace file; a state saved [key][value] ("KV") is transposed back to
    [value][key] here, so comparisons always see the official layout."""
    with np.load(path, allow_pickle=False) as f:
        layout = str(f["__state_layout__"]) if "__state_layout__" in f else "VK"
        if layout not in ("VK", "KV"):
            raise ValueError(f"{path}: __state_layout__ must be 'VK' or 'KV', not {layout!r}")
        out = {k: f[k] for k in f.files if not k.startswith("__")}
    if layout == "KV":
        for name, value in out.items():
            if name.endswith(".state") or name == "final.wkv":
                out[name] = np.swapaxes(value, -1, -2)
    return out


# ----------------------------------------------------------------------------------------------
# Compare
# ----------------------------------------------------------------------------------------------

# max|d|/std tolerances of the other implementation's dtype, each against the float64 trace.
TOLERANCES = {
    # float32: unit roundoff 6e-8; errors add up over C-long dot products, the layers and the
    # T-step state recurrence. Measured on the shipped model (benchmarks/cross_impl.py): official
    # cpu fp32 and CUDA fp32 without TF32, tinyrwkv numba/cupy float32: 1.4e-6 to 9.4e-6 on
    # logits and states; float32 over 100k tokens stays at 4e-6 to 1.5e-5. 1e-4 leaves 7x.
    "fp32": 1e-4,
    # TF32 matrix products keep 10 significand bits (u = 4.9e-4). Measured on the official CUDA
    # fp32 path as shipped (TF32 on): 3.4e-4 to 3.0e-3 (shipped model), 4e-3 to 5e-3 (synthetic
    # benchmark weights). 2e-2 leaves 4x.
    "tf32": 2e-2,
    # fp16 activations (u = 4.9e-4) through every product and norm. Measured: official cuda fp16
    # 5.1e-3 to 8.7e-3; tinyrwkv cupy float16 prefill 1.6e-3 to 2.6e-3; fla fp16 operator
    # 2.2e-3 to 4.3e-3. 5e-2 leaves 6x.
    "fp16": 5e-2,
    # bf16 activations (u = 3.9e-3, 8x fp16's). Measured: official cuda bf16 3.1e-2 to 8.2e-2;
    # tinyrwkv cupy bfloat16 prefill 1.3e-2 to 2.6e-2; fla bf16 operator 2.7e-2 to 3.2e-2. 2e-1.
    "bf16": 2e-1,
}


def compare(ref_trace, other, dtype="fp32", tol=None):
    """One row per tensor present in both, and the first divergence beyond tolerance.

    For each tensor: max|d|, max|d| / std(ref), relative RMS (rms(d) / rms(ref)). The first
    divergence is the earliest token at which any tensor is beyond tolerance (per-token error
    max|d_t| / std(ref over all tokens)), and at that token the first tensor in forward order.
    Returns a dict: rows, first (None if all agree), missing (names only in ref), tol.
    """
    tol = TOLERANCES[dtype] if tol is None else tol
    names = [n for n in order(ref_trace) if n in other]
    rows, first = [], None
    for name in names:
        a, b = np.asarray(ref_trace[name], np.float64), np.asarray(other[name], np.float64)
        if a.shape != b.shape:
            rows.append(dict(name=name, shape_error=f"{b.shape} vs reference {a.shape}"))
            continue
        d = np.abs(b - a)
        std = float(a.std()) or 1.0
        rms = float(np.sqrt((a ** 2).mean())) or 1.0
        row = dict(name=name, max_abs=float(d.max()), max_rel=float(d.max() / std),
                   rel_rms=float(np.sqrt((d ** 2).mean()) / rms), bad=bool(d.max() / std > tol))
        if not np.all(np.isfinite(b)):
            row.update(max_abs=float("inf"), max_rel=float("inf"), bad=True)
        rows.append(row)
        if row["bad"] and not name.startswith("final."):
            per_token = (np.nan_to_num(d, nan=np.inf).reshape(len(d), -1).max(axis=1) / std)
            t = int(np.argmax(per_token > tol))
            if first is None or t < first["token"]:
                first = dict(token=t, name=name)
    if first:
        layer = first["name"].split(".")[0][1:] if first["name"].startswith("L") else None
        first.update(layer=int(layer) if layer is not None else None,
                     op=first["name"].split(".", 1)[-1])
    missing = [n for n in order(ref_trace) if n not in other]
    return dict(rows=rows, first=first, missing=missing, tol=tol, dtype=dtype,
                ok=all(not r.get("bad", True) for r in rows) and bool(rows))


def format_report(report):
    lines = [f"{'tensor':16s} {'max|d|':>10s} {'max|d|/std':>11s} {'rel RMS':>10s}"]
    for r in report["rows"]:
        if "shape_error" in r:
            lines.append(f"{r['name']:16s} shape {r['shape_error']}  BEYOND")
            continue
        flag = "  BEYOND" if r["bad"] else ""
        lines.append(f"{r['name']:16s} {r['max_abs']:10.2e} {r['max_rel']:11.2e} "
                     f"{r['rel_rms']:10.2e}{flag}")
    lines.append(f"tolerance ({report['dtype']}): max|d|/std <= {report['tol']:g}")
    if report["missing"]:
        lines.append(f"not in the other trace ({len(report['missing'])}): "
                     + ", ".join(report["missing"][:8]) + (" ..." if len(report["missing"]) > 8 else ""))
    f = report["first"]
    if f:
        where = f"layer {f['layer']}, " if f["layer"] is not None else ""
        lines.append(f"FIRST DIVERGENCE: {where}op {f['op']}, token {f['token']} ({f['name']})")
    elif report["ok"]:
        lines.append("all tensors within tolerance")
    return "\n".join(lines)


def _model_trace(self, ids, state=None):
    """model.trace(ids): every intermediate by name (see tinyrwkv.oracle). Use a float64 model
    for the reference."""
    return trace(self, ids, state)


# `model.trace(ids)` for every model class. Attached here, so that model.py imports NumPy only.
ref.RWKV7.trace = _model_trace
