"""What people fine-tune on top of a base model: LoRA adapters and state-tuned initial states
(JL-er/RWKV-PEFT conventions; docs/formats.md).

    merged = merge_lora(base, lora, alpha=32)          # dicts official key -> array
    state = initial_state(read_checkpoint("state.pth"), model.config)

An adapter is read by `read_adapter` from any of the files people have:
    RWKV-PEFT (.pth/.safetensors)   official names: blocks.0.att.key.lora_A (r, in) / lora_B (out, r),
                                    maybe with "model." in front, plus other trained tensors
    PEFT folder (adapter_model.safetensors + adapter_config.json, fla names):
                                    base_model.model.model.layers.0.attn.k_proj.lora_A.weight
    llama.cpp LoRA GGUF (general.type "adapter"): blk.0.time_mix_key.weight.lora_a (r, in) /
                                    .lora_b (out, r), GGUF tensor names
Each becomes {official key: array} with the official `X.lora_A` / `X.lora_B` names.
"""

from __future__ import annotations

import json

import numpy as np

from ..checks import check_float
from ..errors import CheckpointError
from ..model import State
from .container import read_head, resolve_model_path
from .gguf import GGUFTensors, official_gguf_name
from .gguf_header import read_gguf_header
from .hf import official_name, shard_files
from .reading import read_checkpoint
from .source import InMemory, TensorInfo, TensorSource


def _strip(key):
    for prefix in ("base_model.model.", "model."):
        if key.startswith(prefix) and not key.startswith("model.layers."):
            key = key[len(prefix):]
    return key


def lora_weight(W, A, B, alpha):
    """The matrix a LoRA adapter makes of W: W + (B @ A) * alpha / r, r = B's columns (A is
    (r, in), B is (out, r)). Computed in the arrays' own precision (the trainer's float32 or
    float64, or CuPy arrays); merge-lora calls it in float64."""
    return W + (B @ A) * (alpha / B.shape[1])


def _merge_one(W, A, B, alpha, stem):
    """lora_weight for one matrix of a file, shapes checked, in float64. float32 result."""
    A, B = np.asarray(A, np.float64), np.asarray(B, np.float64)
    r = B.shape[1]
    if A.shape[0] != r or (B.shape[0], A.shape[1]) != tuple(W.shape):
        raise ValueError(f"LoRA {stem}: A {A.shape} and B {B.shape} do not fit W {tuple(W.shape)}")
    return lora_weight(np.asarray(W, np.float64), A, B, alpha).astype(np.float32)


def _pairs(lora, base_keys):
    stems = sorted(k[:-len(".lora_A")] for k in lora if k.endswith(".lora_A"))
    if not stems:
        raise ValueError("no LoRA pairs (X.lora_A and X.lora_B) in the LoRA checkpoint")
    for stem in stems:
        if stem + ".lora_B" not in lora:
            raise ValueError(f"{stem}.lora_A has no {stem}.lora_B")
        if stem + ".weight" not in base_keys:
            raise ValueError(f"LoRA for {stem}.weight, which the base model does not have")
    return stems


def merge_lora(base, lora, alpha):
    """Merge an RWKV-PEFT LoRA checkpoint into base weights, as its merge_lora.py does:
    every non-LoRA tensor of the LoRA file (trained ln/time/emb/head parts) replaces or joins
    the base's; then each `X.weight` with `X.lora_A` (r, in) and `X.lora_B` (out, r) becomes
    W + (B @ A) * alpha / r. Returns a new dict (float32 where a merge happened)."""
    alpha = check_float("alpha", alpha)      # a NaN alpha would make every merged matrix NaN
    lora = {_strip(k): v for k, v in lora.items()}
    out = dict(base)
    out.update({k: v for k, v in lora.items() if "lora" not in k})
    for stem in _pairs(lora, out):
        out[stem + ".weight"] = _merge_one(out[stem + ".weight"], lora[stem + ".lora_A"],
                                           lora[stem + ".lora_B"], alpha, stem)
    return out


class LoraMerged(TensorSource):
    """merge_lora as a TensorSource: a base model file with an adapter applied tensor by
    tensor, so merging a large model never holds it whole (merge-lora streams its output)."""

    def __init__(self, base, lora, alpha):
        self.base, self.alpha = base, check_float("alpha", alpha)
        self.path, self.format, self.tokenizer = base.path, base.format, base.tokenizer
        self.lora = {_strip(k): v for k, v in lora.items()}
        self.replaced = {k: v for k, v in self.lora.items() if "lora" not in k}
        self.stems = set(_pairs(self.lora, set(base.tensors()) | set(self.replaced)))

    def tensors(self):
        infos = dict(self.base.tensors())
        infos.update({k: TensorInfo(tuple(np.shape(v)), "fp32") for k, v in self.replaced.items()})
        return infos

    def read(self, key, dtype=None):
        if key in self.replaced:
            W = InMemory({key: self.replaced[key]}).read(key, "float32")
        else:
            W = self.base.read(key, "float32")
        stem = key[: -len(".weight")]
        if stem in self.stems:
            W = _merge_one(W, self.lora[stem + ".lora_A"], self.lora[stem + ".lora_B"],
                           self.alpha, stem)
        return InMemory({key: W}).read(key, dtype)


