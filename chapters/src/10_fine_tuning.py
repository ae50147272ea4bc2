# %% [markdown]
# # 10 · Fine-tuning: LoRA and state tuning
#
# **What you will build.** The model shipped in `weights/` writes children's stories. Here you
# teach it a new style, Shakespeare's plays, without retraining its 7.3 million parameters,
# in the two ways RWKV users fine-tune (JL-er/RWKV-PEFT): **LoRA**, a small low-rank correction to
# some of its matrices, and **state tuning**, a learned starting state for its recurrence. You
# will check each method's gradient against finite differences, write a short training loop for
# both from the library's pieces, measure bits per byte on held-out Shakespeare before and after,
# read samples from all three models with the same prompt and seed, and save the results as the
# files `tinyrwkv train` writes, which RWKV-PEFT's tools read too.
#
# **Prerequisites.** [06 · Training](06_training.ipynb) (the backward pass, `loss_and_grad`, the
# AdamW loop) and [04 · The whole model](04_whole_model.ipynb). The file formats are in
# docs/formats.md §6.1 (LoRA) and docs/formats.md §6.2 (state tuning); `tinyrwkv train`'s
# fine-tuning options, which do all of this from the command line, in docs/training.md §2.
#
# Everything here runs on a CPU in well under two minutes, so the training runs are short: a
# demonstration of the methods, not a finished Shakespeare model.

# %%
import tempfile
import time
from pathlib import Path
from types import SimpleNamespace

import matplotlib.pyplot as plt
import numpy as np
from threadpoolctl import threadpool_limits

import tinyrwkv
from tinyrwkv import train
from tinyrwkv.evaluate import evaluate_text
from tinyrwkv.formats.lora import merge_lora, initial_state, read_adapter, read_start_state
from tinyrwkv.formats.numerics import bf16_to_float32, to_bf16_bits
from tinyrwkv.formats.pth_writer import save_pth
from tinyrwkv.loader import numba_missing, shipped_model_path
from tinyrwkv.synthetic import make_weights
from tinyrwkv import trainer
from tinyrwkv.trainer import DEFAULT_LR, adamw_step, clip_, lr_at, window_starts

CHAPTER_START = time.perf_counter()
np.set_printoptions(precision=4, suppress=True, linewidth=110)
rng = np.random.default_rng(0)

# %% [markdown]
# The shipped model, twice: `tinyrwkv.load()` for generating and measuring (the fast backend, on
# one thread: the matrix products here are small, and one thread is the steady choice on a busy
# machine, chapter 05 §7), and its tensors as a plain `{key: array}` dict, which is what
# `tinyrwkv.train` differentiates.

# %%
model = tinyrwkv.load(threads=1)              # weights/: a small TinyStories model
tok = model.tokenizer
base = tinyrwkv.read_checkpoint(shipped_model_path(), dtype="float32")     # {key: array}
config = model.config
n_params = sum(a.size for a in base.values())
print(config)
print(f"{n_params:,} parameters; tokenizer: {tok.vocab_size} tokens; backend: {model.backend}")


def inference_model(weights):
    """The trainer's model for sampling and measuring, on one thread (this chapter's choice)."""
    return trainer.inference_model(weights, threads=1)


# The WKV forward/backward pair the trainer would choose on this backend for 64-token windows
wkv_ops = train.choose_wkv_ops("numpy" if numba_missing() else "numba", 64)

# %% [markdown]
# ## 1. Two ways to adapt a model without retraining it
#
# Training every parameter (`tinyrwkv train --init-from MODEL`, "full" fine-tuning) works, but it
# writes a whole new model per task, and with little data it quickly forgets what the model knew.
# Both methods below keep the model frozen and train something small beside it.
#
# **LoRA** (low-rank adaptation). A matrix `W` (out × in) is used as
#
#     W' = W + s B A,      s = alpha / r,    A: (r, in),   B: (out, r)
#
# with a small rank `r` (8 here). `A` starts random and `B` at zero, so `B A = 0`: training starts
# **exactly** at the base model. The gradient needs nothing new: the model's backward already
# gives `dW' = dL/dW'`, and since `W'` depends on `A` and `B` through one matrix product,
# the chain rule (chapter 06's `dA = dY B^T`, `dB = A^T dY` for `Y = A B`) pulls it back:
#
#     dA = s B^T dW'          dB = s dW' A^T
#
# `train.lora_loss_and_grad` is exactly this: it builds `W'` with `formats.lora.lora_weight` (the
# same function `merge-lora` uses), asks `loss_and_grad` for the gradients of the merged matrices
# only (`want=`: the frozen rest costs no weight gradient), and pulls them back. RWKV-PEFT wraps
# six matrices of every layer (`train.LORA_TARGETS`): the receptance, key, value and output
# projections of the time mix and the two matrices of the channel mix.
#
# First we check it against finite differences on a tiny random model in float64. At the start
# `B = 0` makes `dA = s B^T dW' = 0` exactly, so to test both factors we give `B` random values.
# The tolerance is chapter 06's reasoning: with `h = 1e-5` in float64 the error of a central
# difference is about `h^2 |L'''| / 6 + eps |L| / h`, near `1e-10`; measured against the typical
# size (root mean square) of the tensor's gradient, `1e-6` leaves orders of magnitude for
# rounding and none for a wrong formula, which would be off by the size of the gradient itself.

