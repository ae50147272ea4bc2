"""The test oracle: named traces of every intermediate, and a compare tool that says where another
implementation first goes wrong.

    trace = tinyrwkv.oracle.trace(model, ids)              # {name: array}, float64 by default
    tinyrwkv.oracle.save_trace("ref.npz", trace)
    report = tinyrwkv.oracle.compare(load_trace("ref.npz"), load_trace("mine.npz"), "fp32")
    print(tinyrwkv.oracle.format_report(report))           # or save_report_json, save_heatmap
    # a part of it, straight to disk with bounded memory (docs/formats.md §8.4):
    tinyrwkv.oracle.write_trace("part.npz", model, ids, state=None,
                                select=Selection(names=["y", "logits"], layers=[0, 1],
                                                 tokens=range(448, 512), state_every=64))

The file format, each name's exact meaning and shape, the token-axis rule and which entries
count are written down in docs/formats.md §8.1, §8.3 and §8.4; the table below is a summary.

compare first checks the other trace (check_trace): a name that is not a trace name, no
`logits`, the token axis not first or another shape than the reference's raise TraceProblems
naming each (problems="warn" lists them in the report and compares the rest).

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
import re
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


class Trace(dict):
    """{name: array}, plus which tokens its rows are (docs/formats.md §8.4): `tokens` for every
    token-axis name but L{i}.state, `state_tokens` for L{i}.state; None: rows 0..T-1. `meta`:
    the file's __meta__ (a dict: the model, dtype, ids, initial state, selection), or None."""
    tokens = state_tokens = meta = None

    def rows_of(self, name):
        """The token index of each row of `name` (None: row t is token t; final.*: no axis)."""
        if name.startswith("final."):
            return None
        return self.state_tokens if name.endswith(".state") else self.tokens


def trace(model, ids, state=None, steps=None, dtype=None, select=None, progress=None):
    """Every intermediate of the forward pass over `ids`, by name (module docstring).

    The model's weights are run through the NumPy reference (model.py) in the model's dtype: for
    a backend model, on the numbers it stores (`model.stored_tensors()`, e.g. bf16 weights
    widened exactly), so a trace is never of other weights. Run it on a float64 model for the
    oracle (or pass dtype="float64": the same stored numbers, computed in float64). `steps`
    replaces the reference's steps (model.Steps): how bugs are planted. `state`: the State to
    start from (default zeros; not modified). Also returns the state after the last token as
    `final.att_shift`, `final.wkv`, `final.ffn_shift`.

    `select` (a Selection, or None for everything): which names, layers, token rows and state
    rows to keep (docs/formats.md §8.4). The arrays are then the full trace's rows at
    `select.token_rows(T)` (and `L{i}.state` at `select.state_rows(T)`), exactly.
    """
    sink, select = _DictSink(), select or Selection()
    _run(model, ids, state, steps, dtype, select, sink, progress)
    T = len(np.atleast_1d(np.asarray(ids)))
    sink.out.tokens, sink.out.state_tokens = select.token_rows(T), select.state_rows(T)
    return sink.out


class Selection:
    """What a trace keeps (docs/formats.md §8.4).

    names: glob patterns (fnmatch) matched against the full name (`L3.y`, `logits`) or, for a
    layer's names, against the op alone (`y` matches every `L{i}.y`); None: all names.
    layers: layer numbers whose `L{i}.*` names are kept; None: all. tokens: token indices (of
    this call's ids, 0 = the first) whose rows are kept; None: all. state_every: K keeps
    `L{i}.state` only after tokens K-1, 2K-1, ... and the last token (chunk ends); 1: every token.
    The `final.*` state is always written."""

    def __init__(self, names=None, layers=None, tokens=None, state_every=1):
        self.names = None if names is None else list(names)
        self.layers = None if layers is None else sorted(set(int(i) for i in layers))
        self.tokens = None if tokens is None else sorted(set(int(t) for t in tokens))
        self.state_every = int(state_every)
        if self.state_every < 1:
            raise ValueError(f"state_every must be >= 1, not {state_every}")
        if self.tokens is not None and self.tokens and self.tokens[0] < 0:
            raise ValueError("token indices must be >= 0")

    def wants(self, name):
        if name.startswith("final."):
            return True
        layer, op = None, name
        if name.startswith("L") and "." in name:
            layer, op = name[1:].split(".", 1)
            if self.layers is not None and int(layer) not in self.layers:
                return False
        if self.names is None:
            return True
        from fnmatch import fnmatchcase
        return any(fnmatchcase(name, p) or (layer is not None and fnmatchcase(op, p))
                   for p in self.names)

    def token_rows(self, T):
        """The token indices kept for every token-axis name but L{i}.state; None: all T."""
        if self.tokens is None:
            return None
        if self.tokens and self.tokens[-1] >= T:
            raise ValueError(f"token {self.tokens[-1]} selected, but the call has {T} tokens "
                             f"(0..{T - 1})")
        return np.array(self.tokens, dtype=np.int64)

    def state_rows(self, T):
        """The tokens after which L{i}.state is kept; None: all T."""
        if self.tokens is None and self.state_every == 1:
            return None
        kept = set(range(T)) if self.tokens is None else set(self.token_rows(T).tolist())
        k = self.state_every
        return np.array(sorted(t for t in kept if (t + 1) % k == 0 or t == T - 1), dtype=np.int64)

    def meta(self):
        return {"names": self.names, "layers": self.layers, "tokens": self.tokens,
                "state_every": self.state_every}


def parse_ranges(text, what="range"):
    """"0,3:6,10" -> [0, 3, 4, 5, 10]: integers and half-open ranges a:b (a- or b-less: from 0 /
    up to `upper`, which the caller fills by passing the upper bound with a trailing ':')."""
    out = []
    for part in text.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            if ":" in part or "-" in part[1:]:
                a, b = part.split(":", 1) if ":" in part else part.split("-", 1)
                b = int(b) + (0 if ":" in part else 1)          # a-b is inclusive, a:b is not
                if int(a or 0) < 0 or b < int(a or 0):
                    raise ValueError
                out.extend(range(int(a or 0), b))
            else:
                if int(part) < 0:
                    raise ValueError
                out.append(int(part))
        except ValueError:
            raise ValueError(f"{what} {part!r}: give non-negative integers, a:b (half-open) or "
                             "a-b (inclusive), comma-separated") from None
    return sorted(set(out))


class _DictSink:
    """Collects the trace in memory: {name: array}."""

    def __init__(self):
        self.out = Trace()

    def begin(self, total_bytes, rows, state_rows):
        pass

    def array(self, name, value):
        self.out[name] = value

    def state(self, name):
        return _StateRows(self.out, name)


class _StateRows:
    def __init__(self, out, name):
        self.out, self.name, self.rows = out, name, []

    def add(self, S):
        self.rows.append(np.array(S))

    def close(self, shape, dtype):
        self.out[self.name] = (np.stack(self.rows) if self.rows
                               else np.empty((0,) + tuple(shape), dtype))


