"""GGUF (llama.cpp's RWKV7 layout) in and out, and `tinyrwkv convert`: round trips keep the logits
within the tolerance of the storage type; malformed and foreign files get clear errors.

Tolerances (max|d|/std of logits against the original weights): f32 exact storage: TOL_F32;
f16: weights rounded to 11 significant bits (u = 4.9e-4 per weight), 1e-2; bf16: 8 bits
(u = 3.9e-3), 5e-2; q8_0: blocks of 32 weights on a 255-level grid scaled by the block's max
(~0.4% of the largest weight per block), measured 2.7e-2 on the shipped model, 1e-1; q5_0 and
q4_0 (31 and 15 levels per block) cost 0.3 to 0.6 on these random weights, too close to a bug's
O(1) for a logits bound: for them the test checks that every tensor read back is exactly the
quantised-then-dequantised original (test_low_bit_gguf_reads_exactly_what_was_stored).
"""
import subprocess
import sys

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import CheckpointError
from tinyrwkv.formats import read_checkpoint, read_model, save_safetensors
from tinyrwkv.synthetic import make_weights

from conftest import ROOT, TOL_F32, have, rel_err

pytestmark = pytest.mark.skipif(not have("gguf"), reason="the gguf package is not installed "
                                                         "(pip install -e '.[gguf]')")
TOL = {"f32": TOL_F32, "f16": 1e-2, "bf16": 5e-2, "q8_0": 1e-1}


@pytest.mark.parametrize("out_type", ["f32", "f16", "bf16", "q8_0"])
def test_gguf_round_trip_keeps_logits(tmp_path, out_type):
    from tinyrwkv.formats import write_gguf
    w = make_weights(3, 128, 301, head_size=32, seed=7)           # float32 weights, awkward V
    ids = np.random.default_rng(0).integers(0, 301, 17)
    ref, ref_state = tinyrwkv.RWKV7(w).forward(ids, full_output=True)
    path = tmp_path / f"m_{out_type}.gguf"
    write_gguf(path, w, out_type)
    model = tinyrwkv.load(path, backend="numpy")
    logits, state = model.forward(ids, full_output=True)
    err = rel_err(logits, ref)
    print(f"GGUF {out_type}: logits {err:.1e}, state {rel_err(state.wkv, ref_state.wkv):.1e}")
    assert err < TOL[out_type]
    if out_type == "f32":
        assert err == 0.0                                 # f32 storage: the same numbers


@pytest.mark.parametrize("out_type", ["q5_0", "q4_1", "q4_0"])
def test_low_bit_gguf_reads_exactly_what_was_stored(tmp_path, out_type):
    import gguf
    from tinyrwkv.formats import write_gguf
    w = make_weights(2, 64, 97, head_size=32, seed=9)
    write_gguf(tmp_path / "m.gguf", w, out_type)
    back = read_model(tmp_path / "m.gguf").tensors
    qt = getattr(gguf.GGMLQuantizationType, out_type.upper())
    for key in ("blocks.1.att.key.weight", "blocks.0.ffn.value.weight", "head.weight"):
        x = np.asarray(w[key], np.float32)
        expect = gguf.quants.dequantize(gguf.quants.quantize(x, qt), qt)
        assert np.array_equal(back[key], expect.reshape(x.shape)), key
    assert np.array_equal(back["blocks.1.att.w1"], w["blocks.1.att.w1"])     # kept F32


