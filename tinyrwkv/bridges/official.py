"""The official `rwkv` package (pip install rwkv torch; tested with rwkv 0.8.32), run with
its v7 functions wrapped so that what they compute is recorded under tinyrwkv's trace names.

    trace, final = record("model.pth", ids, state=None, select=None, mode="decode")

How it runs. The package's RWKV_x070 model loads the .pth (folding ln0 into the embedding, as it
always does) and its forward is a TorchScript method, which cannot be observed from outside. Its
plain-Python source is still there (torch keeps it as the method stub's `original_method`), so the
bridge runs that, unchanged: the same loop over layers, the same calls. The loop looks up four
module-level functions of `rwkv.model` and `F` (torch.nn.functional) when it runs, and those are
what `_wrapped` replaces, for the duration of the call only (a context manager that puts the
originals back in a `finally`). THIS (with `_watching`, detail="fine"'s line tracer below) IS
THE ONLY PLACE tinyrwkv touches another package's functions, and it has to: the package has no
hooks. Each wrapper calls the package's own compiled
function with the same arguments and records what goes in and comes out; nothing is recomputed:

    RWKV_x070_TMix_one / _seq   in: x = L{i}.ln1 (the time-mix input)
                                out: L{i}.att, the new WKV state (L{i}.state, [head][value][key]
                                     as the package stores it), and in layer 0 v_first, which is
                                     layer 0's value xv Wv^T: L0.v and L0.v_res (layer 0 has no
                                     value residual). Later layers' v_res stays inside the function.
    RWKV_x070_CMix_one / _seq   out: L{i}.ffn
    F.layer_norm                in: the residual stream. Its first input in a forward call is the
                                    embedding row, already LayerNorm-ed by ln0 at load: `ln0`; the
                                    input of layer i+1's ln1 and of ln_out is L{i}.block, observed,
                                    not recomputed (the package adds x + att, then + ffn, in its
                                    dtype; the test checks that is what arrives here).
    the forward's return        logits; the returned state list: final.att_shift/wkv/ffn_shift.

The package's forward run this way gives bit-identical logits to its compiled forward (tested).

mode="decode" (default) feeds the ids one at a time (forward_one, the package's generation path):
every name has every token, L{i}.state after each token. mode="prefill" feeds them in one call
(forward_seq, full_output=True: the package's prompt path): there the state is only returned after
the last token, so L{i}.state has one row and `trace.state_tokens` says which (but see "fine").

detail="coarse" (default) records the names above, around the package's compiled functions.
Inside them (the lerps xr..xg, r, w, k, v, a, g, kk, k_tilde, v_res, y, gn, ffn_hidden) nothing
can be seen from outside: TorchScript runs them. But torch keeps the Python function each was
compiled from (`_torchdynamo_inline`), and detail="fine" runs that instead, unchanged, with a line
tracer (sys.settrace, put back after) that copies the function's local variables at the start of
the lines listed in FINE_LINES, found by their text: the package's own numbers, in the middle of
its own code, nothing re-derived. On CPU that eager run gives bit-identical logits to the compiled
one (tested). In prefill, the recurrence's loop then shows the state after every token.

Never recorded, because the package never holds them: w_pre (it computes `(w0 + w).float()`
inside one expression), w_log and w_cuda (its CPU path goes straight to the decay w; the CUDA
kernel's input is not on this path), bonus (added to gn in one expression).

A real difference from tinyrwkv: on this CPU path the package's decay is
exp(-0.606531 * sigmoid(w_pre)), a rounded e^-0.5 (= 0.60653066); tinyrwkv uses the exact
constant, as does the package's CUDA path (-softplus(-w_pre) - 0.5). log w differs by 5.6e-7
relative (0.606531 is the larger: slightly faster decay). Measured alone (tinyrwkv in float64
with each constant, 0.1B shape, 128 tokens) it moves w by 1.8e-7 (most of the official trace's
w difference), the states by up to 5e-6 of their std, gn by up to 2.5e-5 and the logits by 1.3e-7:
inside float32's tolerance, so compare does not flag it, but it is there.

Model files: a .pth is given to the package as it is; anything else tinyrwkv reads (.safetensors,
GGUF, an HF folder) is first written to a temporary float32 .pth by tinyrwkv's writer (the stored
numbers widened exactly; quantised GGUF tensors dequantised). The package reads RWKV_V7_ON and
RWKV_DE_VERSION (DeepEmbed) once, when rwkv.model is first imported: record sets them before that
import, and refuses a process where rwkv.model was already imported with other settings.
"""

from __future__ import annotations

import contextlib
import io
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

from .. import oracle

