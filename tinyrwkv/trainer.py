"""`tinyrwkv train`: train an RWKV-7 on a text file with train.py's hand-written gradients.

    tinyrwkv train --data stories.txt --out runs/ts

What it does: trains a byte-level BPE tokenizer on the text (HF `tokenizers`; or `--tokenizer`),
initialises the model as RWKV-LM does (docs/architecture.md §10, `make_weights(training_init=True)`), and
runs AdamW (weight decay on the 2-D `.weight` matrices only; `att.w0` at twice the learning rate,
as RWKV-LM) with linear warm-up, cosine decay and gradient-norm clipping on random (B, T) windows
of the text. Every `--eval-every` steps: validation loss and bits per byte on held-out windows,
a checkpoint of everything needed to resume (parameters, Adam moments, step, random state), and
the learning curve so far (and DIR/loss_curve.png where matplotlib is installed). Every
`--sample-every` steps: a sample from the start of the validation text. At the end: the final model
as DIR/model.safetensors (official key names; bf16 with `--save-dtype bfloat16`), its tokenizer
as DIR/model.tokenizer.json (found by `tinyrwkv.load`), bits per byte over the whole validation
file, and DIR/MODEL_CARD.md describing this run (data files with size and SHA-256, tokenizer,
command line, date, losses, samples; the licence field is --data-license or left to fill in).
Warm-up is 5% of --steps unless given, and must be fewer than --steps. Progress goes to stderr:
redrawn in a terminal, elsewhere a line at least every 5 seconds.

Runs are deterministic for a given seed and machine with --threads N (batches come from one
seeded generator, restored on --resume). Without --threads the CPU thread count is chosen while
training runs (StepThreads), so that a busy machine does not make a step 50x slower; BLAS sums in
another order on another count, so such runs agree to float32 rounding, not bit for bit.

Every file in DIR is written atomically (tinyrwkv/files.py: a temporary, synced, renamed), so a
kill at any moment leaves each file old or new, whole; log.jsonl is appended a line at a time and
cut back to the checkpoint's step on --resume (a fresh run starts it anew).
"""

from __future__ import annotations

import json
import math
import sys
import time
from contextlib import nullcontext
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
from .model import Config
from .synthetic import make_weights
from .tokenizer import HFTokenizer, tokenizers_failures


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
    """Token ids (uint16 when they fit) of a text file; stories' <|endoftext|> lines become id 0
    (the end-of-text id of the World tokenizer and of the ones `train` makes). `tok`: a tinyrwkv
    tokenizer (tinyrwkv/tokenizer.py); `tok_path`: where it came from, for the message if the
    tokenizers library fails."""
    text = read_text(path, "text")
    pieces = text.split("<|endoftext|>")
    ids = []
    with tokenizers_failures(tok_path, f"encoding {path} failed"):
        for n, piece in enumerate(pieces):
            piece = piece.strip("\n")
            if piece:
                ids.extend(tok.encode(piece))
            if n < len(pieces) - 1:
                ids.append(0)
    dtype = np.uint16 if tok.vocab_size <= 65536 else np.int32
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


def inference_model(weights, backend="numba", threads=None):
    """A model to sample and measure with, from a {key: array} dict: the Numba backend where
    `backend` is "numba" or "cupy" and Numba is installed (threads: its count, None its own
    choice), else the NumPy reference."""
    if backend != "numpy" and numba_missing() is None:
        from .backends.numba_cpu import RWKV7Numba
        return RWKV7Numba(weights, threads=threads)
    from .model import RWKV7
    return RWKV7(weights)


def bits_per_byte(params, ids, n_bytes, backend="numba"):
    """Bits per byte of a whole text: its total NLL (the first token is not predicted) in bits,
    over its UTF-8 bytes. Uses the inference model (same function as training's forward)."""
    model = inference_model(params, backend)
    return eval_bits_per_byte(nll_of_ids(model, np.asarray(ids, np.int64)), n_bytes)


# ---------------------------------------------------------------------------------------------
# the loop
# ---------------------------------------------------------------------------------------------

class Progress:
    """Step, loss, tokens/s, learning rate, ETA on stderr: in a terminal one line, redrawn each
    step; elsewhere (a log file, a pipe, a notebook) a line every 50 steps, at least every
    `every` seconds of wall time, and at the last step of the run (`last`: --steps, or where
    --stop-after ends it)."""

    def __init__(self, total, last=None, every=5.0, clock=time.monotonic):
        self.total, self.last, self.every, self.clock = total, last or total, every, clock
        self.start = self.printed = clock()
        self.stream = sys.stderr
        self.tty = self.stream.isatty()

    def __call__(self, step, loss, tok_s, lr, done_steps):
        now = self.clock()
        eta = (now - self.start) / max(done_steps, 1) * (self.total - step)
        line = (f"step {step}/{self.total} loss {loss:.3f} {tok_s:,.0f} tok/s lr {lr:.2e} "
                f"eta {eta / 60:.1f} min")
        if self.tty:
            self.stream.write("\r" + line.ljust(78))
        elif (step % 50 == 0 or step in (self.total, self.last)
              or now - self.printed >= self.every):
            self.stream.write(line + "\n")
            self.printed = now
        self.stream.flush()

    def newline(self):
        if self.tty:
            self.stream.write("\n")


# The files `train` writes in --out: no input may be one of them.
OUTPUTS = ("model.safetensors", "model.tokenizer.json", "train_state.npz", "log.jsonl",
           "result.json", "MODEL_CARD.md", "loss_curve.png", "lora_adapter.pth", "time_state.pth")


def check_paths(args):
    """--out is a folder (made if missing) and none of the files written there is an input (a
    --tokenizer that is DIR/model.tokenizer.json is fine: read before it is rewritten, whole)."""
    out = Path(args.out)
    if out.exists() and not out.is_dir():
        raise OutputError(f"--out {out} is a file: give a folder for the model, tokenizer, card "
                          "and checkpoints")
    for name in OUTPUTS:
        tokenizer = args.tokenizer if name != "model.tokenizer.json" else None
        refuse_overwriting(out / name, [args.data, args.valid, tokenizer,
                                        getattr(args, "init_from", None)])


