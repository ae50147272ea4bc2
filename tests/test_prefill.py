"""The fused prefill (tinyrwkv/backends/numba_prefill.py) against the float64 reference.

Each kernel against the reference steps it twins, then the whole sequence form
(RWKV7Numba.forward_seq) against model.RWKV7 in float64: from a random non-zero state, at awkward
sizes, with the official rank pattern, float32 and bfloat16 storage, 1 and 2 threads.
"""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import model as M
from tinyrwkv.synthetic import make_weights

from conftest import TOL_F32, have, random_state, rel_err

pytestmark = pytest.mark.skipif(not have("numba"), reason="numba is not installed")

OFFICIAL_RANKS = (64, 64, 32, 128)     # (Dw, Da, Dv, Dg) of the 0.1B release: unequal on purpose


def prefill():
    from tinyrwkv.backends import numba_prefill
    return numba_prefill


def f32(*arrays):
    return [np.ascontiguousarray(a, dtype=np.float32) for a in arrays]


# ---- the kernels, each against the reference steps it twins ----------------------------------

def test_exp_f32():
    """Within 1e-7 relative of e^x over the float32 range (NumPy's float32 exp: 2e-7)."""
    from numba import njit
    exp_f32 = prefill().exp_f32

    @njit
    def exp_all(x, out):
        for i in range(x.size):
            out[i] = exp_f32(x[i])
    x = np.concatenate([np.linspace(-87.3, 88.7, 200001), [0.0, -1e-30, 1e-30]]).astype(np.float32)
    out = np.empty_like(x)
    exp_all(x, out)
    want = np.exp(x.astype(np.float64))
    assert np.max(np.abs(out - want) / want) < 1.5e-7
    edge = np.array([np.nan, np.inf, 89.0, -np.inf, -100.0], np.float32)
    out = np.empty_like(edge)
    exp_all(edge, out)
    assert np.isnan(out[0]) and out[1] == out[2] == np.inf
    assert 0 <= out[3] < 1.3e-38 and 0 <= out[4] < 1.3e-38     # clamped at e^-87.3, not 0


@pytest.mark.parametrize("T, lerps", [(1, 6), (7, 6), (100, 1)])
def test_add_and_norm_then_mix(T, lerps):
    """add_and_norm and mix, over rows in two slices as `share` runs them."""
    rng = np.random.default_rng(T)
    C = 96
    x, dx = rng.standard_normal((2, T, C))
    ln_w, ln_b, before = rng.standard_normal((3, C))
    mix = rng.uniform(size=(lerps, C))
    want_x = x + dx
    normed = M.layer_norm(want_x, ln_w, ln_b)
    shifted = M.token_shift(normed, before)
    want = np.stack([M.lerp(normed, shifted, m) for m in mix])
    x32, dx32, ln_w32, ln_b32, before32, mix32 = f32(x, dx, ln_w, ln_b, before, mix)
    got_normed, got = np.empty((T, C), np.float32), np.empty((lerps, T, C), np.float32)
    half = T // 2
    for lo, hi in ((0, half), (half, T)):
        prefill().add_and_norm(x32, dx32, ln_w32, ln_b32, got_normed, lo, hi)
    for lo, hi in ((half, T), (0, half)):                 # any order once every row is normed
        prefill().mix(got_normed, before32, mix32, got, lo, hi)
    assert rel_err(x32, want_x) < 1e-6                   # the residual is added in place
    assert rel_err(got_normed, normed) < 1e-5 and rel_err(got, want) < 1e-5
    x32 = f32(want_x)[0]                                  # dx=None: no residual add
    prefill().add_and_norm(x32, None, ln_w32, ln_b32, got_normed, 0, T)
    assert rel_err(got_normed, normed) < 1e-5


