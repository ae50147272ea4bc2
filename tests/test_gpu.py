"""The CuPy backend (tinyrwkv/backends/cupy_gpu.py) against the float64 oracle and the official fixtures.

GPU tests run where CuPy and a CUDA GPU exist and skip cleanly elsewhere (CI has no GPU); the
strategy strings, the error without a GPU and "importing tinyrwkv never imports CuPy" are tested
everywhere.

Tolerances (max|d|/std, conftest.rel_err), all against float64 on the *same stored weights*
(matrices rounded to the storage type first), so they measure the arithmetic, not the rounding
of the weights:
  * TOL_F32 (5e-5): float32 storage anywhere, and decode (one token at a time) in any storage:
    every activation is float32 and 16-bit weights are widened exactly, so the GPU rounds like
    the CPU backends. Measured on the GPU: 1e-7 to 8e-6.
  * TOL_FP16_PREFILL (1e-2): the sequence form with float16 storage rounds the input of every
    matrix product to float16 (tensor cores take 16-bit inputs; unit roundoff u = 2^-11 = 4.9e-4)
    and about ten products a layer compound it. Measured on an H200: 1.5e-3 to 2.4e-3 (3-5 u);
    the bound leaves 4x headroom, and a real bug (an index, a missing term) moves logits by O(1).
  * TOL_BF16_PREFILL (6e-2): the same with bfloat16 inputs (u = 2^-8 = 3.9e-3, 8x float16's).
    Measured: 1.0e-2 to 1.6e-2.
"""
import importlib.util
import subprocess
import sys

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.loader import parse_strategy
from tinyrwkv.model import State
from tinyrwkv.synthetic import make_weights

from conftest import FIXTURES, ROOT, TOL_F32, random_wkv_inputs, rel_err

TOL_FP16_PREFILL = 1e-2
TOL_BF16_PREFILL = 6e-2


def gpu_available():
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


HAVE_GPU = gpu_available()
needs_gpu = pytest.mark.skipif(not HAVE_GPU, reason="needs CuPy and a CUDA GPU")

# Matrices the GPU stores in the weight type (everything else is float32 there).
MATRICES = ("receptance.weight", "key.weight", "value.weight", "output.weight", "head.weight",
            "att.w1", "att.w2", "att.a1", "att.a2", "att.g1", "att.g2", "att.v1", "att.v2",
            "s_emb.weight", "s_emb_x.weight", "ffn.s1", "ffn.s2")


# ---- everywhere ------------------------------------------------------------------------------

@pytest.mark.parametrize("strategy, expect", [
    ("cuda fp16", ("cupy", "float16", 0)),
    ("cuda:1 bf16", ("cupy", "bfloat16", 1)),
    ("  cuda   fp32 ", ("cupy", "float32", 0)),
    ("cpu bf16", ("numba", "bfloat16", None)),
    ("cpu fp16", ("numba", "float16", None)),
])
def test_official_strategy_strings(strategy, expect):
    assert parse_strategy(strategy) == expect


def test_cpu_fp32_strategy_is_the_default_cpu_backend():
    backend, weights, device = parse_strategy("cpu fp32")
    assert weights == "float32" and device is None
    assert backend == tinyrwkv.loader.default_backend("float32")


@pytest.mark.parametrize("strategy, message", [
    ("cuda fp16i8", "quantised weights"),
    ("cpu fp32i8", "storage='int8'"),
    ("cuda fp16 *10 -> cpu fp32", "splitting the layers"),
    ("mps fp32", "device mps is not supported"),
    ("gpu half", "not '<device> <precision>'"),
])
def test_unsupported_strategies_are_named(strategy, message):
    with pytest.raises(ValueError, match=message.replace("*", r"\*")):
        parse_strategy(strategy)


def test_strategy_conflicting_with_backend_is_refused(tmp_path):
    with pytest.raises(ValueError, match="pass one or the other"):
        tinyrwkv.load(tmp_path / "x.pth", strategy="cuda fp16", backend="numba")


def test_importing_tinyrwkv_does_not_import_cupy():
    code = "import sys, tinyrwkv, tinyrwkv.cli, tinyrwkv.loader; assert 'cupy' not in sys.modules"
    subprocess.run([sys.executable, "-c", code], check=True, cwd=ROOT)