def read_training_checkpoint(path, mode="scratch", fresh=None):
    """(meta, params, opt, best) from a train_state.npz written by this trainer, read through the
    checked .npz reader (formats/npz.py): a damaged or foreign file is one clear error, never a
    pickle or an allocation its headers merely declare. `mode` and `fresh` (what this run
    trains, freshly made): a checkpoint of another kind of run, or of other tensors, is refused.
    best: (step, valid loss, arrays) of the best evaluation so far, or None."""
    fix = "delete it to train from the start, or run without --resume"
    with NpzReader(path, "training checkpoint", fix) as npz:
        if npz.declared_bytes() > npz.path.stat().st_size:     # np.savez stores arrays as they are
            raise npz.error("its arrays declare more bytes than the file holds")
        if "meta" not in npz.names or npz.header("meta").dtype.kind != "U":
            raise npz.error("it has no meta record (step, optimizer counter, random state)")
        try:
            meta = json.loads(str(npz.read("meta")))
            meta = {k: meta[k] for k in ("t", "rng", "step", "curve")} | {
                "mode": meta.get("mode", "scratch"), "best": meta.get("best")}
        except (ValueError, KeyError, TypeError) as e:
            raise npz.error(f"its meta record is damaged ({type(e).__name__})") from None
        groups = {g: {n[2:]: npz.read(n) for n in npz.names if n.startswith(g + ":")}
                  for g in "pmvb"}
    saved_mode = "scratch" if meta["mode"] in ("scratch", "full") else meta["mode"]
    if saved_mode != ("scratch" if mode in ("scratch", "full") else mode):
        raise npz.error(f"it is the checkpoint of a {meta['mode']} run, and this run is {mode} "
                        "(resume with the options it was started with)")
    params, m, v = groups["p"], groups["m"], groups["v"]
    shapes = {g: {k: a.shape for k, a in arrays.items()} for g, arrays in groups.items()}
    if not params or shapes["m"] != shapes["p"] or shapes["v"] != shapes["p"]:
        raise npz.error("its parameters and Adam moments do not match")
    if groups["b"] and shapes["b"] != shapes["p"]:
        raise npz.error("its best parameters do not match its parameters")
    if mode in ("scratch", "full"):
        check_x070_keys(params, source=path)
    if fresh is not None and mode != "scratch" and \
            shapes["p"] != {k: np.shape(a) for k, a in fresh.items()}:
        raise npz.error("its trained tensors are not the ones this run trains (another model, "
                        "rank or target list)")
    check_finite({**params, **{"m:" + k: a for k, a in m.items()},
                  **{"v:" + k: a for k, a in v.items()}}, path, fix=fix)
    best = None
    if groups["b"] and meta["best"]:
        best = (int(meta["best"][0]), float(meta["best"][1]), groups["b"])
    return meta, params, {"m": m, "v": v, "t": meta["t"]}, best


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


class StepThreads:
    """The CPU thread count of each training step, chosen while training runs when --threads is
    not given: backends/thread_governor.py's ThreadGovernor (the one decode uses), fed each
    step's time, since every step does the same work. On a machine where another program holds
    a core, all-core steps wait at every BLAS and Numba barrier (docs/training.md §3: the
    shipped model's shape on 2 cores next to one busy process, 624 tokens/s on two threads,
    1,165 on one, 1,135 governed; quiet, 1,323 on two); on a quiet machine all cores are
    faster. Sets Numba's and BLAS's threads
    (threadpoolctl) when the count changes; `--threads N` fixes N and no governor runs."""

    def __init__(self, backend):
        import os
        from .backends.thread_governor import ThreadGovernor
        self.backend = backend
        most = os.cpu_count() or 1
        if backend == "numba":
            import numba
            most = numba.config.NUMBA_NUM_THREADS
        self.governor = ThreadGovernor(most)
        self.in_use = None

    def __enter__(self):
        n = self.governor.threads()
        if n != self.in_use:
            if self.backend == "numba":
                from .backends.numba_cpu import set_threads
                set_threads(n)
            else:
                import threadpoolctl
                threadpoolctl.threadpool_limits(n)
            self.in_use = n
        self.start = time.perf_counter()
        return n

    def __exit__(self, kind, value, traceback):
        if kind is None:
            self.governor.record(self.in_use, time.perf_counter() - self.start)

    def describe(self):
        return self.governor.describe()


def check_data(ids, path, args):
    """Training and validation windows need ctx + 1 tokens and one to spare."""
    if len(ids) < args.ctx + 2:
        raise ValueError(f"{path} holds {len(ids)} tokens, too few for one window of --ctx "
                         f"{args.ctx} (+2); give a longer text or a smaller --ctx")


class Tuning:
    """What a run trains, and how the model it evaluates is made from it.

    mode "scratch": every parameter, from RWKV-LM's initialisation (trainable = the model).
    mode "full": every parameter, from --init-from's checkpoint.
    mode "lora": LoRA factors on --init-from's matrices (--lora-targets), the model frozen
        (RWKV-PEFT's LoRA: W + (alpha / r) B A).
    mode "state": each layer's initial WKV state blocks.{i}.att.time_state, the model frozen
        (RWKV-PEFT's state tuning).
    `base` is the frozen model (None when everything trains)."""

    def __init__(self, mode, base=None, alpha=None):
        self.mode, self.base, self.alpha = mode, base, alpha

    def loss_and_grad(self, trainable, ids, tgt, wkv_ops):
        if self.mode == "lora":
            return train.lora_loss_and_grad(self.base, trainable, self.alpha, ids, tgt, wkv_ops)
        if self.mode == "state":
            return train.loss_and_grad({**self.base, **trainable}, ids, tgt, wkv_ops,
                                       want=trainable.keys())
        return train.loss_and_grad(trainable, ids, tgt, wkv_ops)

    def loss(self, trainable, ids, tgt, wkv_ops):
        """The loss only (no backward)."""
        return train.loss_and_grad(self.model(trainable), ids, tgt, wkv_ops, want=())[0]

    def model(self, trainable):
        """The parameters of the model being trained (a time_state included for "state")."""
        if self.mode == "lora":
            return train.lora_merged(self.base, trainable, self.alpha)
        if self.mode == "state":
            return {**self.base, **trainable}
        return trainable

    def inference(self, trainable):
        """(weights, initial State or None) on the host in float32, for samples and bits/byte."""
        full = {k: host(v).astype(np.float32) for k, v in self.model(trainable).items()}
        weights = {k: v for k, v in full.items() if not k.endswith("." + train.TIME_STATE)}
        if self.mode != "state":
            return weights, None
        from .formats.lora import initial_state
        from .model import Config
        return weights, initial_state(full, Config.from_weights(weights))


