"""The NumPy forward pass against the official package, against itself in float64, and its API."""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import model as M
from tinyrwkv.synthetic import make_weights

from conftest import FIXTURES, TOL_F32, have, needs_official, rel_err, run_official

FIXTURE_NAMES = ["synthetic_L3_C256", "synthetic_de_L3_C256"]


def fixture(name):
    pth = FIXTURES / f"{name}.pth"
    if not pth.exists():
        pytest.skip(f"fixture {pth} not found (../shared/reference is laid beside the checkout)")
    return pth, dict(np.load(FIXTURES / f"{name}_official_cpufp32.npz"))


# ---- the stored official outputs (rwkv 0.8.32, cpu fp32; see docs/formats.md §9) ----

@pytest.mark.parametrize("wkv", ["recurrent", "chunked"])
@pytest.mark.parametrize("dtype", ["float32", "float64"])
@pytest.mark.parametrize("name", FIXTURE_NAMES)
def test_fixture_matches_official(name, dtype, wkv):
    pth, ref = fixture(name)
    model = tinyrwkv.load(pth, dtype=dtype, wkv_method=wkv, backend="numpy")
    toks = ref["toks"]
    logits, state = model.forward(toks[:30], full_output=True)
    errors = {"seq_logits": rel_err(logits, ref["seq_logits"])}
    logits, state = model.forward(toks[30:], state)
    errors["seq2_last"] = rel_err(logits, ref["seq2_last"])
    errors["seq_state_att"] = rel_err(state.wkv, ref["seq_state_att"])
    errors["seq_state_xa"] = rel_err(state.att_shift, ref["seq_state_xa"])
    errors["seq_state_xf"] = rel_err(state.ffn_shift, ref["seq_state_xf"])
    logits, state = model.forward(toks, full_output=True, mode="recurrent")
    errors["one_logits"] = rel_err(logits, ref["one_logits"])
    errors["one_state_att"] = rel_err(state.wkv, ref["one_state_att"])
    print(name, dtype, wkv, {k: f"{v:.2e}" for k, v in errors.items()})
    assert max(errors.values()) < TOL_F32, errors


def test_tolerance_catches_a_small_bug():
    """The tolerance is tight enough to fail on a subtle bug: GroupNorm eps 1e-5 instead of 64e-5
    (the model with that one step replaced, model.Steps)."""
    from dataclasses import replace
    pth, ref = fixture("synthetic_L3_C256")
    tensors = tinyrwkv.read_checkpoint(pth, dtype="float32")
    wrong_eps = lambda x, w, b, n: M.group_norm(x, w, b, n, eps=1e-5)
    model = tinyrwkv.RWKV7(tensors, steps=replace(M.STEPS, group_norm=wrong_eps))
    logits, _ = model.forward(ref["toks"][:30], full_output=True)
    assert rel_err(logits, ref["seq_logits"]) > 10 * TOL_F32
    right, _ = tinyrwkv.RWKV7(tensors).forward(ref["toks"][:30], full_output=True)
    assert rel_err(right, ref["seq_logits"]) < TOL_F32


def test_old_keyword_names_still_work_with_a_warning(tmp_path):
    """load(weights=, wkv=) are the old names of storage= and wkv_method= (one more release)."""
    from tinyrwkv.formats import save_safetensors
    path = tmp_path / "m.safetensors"
    save_safetensors(path, make_weights(1, 64, 97, seed=1))
    with pytest.warns(DeprecationWarning, match="storage"):
        old = tinyrwkv.load(path, backend="numpy", weights="float32")
    with pytest.warns(DeprecationWarning, match="wkv_method"):
        assert tinyrwkv.load(path, backend="numpy", wkv="chunked").wkv_method == "chunked"
    with pytest.raises(ValueError, match="disagree"):
        tinyrwkv.load(path, backend="numpy", wkv="chunked", wkv_method="recurrent")
    assert old.storage == "float32"


# ---- live parity with the official package on fresh synthetic checkpoints ----

# (layers, width, vocab, storage dtype): layers 1-4, widths 64-512 (head size 64), odd vocabularies.
SHAPES = [(1, 64, 97, "float32"), (2, 128, 1001, "bfloat16"), (3, 192, 257, "float16"),
          (4, 512, 5003, "bfloat16")]


def save_pth(weights, path, storage):
    import torch
    torch.save({k: torch.tensor(v).to(getattr(torch, storage)) for k, v in weights.items()}, path)


def random_state(config, rng):
    s = tinyrwkv.State.zeros(config)
    s.att_shift[:] = rng.standard_normal(s.att_shift.shape)      # LN outputs: O(1)
    s.ffn_shift[:] = rng.standard_normal(s.ffn_shift.shape)
    s.wkv[:] = 0.3 * rng.standard_normal(s.wkv.shape)
    return s


