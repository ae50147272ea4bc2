"""The Numba backend: the hot loops of RWKV-7 compiled for the CPU, beside the NumPy reference.

`RWKV7Numba` is `model.RWKV7` with the same public API and the same `forward_one` /
`forward_seq` signatures (the backend contract: backends/__init__.py); only how they run changes:

  * decode (`forward_one`, one token), decode="fused" (the default): the whole token is one
    compiled call, `numba_decode.decode_token`, over weights stacked per kind across layers
    (backends/numba_decode.py); DeepEmbed models, and decode="per-kernel", take the path below;
  * decode="per-kernel": every Linear layer is a Numba matrix-vector product over
    the weights as stored, in parallel over output rows, and everything between the projections
    and the output projection of the time mix (removal key, decay, value residual, WKV update,
    group norm, bonus, gate) is one fused kernel (`time_mix_core`);
  * several sequences, one token each (`forward_batch`): one compiled call per step for the
    whole batch, `numba_decode.decode_batch`, which reads each weight once for all of them and
    gives each sequence the same bits as decoding it alone;
  * prefill (`forward_seq`, T tokens): the reference's sequence form with BLAS matrix products
    over the whole sequence and the position-wise work between them fused into Numba kernels,
    all of it shared among one set of threads (backends/numba_prefill.py). Asked for the
    intermediates (`acts`) or given steps of its own, it runs the reference's composition
    (model.block) with the Numba WKV kernel (`wkv_seq`, heads in parallel) instead.

Storage (`storage=`): the large matrices (BIG_MATRICES: r, k, v, output, channel-mix key and
value, embedding, head, DeepEmbed table) are kept as

    "float32"    float32
    "bfloat16"   bf16 bits (uint16): read straight from a bf16 checkpoint without conversion
    "float16"    IEEE half (np.float16): read straight from an fp16 file or an F16 GGUF
    "int8"       GGUF Q8_0 blocks (uint8 (rows, cols / 32 * 34): formats/q8_0.py), byte for byte
                 as in a Q8_0 GGUF, which is memory-mapped as the storage; a float checkpoint is
                 quantised on load by ggml's rule

and widened to float32 inside the kernels as they are read (numba_decode.py: `dot_row`, `row`):
1/2 (16-bit) or 0.53 (Q8_0) of float32's bytes per token. Everything else (LoRA matrices,
vectors, the state) is float32, and everything is computed in float32. `stored_tensors()` gives
the stored weights widened exactly (dequantised), so the float64 reference can be run on the
same numbers (tests/test_quantised.py).

Deviation from the reference, on purpose: the kernels are compiled with
fastmath={"reassoc", "contract"}, which lets LLVM vectorise dot products by adding in another
order and fusing multiply-adds. No approximate functions, and inf/NaN semantics are kept. The
parity tests (tests/test_fast.py) hold these kernels to the reference within a float32 tolerance.
"""

from __future__ import annotations

import math

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError as e:  # the caller (tinyrwkv.load) turns this into a clear message
    raise ImportError("the numba backend needs numba: pip install numba") from e

import time
from dataclasses import replace

from .. import model as ref
from . import numba_prefill
from ..formats import bf16_to_float32, to_bf16_bits
from ..formats.q8_0 import Q8_0Matrix, dequantize_q8_0, quantize_q8_0, values_shape
from . import numba_decode
from .numba_prefill import wkv_head
from .thread_governor import ThreadGovernor

FASTMATH = {"reassoc", "contract"}
DECAY_SCALE = float(ref.DECAY_SCALE)   # plain floats: compile-time constants in the kernels
GN_EPS = float(ref.GN_EPS)
ROWS_PER_TASK = 16          # rows of a matrix-vector product handled by one parallel task

# The tensors kept in the storage type (the rest is float32): the large ones, whose bytes dominate
# each token. The LoRA matrices and per-channel vectors are small and stay float32.
BIG_MATRICES = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
                "ffn.key.weight", "ffn.value.weight", "ffn.s_emb.weight", "emb.weight",
                "head.weight")