def backend_setup(args):
    """Resolve --backend (default numba where it imports) and --threads. Returns (threads in use,
    the WKV pair for loss_and_grad, a function moving an array to where training runs)."""
    if args.backend in (None, "numba"):     # default: numba where it imports, else NumPy
        missing = numba_missing()
        if missing and args.backend == "numba":
            raise ValueError(f"--backend numba: {missing} (or use --backend numpy)")
        if missing:
            print(f"tinyrwkv train: backend numpy, not the faster numba: {missing}",
                  file=sys.stderr)
        args.backend = "numpy" if missing else "numba"
    threads = cpu_threads(args)
    wkv = getattr(args, "wkv", None) or "auto"
    if wkv == "auto":                       # the faster pair where measured (train.py says)
        wkv_ops = train.choose_wkv_ops(args.backend, args.ctx)
    elif wkv == "chunked":                  # NumPy/CuPy matrix products, on any backend
        wkv_ops = train.CHUNKED_WKV
    elif args.backend == "numba":
        from .backends.numba_train import WKV_OPS as wkv_ops
    elif args.backend == "cupy":
        from .backends.cupy_train import WKV_OPS as wkv_ops
    else:
        wkv_ops = train.RECURRENT_WKV
    args.wkv_pair = ("chunked" if wkv_ops is train.CHUNKED_WKV else "recurrent")
    to_device = lambda a: a                 # where parameters and Adam moments live
    if args.backend == "cupy":
        from .backends.cupy_gpu import check_available
        check_available()
        import cupy
        to_device = lambda a: cupy.asarray(a)
    return threads, wkv_ops, to_device


def read_base(args, dtype):
    """--init-from's checkpoint (any format tinyrwkv reads) and its own tokenizer (or
    --tokenizer's). Returns (params, tokenizer, how the tokenizer was found)."""
    from .formats import read_model
    from .schema import check_x070_keys
    from .tokenizer import get_tokenizer
    data = read_model(args.init_from, dtype=dtype.name)
    check_x070_keys(data.tensors, source=data.path)
    check_finite(data.tensors, data.path, fix="give a checkpoint without NaN or Inf")
    if any(key.endswith("ffn.s1") for key in data.tensors):
        raise ValueError(f"{args.init_from} is a DeepEmbed model (rwkv7a); tinyrwkv trains plain "
                         "x070 models only")
    V = data.tensors["emb.weight"].shape[0]
    tok = get_tokenizer(V, args.tokenizer, data.path, data.tokenizer)
    how = (f"the tokenizer given with --tokenizer ({args.tokenizer})" if args.tokenizer else
           f"{args.init_from}'s own ({tok.name})")
    return data.tensors, tok, how


def keep_tokenizer(tok, out):
    """Copy an HF tokenizer.json into DIR as model.tokenizer.json (found by tinyrwkv.load beside
    model.safetensors). The World tokenizer is packaged: nothing to copy (65536 rows pick it)."""
    path = getattr(tok, "path", None)
    target = out / "model.tokenizer.json"
    if path is not None and Path(path).suffix.lower() == ".json" and \
            Path(path).resolve() != target.resolve():
        with atomic_open(target) as f:
            f.write(Path(path).read_bytes())


def run(args):
    """`tinyrwkv train` (also called from Python with an argparse-like namespace). The CPU
    thread settings it changes (--threads, or the ones chosen as it runs) are put back when it
    returns, so a program that trains then does other work keeps its own."""
    with kept_thread_settings():
        return _run(args)


class kept_thread_settings:
    """Restores BLAS's (threadpoolctl) and Numba's thread counts on exit."""

    def __enter__(self):
        try:
            import threadpoolctl
            self.blas = threadpoolctl.threadpool_limits(limits=None)
        except ImportError:
            self.blas = None
        self.numba = None
        if numba_missing() is None:
            import numba
            self.numba = numba.get_num_threads()

    def __exit__(self, *exc):
        if self.blas is not None:
            self.blas.restore_original_limits()
        if self.numba is not None:
            import numba
            numba.set_num_threads(self.numba)