@pytest.mark.skipif(HAVE_GPU, reason="this machine has a GPU")
def test_cupy_backend_without_gpu_is_a_clear_error(tmp_path):
    from tinyrwkv.formats import save_safetensors
    path = tmp_path / "m.safetensors"
    save_safetensors(path, make_weights())
    with pytest.raises(ValueError, match="(needs CuPy|needs a CUDA GPU)") as e:
        tinyrwkv.load(path, backend="cupy")
    assert "backend='numba'" in str(e.value)                # and says what to use instead
    with pytest.raises(ValueError, match="(needs CuPy|needs a CUDA GPU)"):
        tinyrwkv.load(path, strategy="cuda fp16")


# ---- on a GPU --------------------------------------------------------------------------------

def stored_like_gpu(weights, weight_dtype):
    """float64 copies of the weights exactly as the GPU holds them: float32 everywhere, and the
    matrices rounded to the storage type."""
    from tinyrwkv.formats import bf16_to_float32, to_bf16_bits
    out = {}
    for key, value in weights.items():
        v = np.asarray(value, np.float32)
        if key.endswith(MATRICES):
            if weight_dtype == "float16":
                v = v.astype(np.float16).astype(np.float32)
            elif weight_dtype == "bfloat16":
                v = bf16_to_float32(to_bf16_bits(v))
        out[key] = v.astype(np.float64)
    return out


def random_state(config, seed):
    rng = np.random.default_rng(seed)
    s = State.zeros(config, np.float64)
    s.att_shift[:] = rng.standard_normal(s.att_shift.shape)
    s.ffn_shift[:] = rng.standard_normal(s.ffn_shift.shape)
    s.wkv[:] = 0.3 * rng.standard_normal(s.wkv.shape)
    return s


def prefill_tol(weight_dtype):
    return {"float32": TOL_F32, "float16": TOL_FP16_PREFILL, "bfloat16": TOL_BF16_PREFILL}[weight_dtype]


# (L, C, N, V, F, deep): head sizes 64 and 32; an odd vocabulary; F=204 makes 16-bit rows of
# 408 bytes (not a multiple of 16: gemv's scalar path); a DeepEmbed model; a one-layer model.
SHAPES = [(2, 128, 64, 1001, None, False), (3, 96, 32, 257, 204, False),
          (1, 64, 64, 97, None, False), (2, 128, 64, 301, None, True)]


