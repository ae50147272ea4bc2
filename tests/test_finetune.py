"""Fine-tuning's gradients: the LoRA factors and the initial WKV state (state tuning) against
central finite differences in float64, and the pieces they rest on (the merged matrix is
merge-lora's; a frozen model costs no weight gradient; the initial state is the one inference
starts from).

Tolerances: as tests/test_train.py (the same model, the same float64 arithmetic): central
differences with step 1e-4 have a rounding noise of ~1e-11 here, so a sampled entry passes when
|numeric - analytic| <= 1e-5 * max|gradient of that tensor| + 1e-9. A wrong factor (s, a
transpose, a missing term) gives errors of the order of the gradient itself.
"""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import train
from tinyrwkv.formats.lora import merge_lora
from tinyrwkv.synthetic import make_weights

FD_STEP = 1e-4
TOL_FD = 1e-5
FD_FLOOR = 1e-9


def tiny(L=2, C=32, N=16, V=37, seed=0):
    """Unequal LoRA ranks and F != 4C, as official shapes have."""
    return make_weights(L, C, V, head_size=N, dim_ffn=48, ranks=(8, 6, 4, 10), seed=seed,
                        dtype=np.float64)


def batch(V, B=2, T=19, seed=0):
    rng = np.random.default_rng(seed)
    return rng.integers(0, V, (B, T)), rng.integers(0, V, (B, T))


def check_fd(f, tensors, grads, rng, per_tensor=3):
    """Central differences of the scalar f(tensors) at sampled entries of every tensor, against
    grads. Returns the worst error / (gradient scale) per key."""
    worst = {}
    for key, value in tensors.items():
        g = grads[key]
        scale = max(np.abs(g).max(), 1e-8)
        for flat in rng.choice(value.size, size=min(per_tensor, value.size), replace=False):
            idx = np.unravel_index(flat, value.shape)
            plus, minus = dict(tensors), dict(tensors)
            plus[key], minus[key] = value.copy(), value.copy()
            plus[key][idx] += FD_STEP
            minus[key][idx] -= FD_STEP
            fd = (f(plus) - f(minus)) / (2 * FD_STEP)
            worst[key] = max(worst.get(key, 0.0), (abs(fd - g[idx]) - FD_FLOOR) / scale)
    return worst


def random_lora(base, rank, seed):
    """An adapter part-way through training: B non-zero (at init it is zero, which would make
    dL/dA vanish and test nothing)."""
    rng = np.random.default_rng(seed)
    lora = train.init_lora(base, rank, seed=seed, dtype=np.float64)
    for key in lora:
        if key.endswith(".lora_B"):
            lora[key] = rng.standard_normal(lora[key].shape) * 0.05
    return lora


def test_lora_factor_gradients_match_finite_differences():
    base = tiny()
    ids, targets = batch(37)
    alpha = 16.0
    lora = random_lora(base, rank=4, seed=3)
    lora["blocks.1.ln2.weight"] = base["blocks.1.ln2.weight"] + 0.1   # a part trained in full
    assert len([k for k in lora if k.endswith(".lora_A")]) == 2 * len(train.LORA_TARGETS)
    loss, grads = train.lora_loss_and_grad(base, lora, alpha, ids, targets)
    assert set(grads) == set(lora)
    assert all(grads[k].shape == lora[k].shape for k in lora)
    assert all(np.abs(grads[k]).max() > 0 for k in lora)

    def f(tensors):
        return train.lora_loss_and_grad(base, tensors, alpha, ids, targets)[0]

    worst = check_fd(f, lora, grads, np.random.default_rng(4), per_tensor=2)
    print(f"LoRA factors, worst relative error over {len(worst)} tensors: "
          f"{max(worst.values()):.1e}")
    assert not {k: e for k, e in worst.items() if e > TOL_FD}


