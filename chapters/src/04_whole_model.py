# %% [markdown]
# # 04 · The whole model: from a checkpoint file to the next token
#
# **What you will build.** The last three chapters built the parts of one RWKV-7 layer. This one puts
# a whole model together and runs it. You will open a checkpoint file, read the model's sizes from
# its tensor shapes, and sort its weights into layers. You will write the forward pass (embedding,
# `ln0`, a stack of blocks, `ln_out`, the head) in both forms, one token at a time and a whole
# sequence at once, and write a sampler (softmax, temperature, top-p, top-k, repetition penalties)
# that turns logits into the next token. Last, you will look at the one thing an RNN carries from
# token to token, its **state**: it has a fixed size, so the model's memory is the same after 10
# tokens and after 100,000. Every piece is checked against `tinyrwkv` on the same input.
#
# **Prerequisites.** [01 · Time mixing](01_time_mixing.ipynb) (`time_mix`, the WKV state),
# [02 · Channel mixing](02_channel_mixing.ipynb) (`channel_mix`), and
# [03 · Parallel vs recurrent](03_parallel_vs_recurrent.ipynb) (the sequence form and the chunked
# WKV). Here those parts come from the library; the new code is the glue around them.
#
# **Two models.** Sections 1 and 2 open a checkpoint file that we write ourselves: a small
# synthetic model from `tinyrwkv.synthetic.make_weights` (the training code's initialisation plus
# noise, with the World vocabulary's 65,536 rows so real text can go in). It is not a language
# model, but every number in it is computed exactly as a real model's would be, which is all that
# checking our forward pass against the library needs. From section 2's end on, the same forward
# pass runs the **trained model shipped with tinyrwkv** in `weights/` (6 layers, `C = 256`, a
# 4096-token BPE tokenizer; weights/MODEL_CARD.md), which writes simple children's stories: its
# next-token distributions are what the sampler of section 3 is for, and the state of section 4
# is what it remembers of a story.
#
# Dimension letters (as in `tinyrwkv/model.py`): `T` tokens, `C` channels (n_embd), `H` heads,
# `N` head size, `L` layers, `V` vocabulary rows, `F` channel-mix width.

# %%
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np

import tinyrwkv
from tinyrwkv import SamplingParams, Session, State
from tinyrwkv.formats import inspect_checkpoint, read_checkpoint, save_safetensors, to_bf16_bits
from tinyrwkv.model import block as lib_block
from tinyrwkv.model import channel_mix, layer_norm as lib_layer_norm, time_mix
from tinyrwkv.sampling import Penalties, sampling_probs
from tinyrwkv.synthetic import make_weights

CHAPTER_START = time.perf_counter()
tmp = Path(tempfile.mkdtemp(prefix="tinyrwkv-ch04-"))   # every file of this chapter goes here

# %% [markdown]
# ## 1 · Loading a checkpoint
#
# A checkpoint is a dictionary from **names** to **arrays**, nothing more. It has no config file.
# The names are the ones the training code gave its parameters (`emb.weight`,
# `blocks.3.att.key.weight`, ...), and every size the model needs can be read from the arrays'
# shapes.
#
# Official RWKV-7 weights are published on Hugging Face. The World models
# (`BlinkDL/rwkv-7-world`, for example `RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth`) are
# PyTorch `.pth` files stored in bf16. `tinyrwkv.load` reads that file with the same code as below,
# without torch. This notebook uses no network, so we write a small checkpoint of our own:
# 3 layers, `C = 128` (two heads of `N = 64`), and the World vocabulary's `V = 65536` rows. The
# weights are stored as float32 `.safetensors`. If torch is installed, we also save a bf16 `.pth`
# exactly as the official files are saved.

# %%
weights = make_weights(n_layer=3, n_embd=128, vocab_size=65536, seed=0)   # {key: float32 array}
st_path = tmp / "tiny-L3-C128.safetensors"
save_safetensors(st_path, weights)
print(f"{st_path.name}: {st_path.stat().st_size / 2**20:.1f} MiB, {len(weights)} tensors")

# %% [markdown]
# ### The key table
#
# `inspect_checkpoint` reads only the file's header (for safetensors, a JSON table; for `.pth`, the
# zip directory and the pickle) and lists every key with its **stored** shape and dtype. No tensor
# data is read. A few of the keys:

# %%
table = inspect_checkpoint(st_path)                      # {key: (stored shape, dtype name)}
for key in ["emb.weight", "blocks.0.ln0.weight", "blocks.0.ln1.weight", "blocks.0.att.x_r",
            "blocks.0.att.r_k", "blocks.0.att.w1", "blocks.0.att.w2", "blocks.0.att.receptance.weight",
            "blocks.0.ffn.key.weight", "blocks.0.ffn.value.weight", "blocks.2.att.v1",
            "ln_out.weight", "head.weight"]:
    shape, dtype = table[key]
    print(f"  {key:34s} {str(shape):14s} {dtype}")
print(f"  ... {len(table)} keys in all")

# %% [markdown]
# Some stored shapes are not the shapes the math uses. The token-shift mixes `att.x_r`, ... are
# stored as `(1, 1, C)`, left over from broadcasting over (batch, time) in training. `att.r_k` is
# `(H, N)`. Linear weights (`receptance`, `key`, `value`, `output`, `ffn.key`, `ffn.value`, `head`)
# are stored `(out, in)`, as `torch.nn.Linear` keeps them, and are applied as `x @ W.T`. The
# low-rank pairs (`w1, w2`, `a1, a2`, ...) are stored `(in, rank)`, `(rank, out)` and applied as
# `x @ w1 @ w2` with no transpose (docs/architecture.md §7.1).
#
# ### The config comes from the shapes
#
# No hyper-parameter is typed by hand. The official loader (pip `rwkv`, `rwkv/model.py`,
# `RWKV_x070.__init__`) reads `V, C` from `emb.weight` and `H, N` from `blocks.0.att.r_k`, and
# counts the layers from the largest block index. The widths of the channel mix and of the four
# low-rank paths are the matching dimensions of their matrices. Layer 0's `v1` is read by no one:
# layer 0 has no value residual. So the value path's rank `Dv` is read from layer 1.

# %%
def config_from_shapes(table):
    """Model sizes from a {key: (shape, dtype)} table. Every number comes from a shape."""
    shape = lambda key: table[key][0]
    V, C = shape("emb.weight")                                    # (V, C)
    H, N = shape("blocks.0.att.r_k")                              # (H, N)
    L = 1 + max(int(key.split(".")[1]) for key in table if key.startswith("blocks."))
    assert H * N == C, "heads x head size must equal n_embd"
    return dict(n_layer=L, n_embd=C, n_head=H, head_size=N, vocab_size=V,
                dim_ffn=shape("blocks.0.ffn.key.weight")[0],      # (F, C)
                d_decay=shape("blocks.0.att.w1")[1],              # (C, Dw)
                d_aaa=shape("blocks.0.att.a1")[1],                # (C, Da)
                d_mv=shape("blocks.1.att.v1")[1],                 # (C, Dv), layer 1: layer 0's is unused
                d_gate=shape("blocks.0.att.g1")[1])               # (C, Dg)

config = config_from_shapes(table)
print(config)