# storage -> model.backend
BACKEND_NAMES = {"float32": "numba", "bfloat16": "numba-bf16", "float16": "numba-fp16",
                 "int8": "numba-int8"}
FLOAT16_MAX = float(np.finfo(np.float16).max)


def bf16_bits(x):
    """float32 -> bf16 bits (uint16), round to nearest even (as torch's .bfloat16())."""
    return to_bf16_bits(np.asarray(x, dtype=np.float32))


def widen(bits):
    """bf16 bits (uint16) -> float32, exact (bf16 is the top half of a float32)."""
    return bf16_to_float32(bits)


def as_float32(w):
    """A weight as float32 whatever its storage, exactly: float32 as it is, bf16 bits (uint16)
    widened, float16 widened, Q8_0 blocks (uint8, any leading axes: a matrix or some of its rows)
    dequantised."""
    if w.dtype == np.uint16:
        return widen(w)
    if w.dtype == np.float16:
        return w.astype(np.float32)
    if w.dtype == np.uint8:
        return dequantize_q8_0(w)
    return w


def float16_of(values, key):
    """Float values -> np.float16 (round to nearest even), or a ValueError naming the tensor if
    any finite value is beyond float16's range (it would become inf). Converted a slice of rows
    at a time, so the temporaries stay small next to the tensor."""
    values = np.asarray(values)
    half = np.empty(values.shape, np.float16)
    rows, out = values.reshape(-1, values.shape[-1]), half.reshape(-1, values.shape[-1])
    step = max(1, (1 << 20) // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        chunk = as_float32(rows[start: start + step])
        with np.errstate(over="ignore"):
            out[start: start + step] = chunk
        if np.any(np.isinf(out[start: start + step]) & ~np.isinf(chunk)):
            raise ValueError(f"{key} has values beyond float16's range ({FLOAT16_MAX:g}), up to "
                             f"{float(np.nanmax(np.abs(chunk))):.3g}; use storage='bfloat16' "
                             "or 'float32'")
    return half


def stored_form(key, array, storage):
    """One tensor as RWKV7Numba keeps it under `storage` (module docstring): the big matrices
    (BIG_MATRICES) in the storage type, everything else float32. `array`: float32/float16/
    float64, bf16 bits (uint16, as the readers give them), or a Q8_0Matrix (an int8 tensor as
    tinyrwkv.load reads it). Anything already in its stored form is kept as it is, no copy (a
    memory-mapped tensor stays mapped)."""
    if isinstance(array, Q8_0Matrix):
        if storage == "int8" and key.endswith(BIG_MATRICES):
            return array.blocks
        array = array.dequantize()
    array = np.asarray(array)
    if key.endswith(BIG_MATRICES):
        if storage == "int8":
            return quantize_q8_0(as_float32(array), name=key)
        if storage == "float16":
            return array if array.dtype == np.float16 else float16_of(array, key)
        if storage == "bfloat16":
            return array if array.dtype == np.uint16 else bf16_bits(array)
    if array.dtype == np.uint16:
        return widen(array)
    return np.asarray(array.astype(np.float32, copy=False))


# ----------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------

@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matvec_f32(W, x, out):
    n, m = W.shape
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        for i in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            acc = np.float32(0.0)
            for j in range(m):
                acc += W[i, j] * x[j]
            out[i] = acc


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _matvec_bf16(W2, x, out):
    """W2: the bf16 matrix viewed as uint32, two weights per element (little-endian: the low half
    is the even column). Widening a pair at a time is ~1.4x faster than one by one (measured)."""
    n, m2 = W2.shape
    for task in prange((n + ROWS_PER_TASK - 1) // ROWS_PER_TASK):
        bits = np.empty(2 * m2, np.uint32)    # one row widened: bf16 is the top half of a float32
        row = bits.view(np.float32)
        for i in range(task * ROWS_PER_TASK, min(n, (task + 1) * ROWS_PER_TASK)):
            for j in range(m2):
                u = W2[i, j]
                bits[2 * j] = u << np.uint32(16)
                bits[2 * j + 1] = u & np.uint32(0xFFFF0000)
            acc = np.float32(0.0)
            for j in range(2 * m2):
                acc += row[j] * x[j]
            out[i] = acc


@njit(fastmath=FASTMATH, cache=True)
def _vecmat(x, M, out):
    out[:] = 0
    for i in range(M.shape[0]):                   # rows of M are contiguous: vectorises over j
        xi = x[i]
        for j in range(M.shape[1]):
            out[j] += xi * M[i, j]


def vecmat(x, M):
    """x @ M for one token and a small (in, out) LoRA matrix, float32. Written as a kernel (not
    NumPy's @) so that decode never wakes BLAS threads, which would then spin against the
    kernels' threads for the same cores (measured: 2-3x slower decode)."""
    out = np.empty(M.shape[1], np.float32)
    _vecmat(x, M, out)
    return out


def matvec(W, x):
    """W @ x for one token: W (out, in) as stored (any storage), x (in,) float32."""
    out = np.empty(W.shape[0], np.float32)
    if W.dtype == np.uint16:
        _matvec_bf16(W.view(np.uint32), x, out)   # needs an even row length (all RWKV widths are)
    elif W.dtype == np.float32:
        _matvec_f32(W, x, out)
    else:            # float16 and Q8_0: the fused step's products, one copy of each widening
        pairs = np.empty((3, 2, x.shape[0] // 2), np.float32)          # split_pairs' scratch
        numba_decode.matvec(numba_decode.as_kernel_matrix(W), x, out, pairs)
    return out


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _wkv_seq_kernel(S, r, w, k, v, alpha, beta, y):
    """Every head's recurrence (numba_prefill.wkv_head, the twin of model.wkv_seq for one head),
    the heads in parallel: they are independent."""
    for h in prange(r.shape[1]):
        wkv_head(S, r, w, k, v, alpha, beta, y, h)


def wkv_seq(S, r, w, k, v, alpha, beta):
    """Numba twin of `model.wkv_seq` (same signature and result): the WKV recurrence over T tokens,
    heads in parallel. S (H, N, N); r, w, k, v, alpha, beta: (T, H, N). Returns S, y (T, H, N)."""
    if r.ndim != 3:
        raise ValueError(f"the numba WKV kernel runs one sequence, (T, H, N); got {r.shape}")
    dt = np.float32
    S = np.array(S, dtype=dt)                             # a copy: the input is not modified
    args = [np.ascontiguousarray(u, dtype=dt) for u in (r, w, k, v, alpha, beta)]
    y = np.empty_like(args[0])
    _wkv_seq_kernel(S, *args, y)
    return S, y


@njit(fastmath=FASTMATH, cache=True)
def _time_mix_core(S, r, w_pre, k, v, a, g, v_first, v_gate_pre, k_k, k_a, r_k, ln_w, ln_b,
                   first_layer, out):
    """The time mix of one token from its projections on, fused: the twin of model.py's
    removal_key, replacement_key, decay, value_residual, wkv_step, group_norm, bonus and
    output_gate (in that order; tests/test_fast.py holds them equal).

    r, k, v, g: (C,) projections; w_pre (C,) decay pre-activation; a (C,) in-context learning
    rate; v_gate_pre (C,) value-residual gate pre-activation (unused in layer 0); S (H, N, N),
    v_first (C,) updated in place; out (C,) receives y * g.
    """
    H, N = r_k.shape
    kh = np.empty(N, np.float32)
    kt = np.empty(N, np.float32)
    wd = np.empty(N, np.float32)
    b = np.empty(N, np.float32)
    vh = np.empty(N, np.float32)
    y = np.empty(N, np.float32)
    for h in range(H):
        o = h * N
        norm = np.float32(0.0)
        for j in range(N):                                        # removal key, unit per head
            kh[j] = k[o + j] * k_k[o + j]
            norm += kh[j] * kh[j]
        norm = max(np.sqrt(norm), np.float32(1e-12))
        for j in range(N):
            kh[j] /= norm
            kt[j] = k[o + j] * (1 + (a[o + j] - 1) * k_a[o + j])  # written key k_tilde
            wd[j] = np.exp(-DECAY_SCALE / (1 + np.exp(-w_pre[o + j])))   # decay in (0.545, 1)
            b[j] = kh[j] * a[o + j]
        for i in range(N):                                        # value residual
            if first_layer:
                vh[i] = v[o + i]
                v_first[o + i] = v[o + i]
            else:
                gate = 1 / (1 + np.exp(-v_gate_pre[o + i]))
                vh[i] = v[o + i] + (v_first[o + i] - v[o + i]) * gate
        for i in range(N):                                        # S <- S diag(w) + (S a) b^T + v k^T
            sa = np.float32(0.0)
            for j in range(N):
                sa -= S[h, i, j] * kh[j]
            yi = np.float32(0.0)
            for j in range(N):
                s = S[h, i, j] * wd[j] + sa * b[j] + vh[i] * kt[j]
                S[h, i, j] = s
                yi += s * r[o + j]
            y[i] = yi
        mu = np.float32(0.0)                                      # group norm over the head
        for i in range(N):
            mu += y[i]
        mu /= N
        var = np.float32(0.0)
        for i in range(N):
            var += (y[i] - mu) * (y[i] - mu)
        inv = 1 / np.sqrt(var / N + np.float32(GN_EPS))
        bonus = np.float32(0.0)                                   # sum_j r_j k_tilde_j r_k[h, j]
        for j in range(N):
            bonus += r[o + j] * kt[j] * r_k[h, j]
        for i in range(N):
            yn = (y[i] - mu) * inv * ln_w[o + i] + ln_b[o + i] + bonus * vh[i]
            out[o + i] = yn * g[o + i]


# ----------------------------------------------------------------------------------------------
# The model
# ----------------------------------------------------------------------------------------------

def set_threads(threads):
    """Threads for Numba kernels and, when threadpoolctl is installed, for BLAS. None: all the
    cores Numba sees. Returns the count set."""
    most = numba.config.NUMBA_NUM_THREADS
    threads = most if threads is None else max(1, min(int(threads), most))
    numba.set_num_threads(threads)
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(threads)
    except ImportError:
        pass
    return threads


class RWKV7Numba(ref.RWKV7):
    """RWKV-7 on Numba kernels; float32 compute, the big matrices stored as `storage` (float32,
    bfloat16, float16 or int8: the module docstring). `weights`: {key: array}, as
    tinyrwkv.load reads them (a Q8_0Matrix for an int8 tensor); each is converted to its stored
    form as it is taken (`stored_form`), so a dict of float32 arrays works with any storage."""

    def __init__(self, weights, dtype="float32", name=None, wkv_method="auto", storage="float32",
                 threads=None, decode="fused"):
        if np.dtype(dtype) != np.float32:
            raise ValueError("the numba backend computes in float32; for float64 (the oracle "
                             "mode) use backend='numpy'")
        if storage not in BACKEND_NAMES:
            raise ValueError(f"the numba backend stores weights as "
                             f"{', '.join(map(repr, BACKEND_NAMES))}, not {storage!r}")
        self.storage = storage
        super().__init__(weights, dtype="float32", name=name, wkv_method=wkv_method)
        self.backend = BACKEND_NAMES[storage]
        # Prefill's WKV operator: wkv_method="chunked" asks for the NumPy chunked form; "auto" and
        # "recurrent" run the Numba recurrence, which is faster at every length measured (12
        # heads x 64, ms per layer, CPU time on one thread of a 2-core AMD EPYC; recurrence vs
        # chunked with chunks of 16 / 32: T=64 1.0 vs 4.0 / 3.7, T=512 7.8 vs 25.8 / 25.5,
        # T=2048 32.7 vs 100 / 96). The fused prefill runs it with the heads as tasks
        # (numba_prefill.wkv_recurrent); the reference's composition runs `wkv_seq`.
        self.sequence_wkv = ref.wkv_chunked if wkv_method == "chunked" else wkv_seq
        # threads=N: N threads, always. None (the default): prefill uses every core, and decode
        # lets a ThreadGovernor choose from 1 up to every core while it runs, from the measured
        # time of its tokens, so that a busy machine slows it down instead of collapsing it
        # (backends/thread_governor.py says why and how).
        self.threads = set_threads(threads)
        self.thread_governor = ThreadGovernor(self.threads) if threads is None and \
            self.threads > 1 else None
        # the six token-shift lerps of each layer as one (6, C) array for decode (derived, so
        # kept apart from the checkpoint-keyed blocks)
        self.stacked_lerps = [np.stack([p[f"att.x_{c}"] for c in "rwkvag"]) for p in self.blocks]
        # decode="fused": a token is one compiled call (backends/numba_decode.py); "per-kernel":
        # the Python loop over layers below, kept for comparison. DeepEmbed models always take
        # the per-kernel path (the fused step does not cover them).
        if decode not in ("fused", "per-kernel"):
            raise ValueError(f"decode must be 'fused' or 'per-kernel', not {decode!r}")
        self.decode = "per-kernel" if self.config.variant != "x070" else decode
        if self.decode == "fused":
            self._decode_weights = numba_decode.stack_weights(self)   # shares the blocks' memory
            self._scratch = numba_decode.make_scratch(self.config)
        self._batch_scratch = None    # forward_batch's temporaries, made for the first batch

    def prepare_weight(self, key, array):
        """The big matrices in the storage type, the rest float32 (`stored_form`)."""
        return stored_form(key, array, self.storage)

    def stored_tensors(self):
        """The reference's view of these weights: every storage widened exactly to float32."""
        return {key: as_float32(a) for key, a in super().stored_tensors().items()}

    @property
    def n_params(self):
        """As the reference's, counted from the stored arrays without widening them (a Q8_0 row
        of n bytes holds n / 34 * 32 weights)."""
        count = lambda a: math.prod(values_shape(a.shape)) if a.dtype == np.uint8 else a.size
        return sum(int(count(a)) for a in super().stored_tensors().values())

    # ---- decode: one token ----

    def _fused_ok(self, state):
        """The fused step writes the state in place, so it needs float32 C-contiguous arrays
        (check_state makes them); anything else takes the per-kernel path."""
        return self.decode == "fused" and all(
            a.dtype == np.float32 and a.flags.c_contiguous
            for a in (state.att_shift, state.wkv, state.ffn_shift))

    @property
    def threads_description(self):
        """How many threads run, in words: '2 threads', or the governor's 'auto: 1 of 1-2'."""
        if self.thread_governor is not None:
            return self.thread_governor.describe()
        return f"{self.threads} thread{'s' if self.threads != 1 else ''}"

    def _governed(self, step, *args, work=1):
        """Run one decode step (a callable) on the governor's thread count, and tell the
        governor how long it took. Without a governor: as is, on the fixed count. `work`: the
        batch size; steps of another size take another time, so each size has its own governor
        (the one-sequence governor is `thread_governor`)."""
        governor = self.thread_governor
        if governor is None:
            return step(*args)
        if work != 1:
            governors = self.__dict__.setdefault("_batch_governors", {})
            governor = governors.setdefault(work, ThreadGovernor(self.threads))
        n = governor.threads()
        if numba.get_num_threads() != n:
            numba.set_num_threads(n)
        start = time.perf_counter()
        out = step(*args)
        governor.record(n, time.perf_counter() - start)
        return out

    def _decode_fused(self, token, state, with_head):
        """One token through numba_decode.decode_token. Its temporaries live in this model's one
        scratch object, so one model must not decode from two Python threads at once."""
        self._governed(numba_decode.decode_token, int(token), self._decode_weights,
                       state.att_shift, state.wkv, state.ffn_shift, self._scratch, with_head)

    def forward(self, ids, state=None, full_output=False, mode="sequence"):
        """As the reference; one token with decode="fused" runs the fused step, head included."""
        ids = self.check_ids(ids)
        if len(ids) > 1 or self.decode != "fused":
            return super().forward(ids, state, full_output, mode)
        state = self.check_state(state)
        self._decode_fused(ids[0], state, True)
        logits = self._scratch.logits.copy()                                 # (V,)
        return (logits[None] if full_output else logits), state

    def forward_one(self, token, state):
        if self._fused_ok(state):
            self._decode_fused(token, state, False)
            return self._scratch.x.copy(), state
        return self._governed(self._forward_one_per_kernel, token, state)

    def _forward_one_per_kernel(self, token, state):
        C, H = self.config.n_embd, self.config.n_head
        x0 = ref.layer_norm(as_float32(self.emb[token]), *self.ln0)          # (C,)
        x = x0
        v_first = np.empty(C, np.float32)
        y = np.empty(C, np.float32)
        for i, p in enumerate(self.blocks):
            # time mix
            xa = ref.layer_norm(x, p["ln1.weight"], p["ln1.bias"])
            mixed = xa + (state.att_shift[i] - xa) * self.stacked_lerps[i]    # (6, C): r w k v a g
            xr, xw, xk, xv, xa_, xg = mixed
            r = matvec(p["att.receptance.weight"], xr)
            k = matvec(p["att.key.weight"], xk)
            v = matvec(p["att.value.weight"], xv)
            w_pre = p["att.w0"] + vecmat(np.tanh(vecmat(xw, p["att.w1"])), p["att.w2"])
            a = ref.sigmoid(p["att.a0"] + vecmat(vecmat(xa_, p["att.a1"]), p["att.a2"]))
            g = vecmat(ref.sigmoid(vecmat(xg, p["att.g1"])), p["att.g2"])
            v_gate = p["att.v0"] + vecmat(vecmat(xv, p["att.v1"]), p["att.v2"]) if i > 0 else y
            S = state.wkv[i]
            _time_mix_core(S, r, w_pre, k, v, a, g, v_first, v_gate, p["att.k_k"], p["att.k_a"],
                           p["att.r_k"], p["att.ln_x.weight"], p["att.ln_x.bias"], i == 0, y)
            state.att_shift[i] = xa
            x = x + matvec(p["att.output.weight"], y)
            # channel mix
            xf = ref.layer_norm(x, p["ln2.weight"], p["ln2.bias"])
            xk = xf + (state.ffn_shift[i] - xf) * p["ffn.x_k"]
            h = matvec(p["ffn.key.weight"], xk)
            h = np.maximum(h, 0, out=h)
            h *= h
            if "ffn.s1" in p:
                s_emb = as_float32(p["ffn.s_emb.weight"][token]) + matvec(p["ffn.s_emb_x.weight"], x0)
                D = p["ffn.s1"].shape[1]
                u = vecmat(vecmat(xf, p["ffn.s1"]), np.ascontiguousarray(s_emb.reshape(D, D)))
                h *= vecmat(u, p["ffn.s2"]) + p["ffn.s0"]
            x = x + matvec(p["ffn.value.weight"], h)
            state.ffn_shift[i] = xf
        return x, state

    # ---- decode: one token for each of B sequences ----

    def forward_batch(self, tokens, states):
        """As the reference (same arguments, same results, bit for bit: see numba_decode.py), in
        one compiled call per step, `numba_decode.decode_batch`, which reads each weight once for
        all B sequences. A list of States is gathered into a new BatchState (the one copy a step
        makes, which also leaves the given States as they were) and the new States returned are
        views of it, one contiguous block each; a BatchState is moved on in place, no copy.
        decode="per-kernel", DeepEmbed models and a BatchState that is not float32 and
        C-contiguous take the reference's loop over `forward`."""
        tokens = self.check_batch(tokens, states)
        given_batch = isinstance(states, ref.BatchState)
        if given_batch:
            states.check_fits(self.config)      # the kernel indexes it without bounds checks
        if self.decode != "fused" or (given_batch and not self._fused_ok(states)):
            return super().forward_batch(tokens, states)
        batch = states if given_batch else self.batch_state(states)
        logits = self._decode_batch(tokens, batch)
        return logits, (batch if given_batch else [batch[b] for b in range(len(batch))])

    def _decode_batch(self, tokens, batch):
        """tokens (B,) int64 through numba_decode.decode_batch; returns the logits (B, V). The
        scratch is the model's, grown to the largest batch seen (one model, one thread at a time,
        as for _decode_fused)."""
        from .numba_decode import decode_batch, make_batch_scratch
        n_seq = len(tokens)
        if self._batch_scratch is None or self._batch_scratch.x.shape[0] < n_seq:
            self._batch_scratch = make_batch_scratch(self.config, n_seq)
        self._governed(decode_batch, tokens, self._decode_weights, batch.att_shift, batch.wkv,
                       batch.ffn_shift, self._batch_scratch, True, work=n_seq)
        return self._batch_scratch.logits[:n_seq].copy()

    # ---- prefill: T tokens ----

    def forward_seq(self, ids, state, steps=None, acts=None):
        """Prefill: the fused sequence form (backends/numba_prefill.py), or, when the caller asks
        for intermediates (`acts`) or brings steps of its own other than the WKV operator, the
        reference's composition (model.block) with this backend's WKV operator."""
        if numba.get_num_threads() != self.threads:   # decode's governor may have moved it
            numba.set_num_threads(self.threads)
        steps = steps or self.steps
        wkv = self.sequence_wkv if steps.wkv is ref.wkv_seq else steps.wkv
        x0 = ref.layer_norm(as_float32(self.emb[ids]), *self.ln0)            # (T, C)
        if acts is not None or replace(steps, wkv=ref.wkv_seq) != ref.STEPS:
            return self._forward_seq_reference(ids, x0, state, replace(steps, wkv=wkv), acts)
        threads = numba.get_num_threads()          # set_threads: the Numba count is the count
        own_wkv = None if wkv is wkv_seq else wkv   # None: block's recurrence, heads on the threads
        x, pending, v_first = x0.copy(), None, None          # x0 is kept for DeepEmbed's rows
        with numba_prefill.single_threaded_blas():           # the threads are block's (`share`)
            for i, p in enumerate(self.blocks):
                s_emb = self._deep_embed_rows(p, ids, x0) if "ffn.s1" in p else None
                # 16-bit matrices widened for this layer only, then freed: BLAS needs float32.
                p32 = {key: as_float32(value) for key, value in p.items()
                       if key != "ffn.s_emb.weight"}
                pending, v_first = numba_prefill.block(x, pending, v_first, state, i, p32,
                                                       self.stacked_lerps[i], self.config.n_head,
                                                       threads, own_wkv, s_emb)
        x += pending
        return x, state

    def _forward_seq_reference(self, ids, x0, state, steps, acts):
        """model.RWKV7.forward_seq on this backend's weights (widened per layer), with `steps`."""
        x, v_first = x0, None
        for i, p in enumerate(self.blocks):
            s_emb = self._deep_embed_rows(p, ids, x0) if "ffn.s1" in p else None
            p32 = {key: as_float32(value) for key, value in p.items() if key != "ffn.s_emb.weight"}
            layer_acts = None if acts is None else acts.setdefault(f"L{i}", {})
            x, v_first = ref.block(x, v_first, state, i, p32, self.config.n_head, s_emb, steps,
                                   layer_acts)
        if acts is not None:
            acts["ln0"] = x0
        return x, state

    def logits(self, h):
        if h.ndim == 1:
            return matvec(self.head, np.ascontiguousarray(h, dtype=np.float32))
        return h @ as_float32(self.head).T

    @staticmethod
    def _deep_embed_rows(p, token_ids, x0):
        return as_float32(p["ffn.s_emb.weight"][token_ids]) + x0 @ p["ffn.s_emb_x.weight"].T