def _run(args):
    check_config(args)                      # run() is also called from Python
    check_paths(args)
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    state_file = out / "train_state.npz"
    log_file = out / "log.jsonl"
    threads, wkv_ops, to_device = backend_setup(args)
    step_threads = StepThreads(args.backend) if threads is None and args.backend != "cupy" \
        else None
    dtype = np.dtype(args.dtype)
    mode = tuning_mode(args)

    # tokenizer and data
    if not Path(args.data).is_file():
        raise ValueError(f"no training text at {args.data}")
    tok_path = out / "model.tokenizer.json"
    base = None
    if mode != "scratch":
        base, tok, tok_how = read_base(args, dtype)
        if mode == "full":
            keep_tokenizer(tok, out)
        tok_source = getattr(tok, "path", tok.name)
    elif args.tokenizer:
        tok = HFTokenizer(args.tokenizer)   # checked (a clear error naming it) before the copy
        with atomic_open(tok_path) as f:
            f.write(Path(args.tokenizer).read_bytes())
        tok_source = args.tokenizer
        tok_how = f"`{Path(args.tokenizer).name}`, given with --tokenizer ({args.tokenizer})"
    elif tok_path.exists():
        tok, tok_source = HFTokenizer(tok_path), tok_path
        tok_how = f"`{tok_path.name}` already in {out} (kept from an earlier run)"
    else:
        tok_how = (f"a byte-level BPE trained by this run on `{Path(args.data).name}` "
                   f"(--vocab {args.vocab})")
        print(f"tinyrwkv train: training a {args.vocab}-token BPE tokenizer on {args.data}",
              file=sys.stderr)
        text = read_text(args.data, "training text")
        train_tokenizer((s for s in text.split("<|endoftext|>")), args.vocab, tok_path)
        tok, tok_source = HFTokenizer(tok_path), tok_path
    train_ids, train_bytes = encode_file(tok, args.data, tok_source)
    check_data(train_ids, args.data, args)
    valid_path = args.valid or str(Path(args.data).with_name("valid.txt"))
    if not Path(valid_path).is_file():
        raise ValueError(f"no validation text at {valid_path}: pass --valid FILE (held-out text "
                         "for the validation loss and the final bits per byte)")
    valid_ids, valid_bytes = encode_file(tok, valid_path, tok_source)
    check_data(valid_ids, valid_path, args)
    V = base["emb.weight"].shape[0] if base is not None else tok.vocab_size
    print(f"tinyrwkv train: {len(train_ids):,} training tokens ({train_bytes / len(train_ids):.2f} "
          f"bytes/token), {len(valid_ids):,} validation tokens, vocabulary {V}", file=sys.stderr)

    # model, optimiser, random state
    rng = np.random.default_rng(args.seed)
    if mode == "scratch":
        fresh = make_weights(args.layers, args.width, V, head_size=args.head_size, seed=args.seed,
                             dtype=dtype, training_init=True)
    elif mode == "full":
        fresh = base
    elif mode == "lora":
        fresh = train.init_lora(base, args.lora, targets=args.lora_targets, seed=args.seed,
                                dtype=dtype)
    else:
        fresh = train.init_state(base, dtype)
    tuning = Tuning(mode, None if base is None or mode == "full" else
                    {k: to_device(np.asarray(v, dtype)) for k, v in base.items()},
                    args.lora_alpha)
    best = None                             # (step, valid loss, host copy of the trainable)
    if args.resume and state_file.exists():
        meta, params, opt, best = read_training_checkpoint(state_file, mode, fresh)
        params = {k: to_device(v) for k, v in params.items()}
        opt["m"] = {k: to_device(v) for k, v in opt["m"].items()}
        opt["v"] = {k: to_device(v) for k, v in opt["v"].items()}
        rng.bit_generator.state = meta["rng"]
        step0, curve = meta["step"], meta["curve"]
        print(f"tinyrwkv train: resumed from step {step0}", file=sys.stderr)
    else:
        params = {k: to_device(np.array(v, dtype)) for k, v in fresh.items()}
        opt = {"m": {k: to_device(np.zeros(v.shape, dtype)) for k, v in params.items()},
               "v": {k: to_device(np.zeros(v.shape, dtype)) for k, v in params.items()}, "t": 0}
        step0, curve = 0, []
    config = Config.from_weights(base if base is not None else params)
    n_params = sum(int(np.prod(v.shape)) for v in (base or params).values())
    n_trained = sum(int(np.prod(v.shape)) for v in params.values())
    print(f"tinyrwkv train: {describe_run(mode, args, config, n_params, n_trained)}, batch "
          f"{args.batch}x{args.ctx}, {args.steps} steps, lr {args.lr:g}, {args.backend} "
          f"backend, {args.wkv_pair} WKV"
          f"{f', {threads} thread' + ('s' if threads != 1 else '') if threads else ''}"
          f"{', threads chosen as it runs (--threads N fixes them)' if step_threads else ''}",
          file=sys.stderr)

    # fixed validation windows for the periodic estimate
    vrng = np.random.default_rng(12345)
    vstarts = window_starts(valid_ids, args.ctx, args.eval_windows, vrng, args.windows)
    vids = np.stack([valid_ids[s:s + args.ctx] for s in vstarts]).astype(np.int64)
    vtgt = np.stack([valid_ids[s + 1:s + args.ctx + 1] for s in vstarts]).astype(np.int64)
    bytes_per_token = valid_bytes / len(valid_ids)
    prompts = data_prompts(tok, valid_ids)

    def evaluate():
        losses = [tuning.loss(params, vids[i:i + args.batch], vtgt[i:i + args.batch], wkv_ops)
                  for i in range(0, len(vids), args.batch)]
        return float(np.mean(losses))

    def save_state(step):
        meta = {"step": step, "t": opt["t"], "rng": rng.bit_generator.state, "curve": curve,
                "mode": mode, "best": None if best is None else list(best[:2]),
                "args": {k: v for k, v in vars(args).items() if k != "func"}}
        arrays = {f"p:{k}": host(v) for k, v in params.items()}
        arrays.update({f"m:{k}": host(v) for k, v in opt["m"].items()})
        arrays.update({f"v:{k}": host(v) for k, v in opt["v"].items()})
        if best is not None:
            arrays.update({f"b:{k}": v for k, v in best[2].items()})
        with atomic_open(state_file) as f:          # never a half-written checkpoint
            np.savez(f, meta=np.array(json.dumps(meta, default=str)), **arrays)

    start_log(log_file, step0)
    plotted = None                          # write_loss_curve: not tried yet
    t_start = time.monotonic()
    tokens_done = 0
    stop = args.steps if not args.stop_after else min(args.steps, step0 + args.stop_after)
    progress = Progress(args.steps, last=stop)
    for step in range(step0, stop):
        starts = window_starts(train_ids, args.ctx, args.batch, rng, args.windows)
        ids = np.stack([train_ids[s:s + args.ctx] for s in starts]).astype(np.int64)
        tgt = np.stack([train_ids[s + 1:s + args.ctx + 1] for s in starts]).astype(np.int64)
        with step_threads or nullcontext(threads) as step_n:
            loss, grads = tuning.loss_and_grad(params, ids, tgt, wkv_ops)
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
                                "tok_s": tok_s, "threads": step_n}) + "\n")   # most the last line
        last = step + 1 == args.steps
        if (step + 1) % args.eval_every == 0 or last or step + 1 == stop:
            vloss = evaluate()
            check_step(step + 1, "validation loss", vloss, args)    # before it is checkpointed
            curve.append({"step": step + 1, "train_loss": loss, "valid_loss": vloss,
                          "valid_bpb": vloss / math.log(2) / bytes_per_token,
                          "seconds": time.monotonic() - t_start, "tok_s": tok_s})
            if best is None or vloss < best[1]:
                best = (step + 1, vloss, {k: host(v).copy() for k, v in params.items()})
            progress.newline()
            print(f"tinyrwkv train: step {step + 1}: valid loss {vloss:.3f} nats/token, "
                  f"~{curve[-1]['valid_bpb']:.3f} bits/byte"
                  f"{' (best so far)' if best[0] == step + 1 else f' (best: step {best[0]})'}",
                  file=sys.stderr)
            save_state(step + 1)
            plotted = write_loss_curve(out / "loss_curve.png", log_file, curve, plotted)
        if args.sample_every and ((step + 1) % args.sample_every == 0 or last):
            progress.newline()
            weights, start = tuning.inference(params)
            print("  sample: " + sample(weights, tok, prompts[0], 60, state=start)
                  .replace("\n", " / "), file=sys.stderr)
    wall = time.monotonic() - t_start
    if stop < args.steps:
        print(f"tinyrwkv train: stopped at step {stop} (--stop-after); continue with --resume",
              file=sys.stderr)
        return 0
    kept_step = curve[-1]["step"] if curve else stop
    if args.keep == "best" and best is not None:
        kept_step = best[0]
        params = {k: to_device(v) for k, v in best[2].items()}
    tok_file = getattr(tok, "path", None)
    run_facts = {"tokenizer": tok_how, "tokenizer_file": tok_file and file_facts(tok_file), "train_bytes": train_bytes, "valid_path": valid_path,
                 "prompts": prompts, "plotted": plotted, "mode": mode, "config": config,
                 "kept_step": kept_step, "n_trained": n_trained}
    return finish(args, tuning, params, base, tok, curve, wall, n_params, len(train_ids),
                  run_facts)


def tuning_mode(args):
    """"scratch", "full", "lora" or "state" from --init-from, --lora and --state-tune."""
    if args.lora and args.state_tune:
        raise ValueError("--lora and --state-tune are two ways to fine-tune: give one of them")
    if (args.lora or args.state_tune) and not args.init_from:
        raise ValueError(f"{'--lora' if args.lora else '--state-tune'} fine-tunes a model: give "
                         "it with --init-from MODEL (a checkpoint tinyrwkv reads)")
    if args.init_from:
        shape = [f"--{n.replace('_', '-')}" for n in ("layers", "width", "head_size", "vocab")
                 if getattr(args, n) is not None]
        if shape:
            raise ValueError(f"{', '.join(shape)} set the shape of a new model; with --init-from "
                             "the shape (and tokenizer) are the checkpoint's: leave them out")
        return "lora" if args.lora else "state" if args.state_tune else "full"
    return "scratch"