# %% [markdown]
# `tinyrwkv.load` does this and more. It reads the file, checks that the keys are those of an x070
# model (none missing, none extra, every shape right), builds an `RWKV7`, and picks the tokenizer
# from `V` (65,536 rows: World). With `dtype="float64"` everything is converted to float64, which is
# the mode we use to compare with the library exactly. (float32 weights widen to float64 exactly.)

# %%
model = tinyrwkv.load(st_path, dtype="float64")
print(model.config)
print("tokenizer:", model.tokenizer)
for name, value in config.items():
    assert getattr(model.config, name) == value, name
print("our sizes == model.config: OK")
# Torch was never imported: a .safetensors file is a JSON header plus raw little-endian bytes.
assert "torch" not in sys.modules

# %% [markdown]
# ### Where the parameters are
#
# The sizes give the parameter count (RWKV-LM README):
# $2VC + 4C + L\,(19C + 12C^2 + 2C(D_w+D_a+D_v+D_g))$, minus layer 0's unused `v0, v1, v2`.
# In this toy model almost all of it is the embedding and the head, because `V` is large and `C`
# small. In the 0.1B World model (`C = 768`, `L = 12`) they are still about half of it.

# %%
def n_params(L, C, V, d_decay, d_aaa, d_mv, d_gate, **_):
    per_layer = 19 * C + 12 * C * C + 2 * C * (d_decay + d_aaa + d_mv + d_gate)
    unused = C + 2 * C * d_mv                       # layer 0's v0 (C,), v1 (C, Dv), v2 (Dv, C)
    return 2 * V * C + 4 * C + L * per_layer - unused

total = n_params(L=config["n_layer"], C=config["n_embd"], V=config["vocab_size"], **config)
print(f"{total:,} parameters; emb + head: {2 * config['vocab_size'] * config['n_embd'] / total:.0%}")
assert total == model.n_params

# %% [markdown]
# ### From a flat dictionary to per-layer weights
#
# The forward pass wants each layer's weights together, under names without the `blocks.{i}.`
# prefix, and in the shapes the math uses. Three small steps do that, by name and never by file
# position (key order differs between released files, docs/architecture.md §9):
#
# 1. cast to the run dtype;
# 2. squeeze the `(1, 1, C)` vectors to `(C,)`;
# 3. group the keys by layer, strip the prefix, and leave layer 0's unused `v0, v1, v2` out.
#
# `ln0` belongs to block 0 in the file, but it is applied once, to the embedding, before any block
# (next section). So we keep it apart.

# %%
def prepare(weights, dtype=np.float64):
    """{official key: stored array} -> (top-level weights, [per-layer dict]) in the math's shapes."""
    cast = lambda a: np.asarray(a, dtype=dtype)
    squeeze = lambda a: a.reshape(-1) if a.ndim == 3 else a                  # (1, 1, C) -> (C,)
    top = dict(emb=cast(weights["emb.weight"]),                              # (V, C)
               ln0=(cast(weights["blocks.0.ln0.weight"]), cast(weights["blocks.0.ln0.bias"])),
               ln_out=(cast(weights["ln_out.weight"]), cast(weights["ln_out.bias"])),
               head=cast(weights["head.weight"]))                            # (V, C)
    n_layer = 1 + max(int(key.split(".")[1]) for key in weights if key.startswith("blocks."))
    blocks = []
    for i in range(n_layer):
        prefix = f"blocks.{i}."
        p = {key[len(prefix):]: cast(squeeze(value)) for key, value in weights.items()
             if key.startswith(prefix) and ".ln0." not in key}
        if i == 0:
            for unused in ("att.v0", "att.v1", "att.v2"):                    # no value residual
                p.pop(unused)
        blocks.append(p)
    return top, blocks

file_weights = read_checkpoint(st_path)                 # {key: array}, shapes as stored
top, blocks = prepare(file_weights)
print("layer 0 keys:", len(blocks[0]), " layer 1 keys:", len(blocks[1]))
print("att.x_r", file_weights["blocks.0.att.x_r"].shape, "->", blocks[0]["att.x_r"].shape,
      "   att.r_k", blocks[0]["att.r_k"].shape)
for i, p in enumerate(blocks):                          # the same arrays the library prepared
    assert p.keys() == model.blocks[i].keys()
    assert all(np.array_equal(p[key], model.blocks[i][key]) for key in p)
assert np.array_equal(top["emb"], model.emb) and np.array_equal(top["head"], model.head)
print("our per-layer weights == model.blocks: OK")

# %% [markdown]
# ### The same model as a bf16 `.pth`, read without torch
#
# Released checkpoints are bf16 `.pth` files. A `.pth` is a zip archive that holds a pickle
# (`data.pkl`) and one raw file per tensor. `tinyrwkv` unpickles it with an allow-list of the four
# kinds of objects a tensor checkpoint needs and never imports torch. (Plain `pickle.load` on a
# downloaded file can run any code its author chose.) bf16 is the top 16 bits of a float32, so
# widening it is exact: shift left by 16 bits.
#
# To show this we need torch once, to *write* the file. If torch is not installed, this cell says so
# and the rest of the chapter does not need it. Then a fresh Python process loads the `.pth` and
# reports whether torch was imported.

# %%
try:
    import torch
except ImportError:
    torch = None
    print("torch is not installed: skipping the .pth demonstration (nothing below needs it)")

if torch is not None:
    pth_path = tmp / "tiny-L3-C128-bf16.pth"
    # As the official training code saves: a plain {name: tensor} dict, every tensor bf16.
    torch.save({key: torch.from_numpy(value).to(torch.bfloat16) for key, value in weights.items()},
               pth_path)
    probe = ("import sys, tinyrwkv; m = tinyrwkv.load(sys.argv[1]); "
             "print(m.config.n_layer, m.config.n_embd, m.config.vocab_size, 'torch' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", probe, str(pth_path)], capture_output=True,
                         text=True, check=True).stdout.split()
    print(f"fresh process: L={out[0]} C={out[1]} V={out[2]}, torch imported: {out[3]}")
    assert out[3] == "False"

    # Every bf16 value read back is our float32 value rounded to nearest-even bf16, then widened.
    from_pth = read_checkpoint(pth_path)
    for key, value in weights.items():
        widened = (to_bf16_bits(value).astype(np.uint32) << 16).view(np.float32)
        assert np.array_equal(from_pth[key], widened), key
    model_bf16 = tinyrwkv.load(pth_path, dtype="float64")
    probe_ids = model.tokenizer.encode("Hello, world")
    diff = np.abs(model_bf16.forward(probe_ids)[0] - model.forward(probe_ids)[0]).max()
    print(f"bf16 weights change the logits by at most {diff:.3f}"
          f" (logits std {model.forward(probe_ids)[0].std():.3f}): 8 significant bits per weight")

