"""llama.cpp (through llama-cpp-python) run with its intermediates recorded under trace names.

    from tinyrwkv.bridges import bridge
    trace, final = bridge("llama.cpp").record("model.gguf", ids)          # or a .pth/.safetensors

How: llama.cpp's graph evaluation callback (llama_context_params.cb_eval, ggml's
`bool cb(struct ggml_tensor *t, bool ask, void *user_data)`). The scheduler calls it with
ask=true for every node of the graph; we answer true for the nodes we want, and it then calls it
again with ask=false as soon as that node is computed, when we copy the node's data out
(ggml_backend_tensor_get). Only llama-cpp-python's low-level bindings are used (a model and a
context of our own, llama_decode on our own batches); nothing of llama-cpp-python is wrapped or
patched; the one global thing touched is llama-cpp-python's log level (its `verbose`), set for
the call and restored in a finally. The ggml_tensor struct is defined here from ggml.h of the ggml that llama-cpp-python
0.3.36 vendors, and checked at run time against ggml's own accessors (ggml_get_name's address,
ggml_nelements, ggml_nbytes) before anything is read: another layout fails with a clear error.

Which node is which. llama.cpp names only a few nodes (attn_norm-i, ffn_inp-i, ffn_norm-i,
l_out-i, result_norm, result_output; the rest are node_N). The others are found by the graph's
structure as llama.cpp's rwkv7 builder (src/models/rwkv7-base.cpp, rwkv7.cpp) makes it: by op and
by the named weight among their sources:

    llama.cpp node                                        trace name     rearrangement
    norm of the embeddings (NORM, *MUL, ADD token_embd_norm.bias)  ln0   (C,T) -> (T,C)
    attn_norm-i                                           L{i}.ln1       (C,T) -> (T,C)
    ADD(MUL(sx, time_mix_lerp_fused), attn_norm)  (C,T,1,6) L{i}.xr..xg  slice j = r,w,k,v,a,g
    MUL_MAT time_mix_receptance                            L{i}.r
    ADD(.., time_mix_w0)                                   L{i}.w_pre    w0 + tanh(xw w1) w2
    SCALE(SIGMOID(w_pre), -0.606531)                      L{i}.w_log    log of the decay
    EXP(w_log)                                            L{i}.w        the decay
    MUL_MAT time_mix_key                                   L{i}.k
    MUL_MAT time_mix_value                                 L{i}.v
    SIGMOID(ADD(.., time_mix_a0))                          L{i}.a
    MUL_MAT time_mix_g2                                    L{i}.g
    L2_NORM                                  (N,H,T)       L{i}.kk       -> (T,C)
    RWKV_WKV7 source 2 (k + a*(k*k_a) - k*k_a)  (N,H,T)    L{i}.k_tilde  -> (T,C)
    RWKV_WKV7 source 3 (layer 0: v itself)   (N,H,T)       L{i}.v_res    -> (T,C)
    RWKV_WKV7 output, first C*T numbers                    L{i}.y        [t][h][i] -> (T,C)
    RWKV_WKV7 output, the rest: the state after the call's last token, [h][value i][key j]
                                                           L{i}.state    (H,N,N), already VK
    ADD(.., time_mix_ln.bias)                              L{i}.gn
    MUL(v, SUM_ROWS(k r r_k))                (N,H,T)       L{i}.bonus    -> (T,C)
    MUL_MAT time_mix_output                                L{i}.att
    SQR(RELU(MUL_MAT channel_mix_key))       (F,T)         L{i}.ffn_hidden
    MUL_MAT channel_mix_value                              L{i}.ffn
    l_out-i                                                L{i}.block
    result_output                            (V,T)         logits
    the recurrent memory after the last call (llama_state_seq_get_data): final.att_shift,
    final.wkv (already [value][key]), final.ffn_shift

ggml's (C, T) is numpy's (T, C): ne[0] is the fastest axis, so a contiguous ggml tensor with ne
(C, T) read into a NumPy array of shape (T, C) is the same numbers in the same places; (N, H, T)
becomes (T, H, N) and then (T, C), exactly. Not observable, so never written: L{i}.w_cuda (llama.cpp
never forms log(-w_log)); L{i}.state for tokens other than the last of each llama_decode call (the
operator keeps the per-token states in registers): `chunk=1` evaluates one token per call and
so records every token's state.

k_tilde and v_res are read from the RWKV_WKV7 node's sources in its own callback: the
operator has just read them, and ggml's allocator frees a source only after all its users are
allocated, so nothing has reused their memory yet.

Costs: the callback splits each graph computation at every node we want, and classifying ~80
nodes per layer runs in Python: a 128-token prefill of the 0.1B shape took 6-8 s against 3.4 s
without the bridge (2 busy cores); chunk=1 about 1 s a token (plain decode 0.1 s). Selecting
fewer names asks for fewer nodes.

Things found (docs/formats.md §8.6.2): llama.cpp's log decay uses the constant 0.606531 for
e^-0.5, so its w_log is systematically 6.0e-7 (relative) larger in magnitude: ~10 float32
roundoffs, harmless and inside fp32. With F16 and Q8_0 files its CPU matrix products also round
the activations (to f16; to 8-bit blocks), which is what a trace of such a file shows from the
first matrix product on (L{i}.r), not a bug.

A starting state: llama.cpp's sequence state API takes one. Its byte layout for a recurrent
model (llama-memory-recurrent.cpp state_write) is: cell count, per cell (pos, n_seq_id), then per
layer the token-shift row (att_shift then ffn_shift) and per layer the WKV row ([h][i][j]). We
build that for one cell from the State and load it with llama_state_seq_set_data; the layout is
first checked against what llama.cpp writes itself.
"""

