"""`tinyrwkv train`: train an RWKV-7 on a text file with train.py's hand-written gradients.

    tinyrwkv train --data stories.txt --out runs/ts

What it does: trains a byte-level BPE tokenizer on the text (HF `tokenizers`; or `--tokenizer`),
initialises the model as RWKV-LM does (docs/architecture.md §10, `make_weights(training_init=True)`), and
runs AdamW (weight decay on the 2-D `.weight` matrices only; `att.w0` at twice the learning rate,
as RWKV-LM) with linear warm-up, cosine decay and gradient-norm clipping on random (B, T) windows
of the text. Every `--eval-every` steps: validation loss and bits per byte on held-out windows,
a checkpoint of everything needed to resume (parameters, Adam moments, step, random state), and
the learning curve so far. Every `--sample-every` steps: a sample from "Once upon a time".
At the end: the final model as DIR/model.safetensors (official key names; bf16 with
`--save-dtype bfloat16`), its tokenizer as DIR/model.tokenizer.json (found by `tinyrwkv.load`),
bits per byte over the whole validation file, and DIR/MODEL_CARD.md.

Runs are deterministic for a given seed and machine (batches come from one seeded generator,
restored on --resume).

Every file in DIR is written atomically (tinyrwkv/files.py: a temporary, synced, renamed), so a
kill at any moment leaves each file old or new, whole; log.jsonl is appended a line at a time and
cut back to the checkpoint's step on --resume (a fresh run starts it anew).
"""

from __future__ import annotations

import json
import math
import sys
import time
from pathlib import Path

import numpy as np

from . import train
from .checks import (NON_NEGATIVE, POSITIVE, UNIT, UNIT_BELOW_ONE, check_float, check_int, option,
                     read_text)
from .evaluate import bits_per_byte as eval_bits_per_byte, nats_of_ids
from .files import OutputError, atomic_open, atomic_path, refuse_overwriting, write_text
from .formats import read_checkpoint, save_safetensors
from .formats.npz import NpzReader
from .formats.numerics import check_finite
from .loader import numba_missing
from .schema import check_x070_keys
from .synthetic import lora_ranks, make_weights
from .tokenizer import open_tokenizers_file, tokenizers_failures


# ---------------------------------------------------------------------------------------------
# data
# ---------------------------------------------------------------------------------------------

def train_tokenizer(texts, vocab_size, path):
    """A byte-level BPE tokenizer (HF tokenizers) trained on `texts`, saved to `path`.
    Id 0 is <|endoftext|> (the World tokenizer's end-of-text id too)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=["<|endoftext|>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                  show_progress=False)
    tok.train_from_iterator(texts, trainer)
    with atomic_path(path) as tmp:
        tok.save(str(tmp))
    return tok


def encode_file(tok, path, tok_path="the tokenizer"):
    """Token ids (uint16 when they fit) of a text file; stories' <|endoftext|> lines become id 0.
    `tok_path`: where the tokenizer came from, for the message if the tokenizers library fails."""
    text = read_text(path, "text")
    pieces = text.split("<|endoftext|>")
    ids = []
    with tokenizers_failures(tok_path, f"encoding {path} failed"):
        for n, piece in enumerate(pieces):
            piece = piece.strip("\n")
            if piece:
                ids.extend(tok.encode(piece).ids)
            if n < len(pieces) - 1:
                ids.append(0)
    dtype = np.uint16 if tok.get_vocab_size() <= 65536 else np.int32
    return np.array(ids, dtype), len(text.encode("utf-8"))


# ---------------------------------------------------------------------------------------------
# optimisation
# ---------------------------------------------------------------------------------------------

def lr_at(step, args):
    """Linear warm-up to --lr, then cosine decay to --lr * --min-lr-ratio at --steps."""
    if step < args.warmup:
        return args.lr * (step + 1) / args.warmup
    progress = min(1.0, (step - args.warmup) / max(1, args.steps - args.warmup))
    floor = args.lr * args.min_lr_ratio
    return floor + (args.lr - floor) * 0.5 * (1 + math.cos(math.pi * progress))


def adamw_step(params, grads, opt, lr, args):
    """One AdamW update in place. opt: {"m": {...}, "v": {...}, "t": int}."""
    opt["t"] += 1
    t, b1, b2 = opt["t"], args.beta1, args.beta2
    for key, g in grads.items():
        m, v = opt["m"][key], opt["v"][key]
        m *= b1
        m += (1 - b1) * g
        v *= b2
        v += (1 - b2) * g * g
        mhat, vhat = m / (1 - b1 ** t), v / (1 - b2 ** t)
        key_lr = lr * (2.0 if key.endswith("att.w0") else 1.0)
        p = params[key]
        if key.endswith(".weight") and p.ndim == 2 and args.weight_decay:
            p *= 1 - key_lr * args.weight_decay
        p -= key_lr * mhat / (np.sqrt(vhat) + args.eps)


def clip_(grads, max_norm):
    norm = math.sqrt(sum(float((g.astype(np.float64) ** 2).sum()) for g in grads.values()))
    if max_norm and norm > max_norm:
        for g in grads.values():
            g *= max_norm / norm
    return norm


# ---------------------------------------------------------------------------------------------
# evaluation
# ---------------------------------------------------------------------------------------------

def nll_of_ids(model, ids, chunk=512):
    """Total negative log-likelihood (nats) of ids[1:] given what precedes, read in chunks with
    the state carried (the recurrent model sees the whole file as one text). The math is
    `tinyrwkv eval`'s (evaluate.nats_of_ids), one copy for both."""
    return nats_of_ids(model, ids, chunk=chunk)[0]