# %% [markdown]
# ## 2 · The forward pass
#
# The whole model (docs/architecture.md §2), for one token $t$ with residual stream $x \in \mathbb{R}^C$:
#
# $$x^{(0)} = \mathrm{LN}_0(\mathrm{emb}[t])$$
#
# $$x \leftarrow x + \mathrm{TimeMix}_i\big(\mathrm{LN}_{1,i}(x)\big), \qquad
#   x \leftarrow x + \mathrm{ChannelMix}_i\big(\mathrm{LN}_{2,i}(x)\big), \qquad i = 0, \dots, L-1$$
#
# $$\mathrm{logits} = \mathrm{LN}_{\mathrm{out}}(x^{(L)})\, W_{\mathrm{head}}^\top \in \mathbb{R}^V$$
#
# Each mixer reads a *normalised copy* of the residual stream and adds its output back. This is the
# pre-norm residual of GPT-2 and most Transformers since. The stream itself is never normalised in
# place, so each layer's output reaches the head through an identity path.
#
# ### LayerNorm, the embedding and `ln0`
#
# $\mathrm{LN}(x) = \frac{x - \mu}{\sqrt{\sigma^2 + 10^{-5}}} \odot \gamma + \beta$, where $\mu$
# and $\sigma^2$ are the mean and the *biased* variance over the $C$ channels (as torch computes
# them). The four LayerNorms (`ln0`, `ln1`, `ln2`, `ln_out`) all use $\epsilon = 10^{-5}$.
#
# `ln0` matters because the training code initialises the embedding tiny, uniform in
# $\pm 10^{-4}$ (docs/architecture.md §10), and our synthetic model does the same. Whatever scale training then
# gives the rows, `ln0` hands the first block inputs of a fixed scale. But look at $\epsilon$: a row
# this small has variance about $3 \cdot 10^{-9}$, far below $\epsilon = 10^{-5}$. So at this scale
# LN0 divides by $\approx\sqrt{\epsilon}$, not by the row's own spread. The normalised part stays
# small, and `ln0`'s bias is most of what the first block sees. The cell below measures it.

# %%
def layer_norm(x, weight, bias, eps=1e-5):
    """LayerNorm over the last axis, biased variance (torch F.layer_norm). (..., C) -> (..., C)"""
    mu = x.mean(axis=-1, keepdims=True)                        # (..., 1)
    var = ((x - mu) ** 2).mean(axis=-1, keepdims=True)         # (..., 1)
    return (x - mu) / np.sqrt(var + eps) * weight + bias

tok = model.tokenizer
ids = tok.encode("The quick brown fox jumps over the lazy dog.")
print("ids", ids, "->", [tok.decode([i]) for i in ids])
e = top["emb"][ids]                                            # (T, C)
x0 = layer_norm(e, *top["ln0"])                                # (T, C)
normalised = (x0 - top["ln0"][1]) / top["ln0"][0]             # (T, C): LN0 without its affine part
print(f"emb rows {e.shape}: std {e.std():.1e} (variance {e.var():.1e}, eps 1e-5)")
print(f"after ln0 {x0.shape}: normalised part std {normalised.std():.3f},"
      f" ln0 bias std {top['ln0'][1].std():.3f}")
assert np.allclose(x0, lib_layer_norm(e, *model.ln0), rtol=0, atol=1e-12)

# %% [markdown]
# LayerNorm works on each row separately, so $\mathrm{LN}_0$ can be applied to the whole table once.
# The official loader does exactly that: `RWKV_x070.__init__` replaces `emb.weight` by
# `LN0(emb.weight)`, and its forward begins with a plain lookup. tinyrwkv applies `ln0` per token
# instead, so the weights stay as stored. The result is the same:

# %%
folded = layer_norm(top["emb"], *top["ln0"])                  # (V, C), once per model
print("max |LN0(emb)[ids] - LN0(emb[ids])| =", np.abs(folded[ids] - x0).max())
assert np.allclose(folded[ids], x0, rtol=0, atol=1e-12)

# %% [markdown]
# ### The block
#
# A block is the two pre-norm residuals above. Each mixer also needs the **previous token's** input
# (the token shift) and the time mix needs its WKV matrix. These three tensors per layer are the
# layer's state (docs/architecture.md §5):
#
# | state tensor | shape | holds |
# |---|---|---|
# | `att_shift[i]` | `(C,)` | the `ln1` output of the last token |
# | `wkv[i]` | `(H, N, N)` | the WKV matrix $S$, `[head, value, key]` |
# | `ffn_shift[i]` | `(C,)` | the `ln2` output of the last token |
#
# One more vector travels *across* layers within a token: `v_first`, layer 0's value, which every
# later layer mixes into its own value (the value residual). It is not part of the state. Each token
# computes it again in layer 0.
#
# Our block returns a new layer state instead of writing into one. The library's `block`
# updates its `State` in place (fewer copies), and its public `forward` works on a copy.
# The library's `time_mix` and `block` take a sequence, a `(T, C)` array; one token is `T = 1`,
# so our one-token block hands `time_mix` a `(1, C)` row and takes row 0 of what comes back.

# %%
def block_one(x, v_first, layer_state, p, layer_id, n_head):
    """One layer, one token. x, v_first: (C,); layer_state: (att_shift (C,), S (H, N, N),
    ffn_shift (C,)). Returns x (C,), v_first (C,) and the new layer state."""
    att_shift, S, ffn_shift = layer_state
    xa = layer_norm(x, p["ln1.weight"], p["ln1.bias"])                        # (C,)
    dx, S, v_first = time_mix(xa[None], att_shift, S, None if v_first is None else v_first[None],
                              p, layer_id, n_head)                            # (1, C), (H, N, N)
    dx, v_first = dx[0], v_first[0]                                           # (C,) each
    x = x + dx                                                                 # residual 1
    xf = layer_norm(x, p["ln2.weight"], p["ln2.bias"])                        # (C,)
    x = x + channel_mix(xf, ffn_shift, p)                                     # residual 2
    return x, v_first, (xa, S, xf)       # this token's LN outputs are the next token's shifts

# Worked example: layer 0 and then layer 1 on the first token, from the zero state.
H, C = model.config.n_head, model.config.n_embd
zero = State.zeros(model.config, np.float64)
layer0 = (zero.att_shift[0], zero.wkv[0], zero.ffn_shift[0])
x1, v_first, (xa, S, xf) = block_one(x0[0], None, layer0, blocks[0], 0, H)
print("layer 0:  x", x1.shape, " v_first", v_first.shape, " S", S.shape, " shifts", xa.shape, xf.shape)
x2, _, _ = block_one(x1, v_first, (zero.att_shift[1], zero.wkv[1], zero.ffn_shift[1]), blocks[1], 1, H)
print("layer 1:  x", x2.shape)

# The library's block on the same input, one token: (1, C) (it writes into the State it is given).
lib_state = State.zeros(model.config, np.float64)
lib_x1, lib_v_first = lib_block(x0[:1], None, lib_state, 0, model.blocks[0], H)
lib_x2, _ = lib_block(lib_x1, lib_v_first, lib_state, 1, model.blocks[1], H)    # (1, C)
print("max |Δ| vs tinyrwkv.model.block: x", np.abs(x2 - lib_x2[0]).max(),
      " S", np.abs(S - lib_state.wkv[0]).max())
assert np.allclose(x2, lib_x2[0], rtol=0, atol=1e-12)
assert np.allclose(S, lib_state.wkv[0], rtol=0, atol=1e-12)
assert np.array_equal(xa, lib_state.att_shift[0]) and np.array_equal(xf, lib_state.ffn_shift[0])