@needs_gpu
@pytest.mark.parametrize("weight_dtype", ["float32", "float16", "bfloat16"])
@pytest.mark.parametrize("L, C, N, V, F, deep", SHAPES)
def test_gpu_matches_float64(L, C, N, V, F, deep, weight_dtype):
    """Sequence form and token by token, from a random non-zero state, then continuing from the
    returned (GPU) state, against the float64 oracle on the same stored weights."""
    from tinyrwkv.backends.cupy_gpu import RWKV7CuPy
    w = make_weights(L, C, V, head_size=N, dim_ffn=F, deep_embed=deep, seed=L * C + V)
    oracle = tinyrwkv.RWKV7(stored_like_gpu(w, weight_dtype), dtype="float64")
    model = RWKV7CuPy(w, storage=weight_dtype)
    init = random_state(oracle.config, seed=C + V)
    ids = np.random.default_rng(V).integers(0, V, 41)
    for mode, tol in (("sequence", prefill_tol(weight_dtype)), ("recurrent", TOL_F32)):
        lr, sr = oracle.forward(ids[:29], init, full_output=True, mode=mode)
        lg, sg = model.forward(ids[:29], init, full_output=True, mode=mode)
        assert isinstance(lg, np.ndarray) and lg.dtype == np.float32
        errs = {"logits": rel_err(lg, lr)}
        lr2, sr2 = oracle.forward(ids[29:], sr, mode=mode)
        lg2, sg2 = model.forward(ids[29:], sg, mode=mode)          # continue from a GPU state
        errs["continued"] = rel_err(lg2, lr2)
        host = sg2.to_host()
        for name in ("att_shift", "wkv", "ffn_shift"):
            errs[name] = rel_err(getattr(host, name), getattr(sr2, name))
        print(f"L{L} C{C} N{N} V{V} F{F} deep={deep} {weight_dtype} {mode}: "
              + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
        assert max(errs.values()) < tol, errs


@needs_gpu
@pytest.mark.parametrize("weight_dtype", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["synthetic_L3_C256", "synthetic_de_L3_C256"])
def test_gpu_on_the_official_fixtures(name, weight_dtype):
    """The fixtures are bf16 checkpoints: float32 and bfloat16 storage hold the official weights
    exactly, so decode meets the float32 tolerance against the official package's outputs."""
    pth = FIXTURES / f"{name}.pth"
    if not pth.exists():
        pytest.skip(f"{pth} not found")
    ref = np.load(FIXTURES / f"{name}_official_cpufp32.npz")
    model = tinyrwkv.load(pth, backend="cupy", storage=weight_dtype)
    assert model.backend.startswith("cupy")
    toks = ref["toks"]
    tol = prefill_tol(weight_dtype)
    logits, state = model.forward(toks[:30], full_output=True)
    errs = {"seq_logits": rel_err(logits, ref["seq_logits"])}
    logits, state = model.forward(toks[30:], state)
    errs["seq2_last"] = rel_err(logits, ref["seq2_last"])
    errs["seq_state"] = rel_err(state.to_host().wkv, ref["seq_state_att"])
    logits, state = model.forward(toks, full_output=True, mode="recurrent")
    errs["one_logits"] = rel_err(logits, ref["one_logits"])
    errs["one_state"] = rel_err(state.to_host().wkv, ref["one_state_att"])
    print(f"{name} {weight_dtype}: " + ", ".join(f"{k} {v:.1e}" for k, v in errs.items()))
    assert errs["one_logits"] < TOL_F32 and errs["one_state"] < TOL_F32
    assert max(errs.values()) < tol, errs


@needs_gpu
@pytest.mark.parametrize("storage", ["float32", "float16", "bfloat16"])
def test_trace_of_a_gpu_model_is_of_its_stored_weights(storage):
    """tinyrwkv.trace on a cupy model runs the reference on the numbers the GPU holds (16-bit
    weights widened exactly, LoRA matrices back in file layout): within float32 rounding (1e-4,
    tests/test_backends.py) of the float64 model on those numbers, which equal stored_like_gpu."""
    from tinyrwkv.backends.cupy_gpu import RWKV7CuPy
    w = make_weights(2, 256, 1003, ranks=(64, 64, 32, 128), seed=9)
    model = RWKV7CuPy(w, storage=storage)
    stored = model.stored_tensors()
    expect = stored_like_gpu(w, storage)
    for key in stored:
        assert np.array_equal(stored[key].reshape(-1), np.asarray(expect[key], np.float32).reshape(-1)), key
    ids = np.random.default_rng(2).integers(0, 1003, 21)
    tr = tinyrwkv.trace(model, ids)
    logits64, _ = tinyrwkv.RWKV7(stored, dtype="float64").forward(ids, full_output=True)
    assert rel_err(tr["logits"], logits64) < 1e-4


@needs_gpu
def test_cuda_graph_replay_equals_plain_launches():
    """The captured graph runs exactly the launches of the plain path: bit-identical results."""
    from tinyrwkv.backends.cupy_gpu import RWKV7CuPy
    w = make_weights(2, 128, 500, seed=5)
    ids = np.random.default_rng(1).integers(0, 500, 9)
    a = RWKV7CuPy(w, graphs=True).forward(ids, full_output=True, mode="recurrent")
    b = RWKV7CuPy(w, graphs=False).forward(ids, full_output=True, mode="recurrent")
    assert np.array_equal(a[0], b[0])
    assert np.array_equal(a[1].to_host().wkv, b[1].to_host().wkv)


@needs_gpu
def test_gpu_state_round_trips_and_is_not_modified(tmp_path):
    """A GPU state saves like any other, and the caller's state is never modified."""
    from tinyrwkv.backends.cupy_gpu import RWKV7CuPy
    w = make_weights(2, 64, 100, seed=2)
    model = RWKV7CuPy(w)
    _, s = model.forward([1, 2, 3])
    before = s.to_host()
    model.forward([4, 5], s)
    model.forward([6], s)
    after = s.to_host()
    assert all(np.array_equal(getattr(before, n), getattr(after, n)) for n in ("att_shift", "wkv", "ffn_shift"))
    tinyrwkv.save_state(s, tmp_path / "s.npz")
    loaded = tinyrwkv.load_state(tmp_path / "s.npz", model.config)
    l1, _ = model.forward([7], s)
    l2, _ = model.forward([7], loaded)
    assert np.array_equal(l1, l2)


@needs_gpu
def test_generation_runs_on_the_gpu():
    """The generation loop works unchanged on the GPU backend (NumPy logits, GPU state), and its
    first next-token distribution is the CPU reference's."""
    from tinyrwkv.backends.cupy_gpu import RWKV7CuPy
    from tinyrwkv.tokenizer import WorldTokenizer
    w = make_weights(2, 64, 65536, seed=3)
    cpu, gpu = tinyrwkv.RWKV7(w), RWKV7CuPy(w, storage="float32")
    tok = WorldTokenizer()
    sessions = [tinyrwkv.Session(m, tok, seed=1) for m in (cpu, gpu)]
    first = [s.feed("Hello there") for s in sessions]
    assert rel_err(first[1], first[0]) < TOL_F32
    text = "".join(sessions[1].stream(8))
    assert len(sessions[1].generated) >= 1 and isinstance(text, str)
    assert all(0 < t <= tok.max_id for t in sessions[1].generated)


@needs_gpu
def test_gpu_errors():
    from tinyrwkv.backends.cupy_gpu import RWKV7CuPy
    w = make_weights(1, 64, 50)
    with pytest.raises(ValueError, match="float32"):
        RWKV7CuPy(w, dtype="float64")
    with pytest.raises(ValueError, match="CPU-only"):
        RWKV7CuPy(w, wkv_method="chunked")
    with pytest.raises(ValueError, match="stores weights as"):
        RWKV7CuPy(w, storage="int8")
    model = RWKV7CuPy(w)
    with pytest.raises(ValueError, match="out of range"):
        model.forward([50])


# ---- training on the GPU ---------------------------------------------------------------------

@needs_gpu
def test_gpu_wkv_training_kernels_match_float64():
    """train_gpu's WKV forward/backward against train.py's NumPy float64 reference, from a
    non-zero state, T not a multiple of the checkpoint chunk. float32 tolerance: the same 5e-5
    (max|d|/std) as inference; measured values are printed."""
    import cupy as cp
    from tinyrwkv import train
    from tinyrwkv.backends import cupy_train as train_gpu
    rng = np.random.default_rng(7)
    B, T, H, N = 2, 37, 3, 64
    r, w, k, v, alpha, beta, S0 = random_wkv_inputs(rng, B, T, H, N)
    dy, dS = rng.standard_normal((B, T, H, N)), rng.standard_normal((B, H, N, N))
    ins = (r, w, k, v, alpha, beta)
    ref_f = train.wkv_forward(S0, *ins)
    ref_b = train.wkv_backward(dS, dy, ref_f[2], *ins)
    g = lambda a: cp.asarray(a, cp.float32)
    got_f = train_gpu.wkv_forward(g(S0), *map(g, ins))
    got_b = train_gpu.wkv_backward(g(dS), g(dy), got_f[2], *map(g, ins))
    errs = [rel_err(b.get(), a) for a, b in zip(ref_f[:2] + ref_b, got_f[:2] + got_b)]
    print("GPU WKV training kernels, max|d|/std:", " ".join(f"{e:.1e}" for e in errs))
    assert max(errs) < TOL_F32


@needs_gpu
def test_gpu_loss_and_grad_matches_cpu():
    """The whole training step on CuPy arrays = the NumPy float64 one, within float32 rounding."""
    import cupy as cp
    from tinyrwkv import train
    w = make_weights(2, 128, 301, head_size=64, seed=9, dtype=np.float64)
    rng = np.random.default_rng(3)
    ids, tgt = rng.integers(0, 301, (3, 40)), rng.integers(0, 301, (3, 40))
    loss64, g64 = train.loss_and_grad(w, ids, tgt)
    loss32, g32 = train.loss_and_grad({k: cp.asarray(v, cp.float32) for k, v in w.items()}, ids, tgt)
    assert abs(loss32 - loss64) < 1e-5 * abs(loss64)
    worst = max(rel_err(g32[k].get(), g64[k]) for k in w if g64[k].std() > 0)
    print(f"GPU training step vs float64: loss {abs(loss32 - loss64):.1e}, worst grad {worst:.1e}")
    assert worst < 1e-3        # float32 gradients: ~1e-5 typical; 1e-3 leaves room for tiny tensors
