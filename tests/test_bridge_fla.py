"""The fla bridge (tinyrwkv/bridges/fla.py).

Three kinds of tests:
- pure Python, always: the name tables, the state conversion both ways, the calls per mode, the
  state rows kept, the config checks, the refusals before anything is imported;
- on the CPU with fla installed (flash-linear-attention 0.6.0, transformers, triton importable)
  but no GPU: fla's real model, modules, cache and loading run with its Triton kernels replaced,
  for the test only (pytest's monkeypatch, undone after each test), by torch code: fla's own
  reference functions where it has them (token_shift_ref's rule, torch_addcmul_rwkv7,
  k_update_ref, gate_output_correction_ref) and the recurrence its WKV kernels compute, written
  out. This checks the bridge's hooks, names, layouts, calls and state handling end to end, not
  fla's kernels;
- with fla and a CUDA GPU: the bridge as it runs for users, fla's kernels included.
Each skips with the reason when what it needs is missing.
"""

import json

import numpy as np
import pytest

from tinyrwkv import RWKV7, oracle
from tinyrwkv.bridges import bridge
from tinyrwkv.bridges import fla as fb
from tinyrwkv.model import State
from tinyrwkv.synthetic import make_weights


def random_state(w, seed=5, scale=0.3):
    m = RWKV7(w, dtype="float64")
    st = State.zeros(m.config, np.float32)
    rng = np.random.default_rng(seed)
    for name in ("att_shift", "wkv", "ffn_shift"):
        a = getattr(st, name)
        a[...] = scale * rng.standard_normal(a.shape)
    return st


# ------------------------------------------------------------------------------------------------
# pure Python
# ------------------------------------------------------------------------------------------------

def test_registered():
    assert bridge("fla") is fb


def test_names_are_trace_names_and_disjoint():
    observed = set(fb.HOOKED) | set(fb.DERIVED)
    assert not observed & set(fb.NOT_OBSERVED)
    assert observed | set(fb.NOT_OBSERVED) | {"state"} == set(oracle.LAYER_NAMES)
    for name in fb.RECORDED:
        assert oracle.known_name(f"L0.{name}")


def test_state_round_trip_transposes():
    w = make_weights(2, 64, 50, head_size=32)
    st = random_state(w)
    layers = fb.fla_state_arrays(st, 2, 64, 2, 32)
    assert layers[1]["recurrent_state"].shape == (1, 2, 32, 32)
    assert layers[1]["recurrent_state"].dtype == np.float32
    # fla's [key][value] is tinyrwkv's [value][key] transposed
    np.testing.assert_array_equal(layers[1]["recurrent_state"][0, 1, 3, 5], st.wkv[1, 1, 5, 3])
    np.testing.assert_array_equal(layers[0]["conv_state"][0], st.att_shift[0])
    np.testing.assert_array_equal(layers[1]["ffn_state"][0], st.ffn_shift[1])
    back = fb.state_from_fla_arrays(layers)
    for name in ("att_shift", "wkv", "ffn_shift"):
        np.testing.assert_array_equal(getattr(back, name), getattr(st, name))
        assert getattr(back, name).dtype == np.float64


def test_state_of_another_model_is_refused():
    st = random_state(make_weights(2, 64, 50, head_size=32))
    with pytest.raises(ValueError, match="state.wkv has shape"):
        fb.fla_state_arrays(st, 2, 64, 1, 64)


def test_calls_per_mode():
    assert fb.pieces(200, "chunk") == [(0, 200)]
    assert fb.pieces(3, "decode") == [(0, 1), (1, 2), (2, 3)]
    assert fb.pieces(70, "fused_recurrent") == [(0, 32), (32, 64), (64, 70)]
    calls = fb.pieces(130, "fused_recurrent", piece=63)
    assert calls == [(0, 63), (63, 126), (126, 130)]
    assert all(b - a < 64 for a, b in calls)      # fla runs its chunked kernel from 64 tokens
    with pytest.raises(ValueError, match="piece must be"):
        fb.pieces(100, "fused_recurrent", piece=64)


def test_state_rows():
    calls = fb.pieces(10, "decode")
    assert fb.kept_state_rows(10, calls, oracle.Selection()).tolist() == list(range(10))
    assert fb.kept_state_rows(10, calls, oracle.Selection(state_every=4)).tolist() == [3, 7, 9]
    assert fb.kept_state_rows(10, fb.pieces(10, "chunk"), oracle.Selection()).tolist() == [9]


