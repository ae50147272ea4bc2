"""The RWKV-7 (x070) key schema: every official checkpoint key and its stored shape, written once.

Everything that needs the list of keys asks `x070_shapes` for it: the validation of a loaded file
(`check_x070_keys`), the synthetic checkpoints (synthetic.make_weights), the readers that rename
other layouts to the official keys (formats/gguf.py, formats/hf.py) and the benchmark's shapes.
Keys and shapes: docs/architecture.md; the variants' extra keys (DeepEmbed) there too.

Sizes (R5: read from the weights, never typed by hand; the table below is for tests, benchmarks
and messages):

    L  n_layer     C  n_embd       V  vocab_size     N  head_size (64 in every release), H = C / N
    F  dim_ffn (4C)                Dw, Da, Dv, Dg   LoRA ranks of the decay (w), in-context
                                   learning rate (a), value residual (v) and gate (g) low-rank
                                   matrices          D  DeepEmbed rank (s1 columns)

Layer 0 never uses its value-residual weights v0/v1/v2 (its value *is* v_first). Releases carry
them anyway, fla and our GGUF reader drop them, and llama.cpp's GGUFs hold copies of a0/a1/a2 in
their place (docs/formats.md). So the schema lists them (as released files have them), and the
validation accepts them absent or in any shape.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from .errors import SUPPORTED_VERSIONS, CheckpointError, UnsupportedCheckpoint

# Layer 0's unused value-residual weights (see the module docstring).
LAYER0_UNUSED = ("blocks.0.att.v0", "blocks.0.att.v1", "blocks.0.att.v2")

# Stored (1, 1, n) in the official .pth; other writers squeeze them to (n,).
_VECTORS = ("att.x_r", "att.x_w", "att.x_k", "att.x_v", "att.x_a", "att.x_g", "att.w0", "att.a0",
            "att.v0", "att.k_k", "att.k_a", "ffn.x_k", "ffn.s0")


def lora_ranks(n_embd):
    """(Dw, Da, Dv, Dg) by the formula of the training code the released models came from
    (RWKV-LM RWKV-v5/src/model.py, x070 section; llama.cpp's converter uses it as a fallback):
    R(x) = max(32, round(x / 32) * 32). Releases mostly follow it, not always (OFFICIAL_SIZES):
    read ranks from a file's shapes, never from this."""
    R = lambda x: max(32, int(round(x / 32)) * 32)
    C = n_embd
    return R(1.8 * C ** 0.5), R(1.8 * C ** 0.5), R(1.3 * C ** 0.5), R(0.6 * C ** 0.8)


@dataclass(frozen=True)
class ModelSize:
    """The sizes that fix every shape of an x070 model. A size read from a damaged file may be
    None (unknown): x070_shapes then leaves that dimension open."""
    n_layer: int
    n_embd: int
    vocab_size: int
    head_size: int = 64
    dim_ffn: int | None = None        # None: 4 * n_embd
    ranks: tuple | None = None        # (Dw, Da, Dv, Dg); None: lora_ranks(n_embd)
    d_deepembed: int = 0              # 0: plain x070

    def shapes(self, layer0_v=True):
        return x070_shapes(self.n_layer, self.n_embd, self.vocab_size, self.head_size,
                           self.dim_ffn, self.ranks, self.d_deepembed, layer0_v)


# The released RWKV-7 sizes (World / G-series; V = 65536, N = 64, F = 4C). Ranks from RWKV-LM's
# README weight table and demos (0.1B, 1.5B) and the rwkvtune configs (0.4B, 2.9B, 7B); they equal
# lora_ranks(C) except 0.4B's gate rank, 128 where the formula gives 160 (docs/architecture.md).
OFFICIAL_SIZES = {
    "0.1B": ModelSize(12, 768, 65536, ranks=(64, 64, 32, 128)),
    "0.4B": ModelSize(24, 1024, 65536, ranks=(64, 64, 32, 128)),
    "1.5B": ModelSize(24, 2048, 65536, ranks=(96, 96, 64, 256)),
    "2.9B": ModelSize(32, 2560, 65536, ranks=(96, 96, 64, 320)),
    "7B": ModelSize(32, 4096, 65536, ranks=(128, 128, 96, 480)),
}


def _mul(a, b):
    return None if a is None or b is None else a * b


def x070_shapes(n_layer, n_embd, vocab_size, head_size=64, dim_ffn=None, ranks=None,
                d_deepembed=0, layer0_v=True):
    """{official key: stored shape} of an x070 model, in the training code's key order.

    Args: the sizes (module docstring). dim_ffn None: 4C; ranks None: lora_ranks(C);
        d_deepembed > 0 adds the DeepEmbed keys (ffn.s_emb, s_emb_x, s1, s2, s0);
        layer0_v False leaves out layer 0's unused v0/v1/v2.
        A size of None (unknown) gives None in the shapes that use it.
    Returns: e.g. "blocks.0.att.w1" -> (C, Dw), "blocks.0.att.x_r" -> (1, 1, C), "emb.weight" ->
        (V, C); matrices of nn.Linear layers are (out, in), the LoRA matrices (in, out).
    """
    L, C, V, N = n_layer, n_embd, vocab_size, head_size
    H = C // N if C is not None and N else None
    F = dim_ffn if dim_ffn is not None else _mul(4, C)
    Dw, Da, Dv, Dg = ranks if ranks is not None else lora_ranks(C)
    D = d_deepembed
    vec = lambda n: (1, 1, n)
    shapes = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
    for i in range(L):
        b = f"blocks.{i}."
        block = {"ln1.weight": (C,), "ln1.bias": (C,), "ln2.weight": (C,), "ln2.bias": (C,)}
        block.update({f"att.x_{c}": vec(C) for c in "rwkvag"})             # token-shift lerps
        for name, rank in (("w", Dw), ("a", Da), ("v", Dv)):                # bias + low rank
            block.update({f"att.{name}0": vec(C), f"att.{name}1": (C, rank),
                          f"att.{name}2": (rank, C)})
        block.update({"att.g1": (C, Dg), "att.g2": (Dg, C),                 # gate: no bias
                      "att.k_k": vec(C), "att.k_a": vec(C), "att.r_k": (H, N),
                      "att.receptance.weight": (C, C), "att.key.weight": (C, C),
                      "att.value.weight": (C, C), "att.output.weight": (C, C),
                      "att.ln_x.weight": (C,), "att.ln_x.bias": (C,),
                      "ffn.x_k": vec(C), "ffn.key.weight": (F, C), "ffn.value.weight": (C, F)})
        if D:    # DeepEmbed: per-token D x D matrices, flattened into rows of s_emb
            DD = _mul(D, D)
            block.update({"ffn.s_emb.weight": (V, DD), "ffn.s_emb_x.weight": (DD, C),
                          "ffn.s1": (C, D), "ffn.s2": (D, F), "ffn.s0": vec(F)})
        if i == 0 and not layer0_v:
            block = {k: s for k, s in block.items() if b + k not in LAYER0_UNUSED}
        shapes.update({b + k: s for k, s in block.items()})
    shapes.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
    return shapes


def layer_count(keys, prefix="blocks.", source=None):
    """L, the number of layers that keys named `{prefix}{i}.…` describe: 1 + the largest i (0 if
    there is none).

    Everything that builds the per-layer key list (x070_shapes, the GGUF and fla tables) builds
    L layers of it, so L is bounded here by the keys actually present, before anything is built:
    a layer number must be a plain decimal ("7", not "07") below the number of keys that name a
    layer. One stray key `blocks.100000000.att.x_r` in a small file would otherwise make the
    schema list 100 million layers (gigabytes) before reporting the key. A gap inside that bound
    (a layer missing) is left to the shape checks, which list its missing keys.
    Raises CheckpointError naming the key and `source`.
    """
    pattern = re.compile(re.escape(prefix) + r"([0-9]+)\.")
    layered = [(m.group(1), key) for key in keys if (m := pattern.match(key))]
    largest = -1
    for digits, key in layered:
        if len(digits) > len(str(len(layered))) or (digits != "0" and digits.startswith("0")) or \
                int(digits) >= len(layered):
            raise CheckpointError(
                f"{source or 'the checkpoint'} has a stray key {key!r}: layer {digits} of a file "
                f"with only {len(layered)} keys that name a layer (layers are numbered {prefix}0., "
                f"{prefix}1., … in order); the file is damaged or was edited: remove the key, or "
                "re-convert the model from the original")
        largest = max(largest, int(digits))
    return largest + 1


def _two_d(shapes, key, source):
    """The (rows, cols) of a tensor that must be a matrix, or a CheckpointError saying so."""
    shape = shapes.get(key)
    if shape is None or len(shape) != 2:
        raise CheckpointError(f"{source or 'the checkpoint'} is not an RWKV-7 x070 model: its "
                              f"sizes are read from {key}, which is "
                              f"{'missing' if shape is None else f'{tuple(shape)}, not 2-D'}; "
                              "use an official RWKV-7 checkpoint")
    return shape


def sizes_from_shapes(shapes, source=None):
    """A ModelSize read from {official key: shape} (R5): V, C from emb.weight; H, N from
    blocks.0.att.r_k; L from the block numbers (layer_count: bounded by the keys present); F from
    ffn.key.weight rows; the ranks from the columns of w1/a1/g1 and of v1 in layer 1 (layer 0's
    is unused); D from ffn.s1. A size whose tensor is missing or not 2-D is None. emb.weight and
    r_k must be 2-D (CheckpointError naming `source` otherwise)."""
    V, C = _two_d(shapes, "emb.weight", source)
    N = _two_d(shapes, "blocks.0.att.r_k", source)[1]
    L = layer_count(shapes, "blocks.", source)

    def dim(key, axis):
        shape = shapes.get(key)
        return shape[axis] if shape is not None and len(shape) == 2 else None

    deep = "blocks.0.ffn.s_emb.weight" in shapes
    ranks = (dim("blocks.0.att.w1", 1), dim("blocks.0.att.a1", 1),
             dim("blocks.1.att.v1", 1) if L > 1 else None, dim("blocks.0.att.g1", 1))
    return ModelSize(L, C, V, N, dim("blocks.0.ffn.key.weight", 0), ranks,
                     (dim("blocks.0.ffn.s1", 1) if deep else 0))


def check_x070_keys(weights, source=None):
    """Raise CheckpointError unless `weights` has exactly the keys of an RWKV-7 x070 model (plain
    or DeepEmbed), each with the shape x070_shapes gives for the sizes read from the tensors
    themselves (sizes_from_shapes). (1, 1, n) vectors may also be stored squeezed as (n,).
    Layer 0's v0/v1/v2 may be absent or of any shape (module docstring).
    `weights`: {key: anything with .shape}; `source` (e.g. the file name) goes in the message.
    """
    source = source or "the checkpoint"
    shapes = {k: tuple(v.shape) for k, v in weights.items()}
    emb, r_k = shapes.get("emb.weight"), shapes.get("blocks.0.att.r_k")
    if emb is None or len(emb) != 2 or r_k is None or len(r_k) != 2:
        raise CheckpointError(f"{source} is not an RWKV-7 x070 model: its size is read from "
                              f"emb.weight (V, C) and blocks.0.att.r_k (H, N), which are "
                              f"{emb} and {r_k}; use an official RWKV-7 checkpoint")
    (V, C), (H, N) = emb, r_k
    if H * N != C:
        raise CheckpointError(f"{source} is inconsistent: blocks.0.att.r_k is ({H}, {N}) but "
                              f"emb.weight has C = {C} != {H} x {N}; the file is damaged or not RWKV-7")
    if min(V, H, N) < 1:
        raise CheckpointError(f"{source} is not an RWKV-7 x070 model: emb.weight is {emb} and "
                              f"blocks.0.att.r_k is {r_k}, so it has an empty vocabulary, width or "
                              "head; the file is damaged: use an official RWKV-7 checkpoint")
    size = sizes_from_shapes(shapes, source)
    expected = size.shapes(layer0_v=False)

    def fits(key, got):    # a size of None (unreadable from the file) matches any
        return any(len(got) == len(e) and all(x is None or x == g for x, g in zip(e, got))
                   for e in _allowed(key, expected[key]))

    missing = [k for k in expected if k not in shapes]
    wrong = [f"{k} {shapes[k]} (expected {' or '.join(map(str, _allowed(k, expected[k])))})"
             for k in expected if k in shapes and not fits(k, shapes[k])]
    unexpected = [k for k in shapes if k not in expected and k not in LAYER0_UNUSED]
    if missing or wrong or unexpected:
        def listing(title, items):
            more = f" and {len(items) - 5} more" if len(items) > 5 else ""
            return f"{len(items)} {title}: {', '.join(items[:5])}{more}" if items else None
        problems = "; ".join(filter(None, [listing("missing", missing),
                                           listing("with the wrong shape", wrong),
                                           listing("unexpected", unexpected)]))
        variant = "x070-deepembed" if size.d_deepembed else "x070"
        Dw, Da, Dv, Dg = size.ranks
        sizes = (f"L={size.n_layer}, C={C}, H={H}, N={N}, V={V}, F={size.dim_ffn}, "
                 f"Dw/Da/Dv/Dg={Dw}/{Da}/{Dv}/{Dg}")
        raise CheckpointError(f"{source} does not have the keys of an RWKV-7 {variant} model "
                              f"({sizes}): {problems}. The file is damaged or a different variant; "
                              "use an official checkpoint (keys and shapes: docs/architecture.md)")


def _allowed(key, shape):
    """The shapes a key may be stored in: (1, 1, n) vectors also squeezed to (n,)."""
    return [shape, shape[2:]] if key.split(".", 2)[-1] in _VECTORS else [shape]


def detect_version(keys, source=None):
    """"x070" or "x070-deepembed" from the official key names; UnsupportedCheckpoint otherwise
    (`source`, e.g. the file name, begins the message).

    x070 is recognised by `blocks.0.att.r_k` and `blocks.0.att.k_k`; DeepEmbed by
    `blocks.0.ffn.s_emb.weight` and DeepEmbed+DEA ("rwkv7b") by `blocks.0.qkv.qq.weight`.
    Older versions are named from their characteristic time-mix keys; pre-release RWKV-7 RC files
    from `time_aaaaa`, `time_misc_*` or `time_maa_*` next to x070 names (docs/architecture.md).
    """
    keys = [str(k) for k in keys]
    keyset = set(keys)

    def has(*fragments):
        return next((k for k in keys for frag in fragments if frag in k), None)

    def unsupported(found, advice=""):
        return UnsupportedCheckpoint(f"{source or 'this checkpoint'} is {found}. "
                                     f"{SUPPORTED_VERSIONS}" + (f"; {advice}" if advice else ""))

    # Layouts of other tools first (their keys would confuse the per-version checks below).
    hf = has("model.layers.", "model.embeddings.")
    if hf:
        raise unsupported(f"in the Hugging Face / flash-linear-attention layout (e.g. {hf!r})",
                          "these are not official key names: tinyrwkv.load (and "
                          "tinyrwkv.formats.read_model) rename them when they read the file")
    hf_rwkv = has("rwkv.embeddings.", "rwkv.blocks.")
    if hf_rwkv:
        raise unsupported(f"in the Hugging Face transformers RWKV layout (e.g. {hf_rwkv!r}; "
                          "RWKV-4/5/6 in transformers)", "use the original .pth release")
    for prefix in ("module.", "model.", "_orig_mod."):
        if keys and all(k.startswith(prefix) for k in keys):
            stripped = [k[len(prefix):] for k in keys]
            try:
                inner = detect_version(stripped)
            except UnsupportedCheckpoint as e:
                raise UnsupportedCheckpoint(f"{source or 'this checkpoint'}: every key is prefixed "
                                            f"with {prefix!r}, and without it: {e}") from None
            raise unsupported(f"an RWKV-7 {inner} state dict whose keys are all prefixed with "
                              f"{prefix!r} (as a training wrapper saves them)",
                              f"strip the prefix: {{k.removeprefix({prefix!r}): v for k, v in "
                              "sd.items()}, and save that")

    dea = has(".qkv.qq.", ".qkv.k_emb.", ".qkv.v_emb.")     # not any ".qkv." (ViTs have those)
    if dea:
        raise unsupported(f"RWKV-7 with DeepEmbed + DeepEmbedAttention (\"rwkv7b\", e.g. {dea!r}), "
                          "which needs a growing per-token cache (it is not constant-state); it is "
                          "not supported")
    x070_names = (".att.r_k", ".att.k_k", ".att.k_a", ".att.w0", ".att.a0", ".att.x_r")
    rc = has(".att.time_aaaaa", ".att.time_misc_", ".att.time_kkk", ".att.time_maa_a",
             ".att.time_maa_rg", ".att.time_maa_wa")
    if rc is None and has(".att.time_maa") and has(*x070_names):
        rc = has(".att.time_maa")
    if rc:
        raise unsupported(f"a pre-release RWKV-7 (RC, before 2024-11-28) checkpoint (e.g. {rc!r}); "
                          "released x070 files use other names (att.x_r, att.w0, att.k_k, ...)",
                          "use a released x070 model")
    if "blocks.0.att.r_k" in keyset and "blocks.0.att.k_k" in keyset:
        return "x070-deepembed" if "blocks.0.ffn.s_emb.weight" in keyset else "x070"

    older = [("RWKV-6", (".att.time_maa_x", ".att.time_decay_w1")),
             ("RWKV-5", (".att.time_faaaa",)),
             ("RWKV-4", (".att.time_first", ".att.time_mix_k"))]
    for version, fragments in older:
        found = has(*fragments)
        if found:
            raise unsupported(f"{version} (found {found!r})",
                              "the official `rwkv` pip package runs it")
    state = has("time_state")
    if state and all("time_state" in k for k in keys):
        raise unsupported(f"a state-tuning file (e.g. {state!r}), not a model",
                          "load the base model and apply the state to it (tinyrwkv generate "
                          "--state FILE)")
    lora = has("lora_A", "lora_B", ".lora_a", ".lora_b")
    if lora:
        raise unsupported(f"a LoRA adapter (e.g. {lora!r}), not a model",
                          "merge it into its base model first (tinyrwkv merge-lora)")
    first = ", ".join(keys[:5]) or "(none: the file holds no tensors)"
    raise unsupported(f"not an RWKV model: no RWKV keys found; first keys: {first}")