def test_shipped_model_through_gguf_with_its_tokenizer(tmp_path):
    if not (ROOT / "weights" / "model.safetensors").exists():
        pytest.skip("no shipped model")
    p = subprocess.run([sys.executable, "-m", "tinyrwkv", "convert", str(ROOT / "weights" / "model.safetensors"),
                        str(tmp_path / "m.gguf"), "--type", "q8_0"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    g = tinyrwkv.load(tmp_path / "m.gguf", backend="numpy")
    s = tinyrwkv.load(backend="numpy")
    text = "Once upon a time, there was a dog."
    assert g.tokenizer.encode(text) == s.tokenizer.encode(text)          # vocabulary carried
    ids = s.tokenizer.encode(text)
    assert rel_err(g.forward(ids)[0], s.forward(ids)[0]) < TOL["q8_0"]
    # and back to safetensors, with the tokenizer beside it
    p = subprocess.run([sys.executable, "-m", "tinyrwkv", "convert", str(tmp_path / "m.gguf"),
                        str(tmp_path / "back.safetensors"), "--type", "f32"], capture_output=True, text=True)
    assert p.returncode == 0, p.stderr
    back = tinyrwkv.load(tmp_path / "back.safetensors", backend="numpy")
    assert back.tokenizer is not None and np.array_equal(back.forward(ids)[0], g.forward(ids)[0])


def test_bad_gguf_files_are_named(tmp_path):
    import gguf
    wr = gguf.GGUFWriter(str(tmp_path / "llama.gguf"), "llama")
    wr.add_tensor("x", np.zeros(4, np.float32))
    wr.write_header_to_file()
    wr.write_kv_data_to_file()
    wr.write_tensors_to_file()
    wr.close()
    with pytest.raises(CheckpointError, match="architecture 'llama'"):
        tinyrwkv.load(tmp_path / "llama.gguf")
    from tinyrwkv.formats import write_gguf
    write_gguf(tmp_path / "m.gguf", make_weights(1, 64, 50), "f32")
    data = (tmp_path / "m.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[:len(data) // 2])
    with pytest.raises(CheckpointError):
        tinyrwkv.load(tmp_path / "cut.gguf")
    with pytest.raises(CheckpointError, match="DeepEmbed"):
        write_gguf(tmp_path / "d.gguf", make_weights(1, 64, 50, deep_embed=True), "f32")


def test_convert_refuses_what_it_cannot_write(tmp_path):
    save_safetensors(tmp_path / "m.safetensors", make_weights(1, 64, 50))
    run = lambda *a: subprocess.run([sys.executable, "-m", "tinyrwkv", "convert", *a],
                                    capture_output=True, text=True)
    p = run(str(tmp_path / "m.safetensors"), str(tmp_path / "x.bin"))
    assert p.returncode == 1 and ".gguf, .safetensors or .pth" in p.stderr
    p = run(str(tmp_path / "m.safetensors"), str(tmp_path / "x.safetensors"), "--type", "q8_0")
    assert p.returncode == 1 and "q8_0 is a GGUF type" in p.stderr, p.stderr


def test_hugging_face_fla_format_round_trip(tmp_path):
    """Official -> fla names (config.json + safetensors) -> official: the same numbers; the
    folder and the single file both load, with fla's names and shapes as fla 0.6.0 declares
    them (fla/layers/rwkv7.py: r_proj, w_lora.lora.0/2, no v_lora in layer 0, ffn.x_k (C,))."""
    import json
    from tinyrwkv.formats import write_hf
    w = make_weights(2, 128, 301, head_size=64, seed=8)
    write_hf(tmp_path / "hf", w)
    t = read_checkpoint(tmp_path / "hf" / "model.safetensors")
    C, Dw = 128, w["blocks.0.att.w1"].shape[1]
    assert t["model.layers.1.attn.r_proj.weight"].shape == (C, C)
    assert t["model.layers.1.attn.w_lora.lora.0.weight"].shape == (Dw, C)
    assert t["model.layers.1.attn.w_lora.lora.2.weight"].shape == (C, Dw)
    assert t["model.layers.1.attn.w_lora.lora.2.bias"].shape == (C,)
    assert "model.layers.0.attn.v_lora.lora.0.weight" not in t
    assert "model.layers.1.attn.g_lora.lora.2.bias" not in t
    assert t["model.layers.0.ffn.x_k"].shape == (C,) and t["model.layers.0.attn.x_r"].shape == (1, 1, C)
    config = json.loads((tmp_path / "hf" / "config.json").read_text())
    assert config["architectures"] == ["RWKV7ForCausalLM"] and config["head_dim"] == 64
    back = read_model(tmp_path / "hf").tensors
    assert all(np.array_equal(back[k], w[k]) for k in back)
    assert set(w) - set(back) == {"blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2"}
    ids = np.arange(1, 20)
    ref = tinyrwkv.RWKV7(w).forward(ids)[0]
    for path in (tmp_path / "hf", tmp_path / "hf" / "model.safetensors"):
        assert np.array_equal(tinyrwkv.load(path, backend="numpy").forward(ids)[0], ref)
    del t["model.layers.1.attn.k_proj.weight"]
    save_safetensors(tmp_path / "broken.safetensors", t)
    with pytest.raises(CheckpointError, match="k_proj"):
        tinyrwkv.load(tmp_path / "broken.safetensors")
