"""The Numba backend (tinyrwkv/backends/numba_cpu.py) against the NumPy reference and the official outputs."""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import model as M
from tinyrwkv.synthetic import make_weights

from conftest import FIXTURES, TOL_F32, have, random_state, rel_err
from test_chunked import wkv_inputs

pytestmark = pytest.mark.skipif(not have("numba"), reason="numba is not installed")

# bf16 storage of float32 weights rounds each weight to 8 significant bits (relative error up to
# 2^-9 = 0.2%); summed over C-long products and layers that moves logits by ~1e-2 of their std
# (measured 1.4e-2..1.5e-2 on synthetic models). 5e-2 bounds that; it is the documented cost.
TOL_BF16_OF_F32 = 5e-2


def fast():
    from tinyrwkv.backends import numba_cpu
    return numba_cpu


@pytest.mark.parametrize("T, H, N", [(1, 1, 64), (2, 3, 64), (17, 2, 32), (64, 3, 16), (5, 4, 24)])
def test_wkv_seq_kernel_matches_reference(T, H, N):
    S_ref, y_ref = M.wkv_seq(*wkv_inputs(T, H, N, np.float64, seed=T * H + N))
    args = wkv_inputs(T, H, N, np.float32, seed=T * H + N)
    S_in = args[0].copy()
    S, y = fast().wkv_seq(*args)
    assert rel_err(y, y_ref) < 2e-5 and rel_err(S, S_ref) < 2e-5
    assert np.array_equal(args[0], S_in)                      # the input state is not modified


@pytest.mark.parametrize("shape", [(37, 30), (16, 64), (3, 6), (300, 128)])
def test_matvec_float32_and_bf16(shape):
    f = fast()
    rng = np.random.default_rng(sum(shape))
    W = rng.standard_normal(shape).astype(np.float32)
    x = rng.standard_normal(shape[1]).astype(np.float32)
    ref = W.astype(np.float64) @ x
    assert rel_err(f.matvec(W, x), ref) < 1e-5
    bits = f.bf16_bits(W)
    assert bits.dtype == np.uint16
    ref16 = f.widen(bits).astype(np.float64) @ x              # the bf16 weights, exactly
    assert rel_err(f.matvec(bits, x), ref16) < 1e-5
    # round to nearest even, like torch: every widened value is within half a bf16 step
    assert np.all(np.abs(f.widen(bits) - W) <= np.abs(W) * 2.0 ** -8)


@pytest.mark.parametrize("L, C, N, V, deep", [(1, 64, 64, 97, False), (2, 128, 32, 301, False),
                                              (3, 192, 64, 1001, True), (2, 96, 16, 50, False)])
def test_numba_model_matches_numpy(L, C, N, V, deep):
    """Sequence and token-by-token forms, from a random non-zero state and continuing from the
    returned one, against the float64 reference."""
    w = make_weights(L, C, V, head_size=N, deep_embed=deep, seed=L + C)
    ref = tinyrwkv.RWKV7(w, dtype="float64")
    model = fast().RWKV7Numba(w)
    init = random_state(ref.config, seed=C)
    ids = np.random.default_rng(V).integers(0, V, 19)
    before = init.copy()
    for mode in ("sequence", "recurrent"):
        lr, sr = ref.forward(ids[:11], init, full_output=True, mode=mode)
        ln, sn = model.forward(ids[:11], init, full_output=True, mode=mode)
        assert ln.dtype == np.float32 and sn.wkv.dtype == np.float32
        assert rel_err(ln, lr) < TOL_F32
        lr2, sr2 = ref.forward(ids[11:], sr, mode=mode)
        ln2, sn2 = model.forward(ids[11:], sn, mode=mode)
        assert rel_err(ln2, lr2) < TOL_F32
        for name in ("att_shift", "wkv", "ffn_shift"):
            assert rel_err(getattr(sn2, name), getattr(sr2, name)) < TOL_F32
    assert all(np.array_equal(getattr(init, n), getattr(before, n)) for n in ("att_shift", "wkv", "ffn_shift"))