def _run(model, ids, state, steps, dtype, select, sink, progress):
    """The traced forward pass: every kept array handed to `sink` in forward order, one layer at
    a time, the states row by row (so a file sink holds about one layer's arrays at once)."""
    reference = reference_of(model, dtype)
    steps = steps or reference.steps
    ids, st = reference.check_ids(ids), reference.check_state(state)
    T, config = len(ids), reference.config
    rows, state_rows = select.token_rows(T), select.state_rows(T)
    keep = set(state_rows.tolist()) if state_rows is not None else None
    n_rows = T if rows is None else len(rows)
    n_state = T if state_rows is None else len(state_rows)
    H, N = st.wkv.shape[-3], st.wkv.shape[-1]
    item = np.dtype(reference.dtype).itemsize
    F = reference.blocks[0]["ffn.key.weight"].shape[0]
    per_layer = (len(LAYER_NAMES) - 2) * n_rows * config.n_embd + n_rows * F
    total = item * (n_rows * config.n_embd + config.n_layer * (per_layer + n_state * H * N * N)
                    + n_rows * reference.head.shape[0])
    done = [0]

    def emit(name, value):
        if select.wants(name):
            value = value if rows is None or name.startswith("final.") else value[rows]
            sink.array(name, value)
            done[0] += value.nbytes
            if progress:
                progress(min(done[0], total), total)

    acts, layers_done, first_ln = {}, [], []

    def flush(i):
        """Hand layer i's arrays to the sink (its state went already) and drop them."""
        layer = acts.pop(f"L{i}")
        layer["w_log"], layer["w_cuda"] = decay_forms(layer["w_pre"])
        for name in LAYER_NAMES:
            if name == "state":
                recorder = layer.pop("state_recorder", None)
                if recorder is not None:
                    recorder.close((H, N, N), reference.dtype)
                continue
            emit(f"L{i}.{name}", layer.pop(name))
        layer.clear()

    def recorded_wkv(S, r, w, k, v, alpha, beta):
        i = len(layers_done)
        if i > 0:
            flush(i - 1)
        layers_done.append(i)
        name = f"L{i}.state"
        recorder = sink.state(name) if select.wants(name) else None
        t = [0]

        def step(S, *vectors):
            S, y = steps.wkv_step(S, *vectors)
            if recorder is not None and (keep is None or t[0] in keep):
                recorder.add(S)
                done[0] += S.nbytes
                if progress:
                    progress(min(done[0], total), total)
            t[0] += 1
            return S, y
        S, y = ref.wkv_seq(S, r, w, k, v, alpha, beta, step=step)
        if recorder is not None:
            acts.setdefault(f"L{i}", {})["state_recorder"] = recorder
        return S, y

    def recorded_layer_norm(x, *wb):
        out = steps.layer_norm(x, *wb)
        if not first_ln:                             # forward_seq's first norm is ln0
            first_ln.append(True)
            emit("ln0", out)
        return out

    x, st = reference.forward_seq(ids, st, replace(steps, wkv=recorded_wkv,
                                                   layer_norm=recorded_layer_norm), acts)
    acts.pop("ln0", None)
    flush(config.n_layer - 1)
    emit("logits", steps.matmul(steps.layer_norm(x, *reference.ln_out), reference.head.T))
    for name in ("att_shift", "wkv", "ffn_shift"):
        emit(f"final.{name}", getattr(st, name))
    return st


def decay_forms(w_pre):
    """The decay as other implementations take it: log w (fla, llama.cpp) and w_cuda, the
    official CUDA kernel's input (w = exp(-exp(w_cuda)))."""
    w_log = ref.log_decay(w_pre)
    return w_log, np.log(-w_log)


def order(names):
    """Forward order of trace names: ln0, then layer by layer in the order computed, logits."""
    def key(name):
        if name == "ln0":
            return (-1, 0)
        m = re.fullmatch(r"L([0-9]+)\.(.+)", name)
        if m:
            op = m.group(2)
            return (int(m.group(1)),
                    LAYER_NAMES.index(op) if op in LAYER_NAMES else len(LAYER_NAMES))
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
    rows = {f"__{k}__": getattr(tr, k, None) for k in ("tokens", "state_tokens")}
    with atomic_open(path) as f:
        np.savez(f, __format__=np.array(TRACE_FORMAT), __state_layout__=np.array(state_layout),
                 __meta__=np.array(json.dumps(meta or {})),
                 **{k: v for k, v in rows.items() if v is not None}, **tr)
    return path


def write_trace(path, model, ids, state=None, steps=None, dtype=None, select=None,
                state_layout="VK", meta=None, progress=None):
    """trace() straight to a file, with bounded memory: each layer's arrays are written as soon as
    the layer is done and the states row by row (through a temporary file beside `path`), so
    about one layer's arrays are in memory at once, never the whole trace. The file is the one
    save_trace(path, trace(...)) writes (the same members, in the same order, with the same
    bytes), plus `__tokens__` / `__state_tokens__` when `select` keeps a subset of the tokens
    (docs/formats.md §8.4). Atomic; returns (the path written, the final State)."""
    import zipfile
    select = select or Selection()
    path = trace_file_path(path)
    meta = dict(meta or {})
    if select.meta() != Selection().meta():
        meta["selection"] = select.meta()
    with atomic_open(path) as f, zipfile.ZipFile(f, mode="w", compression=zipfile.ZIP_STORED,
                                                 allowZip64=True) as zf:
        sink = _ZipSink(zf, path.parent)
        sink.array("__format__", np.array(TRACE_FORMAT))
        sink.array("__state_layout__", np.array(state_layout))
        sink.array("__meta__", np.array(json.dumps(meta)))
        T = len(np.atleast_1d(np.asarray(ids)))
        rows, state_rows = select.token_rows(T), select.state_rows(T)
        if rows is not None:
            sink.array("__tokens__", rows)
        if state_rows is not None:
            sink.array("__state_tokens__", state_rows)
        final = _run(model, ids, state, steps, dtype, select, sink, progress)
    return path, final


class _ZipSink:
    """Writes each array as an .npz member the moment it comes (np.savez's layout: `name.npy`,
    stored, zip64), the state rows through an anonymous temporary file."""

    def __init__(self, zf, folder):
        self.zf, self.folder = zf, folder

    def array(self, name, value):
        with self.zf.open(name + ".npy", "w", force_zip64=True) as out:
            np.lib.format.write_array(out, np.asanyarray(value), allow_pickle=False)

    def state(self, name):
        return _SpooledRows(self, name)


class _SpooledRows:
    def __init__(self, sink, name):
        import tempfile
        self.sink, self.name, self.n, self.dtype = sink, name, 0, None
        self.tmp = tempfile.TemporaryFile(dir=sink.folder, prefix=".trace-state-")

    def add(self, S):
        S = np.ascontiguousarray(S)
        self.dtype = S.dtype
        self.tmp.write(S.tobytes())
        self.n += 1

    def close(self, shape, dtype):
        import shutil
        header = {"descr": np.lib.format.dtype_to_descr(np.dtype(self.dtype or dtype)),
                  "fortran_order": False, "shape": (self.n,) + tuple(shape)}
        with self.tmp, self.sink.zf.open(self.name + ".npy", "w", force_zip64=True) as out:
            np.lib.format.write_array_header_1_0(out, header)   # as write_array does
            self.tmp.seek(0)
            shutil.copyfileobj(self.tmp, out, 2**22)


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
        out = Trace()
        if "__meta__" in npz.names:
            tag = npz.read("__meta__")
            try:
                out.meta = json.loads(str(tag)) if tag.shape == () and tag.dtype.kind == "U" else None
            except ValueError:
                out.meta = None
            if not isinstance(out.meta, dict):
                raise npz.error("its __meta__ must be a JSON object in a string")
        for key in ("tokens", "state_tokens"):
            if f"__{key}__" in npz.names:
                rows = npz.read(f"__{key}__")
                if rows.ndim != 1 or rows.dtype.kind not in "iu":
                    raise npz.error(f"its __{key}__ must be a 1-D array of token indices")
                setattr(out, key, rows.astype(np.int64))
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