def test_selection_of_names():
    sel = oracle.Selection(names=["y", "state"], layers=[1])
    got = fb.wanted_layer_names(sel, 2)
    assert got == {0: [], 1: ["state", "y"]}


def test_config_checks():
    good = {"model_type": "rwkv7", "hidden_size": 64, "value_dim": [64, 64], "attn": None,
            "norm_first": True, "hidden_act": "sqrelu"}
    assert fb.check_config(good) == []
    bad = dict(good, value_dim=[128, 128], attn={"layers": [1]}, norm_first=False)
    assert len(fb.check_config(bad)) == 3


def test_refusals_before_any_import(tmp_path):
    with pytest.raises(ValueError, match="dtype"):
        fb.record(tmp_path, [1], dtype="float64")
    with pytest.raises(ValueError, match="mode"):
        fb.record(tmp_path, [1], mode="parallel")
    with pytest.raises(ValueError, match="token ids"):
        fb.record(tmp_path, [])
    with pytest.raises(ValueError, match="piece"):
        fb.record(tmp_path, [1, 2], mode="fused_recurrent", piece=100)


def test_missing_gpu_or_package_is_a_clear_error(tmp_path):
    try:
        import torch
        if torch.cuda.is_available():
            pytest.skip("a CUDA GPU is here")
    except ImportError:
        pass
    with pytest.raises(fb.FlaError, match="pip install|CUDA|GPU"):
        fb.record(tmp_path, [1, 2])


# ------------------------------------------------------------------------------------------------
# fla's model on the CPU, its Triton kernels replaced by torch code (module docstring)
# ------------------------------------------------------------------------------------------------

def _fla_classes():
    pytest.importorskip("torch")
    pytest.importorskip("transformers", reason="fla's models need transformers")
    pytest.importorskip("triton", reason="fla imports triton")
    pytest.importorskip("fla", reason="pip install flash-linear-attention==0.6.0")
    import torch
    from fla.models.cache_utils import Cache
    from fla.models.rwkv7 import RWKV7Config, RWKV7ForCausalLM
    return torch, Cache, RWKV7Config, RWKV7ForCausalLM


@pytest.fixture
def cpu_fla(monkeypatch):
    """fla with its kernels replaced by torch code on the CPU; records which WKV kernel ran."""
    torch, Cache, RWKV7Config, RWKV7ForCausalLM = _fla_classes()
    import fla.layers.rwkv7 as layer
    import fla.models.rwkv7.modeling_rwkv7 as modeling
    import fla.modules.activations.ops as act
    from fla.ops.rwkv7.fused_addcmul import torch_addcmul_rwkv7
    from fla.ops.rwkv7.fused_k_update import k_update_ref
    from fla.ops.rwkv7.gate_output_correction import gate_output_correction_ref
    ran = []

    def token_shift(x, cu_seqlens=None, output_cache=False, cache=None):
        # fla's token shift: delta = previous - this; the first token's previous is the cache
        prev = torch.zeros_like(x[:, :1]) if cache is None else cache[:, None].to(x.dtype)
        shifted = torch.cat([prev, x[:, :-1]], dim=1)
        return (shifted - x, x[:, -1].clone()) if output_cache else shifted - x

    def recurrence(r, w, k, v, a, b, initial_state, output_final_state):
        # the recurrence fla's WKV kernels compute, in float32, state [key][value]
        B, T, H, K = k.shape
        h = (torch.zeros(B, H, K, v.shape[-1], dtype=torch.float32) if initial_state is None
             else initial_state.float().clone())
        o = torch.empty_like(v)
        f = lambda x: x.float()
        for t in range(T):
            rt, wt, kt, vt, at, bt = (f(x[:, t]) for x in (r, w, k, v, a, b))
            h = (torch.exp(wt)[..., None] * h
                 + bt[..., None] * (at[..., None] * h).sum(-2, keepdim=True) + kt[..., None]
                 * vt[..., None, :])
            o[:, t] = (h * rt[..., None]).sum(-2).to(v.dtype)
        return o, (h if output_final_state else None)

    def chunk(r, w, k, v, a, b, scale=1.0, initial_state=None, output_final_state=False, **kw):
        ran.append("chunk")
        return recurrence(r, w, k, v, a, b, initial_state, output_final_state)

    def fused(r, w, k, v, kk, a, scale=1.0, initial_state=None, output_final_state=False,
              **kw):
        ran.append("fused_recurrent")
        return recurrence(r, w, k, v, -kk, kk * a, initial_state, output_final_state)

    monkeypatch.setattr(layer, "token_shift", token_shift)
    monkeypatch.setattr(modeling, "token_shift", token_shift)
    monkeypatch.setattr(layer, "fused_addcmul_rwkv7", torch_addcmul_rwkv7)
    monkeypatch.setattr(layer, "fused_k_rwkv7", k_update_ref)
    monkeypatch.setattr(layer, "gate_output_correction", gate_output_correction_ref)
    monkeypatch.setattr(layer, "chunk_rwkv7", chunk)
    monkeypatch.setattr(layer, "fused_mul_recurrent_rwkv7", fused)
    monkeypatch.setattr(act, "sqrelu_fwd", lambda x: (torch.relu(x.float()) ** 2).to(x.dtype))
    return (torch, Cache, RWKV7Config, RWKV7ForCausalLM), ran


