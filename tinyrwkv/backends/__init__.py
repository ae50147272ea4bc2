"""Backends: the same RWKV-7 as tinyrwkv/model.py, computed by compiled kernels.

    numba_cpu.py    RWKV7Numba: Numba kernels for the CPU (decode and prefill)
    numba_train.py  the WKV operator's training forward and backward in Numba
    cupy_gpu.py     RWKV7CuPy: CUDA kernels (kernels.cu) through CuPy
    cupy_train.py   the WKV operator's training forward and backward in CUDA

This file is the contract, the one place it is written down. Nothing here is imported by model.py;
backends import model.py (never the reverse), and nothing in this package imports a module above
it (loader, oracle, train, cli). A backend's optional dependency (numba, cupy) is imported by its
own module only, so `import tinyrwkv` works without either.

A backend model
  * is a subclass of model.RWKV7 with the same public API (forward, forward_batch,
    batch_state, hidden, logits, embed, zero_state, config, n_params) and the same results within
    a stated float32 tolerance; it overrides `forward_one` (decode), `forward_seq` (prefill)
    and/or `forward_batch` (B sequences, one token each), never the meaning;
  * computes in float32 (`dtype`), and stores its large matrices as `storage`: "float32",
    "bfloat16" (the top 16 bits of a float32, kept as uint16), "float16" or "int8" (GGUF Q8_0
    blocks, formats/q8_0.py; numba only);
  * keeps every weight under its checkpoint key ('att.key.weight', 'att.w1', ...) in `blocks`,
    possibly in another array type (CuPy), storage type or layout (a LoRA matrix transposed for a
    kernel), which its docstring states; anything derived (stacked lerps, fused tables) is kept
    apart, under names that are not checkpoint keys;
  * implements `stored_tensors()`: {checkpoint key: NumPy array} of exactly the numbers it
    computes with, as float32 (16-bit weights widened, Q8_0 blocks dequantised: both exact).
    This is how the oracle sees a backend: `tinyrwkv.oracle.trace(model, ids)` runs the NumPy
    reference on these tensors, so a trace of any backend and storage is of the weights that
    backend really uses, and is never silently of others. A backend that cannot give them
    raises NotImplementedError naming itself;
  * returns States whose arrays may live elsewhere (CuPy); `State.to_host()` brings them back,
    and `forward` accepts a NumPy state;
  * says what it is in `backend` (e.g. "numba", "numba-bf16", "numba-int8", "cupy-fp16").

The WKV operator, everywhere (reference, chunked, Numba, CUDA, training, tinyrwkv.ops)
    wkv(S, r, w, k, v, alpha, beta) -> (S_T, y)
      S (..., H, N, N), [head][value][key]; r, w, k, v, alpha, beta (..., T, H, N); w is the
      decay itself in (0, 1); alpha = -kappa_hat, beta = kappa_hat * a in the model.
    Training adds what the backward needs, and its backward mirrors it:
    wkv_forward(S, r, w, k, v, alpha, beta) -> (S_T, y, saved)   saved: the state before every
      SAVE_EVERY-th token, (ceil(T / SAVE_EVERY), B, H, N, N)
    wkv_backward(dS_T, dy, saved, r, w, k, v, alpha, beta) -> (dS_0, dr, dw, dk, dv, dalpha, dbeta)
    Each kernel is the twin of model.wkv_step / train.wkv_forward, with a parity test
    (tests/test_fast.py, tests/test_train.py, tests/test_gpu.py).
"""

SAVE_EVERY = 16   # training keeps the WKV state before every 16th token and recomputes the rest

NAMES = ("numpy", "numba", "cupy")
STORAGE = {"numpy": ("float32",), "numba": ("float32", "bfloat16", "float16", "int8"),
           "cupy": ("float16", "bfloat16", "float32")}   # the first is each backend's default