# %% [markdown]
# ### The head, and the recurrent forward pass
#
# After the last block, `ln_out` normalises the stream and the head, a `(V, C)` matrix kept separate
# from the embedding, gives one score per vocabulary entry. It is not cheap: $V \cdot C$
# multiply-adds per token, where a layer needs about $12 C^2$. With $V = 65536$ and $C = 768$ (the
# 0.1B World model) the head costs as much as $V / 12C \approx 7$ of its 12 layers.
#
# The recurrent form runs the blocks on one token, carrying the state to the next token. The same
# loop is in pip `rwkv/model.py`, `RWKV_x070.forward_one`.

# %%
def zero_state(blocks):
    """The State before any token: zeros, in the shapes the weights imply (float64)."""
    n_head, head_size = blocks[0]["att.r_k"].shape                           # (H, N)
    C = n_head * head_size
    return State(np.zeros((len(blocks), C)), np.zeros((len(blocks), n_head, head_size, head_size)),
                 np.zeros((len(blocks), C)))

def forward_one(token, state, top=top, blocks=blocks):
    """One token through the whole model. Returns logits (V,) and a new State (the old is kept)."""
    n_head = blocks[0]["att.r_k"].shape[0]                                   # H, from r_k (H, N)
    x = layer_norm(top["emb"][token], *top["ln0"])                           # (C,)
    v_first, new = None, []
    for i, p in enumerate(blocks):
        layer_state = (state.att_shift[i], state.wkv[i], state.ffn_shift[i])
        x, v_first, layer_state = block_one(x, v_first, layer_state, p, i, n_head)
        new.append(layer_state)
    logits = layer_norm(x, *top["ln_out"]) @ top["head"].T                   # (C,) @ (C, V) -> (V,)
    att_shift, wkv, ffn_shift = (np.stack(parts) for parts in zip(*new))     # (L, C), (L, H, N, N), (L, C)
    return logits, State(att_shift, wkv, ffn_shift)

def forward_recurrent(ids, state=None, top=top, blocks=blocks):
    """Tokens one at a time. Returns logits for every position (T, V) and the final State."""
    state = state or zero_state(blocks)
    out = []
    for t in ids:
        logits, state = forward_one(t, state, top, blocks)
        out.append(logits)
    return np.stack(out), state                                              # (T, V)

rec_logits, rec_state = forward_recurrent(ids)
lib_logits, lib_state = model.forward(ids, full_output=True, mode="recurrent")
print("logits", rec_logits.shape, "  max |Δ| vs model.forward(mode='recurrent'):",
      np.abs(rec_logits - lib_logits).max())
assert np.allclose(rec_logits, lib_logits, rtol=0, atol=1e-10)
assert np.allclose(rec_state.wkv, lib_state.wkv, rtol=0, atol=1e-10)

# %% [markdown]
# ### The sequence form
#
# To read a prompt we need not loop over tokens. In each layer, every step except the WKV recurrence
# works on each position separately: the LayerNorms, all projections, the channel mix. The token
# shift is only "the previous row", $x_{t-1}$, with the state's vector as row $-1$. So a whole block
# runs on a `(T, C)` matrix. The library's `time_mix` on all `T` rows runs the WKV part over the
# sequence (chapter 03), and the channel mix's token shift is one `concatenate`. The new shift
# state is the last row of each LayerNorm output. This is pip `RWKV_x070.forward_seq`; the
# official code feeds long prompts in chunks of 256 tokens this way.

# %%
def block_seq(x, v_first, layer_state, p, layer_id, n_head):
    """One layer, T tokens. x, v_first: (T, C). Returns x, v_first (T, C) and the new layer state."""
    att_shift, S, ffn_shift = layer_state
    xa = layer_norm(x, p["ln1.weight"], p["ln1.bias"])                        # (T, C)
    dx, S, v_first = time_mix(xa, att_shift, S, v_first, p, layer_id, n_head)
    x = x + dx
    xf = layer_norm(x, p["ln2.weight"], p["ln2.bias"])                        # (T, C)
    xf_prev = np.concatenate([ffn_shift[None, :], xf[:-1]])                   # (T, C): row t-1
    x = x + channel_mix(xf, xf_prev, p)
    return x, v_first, (xa[-1], S, xf[-1])

def forward_seq(ids, state=None, top=top, blocks=blocks):
    """T tokens at once. Returns logits for every position (T, V) and the final State."""
    state = state or zero_state(blocks)
    n_head = blocks[0]["att.r_k"].shape[0]                                   # H, from r_k (H, N)
    x = layer_norm(top["emb"][ids], *top["ln0"])                             # (T, C)
    v_first, new = None, []
    for i, p in enumerate(blocks):
        layer_state = (state.att_shift[i], state.wkv[i], state.ffn_shift[i])
        x, v_first, layer_state = block_seq(x, v_first, layer_state, p, i, n_head)
        new.append(layer_state)
    logits = layer_norm(x, *top["ln_out"]) @ top["head"].T                   # (T, V)
    return logits, State(*(np.stack(parts) for parts in zip(*new)))

seq_logits, seq_state = forward_seq(ids)
lib_seq_logits, lib_seq_state = model.forward(ids, full_output=True)         # mode="sequence"
print("logits", seq_logits.shape)
print("max |Δ| sequence vs model.forward:", np.abs(seq_logits - lib_seq_logits).max())
print("max |Δ| sequence vs our recurrent:", np.abs(seq_logits - rec_logits).max())
assert np.allclose(seq_logits, lib_seq_logits, rtol=0, atol=1e-10)
assert np.allclose(seq_logits, rec_logits, rtol=0, atol=1e-10)

# %% [markdown]
# In float64 the three agree to a few $10^{-15}$. The library's sequence form uses the chunked WKV
# from 4 tokens on, and ours uses the step-by-step one, so not even the order of the additions is
# the same. What is left is rounding.
#
# ### The same code on a trained model
#
# Nothing above is specific to our toy checkpoint. tinyrwkv ships a small trained model in
# `weights/`: 6 layers, `C = 256`, trained on simple children's stories (weights/MODEL_CARD.md),
# stored as bf16 `.safetensors` next to its tokenizer, a 4096-token byte-level BPE in
# `model.tokenizer.json`. `tinyrwkv.load()` with no path loads both. Our `config_from_shapes` reads
# its sizes from the file's header, our `prepare` sorts its weights into layers, and our
# `forward_seq` runs it, with the number of heads taken from `att.r_k`'s shape. From here on every
# figure is this model's.

# %%
from tinyrwkv.loader import shipped_model_path   # weights/model.safetensors in this repository

trained = tinyrwkv.load(dtype="float64")            # the library's model, for the checks
bpe = trained.tokenizer                             # its tokenizer: a byte-level BPE, V = 4096
print("config from the file's shapes:", config_from_shapes(inspect_checkpoint(shipped_model_path())))
trained_top, trained_blocks = prepare(read_checkpoint(shipped_model_path()))     # bf16 -> float64
for i, p in enumerate(trained_blocks):              # the same arrays tinyrwkv.load prepared
    assert all(np.array_equal(p[key], trained.blocks[i][key]) for key in p)

prompt = "Once upon a time, there was a little girl named Mia. She"
prompt_ids = bpe.encode(prompt)
print(f"{len(prompt_ids)} tokens:", [bpe.decode([i]) for i in prompt_ids])
trained_logits, _ = forward_seq(prompt_ids, top=trained_top, blocks=trained_blocks)   # (T, V)
lib_trained_logits, _ = trained.forward(prompt_ids, full_output=True)
print("max |Δ| vs tinyrwkv on the trained model:", np.abs(trained_logits - lib_trained_logits).max())
assert np.allclose(trained_logits, lib_trained_logits, rtol=0, atol=1e-10)   # float64: rounding