from __future__ import annotations

import ctypes
import os
import tempfile
import time
from pathlib import Path

import numpy as np

PIP = "pip install llama-cpp-python"
LERPS = ("xr", "xw", "xk", "xv", "xa", "xg")       # the order of time_mix_lerp_fused's slices
TESTED = "0.3.36"

# ggml.h (the ggml vendored in llama-cpp-python 0.3.36): GGML_MAX_DIMS 4, GGML_MAX_OP_PARAMS 64,
# GGML_MAX_SRC 10, GGML_MAX_NAME 64.
_GGML_F32, _GGML_F16 = 0, 1


def _tensor_struct():
    class GGMLTensor(ctypes.Structure):
        _fields_ = [("type", ctypes.c_int), ("buffer", ctypes.c_void_p),
                    ("ne", ctypes.c_int64 * 4), ("nb", ctypes.c_size_t * 4),
                    ("op", ctypes.c_int), ("op_params", ctypes.c_int32 * 16),
                    ("flags", ctypes.c_int32), ("src", ctypes.c_void_p * 10),
                    ("view_src", ctypes.c_void_p), ("view_offs", ctypes.c_size_t),
                    ("data", ctypes.c_void_p), ("name", ctypes.c_char * 64),
                    ("extra", ctypes.c_void_p), ("padding", ctypes.c_char * 8)]
    return GGMLTensor


class LlamaCppError(RuntimeError):
    """llama.cpp could not run the model, or its graph is not the one this bridge reads."""


def _import():
    try:
        import llama_cpp
        from llama_cpp import llama_cpp as lib
        from llama_cpp._ggml import libggml
    except ImportError as e:
        raise ImportError(f"the llama.cpp bridge needs llama-cpp-python ({PIP}): {e}") from None
    g = libggml
    g.ggml_op_desc.restype, g.ggml_op_desc.argtypes = ctypes.c_char_p, [ctypes.c_void_p]
    g.ggml_get_name.restype, g.ggml_get_name.argtypes = ctypes.c_void_p, [ctypes.c_void_p]
    g.ggml_nelements.restype, g.ggml_nelements.argtypes = ctypes.c_int64, [ctypes.c_void_p]
    g.ggml_nbytes.restype, g.ggml_nbytes.argtypes = ctypes.c_size_t, [ctypes.c_void_p]
    g.ggml_is_contiguous.restype, g.ggml_is_contiguous.argtypes = ctypes.c_bool, [ctypes.c_void_p]
    g.ggml_backend_tensor_get.restype = None
    g.ggml_backend_tensor_get.argtypes = [ctypes.c_void_p, ctypes.c_void_p, ctypes.c_size_t,
                                          ctypes.c_size_t]
    return llama_cpp, lib, g


