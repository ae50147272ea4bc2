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
  * prefill (`forward_seq`, T tokens): the reference's sequence form with BLAS matrix products
    over the whole sequence and the position-wise work between them fused into Numba kernels,
    all of it shared among one set of threads (backends/numba_prefill.py). Asked for the
    intermediates (`acts`) or given steps of its own, it runs the reference's composition
    (model.block) with the Numba WKV kernel (`wkv_seq`, heads in parallel) instead.

Weights can be stored as float32 or as bfloat16 (`storage="bfloat16"`): the large matrices (r, k,
v, output, channel-mix key and value, embedding, head, DeepEmbed tables) stay 16-bit in memory,
read straight from a bf16 checkpoint without conversion, and are widened to float32 inside the
kernels as they are read: half the bytes per token. Everything is computed in float32.

Deviation from the reference, on purpose: the kernels are compiled with
fastmath={"reassoc", "contract"}, which lets LLVM vectorise dot products by adding in another
order and fusing multiply-adds. No approximate functions, and inf/NaN semantics are kept. The
parity tests (tests/test_fast.py) hold these kernels to the reference within a float32 tolerance.
"""

from __future__ import annotations

import numpy as np

try:
    import numba
    from numba import njit, prange
except ImportError as e:  # the caller (tinyrwkv.load) turns this into a clear message
    raise ImportError("the numba backend needs numba: pip install numba") from e

from dataclasses import replace

from .. import model as ref
from . import numba_prefill
from ..formats import bf16_to_float32, to_bf16_bits

FASTMATH = {"reassoc", "contract"}
DECAY_SCALE = float(ref.DECAY_SCALE)   # plain floats: compile-time constants in the kernels
GN_EPS = float(ref.GN_EPS)
ROWS_PER_TASK = 16          # rows of a matrix-vector product handled by one parallel task

# Tensors kept 16-bit with storage="bfloat16": the large ones, whose bytes dominate each token.
# The LoRA matrices and per-channel vectors are small and stay float32.
BIG_MATRICES = ("att.receptance.weight", "att.key.weight", "att.value.weight", "att.output.weight",
                "ffn.key.weight", "ffn.value.weight", "ffn.s_emb.weight", "emb.weight",
                "head.weight")


def bf16_bits(x):
    """float32 -> bf16 bits (uint16), round to nearest even (as torch's .bfloat16())."""
    return to_bf16_bits(np.asarray(x, dtype=np.float32))


def widen(bits):
    """bf16 bits (uint16) -> float32, exact (bf16 is the top half of a float32)."""
    return bf16_to_float32(bits)


def as_float32(w):
    """A weight as float32, whether stored float32 or as bf16 bits."""
    return widen(w) if w.dtype == np.uint16 else w


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
    """W @ x for one token: W (out, in) as stored (float32 or bf16 bits), x (in,) float32."""
    out = np.empty(W.shape[0], np.float32)
    if W.dtype == np.uint16:
        _matvec_bf16(W.view(np.uint32), x, out)   # needs an even row length (all RWKV widths are)
    else:
        _matvec_f32(W, x, out)
    return out


@njit(parallel=True, fastmath=FASTMATH, cache=True)
def _wkv_seq_kernel(S, r, w, k, v, alpha, beta, y):
    T, H, N = r.shape
    for h in prange(H):                                   # heads are independent
        for t in range(T):
            for i in range(N):                            # state row i: value channel i
                sa = np.float32(0.0)
                for j in range(N):
                    sa += S[h, i, j] * alpha[t, h, j]              # (S alpha)_i
                yi = np.float32(0.0)
                for j in range(N):
                    s = S[h, i, j] * w[t, h, j] + sa * beta[t, h, j] + v[t, h, i] * k[t, h, j]
                    S[h, i, j] = s
                    yi += s * r[t, h, j]
                y[t, h, i] = yi


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
    """Threads for Numba kernels and, when threadpoolctl is installed, for BLAS."""
    if threads is None:
        return numba.get_num_threads()
    threads = max(1, min(int(threads), numba.config.NUMBA_NUM_THREADS))
    numba.set_num_threads(threads)
    try:
        import threadpoolctl
        threadpoolctl.threadpool_limits(threads)
    except ImportError:
        pass
    return threads


class RWKV7Numba(ref.RWKV7):
    """RWKV-7 on Numba kernels; float32 compute, weights stored float32 or bfloat16."""

    def __init__(self, weights, dtype="float32", name=None, wkv_method="auto", storage="float32",
                 threads=None, decode="fused"):
        if np.dtype(dtype) != np.float32:
            raise ValueError("the numba backend computes in float32; for float64 (the oracle "
                             "mode) use backend='numpy'")
        if storage not in ("float32", "bfloat16"):
            raise ValueError(f"the numba backend stores weights as 'float32' or 'bfloat16', "
                             f"not {storage!r}")
        self.storage = storage
        super().__init__(weights, dtype="float32", name=name, wkv_method=wkv_method)
        self.backend = "numba" + ("-bf16" if storage == "bfloat16" else "")
        # Prefill's WKV operator: wkv_method="chunked" asks for the NumPy chunked form; "auto" and
        # "recurrent" run the Numba recurrence, which is faster at every length measured (12
        # heads x 64, ms per layer, CPU time on one thread of a 2-core AMD EPYC; recurrence vs
        # chunked with chunks of 16 / 32: T=64 1.0 vs 4.0 / 3.7, T=512 7.8 vs 25.8 / 25.5,
        # T=2048 32.7 vs 100 / 96). The fused prefill runs it with the heads as tasks
        # (numba_prefill.wkv_recurrent); the reference's composition runs `wkv_seq`.
        self.sequence_wkv = ref.wkv_chunked if wkv_method == "chunked" else wkv_seq
        self.threads = set_threads(threads)
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
            from . import numba_decode
            self._decode_weights = numba_decode.stack_weights(self)   # shares the blocks' memory
            self._scratch = numba_decode.make_scratch(self.config)

    def prepare_weight(self, key, array):
        """Big matrices: bf16 bits (uint16) with storage="bfloat16", else float32. A bf16 input
        (uint16 bits from read_checkpoint(dtype="bfloat16")) is kept as it is: no copy."""
        big = key.endswith(BIG_MATRICES)
        if self.storage == "bfloat16" and big:
            return np.asarray(array) if array.dtype == np.uint16 else bf16_bits(array)
        if array.dtype == np.uint16:
            return widen(array)
        return np.asarray(array.astype(np.float32, copy=False))

    def stored_tensors(self):
        """The reference's view of these weights: bf16 storage widened exactly to float32."""
        return {key: as_float32(a) for key, a in super().stored_tensors().items()}

    # ---- decode: one token ----

    def _fused_ok(self, state):
        """The fused step writes the state in place, so it needs float32 C-contiguous arrays
        (check_state makes them); anything else takes the per-kernel path."""
        return self.decode == "fused" and all(
            a.dtype == np.float32 and a.flags.c_contiguous
            for a in (state.att_shift, state.wkv, state.ffn_shift))

    def _decode_fused(self, token, state, with_head):
        """One token through numba_decode.decode_token. Its temporaries live in this model's one
        scratch object, so one model must not decode from two Python threads at once."""
        from .numba_decode import decode_token
        decode_token(int(token), self._decode_weights, state.att_shift, state.wkv,
                     state.ffn_shift, self._scratch, with_head)

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

    # ---- prefill: T tokens ----

    def forward_seq(self, ids, state, steps=None, acts=None):
        """Prefill: the fused sequence form (backends/numba_prefill.py), or, when the caller asks
        for intermediates (`acts`) or brings steps of its own other than the WKV operator, the
        reference's composition (model.block) with this backend's WKV operator."""
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