# %% [markdown]
# ## 3 · From logits to a token: sampling
#
# The head's output is a vector of $V$ scores. Text generation picks one token, feeds it back and
# repeats. The choice is made in this order (pip `rwkv/utils.py`, `PIPELINE.sample_logits` and
# `PIPELINE.generate`; docs/sampling.md):
#
# 1. **Penalties** on the logits, for tokens already generated: token $n$ loses
#    $\alpha_{\mathrm{presence}} + c_n\,\alpha_{\mathrm{frequency}}$. Here $c_n$ counts how often
#    $n$ was generated, and every count is multiplied by $\alpha_{\mathrm{decay}} = 0.996$ per step,
#    so old repeats are forgiven. The defaults are 0.2, 0.2, 0.996.
# 2. **Softmax**: $p_n = e^{z_n - \max z} / \sum_m e^{z_m - \max z}$. Subtracting the maximum only
#    keeps $e^{z}$ from overflowing. It is done in float32, as in the official code.
# 3. **Top-p** (nucleus): sort $p$ from largest to smallest and keep the shortest head of the list
#    whose total reaches `top_p`. Ties with the last kept probability are kept too.
# 4. **Top-k** (0 = off): keep at most the $k$ most probable.
# 5. **Temperature** $\tau$: $p_n \leftarrow p_n^{1/\tau}$ on what is kept, then renormalise. This
#    equals $\mathrm{softmax}(z/\tau)$ restricted to the kept set. Note that the official code
#    decides top-p *before* the temperature, at $\tau = 1$. $\tau = 0$ means greedy: take the argmax.
#
# First the plain softmax, on the trained model's logits after our prompt, "Once upon a time,
# there was a little girl named Mia. She":

# %%
logits = trained_logits[-1]                                     # (V,): next token after the prompt

def softmax(z):
    """(V,) -> (V,) probabilities. float32, as PIPELINE.sample_logits computes it."""
    z = np.asarray(z, dtype=np.float32)
    e = np.exp(z - z.max())                                     # largest term is e^0 = 1: no overflow
    return e / e.sum()

p = softmax(logits)
entropy = -(p * np.log(p)).sum()
print(f"V = {p.size}, max p = {p.max():.3f} (uniform would be {1 / p.size:.1e})")
print(f"entropy {entropy:.2f} nats, uniform over V: {np.log(p.size):.2f}")
print("top 8:", [(bpe.decode([int(n)]), round(float(p[n]), 3)) for n in np.argsort(p)[::-1][:8]])
assert entropy < 3                    # measured 1.5 nats; uniform would be log(4096) = 8.3

# %% [markdown]
# A trained model puts most of its mass on a few tokens: the four verbs a story goes on with after
# "She" carry most of it, and the thousands of other tokens share the rest. The entropy, about 1.5
# nats, is that of a uniform choice among $e^{1.5} \approx 4.5$ tokens, far from $\log V = 8.3$.
# This is the distribution a sampler has to cut.
#
# Our sampler, step by step as listed above:

# %%
def my_sampling_probs(logits, temperature=1.0, top_p=0.85, top_k=0):
    """The distribution the next token is drawn from: (V,) logits -> (V,) float64 summing to 1."""
    p = softmax(logits)                                          # (V,) float32
    sorted_p = np.sort(p)[::-1]                                  # (V,) largest first
    keep = np.ones(p.size, bool)
    if top_p < 1:
        # first position where the running total reaches top_p; everything at least that likely stays
        n_top = np.searchsorted(np.cumsum(sorted_p), top_p)      # cumsum in float32, like the official
        keep &= p >= sorted_p[n_top]
    if 0 < top_k < p.size:
        keep[np.argsort(-p, kind="stable")[top_k:]] = False
    q = np.where(keep, p, 0) ** (1 / temperature)                # float32, as the official code
    return q / q.astype(np.float64).sum()

settings = [dict(top_p=0.85), dict(top_p=0.3), dict(top_p=0.85, temperature=0.25),
            dict(top_p=1.0, top_k=10)]
for s in settings:
    mine, lib = my_sampling_probs(logits, **s), sampling_probs(logits, **s)
    kept_mine, kept_lib = np.flatnonzero(mine), np.flatnonzero(lib)
    print(f"{str(s):42s} kept {kept_mine.size:6d} tokens (library {kept_lib.size:6d}),"
          f" max |Δp| {np.abs(np.sort(mine) - np.sort(lib)).max():.1e}")
    if "top_k" in s:
        # top-k breaks ties among equal float32 probabilities by sort order, which may differ
        # between two sorts: compare the kept probabilities as a multiset.
        assert kept_mine.size == kept_lib.size == s["top_k"]
        assert np.allclose(np.sort(mine), np.sort(lib), rtol=1e-12, atol=0)
    else:
        assert np.array_equal(kept_mine, kept_lib)              # the same kept set, token for token
        assert np.allclose(mine, lib, rtol=1e-12, atol=0)

kept_085 = np.flatnonzero(my_sampling_probs(logits, top_p=0.85))
print("top_p=0.85 keeps:", [bpe.decode([int(n)]) for n in kept_085[np.argsort(-p[kept_085])]])
assert 2 <= kept_085.size <= 10       # a handful (measured 4), not thousands as on an untrained model
assert np.flatnonzero(my_sampling_probs(logits, top_p=0.3)).size == 1    # measured: ' loved' alone

# %% [markdown]
# The same kept set as `tinyrwkv.sampling.sampling_probs`, token for token. The picture: on the
# left the twelve most likely tokens and the probability each setting gives them, on the right the
# running total of the sorted probabilities, where top-p cuts.

# %%
shown = np.argsort(p)[::-1][:12]                                # the 12 most likely token ids
labels = [repr(bpe.decode([int(n)])) for n in shown]
fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2))
ax1.bar(np.arange(12) - 0.3, p[shown], width=0.2, color="black", label="softmax (τ = 1)")
for j, (s, color) in enumerate(zip([settings[0], settings[2], settings[3]],
                                   ["tab:blue", "tab:red", "tab:green"])):
    ax1.bar(np.arange(12) - 0.1 + 0.2 * j, my_sampling_probs(logits, **s)[shown], width=0.2,
            color=color, label=", ".join(f"{k}={v}" for k, v in s.items()))
ax1.set_xticks(range(12), labels, rotation=60, fontsize=8)
ax1.set(ylabel="probability of being drawn",
        title=f"After '…named Mia. She': the 12 most likely of {p.size:,} tokens")
ax1.legend(fontsize=8)

rank = np.arange(1, p.size + 1)
cumulative = np.cumsum(np.sort(p)[::-1])
ax2.plot(rank, cumulative, color="black")
for top_p, color in [(0.85, "tab:blue"), (0.3, "tab:orange")]:
    n_kept = np.searchsorted(cumulative, top_p) + 1
    ax2.axhline(top_p, color=color, ls="--", lw=1)
    ax2.axvline(n_kept, color=color, ls=":", lw=1, label=f"top_p={top_p}: keeps {n_kept:,} tokens")