# ----------------------------------------------------------------------------------------------
# The GGUF file llama.cpp runs
# ----------------------------------------------------------------------------------------------

def _is_gguf(path):
    path = Path(path)
    if not path.is_file():
        return False
    with open(path, "rb") as f:
        return f.read(4) == b"GGUF"


def _placeholder_tokenizer(vocab_size, folder):
    """A BPE vocabulary of `vocab_size` tokens: llama.cpp refuses a GGUF without one, and the ids
    are given to it directly, so what the tokens spell does not matter."""
    import tokenizers
    from ..tokenizer import HFTokenizer
    vocab = {"a": 0, "b": 1, "ab": 2}
    vocab.update({f"t{i}": i for i in range(3, vocab_size)})
    tok = tokenizers.Tokenizer(tokenizers.models.BPE(vocab, [("a", "b")]))
    path = Path(folder) / "placeholder.tokenizer.json"
    tok.save(str(path))
    return HFTokenizer(path)


def write_gguf_for_llama(path_in, path_out, out_type="f32"):
    """Convert any checkpoint tinyrwkv reads into a GGUF llama.cpp runs (`out_type` "f32", "f16",
    "q8_0", ...: tinyrwkv.formats.write_gguf), with the model's vocabulary when it has one that
    fits, else a placeholder one."""
    from ..formats import write_gguf
    from ..loader import load
    model = load(path_in, dtype="float32", backend="numpy", progress=False)
    weights = model.stored_tensors()
    V = model.config.vocab_size
    tok = getattr(model, "tokenizer", None)
    try:
        write_gguf(path_out, weights, out_type, tokenizer=tok)
    except ValueError:
        tok = None
    if tok is None:
        write_gguf(path_out, weights, out_type,
                   tokenizer=_placeholder_tokenizer(V, Path(path_out).parent))
    return path_out


def _default_extra_bufts():
    """llama.cpp's CPU weight repacking (extra buffer types) crashed on an AVX-512 Intel host for
    Q8_0: turned off there, left on elsewhere. The host as LLVM sees it (llvmlite comes with
    numba; no /proc, so this also works on macOS and Windows); without llvmlite: on."""
    try:
        from llvmlite import binding
        name = binding.get_host_cpu_name()
        avx512 = bool(binding.get_host_cpu_features().get("avx512f", False))
    except Exception:  # noqa: BLE001 - no llvmlite, or it cannot tell: keep llama.cpp's default
        return True
    amd = name.startswith(("znver", "bdver", "btver", "amdfam"))
    return not (avx512 and not amd)


# ----------------------------------------------------------------------------------------------
# Node roles: which node of llama.cpp's rwkv7 graph is which trace name
# ----------------------------------------------------------------------------------------------