# %%
tiny = make_weights(2, 32, 37, head_size=16, dim_ffn=48, ranks=(8, 8, 4, 8), seed=1,
                    dtype=np.float64)
ids_t, tgt_t = rng.integers(0, 37, (2, 9)), rng.integers(0, 37, (2, 9))      # (B, T)
ALPHA_T = 8.0
tiny_lora = train.init_lora(tiny, rank=4, dtype=np.float64)
for key in tiny_lora:
    if key.endswith(".lora_B"):                       # non-zero, so that dA is not zero
        tiny_lora[key] = 0.1 * rng.standard_normal(tiny_lora[key].shape)
loss_t, g_lora = train.lora_loss_and_grad(tiny, tiny_lora, ALPHA_T, ids_t, tgt_t)


def entry_to_check(g, scale):
    """A random entry whose gradient is at least a tenth of the typical one (a squared-ReLU
    input that is zero on every token has an exactly zero gradient: a check there proves
    nothing)."""
    candidates = np.argwhere(np.abs(g) > 0.1 * scale)
    return tuple(int(i) for i in candidates[rng.integers(len(candidates))])


def lora_loss(lora):
    return train.lora_loss_and_grad(tiny, lora, ALPHA_T, ids_t, tgt_t)[0]


h = 1e-5


def check_by_finite_differences(loss_of, tensors, grads, keys):
    """For one well-conditioned entry of each tensor in `keys`: the central difference of
    loss_of(tensors with that entry moved by +-h) against the analytic gradient, relative to the
    gradient's typical size. Prints each and returns {key: error}."""
    errors = {}
    for key in keys:
        scale = np.sqrt(np.mean(grads[key] ** 2))          # the typical size of this gradient
        idx = entry_to_check(grads[key], scale)
        plus, minus = dict(tensors), dict(tensors)
        plus[key], minus[key] = tensors[key].copy(), tensors[key].copy()
        plus[key][idx] += h
        minus[key][idx] -= h
        fd = (loss_of(plus) - loss_of(minus)) / (2 * h)
        errors[key] = abs(fd - grads[key][idx]) / scale
        print(f"  {key:28s}{str(idx):11s} finite difference {fd: .3e}, analytic "
              f"{grads[key][idx]: .3e}; |Δ| / rms(gradient) = {errors[key]:.1e}")
    return errors


fd_errors = check_by_finite_differences(
    lora_loss, tiny_lora, g_lora, ("blocks.0.att.key.lora_A", "blocks.1.att.output.lora_B",
                                   "blocks.1.ffn.value.lora_A", "blocks.0.ffn.key.lora_B"))
assert max(fd_errors.values()) < 1e-6, fd_errors

# %% [markdown]
# And the pull-back itself, written out for one matrix: the merged model's own gradient of `W'`
# (from `loss_and_grad`, with `lora_weight` building `W'`), multiplied by `s B^T` and `A^T`, gives
# the library's `dA` and `dB`.

# %%
stem = "blocks.1.att.value"
A, Bm = tiny_lora[stem + ".lora_A"], tiny_lora[stem + ".lora_B"]
merged_tiny = train.lora_merged(tiny, tiny_lora, ALPHA_T)          # lora_weight on each W
_, g_merged = train.loss_and_grad(merged_tiny, ids_t, tgt_t, want={stem + ".weight"})
dW = g_merged[stem + ".weight"]
s = ALPHA_T / Bm.shape[1]
pullback_err = max(np.abs(s * Bm.T @ dW - g_lora[stem + ".lora_A"]).max() / np.abs(dW).max(),
                   np.abs(s * dW @ A.T - g_lora[stem + ".lora_B"]).max() / np.abs(dW).max())
