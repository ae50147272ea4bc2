"""llama.cpp (through llama-cpp-python, optional: skipped without it) evaluates GGUFs that tinyrwkv
wrote, and its logits are compared with tinyrwkv's float64 oracle on the same stored weights.

Tolerances (max|d|/std): F32 files: llama.cpp computes in float32 like the other float32
implementations (measured 2.4e-6), the oracle's fp32 tolerance 1e-4. F16 files: llama.cpp's CPU
matrix products convert the activations to float16 too (u = 4.9e-4; measured 1.6e-3), 1e-2.
Q8_0: it also quantises the activations to 8 bits for its Q8_0 dot products (measured 3.6e-2),
1e-1. A wrong tensor mapping (a transpose, the lerp order) gives O(1).
"""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.formats import read_checkpoint

from conftest import ROOT, have

pytestmark = pytest.mark.skipif(not (have("llama_cpp") and have("gguf")),
                                reason="llama-cpp-python and gguf are not installed "
                                       "(pip install llama-cpp-python gguf)")
TOL = {"f32": 1e-4, "f16": 1e-2, "q8_0": 1e-1}


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_our_gguf_and_agrees(tmp_path, out_type):
    from llama_cpp import Llama
    from tinyrwkv.formats import write_gguf
    if not (ROOT / "weights" / "model.safetensors").exists():
        pytest.skip("no shipped model")
    model = tinyrwkv.load(backend="numpy")
    path = tmp_path / f"m_{out_type}.gguf"
    write_gguf(path, read_checkpoint(ROOT / "weights" / "model.safetensors", dtype="float32"),
               out_type, tokenizer=model.tokenizer)
    ids = model.tokenizer.encode("Once upon a time, there was a little girl named Lily. She")
    oracle = tinyrwkv.load(path, dtype="float64", backend="numpy")
    want, _ = oracle.forward(ids, full_output=True)
    llm = Llama(model_path=str(path), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    got = np.array(llm.scores[:len(ids)], np.float64)
    err = float(np.abs(got - want).max() / want.std())
    print(f"llama.cpp {out_type}: logits max|d|/std {err:.1e}")
    assert err < TOL[out_type]
    assert llm.tokenize(b"Once upon a time", add_bos=False, special=False) == \
        model.tokenizer.encode("Once upon a time")                      # the vocabulary we wrote


@pytest.mark.parametrize("ftype", ["Q6_K", "Q5_K_M", "Q4_K_M"])
def test_k_quant_files_from_llama_cpp_are_read(tmp_path, ftype):
    """K-quants (which gguf-py cannot write) made by llama.cpp's own quantizer: tinyrwkv reads
    them (dequantised by gguf-py) and agrees with llama.cpp on the same file. llama.cpp
    quantises the activations to 8 bits for K-quant dot products, and the first token's are
    the hardest (its token-shift difference is the whole activation): measured on two shipped
    models, the first position up to 3.0e-1 (Q5_K_M; 1.8e-1 Q4_K_M on the previous model),
    every later one at most 6e-2. Tolerances: 5e-1 at the first position, 1.5e-1 after it; a
    mis-read block layout gives O(1) or worse at every position."""
    import ctypes
    import llama_cpp
    from tinyrwkv.formats import write_gguf
    if not (ROOT / "weights" / "model.safetensors").exists():
        pytest.skip("no shipped model")
    model = tinyrwkv.load(backend="numpy")
    f32 = tmp_path / "m_f32.gguf"
    write_gguf(f32, read_checkpoint(ROOT / "weights" / "model.safetensors", dtype="float32"), "f32",
               tokenizer=model.tokenizer)
    params = llama_cpp.llama_model_quantize_default_params()
    params.ftype = getattr(llama_cpp, f"LLAMA_FTYPE_MOSTLY_{ftype}")
    out = tmp_path / f"m_{ftype}.gguf"
    assert llama_cpp.llama_model_quantize(str(f32).encode(), str(out).encode(), ctypes.byref(params)) == 0
    ids = model.tokenizer.encode("Once upon a time, there was a little girl named Lily. She")
    want, _ = tinyrwkv.load(out, dtype="float64", backend="numpy").forward(ids, full_output=True)
    llm = llama_cpp.Llama(model_path=str(out), n_ctx=256, logits_all=True, verbose=False, n_threads=2)
    llm.eval(ids)
    err = np.abs(np.array(llm.scores[:len(ids)]) - want).max(axis=1) / want.std()
    print(f"{ftype}: llama.cpp vs tinyrwkv on the same file: first token {err[0]:.1e}, "
          f"after it {err[1:].max():.1e}")
    assert err[0] < 5e-1 and err[1:].max() < 1.5e-1


def test_world_vocabulary_written_into_gguf_tokenizes_like_llama_cpp(tmp_path):
    from llama_cpp import Llama
    from tinyrwkv.formats import write_gguf
    from tinyrwkv.synthetic import make_weights
    from tinyrwkv.tokenizer import WorldTokenizer
    tok = WorldTokenizer()
    write_gguf(tmp_path / "w.gguf", make_weights(1, 64, 65536, seed=1), "f32", tokenizer=tok)
    llm = Llama(model_path=str(tmp_path / "w.gguf"), n_ctx=64, verbose=False, n_threads=2)
    for text in ["Hello world\n\nThis is RWKV.", "中文测试 and émojis 🙂", "tab\there \\x41"]:
        assert llm.tokenize(text.encode(), add_bos=False, special=False) == tok.encode(text), text