class _Graph:
    """Reads a node's fields; classifies nodes in graph order (sources come before uses)."""

    def __init__(self, g, Struct):
        self.g, self.S = g, Struct
        self.role = {}              # node address -> (layer, role) for the nodes recognised
        self.checked = False

    def t(self, p):
        return self.S.from_address(p)

    def name(self, p):
        return self.t(p).name.decode("utf-8", "replace") if p else ""

    def op(self, p):
        return self.g.ggml_op_desc(p).decode()

    def src(self, p, i):
        return self.t(p).src[i] if p else None

    def base(self, p):
        """Through views and reshapes to the node that computed the numbers."""
        while p and self.t(p).view_src:
            p = self.t(p).view_src
        return p

    def weight(self, p):
        """(layer, short name) of a weight `blk.{i}.{short}.weight|bias`, else (None, name)."""
        n = self.name(p)
        if n.startswith("blk."):
            _, i, rest = n.split(".", 2)
            return int(i), rest
        return None, n

    def check_layout(self, p):
        """The struct layout against ggml's own accessors, once, on the first node."""
        if self.checked:
            return
        t = self.t(p)
        ok = (self.g.ggml_get_name(p) == p + self.S.name.offset
              and self.g.ggml_nelements(p) == int(np.prod(list(t.ne)))
              and all(0 < n < 2**40 for n in t.ne) and t.nb[0] in (1, 2, 4))
        if not ok:
            raise LlamaCppError(
                "the ggml_tensor layout this bridge reads does not match the loaded ggml "
                f"(llama-cpp-python {TESTED} was checked): install it ({PIP}=={TESTED})")
        self.checked = True

    def classify(self, p):
        """(layer, role) for a node we record, else None. Roles are trace ops, plus 'wkv7'."""
        if self.t(p).view_src:                   # views and reshapes compute nothing
            self.role.pop(p, None)
            return None
        op, name = self.op(p), self.name(p)
        s0, s1 = self.src(p, 0), self.src(p, 1)
        role = None
        if name.startswith("attn_norm-"):
            role = (int(name.split("-")[1]), "ln1")
        elif name.startswith("l_out-"):
            role = (int(name.split("-")[1]), "block")
        elif name == "result_output":
            role = (None, "logits")
        elif op == "MUL_MAT" and s0:
            i, w = self.weight(s0)
            role = {"time_mix_receptance.weight": (i, "r"), "time_mix_key.weight": (i, "k"),
                    "time_mix_value.weight": (i, "v"), "time_mix_g2.weight": (i, "g"),
                    "time_mix_output.weight": (i, "att"),
                    "channel_mix_value.weight": (i, "ffn")}.get(w)
        elif op == "ADD" and s1:
            i, w = self.weight(s1)
            if w == "time_mix_w0.weight":
                role = (i, "w_pre")
            elif w == "time_mix_ln.bias":
                role = (i, "gn")
            elif w == "token_embd_norm.bias":
                role = (None, "ln0")
            elif s0 and self.op(s0) == "MUL" and self.weight(self.src(s0, 1))[1] == \
                    "time_mix_lerp_fused.weight":
                role = (self.weight(self.src(s0, 1))[0], "lerps")
        elif op == "SCALE" and s0 and self.op(s0) == "SIGMOID":
            r = self.role.get(self.base(self.src(s0, 0)))
            if r and r[1] == "w_pre":
                role = (r[0], "w_log")
        elif op == "EXP" and s0:
            r = self.role.get(s0)
            if r and r[1] == "w_log":
                role = (r[0], "w")
        elif op == "SIGMOID" and s0 and self.op(s0) == "ADD":
            i, w = self.weight(self.src(s0, 1))
            if w == "time_mix_a0.weight":
                role = (i, "a")
        elif op == "L2_NORM" and s0:
            m = self.base(s0)
            i, w = self.weight(self.src(m, 1)) if self.op(m) == "MUL" else (None, "")
            if w == "time_mix_k_k.weight":
                role = (i, "kk")
        elif op == "MUL" and s1 and self.op(s1) == "SUM_ROWS":
            role = ("?", "bonus")
        elif op == "SQR" and s0 and self.op(s0) == "RELU":
            m = self.src(s0, 0)
            i, w = self.weight(self.src(m, 0)) if self.op(m) == "MUL_MAT" else (None, "")
            if w == "channel_mix_key.weight":
                role = (i, "ffn_hidden")
        elif op == "RWKV_WKV7":
            r = self.role.get(self.base(self.src(p, 0)))
            role = (r[0] if r else "?", "wkv7")
        if role is not None and role[0] == "?":
            # layer of the last recognised node of a layer (graph order: this layer)
            role = (self.layer, role[1])
        if role is not None and role[0] is not None:
            self.layer = role[0]
        if role is not None:
            self.role[p] = role
        else:
            self.role.pop(p, None)     # an address of an earlier call's graph, now another node
        return role

    layer = 0

    def read(self, p, shape=None):
        """A copy of a contiguous F32/F16 node's data as float32/float16, shaped `shape` (numpy
        order) or ne reversed."""
        t = self.t(p)
        if not self.g.ggml_is_contiguous(p):
            raise LlamaCppError(f"node {self.name(p)!r} ({self.op(p)}) is not contiguous")
        dtype = {_GGML_F32: np.float32, _GGML_F16: np.float16}.get(t.type)
        if dtype is None:
            raise LlamaCppError(f"node {self.name(p)!r} ({self.op(p)}) has ggml type {t.type}, "
                                "not F32 or F16")
        n = self.g.ggml_nelements(p)
        out = np.empty(n, dtype)
        if self.g.ggml_nbytes(p) != out.nbytes:
            raise LlamaCppError(f"node {self.name(p)!r}: ggml_nbytes disagrees with its shape")
        self.g.ggml_backend_tensor_get(p, out.ctypes.data, 0, out.nbytes)
        return out.reshape(shape if shape is not None else [int(x) for x in reversed(list(t.ne))])