def describe_run(mode, args, config, n_params, n_trained):
    shape = (f"L{config.n_layer} C{config.n_embd} head {config.head_size} V{config.vocab_size}, "
             f"{n_params / 1e6:.2f}M parameters")
    if mode == "scratch":
        return f"a new model, {shape}"
    what = ("every parameter" if mode == "full" else "the initial state of every layer"
            if mode == "state" else
            f"LoRA rank {args.lora} alpha {args.lora_alpha:g} on {', '.join(args.lora_targets)}")
    return f"fine-tuning {args.init_from} ({shape}): {what}, {n_trained:,} numbers trained"


def window_starts(ids, ctx, n, rng, where="any"):
    """Starts of `n` windows of ctx + 1 tokens in `ids`: anywhere ("any"), or ("documents") at an
    end-of-text id 0, so the window's first prediction is a document's first token from a fresh
    state that has read end-of-text, as `tinyrwkv eval --per-document` and a user's generation
    start. A text without end-of-text ids falls back to anywhere."""
    top = len(ids) - ctx - 1
    if where == "documents":
        starts = np.flatnonzero(np.asarray(ids[:top]) == 0)
        if len(starts):
            return starts[rng.integers(0, len(starts), n)]
    return rng.integers(0, top, n)


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


def sample(params, tok, prompt, n, seed=0, state=None):
    """`prompt` and up to n tokens the model at `params` (from `state`, e.g. a tuned initial
    state) writes after it, temperature 1, top-p 0.85."""
    from .model import RWKV7
    from .sampling import sample_logits
    model = RWKV7({k: host(v).astype(np.float32) for k, v in params.items()})
    rng = np.random.default_rng(seed)
    logits, state = model.forward(tok.encode(prompt), None if state is None else state.copy())
    out = []
    for _ in range(n):
        t = sample_logits(logits, temperature=1.0, top_p=0.85, rng=rng)
        if t == 0:
            break
        out.append(t)
        logits, state = model.forward([t], state)
    return prompt + tok.decode(out)


