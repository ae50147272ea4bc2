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
import re
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..files import atomic_folder
from ..schema import ModelSize, layer_count, sizes_from_shapes
from .container import regular_file
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
    """The official key for a fla tensor name (None if it has none): for adapters (formats/lora.py).
    Looked up in the table of one layer, so a name with a huge layer number costs nothing."""
    match = re.fullmatch(r"model\.layers\.(0|[1-9][0-9]*)\.(.+)", fla_name)
    if match is None:
        return _TOP_LEVEL.get(fla_name)
    layer, rest = match.groups()
    key = (_LAYER_0 if layer == "0" else _LAYER_N).get(rest)
    return None if key is None else f"blocks.{layer}.{key}"


def _layer_names(table, i):
    """{fla name inside layer i: official name inside block i} from a table."""
    h, b = f"model.layers.{i}.", f"blocks.{i}."
    return {name[len(h):]: key[len(b):] for key, (name, _) in table.items()
            if name.startswith(h) and key.startswith(b)}


_LAYER_0, _LAYER_N = _layer_names(fla_table(2), 0), _layer_names(fla_table(2), 1)
_TOP_LEVEL = {name: key for key, (name, _) in fla_table(0).items()}


class _Shards:
    """The safetensors files of a model (one, or a folder's shards) as one set of tensors. A
    name in two files (after the "rwkv7." prefix some exports add is stripped) is an error:
    which copy is the model cannot be known."""

    def __init__(self, path, files, strip_prefix="rwkv7."):
        self.where = {}
        self.files = [c.path for c in files]
        for container in files:
            for name in container.tensors():
                short = name.removeprefix(strip_prefix)
                if short in self.where:
                    other = self.where[short][0].path
                    raise CheckpointError(
                        f"{path}: the tensor {short!r} is in both {other.name} and "
                        f"{container.path.name}; a model has each tensor once: remove the stray "
                        "file (or fix model.safetensors.index.json)")
                self.where[short] = (container, name)

    def infos(self):
        return {name: c.tensors()[stored] for name, (c, stored) in self.where.items()}

    def read(self, name, dtype=None):
        container, stored = self.where[name]
        return container.read(stored, dtype)


def _sizes(infos, path):
    """The model's sizes from fla's shapes (R5): V, C from the embedding, H, N from r_k, F from
    ffn.key, the ranks from the rows of each lora.0 (Dv from layer 1: layer 0 has none). L from
    the layer numbers, bounded by the tensors present (schema.layer_count)."""
    def matrix(name):
        info = infos.get(name)
        if info is None or len(info.shape) != 2:
            what = "it is missing" if info is None else f"it is {info.shape}, not 2-D"
            raise CheckpointError(f"{path} has fla names but is not a complete RWKV-7 model: "
                                  f"the sizes are read from {name}, and {what}; it needs "
                                  "model.embeddings.weight, attn.r_k (H, N), ffn.key.weight and "
                                  "the lora.0 matrices: re-convert it from the original model")
        return info.shape
    L = layer_count(infos, "model.layers.", path)
    V, C = matrix("model.embeddings.weight")
    H, N = matrix("model.layers.0.attn.r_k")
    lora = lambda x, i: matrix(f"model.layers.{i}.attn.{x}_lora.lora.0.weight")[0]
    ranks = (lora("w", 0), lora("a", 0), lora("v", 1) if L > 1 else None, lora("g", 0))
    return ModelSize(L, C, V, N, matrix("model.layers.0.ffn.key.weight")[0], ranks)


def open_fla(path, containers, tokenizer=None):
    """A Renamed source over fla-named safetensors (a folder's files, or one file)."""
    shards = _Shards(path, containers)
    infos = shards.infos()
    size = _sizes(infos, path)
    shapes = size.shapes(layer0_v=False)
    fmt = "Hugging Face / fla folder" if Path(path).is_dir() else "safetensors with fla names"
    source = Renamed(path, fmt, fla_table(size.n_layer), shapes, shards, tokenizer=tokenizer)
    source.files = shards.files
    return source