# ----------------------------------------------------------------------------------------------
# The recurrent memory's bytes (llama_state_seq_get_data / set_data) for one sequence, one cell
# ----------------------------------------------------------------------------------------------

def _state_blob(n_layer, C, N, att, wkv, ffn, pos, magic):
    """The bytes llama_state_seq_set_data reads for one sequence of one cell at `pos`: llama.cpp's
    magic number (taken from what it wrote) and the sequence id 0, then the recurrent memory."""
    parts = [np.array([magic, 0, 1], "<u4").tobytes(), np.array([pos], "<i4").tobytes(),
             np.array([0, 0, n_layer], "<u4").tobytes()]                 # n_seq_id, s_trans, L
    for i in range(n_layer):
        row = np.concatenate([att[i], ffn[i]]).astype("<f4")
        parts += [np.array([_GGML_F32], "<i4").tobytes(), np.array([row.nbytes], "<u8").tobytes(),
                  row.tobytes()]
    for i in range(n_layer):
        row = np.ascontiguousarray(wkv[i], "<f4").reshape(-1)
        assert row.size == N * C
        parts += [np.array([_GGML_F32], "<i4").tobytes(), np.array([row.nbytes], "<u8").tobytes(),
                  row.tobytes()]
    return b"".join(parts)


def _parse_blob(blob, n_layer, C, N):
    """(magic, pos, att (L,C), wkv (L,H,N,N), ffn (L,C)) from llama.cpp's bytes; raises if the
    layout is not the one _state_blob writes."""
    H = C // N
    magic = int(np.frombuffer(blob[:4], "<u4")[0])
    blob = blob[8:]
    want = 20 + n_layer * (12 + 8 * C) + n_layer * (12 + 4 * N * C)
    head = np.frombuffer(blob[:20], "<u4")
    if len(blob) != want or head[0] != 1 or head[2] != 0 or head[3] != 0 or head[4] != n_layer:
        raise LlamaCppError(f"llama.cpp's sequence state ({len(blob)} bytes) is not laid out as "
                            f"this bridge expects ({want} bytes: one cell, {n_layer} layers)")
    pos = int(np.frombuffer(blob[4:8], "<i4")[0])
    att, ffn, wkv, o = [], [], [], 20
    def header(o):
        return int(np.frombuffer(blob[o:o + 4], "<i4")[0]), int(np.frombuffer(blob[o + 4:o + 12],
                                                                               "<u8")[0])
    for i in range(n_layer):
        typ, size = header(o)
        if typ != _GGML_F32 or size != 8 * C:
            raise LlamaCppError("llama.cpp's token-shift state is not F32 rows of 2C")
        row = np.frombuffer(blob[o + 12:o + 12 + 8 * C], "<f4")
        att.append(row[:C]), ffn.append(row[C:])
        o += 12 + 8 * C
    for i in range(n_layer):
        typ, size = header(o)
        if typ != _GGML_F32 or size != 4 * N * C:
            raise LlamaCppError("llama.cpp's WKV state is not F32 rows of N*C")
        wkv.append(np.frombuffer(blob[o + 12:o + 12 + 4 * N * C], "<f4").reshape(H, N, N))
        o += 12 + 4 * N * C
    return magic, pos, np.stack(att), np.stack(wkv), np.stack(ffn)


