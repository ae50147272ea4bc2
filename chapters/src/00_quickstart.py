# %% [markdown]
# # 00 · Quickstart
#
# Five minutes with tinyrwkv: load a trained RWKV-7, run the forward pass, continue from a state,
# let it write a story, and look at the distribution the next token is drawn from.
#
# The model is the small one that ships in `weights/` (`weights/MODEL_CARD.md`): an RWKV-7 with
# 6 layers of 256 channels, 7.3 million parameters, trained for 3.6 minutes on simple children's
# stories with its own 4096-token tokenizer. It writes such stories and knows nothing else. To
# run this notebook on another checkpoint, for example an official World model, point the
# environment variable `TINYRWKV_MODEL` at it; every cell works the same.
#
# **The book.** Each chapter opens up one piece; 01, 02 and 04 are the core.
#
# | | chapter | what you build or see |
# |---|---|---|
# | 00 | Quickstart | this page |
# | 01 | [Time mixing](01_time_mixing.ipynb) | RWKV-7's attention: a state that learns in context |
# | 02 | [Channel mixing](02_channel_mixing.ipynb) | a two-layer MLP with a token shift |
# | 03 | [Parallel vs recurrent](03_parallel_vs_recurrent.ipynb) | the same WKV, two ways |
# | 04 | [The whole model](04_whole_model.ipynb) | from a checkpoint file to the next token |
# | 05 | [Fast kernels](05_fast_kernels.ipynb) | the same math, compiled |
# | 06 | [Training](06_training.ipynb) | backpropagation through the recurrence |
# | 07 | [Tokenizers, briefly](07_tokenizers.ipynb) | why token ids must match before logits can |
# | 08 | [What if you get it wrong](08_getting_it_wrong.ipynb) | plausible misreadings and what they cost |
# | 09 | [Your RWKV-7, no library](09_your_rwkv7.ipynb) | your own pieces, one model, checked against the official package |

# %%
import os

import matplotlib.pyplot as plt
import numpy as np

import tinyrwkv
from tinyrwkv.sampling import sampling_probs, softmax

model = tinyrwkv.load(os.environ.get("TINYRWKV_MODEL"))   # None: the model in weights/
tok = model.tokenizer
print(model.config)
print(f"{model.n_params:,} parameters, tokenizer {tok.name}, backend {model.backend}")

# %% [markdown]
# ## Tokens in, logits out
#
# Text goes in as token ids (chapter 07). `forward` takes the ids and a state (None = the zero
# state, nothing read yet) and returns the logits of the **next** token after the last one, one
# number per vocabulary entry, and the new state. The state passed in is never modified.

# %%
prompt = "Once upon a time, there was a little girl named Lily. She loved to"
ids = tok.encode(prompt)
print(len(ids), "tokens:", [tok.decode([i]) for i in ids])
logits, state = model.forward(ids)
p = softmax(logits.astype(np.float64))
top = np.argsort(p)[::-1][:5]
print("logits", logits.shape, "; most likely next tokens:",
      ", ".join(f"{tok.decode([int(i)])!r} {p[i]:.2f}" for i in top))

# %% [markdown]
# ## The state is the whole memory
#
# RWKV is an RNN: everything the model knows about the text so far is in `state`, and its size
# does not depend on how long the text was. So reading a text in two halves, the second from the
# state the first one left, must give what reading it at once gives.

# %%
print("state: att_shift", state.att_shift.shape, " wkv", state.wkv.shape,
      " ffn_shift", state.ffn_shift.shape, f" ({state.nbytes:,} bytes)")
half = len(ids) // 2
_, state_half = model.forward(ids[:half])
continued, _ = model.forward(ids[half:], state_half)
at_once, _ = model.forward(ids)
diff = np.abs(continued - at_once).max()
print(f"max |difference| of the logits: {diff:.1e}  (logits span {np.ptp(at_once):.1f})")
# Not bit-equal: in float32 the two runs add the same numbers in a different order (the split
# moves the boundaries of the chunks the sequence form works in), so they differ by rounding,
# a few 1e-6 on logits of size ~10 (measured 2.4e-6 on the shipped model). 1e-4 allows for
# that and for other machines' BLAS; a real bug (a state not carried) moves logits by ~1.
assert diff < 1e-4
assert np.argmax(continued) == np.argmax(at_once)

# %% [markdown]
# ## A story
#
# `tinyrwkv.generate` streams text pieces (never half a character), sampling each next token
# with the official package's defaults (top-p 0.85, temperature 1, repetition penalties;
# docs/sampling.md). With a fixed seed the same story comes back every time.

# %%
story = "".join(tinyrwkv.generate(model, "Once upon a time", max_tokens=120, seed=0))
print("Once upon a time" + story)
assert story == "".join(tinyrwkv.generate(model, "Once upon a time", max_tokens=120, seed=0))

# %% [markdown]
# ## What the next token is drawn from
#
# The model's output is a probability for every one of its tokens. Top-p sampling keeps the most
# probable tokens until their probabilities add up to p, and draws only from those
# (docs/sampling.md §1). On a trained model that is a handful of plausible words. On an
# untrained one, whose distribution is nearly flat, top-p 0.9 would keep about 90 % of the
# vocabulary, thousands of tokens, which is the opposite of what it is for.

# %%
_, state = model.forward(tok.encode("Once upon a time, there was a little"))
logits, _ = model.forward(tok.encode(" dog. The dog"), state)
p = softmax(logits.astype(np.float64))
kept = np.flatnonzero(sampling_probs(logits, top_p=0.9))
order = np.argsort(p)[::-1][:20]
print(f"top-p 0.9 keeps {len(kept)} of {len(p)} tokens:",
      ", ".join(repr(tok.decode([int(i)])) for i in order if i in kept))
assert len(kept) <= 20, len(kept)        # a handful (measured: 4), not thousands

fig, ax = plt.subplots(figsize=(9, 3))
ax.bar(range(20), p[order], color=["C0" if i in kept else "C7" for i in order])
ax.set_xticks(range(20), [repr(tok.decode([int(i)])) for i in order], rotation=60, fontsize=8)
ax.set_ylabel("probability")
ax.set_title(f"next token after '... a little dog. The dog': top-p 0.9 keeps the {len(kept)} blue ones")
plt.tight_layout()
plt.show()

# %% [markdown]
# From the command line the same is `tinyrwkv generate "Once upon a time"` (the shipped model;
# `--model PATH` for another), and `tinyrwkv chat --model PATH` keeps the state between turns of a
# conversation. Chapter 01 starts opening the model up.