FINAL_NAMES = ("final.att_shift", "final.wkv", "final.ffn_shift")
LAYER_NAME = re.compile(r"L(0|[1-9][0-9]*)\.(.+)")


class TraceProblems(ValueError):
    """The other trace cannot be compared as it is: names that are not trace names, no `logits`,
    shapes that are not the reference's. `problems`: every one, as check_trace returns them."""

    def __init__(self, problems):
        self.problems = problems
        super().__init__(describe_problems(problems))


def _n_layer(ref_trace):
    """The reference model's layer count, from its final state (None when it has none)."""
    for name in FINAL_NAMES:
        if name in ref_trace and np.ndim(ref_trace[name]) >= 1:
            return int(np.shape(ref_trace[name])[0])
    return None


def known_name(name, n_layer=None):
    """Whether `name` is a trace name (module docstring): ln0, logits, final.*, L{i}.<op> with
    op one of LAYER_NAMES (or a renamed old name) and, when n_layer is known, i < n_layer."""
    if name in ("ln0", "logits") or name in FINAL_NAMES:
        return True
    m = LAYER_NAME.fullmatch(name)
    return bool(m) and (m.group(2) in LAYER_NAMES or m.group(2) in RENAMED) and (
        n_layer is None or int(m.group(1)) < n_layer)


# Other names for some ops, for the suggestion when a trace uses them.
SYNONYMS = {"key": "k", "value": "v", "receptance": "r", "decay": "w", "gate": "g", "wkv": "y",
            "iclr": "a", "kappa": "kk", "kappa_hat": "kk", "out": "att", "hidden": "ffn_hidden",
            "x": "block", "ln_1": "ln1", "ln0_out": "ln0", "ln_out": "logits", "head": "logits"}


def _suggestion(name, ref_trace, n_layer):
    """The closest trace name to a misspelled one, as ' (did you mean X?)', or ''."""
    import difflib
    layer, _, op = name.rpartition(".")
    if op.lower() in SYNONYMS:
        guess = SYNONYMS[op.lower()]
        if guess in ("ln0", "logits"):
            return f" (did you mean {guess}?)"
        if LAYER_NAME.fullmatch(f"{layer}.{guess}"):
            return f" (did you mean {layer}.{guess}?)"
    layers = range(n_layer) if n_layer is not None else sorted(
        {int(m.group(1)) for n in ref_trace if (m := LAYER_NAME.fullmatch(n))})
    candidates = ["ln0", "logits", *FINAL_NAMES] + [f"L{i}.{op}" for i in layers
                                                     for op in LAYER_NAMES]
    close = difflib.get_close_matches(name, candidates, n=1, cutoff=0.6)
    return f" (did you mean {close[0]}?)" if close else ""


def _shape_problem(name, a, b):
    """A problem dict when `b` (the other trace's array) cannot be compared with the reference's
    `a` element by element, else None. Trace arrays have the token axis first (T rows); the final
    state (final.*) has none."""
    if a.shape == b.shape and a.size:
        return None
    if a.size == 0:
        return dict(kind="shape", name=name, message=f"{name}: the reference's array is empty "
                    f"{a.shape}; trace the reference again (tinyrwkv trace)")
    if not name.startswith("final.") and a.ndim >= 1:
        T = a.shape[0]
        if b.ndim == a.ndim and sorted(b.shape) == sorted(a.shape) and b.shape[0] != T:
            axis = b.shape.index(T)
            return dict(kind="token_axis", name=name, message=(
                f"{name} is {b.shape} with its {T} tokens on axis {axis}, the reference {a.shape}:"
                f" the token axis comes first; move it there (np.moveaxis(x, {axis}, 0))"))
        if b.ndim == a.ndim and b.shape[1:] == a.shape[1:]:
            return dict(kind="tokens", name=name, message=(
                f"{name} has {b.shape[0]} tokens, the reference {T}: trace the same token ids "
                f"(the reference's __meta__ lists them)"))
        if b.shape == a.shape[1:]:
            return dict(kind="token_axis", name=name, message=(
                f"{name} is {b.shape}, one token's worth, the reference {a.shape}: record it for "
                f"every token, token axis first"))
    same_size = " (the same number of values in another layout)" if b.size == a.size else ""
    return dict(kind="shape", name=name, message=(
        f"{name} is {b.shape}, the reference {a.shape}{same_size}: store it as the reference "
        f"does (each name's shape is in tinyrwkv/oracle.py; the token axis first)"))


def check_trace(ref_trace, other):
    """Every reason the other trace cannot be compared as it is, as dicts (kind, name, message),
    in forward order: `unknown` (not a trace name, or a layer the model does not have),
    `missing_logits`, `token_axis` (the token axis not first, or absent), `tokens` (another
    number of tokens) and `shape` (anything else). A name the reference lacks but that is a trace
    name (a partial reference, a decay form it did not record) is no problem: it is listed in the
    report's `extra`, not compared."""
    n_layer = _n_layer(ref_trace)
    problems = [dict(kind="unknown", name=name, message=f"{name}: not a trace name"
                     + (f" (the model has {n_layer} layers, L0-L{n_layer - 1})"
                        if known_name(name) else _suggestion(name, ref_trace, n_layer)))
                for name in sorted(other) if not known_name(name, n_layer)]
    if "logits" not in other:
        problems.append(dict(kind="missing_logits", name="logits", message=(
            "no logits: every trace must hold `logits` (T, V), the one output every "
            "implementation has; add them under that name")))
    for name in order(ref_trace):
        if name in other:
            problem = _shape_problem(name, np.asarray(ref_trace[name]), np.asarray(other[name]))
            if problem:
                problems.append(problem)
    return problems


PROBLEM_TITLES = {
    "unknown": "names that are not trace names (use the names in tinyrwkv/oracle.py)",
    "missing_logits": "no logits",
    "token_axis": "token axis not first",
    "tokens": "another number of tokens",
    "shape": "shapes that are not the reference's",
}


def describe_problems(problems, limit=10, rest='compare(..., problems="warn")'):
    """The problems as one paragraph, grouped by kind, at most `limit` listed per kind; `rest`:
    how to compare the rest anyway."""
    parts = []
    for kind, title in PROBLEM_TITLES.items():
        these = [p["message"].replace(": not a trace name", "") for p in problems
                 if p["kind"] == kind]
        if kind == "missing_logits" and these:
            parts.append(these[0])
        elif these:
            more = f"; and {len(these) - limit} more" if len(these) > limit else ""
            parts.append(f"{title} ({len(these)}): " + "; ".join(these[:limit]) + more)
    return ("the other trace cannot be compared as it is: " + " | ".join(parts)
            + f". Fix the trace, or compare the rest with {rest}")


