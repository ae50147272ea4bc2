"""Hugging Face / flash-linear-attention format (`RWKV7ForCausalLM`: config.json + safetensors
with fla's key names), in and out: a folder, or one safetensors file with fla's names.

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
fla's GroupNorm eps is head_dim * norm_eps = 64 * 1e-5, the official 64e-5. fla has no
value-residual LoRA in layer 0 (it is unused), so a model read from fla has no blocks.0.att.v*.
"""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..files import atomic_folder
from ..schema import ModelSize, sizes_from_shapes
from .reading import Container
from .renamed import Renamed
from .safetensors import write_safetensors
from .source import as_source

# official name inside a block -> (fla name inside a layer, how it is stored: formats/renamed.py)
_BLOCK = {"ln1.weight": "attn_norm.weight", "ln1.bias": "attn_norm.bias",
          "ln2.weight": "ffn_norm.weight", "ln2.bias": "ffn_norm.bias",
          "att.k_k": "attn.k_k", "att.k_a": "attn.k_a", "att.r_k": "attn.r_k",
          "att.receptance.weight": "attn.r_proj.weight", "att.key.weight": "attn.k_proj.weight",
          "att.value.weight": "attn.v_proj.weight", "att.output.weight": "attn.o_proj.weight",
          "att.ln_x.weight": "attn.g_norm.weight", "att.ln_x.bias": "attn.g_norm.bias",
          "ffn.x_k": "ffn.x_k", "ffn.key.weight": "ffn.key.weight",
          "ffn.value.weight": "ffn.value.weight"}
_BLOCK.update({f"att.x_{c}": f"attn.x_{c}" for c in "rwkvag"})

# fla stores these (1, 1, C) official vectors as (C,)
_FLAT = ("att.k_k", "att.k_a", "ffn.x_k", "att.w0", "att.a0", "att.v0")


def fla_table(n_layer):
    """{official key: (fla name, how)} for an n_layer model (no layer-0 v0/v1/v2)."""
    table = {"emb.weight": ("model.embeddings.weight", "same"),
             "blocks.0.ln0.weight": ("model.layers.0.pre_norm.weight", "same"),
             "blocks.0.ln0.bias": ("model.layers.0.pre_norm.bias", "same")}
    for i in range(n_layer):
        b, h = f"blocks.{i}.", f"model.layers.{i}."
        table.update({b + k: (h + name, "same") for k, name in _BLOCK.items()})
        for x in "wavg":
            if x == "v" and i == 0:
                continue                                    # fla has no v_lora in layer 0
            table[b + f"att.{x}1"] = (h + f"attn.{x}_lora.lora.0.weight", "T")    # (Dx, C)
            table[b + f"att.{x}2"] = (h + f"attn.{x}_lora.lora.2.weight", "T")    # (C, Dx)
            if x != "g":                                    # the gate LoRA has no bias
                table[b + f"att.{x}0"] = (h + f"attn.{x}_lora.lora.2.bias", "same")
    table.update({"ln_out.weight": ("model.norm.weight", "same"),
                  "ln_out.bias": ("model.norm.bias", "same"),
                  "head.weight": ("lm_head.weight", "same")})
    return table


def is_hf(keys):
    return any(k.startswith("model.layers.") or k == "model.embeddings.weight" for k in keys)


def official_name(fla_name):
    """The official key for a fla tensor name (None if it has none): for adapters (formats/lora.py)."""
    layer = fla_name.split(".")[2] if fla_name.startswith("model.layers.") else "0"
    n_layer = int(layer) + 1 if layer.isdigit() else 1
    inverse = {name: key for key, (name, _) in fla_table(n_layer).items()}
    return inverse.get(fla_name)


class _Shards:
    """The safetensors files of a model (one, or a folder's shards) as one set of tensors."""

    def __init__(self, files, strip_prefix="rwkv7."):
        self.where = {}
        for container in files:
            for name in container.tensors():
                self.where[name.removeprefix(strip_prefix)] = (container, name)

    def infos(self):
        return {name: c.tensors()[stored] for name, (c, stored) in self.where.items()}

    def read(self, name, dtype=None):
        container, stored = self.where[name]
        return container.read(stored, dtype)