PACKAGE_HINT = "pip install rwkv torch (a version with RWKV-7, RWKV_x070; 0.8.32 is tested)"
WRAPPED = ("RWKV_x070_TMix_one", "RWKV_x070_TMix_seq", "RWKV_x070_CMix_one", "RWKV_x070_CMix_seq",
           "F")


class OfficialError(RuntimeError):
    """The official package cannot run this (missing, wrong version, wrong process settings)."""


def _n_args(fn):
    """How many arguments a (TorchScript) function takes; None if that cannot be seen."""
    schema = getattr(fn, "schema", None)
    if schema is not None:
        return len(schema.arguments)
    code = getattr(getattr(fn, "_torchdynamo_inline", fn), "__code__", None)
    return None if code is None else code.co_argcount


def _import_package(deep_embed):
    """rwkv.model with RWKV-7 on (and DeepEmbed when the model has it), and torch."""
    if "rwkv.model" not in sys.modules:
        os.environ["RWKV_V7_ON"] = "1"
        os.environ["RWKV_CUDA_ON"] = "0"
        if deep_embed:
            os.environ["RWKV_DE_VERSION"] = "1"
        else:
            os.environ.pop("RWKV_DE_VERSION", None)
    try:
        import torch
        with contextlib.redirect_stdout(io.StringIO()):       # it prints a banner on import
            import rwkv.model as rm
    except ImportError as e:
        raise OfficialError(f"the official implementation needs the `rwkv` package and torch "
                            f"({e}): {PACKAGE_HINT}") from None
    if not hasattr(rm, "RWKV_x070"):
        raise OfficialError("rwkv.model was imported in this process without RWKV_V7_ON=1 (or "
                            "the installed rwkv has no RWKV-7): run the trace in a fresh process, "
                            f"or {PACKAGE_HINT}")
    # which channel mix the module was built with (DeepEmbed's takes 9 arguments, plain 5)
    n_args = _n_args(rm.RWKV_x070_CMix_one)
    built_de = n_args == 9
    if n_args is not None and built_de != bool(deep_embed):
        kind = "a DeepEmbed" if deep_embed else "a plain (not DeepEmbed)"
        built = "with" if built_de else "without"
        raise OfficialError(f"this is {kind} model, but rwkv.model was imported in this process "
                            f"{built} RWKV_DE_VERSION=1, which it reads once: run the trace in a "
                            "fresh process")
    methods = getattr(rm.RWKV_x070, "_methods", {})
    if not all(k in methods for k in ("forward_one", "forward_seq")):
        raise OfficialError("this version of the rwkv package has no forward_one/forward_seq "
                            f"script methods that the bridge can run: {PACKAGE_HINT}")
    return torch, rm


@contextlib.contextmanager
def _pth_file(model_path):
    """The model as a .pth the package can read: the file itself, or a temporary float32 copy."""
    path = Path(model_path)
    if path.is_file() and path.suffix.lower() == ".pth":
        yield path
        return
    from ..formats import open_model
    from ..formats.pth import write_pth
    source = open_model(path)
    with tempfile.TemporaryDirectory(prefix="tinyrwkv-official-") as tmp:
        out = Path(tmp) / "model.pth"
        write_pth(out, source, "f32")
        yield out


@contextlib.contextmanager
def _wrapped(rm, replacements):
    """rwkv.model's module-level names replaced by `replacements` inside the block, restored after
    (the only place tinyrwkv patches another package: see the module docstring)."""
    saved = {name: getattr(rm, name) for name in replacements}
    try:
        for name, fn in replacements.items():
            setattr(rm, name, fn)
        yield
    finally:
        for name, fn in saved.items():
            setattr(rm, name, fn)


class _Functional:
    """torch.nn.functional, but layer_norm reports its input first."""

    def __init__(self, F, on_layer_norm):
        self._F, self._on = F, on_layer_norm

    def layer_norm(self, x, *args, **kwargs):
        self._on(x)
        return self._F.layer_norm(x, *args, **kwargs)

    def __getattr__(self, name):
        return getattr(self._F, name)