def compare(ref_trace, other, dtype="fp32", tol=None, problems="error", model=None, ids=None,
            state=None, local=True, seed=0, noise=None):
    """One row per tensor present in both, and the first divergence beyond tolerance.

    With `model` (the model `ref_trace` is a float64 trace of, over `ids` from `state`; `ids`
    default to the trace's meta) the tolerances follow the numbers (the section "Tolerances that
    follow the numbers" below): each tensor's is NOISE_MARGIN x the error that rounding to
    `dtype` causes in it on this model and these tokens (noise_scales), and every op is also
    checked locally, recomputed from the other trace's own inputs (local_check; `local=False`
    skips it). The first divergence is then the first op that fails locally (by token, then in
    forward order), or, where none does, the first beyond its global tolerance. `noise`: the
    noise_scales of this reference and dtype, when already measured (they depend on the model,
    tokens and dtype only, not on the other trace). Without `model`
    (or with `tol`) one tolerance per dtype (TOLERANCES) serves every tensor.

    For each tensor: max|d|, max|d| / std(ref), relative RMS (rms(d) / rms(ref)), and `ratio`,
    max|d|/std over the tolerance (> 1 is beyond). The first divergence is the earliest token at
    which any tensor is beyond tolerance (per-token error max|d_t| / std(ref over all tokens)),
    and at that token the first tensor in forward order; it carries that token's error and its
    ratio to the tolerance. A NaN or Inf in either trace is never agreement (not even the same NaN
    in both: a reference must be finite): its element counts as an infinite error, and its row
    says which trace holds how many. `tol`: a finite max|d|/std > 0 instead of the dtype's
    (TOLERANCES).

    Before anything is compared the other trace is checked (check_trace): names that are not
    trace names, no `logits`, wrong shapes or the token axis elsewhere than first. With
    problems="error" (the default) any of these raises TraceProblems (a ValueError) naming every
    one; with problems="warn" they are listed in the report's `problems`, the rest is compared,
    and a tensor whose shape is wrong is a row with `shape_error` that is never a pass.
    Returns a dict: rows, first (None if all agree), missing (names only in ref), extra (trace
    names only in other), problems, tol, dtype, ok.
    """
    if dtype not in TOLERANCES:
        raise ValueError(f"dtype must be one of {', '.join(TOLERANCES)}, not {dtype!r}")
    if problems not in ("error", "warn"):
        raise ValueError(f"problems must be 'error' or 'warn', not {problems!r}")
    fixed = tol is not None or model is None
    tol = TOLERANCES[dtype] if tol is None else check_float("tol", tol, POSITIVE)
    full_other, full_ref = _renamed_trace(other), ref_trace
    if not fixed:
        ids = _ids_of(ref_trace, ids)
    ref_trace, other, token_of = on_shared_tokens(ref_trace, other)
    other = {_renamed(name): value for name, value in other.items()}
    found = check_trace(ref_trace, other)
    if found and problems == "error":
        raise TraceProblems(found)
    unfit = {p["name"]: p["message"] for p in found if p["kind"] in ("token_axis", "tokens", "shape")}
    names = [n for n in order(ref_trace) if n in other]
    locals_, local_note = {}, None
    if fixed:
        noise = {}
    else:
        if noise is None:
            noise = noise_scales(model, full_ref, dtype, ids, state, seed)
        local_note = _local_unfit(full_other, len(ids)) if local else "not asked for"
        if local_note is None:
            for name in unfit:
                full_other.pop(name, None)
            locals_ = local_check(model, full_other, dtype, ids, state, seed)
    floor = 2.0 ** -(SIGNIFICAND_BITS[dtype] + 1)
    rows, first = [], None
    for name in names:
        if name in unfit:
            rows.append(dict(name=name, shape_error=unfit[name]))
            continue
        a, b = np.asarray(ref_trace[name], np.float64), np.asarray(other[name], np.float64)
        name_tol = tol if fixed or name not in noise else NOISE_MARGIN * max(noise[name], floor)
        row, d = _compare_one(name, a, b, name_tol)
        if not fixed:
            row["noise"] = noise.get(name)
        if name in locals_:
            loc = locals_[name]
            beyond = loc["per_token"] > loc["tol"]
            row["local"] = dict(error=loc["error"], noise=loc["noise"], tol=loc["tol"],
                                ratio=loc["ratio"], bad=loc["bad"],
                                first_token=(_token_of_row(full_other, name, int(np.argmax(beyond)))
                                             if loc["bad"] else None))
        rows.append(row)
        if row["bad"] and not name.startswith("final."):
            per_token = d.reshape(d.shape[0] if d.ndim else 1, -1).max(axis=1)
            i = int(np.argmax(per_token > name_tol))    # the first row beyond
            t = row["first_token"] = token_of(name, i)
            if first is None or t < first["token"]:
                error = float(per_token[i])
                first = dict(token=t, name=name, error=error, tol=name_tol,
                             ratio=error / name_tol, check="global")
    local_first = None
    for row in rows:                                    # forward order: the earliest token wins
        loc = row.get("local")
        if loc and loc["bad"] and (local_first is None or loc["first_token"] < local_first["token"]):
            t = loc["first_token"]
            error = float(locals_[row["name"]]["per_token"][_row_of_token(full_other, row["name"], t)])
            local_first = dict(token=t, name=row["name"], error=error, tol=loc["tol"],
                               ratio=error / loc["tol"], check="local")
    first = local_first or first
    if first:
        layer = first["name"].split(".")[0][1:] if first["name"].startswith("L") else None
        first.update(layer=int(layer) if layer is not None else None,
                     op=first["name"].split(".", 1)[-1])
    missing = [n for n in order(ref_trace) if n not in other]
    unknown = {p["name"] for p in found if p["kind"] == "unknown"}
    extra = [n for n in order(other) if n not in ref_trace and n not in unknown]
    ok = all(not r.get("bad", True) and not r.get("local", {}).get("bad") for r in rows)
    return dict(rows=rows, first=first, missing=missing, extra=extra, problems=found, tol=tol,
                dtype=dtype, ok=ok and bool(rows), calibrated=not fixed,
                local=None if fixed else (local_note or "done"))


def _renamed_trace(tr):
    """A shallow copy of a trace with old names renamed, keeping its row lists."""
    out = Trace({_renamed(name): value for name, value in tr.items()})
    for key in ("tokens", "state_tokens", "meta"):
        setattr(out, key, getattr(tr, key, None))
    return out


def _ids_of(ref_trace, ids):
    """The token ids a reference trace is of: `ids`, else its meta's."""
    if ids is None:
        ids = (getattr(ref_trace, "meta", None) or {}).get("ids")
    if ids is None:
        raise ValueError("calibrated tolerances need the token ids the reference trace is of: "
                         "pass ids=, or use a trace written by `tinyrwkv trace` (its meta has them)")
    return np.asarray(ids, dtype=np.int64)


def _local_unfit(other, T):
    """Why the local op check cannot run on `other` (None when it can): it needs every token."""
    rows = getattr(other, "tokens", None)
    if rows is not None and not np.array_equal(np.asarray(rows), np.arange(T)):
        return ("skipped: the other trace holds a subset of the tokens, and an op's inputs "
                "include the token before")
    if "logits" in other and len(other["logits"]) != T:
        return f"skipped: the other trace has {len(other['logits'])} token rows, not {T}"
    return None


