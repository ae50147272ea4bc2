"""The WKV operator's training pair in chunked form (train.wkv_chunked_forward /
wkv_chunked_backward, docs/architecture.md §6.6) against the recurrent pair (train.wkv_forward /
wkv_backward, itself checked against finite differences and torch autograd in test_train.py), and
against central finite differences of its own; then a whole training step with each pair.

Inputs: conftest.random_wkv_inputs (a layer's ranges: decays in (e^-0.6, 1), unit-length removal
key, a in (0, 1)), a non-zero initial state and a non-zero dL/dS_T, T not a multiple of the chunk.
Tolerances, with rel_err = max|got - ref| / std(ref):
  * TOL_F64 (1e-12): the two pairs are exact float64 computations of one function in different
    orders; measured 1e-16 to 1e-15 (a few ulp), so 1e-12 leaves room for longer sequences while
    a wrong term or index gives O(1).
  * finite differences (directional, step FD_STEP = 1e-5 along a random unit-scale direction):
    truncation O(h^2) ~ 1e-10, rounding O(eps_64 |L| / h) ~ 1e-10 relative to |L|, so TOL_FD =
    1e-7 of the derivative's scale (sum |grad * direction|) is loose by 1000x and still tight
    against a wrong term.
  * float32 (conftest.TOL_F32 = 5e-5, the project's float32 bound), both pairs against float64:
    measured 1e-6 to 4e-6 for chunked and 5e-7 to 3e-6 for recurrent (chunks of 16, T up to 300,
    N up to 64); the chunked form's factors e^{+-g} reach e^{9.7} inside a chunk (§6.4), which
    costs it up to ~2x the recurrent rounding, no more.
"""
import numpy as np
import pytest

from tinyrwkv import model, train
from tinyrwkv.synthetic import make_weights

from conftest import TOL_F32, have, random_wkv_inputs, rel_err

TOL_F64 = 1e-12
FD_STEP = 1e-5
TOL_FD = 1e-7


def inputs(seed, B, T, H, N, dtype=np.float64):
    rng = np.random.default_rng(seed)
    r, w, k, v, alpha, beta, S0 = random_wkv_inputs(rng, B, T, H, N, dtype)
    dy = rng.standard_normal((B, T, H, N)).astype(dtype)
    dS = rng.standard_normal((B, H, N, N)).astype(dtype)
    return S0, [r, w, k, v, alpha, beta], dy, dS


@pytest.mark.parametrize("T, chunk", [(1, 16), (15, 16), (16, 16), (17, 16), (37, 16), (100, 16),
                                      (37, 5), (23, 1), (64, 64)])