print(f"W' {dW.shape}, A {A.shape}, B {Bm.shape}, s = {s}; "
      f"s B^T dW' and s dW' A^T vs the library: max|Δ| / max|dW'| = {pullback_err:.1e}")
assert pullback_err < 1e-12          # float64, the same products in the same order: rounding only

# %% [markdown]
# **State tuning.** RWKV carries everything it remembers of the text so far in its state: per
# layer and head an `N × N` matrix `S` (chapter 01). A Transformer conditions on a prompt by
# attending to its tokens; RWKV conditions on a prompt by having read it, that is, by starting
# the next token from the state the prompt left. So a learned **initial state** `S0` is a learned
# prompt: of fixed size, never read token by token, and free at generation time. The model
# is frozen; only `S0`, one `(H, N, N)` tensor per layer (`blocks.{i}.att.time_state`, RWKV-PEFT's
# name, docs/formats.md §6.2), is trained.
#
# Its gradient comes out of the backward we already have: chapter 06's `wkv_backward` returns
# `dS0`, the gradient reaching back through every token to the state before the first one.
# `loss_and_grad` starts each sequence from the `time_state` tensors when `params` holds them
# (else from zeros) and, with `want=` naming them, returns their gradients without the weights'.
# Checked the same way, from a random non-zero `S0`:

# %%
tiny_state = {k: 0.3 * rng.standard_normal(v.shape) for k, v in train.init_state(tiny).items()}
_, g_state = train.loss_and_grad({**tiny, **tiny_state}, ids_t, tgt_t, want=tiny_state.keys())


def state_loss(states):
    return train.loss_and_grad({**tiny, **states}, ids_t, tgt_t, want=())[0]     # the loss only


fd_errors.update(check_by_finite_differences(state_loss, tiny_state, g_state, tiny_state))
assert max(fd_errors.values()) < 1e-6, fd_errors

# %% [markdown]
# How much does each method train? Both are small next to the model: LoRA adds `r (in + out)`
# numbers per wrapped matrix, state tuning `H N^2` per layer. And both start exactly where the
# base model is: `B = 0` makes every `W'` equal to `W` to the last bit, and the zero initial
# state is the state the model always starts from. On a sentence of text, the losses agree
# exactly:

# %%
RANK, ALPHA = 8, 16.0                           # RWKV-PEFT's usual pairing: alpha = 2 r
lora0 = train.init_lora(base, RANK)
state0 = train.init_state(base)
n_lora = sum(a.size for a in lora0.values())
n_state = sum(a.size for a in state0.values())
H, N = config.n_head, config.head_size
print(f"{'the model':38s} {n_params:>10,} parameters")
print(f"{f'LoRA rank {RANK} on {len(lora0) // 2} matrices':38s} {n_lora:>10,} numbers "
      f"({100 * n_lora / n_params:.1f}%)")
print(f"{f'state tuning: {config.n_layer} layers x ({H}, {N}, {N})':38s} {n_state:>10,} numbers "
      f"({100 * n_state / n_params:.1f}%)")

probe = np.array([tok.encode("Once upon a time, in a land far away, there lived a king.")])
loss_base = train.loss_and_grad(base, probe[:, :-1], probe[:, 1:], wkv_ops, want=())[0]
loss_lora0 = train.lora_loss_and_grad(base, lora0, ALPHA, probe[:, :-1], probe[:, 1:], wkv_ops)[0]
loss_state0 = train.loss_and_grad({**base, **state0}, probe[:, :-1], probe[:, 1:], wkv_ops,
                                  want=())[0]
print(f"loss of the base model {loss_base:.6f}; with a fresh adapter {loss_lora0:.6f}; "
      f"from a zero trained state {loss_state0:.6f}")
assert loss_lora0 == loss_base and loss_state0 == loss_base

# %% [markdown]
# ## 2. The data: a slice of Shakespeare
#
# `chapters/data/shakespeare_coriolanus.txt` (61 KB) and `shakespeare_shrew.txt` (20 KB) are slices
# of the classic char-rnn "tinyshakespeare" text (public domain; provenance in
# `chapters/data/README.md`): the training slice from the start of its training part, the
# held-out slice from the start of its validation part, which comes from another play. The model's own tokenizer reads
# them. It learnt its 4096 tokens from children's stories, so it spends more tokens per byte on
# Shakespeare than on the stories it knows; that is part of what makes this a new style.