def read_adapter(path):
    """A LoRA adapter file (any layout in the module docstring) as {official key: array}, with
    `X.lora_A` (r, in) / `X.lora_B` (out, r) names. Also returns the alpha the file records
    (PEFT's lora_alpha, GGUF's adapter.lora.alpha), or None."""
    path = resolve_model_path(path)
    if path.is_dir():
        lora, alpha = _read_peft_folder(path)
    else:
        head, size = read_head(path, 4)
        if head == b"GGUF":
            lora, alpha = _read_gguf_adapter(path)
        else:
            tensors = read_checkpoint(path, dtype="float32", progress=False)
            lora, alpha = {_official(k, path): v for k, v in tensors.items()}, None
    if not any(k.endswith(".lora_A") for k in lora):
        raise CheckpointError(f"{path} holds no LoRA pairs (X.lora_A and X.lora_B; first keys: "
                              f"{', '.join(list(lora)[:3])}); give the adapter file: RWKV-PEFT "
                              "(.pth/.safetensors), a PEFT folder or a llama.cpp LoRA GGUF")
    return lora, alpha


def _official(key, path):
    """An adapter tensor name -> the official one: prefixes stripped, PEFT's ".lora_A.weight"
    shortened to ".lora_A", fla module names renamed."""
    key = _strip(key)
    for part in ("lora_A", "lora_B"):
        key = key.replace(f".{part}.weight", f".{part}")
    if key.startswith("model.layers."):
        stem, part = key.rsplit(".", 1)
        official = official_name(stem + ".weight")
        if official is None:
            raise CheckpointError(f"{path}: LoRA on {stem}, which has no official RWKV-7 key; "
                                  "tinyrwkv merges LoRA on the Linear layers (r/k/v/o_proj, "
                                  "ffn.key/value)")
        key = official[: -len(".weight")] + "." + part
    return key


def _read_peft_folder(path):
    """A PEFT adapter folder: adapter_model.safetensors (or the folder's only .safetensors:
    hf.shard_files, so a stray copy beside it is never merged in) and adapter_config.json."""
    lora = {}
    for f in shard_files(path, single="adapter_model.safetensors",
                         index_name="adapter_model.safetensors.index.json"):
        lora.update({_official(k, f): v
                     for k, v in read_checkpoint(f, dtype="float32", progress=False).items()})
    config = path / "adapter_config.json"
    return lora, (_peft_alpha(config) if config.is_file() else None)


def _peft_alpha(config):
    """lora_alpha from a PEFT adapter_config.json (None if it has none)."""
    try:
        data = json.loads(config.read_bytes()[: 2**20].decode("utf-8"))   # a few hundred bytes
    except (OSError, UnicodeDecodeError, ValueError, RecursionError) as e:
        raise CheckpointError(f"{config} is not valid JSON ({type(e).__name__}: {e}); "
                              "fix or remove it") from None
    alpha = data.get("lora_alpha") if isinstance(data, dict) else None
    if alpha is not None and (isinstance(alpha, bool) or not isinstance(alpha, (int, float))):
        raise CheckpointError(f"{config}: lora_alpha is {alpha!r}, not a number; fix it")
    return alpha


def _read_gguf_adapter(path):
    """llama.cpp's LoRA GGUF: "<GGUF name>.lora_a" (r, in) and ".lora_b" (out, r), read with our
    bounded header parser (formats/gguf_header.py)."""
    header = read_gguf_header(path)
    if header.string("general.type") != "adapter":
        raise CheckpointError(f"{path} is a GGUF model, not a LoRA adapter; give the adapter "
                              "(general.type 'adapter') as the LoRA argument")
    tensors = GGUFTensors(header)
    lora = {}
    for name in header.tensors:
        stem, _, part = name.rpartition(".")
        official = official_gguf_name(stem)
        if official is None or part not in ("lora_a", "lora_b"):
            raise CheckpointError(f"{path}: adapter tensor {name} has no official RWKV-7 key "
                                  "(tinyrwkv merges LoRA on the Linear layers)")
        lora[official[: -len(".weight")] + ".lora_" + part[-1].upper()] = \
            tensors.read(name, "float32")
    alpha = header.scalar_number("adapter.lora.alpha")
    return lora, (float(alpha) if alpha is not None else None)


def initial_state(tensors, config):
    """A State from a state-tuning checkpoint: blocks.{i}.att.time_state (H, N, N), [value][key]
    like the official state (docs/formats.md); token-shift states are zero."""
    tensors = {_strip(k): v for k, v in tensors.items()}
    state = State.zeros(config)
    found = 0
    for i in range(config.n_layer):
        ts = tensors.get(f"blocks.{i}.att.time_state")
        if ts is None:
            continue
        ts = np.asarray(ts, np.float32)
        if ts.shape != state.wkv[i].shape:
            raise ValueError(f"blocks.{i}.att.time_state is {ts.shape}; this model's layer state "
                             f"is {state.wkv[i].shape}")
        state.wkv[i] = ts
        found += 1
    if found == 0:
        raise ValueError("no blocks.{i}.att.time_state tensors: not a state-tuning checkpoint")
    if found != config.n_layer:
        raise ValueError(f"time_state for {found} of {config.n_layer} layers")
    return state


def read_start_state(path, config):
    """A state to start from, from either kind of file: a tinyrwkv state (.npz, `--save-state`)
    or a state-tuning checkpoint (.pth/.safetensors with blocks.{i}.att.time_state: RWKV-PEFT's,
    or `tinyrwkv train --state-tune`'s)."""
    from . import open_model
    from .state_file import load_state
    if str(path).lower().endswith(".npz"):
        return load_state(path, config)
    return initial_state(open_model(path).read_all("float32", progress=False), config)