class _Recorder:
    """Rows of each wanted name, as the wrappers see them; one forward call at a time."""

    def __init__(self, select, keep_row, keep_state, v_first=True, returned_state=True):
        self.select, self.keep_row, self.keep_state = select, keep_row, keep_state
        self.v_first, self.returned_state = v_first, returned_state
        self.rows = {}                    # name -> list of (rows, ...) float32 arrays
        self.layer, self.n_ln, self.token = 0, 0, 0

    def put(self, name, value, one_row):
        """one_row: `value` is one token's (no token axis), else (T, ...)."""
        if self.select.wants(name) and (name.endswith(".state") or self.keep_row(self.token)):
            a = value.detach().float().cpu().numpy().copy()
            self.rows.setdefault(name, []).append(a[None] if one_row else a)

    def put_flat(self, name, value):
        """A local of the package's function: (C,)-sized in a one-token call ((H, N, 1) for y),
        (T, C) in a sequence call."""
        one = self.token is not None
        self.put(name, value.reshape(-1) if one else value.reshape(value.shape[0], -1), one)

    def put_state(self, name, value, t):
        """The state after token t, seen inside a sequence call's loop."""
        if self.select.wants(name) and self.keep_state(t):
            a = value.detach().float().cpu().numpy().copy()
            self.rows.setdefault(name, []).append(a[None])

    def start_call(self, token):
        """A forward call begins; `token`: its token index (decode), or None (prefill)."""
        self.layer, self.n_ln, self.token = 0, 0, token

    # the wrappers' observations
    def layer_norm_input(self, x):
        k, self.n_ln, one = self.n_ln, self.n_ln + 1, self.token is not None
        if k == 0:
            self.put("ln0", x, one)                   # emb row, ln0 folded in at load
        elif k % 2 == 0:
            self.put(f"L{k // 2 - 1}.block", x, one)  # input of the next ln1 or of ln_out

    def tmix(self, i, x, out, state, v_first):
        self.layer, one = i, self.token is not None
        self.put(f"L{i}.ln1", x, one)
        self.put(f"L{i}.att", out, one)
        if i == 0 and self.v_first:
            self.put("L0.v", v_first, one)
            self.put("L0.v_res", v_first, one)
        if self.returned_state and self.keep_state(self.token):
            self.put(f"L{i}.state", state, True)      # the state after the call's last token

    def cmix(self, out):
        self.put(f"L{self.layer}.ffn", out, self.token is not None)

    def arrays(self):
        return {name: np.concatenate(parts) for name, parts in self.rows.items()}


# detail="fine": the package's time-mix and channel-mix functions are TorchScript, but torch keeps
# each one's Python source function (`_torchdynamo_inline`); run that (the same source, unchanged)
# and read its local variables as it goes, with a line tracer: at the start of each line below
# (found by its text, so a changed package fails loudly rather than recording the wrong thing),
# the named locals hold these trace names. Nothing is recomputed.
FINE_LINES = {
    "tmix": [   # (the line about to run, {trace op: the local variable that holds it then})
        ("kk = ", {"xr": "xr", "xw": "xw", "xk": "xk", "xv": "xv", "xa": "xa", "xg": "xg",
                   "r": "r", "k": "k", "v": "v", "a": "a", "g": "g"}),
        ("k = k * (1 + (a-1) * k_a)", {"kk": "kk"}),
        ("if layer_id == 0", {"k_tilde": "k"}),
        ("w = torch.exp(", {"v_res": "v"}),
        ("vk = v.view(H,N,1) @ k.view(H,1,N)", {"w": "w"}),       # forward_one's form
        ("for t in range(T):", {"w": "w"}),                        # forward_seq's (CPU) form
        ("xx[t] = ", {"state": "state"}),                          # the state after token t
        ("xx = torch.nn.functional.group_norm", {"y": "xx"}),
        ("xx = xx + ((r * k * r_k)", {"gn": "xx"}),
    ],
    "cmix": [("return k @ V_", {"ffn_hidden": "k"})],
}


def _source_function(fn):
    """The Python function a TorchScript function was compiled from."""
    py = getattr(fn, "_torchdynamo_inline", None)
    if py is None or not hasattr(py, "__code__"):
        raise OfficialError("detail='fine' needs the Python source of the package's TorchScript "
                            "functions, which this torch does not keep (_torchdynamo_inline): "
                            "use detail='coarse'")
    return py


def _line_map(py, kind):
    """{line number: {op: local}} for `py` (FINE_LINES[kind]), by the lines' text."""
    import inspect
    lines, first = inspect.getsourcelines(py)
    found = {}
    for text, ops in FINE_LINES[kind]:
        hits = [first + j for j, line in enumerate(lines) if line.strip().startswith(text)]
        if len(hits) > 1:
            raise OfficialError(f"detail='fine': {py.__name__} has {len(hits)} lines starting "
                                f"{text!r} (another rwkv version?): use detail='coarse'")
        if hits:
            found[hits[0]] = ops
    needed = {"xr", "r", "k", "v", "kk", "k_tilde", "v_res", "w", "y", "gn"} if kind == "tmix" \
        else {"ffn_hidden"}
    seen = {op for ops in found.values() for op in ops}
    if not needed <= seen:
        raise OfficialError(f"detail='fine': {py.__name__} does not have the lines the bridge "
                            f"reads ({', '.join(sorted(needed - seen))} not found; another rwkv "
                            "version?): use detail='coarse'")
    return found