@needs_official
@pytest.mark.parametrize("deep_embed", [False, True], ids=["x070", "deepembed"])
def test_live_parity_with_official(tmp_path, deep_embed):
    """Sequence mode, continuation from the returned state and token-by-token mode, all from a
    random non-zero initial state, on several shapes: official rwkv 0.8.32 cpu fp32 vs ours."""
    rng = np.random.default_rng(1234 + deep_embed)
    shapes = SHAPES if not deep_embed else [(2, 128, 301, "bfloat16"), (3, 64, 77, "float32")]
    jobs, cases = [], []
    for n, (L, C, V, storage) in enumerate(shapes):
        weights = make_weights(L, C, V, deep_embed=deep_embed, seed=int(rng.integers(1 << 30)))
        pth = tmp_path / f"m{n}.pth"
        save_pth(weights, pth, storage)
        model = tinyrwkv.load(pth, backend="numpy")
        init = random_state(model.config, rng)
        tinyrwkv.save_state(init, tmp_path / f"s{n}.npz")
        T = int(rng.integers(9, 24))
        ids = rng.integers(0, V, T).tolist()
        split = int(rng.integers(2, T - 1))
        jobs.append(dict(pth=str(pth), ids=ids, split=split, init_state=str(tmp_path / f"s{n}.npz"),
                         out=str(tmp_path / f"o{n}.npz")))
        cases.append((model, init, ids, split))
    for (model, init, ids, split), ref in zip(cases, run_official(jobs, tmp_path, deep_embed)):
        backends = [model]
        if have("numba"):      # the compiled backend, held to the same official outputs
            backends.append(tinyrwkv.load(model.path, backend="numba"))
        for m in backends:
            before = init.copy()
            logits, state = m.forward(ids[:split], init, full_output=True)
            errors = {"seq_logits": rel_err(logits, ref["seq_logits"])}
            logits, state = m.forward(ids[split:], state)
            errors["cont_logits"] = rel_err(logits, ref["cont_logits"])
            for name in ("att_shift", "wkv", "ffn_shift"):
                errors["seq_" + name] = rel_err(getattr(state, name), ref["seq_" + name])
            logits, state = m.forward(ids, init, full_output=True, mode="recurrent")
            errors["one_logits"] = rel_err(logits, ref["one_logits"])
            errors["one_wkv"] = rel_err(state.wkv, ref["one_wkv"])
            c = m.config
            print(f"L{c.n_layer} C{c.n_embd} V{c.vocab_size} {c.variant} {m.backend}:",
                  {k: f"{v:.2e}" for k, v in errors.items()})
            assert max(errors.values()) < TOL_F32, errors
            for name in ("att_shift", "wkv", "ffn_shift"):      # the state passed in is untouched
                assert np.array_equal(getattr(init, name), getattr(before, name))


# ---- float64: the two forms, chunking, and float32's error ----

@pytest.fixture(scope="module", params=[False, True], ids=["x070", "deepembed"])
def weights(request):
    return make_weights(n_layer=3, n_embd=192, vocab_size=211, deep_embed=request.param, seed=7)


def test_float64_forms_agree_to_machine_precision(weights):
    model = tinyrwkv.RWKV7(weights, dtype="float64")
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 211, 37)
    init = random_state(model.config, rng)
    seq, s1 = model.forward(ids, init, full_output=True)
    one, s2 = model.forward(ids, init, full_output=True, mode="recurrent")
    # Same math, different summation order (matrix-matrix vs matrix-vector products): ~1e-15.
    assert rel_err(seq, one) < 1e-12
    assert rel_err(s1.wkv, s2.wkv) < 1e-12


def test_prompt_in_pieces_equals_one_piece(weights):
    model = tinyrwkv.RWKV7(weights, dtype="float64")
    ids = np.random.default_rng(1).integers(0, 211, 41)
    whole, s_whole = model.forward(ids)
    state = None
    for piece in (ids[:1], ids[1:17], ids[17:18], ids[18:]):
        part, state = model.forward(piece, state)
    assert rel_err(part, whole) < 1e-12
    assert rel_err(state.wkv, s_whole.wkv) < 1e-12


def test_float32_error_against_float64(weights):
    """float32 vs the float64 oracle: the rounding budget of float32 (see conftest.TOL_F32)."""
    ids = np.random.default_rng(2).integers(0, 211, 50)
    l32, s32 = tinyrwkv.RWKV7(weights, "float32").forward(ids, full_output=True)
    l64, s64 = tinyrwkv.RWKV7(weights, "float64").forward(ids, full_output=True)
    assert l32.dtype == np.float32 and l64.dtype == np.float64
    assert s32.wkv.dtype == np.float32 and s64.wkv.dtype == np.float64
    r32, rs32 = tinyrwkv.RWKV7(weights, "float32").forward(ids[:3], full_output=True, mode="recurrent")
    assert r32.dtype == np.float32 and rs32.wkv.dtype == np.float32   # no silent float64 anywhere
    err = rel_err(l32, l64)
    assert 0 < err < TOL_F32      # > 0: the float32 path really computes in float32