def _token_of_row(tr, name, i):
    if name.endswith(".state"):
        rows = getattr(tr, "state_tokens", None)
        return int(rows[i]) if rows is not None else i
    return i


def _row_of_token(tr, name, t):
    if name.endswith(".state") and getattr(tr, "state_tokens", None) is not None:
        return int(np.searchsorted(tr.state_tokens, t))
    return t


def on_shared_tokens(ref_trace, other):
    """Both traces cut to the tokens both hold, name by name (a trace of a subset of the tokens,
    or of the states every K tokens, docs/formats.md §8.4, against a fuller one), and a function
    (name, row) -> the token index of that row. Traces without row lists pass unchanged."""
    def rows(tr, name):
        return tr.rows_of(name) if isinstance(tr, Trace) else None
    if not any(isinstance(tr, Trace) and (tr.tokens is not None or tr.state_tokens is not None)
               for tr in (ref_trace, other)):
        return ref_trace, other, lambda name, t: t
    a_out, b_out, kept = dict(ref_trace), dict(other), {}
    for name in ref_trace:
        if name not in other or name.startswith("final."):
            continue
        ra, rb = rows(ref_trace, name), rows(other, name)
        if ra is None and rb is None:
            continue
        a, b = np.asarray(ref_trace[name]), np.asarray(other[name])
        ra = np.arange(len(a)) if ra is None else ra
        rb = np.arange(len(b)) if rb is None else rb
        if len(ra) != len(a) or len(rb) != len(b):
            continue                                 # a wrong row count: compare reports the shape
        shared, ia, ib = np.intersect1d(ra, rb, return_indices=True)
        a_out[name], b_out[name], kept[name] = a[ia], b[ib], shared
    return a_out, b_out, lambda name, t: int(kept[name][t]) if name in kept else t


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
                   rel_rms=float(np.sqrt((diff ** 2).mean()) / rms), tol=tol,
                   ratio=float(diff.max() / std / tol), shape=list(a.shape),
                   bad=bool(diff.max() / std > tol))
    nonfinite = {which: int(x.size - np.count_nonzero(np.isfinite(x)))
                 for which, x in (("reference", a), ("other", b))}
    if any(nonfinite.values()):
        row["nonfinite"] = ", ".join(f"{n} in the {which}" for which, n in nonfinite.items() if n)
    return row, diff / std


def format_report(report, warnings=True):
    """The report as text: one row per tensor, the tolerance, what was not compared, any problems
    (problems="warn"; one line each unless warnings=False, as when they went to stderr already)
    and the first divergence with its ratio to the tolerance."""
    calibrated = report.get("calibrated")
    has_local = any("local" in r for r in report["rows"])
    lines = [f"{'tensor':16s} {'max|d|':>10s} {'max|d|/std':>11s} {'rel RMS':>10s} "
             f"{'tol':>8s} {'/tol':>8s}" + (f" {'local/tol':>9s}" if has_local else "")]
    for r in report["rows"]:
        if "shape_error" in r:
            lines.append(f"{r['name']:16s} shape {r['shape_error']}  BEYOND")
            continue
        flag = "  BEYOND" if r["bad"] else ""
        loc = r.get("local")
        if loc and loc["bad"]:
            flag += "  LOCAL"
        if "nonfinite" in r:
            flag += f"  NaN/Inf: {r['nonfinite']}"
        ratio = r["max_rel"] / r["tol"]
        local = (f" {loc['ratio']:9.2g}" if loc else f" {'':9s}") if has_local else ""
        lines.append(f"{r['name']:16s} {r['max_abs']:10.2e} {r['max_rel']:11.2e} "
                     f"{r['rel_rms']:10.2e} {r['tol']:8.1e} {ratio:8.2g}{local}{flag}")
    if calibrated:
        lines.append(f"tolerance ({report['dtype']}): max|d|/std <= {NOISE_MARGIN:g} x what "
                     f"rounding to {report['dtype']} does to each tensor on this model and these "
                     "tokens (tol column)")
        lines.append(f"local op check: {report['local']}" if report["local"] != "done" else
                     f"local op check: each op recomputed from the other trace's own inputs, "
                     f"within {LOCAL_MARGIN:g} x its own rounding noise (local/tol column)")
    else:
        lines.append(f"tolerance ({report['dtype']}): max|d|/std <= {report['tol']:g} for every "
                     "tensor (give the model for tolerances that follow the numbers and the local "
                     "op check)")
    for key, what in (("missing", "not in the other trace"), ("extra", "not in the reference")):
        names = report.get(key) or []
        if names:
            lines.append(f"{what} ({len(names)}, not compared): " + ", ".join(names[:8])
                         + (" ..." if len(names) > 8 else ""))
    problems = report.get("problems") or []
    for problem in problems if warnings else ():
        lines.append(f"WARNING: {problem['message']}")
    f = report["first"]
    if f:
        where = f"layer {f['layer']}, " if f["layer"] is not None else ""
        ratio = (f": max|d|/std {f['error']:.2e} at that token, {f['ratio']:.3g}x the tolerance"
                 if "ratio" in f else "")
        how = {"local": " [local: the op's own inputs do not explain its output]",
               "global": ""}.get(f.get("check"), "")
        lines.append(f"FIRST DIVERGENCE: {where}op {f['op']}, token {f['token']} ({f['name']})"
                     + ratio + how)
    elif report["ok"] and problems:
        lines.append(f"all compared tensors within tolerance, but the trace has {len(problems)} "
                     f"problem{'s' * (len(problems) > 1)} (warnings)")
    elif report["ok"]:
        lines.append("all tensors within tolerance")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------
# The report as JSON, and as a heatmap
# ----------------------------------------------------------------------------------------------

REPORT_FORMAT = "tinyrwkv-compare-v1"


def _finite_or_none(x):
    return float(x) if x is not None and np.isfinite(x) else None


def report_json(report, reference=None, other=None):
    """The report as a JSON-ready dict (REPORT_FORMAT). Per tensor: `error` (max|d|/std), `tol`,
    `ratio` (error / tol; > 1 is beyond), `max_abs`, `rel_rms`, `beyond`, `first_token` (the
    first token beyond tolerance) and, where they are, `nonfinite` or `shape_error`. An infinite
    error (a NaN or Inf in a trace) is null, with `nonfinite` saying where. `first`: the first
    divergence (name, layer, op, token, error, tol, ratio) or null."""
    tensors = []
    for r in report["rows"]:
        if "shape_error" in r:
            tensors.append(dict(name=r["name"], beyond=True, shape_error=r["shape_error"]))
            continue
        row = dict(name=r["name"], shape=r.get("shape"), error=_finite_or_none(r["max_rel"]),
                   tol=r["tol"], ratio=_finite_or_none(r["max_rel"] / r["tol"]),
                   max_abs=_finite_or_none(r["max_abs"]), rel_rms=_finite_or_none(r["rel_rms"]),
                   beyond=r["bad"], first_token=r.get("first_token"))
        if "nonfinite" in r:
            row["nonfinite"] = r["nonfinite"]
        if r.get("noise") is not None:
            row["noise"] = r["noise"]
        if "local" in r:
            row["local"] = {k: (_finite_or_none(v) if k in ("error", "noise", "tol", "ratio")
                                else v) for k, v in r["local"].items()}
        tensors.append(row)
    first = report["first"]
    if first:
        first = {k: (_finite_or_none(v) if k in ("error", "ratio") else v) for k, v in first.items()}
    return dict(format=REPORT_FORMAT, reference=None if reference is None else str(reference),
                other=None if other is None else str(other), dtype=report["dtype"],
                tol=report["tol"], calibrated=bool(report.get("calibrated")),
                local=report.get("local"), ok=report["ok"], first=first, tensors=tensors,
                missing=report["missing"], extra=report.get("extra", []),
                problems=report.get("problems", []))