@contextlib.contextmanager
def _watching(code, lines, on_line):
    """Calls on_line(ops, frame) at the start of each line in `lines` of frames running `code`;
    the previous trace function is put back after."""
    def local(frame, event, arg):
        if event == "line" and frame.f_lineno in lines:
            on_line(lines[frame.f_lineno], frame)
        return local

    def global_(frame, event, arg):
        return local if frame.f_code is code else None

    previous = sys.gettrace()
    sys.settrace(global_)
    try:
        yield
    finally:
        sys.settrace(previous)


def _list_state(torch, model, state, dtype):
    """A tinyrwkv State as the package's state list (docs/architecture.md §5.2):
    [3i] att_shift (C,) in the model dtype, [3i+1] wkv (H, N, N) float32 [value][key],
    [3i+2] ffn_shift (C,) in the model dtype."""
    if state is None:
        return model.generate_zero_state()
    host = state.to_host() if hasattr(state, "to_host") else state
    L, C, H, N = model.n_layer, model.n_embd, model.n_head, model.head_size
    want = {"att_shift": (L, C), "wkv": (L, H, N, N), "ffn_shift": (L, C)}
    for name, shape in want.items():
        got = np.shape(getattr(host, name))
        if tuple(got) != shape:
            raise ValueError(f"state.{name} has shape {got}, the model needs {shape}")
    out, device = [], model.z["emb.weight"].device        # "cuda ..." strategies: on the GPU
    for i in range(L):
        out += [torch.tensor(np.asarray(host.att_shift[i], np.float32)).to(device, dtype),
                torch.tensor(np.asarray(host.wkv[i], np.float32)).to(device),
                torch.tensor(np.asarray(host.ffn_shift[i], np.float32)).to(device, dtype)]
    return out


def _tiny_state(state, L):
    from ..model import State
    get = lambda j: np.stack([state[3 * i + j].detach().float().cpu().numpy() for i in range(L)])
    return State(get(0), get(1), get(2))


def _is_deep_embed(pth):
    """Whether the .pth has DeepEmbed keys (read by tinyrwkv, without torch)."""
    from ..formats import as_source, open_model
    try:
        return any(".ffn.s_emb" in k for k in as_source(open_model(pth)).keys())
    except Exception:           # noqa: BLE001 - the package will say what is wrong with the file
        return False


def record(model_path, ids, state=None, select=None, progress=None, mode="decode",
           strategy="cpu fp32", detail="coarse"):
    """Run the official package on `ids` (from `state`, a tinyrwkv State) and return
    (trace, final): what it computed under trace names (module docstring), and its final state as
    a tinyrwkv State. mode: "decode" (one token per call) or "prefill" (one call). strategy: the
    package's, "cpu fp32" (default), "cpu bf16" or "cpu fp16" (arrays come back as float32).
    detail: "coarse" (the package's compiled functions, wrapped) or "fine" (their Python source,
    run with its locals read: most per-layer names, and in prefill the state after every token)."""
    if detail not in ("coarse", "fine"):
        raise ValueError(f"detail must be 'coarse' or 'fine', not {detail!r}")
    if mode not in ("decode", "prefill"):
        raise ValueError(f"mode must be 'decode' or 'prefill', not {mode!r}")
    select = select or oracle.Selection()
    ids = np.atleast_1d(np.asarray(ids))
    if ids.ndim != 1 or ids.size == 0 or not np.issubdtype(ids.dtype, np.integer):
        raise ValueError("token ids must be a non-empty list of integers")
    ids = [int(t) for t in ids]
    select.token_rows(len(ids))                 # a selected token past the end: say so now
    with _pth_file(model_path) as pth:        # (the package maps the file: keep it till done)
        return _record(pth, model_path, ids, state, select, progress, mode, strategy, detail)