ax2.set(xscale="log", xlabel="rank of token (most probable first)", ylabel="cumulative probability",
        title="Top-p keeps the shortest head that reaches p")
ax2.legend(fontsize=8)
plt.tight_layout()
plt.show()

# %% [markdown]
# Reading the plot: top-p = 0.85 keeps the four verbs (" loved", " had", " liked", " was") and
# scales them up so they sum to 1; everything else gets probability 0, including the long tail
# that, token by token, is tiny but together is about a tenth of the mass (the right panel: the
# curve climbs slowly after rank 4). Temperature 0.25 raises every kept probability to the 4th
# power and renormalises: the most likely token gains, the rest lose, and the sampler becomes
# almost greedy. Top-k = 10 keeps exactly the first 10 ranks, however the probability is spread.
# Top-p adapts to the distribution: after "Once upon a time, there" it would keep " was" alone;
# after a word that could go many ways it keeps more.
#
# ### Penalties
#
# Penalties act on the logits before all of the above. We count each generated token, decaying the
# counts at every step. Tokens whose text is a space, a tab or a single digit are exempt: the
# official `PIPELINE.generate` does not count them. Then we subtract.

# %%
def my_penalize(logits, history, presence=0.2, frequency=0.2, decay=0.996, exempt=" \t0123456789"):
    """Apply repetition penalties for the tokens in `history` (oldest first). (V,) -> (V,)"""
    counts = {}
    for token in history:
        counts = {n: c * decay for n, c in counts.items()}      # forget a little at every step
        counts[token] = counts.get(token, 0.0) + (0.0 if bpe.decode([token]) in exempt else 1.0)
    z = np.array(logits, dtype=np.float32)
    for n, c in counts.items():
        z[n] -= presence + c * frequency
    return z

history = bpe.encode(" the the the cat 1 2 the")
lib_penalties = Penalties(SamplingParams())
for token in history:
    lib_penalties.update(token, bpe.decode([token]))
mine, lib = my_penalize(logits, history), lib_penalties.apply(logits)
the = bpe.encode(" the")[0]
print(f"' the' appeared 4 times: logit {logits[the]:+.3f} -> {mine[the]:+.3f}")
print("max |Δ| vs tinyrwkv.sampling.Penalties:", np.abs(mine - lib).max())
assert np.allclose(mine, lib, rtol=0, atol=1e-6)

# %% [markdown]
# ### Greedy generation with our forward pass
#
# Greedy decoding ($\tau = 0$, no penalties) takes the argmax at each step. Read the prompt with the
# sequence form, then go on one token at a time: feed the chosen token back, take the argmax of the
# new logits, and so on. The library does the same in `Session.stream` (which `tinyrwkv.generate`
# wraps). We switch off its stop at end-of-text (token 0) so both loops run the same number of steps.
# First on the synthetic model, then on the trained one.

# %%
def greedy_ours(prompt, n_new, tokenizer, top, blocks):
    """Our forward pass, greedy: the prompt at once, then n_new tokens one at a time. -> token ids"""
    logits_now, state = forward_seq(tokenizer.encode(prompt), top=top, blocks=blocks)
    logits_now = logits_now[-1]                                 # (V,)
    new_tokens = []
    for _ in range(n_new):
        token = int(np.argmax(logits_now))
        new_tokens.append(token)
        logits_now, state = forward_one(token, state, top, blocks)   # feed it back
    return new_tokens

greedy = SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0)
runs = {}
for name, lib_model, tokenizer, weights_ in (("synthetic", model, tok, (top, blocks)),
                                            ("trained", trained, bpe, (trained_top, trained_blocks))):
    prompt, n_new = "Once upon a time", 40
    my_tokens = greedy_ours(prompt, n_new, tokenizer, *weights_)
    session = Session(lib_model, tokenizer)
    session.feed(prompt)
    lib_text = "".join(session.stream(n_new, greedy, stop_at_eot=False))
    runs[name] = (my_tokens, session.generated, lib_text)
    print(f"{name:9s} ours == library: {my_tokens == session.generated};"
          f" text: {prompt + tokenizer.decode(my_tokens)!r}")
    assert my_tokens == session.generated
    assert tokenizer.decode(my_tokens) == lib_text
assert "".join(tinyrwkv.generate(trained, prompt, max_tokens=n_new, temperature=0,
                                 presence_penalty=0, frequency_penalty=0)) == runs["trained"][2]

# %% [markdown]
# The same token ids as the library, from both models. The synthetic model's text is gibberish:
# untrained weights have no idea what follows "Once upon a time". The trained model's is a story,
# written by the forward pass of this chapter.
#
# ## 4 · The state: a memory of constant size
#
# Everything the model knows about the text it has read is in the `State`: per layer, two shift
# vectors of `C` numbers and `H` WKV matrices of `N × N`. That is
# $L\,(2C + H N^2) = L\,C\,(N + 2)$ numbers, whatever the length of the text.

# The trained model reads a story of a boy, his dog and a kite (written for this chapter in the
# style of the stories it learnt from), and we look at the state it ends with.

# %%
story = (
    "Once upon a time, there was a boy named Ben. Ben had a dog called Spot. Spot was brown and "
    "white, and he loved to run. Every day after school, Ben and Spot went to the park near their "
    "house. Ben threw a stick and Spot ran to get it. Then Spot brought the stick back and Ben "
    "threw it again.\n"
    "One day, Ben threw the stick very far. It flew over the fence and landed in the pond. Spot "
    "ran to the pond and looked at the water. He did not like to swim. Ben came to the pond too. "
    "\"Don't be scared, Spot,\" said Ben. \"I will get the stick.\" Ben found a long branch and "
    "reached into the water. He pulled and pulled, and at last the stick came out. Spot wagged "
    "his tail and barked. Ben gave him the stick and Spot was very happy.\n"
    "On the way home, they met Ben's friend Sue. Sue had a red kite. \"Do you want to fly my "
    "kite with me?\" she asked. \"Yes, please!\" said Ben. Sue and Ben ran across the grass, and "
    "the kite went up high into the sky. Spot ran after them and barked at the kite. The wind "
    "was strong and the kite danced in the air. Ben and Sue laughed and laughed.\n"
    "When the sun went down, Ben said goodbye to Sue. \"Thank you for sharing your kite,\" he "
    "said. Sue smiled and said, \"Come back tomorrow, and bring Spot!\" Ben and Spot walked home. "
    "Ben's mom made soup for dinner. After dinner, Ben told his mom about the stick, the pond "
    "and the kite. His mom listened and smiled. \"What a good day,\" she said. That night, Spot "
    "slept at the end of Ben's bed, and Ben dreamed of kites and sticks and the big blue sky.")
story_ids = bpe.encode(story)
L, C, N = trained.config.n_layer, trained.config.n_embd, trained.config.head_size
_, state = trained.forward(story_ids)
print(f"after {len(story_ids)} tokens of story:")
for name in ("att_shift", "wkv", "ffn_shift"):
    print(f"  {name:10s} {str(getattr(state, name).shape):18s} {getattr(state, name).dtype}")
numbers = sum(getattr(state, name).size for name in ("att_shift", "wkv", "ffn_shift"))
print(f"{numbers:,} numbers = L*C*(N+2) = {L}*{C}*{N + 2} = {L * C * (N + 2):,}")
assert numbers == L * C * (N + 2)