@pytest.mark.parametrize("first_layer", [True, False])
def test_wkv_inputs(first_layer):
    rng = np.random.default_rng(3)
    T, H, N = 9, 3, 32
    C = H * N
    k, v, w_lora, a_lora, v_lora, v_first = rng.standard_normal((6, T, C))
    w0 = rng.uniform(-8, 3, C)
    a0, v0, k_k, k_a = rng.standard_normal((4, C))
    kk = M.removal_key(k, k_k, H)
    a = M.learning_rate(a0 + a_lora)
    want = {"decay": M.decay(w0 + w_lora), "k_tilde": M.replacement_key(k, a, k_a),
            "alpha": -kk, "beta": kk * a,
            "v": v if first_layer else M.value_residual(v, v_first, M.sigmoid(v0 + v_lora))}
    got = {name: np.empty((T, C), np.float32) for name in ("decay", "k_tilde", "alpha", "beta")}
    k32, got["v"], w32, a32, v_lora32, v_first32, *vectors = f32(k, v, w_lora, a_lora, v_lora,
                                                                  v_first, w0, a0, v0, k_k, k_a)
    prefill().wkv_inputs(k32, got["v"], w32, a32, None if first_layer else v_lora32, v_first32,
                         *vectors, H, got["decay"], got["k_tilde"], got["alpha"], got["beta"],
                         0, T)
    for name in want:
        assert rel_err(got[name], want[name]) < 1e-5, name


def test_time_mix_output():
    rng = np.random.default_rng(4)
    T, H, N = 11, 3, 32
    C = H * N
    y, r, k, v, g = rng.standard_normal((5, T, C))
    ln_w, ln_b = rng.standard_normal((2, C))
    r_k = rng.standard_normal((H, N))
    # model.time_mix_output without its projection: an identity output matrix
    p = {"att.ln_x.weight": ln_w, "att.ln_x.bias": ln_b, "att.r_k": r_k,
         "att.output.weight": np.eye(C)}
    want = M.time_mix_output(y, r, k, v, g, p, H)
    got = np.empty((T, C), np.float32)
    prefill().time_mix_output(*f32(y, r, k, v, g, ln_w, ln_b, r_k), got, 0, T)
    assert rel_err(got, want) < 1e-5


def test_squared_relu():
    u = np.random.default_rng(5).standard_normal((7, 50))
    got = f32(u)[0]
    prefill().squared_relu_(got, 0, 7)
    assert rel_err(got, M.squared_relu(u)) < 1e-6


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("T, H, N", [(1, 1, 64), (17, 3, 32), (64, 4, 24)])
def test_wkv_recurrent(T, H, N, threads):
    from test_chunked import wkv_inputs
    S_ref, y_ref = M.wkv_seq(*wkv_inputs(T, H, N, np.float64, seed=T + H))
    args = wkv_inputs(T, H, N, np.float32, seed=T + H)
    S_in = args[0].copy()
    S, y = prefill().wkv_recurrent(*args, threads=threads)
    assert rel_err(y, y_ref) < 2e-5 and rel_err(S, S_ref) < 2e-5     # as test_chunked's float32
    assert np.array_equal(args[0], S_in)                      # the input state is not modified


def test_share_runs_every_task_once_and_reraises():
    done = []
    prefill().share([lambda i=i: done.append(i) for i in range(37)], threads=2)
    assert sorted(done) == list(range(37))

    def fails():
        raise ValueError("task failed")
    with pytest.raises(ValueError, match="task failed"):
        prefill().share([fails] + [lambda: None] * 5, threads=2)


# ---- the whole prefill ---------------------------------------------------------------------------