# ----------------------------------------------------------------------------------------------
# record
# ----------------------------------------------------------------------------------------------

def record(model_path, ids, state=None, select=None, progress=None, n_threads=None,
           out_type="f32", chunk=None, use_extra_bufts=None, verbose=False):
    """Run llama.cpp on `model_path` over `ids` and return (Trace, final State).

    model_path: a GGUF file (run as it is), or any checkpoint tinyrwkv reads, converted first to
        a temporary GGUF of `out_type` ("f32" default, "f16", "q8_0", ...).
    state: a tinyrwkv State to start from (loaded into llama.cpp's recurrent memory).
    chunk: tokens per llama_decode call (default all at once). L{i}.state is observable only
        after each call's last token, so chunk=1 records every token's state.
    n_threads: llama.cpp's threads (default: all cores). use_extra_bufts: llama.cpp's weight
        repacking (default on, but off on AVX-512 Intel hosts, where Q8_0 repacking crashed).
    """
    from .. import model as ref
    from .. import oracle
    llama_cpp, lib, g = _import()
    from llama_cpp import _logger
    select = select or oracle.Selection()
    ids = np.atleast_1d(np.asarray(ids)).astype(np.int64)
    T = len(ids)
    if T == 0:
        raise ValueError("no token ids")
    chunk = T if chunk is None else int(chunk)
    if chunk < 1:
        raise ValueError(f"chunk must be >= 1, not {chunk}")
    chunk = min(chunk, T)
    n_threads = n_threads or os.cpu_count()
    with tempfile.TemporaryDirectory(prefix="tinyrwkv-llamacpp-") as tmp:
        path = Path(model_path)
        if not path.exists():
            raise FileNotFoundError(f"{path}: no such file")
        if not _is_gguf(path):
            path = write_gguf_for_llama(model_path, Path(tmp) / f"model-{out_type}.gguf",
                                        out_type)
        old_level = _logger.logger.level
        _logger.set_verbose(bool(verbose))
        try:
            return _record(lib, g, path, ids, state, select, progress, n_threads,
                           chunk, use_extra_bufts, ref, oracle)
        finally:
            _logger.logger.setLevel(old_level)


