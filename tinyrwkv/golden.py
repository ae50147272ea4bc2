"""`tinyrwkv golden --out DIR`: golden vectors an implementation in any language can test against.

For each case: a deterministic synthetic checkpoint (`.safetensors` with the official key names,
float32; `.pth` too when torch is installed), token ids, and the float64 oracle's expected
outputs in `.npz` files: logits of every token (sequence form from the zero state), the final
state, and a full trace (every intermediate, names in tinyrwkv/oracle.py). Raw little-endian
`.bin` copies of ids, logits and final state are written too, for languages without an npz
reader. `manifest.json` describes everything: shapes, dtypes, files with SHA-256, the state
layout, and the suggested tolerances.

The folder is written whole beside DIR and swapped in at the end (tinyrwkv/files.py): a kill or an
error leaves the old DIR or none; an existing DIR that holds other files is refused, not replaced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import oracle
from .files import atomic_folder
from .formats import save_safetensors
from .model import RWKV7
from .synthetic import make_weights

# name, (layers, width, vocab, head size, DeepEmbed, LoRA ranks Dw/Da/Dv/Dg or None), tokens
CASES = [
    ("tiny_L1_C64", (1, 64, 97, 64, False, None), 13),
    ("small_L2_C128_V1001", (2, 128, 1001, 64, False, None), 24),
    ("heads32_L3_C96", (3, 96, 257, 32, False, None), 17),
    ("deepembed_L2_C128", (2, 128, 301, 64, True, None), 19),
    # the released 0.1B model's unequal ranks (docs/architecture.md §8): a reader that assumes
    # one rank for all four LoRAs, or takes Dv from layer 0, fails here
    ("official_ranks_L2_C256", (2, 256, 1001, 64, False, (64, 64, 32, 128)), 33),
]
SEED = 20261126


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def golden_files():
    """Every name write_golden may put in its folder (whether torch is installed or not)."""
    per_case = ("{}.safetensors", "{}.pth", "{}_expected.npz", "{}_trace.npz",
                *(f"{{}}_{key}.bin" for key in ("ids", "logits", "wkv", "att_shift", "ffn_shift")))
    return {"manifest.json",
            *(pattern.format(name) for name, _, _ in CASES for pattern in per_case)}


def write_golden(out):
    """Write the golden folder `out` (module docstring); returns the manifest."""
    with atomic_folder(out, golden_files()) as folder:
        return _write_cases(folder)


def _write_cases(out):
    try:
        import torch
    except ImportError:
        torch = None
    manifest = {"format": "tinyrwkv-golden-v1", "seed": SEED,
                "state_layout": "[layer][head][value][key] (the official layout)",
                "logits": "float64, sequence form from the zero state, one row per token",
                "tolerances_max_abs_over_std": oracle.TOLERANCES,
                "metric": "max|yours - expected| / std(expected), per tensor",
                "cases": []}
    for n, (name, (L, C, V, N, deep, ranks), T) in enumerate(CASES):
        w = make_weights(L, C, V, head_size=N, deep_embed=deep, ranks=ranks, seed=SEED + n)
        ids = np.random.default_rng(SEED + n).integers(0, V, T)
        model = RWKV7(w, dtype="float64")
        logits, state = model.forward(ids, full_output=True)
        files = {}
        st = out / f"{name}.safetensors"
        save_safetensors(st, w, metadata={"golden": name})
        files["safetensors"] = st
        if torch is not None:
            pth = out / f"{name}.pth"
            torch.save({k: torch.tensor(v) for k, v in w.items()}, pth)
            files["pth"] = pth
        exp = out / f"{name}_expected.npz"
        np.savez(exp, ids=ids, logits=logits, att_shift=state.att_shift, wkv=state.wkv,
                 ffn_shift=state.ffn_shift)
        files["expected"] = exp
        tr = out / f"{name}_trace.npz"
        oracle.save_trace(tr, oracle.trace(model, ids), meta={"case": name})
        files["trace"] = tr
        for key, arr in (("ids", ids.astype("<i4")), ("logits", logits.astype("<f8")),
                         ("wkv", state.wkv.astype("<f8")), ("att_shift", state.att_shift.astype("<f8")),
                         ("ffn_shift", state.ffn_shift.astype("<f8"))):
            path = out / f"{name}_{key}.bin"
            arr.tofile(path)
            files[f"{key}.bin"] = path
        cfg = model.config
        manifest["cases"].append({
            "name": name, "variant": cfg.variant,
            "config": {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "head_size",
                                                     "vocab_size", "dim_ffn", "d_decay", "d_aaa",
                                                     "d_mv", "d_gate", "d_deepembed")},
            "ids": ids.tolist(),
            "shapes": {"logits": list(logits.shape), "wkv": list(state.wkv.shape),
                       "att_shift": list(state.att_shift.shape),
                       "ffn_shift": list(state.ffn_shift.shape)},
            "bin_dtypes": {"ids": "int32 little-endian", "others": "float64 little-endian, C order"},
            "files": {k: {"path": p.name, "sha256": _sha(p)} for k, p in files.items()},
            "notes": ("DeepEmbed: the official package needs RWKV_DE_VERSION=1" if deep else
                      "plain x070"),
        })
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    return manifest