def test_lora_loss_is_the_merged_model_loss():
    """The model the adapter trains is exactly what merge-lora writes (formats/lora.py): the loss
    of the adapter equals the loss of the merged weights, and at init (B = 0) the base's."""
    base = tiny(seed=5)
    ids, targets = batch(37, seed=6)
    fresh = train.init_lora(base, 8, seed=0, dtype=np.float64)
    assert train.lora_loss_and_grad(base, fresh, 32, ids, targets)[0] == \
        train.loss_and_grad(base, ids, targets, want=())[0]
    lora = random_lora(base, 8, seed=7)
    merged = {k: np.asarray(v, np.float64) for k, v in merge_lora(base, lora, 32).items()}
    a = train.lora_loss_and_grad(base, lora, 32, ids, targets)[0]
    b = train.loss_and_grad(merged, ids, targets, want=())[0]
    assert abs(a - b) < 1e-6 * abs(b)          # merge_lora rounds the merged matrices to float32


def test_state_gradient_matches_finite_differences():
    """dL/dS0 of every layer's initial WKV state, from a non-zero state."""
    base = tiny(seed=8)
    ids, targets = batch(37, B=3, T=21, seed=9)
    rng = np.random.default_rng(10)
    states = {k: rng.standard_normal(v.shape) * 0.3 for k, v in train.init_state(base).items()}
    want = set(states)
    loss, grads = train.loss_and_grad({**base, **states}, ids, targets, want=want)
    assert set(grads) == want and all(np.abs(g).max() > 0 for g in grads.values())

    def f(tensors):
        return train.loss_and_grad({**base, **tensors}, ids, targets, want=())[0]

    worst = check_fd(f, states, grads, rng, per_tensor=6)
    print(f"initial states, worst relative error: {max(worst.values()):.1e}")
    assert not {k: e for k, e in worst.items() if e > TOL_FD}


def test_tuned_state_is_the_inference_start():
    """Training's forward from time_state equals model.py's forward from a State whose WKV part
    is that time_state (what `load_state` / formats.lora.initial_state give inference)."""
    from tinyrwkv.formats.lora import initial_state
    base = tiny(seed=11)
    rng = np.random.default_rng(12)
    states = {k: rng.standard_normal(v.shape) * 0.3 for k, v in train.init_state(base).items()}
    ids, targets = batch(37, B=1, T=13, seed=13)
    loss = train.loss_and_grad({**base, **states}, ids, targets, want=())[0]
    model = tinyrwkv.RWKV7(base, dtype="float64")
    start = initial_state(states, model.config)
    start = type(start)(*(np.asarray(a, np.float64) for a in (start.att_shift, start.wkv,
                                                              start.ffn_shift)))
    start.wkv[:] = np.stack([states[f"blocks.{i}.att.time_state"] for i in range(2)])
    logits, _ = model.forward(ids[0], start, full_output=True)
    logp = logits - logits.max(-1, keepdims=True)
    logp -= np.log(np.exp(logp).sum(-1, keepdims=True))
    assert abs(loss + logp[np.arange(13), targets[0]].mean()) < 1e-12


def test_frozen_gradients_equal_the_full_ones():
    """`want` only skips work: the gradients it returns are the full computation's, bit for bit."""
    base = tiny(seed=14)
    ids, targets = batch(37, seed=15)
    loss, full = train.loss_and_grad(base, ids, targets)
    keys = {"blocks.1.att.key.weight", "blocks.0.ffn.value.weight", "head.weight", "emb.weight",
            "blocks.0.att.x_r"}
    loss2, some = train.loss_and_grad(base, ids, targets, want=keys)
    assert loss2 == loss and set(some) == keys
    for k in keys:
        np.testing.assert_array_equal(some[k], full[k])


def test_state_tuning_refuses_a_partial_or_misshapen_state():
    base = tiny(seed=16)
    ids, targets = batch(37, seed=17)
    states = train.init_state(base, np.float64)
    with pytest.raises(ValueError, match="time_state for 1 of 2 layers"):
        train.loss_and_grad({**base, "blocks.0.att.time_state": states["blocks.0.att.time_state"]},
                            ids, targets)
    bad = dict(states, **{"blocks.1.att.time_state": np.zeros((2, 16, 15))})
    with pytest.raises(ValueError, match="blocks.1.att.time_state is"):
        train.loss_and_grad({**base, **bad}, ids, targets)
