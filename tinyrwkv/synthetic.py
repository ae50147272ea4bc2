"""Synthetic RWKV-7 checkpoints with realistic statistics, for tests and benchmarks.

The initialisation follows the RWKV-LM training code (RWKV-v7/train_temp/src/model.py, as
summarised in docs/architecture.md): decays spread over [-8, 3], lerps that depend on depth,
orthogonal projections. At that initialisation several matrices are zero (w1, a1, v1, g1, output, ffn.value),
which would leave whole paths of the model untested, so every such tensor gets small random
values, and every other tensor a small random perturbation. The result is not a language model,
but every weight matters to its logits.
"""

from __future__ import annotations

import numpy as np

from .schema import lora_ranks, x070_shapes

__all__ = ["make_weights", "lora_ranks"]


def make_weights(n_layer=2, n_embd=128, vocab_size=300, head_size=64, dim_ffn=None, ranks=None,
                 deep_embed=False, d_deepembed=32, seed=0, dtype=np.float32, training_init=False):
    """A dict official key -> array in the stored shapes ((1, 1, C) lerps, (H, N) r_k, ...).

    Keys and shapes: schema.x070_shapes. ranks: (Dw, Da, Dv, Dg), default `lora_ranks(n_embd)`.
    Layer 0 includes v0/v1/v2, as released files do (they are unused). deep_embed adds the
    DeepEmbed keys (docs/architecture.md).
    training_init: exactly RWKV-LM's initialisation, the start of training (no perturbation; w1,
    a1, v1, g1, att.output and ffn.value are zero), instead of the test-friendly version.
    """
    L, C, V, N = n_layer, n_embd, vocab_size, head_size
    assert C % N == 0, "n_embd must be a multiple of head_size"
    F = dim_ffn or 4 * C
    ranks = ranks or lora_ranks(C)
    shapes = x070_shapes(L, C, V, N, F, ranks, d_deepembed if deep_embed else 0)   # the schema
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

    n = np.arange(C)
    ddd, lin = n / C, n / (C - 1) - 0.5
    zz = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zz * np.abs(zz)

    def block_init(i):
        """{name inside block i: shape -> values}. Called in the schema's key order, which is
        the order of the random draws (so a seed gives the same weights as ever)."""
        r01, r10 = i / max(L - 1, 1), 1 - i / L
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3)
        lerp = lambda power: lambda shape: 1 - ddd ** power + noise(C)
        norm = lambda shape: 1 + noise(C, scale=0.1)
        bias = lambda shape: noise(C, scale=0.1)
        low_rank = lambda shape: small(*shape)
        out_proj = lambda shape: orthogonal(*shape, 0.1)
        return {
            "ln1.weight": norm, "ln1.bias": bias, "ln2.weight": norm, "ln2.bias": bias,
            "att.x_r": lerp(0.2 * r10), "att.x_w": lerp(0.9 * r10), "att.x_k": lerp(0.7 * r10),
            "att.x_v": lerp(0.7 * r10), "att.x_a": lerp(0.9 * r10), "att.x_g": lerp(0.2 * r10),
            "att.w0": lambda shape: www + 0.5 + 2.5 * zigzag + noise(C, scale=0.3),
            "att.w1": low_rank, "att.w2": out_proj,
            "att.a0": lambda shape: -0.19 + 0.3 * zigzag + 0.4 * lin + noise(C, scale=0.3),
            "att.a1": low_rank, "att.a2": out_proj,
            "att.v0": lambda shape: 0.73 - 0.4 * lin + noise(C, scale=0.3),
            "att.v1": low_rank, "att.v2": out_proj,
            "att.g1": low_rank, "att.g2": out_proj,
            "att.k_k": lambda shape: 0.71 - 0.1 * lin + noise(C),
            "att.k_a": lambda shape: 1.02 + noise(C),
            "att.r_k": lambda shape: -0.04 + noise(*shape, scale=0.3),
            "att.receptance.weight": lambda shape: orthogonal(*shape, 1.0),
            # small: 0 in training
            "att.key.weight": lambda shape: orthogonal(*shape, 0.1) + small(*shape) * 0.3,
            "att.value.weight": lambda shape: orthogonal(*shape, 1.0),
            "att.output.weight": low_rank,
            "att.ln_x.weight": lambda shape: ((1 + i) / L) ** 0.7 + noise(C, scale=0.1),
            "att.ln_x.bias": bias,
            "ffn.x_k": lerp(r10 ** 4),
            "ffn.key.weight": lambda shape: orthogonal(*shape, 1.0),
            "ffn.value.weight": low_rank,
            # DeepEmbed (docs/architecture.md)
            "ffn.s_emb.weight": lambda shape: noise(*shape, scale=0.2),
            "ffn.s_emb_x.weight": lambda shape: small(*shape) * 0.3,
            "ffn.s1": low_rank, "ffn.s2": low_rank,
            "ffn.s0": lambda shape: 1 + noise(F, scale=0.1),
        }

    model_init = {
        "emb.weight": lambda shape: rng.uniform(-1e-4, 1e-4, shape),
        "blocks.0.ln0.weight": lambda shape: 1 + noise(C, scale=0.1),
        "blocks.0.ln0.bias": lambda shape: noise(C, scale=0.1),
        "ln_out.weight": lambda shape: 1 + noise(C, scale=0.1),
        "ln_out.bias": lambda shape: noise(C, scale=0.1),
        "head.weight": lambda shape: orthogonal(*shape, 0.5 * np.sqrt(V / C) if V > C else 0.5),
    }
    blocks = [block_init(i) for i in range(L)]
    w = {}
    for key, shape in shapes.items():
        if key in model_init:
            value = model_init[key](shape)
        else:
            _, i, name = key.split(".", 2)                       # blocks.{i}.{name}
            value = blocks[int(i)][name](shape)
        w[key] = np.ascontiguousarray(np.reshape(value, shape), dtype=dtype)
    return w