def test_chunked_pair_equals_recurrent_pair(T, chunk):
    """Same S_T, y, saved states and all seven gradients, B > 1, H > 1, from a non-zero state."""
    S0, x, dy, dS = inputs(T * 100 + chunk, 2, T, 3, 8)
    S_r, y_r, saved_r = train.wkv_forward(S0, *x, chunk=chunk)
    S_c, y_c, saved_c = train.wkv_chunked_forward(S0, *x, chunk=chunk)
    assert saved_c.shape == saved_r.shape == (-(-T // chunk), 2, 3, 8, 8)
    for name, got, ref in (("S_T", S_c, S_r), ("y", y_c, y_r), ("saved", saved_c, saved_r)):
        assert rel_err(got, ref) < TOL_F64, name
    g_r = train.wkv_backward(dS, dy, saved_r, *x, chunk=chunk)
    g_c = train.wkv_chunked_backward(dS, dy, saved_c, *x, chunk=chunk)
    for name, got, ref in zip(("dS0", "dr", "dw", "dk", "dv", "dalpha", "dbeta"), g_c, g_r):
        assert got.shape == ref.shape and got.dtype == ref.dtype, name
        assert rel_err(got, ref) < TOL_F64, (name, rel_err(got, ref))
    # no dL/dS_T (how loss_and_grad calls it)
    g_r = train.wkv_backward(None, dy, saved_r, *x, chunk=chunk)
    g_c = train.wkv_chunked_backward(None, dy, saved_c, *x, chunk=chunk)
    assert all(rel_err(a, b) < TOL_F64 for a, b in zip(g_c, g_r))


@pytest.mark.parametrize("pair", ["recurrent", "chunked"])
def test_both_pairs_match_finite_differences(pair):
    """Directional central differences of L = sum(y * Gy) + sum(S_T * GS) for each input."""
    fwd, bwd = train.RECURRENT_WKV if pair == "recurrent" else train.CHUNKED_WKV
    S0, x, Gy, GS = inputs(7, 2, 37, 2, 6)

    def loss(S0, x):
        S, y, _ = fwd(S0, *x)
        return float((y * Gy).sum() + (S * GS).sum())

    _, _, saved = fwd(S0, *x)
    dS0, *dx = bwd(GS, Gy, saved, *x)
    rng = np.random.default_rng(8)
    for n, (u, g) in enumerate(zip([S0] + x, [dS0] + dx)):
        d = rng.standard_normal(u.shape)
        if n == 2:                                    # w: stay inside (0, 1) whatever the step
            d *= u * (1 - u)
        args = [S0] + list(x)
        args[n] = u + FD_STEP * d
        fp = loss(args[0], args[1:])
        args[n] = u - FD_STEP * d
        fm = loss(args[0], args[1:])
        fd = (fp - fm) / (2 * FD_STEP)
        analytic = float((g * d).sum())
        assert abs(fd - analytic) <= TOL_FD * float(np.abs(g * d).sum()), (n, fd, analytic)


@pytest.mark.parametrize("fastest_decay", [False, True])
def test_float32_agreement(fastest_decay):
    """float32 against float64, both pairs; with every decay at the clamp's fastest rate the
    chunked form's e^{-g} is at its largest (e^9.7 over a chunk of 16, §6.4)."""
    S0, x, dy, dS = inputs(11, 2, 75, 2, 32)
    if fastest_decay:
        x[1] = np.full_like(x[1], np.exp(-model.DECAY_SCALE) + 1e-6)
    S, y, saved = train.wkv_forward(S0, *x)
    grads = train.wkv_backward(dS, dy, saved, *x)
    f32 = lambda u: u.astype(np.float32)
    for fwd, bwd in (train.RECURRENT_WKV, train.CHUNKED_WKV):
        S_, y_, saved_ = fwd(f32(S0), *map(f32, x))
        grads_ = bwd(f32(dS), f32(dy), saved_, *map(f32, x))
        assert y_.dtype == np.float32 and all(g.dtype == np.float32 for g in grads_)
        errs = [rel_err(a, b) for a, b in zip((S_, y_) + tuple(grads_), (S, y) + tuple(grads))]
        assert max(errs) < TOL_F32, (fwd.__name__, errs)


def test_loss_and_grad_with_the_chunked_pair():
    """A training step with CHUNKED_WKV equals the default (recurrent) one: loss and every
    parameter gradient, float64, T = 21 (two chunks, the second partial)."""
    w = make_weights(2, 32, 37, head_size=16, dim_ffn=48, ranks=(8, 8, 4, 8), seed=3,
                     dtype=np.float64)
    rng = np.random.default_rng(4)
    ids, targets = rng.integers(0, 37, (2, 21)), rng.integers(0, 37, (2, 21))
    loss_r, grads_r = train.loss_and_grad(w, ids, targets)
    loss_c, grads_c = train.loss_and_grad(w, ids, targets, wkv_ops=train.CHUNKED_WKV)
    assert abs(loss_c - loss_r) < 1e-13 * abs(loss_r)
    assert set(grads_c) == set(grads_r) == set(w)
    for key, ref in grads_r.items():
        if not ref.any():                             # layer 0's unused v0/v1/v2
            assert not grads_c[key].any(), key
            continue
        assert np.abs(grads_c[key] - ref).max() <= TOL_F64 * np.abs(ref).max(), key


@pytest.mark.parametrize("chunk", [0, model.MAX_CHUNK_LEN + 1])
def test_chunk_length_out_of_range_is_refused(chunk):
    S0, x, dy, dS = inputs(0, 1, 4, 1, 4)
    with pytest.raises(ValueError, match=r"chunk must be 1\.\.144.*§6\.4"):
        train.wkv_chunked_forward(S0, *x, chunk=chunk)
    with pytest.raises(ValueError, match="chunk must be"):
        train.wkv_chunked_backward(dS, dy, np.zeros((1, 1, 1, 4, 4)), *x, chunk=chunk)


def test_choose_wkv_ops():
    """The helper returns one of the two named pairs, and refuses what it does not know."""
    for backend in ("numpy",) + (("numba",) if have("numba") else ()):
        for T in (1, 128, 512, 2048):
            ops = train.choose_wkv_ops(backend, T)
            assert isinstance(ops, tuple) and len(ops) == 2 and all(map(callable, ops))
    assert train.choose_wkv_ops("numpy", 512) is train.CHUNKED_WKV
    with pytest.raises(ValueError, match="backend"):
        train.choose_wkv_ops("tpu", 128)


def gpu_available():
    if not have("cupy"):
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


needs_gpu = pytest.mark.skipif(not gpu_available(), reason="needs CuPy and a CUDA GPU")


@needs_gpu
def test_chunked_pair_runs_on_cupy_arrays():
    """The same NumPy code on CuPy arrays (GPU): float64 equals the NumPy float64 result to
    TOL_F64, float32 is within TOL_F32 of it; the outputs stay CuPy arrays."""
    import cupy as cp
    S0, x, dy, dS = inputs(5, 2, 37, 3, 64)
    S, y, saved = train.wkv_chunked_forward(S0, *x)
    grads = train.wkv_chunked_backward(dS, dy, saved, *x)
    for dtype, tol in ((np.float64, TOL_F64), (np.float32, TOL_F32)):
        g = lambda u: cp.asarray(u, dtype)
        S_, y_, saved_ = train.wkv_chunked_forward(g(S0), *map(g, x))
        grads_ = train.wkv_chunked_backward(g(dS), g(dy), saved_, *map(g, x))
        assert all(isinstance(u, cp.ndarray) and u.dtype == dtype for u in (S_, y_, saved_, *grads_))
        for got, ref in zip((S_, y_) + tuple(grads_), (S, y) + tuple(grads)):
            assert rel_err(got.get(), ref) < tol, (dtype, rel_err(got.get(), ref))


@needs_gpu
def test_loss_and_grad_with_the_chunked_pair_on_cupy():
    """A whole float64 training step on the GPU with CHUNKED_WKV equals the NumPy one."""
    import cupy as cp
    w = make_weights(2, 128, 37, head_size=64, seed=3, dtype=np.float64)
    rng = np.random.default_rng(4)
    ids, targets = rng.integers(0, 37, (2, 40)), rng.integers(0, 37, (2, 40))
    loss, grads = train.loss_and_grad(w, ids, targets, wkv_ops=train.CHUNKED_WKV)
    loss_g, grads_g = train.loss_and_grad({k: cp.asarray(v) for k, v in w.items()}, ids, targets,
                                          wkv_ops=train.CHUNKED_WKV)
    assert abs(loss_g - loss) < 1e-12 * abs(loss)
    for key, ref in grads.items():
        assert np.abs(grads_g[key].get() - ref).max() <= TOL_F64 * max(np.abs(ref).max(), 1e-30), key
