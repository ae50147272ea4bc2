"""What people fine-tune on top of a base model: LoRA adapters and state-tuned initial states
(JL-er/RWKV-PEFT conventions, rwkv7.md §8).

    merged = merge_lora(base, lora, alpha=32)          # dicts official key -> array
    state = initial_state(read_checkpoint("state.pth"), model.config)
"""

from __future__ import annotations

import numpy as np

from .model import State


def _strip(key):
    return key[len("model."):] if key.startswith("model.") else key


def merge_lora(base, lora, alpha):
    """Merge an RWKV-PEFT LoRA checkpoint into base weights, as its merge_lora.py does:
    every non-LoRA tensor of the LoRA file (trained ln/time/emb/head parts) replaces or joins
    the base's; then each `X.weight` with `X.lora_A` (r, in) and `X.lora_B` (out, r) becomes
    W + (B @ A) * alpha / r. Returns a new dict (float32 where a merge happened)."""
    lora = {_strip(k): v for k, v in lora.items()}
    out = dict(base)
    out.update({k: v for k, v in lora.items() if "lora" not in k})
    pairs = sorted(k[:-len(".lora_A")] for k in lora if k.endswith(".lora_A"))
    if not pairs:
        raise ValueError("no LoRA pairs (X.lora_A and X.lora_B) in the LoRA checkpoint")
    for stem in pairs:
        A, B = np.asarray(lora[stem + ".lora_A"], np.float64), lora.get(stem + ".lora_B")
        if B is None:
            raise ValueError(f"{stem}.lora_A has no {stem}.lora_B")
        B = np.asarray(B, np.float64)
        W = out.get(stem + ".weight")
        if W is None:
            raise ValueError(f"LoRA for {stem}.weight, which the base model does not have")
        r = B.shape[1]
        if A.shape[0] != r or (B.shape[0], A.shape[1]) != W.shape:
            raise ValueError(f"LoRA {stem}: A {A.shape} and B {B.shape} do not fit W {W.shape}")
        out[stem + ".weight"] = (np.asarray(W, np.float64) + (B @ A) * (alpha / r)).astype(np.float32)
    return out


def initial_state(tensors, config):
    """A State from a state-tuning checkpoint: blocks.{i}.att.time_state (H, N, N), [value][key]
    like the official state (rwkv7.md §8.1); token-shift states are zero."""
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