# %%
data_dir = Path("data")                          # relative to chapters/, where this runs
if not (data_dir / "shakespeare_coriolanus.txt").is_file():
    raise FileNotFoundError(f"{(data_dir / 'shakespeare_coriolanus.txt').resolve()} not found: it "
                            "ships with the repository in chapters/data/. Run this notebook "
                            "from the chapters/ folder.")
train_text = (data_dir / "shakespeare_coriolanus.txt").read_text(encoding="utf-8")
valid_text = (data_dir / "shakespeare_shrew.txt").read_text(encoding="utf-8")
train_ids = np.array(tok.encode(train_text), np.int64)
print(f"training text: {len(train_text.encode()):,} bytes, {len(train_ids):,} tokens, "
      f"{len(train_text.encode()) / len(train_ids):.2f} bytes/token")
print(f"held-out text: {len(valid_text.encode()):,} bytes")
print(train_text[:180])

# %% [markdown]
# ## 3. Training both
#
# One loop for both methods, composed of the library's pieces: random windows of the training
# text (`trainer.window_starts`), the loss and the gradients of what is trained
# (`lora_loss_and_grad`, or `loss_and_grad` with `want=` the states), gradient-norm clipping
# (`trainer.clip_`) and the AdamW update with warm-up and cosine decay (`trainer.adamw_step`,
# `trainer.lr_at`), as `tinyrwkv train` runs them. Weight decay touches only full 2-D
# `.weight` matrices there, so neither the LoRA factors nor the states are decayed.
#
# The learning rates: `tinyrwkv train`'s defaults (`trainer.DEFAULT_LR`) are meant for runs of
# hundreds of steps or more. This run is 80 steps of 4 windows of 64 tokens, so it takes larger
# steps: 3 times the LoRA default and 10 times the state default (a quick sweep of 40- and
# 80-step runs on this data found both better than the defaults, and neither diverging). A
# state wants a much larger rate than a weight: it enters the model once, at the first token,
# and its effect fades with the decay, so its gradient is small.

# %%
STEPS, BATCH, CTX = 80, 4, 64
LR = {"lora": 3 * DEFAULT_LR["lora"], "state": 10 * DEFAULT_LR["state"]}


def fine_tune(method):
    """Train a fresh adapter ("lora") or initial state ("state") on the Shakespeare slice.
    Returns the trained tensors and the loss of every step (nats/token)."""
    trained = train.init_lora(base, RANK) if method == "lora" else train.init_state(base)
    opt = {"m": {k: np.zeros_like(v) for k, v in trained.items()},
           "v": {k: np.zeros_like(v) for k, v in trained.items()}, "t": 0}
    settings = SimpleNamespace(lr=LR[method], min_lr_ratio=0.1, warmup=8, steps=STEPS,
                               beta1=0.9, beta2=0.99, eps=1e-8, weight_decay=0.1)
    windows = np.random.default_rng(0)             # the same batches for both methods
    losses = []
    for step in range(STEPS):
        starts = window_starts(train_ids, CTX, BATCH, windows)
        ids = np.stack([train_ids[s:s + CTX] for s in starts])
        targets = np.stack([train_ids[s + 1:s + CTX + 1] for s in starts])
        if method == "lora":
            loss, grads = train.lora_loss_and_grad(base, trained, ALPHA, ids, targets, wkv_ops)
        else:
            loss, grads = train.loss_and_grad({**base, **trained}, ids, targets, wkv_ops,
                                              want=trained.keys())
        clip_(grads, 1.0)
        adamw_step(trained, grads, opt, lr_at(step, settings), settings)
        losses.append(loss)
    return trained, np.array(losses)


curves, tuned, seconds = {}, {}, {}
with threadpool_limits(1):
    for method in ("lora", "state"):
        t0 = time.perf_counter()
        tuned[method], curves[method] = fine_tune(method)
        seconds[method] = time.perf_counter() - t0
        print(f"{method:5s} lr {LR[method]:g}: {STEPS} steps in {seconds[method]:.1f} s "
              f"({STEPS * BATCH * CTX / seconds[method]:,.0f} tokens/s); loss "
              f"{curves[method][:5].mean():.2f} -> {curves[method][-5:].mean():.2f} nats/token "
              f"(mean of the first and last 5 steps)")