# %% [markdown]
# Now we read the story again in pieces of growing length and measure the state's size in bytes
# after each piece. We use the real `State` object, summing its three arrays' `nbytes`. For
# comparison, take a Transformer of the same `L` and `C`. For every token it keeps one key and one
# value vector of `C` numbers in every layer (its *KV cache*), that is $2LC$ numbers per token, so
# its memory grows with the text. Grouped-query attention shares keys and values between heads and
# shrinks that by a constant factor, but the memory still grows linearly. We feed the pieces
# through the library's `trained.forward`, which chunks the WKV.

# %%
def state_nbytes(state):
    return sum(getattr(state, name).nbytes for name in ("att_shift", "wkv", "ffn_shift"))

measured_lengths, measured_bytes = [], []
state, done = None, 0
for end in [1, 2, 4, 8, 16, 32, 64, 128, 256, len(story_ids)]:
    _, state = trained.forward(story_ids[done:end], state)      # continue from where we were
    done = end
    measured_lengths.append(done)
    measured_bytes.append(state_nbytes(state))
print("tokens read :", measured_lengths)
print("state bytes :", sorted(set(measured_bytes)))
assert len(set(measured_bytes)) == 1 and measured_bytes[0] == L * C * (N + 2) * 8     # float64

# %%
T = np.logspace(0, 5, 200)                                      # context length, 1 .. 100k tokens
L_big, C_big, N_big = 24, 2048, 64                              # the shape of RWKV-7 World 1.5B
kv_cache = 2 * L_big * C_big * T * 2                            # float16: 2 bytes a number
rwkv_fp16 = L_big * C_big * (N_big + 2) * 2 * np.ones_like(T)
# the official code keeps the WKV matrices in float32 whatever the run dtype (docs/architecture.md §5.3)
rwkv_official = L_big * C_big * (2 * 2 + N_big * 4) * np.ones_like(T)
crossover = (N_big + 2) / 2                                      # 2LC·T = LC(N+2)  <=>  T = (N+2)/2

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(12, 4.2))
ax1.plot(T, kv_cache, color="tab:red", label="Transformer KV cache, 2·L·C per token (fp16)")
ax1.plot(T, rwkv_fp16, color="tab:blue", label="RWKV-7 state, L·C·(N+2), all fp16")
ax1.plot(T, rwkv_official, color="tab:blue", ls="--", label="RWKV-7 state, WKV in fp32 (official)")
ax1.axvline(crossover, color="gray", ls=":", lw=1)
ax1.text(crossover * 1.15, 1e9, f"equal at\nT = (N+2)/2 = {crossover:.0f}", fontsize=8, color="gray")
ax1.set(xscale="log", yscale="log", xlabel="context length T (tokens)", ylabel="bytes",
        title=f"Memory for the context, L={L_big}, C={C_big} (formulas)")
ax1.legend(fontsize=8, loc="upper left")

small_T = np.array(measured_lengths)
ax2.plot(small_T, 2 * L * C * small_T * 8, "o-", color="tab:red", ms=3,
         label="KV cache of the same L, C (2·L·C·T float64, formula)")
ax2.plot(small_T, measured_bytes, "s-", color="tab:blue", ms=4, label="State arrays' nbytes (measured)")
ax2.set(xscale="log", yscale="log", xlabel="tokens read", ylabel="bytes",
        title=f"The story model (L={L}, C={C}, float64): measured state size")
ax2.legend(fontsize=8, loc="upper left")
plt.tight_layout()
plt.show()
print(f"at 100k tokens: KV cache {kv_cache[-1] / 2**30:.1f} GiB, RWKV-7 state "
      f"{rwkv_fp16[-1] / 2**20:.1f} MiB (fp16) / {rwkv_official[-1] / 2**20:.1f} MiB (fp32 WKV)")

# %% [markdown]
# Past about 33 tokens the state is smaller than the KV cache (65 tokens if the WKV is kept in
# float32), and at 100k tokens the gap is more than three orders of magnitude. This is the trade RWKV makes. A Transformer can look back at any
# past token exactly. RWKV must decide, token by token, what to write into a fixed memory and what
# to forget (the decay $w$ and the removal key $\hat\kappa$ of chapter 01). The cost per token is
# constant too, since each step reads the state, not the whole history.
#
# ### What the state buys
#
# How much of the story does the model actually use? We measure how surprised it is by each next
# token, the loss $-\ln p(\text{next token})$, when it reads the whole story with its state, and
# when its state is reset to zero every $k$ tokens, so that it only ever remembers the last few
# tokens of the current piece. Resetting every $k$ tokens is the same as reading the story's pieces
# of $k$ tokens separately, each from the zero state. So we read all the pieces side by side, as one
# batch: the library's functions work on arrays of shape `(B, T, C)` as well as `(T, C)`, and
# `State.zeros(..., batch=(B,))` gives each piece its own zero state. (The last piece is padded
# with token 0; the padding comes after every real token and cannot affect them.)

# %%
def losses(logits, ids):
    """-ln p(ids[t + 1]) from logits[t], for t = 0 .. T-2 (float64 log-softmax). -> (T - 1,)"""
    z = logits[:-1] - logits[:-1].max(axis=1, keepdims=True)
    log_p = z - np.log(np.exp(z).sum(axis=1, keepdims=True))                 # (T - 1, V)
    return -log_p[np.arange(len(ids) - 1), ids[1:]]


def reset_every(k, ids):
    """Logits (T, V) when the state is reset to zero every k tokens: the pieces as one batch."""
    n = -(-len(ids) // k)                                                     # pieces, rounded up
    pieces = np.array(ids + [0] * (n * k - len(ids))).reshape(n, k)           # (B, k), 0-padded
    x, _ = trained.forward_seq(pieces, State.zeros(trained.config, np.float64, batch=(n,)))
    return trained.logits(lib_layer_norm(x, *trained.ln_out)).reshape(n * k, -1)[:len(ids)]


full = losses(trained.forward(story_ids, full_output=True)[0], story_ids)   # (T - 1,)
ks = [1, 2, 4, 8, 16, 32, 64, 128]
per_token = {k: losses(reset_every(k, story_ids), story_ids) for k in ks}   # {k: (T - 1,)}
mean_loss = {k: loss.mean() for k, loss in per_token.items()}
gain = per_token[16] - full                                      # (T - 1,) what memory saves per token
first_piece = trained.forward(story_ids[:16], full_output=True)[0]     # (16, V): a fresh read
assert np.allclose(losses(first_piece, story_ids[:16]), per_token[16][:15], rtol=0, atol=1e-10)
best = np.argsort(-gain)[:10]
helped = [bpe.decode([story_ids[t + 1]]) for t in best]
print("mean loss (nats per token), reset every k tokens:",
      {k: round(float(v), 2) for k, v in mean_loss.items()}, f" never reset: {full.mean():.2f}")
print("the 10 tokens the state helps most (vs reset every 16):", helped)

fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(13, 4.2), gridspec_kw={"width_ratios": [1, 1.6]})
ax1.plot(ks, list(mean_loss.values()), "o-", label="state reset every k tokens")
ax1.axhline(full.mean(), color="tab:red", ls="--",
            label=f"never reset (the whole story, {len(story_ids)} tokens)")