def save_report_json(path, report, reference=None, other=None):
    """Write report_json(...) to `path` atomically (strict JSON: no NaN or Infinity)."""
    text = json.dumps(report_json(report, reference, other), indent=1, allow_nan=False)
    with atomic_open(path, "w") as f:
        f.write(text + "\n")
    return Path(path)


def heatmap_grid(report):
    """The heatmap's layout and values: (layers, ops, ratios), ratios[i][j] the error/tolerance
    of L{layers[i]}.{ops[j]}: the local op check's where it ran (it points at the op a bug is
    in), else the global one's (inf for a NaN/Inf or a shape error, nan where not compared). Ops
    are those of LAYER_NAMES compared in some layer, in forward order."""
    cells = {}
    for r in report["rows"]:
        m = LAYER_NAME.fullmatch(r["name"])
        if m:
            ratio = (np.inf if "shape_error" in r else r["local"]["ratio"] if "local" in r
                     else r["max_rel"] / r["tol"])
            cells[int(m.group(1)), m.group(2)] = ratio
    layers = sorted({layer for layer, _ in cells})
    ops = [op for op in LAYER_NAMES if any((layer, op) in cells for layer in layers)]
    ratios = np.array([[cells.get((layer, op), np.nan) for op in ops] for layer in layers],
                      dtype=np.float64).reshape(len(layers), len(ops))
    return layers, ops, ratios


def save_heatmap(path, report):
    """A PNG of log10(error / tolerance) per layer (rows) and op (columns), centred on the
    tolerance (white: at it; red: beyond; blue: within), with the first divergence boxed and the
    tensors outside the layers (ln0, logits, final.*) in the title. Needs matplotlib (an
    optional dependency: pip install matplotlib). The PNG's "Description" text says the layout
    as JSON ({"layers": [...], "ops": [...]}). Returns that layout."""
    try:
        import matplotlib
    except ImportError:
        raise ImportError("the compare heatmap needs matplotlib, an optional dependency: pip "
                          "install matplotlib (or leave out --heatmap)", name="matplotlib") from None
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.colors import TwoSlopeNorm

    layers, ops, ratios = heatmap_grid(report)
    if not layers:
        raise ValueError("no per-layer tensor was compared, so there is no heatmap to draw; "
                         "leave out --heatmap, or record the L{i}.* tensors")
    with np.errstate(divide="ignore"):
        logs = np.log10(np.where(ratios > 0, ratios, 1e-12))
    finite = logs[np.isfinite(logs)]
    top = max(1.0, float(finite.max()) if finite.size else 1.0)
    bottom = min(-1.0, float(finite.min()) if finite.size else -1.0)
    shown = np.where(np.isinf(logs), top, logs)        # NaN/Inf and shape errors: the reddest
    fig, ax = plt.subplots(figsize=(2.5 + 0.42 * len(ops), 2.4 + 0.36 * len(layers)))
    image = ax.imshow(np.ma.masked_invalid(shown), cmap="RdBu_r", aspect="auto",
                      norm=TwoSlopeNorm(vcenter=0.0, vmin=bottom, vmax=top))
    ax.set_facecolor("0.85")                           # not compared: grey
    ax.set_xticks(range(len(ops)), ops, rotation=90)
    ax.set_yticks(range(len(layers)), [f"L{i}" for i in layers])
    for i, j in zip(*np.nonzero(np.isinf(ratios))):
        ax.text(j, i, "x", ha="center", va="center", fontsize=8)
    first = report.get("first")
    m = LAYER_NAME.fullmatch(first["name"]) if first else None
    if m and int(m.group(1)) in layers and m.group(2) in ops:
        i, j = layers.index(int(m.group(1))), ops.index(m.group(2))
        ax.add_patch(plt.Rectangle((j - 0.5, i - 0.5), 1, 1, fill=False, lw=2.5, ec="black"))
    fig.colorbar(image, ax=ax, label="log10(error / tolerance)", fraction=0.04, pad=0.02)
    others = [r for r in report["rows"] if not LAYER_NAME.fullmatch(r["name"])]
    local = any("local" in r for r in report["rows"])
    tol_text = ("each tensor's, calibrated" if report.get("calibrated")
                else f"{report['tol']:g}")
    title = (("local op check: error over its tolerance" if local else
              f"max|d|/std over the tolerance ({report['dtype']}: {tol_text})") + "; red: "
             "beyond; box: first divergence; x: NaN/Inf or wrong shape; grey: not compared")
    if others:
        title += "\n" + ", ".join(f"{r['name']} " + ("shape!" if "shape_error" in r else
                                                      f"{r['max_rel'] / r['tol']:.2g}x")
                                  for r in others)
    ax.set_title(title, fontsize=8)
    fig.tight_layout()
    layout = dict(layers=layers, ops=ops)
    path = Path(path)
    try:
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=100, bbox_inches="tight",
                        metadata={"Description": json.dumps(layout)})
    finally:
        plt.close(fig)
    return layout


# ----------------------------------------------------------------------------------------------
# Tolerances that follow the numbers (docs/formats.md §8.5)
# ----------------------------------------------------------------------------------------------
#
# One max|d|/std tolerance per precision cannot fit every tensor: y = S r loses digits to
# cancellation and the group norm then divides by a small per-head variance; squared ReLU has a
# heavy tail. So with the model at hand, compare measures what rounding alone does to each tensor
# on these weights and tokens, and tests the other trace against a multiple of that:
#
# - the noise of a precision: the reference run again, emulating that precision (every step's
#   output rounded to it; model.Steps is where), twice, as two correct designs would: float32
#   arithmetic with round-to-nearest and the WKV output read from the float32 state; float64
#   arithmetic with stochastic rounding (an unbiased random rounding per value) and the output
#   read from the state rounded to the precision (the official package's CPU bf16/fp16 path).
#   A tensor's noise is the larger max|d|/std of the two against the float64 reference.
# - the global check: the other trace's max|d|/std over NOISE_MARGIN x that noise.
# - the local op check: each op recomputed in float64 from the other implementation's own
#   recorded inputs (the segment of the layer between two recorded names), so rounding upstream
#   does not count against an op; its noise is the same recomputation in the emulated precision.
#   A real bug is an op whose output its own inputs do not explain: it fails here, alone, where
#   it is, and everything after it passes (correct ops on wrong inputs).

# The significand bits each precision keeps (fp16 also has its narrow exponent range: numpy's).
SIGNIFICAND_BITS = {"fp32": 23, "tf32": 10, "fp16": 10, "bf16": 7}

