"""The chunked (parallel) WKV against the recurrence it must equal."""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import model as M
from tinyrwkv.model import l2_normalize, sigmoid, wkv_chunked, wkv_seq
from tinyrwkv.synthetic import make_weights

from conftest import rel_err

# float32 chunked vs the float64 recurrence: measured 5e-7..2e-6 (the float32 recurrence itself is
# 3e-7..1e-6 from float64); sums of ~N*T products each rounded to 6e-8 relative. 2e-5 is 10x that,
# and far below the O(1) error of any wrong term (see test_a_wrong_term_is_caught).
TOL_CHUNKED_F32 = 2e-5
# float64: the same function summed in another order; measured 1e-15..1e-14.
TOL_CHUNKED_F64 = 1e-12


def wkv_inputs(T, H, N, dtype, seed, decay="realistic"):
    """Inputs as the model makes them: unit removal keys, a in (0, 1), decays in (0.545, 1).
    Returns S, r, w, k, v, alpha = -kappa_hat, beta = kappa_hat * a (the operator's signature)."""
    rng = np.random.default_rng(seed)
    if decay == "realistic":       # w0 of the trained init spans about [-8, 3] (docs/architecture.md §7)
        w_pre = rng.uniform(-8, 3, (T, H, N)) + rng.standard_normal((T, H, N))
    elif decay == "fastest":       # every channel at the strongest decay the clamp allows
        w_pre = np.full((T, H, N), 30.0)
    else:                          # no decay at all, to rounding
        w_pre = np.full((T, H, N), -30.0)
    w = M.decay(w_pre)
    r, v = rng.standard_normal((2, T, H, N))
    k = 0.3 * rng.standard_normal((T, H, N))
    kappa_hat = l2_normalize(rng.standard_normal((T, H, N)))
    a = sigmoid(rng.standard_normal((T, H, N)))
    S = 0.3 * rng.standard_normal((H, N, N))                      # a non-zero initial state
    return tuple(x.astype(dtype) for x in (S, r, w, k, v, -kappa_hat, kappa_hat * a))


LENGTHS = [1, 2, 15, 16, 17, 31, 97, 128]          # 1, chunk-1, chunk, chunk+1, primes, several chunks


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("chunk_len", [16, 7])
def test_float64_chunked_equals_recurrence(T, chunk_len):
    args = wkv_inputs(T, 3, 64, np.float64, seed=T * 100 + chunk_len)
    S_ref, y_ref = wkv_seq(*args)
    S, y = wkv_chunked(*args, chunk_len=chunk_len)
    assert rel_err(y, y_ref) < TOL_CHUNKED_F64
    assert rel_err(S, S_ref) < TOL_CHUNKED_F64


@pytest.mark.parametrize("T", LENGTHS)
@pytest.mark.parametrize("N", [64, 32, 24])
def test_float32_chunked_within_tolerance(T, N):
    S_ref, y_ref = wkv_seq(*wkv_inputs(T, 2, N, np.float64, seed=T + N))
    S, y = wkv_chunked(*wkv_inputs(T, 2, N, np.float32, seed=T + N))
    assert S.dtype == np.float32 and y.dtype == np.float32
    assert rel_err(y, y_ref) < TOL_CHUNKED_F32
    assert rel_err(S, S_ref) < TOL_CHUNKED_F32


@pytest.mark.parametrize("decay", ["fastest", "none"])
def test_extreme_decays(decay):
    """The soft clamp bounds log w below by -0.6065; at that bound a chunk of 16 spans e^-9.7."""
    S_ref, y_ref = wkv_seq(*wkv_inputs(50, 2, 64, np.float64, seed=5, decay=decay))
    S, y = wkv_chunked(*wkv_inputs(50, 2, 64, np.float32, seed=5, decay=decay))
    assert rel_err(y, y_ref) < TOL_CHUNKED_F32 and rel_err(S, S_ref) < TOL_CHUNKED_F32


def test_a_wrong_term_is_caught():
    """Dropping the removal (z) terms changes the result far beyond the tolerances."""
    S0, r, w, k, v, alpha, beta = wkv_inputs(20, 2, 64, np.float64, seed=9)
    S_ref, y_ref = wkv_seq(S0, r, w, k, v, alpha, beta)
    _, y = wkv_chunked(S0, r, w, k, v, alpha, np.zeros_like(beta))   # beta = 0: nothing removed
    assert rel_err(y, y_ref) > 1e3 * TOL_CHUNKED_F32


def test_overlong_chunks_are_refused():
    args = wkv_inputs(200, 1, 64, np.float32, seed=1, decay="fastest")
    with pytest.raises(ValueError, match="chunk_len must be"):
        wkv_chunked(*args, chunk_len=160)
    S, y = wkv_chunked(*args, chunk_len=144)            # the longest allowed still works
    assert np.all(np.isfinite(y)) and np.all(np.isfinite(S))


@pytest.mark.parametrize("deep_embed", [False, True])
def test_model_with_chunked_wkv_equals_recurrent(deep_embed):
    w = make_weights(n_layer=2, n_embd=128, vocab_size=101, deep_embed=deep_embed, seed=4)
    ids = np.random.default_rng(0).integers(0, 101, 45)
    outs = {}
    for form in ("recurrent", "chunked", "auto"):
        model = tinyrwkv.RWKV7(w, dtype="float64", wkv_method=form)
        outs[form] = model.forward(ids[:20], full_output=True)[0], model.forward(ids)[1]
    for form in ("chunked", "auto"):
        assert rel_err(outs[form][0], outs["recurrent"][0]) < TOL_CHUNKED_F64
        assert rel_err(outs[form][1].wkv, outs["recurrent"][1].wkv) < TOL_CHUNKED_F64
    with pytest.raises(ValueError, match="wkv_method must be"):
        tinyrwkv.RWKV7(w, wkv_method="parallel")