# Float32 against float64: every op rounds to float32 (~6e-8 relative) and the errors add up over
# C- and F-long products, L layers and T steps of the WKV recurrence. Measured (max over x and the
# three state tensors, both storages, 1 and 2 threads): 3e-7..8e-7 at T=1, 1e-6..3e-6 at T=7,
# 3e-6..7.4e-6 at T=100. TOL_F32 (conftest: 5e-5, the float32 tolerance against the official
# package) leaves >6x headroom at T=100 and is ~1000x below what a wrong step does. bf16 storage
# is compared with the reference on the same (rounded) weights, so it meets the same tolerance.
SIZES = [  # L, C, N, V, ranks, deep_embed
    (3, 192, 64, 1001, OFFICIAL_RANKS, False),     # 3 heads, the official rank pattern
    (3, 256, 64, 500, (32, 16, 8, 48), False),     # unequal ranks of another size
    (1, 96, 32, 301, None, False),                 # one layer: no value residual
    (2, 128, 32, 200, None, True),                 # DeepEmbed
]


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
@pytest.mark.parametrize("L, C, N, V, ranks, deep", SIZES)
def test_prefill_matches_float64(L, C, N, V, ranks, deep, storage):
    from tinyrwkv.backends.numba_cpu import RWKV7Numba
    w = make_weights(L, C, V, head_size=N, ranks=ranks, deep_embed=deep, seed=L * C)
    model = RWKV7Numba(w, storage=storage)
    ref = M.RWKV7(model.stored_tensors(), dtype="float64")     # the weights it really computes with
    init = random_state(ref.config, seed=C)
    ids = np.random.default_rng(V).integers(0, V, 100)
    for T in (1, 7, 100):
        x_ref, s_ref = ref.forward_seq(ids[:T], ref.check_state(init))
        x, s = model.forward_seq(ids[:T], model.check_state(init))
        assert x.dtype == np.float32 and s.wkv.dtype == np.float32
        errors = {"x": rel_err(x, x_ref)}
        errors.update({n: rel_err(getattr(s, n), getattr(s_ref, n))
                       for n in ("att_shift", "wkv", "ffn_shift")})
        assert max(errors.values()) < TOL_F32, (T, errors)
    # and through the public API, continuing from the returned state
    logits_ref, s_ref = ref.forward(ids[:60], init, full_output=True)
    logits, s = model.forward(ids[:60], init, full_output=True)
    assert rel_err(logits, logits_ref) < TOL_F32
    logits_ref, _ = ref.forward(ids[60:], s_ref)
    logits, _ = model.forward(ids[60:], s)
    assert rel_err(logits, logits_ref) < TOL_F32


def test_fused_path_equals_reference_composition():
    """Asking for the intermediates (acts) takes the reference's composition (model.block with this
    backend's WKV operator); both paths compute the same function."""
    from tinyrwkv.backends.numba_cpu import RWKV7Numba
    w = make_weights(2, 128, 300, ranks=(16, 16, 8, 24), seed=7)
    model = RWKV7Numba(w)
    ids = model.check_ids(np.random.default_rng(7).integers(0, 300, 40))
    init = random_state(model.config, seed=7)
    fused, s_fused = model.forward_seq(ids, model.check_state(init))
    acts = {}
    composed, s_composed = model.forward_seq(ids, model.check_state(init), acts=acts)
    assert "L1" in acts and "ln0" in acts
    assert rel_err(fused, composed) < TOL_F32 and rel_err(s_fused.wkv, s_composed.wkv) < TOL_F32


def test_one_and_two_threads_agree():
    """The Numba kernels compute each position (and each WKV head) on one thread in a fixed order,
    but a matrix product is cut into one BLAS call per task, and OpenBLAS may round a slice of a
    product differently from the whole, so 1 and 2 threads agree within float32 rounding, not
    necessarily bit for bit. T=300 > C=256: the time-mix products are cut by positions, the
    channel-mix key by features (`linear_tasks`), both against the float64 reference too."""
    import numba
    from tinyrwkv.backends.numba_cpu import RWKV7Numba, set_threads
    if numba.config.NUMBA_NUM_THREADS < 2:
        pytest.skip("one CPU: nothing to compare")
    w = make_weights(3, 256, 500, ranks=OFFICIAL_RANKS, seed=8)
    model = RWKV7Numba(w, threads=1)
    ref = M.RWKV7(w, dtype="float64")
    ids = np.random.default_rng(8).integers(0, 500, 300)
    init = random_state(model.config, seed=8)
    try:
        one, s_one = model.forward(ids, init, full_output=True)
        set_threads(2)
        two, s_two = model.forward(ids, init, full_output=True)
    finally:
        set_threads(numba.config.NUMBA_NUM_THREADS)
    assert rel_err(two, one) < 1e-5 and rel_err(s_two.wkv, s_one.wkv) < 1e-5
    want, s_want = ref.forward(ids, init, full_output=True)
    assert rel_err(two, want) < TOL_F32 and rel_err(s_two.wkv, s_want.wkv) < TOL_F32