def open_folder(path):
    """A Hugging Face / fla model folder: config.json, the safetensors files its index names
    (shard_files), maybe tokenizer.json."""
    path = Path(path)
    files = shard_files(path)
    tokenizer = None
    if (path / "tokenizer.json").is_file():
        from ..tokenizer import HFTokenizer
        tokenizer = HFTokenizer(path / "tokenizer.json")
    containers = [Container(f) for f in files]
    check_index(path, containers)
    return open_fla(path, containers, tokenizer)


INDEX = "model.safetensors.index.json"
# The largest index file read: real ones are tens of kB (a name and a file name per tensor);
# this bound keeps a crafted one from costing more than a glance.
MAX_INDEX_BYTES = 64 * 2**20


def shard_files(folder, single="model.safetensors", index_name=INDEX):
    """The safetensors files that hold a folder's model, as transformers picks them: with
    `index_name`, exactly the shards its weight_map names (each must exist; a stray backup
    `*.safetensors` beside them is not read); without one, `single` alone, or the folder's only
    *.safetensors. Several unindexed files are an error naming them: merging them could let a
    stray copy replace weights. (After reading, the index's tensor -> shard map is checked
    against the shards: check_index.)"""
    folder = Path(folder)
    index = folder / index_name
    if index.exists():
        return [folder / name for name in sorted(set(_weight_map(index).values()))]
    if (folder / single).is_file():
        return [folder / single]
    files = sorted(folder.glob("*.safetensors"))
    if len(files) == 1:
        return files
    if not files:
        raise CheckpointError(f"{folder}: no .safetensors files in this folder; a Hugging Face / "
                              f"fla model folder has config.json and {single}")
    names = ", ".join(f.name for f in files[:6]) + (" …" if len(files) > 6 else "")
    raise CheckpointError(f"{folder} has {len(files)} .safetensors files ({names}) and no "
                          f"{index_name} saying which hold the model; keep the model's files "
                          f"only, or add the index (as transformers' save_pretrained writes it)")


def _weight_map(index):
    """{tensor name: shard file name} from a safetensors index, checked: a JSON object with a
    "weight_map" object of strings, each a plain file name in the index's folder (never a path
    elsewhere) that exists."""
    size = regular_file(index)
    if size > MAX_INDEX_BYTES:
        raise CheckpointError(f"{index} is {size:,} bytes, far more than any safetensors index "
                              "(a name per tensor); the file is damaged: re-download it")
    try:
        data = json.loads(index.read_bytes().decode("utf-8"))
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{index} is not valid JSON ({type(e).__name__}: {e}); "
                              "re-download it") from None
    weight_map = data.get("weight_map") if isinstance(data, dict) else None
    if not isinstance(weight_map, dict) or not all(
            isinstance(v, str) for v in weight_map.values()):
        raise CheckpointError(f"{index} has no weight_map of tensor names to shard file names; "
                              "re-download it")
    for shard in sorted(set(weight_map.values())):
        if Path(shard).name != shard or shard in ("", ".", ".."):
            raise CheckpointError(f"{index} names the shard {shard!r}, which is not a file name "
                                  "in its folder; re-download the index")
        if not (index.parent / shard).exists():
            raise CheckpointError(f"{index.parent}: the shard {shard} named in {index.name} is "
                                  "missing; download it (or every shard again)")
    return weight_map


def check_index(folder, containers, index_name=INDEX):
    """When the folder has an index: every tensor it lists is in the shard it names, and every
    tensor of those shards is listed (the index is the model's table of contents)."""
    index = Path(folder) / index_name
    if not index.exists():
        return
    weight_map = _weight_map(index)
    for container in containers:
        held = set(container.tensors())
        listed = {name for name, shard in weight_map.items() if shard == container.path.name}
        for names, problem in ((listed - held, f"listed in {index.name} for {container.path.name} "
                                               "but not in it"),
                               (held - listed, f"in {container.path.name} but listed in "
                                               f"{index.name} for another shard or not at all")):
            if names:
                shown = ", ".join(sorted(names)[:3]) + (" …" if len(names) > 3 else "")
                raise CheckpointError(f"{folder}: {len(names)} tensors {problem} ({shown}); the "
                                      "index and its shards disagree: re-download the folder")


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