# %% [markdown]
# Each step's loss is on its own random batch, so the curves are noisy; the thick lines are the
# mean of the last 10 steps, drawn at the last step they include (chapter 06 §7). Both methods
# see the same batches, so the gap between the curves is the methods' difference, not the data's.

# %%
k = 10
fig, ax = plt.subplots(figsize=(7, 3.2))
for method, color in (("lora", "C0"), ("state", "C1")):
    c = curves[method]
    ax.plot(c, lw=0.7, alpha=0.5, color=color)
    ax.plot(np.arange(k - 1, len(c)), np.convolve(c, np.ones(k) / k, mode="valid"), lw=2,
            color=color, label=f"{method} (lr {LR[method]:g})")
ax.axhline(np.log(config.vocab_size), ls="--", color="gray",
           label=f"uniform over {config.vocab_size} tokens")
ax.set_xlabel("step")
ax.set_ylabel("training loss (nats/token)")
ax.set_title("fine-tuning the story model on Shakespeare")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# ## 4. Before and after
#
# The held-out slice is from a play the training never saw. We measure bits per byte (the
# loss in bits, spread over the UTF-8 bytes of the text, so that models with different
# tokenizers compare) with `tinyrwkv.evaluate.evaluate_text`, the code behind `tinyrwkv eval`,
# **per document**: each blank-line-separated speech read from a fresh start (the end-of-text
# token, then the speech), as a user's generation starts. For the state-tuned model, "fresh" is
# the learned state (`initial_state` turns the `time_state` tensors into a `State`); the LoRA
# adapter is merged into the weights with `merge_lora`, as `tinyrwkv merge-lora` does, so the
# merged model runs at the base model's speed.

# %%
start_state = initial_state(tuned["state"], config)
merged = merge_lora(base, tuned["lora"], ALPHA)
models = {"base": (model, None), "state-tuned": (model, start_state),
          "LoRA (merged)": (inference_model(merged), None)}
bpb, bpb_stream = {}, {}
print(f"{'':14s} {'bits/byte':>12s} {'':>8s} {'bits/byte':>12s}")
print(f"{'model':14s} {'per speech':>12s} {'speeches':>8s} {'one stream':>12s}")
for name, (m, start) in models.items():
    r = evaluate_text(m, valid_text, per_document=True, tokenizer=tok, state=start)
    bpb[name] = r["bits_per_byte"]
    bpb_stream[name] = evaluate_text(m, valid_text, tokenizer=tok, state=start)["bits_per_byte"]
    print(f"{name:14s} {r['bits_per_byte']:12.3f} {r['documents']:8d} {bpb_stream[name]:12.3f}")

# %% [markdown]
# The last column reads the whole held-out text as one stream from the start state instead
# (`per_document=False`). For LoRA the two columns should tell the same story: the adapted
# weights help at every token. For the state-tuned model they need not: its learned state is
# where reading *starts*, and it fades with the decay as the text is read, so its gain should be
# large per speech and small over one long stream, which is just where a learned prompt helps
# and where it does not.
#
# Samples from each, with the same prompt and the same seed (the official sampling defaults:
# temperature 1, top-p 0.85 and small repetition penalties), so the only difference is the
# model:

# %%
prompt = "ROMEO:\n"
for name, (m, start) in models.items():
    text = "".join(tinyrwkv.generate(m, prompt, tokenizer=tok, max_tokens=60, seed=0,
                                     state=None if start is None else start.copy()))
    print(f"--- {name} ---\n{prompt}{text}\n")

# %% [markdown]
# What to look for: the base model turns any prompt into a children's story. After a minute of
# tuning, the adapted models lean towards the play: short lines, older words, a speaker's name
# and a colon now and then. A minute is far too little for spelling and sense; the bits per
# byte above say how far each got, and the samples are one draw each. LoRA changes what every
# layer computes for every token, so it has more room to learn; the state only changes where
# the model starts. State tuning's appeal is elsewhere: its file is small, the weights are
# untouched, and one server can keep many states for one set of weights.