# ---- API contract ----

def test_config_read_from_weights():
    w = make_weights(n_layer=2, n_embd=128, vocab_size=300, ranks=(32, 64, 32, 96), deep_embed=True)
    c = tinyrwkv.RWKV7(w).config
    assert (c.n_layer, c.n_embd, c.n_head, c.head_size, c.vocab_size, c.dim_ffn) == (2, 128, 2, 64, 300, 512)
    assert (c.d_decay, c.d_aaa, c.d_mv, c.d_gate, c.d_deepembed) == (32, 64, 32, 96, 32)
    assert c.variant == "x070-deepembed"


def test_n_params_matches_the_published_formula():
    """RWKV-LM README: 2VC + 4C + L(19C + 12C^2 + 2C(Dw+Da+Dv+Dg)), which counts layer 0's unused
    v0/v1/v2 too; we count only what the forward pass reads."""
    L, C, V = 3, 128, 300
    Dw, Da, Dv, Dg = 32, 64, 32, 96
    model = tinyrwkv.RWKV7(make_weights(L, C, V, ranks=(Dw, Da, Dv, Dg)))
    published = 2 * V * C + 4 * C + L * (19 * C + 12 * C * C + 2 * C * (Dw + Da + Dv + Dg))
    assert model.n_params == published - (C + 2 * C * Dv)


@pytest.mark.parametrize("ids, bad", [([-1], -1), ([300], 300), ([5, 10**9, 7], 10**9)])
def test_bad_token_ids_are_named(ids, bad):
    model = tinyrwkv.RWKV7(make_weights(vocab_size=300))
    with pytest.raises(ValueError, match=f"token id {bad} is out of range"):
        model.forward(ids)


def test_non_integer_and_empty_ids_are_refused():
    model = tinyrwkv.RWKV7(make_weights(vocab_size=300))
    with pytest.raises(ValueError, match="integers"):
        model.forward([1.5])
    with pytest.raises(ValueError, match="non-empty"):
        model.forward([])


def test_state_save_load_roundtrip(tmp_path):
    model = tinyrwkv.RWKV7(make_weights())
    _, state = model.forward([1, 2, 3])
    tinyrwkv.save_state(state, tmp_path / "s.npz")
    back = tinyrwkv.load_state(tmp_path / "s.npz", model.config)
    for name in ("att_shift", "wkv", "ffn_shift"):
        assert np.array_equal(getattr(back, name), getattr(state, name))
    a, _ = model.forward([4], state)
    b, _ = model.forward([4], back)
    assert np.array_equal(a, b)
    other = tinyrwkv.RWKV7(make_weights(n_layer=3)).config
    with pytest.raises(ValueError, match="shape"):
        tinyrwkv.load_state(tmp_path / "s.npz", other)
    with pytest.raises(ValueError, match=r"state.att_shift has shape \(2, 128\), this model needs \(3, 128\)"):
        tinyrwkv.RWKV7(make_weights(n_layer=3)).forward([1], state)
    np.savez(tmp_path / "junk.npz", x=np.zeros(3))
    with pytest.raises(ValueError, match="not a tinyrwkv state"):
        tinyrwkv.load_state(tmp_path / "junk.npz")


def test_state_layout_is_value_by_key():
    """state.wkv[l, h, i, j]: i = value, j = key. Feed one token into a zero state of a model whose
    layer-0 decay and removal terms we can predict: the first update is exactly v k^T."""
    w = make_weights(n_layer=1, n_embd=64, vocab_size=50)
    model = tinyrwkv.RWKV7(w, dtype="float64")
    _, state = model.forward([3])
    # Recompute layer 0's k_tilde and v for token 3 with the module's own building blocks.
    p = model.blocks[0]
    x = M.layer_norm(M.layer_norm(model.emb[3], *model.ln0), p["ln1.weight"], p["ln1.bias"])
    r, dec, k, v, kh, a, g, _ = M.time_mix_inputs(x, np.zeros(64), None, p, 0, 1)
    assert np.allclose(state.wkv[0, 0], np.outer(v, k), rtol=1e-12, atol=1e-15)
    assert np.allclose(state.wkv_key_value()[0, 0], np.outer(k, v), rtol=1e-12, atol=1e-15)


def test_embed_is_the_hidden_state_the_head_reads():
    model = tinyrwkv.RWKV7(make_weights(), dtype="float64")
    ids = [5, 6, 7, 8]
    e = model.embed(ids, normalize=False)
    logits, _ = model.forward(ids)
    assert np.allclose(e @ model.head.T, logits, rtol=1e-12, atol=1e-12)
    unit = model.embed(ids)
    assert np.isclose(np.linalg.norm(unit), 1.0) and np.allclose(unit, e / np.linalg.norm(e))
    mean = model.embed(ids, pool="mean", normalize=False)
    assert np.allclose(mean, model.hidden(ids)[0].mean(axis=0))
    with pytest.raises(ValueError):
        model.embed(ids, pool="max")