def _record(pth, model_path, ids, state, select, progress, mode, strategy, detail):
    T = len(ids)
    rows, state_rows = select.token_rows(T), select.state_rows(T)
    torch, rm = _import_package(_is_deep_embed(pth))
    try:
        with contextlib.redirect_stdout(io.StringIO()):          # "Loading ..."
            model = rm.RWKV_x070(str(pth)[:-4], strategy)        # it appends ".pth"
    except Exception as e:  # noqa: BLE001 - the package's own assertion or load error
        raise OfficialError(f"the official package cannot load {model_path} "
                            f"({type(e).__name__}: {e}); it reads RWKV-7 .pth files with "
                            "the official key names") from e
    L, V = model.n_layer, model.z["head.weight"].shape[1]
    bad = [t for t in ids if not 0 <= t < V]
    if bad:
        raise ValueError(f"token id {bad[0]} is out of range for this model's vocabulary "
                         f"(0..{V - 1})")
    dtype = model.z["emb.weight"].dtype
    st = _list_state(torch, model, state, dtype)

    kept_rows = None if rows is None else set(rows.tolist())
    kept_states = None if state_rows is None else set(state_rows.tolist())
    if mode == "decode":            # token t's rows and state are seen in call t
        keep_row = lambda t: kept_rows is None or t in kept_rows
        keep_state = lambda t: kept_states is None or t in kept_states
        state_tokens = state_rows
    elif detail == "fine" and T > 1:    # one call, but its loop shows the state after each token
        keep_row = lambda t: True
        keep_state = lambda t: kept_states is None or t in kept_states
        state_tokens = state_rows
    else:                           # one call (token None): all rows; the state after T-1 only
        keep_row = lambda t: True
        last = kept_states is None or (T - 1) in kept_states
        keep_state = lambda t: last
        state_tokens = np.array([T - 1] if last else [], np.int64)
    seq_states = detail == "fine" and mode == "prefill" and T > 1
    rec = _Recorder(select, keep_row, keep_state, v_first=detail == "coarse",
                    returned_state=not seq_states)

    def watched(fn, kind):
        """fn's Python source function, its locals read at FINE_LINES[kind] (detail="fine")."""
        py = _source_function(fn)
        lines = _line_map(py, kind)

        seen = set()

        def on_line(ops, frame):
            if "state" not in ops:        # a loop's head line runs again each turn: once is it
                if frame.f_lineno in seen:
                    return
                seen.add(frame.f_lineno)
            f = frame.f_locals
            layer = f["layer_id"] if kind == "tmix" else rec.layer
            for op, local in ops.items():
                if op == "state":
                    rec.put_state(f"L{layer}.state", f[local], int(f["t"]))
                else:
                    rec.put_flat(f"L{layer}.{op}", f[local])

        def run(*args):
            seen.clear()
            with _watching(py.__code__, lines, on_line):
                return py(*args)
        return run

    def tmix(fn):
        body = watched(fn, "tmix") if detail == "fine" else fn

        def wrapper(layer_id, H, N, x, x_prev, v_first, S, *weights):
            out, shift, S, v_first = body(layer_id, H, N, x, x_prev, v_first, S, *weights)
            rec.tmix(layer_id, x, out, S, v_first)
            return out, shift, S, v_first
        return wrapper

    def cmix(fn):
        body = watched(fn, "cmix") if detail == "fine" else fn

        def wrapper(*args):
            out, shift = body(*args)
            rec.cmix(out)
            return out, shift
        return wrapper

    replacements = {name: tmix(getattr(rm, name)) for name in WRAPPED[:2]}
    replacements.update({name: cmix(getattr(rm, name)) for name in WRAPPED[2:4]})
    replacements["F"] = _Functional(rm.F, rec.layer_norm_input)
    forward_one = rm.RWKV_x070._methods["forward_one"].original_method
    forward_seq = rm.RWKV_x070._methods["forward_seq"].original_method
    logits = []
    with _wrapped(rm, replacements), torch.no_grad():
        if mode == "decode":
            for t, token in enumerate(ids):
                rec.start_call(t)
                out, st = forward_one(model, token, st)
                if keep_row(t):
                    logits.append(out.detach().float().cpu().numpy()[None])
                if progress:
                    progress(t + 1, T)
        else:
            rec.start_call(None if T > 1 else 0)
            out, st = forward_seq(model, ids, st, True) if T > 1 else forward_one(model, ids[0], st)
            logits.append(out.detach().float().cpu().numpy().reshape(T, -1))     # rows picked below
            if progress:
                progress(1, 1)

    tr = oracle.Trace()
    arrays = rec.arrays()
    arrays["logits"] = np.concatenate(logits)
    final = _tiny_state(st, L)
    for name in oracle.order(arrays):
        a = arrays[name]
        prefill_rows = mode == "prefill" and T > 1 and rows is not None
        tr[name] = a[rows] if prefill_rows and not name.endswith(".state") else a
    for name in ("att_shift", "wkv", "ffn_shift"):
        tr[f"final.{name}"] = getattr(final, name)
    tr.tokens, tr.state_tokens = rows, state_tokens
    return tr, final