def data_prompts(tok, ids, n=3, k=4):
    """Up to `n` prompts for samples, from the text itself (the validation file, so the model has
    not seen them): the first `k` tokens of documents (after <|endoftext|>, id 0) spread through
    the file, or of evenly spaced places where it has no document breaks."""
    ids = np.asarray(ids)
    starts = [0] + [int(i) + 1 for i in np.flatnonzero(ids == 0) if i + 1 < len(ids)]
    if len(starts) < n:
        starts = sorted(set(starts) | {len(ids) * j // n for j in range(n)})
    picked = [starts[len(starts) * j // n] for j in range(n)] if len(starts) > n else starts
    prompts = []
    for s in picked:
        piece = [int(t) for t in ids[s:s + k]]
        piece = piece[:piece.index(0)] if 0 in piece else piece
        text = tok.decode(piece).strip() if piece else ""
        if text and text not in prompts:
            prompts.append(text)
    return prompts or ["\n"]


def file_facts(path):
    """Name, size in bytes and SHA-256 of a file, for the card."""
    import hashlib
    h, size = hashlib.sha256(), 0
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            h.update(block)
            size += len(block)
    return {"name": Path(path).name, "path": str(path), "bytes": size, "sha256": h.hexdigest()}


def command_line(args):
    """The command that ran, as a shell would take it: the words given to `tinyrwkv` (cli.main
    keeps them), else (run() called from Python) the options rebuilt from args."""
    import shlex
    words = getattr(args, "argv", None)
    if not words:
        words = ["train"]
        for k, v in vars(args).items():
            if k in ("func", "command", "argv") or v is None or v is False:
                continue
            words += [f"--{k.replace('_', '-')}"] + ([] if v is True else [str(v)])
    return shlex.join(["tinyrwkv", *words])


def write_loss_curve(path, log_file, curve, plotted=None):
    """DIR/loss_curve.png: training loss per step (log.jsonl) and validation loss at each
    evaluation, in nats/token, written atomically. Without matplotlib (optional): a one-line note,
    once (`plotted` False afterwards), and no picture. Returns True when written."""
    if plotted is False:
        return False
    try:
        import matplotlib
    except ImportError:
        print("tinyrwkv train: no loss_curve.png: matplotlib is not installed (optional: pip "
              "install matplotlib)", file=sys.stderr)
        return False
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    steps, losses = [], []
    for line in Path(log_file).read_text(encoding="utf-8", errors="replace").splitlines():
        try:
            r = json.loads(line)
            steps.append(r["step"])
            losses.append(r["loss"])
        except (ValueError, KeyError, TypeError):
            pass
    fig, ax = plt.subplots(figsize=(7, 4))
    try:
        ax.plot(steps, losses, lw=0.8, alpha=0.6, label="train (one batch per step)")
        ax.plot([c["step"] for c in curve], [c["valid_loss"] for c in curve], "o-", lw=1.5,
                label="validation")
        ax.set_xlabel("step")
        ax.set_ylabel("loss (nats/token)")
        ax.grid(alpha=0.3)
        ax.legend()
        fig.tight_layout()
        with atomic_open(path) as f:
            fig.savefig(f, format="png", dpi=100)
    finally:
        plt.close(fig)
    return True


# What each kind of run writes (RWKV-PEFT's file kinds for the fine-tunes: a torch .pth of the
# trained tensors with official names, read by merge-lora / --state and by RWKV-PEFT and
# ChatRWKV's torch.load).
OUTPUT_FILE = {"scratch": "model.safetensors", "full": "model.safetensors",
               "lora": "lora_adapter.pth", "state": "time_state.pth"}


def save_output(path, tensors, args, mode):
    """Write the run's result atomically: a model as .safetensors, a fine-tune as .pth."""
    if mode in ("scratch", "full"):
        bf16 = tensors.keys() if args.save_dtype == "bfloat16" else ()
        save_safetensors(path, tensors, metadata={"format": "tinyrwkv",
                                                  "trained_by": "tinyrwkv train"}, bf16_keys=bf16)
    else:
        from .formats.pth_writer import save_pth
        save_pth(path, tensors, dtype=args.save_dtype)


def measure(weights, start, tok, valid_path, backend="numba"):
    """Bits per byte of the validation text two ways (evaluate.py's math): "continuous" (the file
    as one stream) and "per_document" (each document from the start state: documents cut at
    <|endoftext|> where the file has it, else at blank lines, e.g. a play's speeches)."""
    from .evaluate import evaluate_text
    model = inference_model(weights, backend)
    text = read_text(valid_path, "validation text")
    sep = "<|endoftext|>" if "<|endoftext|>" in text else None
    out = {"separator": sep or "blank lines"}
    for name, per_doc in (("continuous", False), ("per_document", True)):
        r = evaluate_text(model, text, per_doc, sep, tokenizer=tok, state=start)
        out[name] = r["bits_per_byte"]
    return out


def finish(args, tuning, params, base, tok, curve, wall, n_params, n_train_tokens, facts):
    """Write the result (OUTPUT_FILE), read it back, measure it (and the base model, for a
    fine-tune) on the validation text, write result.json and MODEL_CARD.md."""
    out, mode = Path(args.out), facts["mode"]
    final = {k: host(v).astype(np.float32) for k, v in params.items()}
    check_finite(final, "the trained model", fix="training diverged: lower --lr and train again; "
                 "nothing was written")
    path = out / OUTPUT_FILE[mode]
    save_output(path, final, args, mode)
    saved = read_checkpoint(path, dtype="float32")              # exactly the saved numbers
    weights, start = Tuning(mode, base, args.lora_alpha).inference(saved)
    print(f"tinyrwkv train: measuring {path.name} on {facts['valid_path']}", file=sys.stderr)
    after = measure(weights, start, tok, facts["valid_path"], args.backend)
    before = None
    if base is not None:
        before = measure({k: np.asarray(v, np.float32) for k, v in base.items()}, None, tok,
                         facts["valid_path"], args.backend)
    samples = [sample(weights, tok, p, 80, seed=s, state=start)
               for s, p in enumerate(facts["prompts"])]
    files = [path] + [f for f in (out / "model.tokenizer.json",) if f.is_file() and mode in
                      ("scratch", "full")]
    result = {"mode": mode, "output": path.name, "kept_step": facts["kept_step"],
              "valid_bits_per_byte": after["continuous"],
              "valid_bits_per_byte_per_document": after["per_document"],
              "documents": after["separator"],
              "before": before, "wall_seconds": wall, "n_params": int(n_params),
              "n_trained": int(facts["n_trained"]),
              "bytes": sum(f.stat().st_size for f in files)}
    write_text(out / "result.json", json.dumps(result, indent=1))
    write_card(args, result, curve, samples, n_train_tokens, tok.vocab_size, facts)
    was = "" if before is None else (f" (before: {before['continuous']:.3f} and "
                                     f"{before['per_document']:.3f})")
    print(f"tinyrwkv train: done in {wall / 60:.1f} min; step {facts['kept_step']} kept "
          f"(--keep {args.keep}); validation {after['continuous']:.3f} bits/byte read "
          f"continuously, {after['per_document']:.3f} per document{was}; wrote {path}",
          file=sys.stderr)
    return 0


def hardware(args):
    import os
    import platform
    if args.backend == "cupy":
        import cupy
        name = cupy.cuda.runtime.getDeviceProperties(0)["name"].decode()
        wkv = ("tinyrwkv's CUDA WKV kernels" if getattr(args, "wkv_pair", "") == "recurrent"
               else "the chunked WKV form")
        return f"{name} (CuPy: cuBLAS and {wkv})"
    pair = getattr(args, "wkv_pair", "recurrent")
    what = ("NumPy + Numba WKV kernels" if args.backend == "numba" and pair == "recurrent"
            else f"NumPy, {pair} WKV")
    return f"{os.cpu_count()} CPU cores ({platform.machine()}), {what}"


def printable(text):
    """`text` with control and other unprintable characters (an early model's bytes) shown as
    U+FFFD (line breaks and tabs kept): the card stays readable Markdown."""
    return "".join(c if c in "\n\t" or c.isprintable() else "\ufffd" for c in text)


UNKNOWN_LICENSE = "unknown: fill in the data's licence"


def write_card(args, result, curve, samples, n_train_tokens, V, facts):
    """DIR/MODEL_CARD.md: what this run actually was (data files with size and SHA-256, the
    tokenizer used, the command, the date, losses and bits per byte, samples of the trained
    model from prompts taken from the validation text). The licence is the data's: --data-license,
    else left for the user to fill in."""
    import datetime
    out = Path(args.out)
    data, valid = file_facts(args.data), file_facts(facts["valid_path"])
    tok_file = facts.get("tokenizer_file")
    license_ = getattr(args, "data_license", None) or UNKNOWN_LICENSE
    beside = sorted(p.name for p in Path(args.data).parent.iterdir() if p.is_file() and
                    p.name.upper().startswith(("PROVENANCE", "LICENSE", "LICENCE")))
    license_row = license_ + (f" (see {', '.join(beside)} beside the data)"
                              if beside and license_ == UNKNOWN_LICENSE else "")
    now = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d %H:%M UTC")
    train_bpt = facts["train_bytes"] / max(n_train_tokens, 1)
    ln2 = math.log(2)
    rows = "\n".join(f"| {c['step']} | {c['train_loss']:.3f} | {c['valid_loss']:.3f} | "
                     f"{c['valid_bpb']:.3f} | {c['seconds'] / 60:.1f} |" for c in curve)
    if curve:
        last, best = curve[-1], min(curve, key=lambda c: c["valid_loss"])
        best_train = min(curve, key=lambda c: c["train_loss"])
        losses = f"""| | train | validation |
|---|---|---|
| final (step {last['step']}), nats/token | {last['train_loss']:.3f} | {last['valid_loss']:.3f} |
| final, bits/byte | ~{last['train_loss'] / ln2 / train_bpt:.3f} | ~{last['valid_bpb']:.3f} |
| best, nats/token | {best_train['train_loss']:.3f} (step {best_train['step']}) | {best['valid_loss']:.3f} (step {best['step']}) |
| best, bits/byte | ~{best_train['train_loss'] / ln2 / train_bpt:.3f} | ~{best['valid_bpb']:.3f} |
"""
    else:
        losses = "(no evaluation was recorded)\n"
    hp = {k: v for k, v in vars(args).items()
          if k not in ("func", "command", "out", "resume", "threads", "argv", "wkv_pair")
          and not (args.init_from and k in ("layers", "width", "head_size", "vocab"))}
    command = command_line(args).replace("|", "\\|")           # a | would end the table cell
    picture = ("\n![learning curve](loss_curve.png)\n" if (out / "loss_curve.png").is_file()
               else "")
    cfg, mode = facts["config"], facts["mode"]
    tok_row = "" if tok_file is None else (
        f", `{tok_file['name']}` (SHA-256 `{tok_file['sha256'][:16]}…`)"
        + (", saved beside the model as `model.tokenizer.json`"
           if (out / "model.tokenizer.json").is_file() else ""))
    base_name = f"`{args.init_from}`" if args.init_from else ""
    if mode == "scratch":
        title = f"RWKV-7 trained on `{data['name']}`"
        intro = ("A small RWKV-7 (x070) language model trained by `tinyrwkv train`, tinyrwkv's "
                 "NumPy trainer with hand-written gradients, on the text of "
                 f"`{data['name']}` only.")
    else:
        kind = ("every parameter fine-tuned" if mode == "full" else
                "a tuned initial state (state tuning)" if mode == "state" else
                f"a LoRA adapter (rank {args.lora}, alpha {args.lora_alpha:g}, on "
                f"{', '.join(args.lora_targets)})")
        title = f"{base_name} fine-tuned on `{data['name']}` ({mode})"
        intro = (f"{base_name} adapted to the text of `{data['name']}` by `tinyrwkv train "
                 f"--init-from`: {kind}, with tinyrwkv's hand-written gradients; the base "
                 "model's weights are " + ("trained too." if mode == "full" else "frozen."))
    trained_row = ("" if mode in ("scratch", "full") else
                   f" ({facts['n_trained']:,} of them trained)")
    if mode == "scratch":
        files_row = (f"`model.safetensors` ({args.save_dtype}, official key names) + "
                     "`model.tokenizer.json`")
    elif mode == "full":
        files_row = (f"`model.safetensors` ({args.save_dtype}, official key names)"
                     + (" + `model.tokenizer.json`" if (out / "model.tokenizer.json").is_file()
                        else " (its tokenizer: the base model's)"))
    elif mode == "lora":
        files_row = (f"`{result['output']}` (RWKV-PEFT LoRA, {args.save_dtype}): use with "
                     f"`tinyrwkv merge-lora --alpha {args.lora_alpha:g} BASE {result['output']} OUT`")
    else:
        files_row = (f"`{result['output']}` (RWKV-PEFT state, {args.save_dtype}): use with "
                     f"`tinyrwkv generate --model BASE --state {result['output']}`")
    start_words = "the tuned state" if mode == "state" else "a fresh state"
    doc_cut = ("blank lines" if result["documents"] == "blank lines" else
               "cut at `" + result["documents"].replace("|", "\\|") + "`")
    before = result.get("before")
    before_row = ("" if not before else
                  f"| before (the base model) | {before['continuous']:.3f} as one text; "
                  f"{before['per_document']:.3f} per document |\n")
    card = f"""---
license: "{license_}"
library_name: tinyrwkv
tags: [rwkv, rwkv-7, x070]
---

# Model card: {title}

{intro}

| | |
|---|---|
| license | {license_row} |
| date | {now} |
| command | `{command}` |
| architecture | RWKV-7 x070, L{cfg.n_layer} C{cfg.n_embd} head size {cfg.head_size}, F {cfg.dim_ffn}, LoRA ranks {(cfg.d_decay, cfg.d_aaa, cfg.d_mv, cfg.d_gate)} |
| parameters | {result['n_params']:,}{trained_row} |
| training data | `{data['name']}`: {data['bytes']:,} bytes, {n_train_tokens:,} tokens, SHA-256 `{data['sha256']}` |
| validation data | `{valid['name']}`: {valid['bytes']:,} bytes, SHA-256 `{valid['sha256']}` |
| tokenizer | {facts['tokenizer']}: {V} tokens{tok_row} |
| files | {files_row}: {result['bytes'] / 1e6:.1f} MB |
| training | {curve[-1]['step'] if curve else 0} steps of {args.batch} x {args.ctx} tokens, AdamW, lr {args.lr} (warm-up {args.warmup}, cosine to {args.lr * args.min_lr_ratio:g}), weight decay {args.weight_decay}, clip {args.clip}, seed {args.seed} |
| wall time | {result['wall_seconds'] / 60:.1f} min on {hardware(args)} |
| kept | step {result['kept_step']} (`--keep {args.keep}`: {'the best validation loss' if args.keep == 'best' else 'the last step'}) |
| **validation bits per byte** | **{result['valid_bits_per_byte']:.3f}** reading the whole validation file as one text; **{result['valid_bits_per_byte_per_document']:.3f}** reading each document ({doc_cut}) from {start_words}; as saved |
{before_row}
Losses (train: the step's batch; validation: {args.eval_windows} fixed windows of {args.ctx}
tokens; ~bits/byte estimated with each file's mean bytes per token):

{losses}
Learning curve:

| step | train loss | valid loss | valid bits/byte | minutes |
|---|---|---|---|---|
{rows}
{picture}
Samples of the saved model (temperature 1, top-p 0.85), each from the start of a place in the
validation text:

""" + "\n".join("> " + printable(s).replace("\n", "\n> ") + "\n" for s in samples) + f"""
Hyper-parameters: `{json.dumps(hp, default=str)}`
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
    "stop_after": (int, NON_NEGATIVE), "lora": (int, NON_NEGATIVE),
    "lora_alpha": (float, POSITIVE),
}


def number(name):
    """The argparse type of option `name` (NUMBERS)."""
    return option(*NUMBERS[name])


# A new model's shape when not given (with --init-from the checkpoint's shape is used).
SHAPE_DEFAULTS = {"vocab": 4096, "layers": 4, "width": 256, "head_size": 64}
# The peak learning rate of each kind of run when --lr is not given: a new model as RWKV-LM's
# small models (3e-3); fine-tuning every weight an order lower so it adapts without forgetting;
# LoRA factors start from B = 0 and need more; a state is a few thousand numbers per layer that
# RWKV-PEFT trains at ~1e-2 and above. Measured on tinyshakespeare (docs/training.md §2).
DEFAULT_LR = {"scratch": 3e-3, "full": 3e-4, "lora": 1e-3, "state": 3e-2}


def check_config(args):
    """Raise ValueError, naming the option, for a training configuration that cannot work: a
    number outside NUMBERS (a NaN --lr trains a NaN model without a single error), fine-tuning
    options without --init-from, or a --width the heads do not divide. Fills in the defaults
    that depend on the kind of run (shape, --lr, --warmup). The command line runs it as the train
    command's usage check."""
    for name, default in (("warmup", None), ("init_from", None), ("lora", 0),
                          ("lora_alpha", None), ("lora_targets", None), ("state_tune", False),
                          ("keep", "best"), ("windows", "any"), ("lr", None),
                          *((n, None) for n in SHAPE_DEFAULTS)):
        if not hasattr(args, name):
            setattr(args, name, default)
    for name, (kind, within) in NUMBERS.items():
        if getattr(args, name) is None:
            continue
        check = check_float if kind is float else check_int
        check(f"--{name.replace('_', '-')}", getattr(args, name), within)
    mode = tuning_mode(args)
    if mode == "scratch":
        for name, default in SHAPE_DEFAULTS.items():
            if getattr(args, name) is None:
                setattr(args, name, default)
        if args.width % args.head_size:
            fits = max(args.head_size, args.width // args.head_size * args.head_size)
            raise ValueError(f"--width {args.width} is not a multiple of --head-size "
                             f"{args.head_size}: the width is split into heads of that size; use "
                             f"e.g. --width {fits}")
    if mode != "lora" and (args.lora_alpha is not None or args.lora_targets):
        raise ValueError("--lora-alpha and --lora-targets are for LoRA: give --lora RANK too")
    if mode == "lora":
        args.lora_alpha = 2.0 * args.lora if args.lora_alpha is None else args.lora_alpha
        targets = args.lora_targets or ",".join(train.LORA_TARGETS)
        if isinstance(targets, str):
            targets = [t.strip() for t in targets.split(",") if t.strip()]
        unknown = [t for t in targets if t not in train.LORA_TARGETS]
        if unknown or not targets:
            raise ValueError(f"--lora-targets {','.join(unknown) or '(none)'}: LoRA goes on the "
                             f"model's matrices {','.join(train.LORA_TARGETS)} (a comma-separated "
                             "list of them)")
        args.lora_targets = targets
    if args.lr is None:
        args.lr = DEFAULT_LR[mode]
    if args.warmup is None:
        args.warmup = default_warmup(args.steps)
    if args.warmup >= args.steps:
        raise ValueError(f"--warmup {args.warmup} does not fit in --steps {args.steps}: the "
                         "learning rate would still be rising at the last step and never decay; "
                         f"give a --warmup below {args.steps} (e.g. {default_warmup(args.steps)}, "
                         "5% of the steps, the default when --warmup is left out) or more --steps")


def default_warmup(steps):
    """--warmup when it is left out: 5% of --steps (100 for the default 2000)."""
    return steps // 20


def add_arguments(p):
    p.add_argument("--data", required=True, metavar="FILE", help="training text (UTF-8)")
    p.add_argument("--valid", metavar="FILE", help="validation text (default: valid.txt beside --data)")
    p.add_argument("--out", required=True, metavar="DIR", help="where the model, tokenizer, card and checkpoints go")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="a tokenizer.json to use instead of training one (with --init-from: "
                        "instead of the model's own)")
    g = p.add_argument_group("a new model (without --init-from)")
    g.add_argument("--vocab", type=number("vocab"), help="BPE vocabulary size to train (default: 4096)")
    g.add_argument("--layers", type=number("layers"), help="default: 4")
    g.add_argument("--width", type=number("width"), help="n_embd (C) (default: 256)")
    g.add_argument("--head-size", type=number("head_size"), help="default: 64")
    f = p.add_argument_group("fine-tuning (docs/training.md)")
    f.add_argument("--init-from", metavar="MODEL",
                   help="start from this RWKV-7 checkpoint (official .pth, ours, .safetensors, "
                        "GGUF, HF folder) with its own tokenizer, instead of a new model; alone, "
                        "every weight trains and DIR/model.safetensors is written")
    f.add_argument("--lora", type=number("lora"), metavar="RANK",
                   help="train a LoRA adapter of this rank instead (the model frozen); writes "
                        "DIR/lora_adapter.pth (RWKV-PEFT's format: tinyrwkv merge-lora reads it)")
    f.add_argument("--lora-alpha", type=number("lora_alpha"), metavar="A",
                   help="LoRA scale: W + (A / RANK) B A (default: 2 x RANK)")
    f.add_argument("--lora-targets", metavar="LIST",
                   help="the matrices that get LoRA, comma-separated (default: all of "
                        f"{','.join(train.LORA_TARGETS)})")
    f.add_argument("--state-tune", action="store_true",
                   help="train each layer's initial state instead (the model frozen); writes "
                        "DIR/time_state.pth (RWKV-PEFT's format: use it with --state)")
    o = p.add_argument_group("optimisation")
    o.add_argument("--steps", type=number("steps"), default=2000)
    o.add_argument("--batch", type=number("batch"), default=16, help="sequences per step (B)")
    o.add_argument("--ctx", type=number("ctx"), default=128, help="tokens per sequence (T)")
    o.add_argument("--lr", type=number("lr"),
                   help="peak learning rate (default: " + ", ".join(
                       f"{v:g} {k}" for k, v in DEFAULT_LR.items()).replace("scratch", "a new model")
                   .replace("full", "--init-from").replace("lora", "--lora")
                   .replace("state", "--state-tune") + ")")
    o.add_argument("--min-lr-ratio", type=number("min_lr_ratio"), default=0.1, help="final lr / peak lr")
    o.add_argument("--warmup", type=number("warmup"),
                   help="warm-up steps, fewer than --steps (default: 5%% of --steps)")
    o.add_argument("--weight-decay", type=number("weight_decay"), default=0.1)
    o.add_argument("--beta1", type=number("beta1"), default=0.9)
    o.add_argument("--beta2", type=number("beta2"), default=0.99)
    o.add_argument("--eps", type=number("eps"), default=1e-8)
    o.add_argument("--clip", type=number("clip"), default=1.0, help="max global gradient norm (0: off)")
    o.add_argument("--windows", choices=["any", "documents"], default="any",
                   help="where training windows start: anywhere in the text, or at an "
                        "<|endoftext|> (each window reads a document from a fresh state, as "
                        "generation starts)")
    o.add_argument("--seed", type=number("seed"), default=0)
    e = p.add_argument_group("evaluation and output")
    e.add_argument("--eval-every", type=number("eval_every"), default=200)
    e.add_argument("--eval-windows", type=number("eval_windows"), default=64, help="validation windows per evaluation")
    e.add_argument("--keep", choices=["best", "last"], default="best",
                   help="what is written at the end: the step with the best validation loss, or "
                        "the last step")
    e.add_argument("--sample-every", type=number("sample_every"), default=500, help="0: no samples")
    e.add_argument("--data-license", metavar="TEXT",
                   help="the training data's licence, for MODEL_CARD.md's license: field "
                        "(default: left for you to fill in)")
    e.add_argument("--save-dtype", choices=["float32", "bfloat16"], default="bfloat16")
    e.add_argument("--resume", action="store_true", help="continue from DIR/train_state.npz")
    e.add_argument("--stop-after", type=number("stop_after"), default=0,
                   help="stop after this many steps of this run (checkpointed; --resume continues)")
    h = p.add_argument_group("hardware")
    h.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    h.add_argument("--backend", choices=["numba", "numpy", "cupy"],
                   help="numba: CPU, Numba WKV kernels (default where numba is installed); "
                        "numpy: CPU, the NumPy reference; "
                        "cupy: everything on a CUDA GPU (CuPy), CUDA WKV kernels")
    h.add_argument("--wkv", choices=["auto", "recurrent", "chunked"], default="auto",
                   help="the WKV operator's form in training: the recurrence (token by token) or "
                        "the chunked, parallel form (matrix products per chunk of 16); the same "
                        "numbers either way. auto: the faster where measured (NumPy: chunked; "
                        "Numba and CuPy: their compiled recurrence)")
    h.add_argument("--threads", type=option(int, POSITIVE),
                   help="CPU threads for the Numba kernels and BLAS (default: the libraries' own, "
                        "all cores)")
