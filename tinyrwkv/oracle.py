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
    L{i}.y                  WKV output y = S r (read with the new state)  (T, C)
                            (named L{i}.wkv in files written before; load_trace renames it)
    L{i}.gn                 group-norm output                         (T, C)
    L{i}.bonus              (r . k_tilde r_k) v per head              (T, C)
    L{i}.att                attention output ((gn + bonus) g) Wo^T    (T, C)
    L{i}.ffn_hidden         relu(xk Wk^T)^2 (DeepEmbed: times the gate)  (T, F)
    L{i}.ffn                channel-mix output                        (T, C)
    L{i}.block              the residual stream after the layer       (T, C)
    logits                                                            (T, V)

The trace is the reference itself (model.py) run with a dict that its functions fill with their
named intermediates, and the WKV recurrence stepped token by token to keep every state. There is
no second derivation here. `steps=dataclasses.replace(tinyrwkv.model.STEPS, decay=...)` runs the
same pass with one step replaced: tests/test_oracle.py plants bugs that way.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np

from . import model as ref
from .checks import POSITIVE, check_float
from .files import OutputError, atomic_open
from .formats.npz import NpzReader

# ----------------------------------------------------------------------------------------------
# Traces: the reference's own intermediates, recorded while it runs
# ----------------------------------------------------------------------------------------------

# Per layer, in the order computed (model.py fills `acts` with these names and a few more that
# only the trainer's backward needs).
LAYER_NAMES = ("ln1", "xr", "xw", "xk", "xv", "xa", "xg", "r", "w_pre", "w", "w_log", "w_cuda",
               "k", "v", "a", "g", "kk", "k_tilde", "v_res", "state", "y", "gn", "bonus", "att",
               "ffn_hidden", "ffn", "block")
RENAMED = {"wkv": "y"}   # trace files written before the rename: L{i}.wkv was the WKV output y


def reference_of(model, dtype=None):
    """The NumPy reference on the numbers `model` computes with (the model itself when it is the
    reference): the backend contract's `stored_tensors()`, in `dtype` (default the model's)."""
    if type(model) is ref.RWKV7 and dtype in (None, model.dtype):
        return model
    return ref.RWKV7(model.stored_tensors(), dtype=dtype or model.dtype, name=model.name,
                     steps=model.steps)


def trace(model, ids, state=None, steps=None, dtype=None):
    """Every intermediate of the forward pass over `ids`, by name (module docstring).

    The model's weights are run through the NumPy reference (model.py) in the model's dtype: for
    a backend model, on the numbers it stores (`model.stored_tensors()`, e.g. bf16 weights
    widened exactly), so a trace is never of other weights. Run it on a float64 model for the
    oracle (or pass dtype="float64": the same stored numbers, computed in float64). `steps`
    replaces the reference's steps (model.Steps): how bugs are planted. Also
    returns the state after the last token as `final.att_shift`, `final.wkv`, `final.ffn_shift`.
    """
    reference = reference_of(model, dtype)
    steps = steps or reference.steps
    ids, st = reference.check_ids(ids), reference.check_state(state)
    states = []                                          # per layer: the state after each token

    def recorded_wkv(S, r, w, k, v, alpha, beta):
        after = []

        def step(S, *vectors):
            S, y = steps.wkv_step(S, *vectors)
            after.append(S)
            return S, y
        S, y = ref.wkv_seq(S, r, w, k, v, alpha, beta, step=step)
        states.append(np.stack(after))                   # (T, H, N, N)
        return S, y

    acts = {}
    x, st = reference.forward_seq(ids, st, replace(steps, wkv=recorded_wkv), acts)
    out = {"ln0": acts.pop("ln0")}
    for i in range(reference.config.n_layer):
        layer = acts[f"L{i}"]
        layer["state"] = states[i]
        layer["w_log"] = ref.log_decay(layer["w_pre"])  # fla and llama.cpp take log w
        layer["w_cuda"] = np.log(-layer["w_log"])        # the official CUDA kernel: w = exp(-exp(.))
        out.update({f"L{i}.{name}": layer[name] for name in LAYER_NAMES})
    out["logits"] = reference.logits(ref.layer_norm(x, *reference.ln_out))
    out.update({"final.att_shift": st.att_shift, "final.wkv": st.wkv, "final.ffn_shift": st.ffn_shift})
    return out


def order(names):
    """Forward order of trace names: ln0, then layer by layer in the order computed, logits."""
    def key(name):
        if name == "ln0":
            return (-1, 0)
        if name.startswith("L") and "." in name:
            layer, op = name[1:].split(".", 1)
            return (int(layer), LAYER_NAMES.index(op) if op in LAYER_NAMES else len(LAYER_NAMES))
        return (10 ** 6, 0 if name == "logits" else 1)
    return sorted(names, key=key)


# ----------------------------------------------------------------------------------------------
# Files
# ----------------------------------------------------------------------------------------------

TRACE_FORMAT = "tinyrwkv-trace-v1"