# The margins over the noise. Correct implementations stayed within 6.4x their noise, globally
# and locally: 30 correct variants (float32, emulated fp16/bf16; 0.1B and 1.5B shapes, 128-2048
# tokens), the official package (CPU fp32/bf16/fp16, CUDA bf16/fp16), llama.cpp F32/F16/Q8_0 and
# fla (chunked bf16); the largest were fla's and llama.cpp's w_log (0.606531 for e^-0.5) and the
# official bf16 residual stream. The smallest planted bug, a decay constant of 0.6065 (5e-5
# relative), is 106x its noise at L0.w; the others 1e3-1e5x (benchmarks/results/oracle_i16.md).
NOISE_MARGIN = 20.0
LOCAL_MARGIN = 20.0


def round_to(x, dtype, rng=None):
    """`x` rounded to the precision `dtype` (SIGNIFICAND_BITS), returned as float32 (fp32) or
    float64: round-to-nearest-even, or with `rng` stochastic rounding (up or down at random, with
    the probability that makes it unbiased). NaN and Inf pass through."""
    x = np.asarray(x)
    if rng is None:
        if dtype == "fp16":
            with np.errstate(over="ignore"):
                return x.astype(np.float16).astype(np.float32)
        x = x.astype(np.float32)
        if dtype == "fp32":
            return x
        drop = 23 - SIGNIFICAND_BITS[dtype]
        bits = x.view(np.uint32)
        half = np.uint32((1 << (drop - 1)) - 1) + ((bits >> np.uint32(drop)) & np.uint32(1))
        finite = np.isfinite(x)
        out = np.where(finite, (bits + half) >> np.uint32(drop) << np.uint32(drop), bits)
        return out.astype(np.uint32).view(np.float32)
    x = x.astype(np.float64)
    with np.errstate(divide="ignore", invalid="ignore"):
        ulp = np.exp2(np.floor(np.log2(np.abs(x))) - SIGNIFICAND_BITS[dtype])
        down = np.floor(x / ulp) * ulp
        up_p = (x - down) / ulp
        out = np.where(rng.random(x.shape) < up_p, down + ulp, down)
    out = np.where(np.isfinite(x) & (x != 0), out, x)
    if dtype == "fp16":
        with np.errstate(over="ignore"):
            out = out.astype(np.float16).astype(np.float64)    # its range (the value is exact)
    return out


def emulated_steps(dtype, rng=None, base=None, state_read=False):
    """model.Steps computing as an implementation in `dtype` does: each step's output rounded to
    it (round_to; stochastic with `rng`), weight products from rounded inputs, and the WKV state
    kept as it is (implementations keep it in float32), its output y rounded. state_read: y is
    read from the state rounded to `dtype` (S r with S in bf16, as the official package's CPU
    bf16/fp16 path does), the other common design. Run it on a float32 reference for
    round-to-nearest, on a float64 one with `rng`."""
    base = base or ref.STEPS
    if dtype == "tf32":             # TF32 is a mode of the matrix units: float32 elsewhere
        def matmul(x, W):
            return base.matmul(round_to(x, dtype, rng), round_to(W, dtype, rng))
        if not state_read:
            return replace(base, matmul=matmul)

        def tf32_step(S, *vectors):  # a chunked kernel's products in TF32 (fla's tl.dot)
            return base.wkv_step(round_to(S, dtype, rng),
                                 *(round_to(u, dtype, rng) for u in vectors))

        def tf32_wkv(S, r, w, k, v, alpha, beta, step=tf32_step):
            return ref.wkv_seq(S, r, w, k, v, alpha, beta, step=step)
        return replace(base, matmul=matmul, wkv_step=tf32_step, wkv=tf32_wkv)
    rounded = lambda f: (lambda *args: round_to(f(*args), dtype, rng))
    fields = {f: rounded(getattr(base, f)) for f in base.__dataclass_fields__
              if f not in ("wkv", "wkv_step", "matmul")}

    def matmul(x, W):
        return round_to(base.matmul(round_to(x, dtype, rng), W), dtype, rng)

    def wkv_step(S, r, w, k, v, alpha, beta):
        S, y = base.wkv_step(S, r, w, k, v, alpha, beta)
        if state_read:
            y = (round_to(S, dtype, rng) @ r[..., :, None])[..., 0]
        return S, round_to(y, dtype, rng)

    def wkv(S, r, w, k, v, alpha, beta, step=wkv_step):
        return ref.wkv_seq(S, r, w, k, v, alpha, beta, step=step)
    return replace(base, matmul=matmul, wkv=wkv, wkv_step=wkv_step, **fields)


class _StatSink:
    """A trace sink that keeps no array: for each name the reference holds, max|d| / std of the
    run's value against the reference's (the compare statistic), rows matched by token (the
    reference's `tokens` / `state_tokens`: a trace of a selection)."""

    def __init__(self, ref_trace):
        self.ref, self.stats, self._std = ref_trace, {}, {}
        self.rows = getattr(ref_trace, "tokens", None)
        state_rows = getattr(ref_trace, "state_tokens", None)
        self.state_row = (None if state_rows is None else
                          {int(t): i for i, t in enumerate(state_rows)})

    def std(self, name):
        if name not in self._std:
            a = np.asarray(self.ref[name], np.float64)
            a = a[np.isfinite(a)]
            self._std[name] = float(a.std()) if a.size and a.std() > 0 else 1.0
        return self._std[name]

    def note(self, name, d):
        self.stats[name] = max(self.stats.get(name, 0.0), float(d) / self.std(name))

    def array(self, name, value):
        if name not in self.ref:
            return
        if self.rows is not None and not name.startswith("final."):
            value = value[self.rows]
        if np.shape(self.ref[name]) == np.shape(value):
            with np.errstate(invalid="ignore"):
                d = np.abs(np.asarray(value, np.float64) - np.asarray(self.ref[name], np.float64))
            self.note(name, np.nanmax(d) if d.size else 0.0)

    def state(self, name):
        return _StatRows(self, name)


class _StatRows:
    def __init__(self, sink, name):
        self.sink, self.name, self.t = sink, name, 0

    def add(self, S):
        ref_rows = self.sink.ref.get(self.name)
        i = self.t if self.sink.state_row is None else self.sink.state_row.get(self.t)
        if ref_rows is not None and i is not None and i < len(ref_rows):
            d = np.abs(np.asarray(S, np.float64) - np.asarray(ref_rows[i], np.float64))
            self.sink.note(self.name, np.nanmax(d))
        self.t += 1

    def close(self, shape, dtype):
        pass


def noise_scales(model, ref_trace, dtype, ids, state=None, seed=0):
    """{name: max|d|/std} that rounding alone causes in `dtype` (the section's comment): the
    larger of the two emulated runs (round-to-nearest in float32 arithmetic, stochastic rounding
    in float64) against `ref_trace`, a float64 trace of `model` over `ids` from `state` (of all
    tokens, or of those its `tokens` / `state_tokens` list)."""
    select = Selection(names=[name for name in ref_trace if "[" not in name])
    out = {}
    for arithmetic, rng in (("float32", None), ("float64", np.random.default_rng(seed))):
        sink = _StatSink(ref_trace)
        steps = emulated_steps(dtype, rng, state_read=rng is not None)
        _run(model, ids, state, steps, arithmetic, select, sink, None)
        for name, value in sink.stats.items():
            out[name] = max(out.get(name, 0.0), value)
    return out


