# %% [markdown]
# # 00 · Quickstart
#
# Five minutes with tinyrwkv: load an RWKV-7 checkpoint, run the forward pass, continue from a
# state, generate text. The later chapters open up each piece:
#
# 1. [Time mixing](01_time_mixing.ipynb): RWKV-7's attention, a state that learns in context
# 2. [Channel mixing](02_channel_mixing.ipynb): a two-layer MLP with a token shift
# 3. [Parallel vs recurrent](03_parallel_vs_recurrent.ipynb): the same WKV, two ways
# 4. [The whole model](04_whole_model.ipynb): from a checkpoint file to the next token
# 5. [Fast kernels](05_fast_kernels.ipynb): the same math, compiled
#
# This notebook runs without downloads: if the environment variable `TINYRWKV_MODEL` points to an
# official checkpoint (for example `RWKV-x070-World-0.1B-v2.8-20241210-ctx4096.pth` from
# BlinkDL/rwkv-7-world on Hugging Face), it uses that; otherwise it makes a small *untrained*
# synthetic model with the same architecture, whose text is gibberish but whose numbers are
# computed exactly as for a real model.

# %%
import os
import tempfile
from pathlib import Path

import numpy as np

import tinyrwkv
from tinyrwkv.formats import save_safetensors
from tinyrwkv.synthetic import make_weights

path = os.environ.get("TINYRWKV_MODEL")
if path is None:
    tmp = Path(tempfile.mkdtemp())
    path = tmp / "tiny-synthetic.safetensors"
    # 2 layers, 128 channels, the World vocabulary's 65536 rows
    save_safetensors(path, make_weights(n_layer=2, n_embd=128, vocab_size=65536, seed=0))
model = tinyrwkv.load(path)
print(model.config)
print(f"{model.n_params:,} parameters, tokenizer {model.tokenizer.name}")

# %% [markdown]
# ## Tokens in, logits out
#
# `forward` takes token ids and a state (None = the zero state) and returns the logits of the last
# token and the new state. The state passed in is never modified.

# %%
tok = model.tokenizer
ids = tok.encode("The capital of France is")
print(ids, "->", [tok.decode([i]) for i in ids])
logits, state = model.forward(ids)
print("logits", logits.shape, "most likely next token:", repr(tok.decode([int(np.argmax(logits))])))

# %% [markdown]
# ## The state is the whole memory
#
# RWKV is an RNN: everything it knows about the text so far is in `state`, whose size does not
# depend on how long the text was. Reading the rest of a text from a saved state gives the same
# result as reading it all at once.

# %%
print("att_shift", state.att_shift.shape, " wkv", state.wkv.shape, " ffn_shift", state.ffn_shift.shape)
more = tok.encode(" Paris, and the capital of Italy is")
continued, _ = model.forward(more, state)
at_once, _ = model.forward(ids + more)
print("max |difference|:", np.abs(continued - at_once).max())
assert np.allclose(continued, at_once, atol=1e-4)

# %% [markdown]
# ## Generating text
#
# `tinyrwkv.generate` streams text pieces (never half a character). With a fixed seed the same
# text comes back every time.

# %%
pieces = list(tinyrwkv.generate(model, "Once upon a time", max_tokens=20, seed=0))
print(repr("".join(pieces)))
assert pieces == list(tinyrwkv.generate(model, "Once upon a time", max_tokens=20, seed=0))

# %% [markdown]
# From the command line the same is `tinyrwkv generate --model PATH "Once upon a time"`, and
# `tinyrwkv chat --model PATH` keeps the state between turns of a conversation.