def _record(lib, g, path, ids, state, select, progress, n_threads, chunk,
            use_extra_bufts, ref, oracle):
    T = len(ids)
    lib.llama_backend_init()
    mp = lib.llama_model_default_params()
    mp.use_extra_bufts = (_default_extra_bufts() if use_extra_bufts is None
                          else bool(use_extra_bufts))
    model = lib.llama_model_load_from_file(str(path).encode(), mp)
    if not model:
        raise LlamaCppError(f"llama.cpp could not load {path} (run with verbose=True for its log)")
    ctx = batch = None
    try:
        C = lib.llama_model_n_embd(model)
        L = lib.llama_model_n_layer(model)
        V = lib.llama_vocab_n_tokens(lib.llama_model_get_vocab(model))
        if ids.min() < 0 or ids.max() >= V:
            raise ValueError(f"token ids must be in 0..{V - 1} for this model")
        Struct = _tensor_struct()
        graph = _Graph(g, Struct)
        rows = {}                 # (layer, role) -> list of per-call arrays
        state_rows = {}           # layer -> list of (H,N,N) after each call
        state_ends = []
        recording = [False]
        errors = []

        def wanted(layer, role):
            if role in ("wkv7", "logits"):             # the state, and logits always
                return True
            if role == "lerps":
                return any(select.wants(f"L{layer}.{op}") for op in LERPS)
            if role == "ln0":
                return select.wants(role)
            return select.wants(f"L{layer}.{role}")

        def callback(p, ask, _):
            try:
                if not recording[0]:
                    return False
                graph.check_layout(p)
                if ask:
                    r = graph.classify(p)
                    return bool(r and wanted(*r))
                layer, role = graph.role[p]
                n = cur_tokens[0]
                if role == "lerps":
                    x = graph.read(p, (6, n, C))
                    for j, op in enumerate(LERPS):
                        rows.setdefault((layer, op), []).append(x[j].copy())
                elif role == "wkv7":
                    out = graph.read(p, (-1,))
                    if select.wants(f"L{layer}.y"):
                        rows.setdefault((layer, "y"), []).append(out[:n * C].reshape(n, C))
                    st = out[n * C:]
                    N = st.size // C
                    state_rows.setdefault(layer, []).append(st.reshape(C // N, N, N))
                    for k, op in ((2, "k_tilde"), (3, "v_res")):
                        if select.wants(f"L{layer}.{op}"):
                            rows.setdefault((layer, op), []).append(
                                graph.read(graph.src(p, k), (n, C)))
                else:
                    rows.setdefault((layer, role), []).append(graph.read(p, (n, -1)))
                return True
            except BaseException as e:               # never let an exception cross into C
                errors.append(e)
                return False

        cb = lib.ggml_backend_sched_eval_callback(callback)
        cp = lib.llama_context_default_params()
        n_ctx = T + 8
        cp.n_ctx = n_ctx
        cp.n_batch = cp.n_ubatch = chunk
        cp.n_seq_max = 1
        cp.n_threads = cp.n_threads_batch = n_threads
        cp.cb_eval = cb
        cp.cb_eval_user_data = None
        ctx = lib.llama_init_from_model(model, cp)
        if not ctx:
            raise LlamaCppError(f"llama.cpp could not make a context for {path}")
        cur_tokens = [0]
        batch = lib.llama_batch_init(chunk, 0, 1)
        pos0 = 0
        N = None
        if state is not None:
            # what llama.cpp writes itself for one cell, to check the layout we write
            N, magic = _probe_state(lib, ctx, ids, recording)
            st = state
            blob = _state_blob(L, C, N, np.asarray(st.att_shift, np.float32),
                               np.asarray(st.wkv, np.float32), np.asarray(st.ffn_shift, np.float32),
                               pos=0, magic=magic)
            buf = (ctypes.c_uint8 * len(blob)).from_buffer_copy(blob)
            if lib.llama_state_seq_set_data(ctx, buf, len(blob), 0) != len(blob):
                raise LlamaCppError("llama.cpp refused the starting state")
            pos0 = 1
        t0 = time.perf_counter()
        recording[0] = True
        for start in range(0, T, chunk):
            part = ids[start:start + chunk]
            n = len(part)
            for j, tok in enumerate(part):
                batch.token[j] = int(tok)
                batch.pos[j] = pos0 + start + j
                batch.n_seq_id[j] = 1
                batch.seq_id[j][0] = 0
                batch.logits[j] = 1
            batch.n_tokens = n
            cur_tokens[0] = n
            rc = lib.llama_decode(ctx, batch)
            if errors:
                raise errors[0]
            if rc != 0:
                raise LlamaCppError(f"llama_decode failed (return code {rc})")
            state_ends.append(start + n - 1)
            if progress:
                progress(start + n, T)
        recording[0] = False
        seconds = time.perf_counter() - t0
        if not state_rows or ("logits" not in [r for _, r in rows]):
            raise LlamaCppError(f"{path}: llama.cpp's graph has no RWKV_WKV7 or no result_output "
                                "node: not an RWKV-7 (x070) model this bridge can read")
        # the recurrent memory after the last call
        size = lib.llama_state_seq_get_size(ctx, 0)
        buf = (ctypes.c_uint8 * size)()
        lib.llama_state_seq_get_data(ctx, buf, size, 0)
        if N is None:
            N = state_rows[0][0].shape[-1] if state_rows else None
        _, _, att, wkv, ffn = _parse_blob(bytes(buf), L, C, N)
        final = ref.State(att.copy(), wkv.copy(), ffn.copy())
    finally:
        if batch is not None:
            lib.llama_batch_free(batch)
        if ctx:
            lib.llama_free(ctx)
        lib.llama_model_free(model)

    out = oracle.Trace()
    for (layer, role), parts in rows.items():
        name = role if layer is None else f"L{layer}.{role}"
        if role not in ("ln0", "logits") and role not in oracle.LAYER_NAMES:
            continue
        if not select.wants(name):
            continue
        out[name] = np.concatenate(parts)
    for name in list(out):
        if out[name].shape[0] != T:
            raise LlamaCppError(f"{name}: {out[name].shape[0]} rows for {T} tokens")
    token_rows = select.token_rows(T)
    if token_rows is not None:
        for name in out:
            out[name] = out[name][token_rows]
        out.tokens = token_rows
    want = select.state_rows(T)
    keep = [j for j, t in enumerate(state_ends) if want is None or t in set(want.tolist())]
    for layer, parts in state_rows.items():
        name = f"L{layer}.state"
        if select.wants(name) and keep:          # no call ended on a selected token: absent
            out[name] = np.stack([parts[j] for j in keep])
    if keep != list(range(T)):
        out.state_tokens = np.array([state_ends[j] for j in keep], np.int64)
    out["final.att_shift"], out["final.wkv"], out["final.ffn_shift"] = \
        final.att_shift, final.wkv, final.ffn_shift
    out.seconds = seconds
    return out, final


def _probe_state(lib, ctx, ids, recording):
    """Evaluate one token with recording off, read llama.cpp's own sequence state and check its
    layout; returns the head size N. The memory is then overwritten with the starting state."""
    batch = lib.llama_batch_init(1, 0, 1)
    try:
        batch.token[0] = int(ids[0])
        batch.pos[0] = 0
        batch.n_seq_id[0] = 1
        batch.seq_id[0][0] = 0
        batch.logits[0] = 0
        batch.n_tokens = 1
        recording[0] = False
        if lib.llama_decode(ctx, batch) != 0:
            raise LlamaCppError("llama_decode failed")
    finally:
        lib.llama_batch_free(batch)
    size = lib.llama_state_seq_get_size(ctx, 0)
    buf = (ctypes.c_uint8 * size)()
    lib.llama_state_seq_get_data(ctx, buf, size, 0)
    blob = bytes(buf)
    head = np.frombuffer(blob[8:28], "<u4")
    n_layer = int(head[4]) if len(blob) >= 20 else 0
    C = lib.llama_model_n_embd(lib.llama_get_model(ctx))
    # size = 20 + L (12 + 8C) + L (12 + 4 N C)
    rest = len(blob) - 28 - n_layer * (12 + 8 * C) - n_layer * 12
    if n_layer <= 0 or rest <= 0 or rest % (4 * C * n_layer):
        raise LlamaCppError(f"llama.cpp's sequence state ({len(blob)} bytes) is not laid out as "
                            "this bridge expects")
    N = rest // (4 * C * n_layer)
    magic = _parse_blob(blob, n_layer, C, N)[0]
    lib.llama_memory_seq_rm(lib.llama_get_memory(ctx), 0, -1, -1)
    return N, magic
