"""The CuPy backend: RWKV-7 on a CUDA GPU, the same function as model.py.

    model = tinyrwkv.load("model.pth", backend="cupy", storage="float16")
    model = tinyrwkv.load("model.pth", strategy="cuda fp16")        # the official package's words

What runs where
    * Weights live on the GPU. The big matrices (and the LoRA ones) are stored as float16,
      bfloat16 or float32 (`storage=`); vectors, the embedding table and the state are float32.
      Every activation is float32: 16-bit weights are widened as they are read.
    * Decode (one token) is memory-bound: reading the weights once is the floor. `gemv` in
      kernels.cu streams each matrix row in 16-byte loads and multiplies by the float32 input;
      one launch runs all the independent products of a step (r, k, v and the four LoRA
      down-projections). The whole token, about ten launches a layer, is captured once in a
      CUDA graph and replayed, so a small model is not bound by launch overhead.
    * Prefill (many tokens) is compute-bound: projections are cuBLAS matrix products
      (`cublasGemmEx`: 16-bit inputs on tensor cores, float32 accumulation and output; float32
      weights use full float32 products, never TF32), and the WKV recurrence is one kernel that
      steps through the tokens with a head per block and a state row per thread.
    * In float16/bfloat16 the prefill rounds its activations to the weights' type before each
      matrix product (that is what tensor cores take); decode never rounds activations.
      tests/test_gpu.py measures both against the float64 oracle.

Kernels (kernels.cu) mirror model.py piece by piece: `ln_mix` (layer norm + token shift lerps),
`gemv`, `keys_values` (kappa_hat, k_tilde, value residual), `wkv` (wkv_seq), `wkv_out`
(group norm, bonus, gate), `bias_act` (a projection's bias and activation).

The state returned by this backend holds CuPy arrays (it stays on the GPU between calls);
`state.to_host()` gives NumPy arrays, `State.save` does that itself. Logits are returned as NumPy.
CuPy is optional: importing tinyrwkv never imports it; `RWKV7CuPy` raises a clear error without it.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .. import model as ref
from ..model import RWKV7, Config, State

try:
    import cupy as cp
    from cupy.cuda import cublas
    _CUPY_ERROR = None
except Exception as e:          # ImportError, or a CuPy built for another CUDA
    cp = cublas = None
    _CUPY_ERROR = e

KERNELS = Path(__file__).with_name("kernels.cu")
WEIGHT_KINDS = {"float32": 0, "float16": 1, "bfloat16": 2}
BACKEND_NAMES = {"float32": "cupy", "float16": "cupy-fp16", "bfloat16": "cupy-bf16"}
MAX_HEAD_SIZE = 128           # a state row lives in registers: NH floats per thread

# kernels.cu's activation and mode codes
ACT_NONE, ACT_TANH, ACT_SIGMOID, ACT_RELU2, ACT_DECAY = range(5)
MODE_SET, MODE_ADD, MODE_MUL = range(3)

# cuBLAS / CUDA enum values (cublas_api.h, library_types.h)
_OP_N, _OP_T = 0, 1
_CUDA_R_32F, _CUDA_R_16F, _CUDA_R_16BF = 0, 2, 14
_COMPUTE_32F = 68
_GEMM_DEFAULT = -1
_DATA_TYPES = {"float32": _CUDA_R_32F, "float16": _CUDA_R_16F, "bfloat16": _CUDA_R_16BF}

# One matrix-vector product for the `gemv` kernel (struct Job in kernels.cu).
JOB = np.dtype([("W", "<u8"), ("x", "<u8"), ("y", "<u8"), ("bias", "<u8"),
                ("rows", "<i4"), ("cols", "<i4"), ("act", "<i4"), ("mode", "<i4")])
WARPS_PER_BLOCK = 8           # gemv: 8 rows per block of 256 threads
LN_THREADS = 256


class GPUUnavailable(ValueError):
    """The cupy backend was asked for where CuPy or a CUDA GPU is missing."""


def check_available(device=0):
    """Raise GPUUnavailable naming what is missing and how to get it; else return the device."""
    if cp is None:
        raise GPUUnavailable(
            f"backend 'cupy' needs CuPy, which could not be imported ({_CUPY_ERROR}). Install the "
            "CuPy build for your CUDA version: pip install -e '.[cuda12]' (CUDA 12) or "
            "'.[cuda13]' (CUDA 13); or use backend='numba' (CPU)")
    try:
        count = cp.cuda.runtime.getDeviceCount()
    except Exception as e:
        raise GPUUnavailable(f"backend 'cupy' needs a CUDA GPU, and CUDA reports none ({e}); "
                             "use backend='numba' (CPU)") from e
    if count == 0:
        raise GPUUnavailable("backend 'cupy' needs a CUDA GPU, and none is visible; "
                             "use backend='numba' (CPU)")
    if not 0 <= device < count:
        raise GPUUnavailable(f"there is no CUDA device {device}: {count} visible (0..{count - 1})")
    return cp.cuda.Device(device)


_MODULES = {}


def _module(head_size, storage):
    key = (head_size, storage, cp.cuda.Device().id)
    if key not in _MODULES:
        _MODULES[key] = cp.RawModule(
            code=KERNELS.read_text(),
            options=("-std=c++17", f"-DNH={head_size}", f"-DWKIND={WEIGHT_KINDS[storage]}"))
    return _MODULES[key]


def _null():
    return np.uint64(0)


def _ptr(a):
    return 0 if a is None else a.data.ptr


def _grid_1d(n, threads=256):
    return (int(min((n + threads - 1) // threads, 65536)),)


class RWKV7CuPy(RWKV7):
    """RWKV-7 on a CUDA GPU through CuPy: float32 compute, weights float16/bfloat16/float32."""

    def __init__(self, weights, dtype="float32", name=None, wkv_method="auto", storage="float16",
                 device=0, graphs=True):
        """weights: dict official key -> array (NumPy; CuPy or anything with
        __cuda_array_interface__ also works; uint16 arrays are bf16 bit patterns, as
        `read_checkpoint(dtype="bfloat16")` gives). storage: how the matrices are kept.
        graphs: capture decode in a CUDA graph (False runs the same launches one by one)."""
        if np.dtype(dtype) != np.float32:
            raise ValueError("the cupy backend computes in float32; for float64 (the oracle "
                             "mode) use backend='numpy'")
        if storage not in WEIGHT_KINDS:
            raise ValueError(f"the cupy backend stores weights as one of {', '.join(WEIGHT_KINDS)}, "
                             f"not {storage!r}")
        if wkv_method == "chunked":
            raise ValueError("the cupy backend runs the WKV recurrence as one kernel over the "
                             "sequence; wkv_method='chunked' (the NumPy chunked form) is CPU-only")
        if wkv_method not in ("auto", "recurrent"):
            raise ValueError(f"wkv_method must be 'auto', 'recurrent' or 'chunked', "
                             f"not {wkv_method!r}")
        self.gpu = check_available(device)
        self.config = cfg = Config.from_weights(weights)
        if cfg.head_size > MAX_HEAD_SIZE:
            raise ValueError(f"head size {cfg.head_size} is over the cupy backend's limit of "
                             f"{MAX_HEAD_SIZE}")
        self.dtype = np.dtype(np.float32)
        self.name, self.wkv_method, self.storage, self.steps = name, wkv_method, storage, ref.STEPS
        self.backend = BACKEND_NAMES[storage]
        self.graphs = graphs
        with self.gpu:
            self.device_name = cp.cuda.runtime.getDeviceProperties(self.gpu.id)["name"].decode()
            self._mod = _module(cfg.head_size, storage)
            self._k = {n: self._mod.get_function(n) for n in (
                "gemv", "ln_mix", "bias_act", "to_weight_type", "convert_weights", "gather_rows",
                "row_times_matrix", "keys_values", "wkv", "wkv_out", "time_mix_one")}
            self.stream = cp.cuda.Stream(non_blocking=True)
            with self.stream:
                self._upload(weights)
                self._build_decode()
            self.stream.synchronize()

    # ---- weights ------------------------------------------------------------------------

    def _device(self, array):
        """Any array -> a C-contiguous CuPy array on this GPU (float64 narrowed to float32)."""
        if isinstance(array, cp.ndarray) or hasattr(array, "__cuda_array_interface__"):
            a = cp.asarray(array)
        else:
            a = cp.asarray(np.ascontiguousarray(array))
        if a.dtype == np.float64:
            a = a.astype(np.float32)
        return cp.ascontiguousarray(a)

    def _vec(self, key, weights):
        a = self._device(weights[key])
        if a.dtype == np.uint16:                             # bf16 bits -> float32, exactly
            a = (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32).reshape(-1)

    def _mat(self, key, weights, transpose=False):
        """A matrix in the weight type, (out, in) row-major: the layout `gemv` and the GEMMs
        read. transpose=True for LoRA matrices, stored (in, out) and applied as x @ M."""
        a = self._device(weights[key])
        if a.ndim != 2:
            a = a.reshape(a.shape[0], -1)
        if transpose:
            a = cp.ascontiguousarray(a.T)
        return self._convert(a)

    def _convert(self, a):
        kinds = {np.dtype(np.float32): 0, np.dtype(np.float16): 1, np.dtype(np.uint16): 2}
        src = kinds.get(a.dtype)
        if src is None:
            raise ValueError(f"cannot store a {a.dtype} tensor as weights")
        want = WEIGHT_KINDS[self.storage]
        if src == want:
            return a
        out = cp.empty(a.shape, np.float32 if want == 0 else np.uint16)
        self._k["convert_weights"](_grid_1d(a.size), (256,), (np.int64(a.size), a, np.int32(src), out))
        return out

    def _upload(self, w):
        cfg = self.config
        self.emb = self._device(w["emb.weight"])
        if self.emb.dtype != np.float32:                 # only looked up: keep it float32
            self.emb = (self._to_f32(self.emb))
        self.ln0 = (self._vec("blocks.0.ln0.weight", w), self._vec("blocks.0.ln0.bias", w))
        self.ln_out = (self._vec("ln_out.weight", w), self._vec("ln_out.bias", w))
        self.head = self._mat("head.weight", w)
        self.blocks, self.stacked_lerps = [], []
        for i in range(cfg.n_layer):
            b = f"blocks.{i}."
            vectors = ["ln1.weight", "ln1.bias", "ln2.weight", "ln2.bias", "att.w0", "att.a0",
                       "att.k_k", "att.k_a", "att.r_k", "att.ln_x.weight", "att.ln_x.bias", "ffn.x_k"]
            matrices = ["att.receptance.weight", "att.key.weight", "att.value.weight",
                        "att.output.weight", "ffn.key.weight", "ffn.value.weight"]
            loras = ["att.w1", "att.w2", "att.a1", "att.a2", "att.g1", "att.g2"]
            if i > 0:
                vectors, loras = vectors + ["att.v0"], loras + ["att.v1", "att.v2"]
            if cfg.variant == "x070-deepembed":
                vectors, loras = vectors + ["ffn.s0"], loras + ["ffn.s1", "ffn.s2"]
                matrices += ["ffn.s_emb.weight", "ffn.s_emb_x.weight"]
            p = {key: self._vec(b + key, w) for key in vectors}
            p.update({key: self._mat(b + key, w) for key in matrices})
            p.update({key: self._mat(b + key, w, transpose=True) for key in loras})
            self.blocks.append(p)
            self.stacked_lerps.append(cp.stack([self._vec(b + f"att.x_{c}", w) for c in "rwkvag"]))

    def _to_f32(self, a):
        if a.dtype == np.uint16:
            return (a.astype(np.uint32) << 16).view(np.float32)
        return a.astype(np.float32)

    TRANSPOSED = ("att.w1", "att.w2", "att.a1", "att.a2", "att.g1", "att.g2", "att.v1", "att.v2",
                  "ffn.s1", "ffn.s2")   # kept (out, in) for the kernels; files store (in, out)

    def stored_tensors(self):
        """Checkpoint-keyed NumPy float32 copies of the weights on the GPU: 16-bit matrices
        widened exactly, LoRA matrices back in their file layout, the lerps as (C,) vectors."""
        def host(a):                 # 16-bit matrices are uint16 bits of the storage type
            if a.dtype == np.uint16 and self.storage == "float16":
                return a.view(cp.float16).astype(np.float32).get()
            return self._to_f32(a).get()
        out = {"emb.weight": host(self.emb), "head.weight": host(self.head),
               "blocks.0.ln0.weight": host(self.ln0[0]), "blocks.0.ln0.bias": host(self.ln0[1]),
               "ln_out.weight": host(self.ln_out[0]), "ln_out.bias": host(self.ln_out[1])}
        for i, (p, lerps) in enumerate(zip(self.blocks, self.stacked_lerps)):
            out.update({f"blocks.{i}.{key}": host(a).T if key in self.TRANSPOSED else host(a)
                        for key, a in p.items()})
            out[f"blocks.{i}.att.r_k"] = out[f"blocks.{i}.att.r_k"].reshape(self.config.n_head, -1)
            out.update({f"blocks.{i}.att.x_{c}": host(lerps[j]) for j, c in enumerate("rwkvag")})
        return out

    @property
    def n_params(self):
        arrays = [self.emb, self.head, *self.ln0, *self.ln_out, *self.stacked_lerps]
        return sum(int(a.size) for p in self.blocks for a in p.values()) + \
            sum(int(a.size) for a in arrays)

    @property
    def weight_bytes(self):
        """Bytes of weights on the GPU."""
        arrays = [self.emb, self.head, *self.stacked_lerps] + [a for p in self.blocks for a in p.values()]
        return int(sum(a.nbytes for a in arrays))

    # ---- small launch helpers -------------------------------------------------------------

    def _ln_mix(self, x, ids, T, ln, shift, mix, M, out, xn, xn2=None, write_shift=False):
        self._k["ln_mix"](self._ln_grid(T), (LN_THREADS,), (
            x, _null() if ids is None else ids, np.int32(T), np.int32(self.config.n_embd),
            ln[0], ln[1], np.float32(ref.LN_EPS), _null() if shift is None else shift,
            _null() if mix is None else mix, np.int32(M), _null() if out is None else out,
            _null() if xn is None else xn, _null() if xn2 is None else xn2,
            np.int32(write_shift)))

    def _ln_grid(self, T):
        """ln_mix's grid: decode spreads the row over blocks of LN_THREADS channels (each
        recomputes the row's statistics); a prefill has a block per token, which is plenty."""
        return (T, (self.config.n_embd + LN_THREADS - 1) // LN_THREADS if T == 1 else 1)

    def _bias_act(self, y, u, bias, act, mode=MODE_SET):
        n, cols = y.size, y.shape[-1]
        self._k["bias_act"](_grid_1d(n), (256,), (np.int64(n), np.int32(cols), y, u,
                                                 _null() if bias is None else bias,
                                                 np.int32(act), np.int32(mode)))

    def _head_kernels(self, name, T, *args):
        cfg = self.config
        grid = (cfg.n_head,) if name == "wkv" else (T * cfg.n_head,)
        threads = (cfg.head_size + 31) // 32 * 32
        self._k[name](grid, (threads,), (np.int32(T), np.int32(cfg.n_embd), *args))

    def _gemv_launch(self, jobs):
        """A prepared gemv launch: (kernel, grid, block, args) for a list of jobs
        (W, x, y, bias, act, mode). The job table stays alive on the GPU with the launch."""
        table = np.zeros(len(jobs), JOB)
        for n, (W, x, y, bias, act, mode) in enumerate(jobs):
            assert x.data.ptr % 16 == 0, "gemv inputs must be 16-byte aligned"
            assert W.shape[1] == x.size and W.shape[0] == y.size, (W.shape, x.shape, y.shape)
            table[n] = (W.data.ptr, x.data.ptr, y.data.ptr, _ptr(bias), W.shape[0], W.shape[1],
                        act, mode)
        table = cp.asarray(table.view(np.uint8))
        rows = max(W.shape[0] for W, *_ in jobs)
        grid = ((rows + WARPS_PER_BLOCK - 1) // WARPS_PER_BLOCK, len(jobs))
        return (self._k["gemv"], grid, (32 * WARPS_PER_BLOCK,), (table,))

    def _cast(self, x):
        """float32 activations -> the weights' type, for cublasGemmEx (float32: unchanged)."""
        if self.storage == "float32":
            return x
        out = cp.empty(x.shape, np.uint16)
        self._k["to_weight_type"](_grid_1d(x.size), (256,), (np.int64(x.size), x, out))
        return out

    def _mm(self, X, W, out=None, beta=0.0):
        """out (n, rows) = X (n, cols) @ W.T (+ beta * out), float32 output, with cuBLAS.
        X is already in the weights' type (`_cast`); W is (rows, cols) row-major."""
        n, cols = X.shape
        rows = W.shape[0]
        assert W.shape[1] == cols and X.flags.c_contiguous
        if out is None:
            out = cp.empty((n, rows), np.float32)
        assert out.shape == (n, rows) and out.flags.c_contiguous
        dt = _DATA_TYPES[self.storage]
        one, b = np.array(1.0, np.float32), np.array(beta, np.float32)
        # Column-major view: out^T (rows, n) = W (rows, cols) . X^T (cols, n); W row-major is
        # W^T column-major, so op(A) = transpose.
        cublas.gemmEx(cp.cuda.device.get_cublas_handle(), _OP_T, _OP_N, rows, n, cols,
                      one.ctypes.data, W.data.ptr, dt, cols, X.data.ptr, dt, cols,
                      b.ctypes.data, out.data.ptr, _CUDA_R_32F, rows, _COMPUTE_32F, _GEMM_DEFAULT)
        return out

    # ---- decode: one token, captured in a CUDA graph ----------------------------------------

    def _build_decode(self):
        cfg = self.config
        L, C, H, N, F, V = (cfg.n_layer, cfg.n_embd, cfg.n_head, cfg.head_size, cfg.dim_ffn,
                            cfg.vocab_size)
        z = lambda *shape: cp.zeros(shape, np.float32)
        self._tok = cp.zeros(1, np.int32)
        self._tok_host = np.zeros(1, np.int32)
        self._att_shift, self._wkv, self._ffn_shift = z(L, C), z(L, H, N, N), z(L, C)
        b = self._buf = {name: z(C) for name in (
            "x0", "x", "xa", "r", "k", "v", "w", "a", "g", "vg", "kh", "y", "u", "xf", "xo",
            "v_first")}
        b["xm"], b["xk"], b["hk"], b["logits"] = z(6, C), z(C), z(F), z(V)
        b["hw"], b["ha"], b["hv"], b["hg"] = z(cfg.d_decay), z(cfg.d_aaa), z(max(cfg.d_mv, 1)), z(cfg.d_gate)
        deep = cfg.variant == "x070-deepembed"
        if deep:
            D = cfg.d_deepembed
            b["semb"], b["du"], b["dz"] = z(D * D), z(D), z(D)

        steps = []
        add = lambda kernel, grid, block, args: steps.append((kernel, grid, block, args))
        threads = (N + 31) // 32 * 32
        i32, f32 = np.int32, np.float32
        add(self._k["ln_mix"], self._ln_grid(1), (LN_THREADS,), (
            self.emb, self._tok, i32(1), i32(C), *self.ln0, f32(ref.LN_EPS), _null(), _null(),
            i32(0), _null(), b["x0"], b["x"], i32(0)))
        for i, p in enumerate(self.blocks):
            xm = b["xm"]
            add(self._k["ln_mix"], self._ln_grid(1), (LN_THREADS,), (
                b["x"], _null(), i32(1), i32(C), p["ln1.weight"], p["ln1.bias"], f32(ref.LN_EPS),
                self._att_shift[i],
                self.stacked_lerps[i], i32(6), xm, b["xa"], _null(), i32(1)))
            down = [(p["att.receptance.weight"], xm[0], b["r"], None, ACT_NONE, MODE_SET),
                    (p["att.key.weight"], xm[2], b["k"], None, ACT_NONE, MODE_SET),
                    (p["att.value.weight"], xm[3], b["v"], None, ACT_NONE, MODE_SET),
                    (p["att.w1"], xm[1], b["hw"], None, ACT_TANH, MODE_SET),
                    (p["att.a1"], xm[4], b["ha"], None, ACT_NONE, MODE_SET),
                    (p["att.g1"], xm[5], b["hg"], None, ACT_SIGMOID, MODE_SET)]
            up = [(p["att.w2"], b["hw"], b["w"], p["att.w0"], ACT_DECAY, MODE_SET),
                  (p["att.a2"], b["ha"], b["a"], p["att.a0"], ACT_SIGMOID, MODE_SET),
                  (p["att.g2"], b["hg"], b["g"], None, ACT_NONE, MODE_SET)]
            if i > 0:
                down.append((p["att.v1"], xm[3], b["hv"][:p["att.v1"].shape[0]], None, ACT_NONE, MODE_SET))
                up.append((p["att.v2"], b["hv"][:p["att.v1"].shape[0]], b["vg"], p["att.v0"], ACT_SIGMOID,
                           MODE_SET))
            steps.append(self._gemv_launch(down))
            steps.append(self._gemv_launch(up))
            add(self._k["time_mix_one"], (H,), (threads,), (       # keys_values+wkv+wkv_out
                i32(C), self._wkv[i], b["r"], b["w"], b["k"], b["v"], b["a"], b["g"], b["vg"],
                b["v_first"], p["att.k_k"], p["att.k_a"], p["att.ln_x.weight"], p["att.ln_x.bias"], p["att.r_k"], f32(ref.GN_EPS),
                i32(i == 0), b["u"]))
            steps.append(self._gemv_launch([(p["att.output.weight"], b["u"], b["x"], None, ACT_NONE, MODE_ADD)]))
            add(self._k["ln_mix"], self._ln_grid(1), (LN_THREADS,), (
                b["x"], _null(), i32(1), i32(C), p["ln2.weight"], p["ln2.bias"], f32(ref.LN_EPS),
                self._ffn_shift[i],
                p["ffn.x_k"], i32(1), b["xk"], b["xf"], _null(), i32(1)))
            steps.append(self._gemv_launch([(p["ffn.key.weight"], b["xk"], b["hk"], None, ACT_RELU2,
                                             MODE_SET)]))
            if deep:
                D = cfg.d_deepembed
                add(self._k["gather_rows"], (1,), (256,), (self._tok, p["ffn.s_emb.weight"], i32(D * D),
                                                           b["semb"]))
                steps.append(self._gemv_launch([
                    (p["ffn.s_emb_x.weight"], b["x0"], b["semb"], None, ACT_NONE, MODE_ADD),
                    (p["ffn.s1"], b["xf"], b["du"], None, ACT_NONE, MODE_SET)]))
                add(self._k["row_times_matrix"], (1,), (max(32, D),), (i32(D), b["du"], b["semb"],
                                                                        b["dz"]))
                steps.append(self._gemv_launch([(p["ffn.s2"], b["dz"], b["hk"], p["ffn.s0"], ACT_NONE,
                                                 MODE_MUL)]))
            steps.append(self._gemv_launch([(p["ffn.value.weight"], b["hk"], b["x"], None, ACT_NONE,
                                             MODE_ADD)]))
        add(self._k["ln_mix"], self._ln_grid(1), (LN_THREADS,), (
            b["x"], _null(), i32(1), i32(C), *self.ln_out, f32(ref.LN_EPS), _null(), _null(),
            i32(0), _null(), b["xo"], _null(), i32(0)))
        self._head_step = self._gemv_launch([(self.head, b["xo"], b["logits"], None, ACT_NONE,
                                              MODE_SET)])
        steps.append(self._head_step)
        self._decode_steps = steps
        self.launches_per_token = len(steps)
        self._run(steps)                                 # compiles every kernel before capture
        self._graph = None
        if self.graphs:
            self.stream.synchronize()
            self.stream.begin_capture()
            try:
                self._run(steps)
            finally:
                self._graph = self.stream.end_capture()

    @staticmethod
    def _run(steps):
        for kernel, grid, block, args in steps:
            kernel(grid, block, args)

    def _decode(self, ids, state, all_logits=False):
        """Tokens one at a time through the captured graph, from `state` (NumPy, CuPy or None;
        copied in, never modified). Returns ln_out(x) for every token (T, C), the logits of every
        token (T, V) or of the last (1, V), and the new State (CuPy arrays)."""
        b = self._buf
        T, C, V = len(ids), self.config.n_embd, self.config.vocab_size
        buffers = (self._att_shift, self._wkv, self._ffn_shift)
        for buf, name in zip(buffers, ("att_shift", "wkv", "ffn_shift")):
            src = None if state is None else getattr(state, name)
            if src is None:
                buf.fill(0)
            elif isinstance(src, cp.ndarray):
                cp.copyto(buf, src)
            else:
                buf.set(np.ascontiguousarray(src, np.float32), stream=self.stream)
        h = cp.empty((T, C), np.float32)
        logits = cp.empty((T if all_logits else 1, V), np.float32)
        for t, token in enumerate(ids):
            self._tok_host[0] = token
            self._tok.set(self._tok_host, stream=self.stream)
            if self._graph is not None:
                self._graph.launch(self.stream)
            else:
                self._run(self._decode_steps)
            cp.copyto(h[t], b["xo"])
            if all_logits or t == T - 1:
                cp.copyto(logits[t if all_logits else 0], b["logits"])
        return h, logits, State(*(buf.copy() for buf in buffers))

    # ---- prefill: T tokens with matrix products --------------------------------------------

    def _prefill(self, ids, state):
        """The sequence form on the GPU. `state` (CuPy arrays) is updated in place.
        Returns ln_out(x) (T, C) and the residual x (T, C)."""
        cfg = self.config
        T, C = len(ids), cfg.n_embd
        E = lambda *shape: cp.empty(shape, np.float32)
        ids_d = cp.asarray(np.asarray(ids, np.int32))
        x0, x, v_first = E(T, C), E(T, C), E(T, C)
        self._ln_mix(self.emb, ids_d, T, self.ln0, None, None, 0, None, x0, x)
        for i, p in enumerate(self.blocks):
            xm, xa = E(6, T, C), E(T, C)
            self._ln_mix(x, None, T, (p["ln1.weight"], p["ln1.bias"]), state.att_shift[i], self.stacked_lerps[i], 6, xm, xa,
                         write_shift=T == 1)
            if T > 1:
                cp.copyto(state.att_shift[i], xa[T - 1])
            X = self._cast(xm)                                          # (6, T, C)
            r, k, v = self._mm(X[0], p["att.receptance.weight"]), self._mm(X[2], p["att.key.weight"]), self._mm(X[3], p["att.value.weight"])
            hw, ha, hg = self._mm(X[1], p["att.w1"]), self._mm(X[4], p["att.a1"]), self._mm(X[5], p["att.g1"])
            self._bias_act(hw, hw, None, ACT_TANH)
            self._bias_act(hg, hg, None, ACT_SIGMOID)
            w = self._mm(self._cast(hw), p["att.w2"])
            self._bias_act(w, w, p["att.w0"], ACT_DECAY)
            a = self._mm(self._cast(ha), p["att.a2"])
            self._bias_act(a, a, p["att.a0"], ACT_SIGMOID)
            g = self._mm(self._cast(hg), p["att.g2"])
            vg = None
            if i > 0:
                vg = self._mm(self._cast(self._mm(X[3], p["att.v1"])), p["att.v2"])
                self._bias_act(vg, vg, p["att.v0"], ACT_SIGMOID)
            kh, y, u = E(T, C), E(T, C), E(T, C)
            self._head_kernels("keys_values", T, k, v, a, _null() if vg is None else vg,
                               v_first, p["att.k_k"], p["att.k_a"], kh, np.int32(i == 0))
            self._head_kernels("wkv", T, state.wkv[i], r, w, k, v, kh, a, y)
            self._head_kernels("wkv_out", T, y, r, k, v, g, p["att.ln_x.weight"], p["att.ln_x.bias"], p["att.r_k"],
                               np.float32(ref.GN_EPS), u)
            self._mm(self._cast(u), p["att.output.weight"], out=x, beta=1.0)          # residual: x += u Wo^T
            xk, xf = E(1, T, C), E(T, C)
            self._ln_mix(x, None, T, (p["ln2.weight"], p["ln2.bias"]), state.ffn_shift[i],
                         p["ffn.x_k"], 1, xk, xf,
                         write_shift=T == 1)
            if T > 1:
                cp.copyto(state.ffn_shift[i], xf[T - 1])
            hk = self._mm(self._cast(xk[0]), p["ffn.key.weight"])                 # (T, F)
            self._bias_act(hk, hk, None, ACT_RELU2)
            if "ffn.s_emb.weight" in p:
                D = cfg.d_deepembed
                semb = E(T, D * D)
                self._k["gather_rows"]((T,), (256,), (ids_d, p["ffn.s_emb.weight"], np.int32(D * D), semb))
                self._mm(self._cast(x0), p["ffn.s_emb_x.weight"], out=semb, beta=1.0)
                du, dz = self._mm(self._cast(xf), p["ffn.s1"]), E(T, D)
                self._k["row_times_matrix"]((T,), (max(32, D),), (np.int32(D), du, semb, dz))
                gate = self._mm(self._cast(dz), p["ffn.s2"])
                self._bias_act(hk, gate, p["ffn.s0"], ACT_NONE, MODE_MUL)  # h *= dz s2 + s0
            self._mm(self._cast(hk), p["ffn.value.weight"], out=x, beta=1.0)
        xo = E(T, C)
        self._ln_mix(x, None, T, self.ln_out, None, None, 0, None, xo)
        return xo, x

    # ---- the public API (same as model.RWKV7) -------------------------------------------------

    def _device_state(self, state):
        """A fresh float32 copy of `state` on this GPU (zeros for None); checked to fit."""
        if state is None:
            L, C, H, N = (self.config.n_layer, self.config.n_embd, self.config.n_head,
                          self.config.head_size)
            return State(cp.zeros((L, C), np.float32), cp.zeros((L, H, N, N), np.float32),
                         cp.zeros((L, C), np.float32))
        state.check_fits(self.config, where="state.")
        return State(*(cp.array(getattr(state, n), dtype=np.float32)
                       for n in ("att_shift", "wkv", "ffn_shift")))

    def _run_model(self, ids, state, mode, all_logits):
        """(ln_out(x) (T, C), logits (T or 1, V), new State), all on the GPU."""
        ids = self.check_ids(ids)
        if mode not in ("sequence", "recurrent"):
            raise ValueError(f"mode must be 'sequence' or 'recurrent', not {mode!r}")
        if state is not None:
            state.check_fits(self.config, where="state.")
        with self.gpu, self.stream:
            if mode == "sequence" and len(ids) > 1:
                state = self._device_state(state)            # the prefill updates it in place
                h, _ = self._prefill(ids, state)
                return h, self._logits_device(h if all_logits else h[-1:]), state
            return self._decode(ids, state, all_logits)

    def forward_one(self, token, state):
        """One token, recurrent form, on the GPU: the residual x (C,) before ln_out (CuPy);
        `state` (CuPy arrays) is updated in place, like the reference's forward_one."""
        with self.gpu, self.stream:
            _, _, new = self._decode(self.check_ids([token]), state)
            for name in ("att_shift", "wkv", "ffn_shift"):
                cp.copyto(getattr(state, name), getattr(new, name))
            return self._buf["x"].copy(), state

    def forward_seq(self, ids, state, steps=None, acts=None):
        """T tokens, sequence form, on the GPU: x (T, C) before ln_out and `state` (in place).
        The fused kernels keep no intermediates and run no replaced steps: the oracle traces this
        backend through `stored_tensors()` instead."""
        if steps is not None or acts is not None:
            raise NotImplementedError("the cupy backend runs fused kernels: it cannot replace "
                                      "steps or record intermediates; trace model.reference()")
        with self.gpu, self.stream:
            _, x = self._prefill(self.check_ids(ids), state)
        return x, state

    def hidden(self, ids, state=None, mode="sequence"):
        h, _, state = self._run_model(ids, state, mode, all_logits=False)
        with self.gpu, self.stream:
            return h.get(stream=self.stream), state

    def forward(self, ids, state=None, full_output=False, mode="sequence"):
        """Logits (NumPy float32) and the new State (CuPy arrays; `state.to_host()` for NumPy).
        Recurrent mode (and one token) computes every row's logits with decode's gemv; the
        sequence form's full output uses one matrix product (16-bit inputs on tensor cores, like
        every other product of the prefill)."""
        _, logits, state = self._run_model(ids, state, mode, all_logits=full_output)
        with self.gpu, self.stream:
            logits = logits.get(stream=self.stream)
        return (logits if full_output else logits[-1]), state

    def logits(self, h):
        with self.gpu, self.stream:
            h = cp.asarray(h, dtype=np.float32)
            out = self._logits_device(h.reshape(-1, self.config.n_embd)).get(stream=self.stream)
        return out.reshape(*np.shape(h)[:-1], -1)

    def _logits_device(self, h):
        h = cp.ascontiguousarray(h)
        if h.shape[0] == 1:                  # one row: decode's gemv (h not rounded)
            b = self._buf
            cp.copyto(b["xo"], h[0])
            self._run([self._head_step])
            return b["logits"][None].copy()
        return self._mm(self._cast(h), self.head)

    def zero_state(self):
        return self._device_state(None)