def trace_file_path(path):
    """Where save_trace writes `path`: itself when the name ends in .npz, else path + ".npz" (as
    np.savez always did). A folder is refused by name."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder: give a trace file name, such as "
                          f"{path / 'trace.npz'}")
    return path if path.name.lower().endswith(".npz") else path.with_name(path.name + ".npz")


def save_trace(path, tr, state_layout="VK", meta=None):
    """Write a trace as .npz: the arrays by name plus `__format__`, `__state_layout__` ("VK":
    [value][key], the official layout; "KV": fla's) and `__meta__` (JSON). Atomic (a kill leaves
    the old file or none, tinyrwkv/files.py); returns the path written (trace_file_path)."""
    path = trace_file_path(path)
    with atomic_open(path) as f:
        np.savez(f, __format__=np.array(TRACE_FORMAT), __state_layout__=np.array(state_layout),
                 __meta__=np.array(json.dumps(meta or {})), **tr)
    return path


def _renamed(name):
    layer, _, op = name.rpartition(".")
    return f"{layer}.{RENAMED[op]}" if layer.startswith("L") and op in RENAMED else name


# A trace's arrays may declare at most this many times the file's size: np.savez (what
# save_trace and most tools write) stores them as they are (1x), and float activations deflate
# by 1.1-2x with np.savez_compressed; a zip bomb expands ~1000x.
MAX_TRACE_EXPANSION = 16


def load_trace(path):
    """{name: array} from a trace file; a state saved [key][value] ("KV") is transposed back to
    [value][key] here, so comparisons always see the official layout. A trace from another
    implementation is read with the checks of formats/npz.py (no pickles, every size bounded
    before it is read); anything that is not a trace is a CheckpointError (a ValueError) naming
    the file."""
    fix = "give a file written by `tinyrwkv trace` or tinyrwkv.oracle.save_trace (np.savez)"
    with NpzReader(path, "trace", fix) as npz:
        declared, size = npz.declared_bytes(), npz.path.stat().st_size
        if declared > MAX_TRACE_EXPANSION * size + 2**20:
            raise npz.error(f"its arrays declare {declared:,} bytes in a {size:,}-byte file (a "
                            "compression bomb or a corrupt header); save traces uncompressed")
        layout = "VK"
        if "__state_layout__" in npz.names:
            tag = npz.read("__state_layout__")
            layout = str(tag) if tag.shape == () and tag.dtype.kind == "U" else None
        if layout not in ("VK", "KV"):
            raise npz.error("its __state_layout__ must be the string 'VK' or 'KV'")
        out = {}
        for name in npz.names:
            if name.startswith("__"):
                continue
            kind = npz.header(name).dtype.kind
            if kind not in "biuf":
                raise npz.error(f"{name[:80]} holds {npz.header(name).dtype} values, not numbers")
            out[_renamed(name)] = npz.read(name)
    if layout == "KV":
        for name, value in out.items():
            if (name.endswith(".state") or name == "final.wkv") and value.ndim >= 2:
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
    A NaN or Inf in either trace is never agreement (not even the same NaN in both: a reference
    must be finite): its element counts as an infinite error, and its row says which trace
    holds how many. `tol`: a finite max|d|/std > 0 instead of the dtype's (TOLERANCES).
    Returns a dict: rows, first (None if all agree), missing (names only in ref), tol.
    """
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(TOLERANCES)}, not {dtype!r}")
    tol = TOLERANCES[dtype] if tol is None else check_float("tol", tol, POSITIVE)
    names = [n for n in order(ref_trace) if n in other]
    rows, first = [], None
    for name in names:
        a, b = np.asarray(ref_trace[name], np.float64), np.asarray(other[name], np.float64)
        if a.shape != b.shape or a.size == 0:
            rows.append(dict(name=name, shape_error=f"{b.shape} vs reference {a.shape}"
                                                    + (" (empty)" if a.size == 0 else "")))
            continue
        row, d = _compare_one(name, a, b, tol)
        rows.append(row)
        if row["bad"] and not name.startswith("final."):
            per_token = d.reshape(d.shape[0] if d.ndim else 1, -1).max(axis=1)
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


def _compare_one(name, a, b, tol):
    """The row for one tensor, and its error |b - a| / std(a) element by element: infinite
    wherever either value is NaN or Inf. std and RMS are over the reference's finite values
    (1 where there are none, or all are equal: then errors are absolute)."""
    with np.errstate(invalid="ignore", over="ignore"):
        diff = np.where(np.isfinite(a) & np.isfinite(b), np.abs(b - a), np.inf)
        ref_values = a[np.isfinite(a)]
        std = float(ref_values.std()) if ref_values.size else 0.0
        rms = float(np.sqrt((ref_values ** 2).mean())) if ref_values.size else 0.0
        std, rms = std or 1.0, rms or 1.0
        row = dict(name=name, max_abs=float(diff.max()), max_rel=float(diff.max() / std),
                   rel_rms=float(np.sqrt((diff ** 2).mean()) / rms), bad=bool(diff.max() / std > tol))
    nonfinite = {which: int(x.size - np.count_nonzero(np.isfinite(x)))
                 for which, x in (("reference", a), ("other", b))}
    if any(nonfinite.values()):
        row["nonfinite"] = ", ".join(f"{n} in the {which}" for which, n in nonfinite.items() if n)
    return row, diff / std


def format_report(report):
    lines = [f"{'tensor':16s} {'max|d|':>10s} {'max|d|/std':>11s} {'rel RMS':>10s}"]
    for r in report["rows"]:
        if "shape_error" in r:
            lines.append(f"{r['name']:16s} shape {r['shape_error']}  BEYOND")
            continue
        flag = "  BEYOND" if r["bad"] else ""
        if "nonfinite" in r:
            flag += f"  NaN/Inf: {r['nonfinite']}"
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