def bits_per_byte(params, ids, n_bytes, backend="numba"):
    """Bits per byte of a whole text: its total NLL (the first token is not predicted) in bits,
    over its UTF-8 bytes. Uses the inference model (same function as training's forward)."""
    if backend == "numba" and numba_missing() is None:
        from .backends.numba_cpu import RWKV7Numba
        model = RWKV7Numba(params)
    else:
        from .model import RWKV7
        model = RWKV7(params)
    return eval_bits_per_byte(nll_of_ids(model, np.asarray(ids, np.int64)), n_bytes)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

class Progress:
    """One line on stderr, redrawn: step, loss, tokens/s, learning rate, ETA."""

    def __init__(self, total):
        self.total, self.start = total, time.monotonic()
        self.tty = sys.stderr.isatty()

    def __call__(self, step, loss, tok_s, lr, done_steps):
        elapsed = time.monotonic() - self.start
        eta = elapsed / max(done_steps, 1) * (self.total - step)
        line = (f"step {step}/{self.total} loss {loss:.3f} {tok_s:,.0f} tok/s lr {lr:.2e} "
                f"eta {eta / 60:.1f} min")
        if self.tty:
            sys.stderr.write("\r" + line.ljust(78))
        elif step % 50 == 0 or step == self.total:
            sys.stderr.write(line + "\n")
        sys.stderr.flush()

    def newline(self):
        if self.tty:
            sys.stderr.write("\n")


# The files `train` writes in --out: no input may be one of them.
OUTPUTS = ("model.safetensors", "model.tokenizer.json", "train_state.npz", "log.jsonl",
           "result.json", "MODEL_CARD.md")


