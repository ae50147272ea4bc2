"""llama.cpp (through llama-cpp-python, optional: skipped without it) evaluates GGUFs that tinyrwkv
wrote, and its logits are compared with tinyrwkv's float64 oracle on the same stored weights.

Tolerances (max|d|/std): llama.cpp computes in float32 on the CPU with weights as stored; F32 and
F16 files: the fp32 tolerance class of the oracle's compare (1e-4 would be float32 arithmetic
alone; llama.cpp's fused kernels and its own WKV order are still float32) so 1e-3; Q8_0: llama.cpp
also quantises the activations to 8 bits for its Q8_0 dot products, 1e-1.
"""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.checkpoint import read_checkpoint

from conftest import ROOT, have

pytestmark = pytest.mark.skipif(not (have("llama_cpp") and have("gguf")),
                                reason="llama-cpp-python and gguf are not installed "
                                       "(pip install llama-cpp-python gguf)")
TOL = {"f32": 1e-3, "f16": 1e-3, "q8_0": 1e-1}


@pytest.mark.parametrize("out_type", ["f32", "f16", "q8_0"])
def test_llama_cpp_runs_our_gguf_and_agrees(tmp_path, out_type):
    from llama_cpp import Llama
    from tinyrwkv.gguf_io import write_gguf
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