def _sizes(infos, path):
    """The model's sizes from fla's shapes (R5): V, C from the embedding, H, N from r_k, F from
    ffn.key, the ranks from the rows of each lora.0 (Dv from layer 1: layer 0 has none)."""
    def rows(name):
        return infos[name].shape[0]
    try:
        L = 1 + max(int(k.split(".")[2]) for k in infos if k.startswith("model.layers."))
        V, C = infos["model.embeddings.weight"].shape
        H, N = infos["model.layers.0.attn.r_k"].shape
        lora = lambda x, i: rows(f"model.layers.{i}.attn.{x}_lora.lora.0.weight")
        ranks = (lora("w", 0), lora("a", 0), lora("v", 1) if L > 1 else None, lora("g", 0))
        return ModelSize(L, C, V, N, rows("model.layers.0.ffn.key.weight"), ranks)
    except (ValueError, KeyError) as e:
        raise CheckpointError(f"{path} has fla names but lacks a tensor that gives an RWKV-7 "
                              f"model's sizes ({type(e).__name__}: {e}); it needs "
                              "model.embeddings.weight, attn.r_k (H, N), ffn.key.weight and the "
                              "lora.0 matrices: re-convert it from the original model") from e


def open_fla(path, containers, tokenizer=None):
    """A Renamed source over fla-named safetensors (a folder's files, or one file)."""
    shards = _Shards(containers)
    infos = shards.infos()
    size = _sizes(infos, path)
    shapes = size.shapes(layer0_v=False)
    fmt = "Hugging Face / fla folder" if Path(path).is_dir() else "safetensors with fla names"
    return Renamed(path, fmt, fla_table(size.n_layer), shapes, shards, tokenizer=tokenizer)


def open_folder(path):
    """A Hugging Face / fla model folder: config.json, *.safetensors, maybe tokenizer.json."""
    path = Path(path)
    files = sorted(path.glob("*.safetensors"))
    if not files:
        raise CheckpointError(f"{path}: no .safetensors files in this folder; a Hugging Face / "
                              "fla model folder has config.json and model*.safetensors")
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from ..tokenizer import HFTokenizer
        tokenizer = HFTokenizer(path / "tokenizer.json")
    return open_fla(path, [Container(f) for f in files], tokenizer)


def hf_config(size):
    """config.json of fla's RWKV7ForCausalLM for a ModelSize."""
    Dw, Da, Dv, Dg = size.ranks
    return {"model_type": "rwkv7", "architectures": ["RWKV7ForCausalLM"],
            "hidden_size": size.n_embd, "num_hidden_layers": size.n_layer,
            "head_dim": size.head_size, "num_heads": size.n_embd // size.head_size,
            "intermediate_size": size.dim_ffn, "hidden_ratio": size.dim_ffn / size.n_embd,
            "decay_low_rank_dim": Dw, "a_low_rank_dim": Da,
            "v_low_rank_dim": Dv or Da, "gate_low_rank_dim": Dg,
            "vocab_size": size.vocab_size, "norm_eps": 1e-5, "norm_first": True,
            "norm_bias": True, "hidden_act": "sqrelu", "tie_word_embeddings": False,
            "attn_mode": "chunk", "fuse_norm": True}


def fla_shape(shape, how, key):
    """The shape fla stores an official tensor of `shape` in."""
    if how == "T":
        return tuple(reversed(shape))                    # (C, D) -> (D, C)
    if key.split(".", 2)[-1] in _FLAT or len(shape) == 1:
        return (math.prod(shape),)                       # (1, 1, C) -> (C,)
    return tuple(shape)


# What write_hf writes: an existing folder holding anything else is not replaced (files.py).
HF_FILES = ("config.json", "model.safetensors", "tokenizer.json")


def write_hf(directory, weights, tokenizer=None, dtype="float32"):
    """A Hugging Face model folder: config.json + model.safetensors (fla names), float32 (or
    dtype "float16"/"bfloat16"), streamed a tensor at a time; and the tokenizer.json when the
    model has a Hugging Face tokenizer. `weights`: {official key: array} or a TensorSource.
    The folder is written whole beside `directory` and swapped in (files.atomic_folder); an
    existing `directory` is replaced only if it holds nothing but HF_FILES."""
    source = as_source(weights)
    infos = source.tensors()
    size = sizes_from_shapes({k: t.shape for k, t in infos.items()})
    code = {"float32": "F32", "float16": "F16", "bfloat16": "BF16"}[dtype]
    entries, official = {}, {}
    for key, (name, how) in fla_table(size.n_layer).items():
        entries[name] = (code, fla_shape(infos[key].shape, how, key))
        official[name] = (key, how)

    def fetch(name):
        key, how = official[name]
        array = source.read(key, dtype)
        array = array.T if how == "T" else array
        return np.ascontiguousarray(array).reshape(entries[name][1])
    from ..tokenizer import HFTokenizer
    with atomic_folder(directory, HF_FILES) as d:       # a new folder, swapped in at the end
        write_safetensors(d / "model.safetensors", entries, fetch, metadata={"format": "pt"})
        (d / "config.json").write_text(json.dumps(hf_config(size), indent=1))
        if isinstance(tokenizer, HFTokenizer):
            tokenizer._tok.save(str(d / "tokenizer.json"))
    return Path(directory)
