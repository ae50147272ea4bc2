"""The fused decode step (tinyrwkv/backends/numba_decode.py) against the float64 reference."""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.synthetic import make_weights

from conftest import TOL_F32, have, numba_model, on_threads, random_state, rel_err, run_tokens

pytestmark = pytest.mark.skipif(not have("numba"), reason="numba is not installed")

TOKENS = 20
OFFICIAL_RANKS = (64, 64, 32, 128)     # (Dw, Da, Dv, Dg) of the 0.1B release: unequal on purpose


def assert_close(model, ref, ids, init, tol):
    got, s_got = run_tokens(model, ids, init)
    want, s_want = run_tokens(ref, ids, init)
    assert got.dtype == np.float32 and s_got.wkv.dtype == np.float32
    errors = {"logits": rel_err(got, want)}
    errors.update({n: rel_err(getattr(s_got, n), getattr(s_want, n))
                   for n in ("att_shift", "wkv", "ffn_shift")})
    assert max(errors.values()) < tol, errors


# Float32 against float64: every op rounds to float32 (~6e-8 relative) and the errors add up over
# C- and F-long dot products, L layers and 20 steps of the WKV recurrence; the per-kernel path
# meets TOL_F32 (conftest) for the same reason, and the fused step computes the same sums.
# Measured (max over logits and the three state tensors): 1.3e-6..1.9e-6 float32, 1.8e-6 bf16
# storage on rounded weights: TOL_F32 = 5e-5 leaves >25x headroom, ~1000x below a real bug.
@pytest.mark.parametrize("L, C, N, V, ranks", [
    (3, 256, 64, 1000, OFFICIAL_RANKS),      # official rank pattern; products, heads in parallel
    (2, 512, 64, 500, OFFICIAL_RANKS),       # and the LoRAs too (numba_decode.LORA_PARALLEL_FROM)
    (1, 96, 32, 301, None),                  # one layer (no value residual); awkward width
    (3, 96, 32, 65536, (32, 16, 8, 48)),     # a World-sized head
])
def test_fused_decode_matches_float64(L, C, N, V, ranks):
    w = make_weights(L, C, V, head_size=N, ranks=ranks, seed=L + C)
    model = numba_model(w)
    assert model.decode == "fused"
    ids = np.random.default_rng(V).integers(0, V, TOKENS)
    init = random_state(model.config, seed=C)
    before = init.copy()
    assert_close(model, tinyrwkv.RWKV7(w, dtype="float64"), ids, init, TOL_F32)
    assert np.array_equal(init.wkv, before.wkv)                     # the caller's state is kept
    # the hidden-vector form (forward_one, used by mode="recurrent") takes the fused path too
    h_fused, _ = model.hidden(ids[:5], init, mode="recurrent")
    h_ref, _ = tinyrwkv.RWKV7(w, dtype="float64").hidden(ids[:5], init, mode="recurrent")
    assert rel_err(h_fused, h_ref) < TOL_F32


def test_fused_decode_bf16_storage():
    """bf16 storage against the float64 model on the same bf16-rounded weights: the rounding is
    then part of both models, so what is left is float32 arithmetic and the same tolerance holds."""
    from tinyrwkv.backends.numba_cpu import BIG_MATRICES, bf16_bits, widen
    w = make_weights(3, 256, 1000, ranks=OFFICIAL_RANKS, seed=5)
    rounded = {k: widen(bf16_bits(a)) if k.endswith(BIG_MATRICES) else a for k, a in w.items()}
    model = numba_model(w, storage="bfloat16")
    assert model.decode == "fused" and model._decode_weights.Wr[0].dtype == np.uint32
    ids = np.random.default_rng(1).integers(0, 1000, TOKENS)
    assert_close(model, tinyrwkv.RWKV7(rounded, dtype="float64"), ids,
                 random_state(model.config, seed=2), TOL_F32)


@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_fused_decode_is_bit_identical_across_threads(storage):
    """Every output row of a matrix-vector product, every WKV head and every LoRA chunk is one
    thread's sequential loop, whatever the thread count (threads only share out whole rows, heads
    and chunks; the LoRA chunks' sums are added in a fixed order), so 1 and 2 threads give the
    same bits, not merely close ones. C = 512: every one of them runs its parallel branch."""
    w = make_weights(2, 512, 500, ranks=OFFICIAL_RANKS, seed=3)
    model = numba_model(w, storage=storage)
    from tinyrwkv.backends import numba_decode
    assert 2 * 512 * sum(OFFICIAL_RANKS) >= numba_decode.LORA_PARALLEL_FROM
    ids = np.random.default_rng(2).integers(0, 500, 8)
    init = random_state(model.config, seed=4)
    results = on_threads(lambda: run_tokens(model, ids, init))
    (l1, s1), (l2, s2) = results
    assert np.array_equal(l1, l2)
    assert all(np.array_equal(getattr(s1, n), getattr(s2, n)) for n in ("att_shift", "wkv", "ffn_shift"))


def test_per_kernel_path_stays_reachable_and_agrees():
    w = make_weights(2, 128, 300, seed=7)
    fused, per_kernel = numba_model(w), numba_model(w, decode="per-kernel")
    assert (fused.decode, per_kernel.decode) == ("fused", "per-kernel")
    ids = np.random.default_rng(3).integers(0, 300, 6)
    init = random_state(fused.config, seed=1)
    a, sa = run_tokens(fused, ids, init)
    b, sb = run_tokens(per_kernel, ids, init)
    assert rel_err(a, b) < TOL_F32 and rel_err(sa.wkv, sb.wkv) < TOL_F32
    with pytest.raises(ValueError, match="decode must be"):
        numba_model(w, decode="fast")


def test_deep_embed_keeps_the_per_kernel_path():
    w = make_weights(2, 128, 300, deep_embed=True, seed=8)
    model = numba_model(w)
    assert model.decode == "per-kernel"
    ids = np.random.default_rng(4).integers(0, 300, 4)
    init = random_state(model.config, seed=3)
    got, _ = run_tokens(model, ids, init)
    want, _ = run_tokens(tinyrwkv.RWKV7(w, dtype="float64"), ids, init)
    assert rel_err(got, want) < TOL_F32
