"""Model shapes and the seeded synthetic checkpoints the benchmark runs on (see __init__.py)."""

from __future__ import annotations

import os
import re
import zlib
from dataclasses import dataclass
from pathlib import Path

from . import GENERATOR_VERSION

# Bytes per weight of the big matrices (Linear and head) by storage / GGUF type.
BIG_BYTES = {"float32": 4.0, "f32": 4.0, "bfloat16": 2.0, "float16": 2.0, "f16": 2.0,
             "int8": 34 / 32, "q8_0": 34 / 32}


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A model shape. F = 4C, head size N = 64 (as in every released RWKV-7)."""
    name: str
    n_layer: int
    n_embd: int
    vocab_size: int
    ranks: tuple            # LoRA ranks (Dw, Da, Dv, Dg)
    head_size: int = 64
    source: str = ""        # a real checkpoint (the shipped model) instead of synthetic weights

    @property
    def dim_ffn(self):
        return 4 * self.n_embd

    def tensor_shapes(self):
        """Official key -> stored shape (the official layout), layer 0's v0/v1/v2 included as in
        released files."""
        L, C, V, N, F = self.n_layer, self.n_embd, self.vocab_size, self.head_size, self.dim_ffn
        H = C // N
        Dw, Da, Dv, Dg = self.ranks
        vec = (1, 1, C)
        out = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
        for i in range(L):
            b = f"blocks.{i}."
            out.update({b + "ln1.weight": (C,), b + "ln1.bias": (C,),
                        b + "ln2.weight": (C,), b + "ln2.bias": (C,)})
            out.update({b + f"att.x_{c}": vec for c in "rwkvag"})
            out.update({
                b + "att.w0": vec, b + "att.w1": (C, Dw), b + "att.w2": (Dw, C),
                b + "att.a0": vec, b + "att.a1": (C, Da), b + "att.a2": (Da, C),
                b + "att.v0": vec, b + "att.v1": (C, Dv), b + "att.v2": (Dv, C),
                b + "att.g1": (C, Dg), b + "att.g2": (Dg, C),
                b + "att.k_k": vec, b + "att.k_a": vec, b + "att.r_k": (H, N),
                b + "att.receptance.weight": (C, C), b + "att.key.weight": (C, C),
                b + "att.value.weight": (C, C), b + "att.output.weight": (C, C),
                b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,),
                b + "ffn.x_k": vec, b + "ffn.key.weight": (F, C), b + "ffn.value.weight": (C, F),
            })
        out.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
        return out

    def counts(self):
        """Weights by role: `params` read by the forward pass (layer 0's v0/v1/v2 are not),
        `embedding`, `head`, `non_embedding` (all but the embedding), `body` (all but the
        embedding and the head), `big` (the Linear matrices and the head: what a bf16 backend
        keeps 16-bit, see fast.BIG_MATRICES; LoRA and vectors stay float32)."""
        unused = {f"blocks.0.att.{n}" for n in ("v0", "v1", "v2")}
        sizes = {k: _prod(s) for k, s in self.tensor_shapes().items() if k not in unused}
        total, emb, head = sum(sizes.values()), sizes["emb.weight"], sizes["head.weight"]
        big = sum(n for k, n in sizes.items() if k.endswith(".weight") and len(
            self.tensor_shapes()[k]) == 2 and k != "emb.weight")
        return {"params": total, "embedding": emb, "head": head,
                "non_embedding": total - emb, "body": total - emb - head, "big": big}

    def decode_bytes(self, storage):
        """Bytes of weights one decode step reads: all but the embedding table (one row of it
        is read) and layer 0's unused v0/v1/v2. The big matrices (Linear and head) at 4 bytes
        each (storage "float32"/"f32"), 2 ("bfloat16", "float16", "f16"), or as GGUF Q8_0 blocks,
        34 bytes per 32 weights (a float16 scale + 32 int8: "int8", "q8_0"); the LoRA matrices
        and the vectors at 4 bytes always. (llama.cpp rows use the exact bytes of their GGUF
        file instead when it was read: see runner.)"""
        n = self.counts()
        per_big = BIG_BYTES.get(storage, 4.0)
        return per_big * n["big"] + 4 * (n["non_embedding"] - n["big"])

    def describe(self):
        n = self.counts()
        where = f"the shipped model ({Path(self.source).name}), " if self.source else ""
        return (where + f"L{self.n_layer} C{self.n_embd} V{self.vocab_size} "
                f"H{self.n_embd // self.head_size}x{self.head_size} F{self.dim_ffn}, "
                f"LoRA {'/'.join(map(str, self.ranks))}: {n['params'] / 1e6:.1f}M weights "
                f"({n['non_embedding'] / 1e6:.1f}M non-embedding)")


SHAPES = {
    "0.1B": Shape("0.1B", 12, 768, 65536, (64, 64, 32, 128)),
    "0.4B": Shape("0.4B", 24, 1024, 65536, (64, 64, 32, 128)),
    "1.5B": Shape("1.5B", 24, 2048, 65536, (96, 96, 64, 256)),
    "tiny": Shape("tiny", 2, 256, 65536, (32, 32, 32, 64)),      # --quick
}


def parse_shape(text, root=None):
    """A named shape (0.1B, 0.4B, 1.5B, tiny), `shipped` (the model in weights/: its shape read
    from the file's header) or a custom one such as L4-C512 or L4-C512-V1024 (LoRA ranks from
    the training-code formula, `synthetic.lora_ranks`)."""
    if text in SHAPES:
        return SHAPES[text]
    if text == "shipped":
        return shipped_shape(root)
    m = re.fullmatch(r"L(\d+)-?C(\d+)(?:-?V(\d+))?", text)
    if not m:
        raise ValueError(f"unknown shape {text!r}: use {', '.join(SHAPES)}, shipped or e.g. "
                         "L4-C512-V1024")
    from tinyrwkv.synthetic import lora_ranks
    L, C, V = int(m[1]), int(m[2]), int(m[3] or 65536)
    if C % 64:
        raise ValueError(f"shape {text!r}: n_embd must be a multiple of the head size 64")
    return Shape(text, L, C, V, lora_ranks(C))


def shipped_path(root=None):
    """weights/model.safetensors of this checkout (what tinyrwkv.load() with no path reads)."""
    root = Path(root) if root else Path(__file__).resolve().parents[2]
    return root / "weights" / "model.safetensors"


def safetensors_shapes(path):
    """{key: shape} from a .safetensors header (8-byte length + JSON), without reading tensors."""
    import json
    import struct
    with open(path, "rb") as f:
        n = struct.unpack("<Q", f.read(8))[0]
        header = json.loads(f.read(n))
    return {k: tuple(v["shape"]) for k, v in header.items() if k != "__metadata__"}


def shipped_shape(root=None):
    """The shipped model as a Shape (n_layer, n_embd, vocabulary and LoRA ranks from its header).
    Its tensors must be the plain x070 set (the shape's counts are computed from it)."""
    path = shipped_path(root)
    if not path.is_file():
        raise ValueError(f"--shapes shipped: no shipped model at {path}")
    got = safetensors_shapes(path)
    L = 1 + max(int(k.split(".")[1]) for k in got if k.startswith("blocks."))
    V, C = got["emb.weight"]
    ranks = tuple(got[f"blocks.0.att.{x}1"][1] for x in "wavg")
    shape = Shape("shipped", L, C, V, ranks, got["blocks.0.att.r_k"][1], source=str(path))
    want = {k: tuple(s) for k, s in shape.tensor_shapes().items()}
    if want != got:
        raise ValueError(f"--shapes shipped: {path} is not a plain RWKV-7 x070 checkpoint "
                         f"(keys or shapes differ from L{L} C{C} V{V}'s)")
    return shape


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------
# Synthetic checkpoints
# ----------------------------------------------------------------------------------------------

def synthetic_tensor(key, shape, seed):
    """Seeded float32 values of realistic scale for one official key.

    Each key has its own random stream (seed, crc32(key)), so a tensor does not depend on the
    order of generation. Much faster than `synthetic.make_weights` (no orthogonalisation), which
    matters at 1.5B; speed does not depend on the values.
    """
    import numpy as np
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    f32 = np.float32

    def normal(mean, std):
        return rng.standard_normal(shape, dtype=f32) * f32(std) + f32(mean)

    def uniform(lo, hi):
        return rng.random(shape, dtype=f32) * f32(hi - lo) + f32(lo)

    name = key.split(".", 2)[-1] if key.startswith("blocks.") else key
    if name in ("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight"):
        return normal(1.0, 0.02)
    if name.endswith(".bias") or name == "ln_out.bias":
        return normal(0.0, 0.02)
    if name == "att.ln_x.weight":
        return uniform(0.5, 1.0)
    if re.fullmatch(r"att\.x_[rwkvag]|ffn\.x_k", name):
        return uniform(0.0, 1.0)                       # token-shift lerps, ~0.5 on average
    special = {
        "att.w0": lambda: uniform(-8.0, 3.0),          # decay bias: decays spread over (0.55, 1)
        "att.a0": lambda: normal(-0.2, 0.3),           # in-context learning rate bias
        "att.v0": lambda: normal(0.7, 0.1),            # value-residual gate bias
        "att.k_k": lambda: normal(0.7, 0.05),
        "att.k_a": lambda: normal(1.0, 0.02),
        "att.r_k": lambda: normal(-0.04, 0.3),
    }
    if name in special:
        return special[name]()
    if name in ("att.w2", "att.a2", "att.v2", "att.g2"):
        return normal(0.0, 0.1)                        # LoRA up-projections
    return normal(0.0, 0.02)                           # every other matrix, emb and head


def checkpoint_name(shape, seed, suffix):
    r = "-".join(map(str, shape.ranks))
    return (f"rwkv7-synthetic-L{shape.n_layer}-C{shape.n_embd}-V{shape.vocab_size}-N{shape.head_size}"
            f"-r{r}-seed{seed}-g{GENERATOR_VERSION}{suffix}")


def write_checkpoint(shape, seed, folder):
    """Write the bf16 checkpoint for `shape` into `folder` (in this process) and return its path.

    With torch: a `.pth` from `torch.save`, bf16 tensors, as released models are (the official
    package needs it). Without torch: a bf16 `.safetensors` (tinyrwkv reads it; the official
    package cannot). Written to a temporary name and renamed, so an interrupted run never leaves
    a half-written file in a cache folder. Peak memory: one float32 tensor plus the bf16 file's
    contents (3 GB at 1.5B); without torch, the float32 weights (6 GB at 1.5B).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = shape.tensor_shapes()
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        path = folder / checkpoint_name(shape, seed, ".pth")
        tensors = {k: torch.from_numpy(synthetic_tensor(k, s, seed)).to(torch.bfloat16)
                   for k, s in shapes.items()}
        tmp = path.with_name(path.name + ".partial")
        torch.save(tensors, tmp)
    else:
        from tinyrwkv.formats import save_safetensors
        path = folder / checkpoint_name(shape, seed, ".safetensors")
        tensors = {k: synthetic_tensor(k, s, seed) for k, s in shapes.items()}
        tmp = path.with_name(path.name + ".partial")
        save_safetensors(tmp, tensors, bf16_keys=tensors.keys())
    os.replace(tmp, path)
    return path


def find_checkpoint(shape, seed, folder):
    """An already written checkpoint for this shape and seed in `folder`, or None."""
    for suffix in (".pth", ".safetensors"):
        path = Path(folder) / checkpoint_name(shape, seed, suffix)
        if path.is_file():
            return path
    return None