@pytest.mark.parametrize("weights", ["float32", "bfloat16"])
@pytest.mark.parametrize("name", ["synthetic_L3_C256", "synthetic_de_L3_C256"])
def test_numba_on_the_official_fixtures(name, weights):
    """The fixtures are bf16 checkpoints, so bf16 storage holds exactly the same weights: both
    storage modes must meet the float32 tolerance against the official outputs."""
    pth = FIXTURES / f"{name}.pth"
    if not pth.exists():
        pytest.skip(f"{pth} not found")
    ref = np.load(FIXTURES / f"{name}_official_cpufp32.npz")
    model = tinyrwkv.load(pth, backend="numba", storage=weights)
    assert model.backend == ("numba-bf16" if weights == "bfloat16" else "numba")
    toks = ref["toks"]
    logits, state = model.forward(toks[:30], full_output=True)
    assert rel_err(logits, ref["seq_logits"]) < TOL_F32
    logits, state = model.forward(toks[30:], state)
    assert rel_err(logits, ref["seq2_last"]) < TOL_F32
    assert rel_err(state.wkv, ref["seq_state_att"]) < TOL_F32
    logits, state = model.forward(toks, full_output=True, mode="recurrent")
    assert rel_err(logits, ref["one_logits"]) < TOL_F32
    assert rel_err(state.wkv, ref["one_state_att"]) < TOL_F32


def test_bf16_storage_cost_on_float32_weights():
    """float32 weights rounded to bf16: the accuracy cost, measured against float32 storage."""
    w = make_weights(3, 256, 512, seed=11)
    ids = np.random.default_rng(3).integers(0, 512, 40)
    l32, _ = fast().RWKV7Numba(w).forward(ids, full_output=True)
    l16, _ = fast().RWKV7Numba(w, storage="bfloat16").forward(ids, full_output=True)
    err = rel_err(l16, l32)
    print(f"bf16 storage of float32 weights: max|dlogit|/std = {err:.2e}")
    assert 1e-4 < err < TOL_BF16_OF_F32          # > 1e-4: the weights really were rounded


def test_backend_errors(tmp_path):
    from tinyrwkv.formats import save_safetensors
    path = tmp_path / "m.safetensors"
    save_safetensors(path, make_weights())
    with pytest.raises(ValueError, match="float32"):
        tinyrwkv.load(path, backend="numba", dtype="float64")
    with pytest.raises(ValueError, match="backend must be"):
        tinyrwkv.load(path, backend="cuda")
    assert tinyrwkv.load(path).backend == "numba"               # the default where numba exists
    assert tinyrwkv.load(path, dtype="float64").backend == "numpy"


def test_wkv_option_is_honoured():
    """wkv_method="chunked" runs the NumPy chunked form inside the numba backend, not silently
    the kernel; "auto" runs the kernel. Seen through the steps the backend passes to model.block."""
    from dataclasses import replace
    w = make_weights(2, 128, 101, seed=2)
    ids = np.random.default_rng(1).integers(0, 101, 20)
    chunked_model, kernel_model = fast().RWKV7Numba(w, wkv_method="chunked"), fast().RWKV7Numba(w)
    assert chunked_model.sequence_wkv is M.wkv_chunked
    assert kernel_model.sequence_wkv is fast().wkv_seq
    chunked, _ = chunked_model.forward(ids, full_output=True)
    kernel, _ = kernel_model.forward(ids, full_output=True)
    assert rel_err(chunked, kernel) < TOL_F32
    used = []                                  # an operator passed in steps is the one that runs

    def spy(*args):
        used.append(1)
        return M.wkv_seq(*args)
    kernel_model.forward_seq(kernel_model.check_ids(ids), kernel_model.zero_state(),
                             steps=replace(M.STEPS, wkv=spy))
    assert len(used) == 2                      # once per layer