# %% [markdown]
# ## 5. Saving, and loading back
#
# `tinyrwkv train --lora` and `--state-tune` write what RWKV-PEFT writes: a torch `.pth` holding
# the trained tensors under their official names (`blocks.0.att.key.lora_A`, ...,
# `blocks.0.att.time_state`, ...), in bfloat16 by default (`--save-dtype`). tinyrwkv writes a
# `.pth` without torch (`formats.pth_writer.save_pth`, atomically). Reading back: `read_adapter`
# for an adapter (any of the layouts in docs/formats.md §6.1), then `merge_lora`; and
# `read_start_state` for a state (a `.pth` or `.safetensors` with `time_state` tensors, or a
# tinyrwkv `.npz`). bfloat16 keeps 8 bits of mantissa, so what comes back is the trained numbers
# rounded to bfloat16, exactly:

# %%
bf16 = lambda a: bf16_to_float32(to_bf16_bits(a))           # round to bfloat16, widen back
with tempfile.TemporaryDirectory() as folder:
    adapter_file, state_file = Path(folder) / "lora_adapter.pth", Path(folder) / "time_state.pth"
    save_pth(adapter_file, tuned["lora"], dtype="bfloat16")
    save_pth(state_file, tuned["state"], dtype="bfloat16")
    for f in (adapter_file, state_file):
        print(f"{f.name:17s} {f.stat().st_size / 1e3:7.1f} kB")
    adapter, file_alpha = read_adapter(adapter_file)         # alpha is not in the file: None
    merged_back = merge_lora(base, adapter, ALPHA)
    state_back = read_start_state(state_file, config)

expected = merge_lora(base, {k: bf16(v) for k, v in tuned["lora"].items()}, ALPHA)
adapter_roundtrip = set(merged_back) == set(expected) and \
    all(np.array_equal(merged_back[k], expected[k]) for k in expected)
state_roundtrip = all(np.array_equal(state_back.wkv[i], bf16(tuned["state"][f"blocks.{i}.att.time_state"]))
                      for i in range(config.n_layer))
print(f"alpha recorded in the adapter file: {file_alpha} (give it to merge-lora: --alpha {ALPHA:g})")
print(f"adapter: merged from the file == merged from the bf16-rounded adapter: {adapter_roundtrip}")
print(f"state: read from the file == the bf16-rounded trained state: {state_roundtrip}")
assert adapter_roundtrip and state_roundtrip

# %% [markdown]
# The same two runs from the command line, each with validation, a loss-curve PNG and a model
# card in `--out` (docs/training.md §2.1 and docs/training.md §2.2):
#
# (Without `--threads` the trainer picks the thread count as it runs, docs/training.md §3;
# `--threads 1` is what this chapter uses.)
#
# ```bash
# tinyrwkv train --init-from weights/model.safetensors --lora 8 --lora-alpha 16 --lr 3e-3 \
#     --steps 80 --batch 4 --ctx 64 --data chapters/data/shakespeare_coriolanus.txt \
#     --valid chapters/data/shakespeare_shrew.txt --out runs/lora
# tinyrwkv merge-lora --alpha 16 weights/model.safetensors runs/lora/lora_adapter.pth shakespeare.safetensors
#
# tinyrwkv train --init-from weights/model.safetensors --state-tune --lr 0.3 \
#     --steps 80 --batch 4 --ctx 64 --data chapters/data/shakespeare_coriolanus.txt \
#     --valid chapters/data/shakespeare_shrew.txt --out runs/state
# tinyrwkv generate --state runs/state/time_state.pth "ROMEO:"
# ```

# %% [markdown]
# ## Checks
#
# What this chapter claims, asserted in one place. The last two compare with the base model on
# text none of them trained on, so they can fail: a learning rate too high, or a bug that
# trained on the wrong thing, would show here.

# %%
assert max(fd_errors.values()) < 1e-6                  # §1: dA, dB and dS0 = finite differences
assert pullback_err < 1e-12                            # §1: dA = s B^T dW', dB = s dW' A^T
assert loss_lora0 == loss_base == loss_state0          # §1: both start exactly at the base model
for method in ("lora", "state"):                       # §3: the training loss fell, by more
    # than batch-to-batch noise: single steps scatter by about half a nat around the curve, so a
    # mean of 10 steps by about 0.15; 0.5 nats is over three times that
    assert curves[method][-10:].mean() < curves[method][:10].mean() - 0.5, method
assert bpb["LoRA (merged)"] < bpb["base"]              # §4: better on held-out Shakespeare
assert bpb["state-tuned"] < bpb["base"]
assert adapter_roundtrip and state_roundtrip           # §5: the saved files read back
print(f"all checks passed; chapter ran in {time.perf_counter() - CHAPTER_START:.1f} s")
