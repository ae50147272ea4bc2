"""LoRA merging and state-tuned initial states (RWKV-PEFT conventions, docs/formats.md §6)."""
import subprocess
import sys

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.formats import read_checkpoint, save_safetensors
from tinyrwkv.formats.lora import initial_state, merge_lora
from tinyrwkv.synthetic import make_weights

from conftest import ROOT


def lora_file(w, rng, r=4):
    lora = {}
    for stem in ("blocks.0.att.key", "blocks.1.ffn.value"):
        out_dim, in_dim = w[stem + ".weight"].shape
        lora[f"model.{stem}.lora_A"] = rng.standard_normal((r, in_dim)).astype(np.float32) * 0.1
        lora[f"model.{stem}.lora_B"] = rng.standard_normal((out_dim, r)).astype(np.float32) * 0.1
    lora["model.blocks.1.ln2.weight"] = (w["blocks.1.ln2.weight"] * 1.5).astype(np.float32)
    return lora


def test_merged_weights_compute_the_lora_forward():
    """After merging, x W'^T equals the LoRA layer's forward x W^T + (alpha / r) (x A^T) B^T,
    the other trained tensors of the LoRA file replace the base's, and LoRA keys are gone."""
    rng = np.random.default_rng(0)
    w = make_weights(2, 64, 50, seed=1)
    lora = lora_file(w, rng)
    merged = merge_lora(w, lora, alpha=8)
    for stem, width in (("blocks.0.att.key", 64), ("blocks.1.ffn.value", 256)):
        xi = rng.standard_normal((5, width))
        A, B = lora[f"model.{stem}.lora_A"], lora[f"model.{stem}.lora_B"]
        lora_forward = xi @ w[stem + ".weight"].T + (8 / 4) * (xi @ A.T) @ B.T
        assert np.allclose(xi @ merged[stem + ".weight"].T, lora_forward, atol=1e-5)
    assert np.array_equal(merged["blocks.1.ln2.weight"], lora["model.blocks.1.ln2.weight"])
    assert not any("lora" in k for k in merged) and set(merged) == set(w)
    assert np.array_equal(merged["blocks.0.att.value.weight"], w["blocks.0.att.value.weight"])
    with pytest.raises(ValueError, match="no LoRA pairs"):
        merge_lora(w, {"blocks.0.ln1.weight": w["blocks.0.ln1.weight"]}, 8)
    bad = dict(lora)
    bad["model.blocks.0.att.key.lora_B"] = bad["model.blocks.0.att.key.lora_B"][:, :3]
    with pytest.raises(ValueError, match="do not fit"):
        merge_lora(w, bad, 8)


def test_merge_lora_command(tmp_path):
    rng = np.random.default_rng(1)
    w = make_weights(2, 64, 50, seed=2)
    save_safetensors(tmp_path / "base.safetensors", w)
    lora = lora_file(w, rng)
    save_safetensors(tmp_path / "lora.safetensors", lora)
    p = subprocess.run([sys.executable, "-m", "tinyrwkv", "merge-lora", str(tmp_path / "base.safetensors"),
                        str(tmp_path / "lora.safetensors"), str(tmp_path / "out.safetensors"),
                        "--alpha", "16", "--type", "f32"], capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    got = read_checkpoint(tmp_path / "out.safetensors")
    want = merge_lora(w, lora, 16)
    assert all(np.array_equal(got[k], np.asarray(want[k], np.float32)) for k in want)


def test_state_tuned_initial_state(tmp_path):
    """time_state (H, N, N) per layer becomes the WKV state as it is ([value][key], no
    transpose); token shifts start at zero; --state takes such a file."""
    w = make_weights(2, 64, 65536, seed=3)
    save_safetensors(tmp_path / "m.safetensors", w)
    model = tinyrwkv.load(tmp_path / "m.safetensors", backend="numpy")
    rng = np.random.default_rng(4)
    ts = {f"blocks.{i}.att.time_state": rng.standard_normal((1, 64, 64)).astype(np.float32)
          for i in range(2)}
    state = initial_state(ts, model.config)
    assert np.array_equal(state.wkv[1], ts["blocks.1.att.time_state"]) and not state.att_shift.any()
    # the state changes what the model says, exactly as the same State passed by hand
    a, _ = model.forward([1, 2, 3], state)
    b, _ = model.forward([1, 2, 3])
    assert not np.allclose(a, b)
    save_safetensors(tmp_path / "state.safetensors", ts)
    p = subprocess.run([sys.executable, "-m", "tinyrwkv", "generate", "--model", str(tmp_path / "m.safetensors"),
                        "--state", str(tmp_path / "state.safetensors"), "Hi", "-n", "3", "-t", "0"],
                       capture_output=True, text=True, cwd=ROOT)
    assert p.returncode == 0, p.stderr
    with pytest.raises(ValueError, match="time_state for 1 of 2 layers"):
        initial_state({"blocks.0.att.time_state": ts["blocks.0.att.time_state"]}, model.config)
    with pytest.raises(ValueError, match="not a state-tuning checkpoint"):
        initial_state(w, model.config)
    with pytest.raises(ValueError, match="this model's layer state"):
        initial_state({f"blocks.{i}.att.time_state": np.zeros((2, 32, 32)) for i in range(2)},
                      model.config)
