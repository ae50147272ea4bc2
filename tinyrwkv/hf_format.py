"""Hugging Face / flash-linear-attention format (`RWKV7ForCausalLM`: config.json + safetensors
with fla's key names) in and out.

fla's names, per layer `model.layers.{i}.` (read from fla 0.6.0's fla/layers/rwkv7.py and
fla/models/rwkv7/modeling_rwkv7.py), against the official keys `blocks.{i}.`:

    pre_norm (layer 0 only)            ln0            attn_norm        ln1
    attn.x_r .. attn.x_g (1, 1, C)     att.x_r ..     attn.k_k, k_a, r_k   att.k_k (C), k_a (C), r_k
    attn.r_proj / k_proj / v_proj / o_proj .weight     att.receptance / key / value / output.weight
    attn.w_lora.lora.0.weight (Dw, C)  att.w1 transposed
    attn.w_lora.lora.2.weight (C, Dw)  att.w2 transposed;  attn.w_lora.lora.2.bias (C)  att.w0
    attn.a_lora..., attn.v_lora... (layers > 0), attn.g_lora... (no bias): the same pattern
    attn.g_norm.weight/bias            att.ln_x       ffn_norm         ln2
    ffn.x_k (C)                        ffn.x_k        ffn.key / ffn.value .weight   the same
and model.embeddings.weight (emb), model.norm (ln_out), lm_head.weight (head).
fla's GroupNorm eps is head_dim * norm_eps = 64 * 1e-5, the official 64e-5.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, read_checkpoint, save_safetensors

LORAS = ("w", "a", "v", "g")


def is_hf(keys):
    return any(k.startswith("model.layers.") or k == "model.embeddings.weight" for k in keys)


def to_hf(w):
    """Official key -> array: ({fla name: array}, config dict)."""
    from .model import Config
    cfg = Config.from_weights(w)
    a = lambda x: np.asarray(x)
    t = {"model.embeddings.weight": a(w["emb.weight"]), "lm_head.weight": a(w["head.weight"]),
         "model.norm.weight": a(w["ln_out.weight"]).reshape(-1),
         "model.norm.bias": a(w["ln_out.bias"]).reshape(-1),
         "model.layers.0.pre_norm.weight": a(w["blocks.0.ln0.weight"]).reshape(-1),
         "model.layers.0.pre_norm.bias": a(w["blocks.0.ln0.bias"]).reshape(-1)}
    for i in range(cfg.n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        p = lambda k: a(w[b + k])
        t.update({h + "attn_norm.weight": p("ln1.weight").reshape(-1),
                  h + "attn_norm.bias": p("ln1.bias").reshape(-1),
                  h + "ffn_norm.weight": p("ln2.weight").reshape(-1),
                  h + "ffn_norm.bias": p("ln2.bias").reshape(-1),
                  h + "attn.k_k": p("att.k_k").reshape(-1), h + "attn.k_a": p("att.k_a").reshape(-1),
                  h + "attn.r_k": p("att.r_k"),
                  h + "attn.r_proj.weight": p("att.receptance.weight"),
                  h + "attn.k_proj.weight": p("att.key.weight"),
                  h + "attn.v_proj.weight": p("att.value.weight"),
                  h + "attn.o_proj.weight": p("att.output.weight"),
                  h + "attn.g_norm.weight": p("att.ln_x.weight").reshape(-1),
                  h + "attn.g_norm.bias": p("att.ln_x.bias").reshape(-1),
                  h + "ffn.x_k": p("ffn.x_k").reshape(-1),
                  h + "ffn.key.weight": p("ffn.key.weight"),
                  h + "ffn.value.weight": p("ffn.value.weight")})
        t.update({h + f"attn.x_{c}": p(f"att.x_{c}").reshape(1, 1, -1) for c in "rwkvag"})
        for x in LORAS:
            if x == "v" and i == 0:
                continue                                    # fla has no v_lora in layer 0
            t[h + f"attn.{x}_lora.lora.0.weight"] = np.ascontiguousarray(p(f"att.{x}1").T)
            t[h + f"attn.{x}_lora.lora.2.weight"] = np.ascontiguousarray(p(f"att.{x}2").T)
            if x != "g":
                t[h + f"attn.{x}_lora.lora.2.bias"] = p(f"att.{x}0").reshape(-1)
    config = {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"],
              "hidden_size": cfg.n_embd, "num_hidden_layers": cfg.n_layer,
              "head_dim": cfg.head_size, "num_heads": cfg.n_head,
              "intermediate_size": cfg.dim_ffn, "hidden_ratio": cfg.dim_ffn / cfg.n_embd,
              "decay_low_rank_dim": cfg.d_decay, "a_low_rank_dim": cfg.d_aaa,
              "v_low_rank_dim": cfg.d_mv or cfg.d_aaa, "gate_low_rank_dim": cfg.d_gate,
              "vocab_size": cfg.vocab_size, "norm_eps": 1e-5, "norm_first": True,
              "norm_bias": True, "hidden_act": "sqrelu", "tie_word_embeddings": False,
              "attn_mode": "chunk", "fuse_norm": True}
    return t, config


def from_hf(t):
    """{fla name: array} -> official key -> array (stored shapes). Layer 0 gets no v0/v1/v2."""
    t = {k[len("rwkv7."):] if k.startswith("rwkv7.") else k: v for k, v in t.items()}
    vec = lambda x: np.asarray(x).reshape(1, 1, -1)
    flat = lambda x: np.asarray(x).reshape(-1)
    try:
        L = 1 + max(int(k.split(".")[2]) for k in t if k.startswith("model.layers."))
        w = {"emb.weight": t["model.embeddings.weight"], "head.weight": t["lm_head.weight"],
             "ln_out.weight": flat(t["model.norm.weight"]), "ln_out.bias": flat(t["model.norm.bias"]),
             "blocks.0.ln0.weight": flat(t["model.layers.0.pre_norm.weight"]),
             "blocks.0.ln0.bias": flat(t["model.layers.0.pre_norm.bias"])}
        for i in range(L):
            b, h = f"blocks.{i}.", f"model.layers.{i}."
            q = lambda k: np.asarray(t[h + k])
            w.update({b + "ln1.weight": flat(q("attn_norm.weight")), b + "ln1.bias": flat(q("attn_norm.bias")),
                      b + "ln2.weight": flat(q("ffn_norm.weight")), b + "ln2.bias": flat(q("ffn_norm.bias")),
                      b + "att.k_k": vec(q("attn.k_k")), b + "att.k_a": vec(q("attn.k_a")),
                      b + "att.r_k": q("attn.r_k"),
                      b + "att.receptance.weight": q("attn.r_proj.weight"),
                      b + "att.key.weight": q("attn.k_proj.weight"),
                      b + "att.value.weight": q("attn.v_proj.weight"),
                      b + "att.output.weight": q("attn.o_proj.weight"),
                      b + "att.ln_x.weight": flat(q("attn.g_norm.weight")),
                      b + "att.ln_x.bias": flat(q("attn.g_norm.bias")),
                      b + "ffn.x_k": vec(q("ffn.x_k")),
                      b + "ffn.key.weight": q("ffn.key.weight"), b + "ffn.value.weight": q("ffn.value.weight")})
            w.update({b + f"att.x_{c}": vec(q(f"attn.x_{c}")) for c in "rwkvag"})
            for x in LORAS:
                if x == "v" and i == 0:
                    continue
                w[b + f"att.{x}1"] = np.ascontiguousarray(q(f"attn.{x}_lora.lora.0.weight").T)
                w[b + f"att.{x}2"] = np.ascontiguousarray(q(f"attn.{x}_lora.lora.2.weight").T)
                if x != "g":
                    w[b + f"att.{x}0"] = vec(q(f"attn.{x}_lora.lora.2.bias"))
    except KeyError as e:
        raise CheckpointError(f"Hugging Face / fla RWKV-7 checkpoint without tensor {e}") from e
    return w


def write_hf(directory, weights, tokenizer=None):
    """A Hugging Face model folder: config.json + model.safetensors (fla names), float32, and the
    tokenizer.json when the model has a Hugging Face tokenizer."""
    d = Path(directory)
    d.mkdir(parents=True, exist_ok=True)
    tensors, config = to_hf({k: np.asarray(v, np.float32) for k, v in weights.items()})
    save_safetensors(d / "model.safetensors", tensors, metadata={"format": "pt"})
    (d / "config.json").write_text(json.dumps(config, indent=1))
    from .tokenizer import HFTokenizer
    if isinstance(tokenizer, HFTokenizer):
        tokenizer._tok.save(str(d / "tokenizer.json"))
    return d


def read_hf(path, dtype=None):
    """Official-keyed weights from a Hugging Face folder (config.json + *.safetensors shards) or
    one safetensors file with fla's key names."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors")) if path.is_dir() else [path]
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files in this folder")
    tensors = {}
    for f in files:
        tensors.update(read_checkpoint(f, dtype=dtype, progress=False))
    return from_hf(tensors)
