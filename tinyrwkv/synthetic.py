"""Synthetic RWKV-7 checkpoints with realistic statistics, for tests and benchmarks.

The initialisation follows the RWKV-LM training code (RWKV-v7/train_temp/src/model.py, as
summarised in rwkv7.md §4): decays spread over [-8, 3], lerps that depend on depth, orthogonal
projections. At that initialisation several matrices are zero (w1, a1, v1, g1, output, ffn.value),
which would leave whole paths of the model untested, so every such tensor gets small random
values, and every other tensor a small random perturbation. The result is not a language model,
but every weight matters to its logits.
"""

from __future__ import annotations

import numpy as np


def lora_ranks(n_embd):
    """(Dw, Da, Dv, Dg) by the formula of the training code the released models came from
    (RWKV-LM RWKV-v5/src/model.py x070 section): R(x) = max(32, round(x / 32) * 32)."""
    R = lambda x: max(32, int(round(x / 32)) * 32)
    C = n_embd
    return R(1.8 * C ** 0.5), R(1.8 * C ** 0.5), R(1.3 * C ** 0.5), R(0.6 * C ** 0.8)


def make_weights(n_layer=2, n_embd=128, vocab_size=300, head_size=64, dim_ffn=None, ranks=None,
                 deep_embed=False, d_deepembed=32, seed=0, dtype=np.float32, training_init=False):
    """A dict official key -> array in the stored shapes ((1, 1, C) lerps, (H, N) r_k, ...).

    ranks: (Dw, Da, Dv, Dg), default `lora_ranks(n_embd)`. Layer 0 includes v0/v1/v2, as released
    files do (they are unused). deep_embed adds the DeepEmbed keys (rwkv7.md §5.2).
    training_init: exactly RWKV-LM's initialisation, the start of training (no perturbation; w1,
    a1, v1, g1, att.output and ffn.value are zero), instead of the test-friendly version.
    """
    L, C, V, N = n_layer, n_embd, vocab_size, head_size
    assert C % N == 0, "n_embd must be a multiple of head_size"
    H, F = C // N, dim_ffn or 4 * C
    Dw, Da, Dv, Dg = ranks or lora_ranks(C)
    rng = np.random.default_rng(seed)

    def orthogonal(rows, cols, gain):
        # Orthonormal columns from a Gaussian matrix A as A (A^T A)^{-1/2}, through the Cholesky
        # factor of the small Gram matrix: uniformly random like QR's, and much faster than
        # LAPACK's QR for the tall (V, C) head here.
        a = rng.standard_normal((max(rows, cols), min(rows, cols)))
        chol = np.linalg.cholesky(a.T @ a)                       # a^T a = chol chol^T
        q = np.linalg.solve(chol, a.T).T                         # a chol^-T: orthonormal columns
        return gain * (q if rows >= cols else q.T)

    noise = lambda *shape, scale=0.02: scale * rng.standard_normal(shape)
    small = lambda rows, cols: rng.standard_normal((rows, cols)) * 0.3 / np.sqrt(rows)
    if training_init:
        noise = lambda *shape, scale=0.0: np.zeros(shape)
        small = lambda rows, cols: np.zeros((rows, cols))
    vec = lambda a: a.reshape(1, 1, -1)                  # stored shape of per-channel vectors

    n = np.arange(C)
    ddd, lin = n / C, n / (C - 1) - 0.5
    zz = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zz * np.abs(zz)

    w = {"emb.weight": rng.uniform(-1e-4, 1e-4, (V, C)),
         "blocks.0.ln0.weight": 1 + noise(C, scale=0.1), "blocks.0.ln0.bias": noise(C, scale=0.1)}
    for i in range(L):
        r01, r10 = i / max(L - 1, 1), 1 - i / L
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3)
        b = f"blocks.{i}."
        w.update({
            b + "ln1.weight": 1 + noise(C, scale=0.1), b + "ln1.bias": noise(C, scale=0.1),
            b + "ln2.weight": 1 + noise(C, scale=0.1), b + "ln2.bias": noise(C, scale=0.1),
            b + "att.x_r": vec(1 - ddd ** (0.2 * r10) + noise(C)),
            b + "att.x_w": vec(1 - ddd ** (0.9 * r10) + noise(C)),
            b + "att.x_k": vec(1 - ddd ** (0.7 * r10) + noise(C)),
            b + "att.x_v": vec(1 - ddd ** (0.7 * r10) + noise(C)),
            b + "att.x_a": vec(1 - ddd ** (0.9 * r10) + noise(C)),
            b + "att.x_g": vec(1 - ddd ** (0.2 * r10) + noise(C)),
            b + "att.w0": vec(www + 0.5 + 2.5 * zigzag + noise(C, scale=0.3)),
            b + "att.w1": small(C, Dw), b + "att.w2": orthogonal(Dw, C, 0.1),
            b + "att.a0": vec(-0.19 + 0.3 * zigzag + 0.4 * lin + noise(C, scale=0.3)),
            b + "att.a1": small(C, Da), b + "att.a2": orthogonal(Da, C, 0.1),
            b + "att.v0": vec(0.73 - 0.4 * lin + noise(C, scale=0.3)),
            b + "att.v1": small(C, Dv), b + "att.v2": orthogonal(Dv, C, 0.1),
            b + "att.g1": small(C, Dg), b + "att.g2": orthogonal(Dg, C, 0.1),
            b + "att.k_k": vec(0.71 - 0.1 * lin + noise(C)),
            b + "att.k_a": vec(1.02 + noise(C)),
            b + "att.r_k": -0.04 + noise(H, N, scale=0.3),
            b + "att.receptance.weight": orthogonal(C, C, 1.0),
            b + "att.key.weight": orthogonal(C, C, 0.1) + small(C, C) * 0.3,   # small: 0 in training
            b + "att.value.weight": orthogonal(C, C, 1.0),
            b + "att.output.weight": small(C, C),
            b + "att.ln_x.weight": ((1 + i) / L) ** 0.7 + noise(C, scale=0.1),
            b + "att.ln_x.bias": noise(C, scale=0.1),
            b + "ffn.x_k": vec(1 - ddd ** (r10 ** 4) + noise(C)),
            b + "ffn.key.weight": orthogonal(F, C, 1.0),
            b + "ffn.value.weight": small(C, F),
        })
        if deep_embed:
            D = d_deepembed
            w.update({
                b + "ffn.s_emb.weight": noise(V, D * D, scale=0.2),
                b + "ffn.s_emb_x.weight": small(D * D, C) * 0.3,
                b + "ffn.s1": small(C, D), b + "ffn.s2": small(D, F),
                b + "ffn.s0": vec(1 + noise(F, scale=0.1)),
            })
    w.update({"ln_out.weight": 1 + noise(C, scale=0.1), "ln_out.bias": noise(C, scale=0.1),
              "head.weight": orthogonal(V, C, 0.5 * np.sqrt(V / C) if V > C else 0.5)})
    return {key: np.ascontiguousarray(value, dtype=dtype) for key, value in w.items()}