def _cpu_folder(tmp_path, w, name="model"):
    """w written by tinyrwkv's HF writer, with fuse_norm off (torch's LayerNorm and GroupNorm
    instead of fla's Triton ones: the CPU test's only change to the model)."""
    from tinyrwkv.formats.hf import write_hf
    folder = write_hf(tmp_path / name, w)
    config = json.loads((folder / "config.json").read_text())
    config["fuse_norm"] = False
    (folder / "config.json").write_text(json.dumps(config))
    return folder


SMALL = dict(n_layer=2, n_embd=128, vocab_size=300, head_size=64, ranks=(32, 64, 32, 96), seed=3)


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent", "decode"])
def test_cpu_trace_matches_reference(cpu_fla, tmp_path, mode):
    fla, ran = cpu_fla
    w = make_weights(**SMALL)
    st = random_state(w)
    ids = np.random.default_rng(1).integers(0, 300, 9)
    tr, final = fb._record(fla, _cpu_folder(tmp_path, w), ids, st, oracle.Selection(), None,
                           "cpu", "float32", mode, 4)
    assert set(ran) == {"chunk" if mode == "chunk" else "fused_recurrent"}
    ref = oracle.trace(RWKV7(w, dtype="float64"), ids, state=st)
    report = oracle.compare(ref, tr, "fp32")
    assert report["ok"], oracle.format_report(report)
    L = SMALL["n_layer"]
    recorded = {f"L{i}.{n}" for i in range(L) for n in fb.RECORDED} | {
        "ln0", "logits", *oracle.FINAL_NAMES}
    assert set(tr) == recorded
    want_rows = {"chunk": [8], "fused_recurrent": [3, 7, 8], "decode": None}[mode]
    got_rows = None if tr.state_tokens is None else tr.state_tokens.tolist()
    assert got_rows == want_rows
    assert tr["L1.state"].shape == (len(want_rows or ids), 2, 64, 64)
    np.testing.assert_array_equal(final.wkv, tr["final.wkv"])
    np.testing.assert_array_equal(tr["L1.state"][-1], tr["final.wkv"][1])


def test_cpu_planted_difference_is_caught(cpu_fla, tmp_path):
    """A weight perturbed in fla's copy only: compare points at the first name it changes."""
    from safetensors.numpy import load_file, save_file
    fla, _ = cpu_fla
    w = make_weights(**SMALL)
    folder = _cpu_folder(tmp_path, w)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.attn.k_proj.weight"][3, 5] += 0.5
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ids = np.arange(6) * 7
    tr, _ = fb._record(fla, folder, ids, None, oracle.Selection(), None, "cpu", "float32",
                       "chunk", 63)
    report = oracle.compare(oracle.trace(RWKV7(w, dtype="float64"), ids), tr, "fp32")
    assert not report["ok"]
    text = oracle.format_report(report)
    assert "L1.k" in text
    bad = [r["name"] for r in report["rows"] if r.get("bad")]
    assert "L0.block" not in bad and "L1.k" in bad


def test_cpu_selection(cpu_fla, tmp_path):
    fla, _ = cpu_fla
    w = make_weights(**SMALL)
    ids = np.arange(8) * 11
    sel = oracle.Selection(names=["y", "state", "logits"], layers=[1], tokens=[2, 5, 7],
                           state_every=1)
    tr, _ = fb._record(fla, _cpu_folder(tmp_path, w), ids, None, sel, None, "cpu", "float32",
                       "decode", 63)
    assert set(tr) == {"L1.y", "L1.state", "logits", *oracle.FINAL_NAMES}
    assert tr["L1.y"].shape == (3, 128) and tr.tokens.tolist() == [2, 5, 7]
    assert tr.state_tokens.tolist() == [2, 5, 7]
    ref = oracle.trace(RWKV7(w, dtype="float64"), ids)
    report = oracle.compare(ref, tr, "fp32")
    assert report["ok"], oracle.format_report(report)