def _replay(reference, other, ids, state, steps, rnd):
    """The local op check's recomputation: the reference's own functions, each segment of a
    layer fed the other trace's values for its inputs where the other trace has them (else this
    replay's). Yields (name, value) in forward order, one layer at a time. `rnd` rounds the
    other trace's arrays and the WKV output y as the emulated precision does (or passes them)."""
    T, H = len(ids), reference.config.n_head
    cast = lambda a: rnd(np.asarray(a, reference.dtype))
    st = reference.check_state(state)
    theirs = lambda name, mine: cast(other[name]) if name in other else mine
    x0 = steps.layer_norm(reference.emb[ids], *reference.ln0)
    yield "ln0", x0
    x_in, v_first = theirs("ln0", x0), None
    x_emb = x_in
    for i, p in enumerate(reference.blocks):
        L = f"L{i}."
        ln1 = steps.layer_norm(x_in, p["ln1.weight"], p["ln1.bias"])
        yield L + "ln1", ln1
        x = theirs(L + "ln1", ln1)
        acts = {}
        ref.time_mix_inputs(x, ref.token_shift(x, st.att_shift[i]), v_first, p, i, H, steps, acts)
        acts["w_log"], acts["w_cuda"] = decay_forms(theirs(L + "w_pre", acts["w_pre"]))
        for name in ("xr", "xw", "xk", "xv", "xa", "xg", "r", "w_pre", "w", "w_log", "w_cuda",
                     "k", "v", "a", "g", "kk", "k_tilde", "v_res"):
            yield L + name, acts[name]
        if i == 0:
            v_first = theirs("L0.v_res", theirs("L0.v", acts["v"]))
        mine = {name: theirs(L + name, acts[name]) for name in ("r", "k_tilde", "v_res", "kk", "a",
                                                                  "g")}
        w = acts["w"]
        if L + "w" in other:
            w = cast(other[L + "w"])
        elif L + "w_log" in other:
            w = np.exp(cast(other[L + "w_log"]))
        # The WKV: every token from the other's state before it where recorded (a chunk replay
        # from the last recorded state otherwise), with the vectors time_mix passes (model.py).
        rows = _state_rows(other, L + "state", T)
        recorded = {} if rows is None else dict(zip(rows.tolist(), range(len(rows))))
        split = lambda u: ref.heads(u, H)
        vectors = [split(u) for u in (mine["r"], w, mine["k_tilde"], mine["v_res"], -mine["kk"],
                                      mine["kk"] * mine["a"])]
        if rows is not None and np.array_equal(rows, np.arange(T)):
            # every token's state before it is recorded: all T steps at once
            before = np.concatenate([st.wkv[i][None], cast(other[L + "state"][:-1])])
            states, y = steps.wkv_step(before, *vectors)
        else:
            S, states, ys = st.wkv[i], [], []
            for t in range(T):
                if t - 1 in recorded:
                    S = cast(other[L + "state"][recorded[t - 1]])
                S, y_t = steps.wkv_step(S, *(u[t] for u in vectors))
                if rows is None or t in recorded:
                    states.append(S)
                ys.append(y_t)
            y = np.stack(ys)
            states = np.stack(states) if states else np.empty((0,) + S.shape, S.dtype)
        y = rnd(y.reshape(T, -1))
        yield L + "state", states
        yield L + "y", y
        acts = {}
        att = ref.time_mix_output(theirs(L + "y", y), mine["r"], mine["k_tilde"], mine["v_res"],
                                  mine["g"], p, H, steps, acts)
        for name in ("gn", "bonus", "att"):
            yield L + name, acts[name]
        x_mid = x_in + theirs(L + "att", att)                 # block(): x + time mix
        xf = steps.layer_norm(x_mid, p["ln2.weight"], p["ln2.bias"])
        s_emb = ref.deep_embed_rows(p, ids, x_emb) if "ffn.s1" in p else None
        acts = {}
        ffn = ref.channel_mix(xf, ref.token_shift(xf, st.ffn_shift[i]), p, s_emb, steps, acts)
        yield L + "ffn_hidden", acts["ffn_hidden"]
        yield L + "ffn", ffn
        block = x_mid + theirs(L + "ffn", ffn)                # block(): x + channel mix
        yield L + "block", block
        x_in = theirs(L + "block", block)
    yield "logits", steps.matmul(steps.layer_norm(x_in, *reference.ln_out), reference.head.T)


def _state_rows(other, name, T):
    """The token after which each row of the other trace's `name` (an L{i}.state) was taken, or
    None when it has no such name."""
    if name not in other:
        return None
    rows = getattr(other, "state_tokens", None)
    return np.arange(len(other[name])) if rows is None else np.asarray(rows)


def local_check(model, other, dtype, ids, state=None, seed=0):
    """The local op check (the section's comment): {name: row} for every name of `other` the
    replay recomputes, each row {error, noise, tol, ratio, bad, per_token}: `error` max|d|/std of
    the other's value against the float64 recomputation from its own inputs, `noise` what
    rounding to `dtype` does to the same recomputation, `tol` LOCAL_MARGIN x noise (at least the
    precision's unit roundoff), `per_token` the error token by token. `other` must hold every
    token's row (a trace of a subset of the tokens has no previous token to shift from)."""
    exact_ref, f32_ref = reference_of(model, "float64"), reference_of(model, "float32")
    ids = exact_ref.check_ids(ids)
    rng = np.random.default_rng(seed)
    replays = zip(
        _replay(exact_ref, other, ids, state, exact_ref.steps, lambda a: a),
        _replay(f32_ref, other, ids, state, emulated_steps(dtype, base=f32_ref.steps),
                lambda a: round_to(a, dtype)),
        _replay(exact_ref, other, ids, state,
                emulated_steps(dtype, rng, base=exact_ref.steps, state_read=True),
                lambda a: round_to(a, dtype, rng)))
    floor = 2.0 ** -(SIGNIFICAND_BITS[dtype] + 1)
    out = {}
    for (name, exact), (_, rn), (_, sr) in replays:
        if name not in other or np.shape(other[name]) != np.shape(exact):
            continue
        exact = np.asarray(exact, np.float64)
        finite = exact[np.isfinite(exact)]
        std = float(finite.std()) if finite.size and finite.std() > 0 else 1.0
        with np.errstate(invalid="ignore", over="ignore"):
            b = np.asarray(other[name], np.float64)
            d = np.where(np.isfinite(b) & np.isfinite(exact), np.abs(b - exact), np.inf) / std
            noise = max(float(np.nanmax(np.abs(np.asarray(e, np.float64) - exact))) / std
                        for e in (rn, sr)) if exact.size else 0.0
        tol = LOCAL_MARGIN * max(noise if np.isfinite(noise) else 0.0, floor)
        per_token = d.reshape(len(d), -1).max(axis=1) if d.size else np.zeros(len(d))
        error = float(per_token.max()) if per_token.size else 0.0
        out[name] = dict(error=error, noise=noise, tol=tol, ratio=error / tol,
                         bad=bool(error > tol), per_token=per_token)
    return out