ax1.set(xscale="log", xticks=ks, xticklabels=ks, xlabel="k", ylabel="mean loss (nats per token)",
        title="Loss on the story against memory length")
ax1.legend(fontsize=8)
ax2.bar(np.arange(len(gain)), gain, width=1.0, color=np.where(gain > 0, "tab:blue", "tab:gray"))
for j, t in enumerate(sorted(best[:6])):
    ax2.annotate(repr(bpe.decode([story_ids[t + 1]])), (t, gain[t]), fontsize=8, ha="center",
                 xytext=(0, 3 + 10 * (j % 2)), textcoords="offset points")
ax2.set(xlabel="position in the story (the token predicted)", ylabel="loss(reset every 16) − loss(state)",
        title="Where the state helps: the tokens it predicts better than 16 tokens of memory")
plt.tight_layout()
plt.show()

# Measured: 5.79 (k = 1) falling to 2.91 (k = 128) and 2.57 never reset; all 10 of the tokens
# helped most are the story's names (" Ben" and " Spot"). The margins keep half of each gap.
values = [mean_loss[k] for k in ks] + [full.mean()]
assert all(a > b for a, b in zip(values, values[1:]))            # more memory, less surprise
assert mean_loss[16] - full.mean() > 0.5                         # measured 1.16 nats per token
assert sum(word in (" Ben", " Spot", " Sue", " stick", " kite") for word in helped) >= 5

# %% [markdown]
# The more the model may remember, the less it is surprised, all the way to the whole story: even
# beyond 128 tokens the state still lowers the loss. The tokens it helps with most are the ones
# only a memory can predict, the names of the boy and his dog: " Spot" after "Ben threw a stick
# and", " Ben" after "One day," and after `"Don't be scared, Spot," said`. Those are facts the
# story set up earlier, further back than the last 16 tokens, and they are in the state because
# the model wrote them there.
# Memory is not free of mistakes (the grey bars: some tokens are predicted worse with the whole
# story behind them), but on average it helps, and more of it helps more.
#
# ### Save the state, continue later
#
# Because the state is all the model remembers, reading a text in two parts gives the same logits as
# reading it in one go, if the second part starts from the state the first part left. Saving that
# state to disk is the way to cache a long prompt: a chat keeps its state between turns and never
# reads the conversation again. We save it with `tinyrwkv.save_state` (an `.npz`), load it back, and
# continue. We do this with our own forward pass and with the library's.

# %%
first = bpe.encode("Once upon a time, in a land far away, there lived")
second = bpe.encode(" a goose who could remember everything.")
on_trained = dict(top=trained_top, blocks=trained_blocks)       # our forward, the trained weights
full_logits, _ = forward_seq(first + second, **on_trained)      # (T1 + T2, V): everything at once

_, state_after_first = forward_seq(first, **on_trained)
tinyrwkv.save_state(state_after_first, tmp / "after_first.npz")
restored = tinyrwkv.load_state(tmp / "after_first.npz", config=trained.config)
cont_logits, _ = forward_seq(second, restored, **on_trained)    # (T2, V): only the new tokens

lib_cont, _ = trained.forward(second, tinyrwkv.load_state(tmp / "after_first.npz"), full_output=True)
print(f"state file: {(tmp / 'after_first.npz').stat().st_size:,} bytes")
print("max |Δ| continued vs whole text (ours):   ", np.abs(cont_logits - full_logits[len(first):]).max())
print("max |Δ| continued vs whole text (library):", np.abs(lib_cont - full_logits[len(first):]).max())
assert np.allclose(cont_logits, full_logits[len(first):], rtol=0, atol=1e-10)
assert np.allclose(lib_cont, full_logits[len(first):], rtol=0, atol=1e-10)

# %% [markdown]
# ## 5 · Summary
#
# * A checkpoint is a flat `{name: array}` dictionary. Every size (`L, C, H, N, V, F` and the
#   low-rank widths) comes from its shapes, and a loader only casts, squeezes `(1, 1, C)` vectors
#   and groups keys by layer. `tinyrwkv` reads `.safetensors` and torch's bf16 `.pth` without torch.
# * The model is `LN0(emb[t])`, then $L$ pre-norm residual blocks (time mix, channel mix), then
#   `LN_out` and the head. One token at a time (recurrent form) or a whole prompt at once
#   (sequence form), it is the same function.
# * Sampling is penalties → softmax (float32) → top-p → top-k → temperature. Top-p is decided at
#   $\tau = 1$, and greedy decoding is the argmax. On a trained model the distribution is sharp:
#   after "…named Mia. She", top-p = 0.85 keeps four of the 4096 tokens.
# * The state, $L\,C\,(N+2)$ numbers, is the model's whole memory. It does not grow with the text,
#   and saving it and continuing later gives the same logits as reading everything again. What it
#   holds is worth having: with the whole story behind it the trained model is less surprised by
#   every next token than with 16 or 128 tokens of memory, most of all by the story's names.
#
# The final check: our forward pass (embedding → blocks → head, written in this chapter around the
# library's `time_mix` and `channel_mix`) equals the library's `forward` in both forms, on the
# synthetic model and on the trained one; continuing from a saved state equals reading the whole
# text; and greedy generation picks the library's tokens.

# %%
report = {}
for name, lib_model, tokenizer, weights_ in (("synthetic", model, tok, dict(top=top, blocks=blocks)),
                                            ("trained", trained, bpe, on_trained)):
    check_ids = tokenizer.encode("RWKV is an RNN with the performance of a Transformer.")
    lib_seq, lib_seq_state = lib_model.forward(check_ids, full_output=True, mode="sequence")
    lib_rec, lib_rec_state = lib_model.forward(check_ids, full_output=True, mode="recurrent")
    our_seq, our_seq_state = forward_seq(check_ids, **weights_)
    our_rec, our_rec_state = forward_recurrent(check_ids, **weights_)
    report[f"{name}: sequence form vs forward (sequence)"] = np.abs(our_seq - lib_seq).max()
    report[f"{name}: recurrent form vs forward (recurrent)"] = np.abs(our_rec - lib_rec).max()
    report[f"{name}: final WKV state, both forms"] = max(np.abs(our_seq_state.wkv - lib_seq_state.wkv).max(),
                                                         np.abs(our_rec_state.wkv - lib_rec_state.wkv).max())
    assert np.allclose(our_seq, lib_seq, rtol=0, atol=1e-10)    # float64: rounding only
    assert np.allclose(our_rec, lib_rec, rtol=0, atol=1e-10)
    for ours, lib in [(our_seq_state, lib_seq_state), (our_rec_state, lib_rec_state)]:
        for part in ("att_shift", "wkv", "ffn_shift"):
            assert np.allclose(getattr(ours, part), getattr(lib, part), rtol=0, atol=1e-10), part
report["trained: continued state vs whole text"] = np.abs(cont_logits - full_logits[len(first):]).max()
for what, delta in report.items():
    print(f"  {what:45s} max |Δ| = {delta:.1e}")
assert np.allclose(cont_logits, full_logits[len(first):], rtol=0, atol=1e-10)
assert all(ours == lib for ours, lib, _ in runs.values())      # greedy: the library's tokens
print(f"all checks passed ({time.perf_counter() - CHAPTER_START:.1f} s)")