def test_cpu_other_model_files_are_converted(cpu_fla, tmp_path):
    """A .safetensors with official names is written to a temporary fla folder first (fuse_norm
    is then fla's default, True: not runnable on the CPU, so only the loading is checked)."""
    fla, _ = cpu_fla
    torch, _, RWKV7Config, RWKV7ForCausalLM = fla
    from tinyrwkv.formats import save_safetensors
    w = make_weights(**SMALL)
    path = tmp_path / "m.safetensors"
    save_safetensors(path, w)
    with fb._fla_folder(path) as folder:
        model, config = fb._load_model(torch, RWKV7Config, RWKV7ForCausalLM, folder, path, "cpu",
                                       "float32")
    np.testing.assert_array_equal(
        model.model.layers[1].attn.k_proj.weight.numpy(), w["blocks.1.att.key.weight"])
    np.testing.assert_array_equal(
        model.model.layers[0].attn.w_lora.lora[0].weight.numpy(), w["blocks.0.att.w1"].T)


def test_cpu_missing_tensor_is_an_error(cpu_fla, tmp_path):
    from safetensors.numpy import load_file, save_file
    fla, _ = cpu_fla
    torch, _, RWKV7Config, RWKV7ForCausalLM = fla
    folder = _cpu_folder(tmp_path, make_weights(**SMALL))
    tensors = load_file(str(folder / "model.safetensors"))
    del tensors["model.layers.1.attn.r_k"]
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    with pytest.raises(fb.FlaError, match="r_k"):
        fb._load_model(torch, RWKV7Config, RWKV7ForCausalLM, folder, folder, "cpu", "float32")


# ------------------------------------------------------------------------------------------------
# fla on a CUDA GPU: the bridge as users run it
# ------------------------------------------------------------------------------------------------

def _need_gpu_fla():
    torch = pytest.importorskip("torch")
    if not torch.cuda.is_available():
        pytest.skip("fla's kernels need a CUDA GPU")
    pytest.importorskip("triton")
    pytest.importorskip("fla", reason="pip install flash-linear-attention==0.6.0")


# fla's chunked kernel multiplies fp32 blocks with tl.dot, which is TF32 on NVIDIA GPUs from
# Ampere on: its fp32 traces are held to the tf32 tolerance; the recurrent kernel to fp32's.
GPU_TOL = {"chunk": "tf32", "fused_recurrent": "fp32", "decode": "fp32"}


@pytest.mark.parametrize("mode", ["chunk", "fused_recurrent", "decode"])
def test_gpu_trace_matches_reference(tmp_path, mode):
    _need_gpu_fla()
    from tinyrwkv.formats.hf import write_hf
    w = make_weights(**SMALL)
    st = random_state(w)
    ids = np.random.default_rng(2).integers(0, 300, 70)
    folder = write_hf(tmp_path / "m", w)
    tr, final = fb.record(folder, ids, state=st, mode=mode, piece=20)
    ref = oracle.trace(RWKV7(w, dtype="float64"), ids, state=st)
    report = oracle.compare(ref, tr, GPU_TOL[mode])
    assert report["ok"], oracle.format_report(report)
    assert "L1.v_res" in tr and "L0.y" in tr and "logits" in tr


def test_gpu_planted_difference_is_caught(tmp_path):
    _need_gpu_fla()
    from safetensors.numpy import load_file, save_file
    from tinyrwkv.formats.hf import write_hf
    w = make_weights(**SMALL)
    folder = write_hf(tmp_path / "m", w)
    tensors = load_file(str(folder / "model.safetensors"))
    tensors["model.layers.1.attn.k_proj.weight"][3, 5] += 0.5
    save_file(tensors, str(folder / "model.safetensors"), metadata={"format": "pt"})
    ids = np.arange(20) * 7
    tr, _ = fb.record(folder, ids, mode="fused_recurrent")
    report = oracle.compare(oracle.trace(RWKV7(w, dtype="float64"), ids), tr, "fp32")
    assert not report["ok"]
    assert "L1.k" in [r["name"] for r in report["rows"] if r.get("bad")]