def check_paths(args):
    """--out is a folder (made if missing) and none of the files written there is an input (a
    --tokenizer that is DIR/model.tokenizer.json is fine: read before it is rewritten, whole)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file: give a folder for the model, tokenizer, card "
                          "and checkpoints")
    for name in OUTPUTS:
        tokenizer = args.tokenizer if name != "model.tokenizer.json" else None
        refuse_overwriting(out / name, [args.data, args.valid, tokenizer])


def read_training_checkpoint(path):
    """(meta, params, opt) from a train_state.npz written by this trainer, read through the checked
    .npz reader (formats/npz.py): a damaged or foreign file is one clear error, never a pickle or
    an allocation its headers merely declare."""
    fix = "delete it to train from the start, or run without --resume"
    with NpzReader(path, "training checkpoint", fix) as npz:
        if npz.declared_bytes() > npz.path.stat().st_size:     # np.savez stores arrays as they are
            raise npz.error("its arrays declare more bytes than the file holds")
        if "meta" not in npz.names or npz.header("meta").dtype.kind != "U":
            raise npz.error("it has no meta record (step, optimizer counter, random state)")
        try:
            meta = json.loads(str(npz.read("meta")))
            meta = {k: meta[k] for k in ("t", "rng", "step", "curve")}
        except (ValueError, KeyError, TypeError) as e:
            raise npz.error(f"its meta record is damaged ({type(e).__name__})") from None
        groups = {g: {n[2:]: npz.read(n) for n in npz.names if n.startswith(g + ":")}
                  for g in "pmv"}
    params, m, v = groups["p"], groups["m"], groups["v"]
    shapes = {g: {k: a.shape for k, a in arrays.items()} for g, arrays in groups.items()}
    if not params or shapes["m"] != shapes["p"] or shapes["v"] != shapes["p"]:
        raise npz.error("its parameters and Adam moments do not match")
    check_x070_keys(params, source=path)
    check_finite({**params, **{"m:" + k: a for k, a in m.items()},
                  **{"v:" + k: a for k, a in v.items()}}, path, fix=fix)
    return meta, params, {"m": m, "v": v, "t": meta["t"]}


class Diverged(ValueError):
    """Training produced a NaN or Inf: stopped before it reaches a checkpoint or the model."""


def check_step(step, name, value, args):
    """Raise Diverged when the loss, gradient norm or validation loss of `step` is not finite:
    before the update it would poison, and before the checkpoint and the model are written."""
    if not math.isfinite(value):
        raise Diverged(f"training diverged at step {step}: the {name} is {value}; nothing was "
                       "written from this step on (the last checkpoint, if any, is "
                       f"{Path(args.out) / 'train_state.npz'}); lower --lr (now {args.lr:g}) or "
                       "keep --clip on, and train again")


def cpu_threads(args):
    """Apply --threads (Numba kernels and BLAS) for the CPU backends; return the count in use
    (None: the libraries' defaults, or the GPU)."""
    if args.threads is None:
        return None
    if args.backend == "cupy":
        raise ValueError("--threads is for the CPU backends (numba, numpy); the cupy backend "
                         "runs on the GPU")
    if args.backend == "numba":
        from .backends.numba_cpu import set_threads
        return set_threads(args.threads)
    from .loader import _blas_threads
    _blas_threads(args.threads)
    return args.threads


def check_data(ids, path, args):
    """Training and validation windows need ctx + 1 tokens and one to spare."""
    if len(ids) < args.ctx + 2:
        raise ValueError(f"{path} holds {len(ids)} tokens, too few for one window of --ctx "
                         f"{args.ctx} (+2); give a longer text or a smaller --ctx")


def run(args):
    check_config(args)                      # run() is also called from Python
    check_paths(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "train_state.npz"
    log_file = out / "log.jsonl"
    if args.backend in (None, "numba"):     # default: numba where it imports, else NumPy
        missing = numba_missing()
        if missing and args.backend == "numba":
            raise ValueError(f"--backend numba: {missing} (or use --backend numpy)")
        if missing:
            print(f"tinyrwkv train: backend numpy, not the faster numba: {missing}",
                  file=sys.stderr)
        args.backend = "numpy" if missing else "numba"
    threads = cpu_threads(args)
    wkv_ops = None                          # numpy: the reference; cupy: the CUDA kernels
    if args.backend == "numba":
        from .backends.numba_train import WKV_OPS
        wkv_ops = WKV_OPS
    to_device = lambda a: a                 # where parameters and Adam moments live
    if args.backend == "cupy":
        from .backends.cupy_gpu import check_available
        check_available()
        import cupy
        to_device = lambda a: cupy.asarray(a)
    dtype = np.dtype(args.dtype)

    # tokenizer and data
    if not Path(args.data).is_file():
        raise ValueError(f"no training text at {args.data}")
    tok_path = out / "model.tokenizer.json"
    tok_source = args.tokenizer or tok_path
    if args.tokenizer:
        tok = open_tokenizers_file(args.tokenizer)
        with atomic_path(tok_path) as tmp:
            tok.save(str(tmp))
    elif tok_path.exists():
        tok = open_tokenizers_file(tok_path)
    else:
        print(f"tinyrwkv train: training a {args.vocab}-token BPE tokenizer on {args.data}",
              file=sys.stderr)
        text = read_text(args.data, "training text")
        tok = train_tokenizer((s for s in text.split("<|endoftext|>")), args.vocab, tok_path)
    train_ids, train_bytes = encode_file(tok, args.data, tok_source)
    check_data(train_ids, args.data, args)
    valid_path = args.valid or str(Path(args.data).with_name("valid.txt"))
    if not Path(valid_path).is_file():
        raise ValueError(f"no validation text at {valid_path}: pass --valid FILE (held-out text "
                         "for the validation loss and the final bits per byte)")
    valid_ids, valid_bytes = encode_file(tok, valid_path, tok_source)
    check_data(valid_ids, valid_path, args)
    V = tok.get_vocab_size()
    print(f"tinyrwkv train: {len(train_ids):,} training tokens ({train_bytes / len(train_ids):.2f} "
          f"bytes/token), {len(valid_ids):,} validation tokens, vocabulary {V}", file=sys.stderr)

    # model, optimiser, random state
    rng = np.random.default_rng(args.seed)
    if args.resume and state_file.exists():
        meta, params, opt = read_training_checkpoint(state_file)
        params = {k: to_device(v) for k, v in params.items()}
        opt["m"] = {k: to_device(v) for k, v in opt["m"].items()}
        opt["v"] = {k: to_device(v) for k, v in opt["v"].items()}
        rng.bit_generator.state = meta["rng"]
        step0, curve = meta["step"], meta["curve"]
        print(f"tinyrwkv train: resumed from step {step0}", file=sys.stderr)
    else:
        L, C, N = args.layers, args.width, args.head_size
        params = make_weights(L, C, V, head_size=N, seed=args.seed, dtype=dtype,
                              training_init=True)
        params = {k: to_device(v) for k, v in params.items()}
        opt = {"m": {k: to_device(np.zeros(v.shape, v.dtype)) for k, v in params.items()},
               "v": {k: to_device(np.zeros(v.shape, v.dtype)) for k, v in params.items()}, "t": 0}
        step0, curve = 0, []
    n_params = sum(v.size for v in params.values())
    print(f"tinyrwkv train: L{args.layers} C{args.width} head {args.head_size} V{V}, "
          f"{n_params / 1e6:.2f}M parameters, batch {args.batch}x{args.ctx}, {args.steps} steps, "
          f"wkv {args.backend}{f', {threads} threads' if threads else ''}", file=sys.stderr)

    # fixed validation windows for the periodic estimate
    vrng = np.random.default_rng(12345)
    vstarts = vrng.integers(0, len(valid_ids) - args.ctx - 1, args.eval_windows)
    vids = np.stack([valid_ids[s:s + args.ctx] for s in vstarts]).astype(np.int64)
    vtgt = np.stack([valid_ids[s + 1:s + args.ctx + 1] for s in vstarts]).astype(np.int64)
    bytes_per_token = valid_bytes / len(valid_ids)

    def evaluate():
        losses = [train.loss_and_grad(params, vids[i:i + args.batch], vtgt[i:i + args.batch],
                                      wkv_ops)[0] for i in range(0, len(vids), args.batch)]
        return float(np.mean(losses))

    def save_state(step):
        meta = {"step": step, "t": opt["t"], "rng": rng.bit_generator.state, "curve": curve,
                "args": {k: v for k, v in vars(args).items() if k != "func"}}
        arrays = {f"p:{k}": host(v) for k, v in params.items()}
        arrays.update({f"m:{k}": host(v) for k, v in opt["m"].items()})
        arrays.update({f"v:{k}": host(v) for k, v in opt["v"].items()})
        with atomic_open(state_file) as f:          # never a half-written checkpoint
            np.savez(f, meta=np.array(json.dumps(meta)), **arrays)

    start_log(log_file, step0)
    progress = Progress(args.steps)
    t_start = time.monotonic()
    tokens_done = 0
    stop = args.steps if not args.stop_after else min(args.steps, step0 + args.stop_after)
    for step in range(step0, stop):
        starts = rng.integers(0, len(train_ids) - args.ctx - 1, args.batch)
        ids = np.stack([train_ids[s:s + args.ctx] for s in starts]).astype(np.int64)
        tgt = np.stack([train_ids[s + 1:s + args.ctx + 1] for s in starts]).astype(np.int64)
        loss, grads = train.loss_and_grad(params, ids, tgt, wkv_ops)
        check_step(step + 1, "loss", loss, args)
        gnorm = clip_(grads, args.clip)
        check_step(step + 1, "gradient norm", gnorm, args)
        lr = lr_at(step, args)
        adamw_step(params, grads, opt, lr, args)
        tokens_done += ids.size
        tok_s = tokens_done / max(time.monotonic() - t_start, 1e-9)
        progress(step + 1, loss, tok_s, lr, step + 1 - step0)
        with open(log_file, "a", encoding="utf-8") as f:   # one write per line: a kill cuts at
            f.write(json.dumps({"step": step + 1, "loss": loss, "grad_norm": gnorm, "lr": lr,
                                "tok_s": tok_s}) + "\n")               # most the last line
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last or step + 1 == stop:
            vloss = evaluate()
            check_step(step + 1, "validation loss", vloss, args)    # before it is checkpointed
            curve.append({"step": step + 1, "train_loss": loss, "valid_loss": vloss,
                          "valid_bpb": vloss / math.log(2) / bytes_per_token,
                          "seconds": time.monotonic() - t_start, "tok_s": tok_s})
            progress.newline()
            print(f"tinyrwkv train: step {step + 1}: valid loss {vloss:.3f} nats/token, "
                  f"~{curve[-1]['valid_bpb']:.3f} bits/byte", file=sys.stderr)
            save_state(step + 1)
        if args.sample_every and ((step + 1) % args.sample_every == 0 or last):
            progress.newline()
            print("  sample: " + sample(params, tok, "Once upon a time", 60).replace("\n", " / "),
                  file=sys.stderr)
    wall = time.monotonic() - t_start
    if stop < args.steps:
        print(f"tinyrwkv train: stopped at step {stop} (--stop-after); continue with --resume",
              file=sys.stderr)
        return 0
    return finish(args, params, tok, valid_ids, valid_bytes, curve, wall, n_params, len(train_ids))


def start_log(log_file, step0):
    """Keep the log's whole lines up to step `step0` (the checkpoint resumed from; 0: none), so a
    resumed run neither repeats steps nor continues a line a kill cut short."""
    kept = []
    if step0 and log_file.is_file():
        for line in log_file.read_text(encoding="utf-8", errors="replace").splitlines():
            try:
                if json.loads(line)["step"] <= step0:
                    kept.append(line + "\n")
            except (ValueError, KeyError, TypeError):
                pass                                # a line cut short, or not ours
    write_text(log_file, "".join(kept))


def host(a):
    """A NumPy array (CuPy arrays are copied from the GPU)."""
    return a if isinstance(a, np.ndarray) else a.get()


def sample(params, tok, prompt, n, seed=0):
    from .model import RWKV7
    from .sampling import sample_logits
    model = RWKV7({k: host(v).astype(np.float32) for k, v in params.items()})
    rng = np.random.default_rng(seed)
    logits, state = model.forward(tok.encode(prompt).ids)
    out = []
    for _ in range(n):
        t = sample_logits(logits, temperature=1.0, top_p=0.85, rng=rng)
        if t == 0:
            break
        out.append(t)
        logits, state = model.forward([t], state)
    return prompt + tok.decode(out)


def finish(args, params, tok, valid_ids, valid_bytes, curve, wall, n_params, n_train_tokens):
    out = Path(args.out)
    final = {k: host(v).astype(np.float32) for k, v in params.items()}
    check_finite(final, "the trained model", fix="training diverged: lower --lr and train again; "
                 "no model was written")
    path = out / "model.safetensors"
    bf16 = final.keys() if args.save_dtype == "bfloat16" else ()
    save_safetensors(path, final, metadata={"format": "tinyrwkv", "trained_by": "tinyrwkv train"},
                     bf16_keys=bf16)
    shipped = read_checkpoint(path, dtype="float32")            # exactly the saved numbers
    bpb = bits_per_byte(shipped, valid_ids, valid_bytes)
    samples = [sample(shipped, tok, p, 80, seed=s) for s, p in
               enumerate(["Once upon a time", "The little dog", "One day, Lily"])]
    result = {"valid_bits_per_byte": bpb, "wall_seconds": wall, "n_params": int(n_params),
              "bytes": path.stat().st_size + (out / "model.tokenizer.json").stat().st_size}
    write_text(out / "result.json", json.dumps(result, indent=1))
    write_card(args, result, curve, samples, n_train_tokens, tok.get_vocab_size())
    print(f"tinyrwkv train: done in {wall / 60:.1f} min; validation {bpb:.3f} bits/byte over "
          f"the whole of {args.valid or 'valid.txt'}; model {path}", file=sys.stderr)
    return 0


def hardware(args):
    import os
    import platform
    if args.backend == "cupy":
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        return f"{name} (CuPy: cuBLAS and tinyrwkv's CUDA WKV kernels)"
    what = "NumPy + Numba WKV kernels" if args.backend == "numba" else "NumPy"
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {what}"


def write_card(args, result, curve, samples, n_train_tokens, V):
    out = Path(args.out)
    rows = "\n".join(f"| {c['step']} | {c['train_loss']:.3f} | {c['valid_loss']:.3f} | "
                     f"{c['valid_bpb']:.3f} | {c['seconds'] / 60:.1f} |" for c in curve)
    hp = {k: v for k, v in vars(args).items()
          if k not in ("func", "command", "out", "resume", "threads")}
    card = f"""# Model card: tinyrwkv's shipped RWKV-7

A small RWKV-7 (x070) language model trained by `tinyrwkv train`, tinyrwkv's NumPy trainer
with hand-written gradients. It writes simple children's stories; it knows nothing else.

| | |
|---|---|
| architecture | RWKV-7 x070, L{args.layers} C{args.width} head size {args.head_size}, F {4 * args.width}, LoRA ranks {lora_ranks(args.width)} |
| parameters | {result['n_params']:,} |
| files | `model.safetensors` ({args.save_dtype}, official key names) + `model.tokenizer.json` (byte-level BPE, {V} tokens, id 0 = `<|endoftext|>`): {result['bytes'] / 1e6:.1f} MB |
| data | `{args.data}` ({n_train_tokens:,} tokens): a TinyStories subset (CDLA-Sharing-1.0, see the data's PROVENANCE.md) |
| training | {curve[-1]['step'] if curve else 0} steps of {args.batch} x {args.ctx} tokens, AdamW, lr {args.lr} (warm-up {args.warmup}, cosine to {args.lr * args.min_lr_ratio:g}), weight decay {args.weight_decay}, clip {args.clip}, seed {args.seed} |
| wall time | {result['wall_seconds'] / 60:.1f} min on {hardware(args)} |
| **validation bits per byte** | **{result['valid_bits_per_byte']:.3f}** over the whole validation file, as shipped |

Learning curve (validation loss on {args.eval_windows} fixed windows of {args.ctx} tokens;
bits/byte there are estimated with the file's mean bytes per token):

| step | train loss | valid loss | valid bits/byte | minutes |
|---|---|---|---|---|
{rows}

Samples (temperature 1, top-p 0.85):

""" + "\n".join(f"> {s}\n" for s in samples) + f"""
Hyper-parameters: `{json.dumps(hp)}`
"""
    write_text(out / "MODEL_CARD.md", card)


# What each numeric option may be: the argparse types of add_arguments (a bad value is a usage
# error, exit 2) and check_config (the same checks when run() is called from Python) share it.
NUMBERS = {
    "vocab": (int, POSITIVE), "layers": (int, POSITIVE), "width": (int, POSITIVE),
    "head_size": (int, POSITIVE), "steps": (int, POSITIVE), "batch": (int, POSITIVE),
    "ctx": (int, POSITIVE), "lr": (float, POSITIVE), "min_lr_ratio": (float, UNIT),
    "warmup": (int, NON_NEGATIVE), "weight_decay": (float, NON_NEGATIVE),
    "beta1": (float, UNIT_BELOW_ONE), "beta2": (float, UNIT_BELOW_ONE), "eps": (float, POSITIVE),
    "clip": (float, NON_NEGATIVE), "eval_every": (int, POSITIVE), "eval_windows": (int, POSITIVE),
    "sample_every": (int, NON_NEGATIVE), "seed": (int, NON_NEGATIVE),
    "stop_after": (int, NON_NEGATIVE),
}


def number(name):
    """The argparse type of option `name` (NUMBERS)."""
    return option(*NUMBERS[name])


def check_config(args):
    """Raise ValueError, naming the option, for a training configuration that cannot work: a
    number outside NUMBERS (a NaN --lr trains a NaN model without a single error), or a --width
    the heads do not divide. The command line runs it as the train command's usage check."""
    for name, (kind, within) in NUMBERS.items():
        check = check_float if kind is float else check_int
        check(f"--{name.replace('_', '-')}", getattr(args, name), within)
    if args.width % args.head_size:
        fits = max(args.head_size, args.width // args.head_size * args.head_size)
        raise ValueError(f"--width {args.width} is not a multiple of --head-size {args.head_size}: "
                         f"the width is split into heads of that size; use e.g. --width {fits}")


def add_arguments(p):
    p.add_argument("--data", required=True, metavar="FILE", help="training text (UTF-8)")
    p.add_argument("--valid", metavar="FILE", help="validation text (default: valid.txt beside --data)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the model, tokenizer, card and checkpoints go")
    p.add_argument("--tokenizer", metavar="PATH", help="a tokenizer.json to use instead of training one")
    p.add_argument("--vocab", type=number("vocab"), default=4096, help="BPE vocabulary size to train")
    p.add_argument("--layers", type=number("layers"), default=4)
    p.add_argument("--width", type=number("width"), default=256, help="n_embd (C)")
    p.add_argument("--head-size", type=number("head_size"), default=64)
    p.add_argument("--steps", type=number("steps"), default=2000)
    p.add_argument("--batch", type=number("batch"), default=16, help="sequences per step (B)")
    p.add_argument("--ctx", type=number("ctx"), default=128, help="tokens per sequence (T)")
    p.add_argument("--lr", type=number("lr"), default=3e-3)
    p.add_argument("--min-lr-ratio", type=number("min_lr_ratio"), default=0.1, help="final lr / peak lr")
    p.add_argument("--warmup", type=number("warmup"), default=100, help="warm-up steps")
    p.add_argument("--weight-decay", type=number("weight_decay"), default=0.1)
    p.add_argument("--beta1", type=number("beta1"), default=0.9)
    p.add_argument("--beta2", type=number("beta2"), default=0.99)
    p.add_argument("--eps", type=number("eps"), default=1e-8)
    p.add_argument("--clip", type=number("clip"), default=1.0, help="max global gradient norm (0: off)")
    p.add_argument("--eval-every", type=number("eval_every"), default=200)
    p.add_argument("--eval-windows", type=number("eval_windows"), default=64, help="validation windows per evaluation")
    p.add_argument("--sample-every", type=number("sample_every"), default=500, help="0: no samples")
    p.add_argument("--seed", type=number("seed"), default=0)
    p.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    p.add_argument("--backend", choices=["numba", "numpy", "cupy"],
                   help="numba: CPU, Numba WKV kernels (default where numba is installed); "
                        "numpy: CPU, the NumPy reference; "
                        "cupy: everything on a CUDA GPU (CuPy), CUDA WKV kernels")
    p.add_argument("--threads", type=option(int, POSITIVE),
                   help="CPU threads for the Numba kernels and BLAS (default: the libraries' own, "
                        "all cores)")
    p.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    p.add_argument("--resume", action="store_true", help="continue from DIR/train_state.npz")
    p.add_argument("--stop-after", type=number("stop_after"), default=0,
                   help="stop after this many steps of this run (checkpointed; --resume continues)")
