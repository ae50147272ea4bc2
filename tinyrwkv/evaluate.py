"""`tinyrwkv eval`: how well a model predicts a text, in bits per byte, perplexity and tokens/s.

    tinyrwkv eval --model M valid.txt                          the file as one stream
    tinyrwkv eval valid.txt --per-document --separator '<|endoftext|>'   each story from zero
    tinyrwkv eval valid.txt --compare :int8 --compare other.pth         side by side
    tinyrwkv eval valid.txt --json

The math, written once (the trainer's validation uses it too: trainer.bits_per_byte):
    nats        the total negative log-likelihood of every predicted token given what precedes
                it (log-softmax of the logits, in float64), `nats_of_ids`
    bits/byte   nats / ln 2 / the UTF-8 bytes of the text those tokens cover, `bits_per_byte`:
                comparable across tokenizers (a model with longer tokens predicts fewer of them)
    perplexity  exp(nats / predicted tokens): per token, so only comparable for one tokenizer

Two ways to read a file (the output says which):
    continuous      (default) the whole file is one stream, read in chunks with the state carried,
                    as the model reads a long text. With --separator, each separator (and the
                    newlines around it) becomes the end-of-text token, as the trainer reads its
                    data (trainer.encode_file): a separator costs one predicted token and its
                    bytes count. Bytes: the whole file's.
    per-document    the file is cut into documents (at blank lines, or at --separator), each read
                    from a fresh state, as a user generating one would start. Bytes: the
                    documents' own (separators are not read).
Every stream starts with the tokenizer's end-of-text token as context (a fresh state that has
read "the previous text ended"), so every token of the text is predicted and every byte counted.
A tokenizer without one: the first token of each stream is context, not predicted.
"""

from __future__ import annotations

import argparse
import json
import math
import re
import sys
import time
from pathlib import Path

import numpy as np

from .checks import POSITIVE, decode_text, option

LN2 = math.log(2)
BLANK_LINE = re.compile(r"\n[ \t\r]*\n")


# ---- the math (one copy: tinyrwkv/trainer.py uses it too) ------------------------------------

def chunk_tokens(vocab_size):
    """Tokens per forward call: 512, fewer for a large vocabulary so that the (chunk, V) float64
    log-softmax stays under 64 MB (65536 tokens: 128)."""
    return int(max(16, min(512, 2**23 // vocab_size)))


def nats_of_ids(model, ids, state=None, chunk=None, progress=None):
    """Total negative log-likelihood (nats) of ids[1:], each given everything before it (ids[0]
    is context only), read in chunks of `chunk` tokens with the state carried: the recurrent
    model sees the whole sequence as one text whatever the chunk. Returns (nats, state).
    progress(tokens predicted so far), if given, is called after each chunk."""
    ids = np.asarray(ids, dtype=np.int64)
    chunk = chunk or chunk_tokens(model.config.vocab_size)
    total = 0.0
    for start in range(0, len(ids) - 1, chunk):
        x = ids[start:start + chunk + 1]
        logits, state = model.forward(x[:-1], state, full_output=True)
        logits = np.asarray(logits, dtype=np.float64).reshape(len(x) - 1, -1)
        m = logits.max(-1)
        log_z = m + np.log(np.exp(logits - m[:, None]).sum(-1))      # log-softmax's normaliser
        total += float((log_z - logits[np.arange(len(x) - 1), x[1:]]).sum())
        if progress is not None:
            progress(start + len(x) - 1)
    return total, state


def bits_per_byte(nats, n_bytes):
    """Nats over a text -> bits per UTF-8 byte of it."""
    if n_bytes <= 0:
        raise ValueError("bits per byte of no bytes: the text is empty")
    return nats / LN2 / n_bytes


# ---- texts, documents, results ----------------------------------------------------------------

def documents(text, separator=None):
    """The documents of `text`: cut at `separator` (None: at blank lines), each stripped of the
    newlines around it (a separator on its own line), empty ones dropped."""
    pieces = BLANK_LINE.split(text) if separator is None else text.split(separator)
    return [d for d in (p.strip("\r\n") for p in pieces) if d.strip()]


def evaluate_text(model, text, per_document=False, separator=None, max_tokens=None,
                  tokenizer=None, chunk=None, progress=None, state=None):
    """Bits per byte, perplexity and speed of `model` on `text` (a str).

    per_document: each document (documents(text, separator)) from a fresh state; otherwise the
    whole text as one stream (with `separator`: each separator read as the end-of-text token).
    max_tokens: predict at most this many tokens (the bytes are then those of the tokens read).
    state: where every stream starts (e.g. a state-tuned initial state; default: zeros).
    Returns a dict: mode, documents, tokens (predicted), bytes, nats, bits_per_byte, perplexity,
    seconds, tokens_per_second, truncated.
    """
    tokenizer = tokenizer or model.tokenizer
    if tokenizer is None:
        from .prompts import no_tokenizer_message
        raise ValueError(no_tokenizer_message(model, "evaluate text"))
    eot = getattr(tokenizer, "eot_id", None)
    start = [] if eot is None else [eot]
    if per_document:
        docs = documents(text, separator)
        streams = [(start + list(tokenizer.encode(d)), len(d.encode("utf-8"))) for d in docs]
    elif separator is not None:
        docs, ids = documents(text, separator), list(start)
        pieces = text.split(separator)
        for n, piece in enumerate(pieces):             # as trainer.encode_file reads its data
            piece = piece.strip("\r\n")
            ids += list(tokenizer.encode(piece)) if piece else []
            if n < len(pieces) - 1 and eot is not None:
                ids.append(eot)                        # one end-of-text token per separator
        streams = [(ids, len(text.encode("utf-8")))]
    else:
        docs = [text] if text.strip() else []
        streams = [(start + list(tokenizer.encode(text)), len(text.encode("utf-8")))]
    if not docs:
        raise ValueError("the text has no documents to evaluate (only whitespace"
                         f"{'' if separator is None else ' and separators'})")
    streams, truncated = _cap(streams, max_tokens, tokenizer)
    total_tokens = sum(max(len(ids) - 1, 0) for ids, _ in streams)
    if total_tokens == 0:
        raise ValueError("the text is too short to evaluate: it has no token to predict")
    nats, done, t0 = 0.0, 0, time.perf_counter()
    for ids, _ in streams:
        report = None if progress is None else (lambda n, d=done: progress(d + n, total_tokens))
        stream_nats, _ = nats_of_ids(model, ids, None if state is None else state.copy(),
                                     chunk, report)
        nats += stream_nats
        done += max(len(ids) - 1, 0)
    seconds = time.perf_counter() - t0
    n_bytes = sum(b for _, b in streams)
    n_docs = len(streams) if per_document else len(docs)      # those read (--max-tokens)
    return dict(mode="per-document" if per_document else "continuous", documents=n_docs,
                tokens=total_tokens, bytes=n_bytes, nats=nats,
                bits_per_byte=bits_per_byte(nats, n_bytes),
                perplexity=math.exp(nats / total_tokens), seconds=seconds,
                tokens_per_second=total_tokens / max(seconds, 1e-9),
                truncated=truncated)


def _cap(streams, max_tokens, tokenizer):
    """Streams cut so that at most `max_tokens` tokens are predicted; a cut stream's bytes are
    those of its tokens read (decoded). Returns (streams, whether anything was cut)."""
    if max_tokens is None:
        return streams, False
    out, left = [], max_tokens
    for ids, n_bytes in streams:
        if left <= 0:
            return out, True
        if len(ids) - 1 > left:
            ids = ids[:left + 1]
            out.append((ids, len(tokenizer.decode_bytes(ids[1:]))))
            return out, True
        out.append((ids, n_bytes))
        left -= max(len(ids) - 1, 0)
    return out, False


def read_eval_file(path):
    """The text of `path`, or a ValueError naming the file, the problem and the fix."""
    path = Path(path)
    if not path.exists():
        raise ValueError(f"{path}: no such file; check the path")
    if path.is_dir():
        raise ValueError(f"{path} is a folder; give a text file")
    data = path.read_bytes()
    if not data:
        raise ValueError(f"{path} is empty: nothing to evaluate; give a text file with some text")
    return decode_text(data, path, "text to evaluate")


# ---- the command ------------------------------------------------------------------------------

def parse_model_spec(spec, default_path):
    """'PATH', 'PATH:STORAGE' or ':STORAGE' (the main model in another storage) ->
    (path or None for the shipped model, storage or None). A Windows drive ('C:\\m.pth') is a
    path: only a known storage name after the last ':' is taken as one."""
    from .backends import STORAGE
    names = {s for kinds in STORAGE.values() for s in kinds}
    head, sep, tail = spec.rpartition(":")
    if sep and tail in names:
        return (head or default_path), tail
    return spec, None


def _label(model):
    kind = model.dtype.name if model.backend == "numpy" else model.storage
    return f"{Path(model.path).name if model.path else model.name} {kind}"


def _separator(text):
    """--separator as typed, with \\n and \\t meaning a newline and a tab."""
    return None if text is None else text.replace("\\n", "\n").replace("\\t", "\t")


def run(args):
    """`tinyrwkv eval`: every model on every file; a table (or --json) on stdout."""
    from .formats.progress import ProgressBar
    from .loader import load
    texts = {str(f): read_eval_file(f) for f in args.files}     # every file checked before loading
    separator = _separator(args.separator)
    specs = [(args.model, args.storage)] + [parse_model_spec(s, args.model) for s in args.compare or ()]
    results = []
    for path, storage in specs:
        model = load(path, tokenizer=args.tokenizer, backend=args.backend,
                              storage=storage, threads=args.threads)
        if model.tokenizer is None:
            raise ValueError(f"{model.path}: {model.tokenizer_error}; give --tokenizer")
        label = _label(model)
        start = None
        if args.state:
            from .formats.lora import read_start_state
            start = read_start_state(args.state, model.config)
            label += f" from {Path(args.state).name}"
        for name, text in texts.items():
            progress = None
            bar = ProgressBar(f"eval {label} {Path(name).name}")
            if bar.enabled and len(text) > 100_000:                  # a long file on a terminal
                size = len(text.encode("utf-8"))
                progress = lambda done, total: bar(int(size * done / total), size)
            try:
                r = evaluate_text(model, text, args.per_document, separator, args.max_tokens,
                                  progress=progress, state=start)
            except ValueError as e:
                raise ValueError(f"{name}: {e}") from None
            finally:
                bar.close()
            results.append(dict(model=label, path=str(model.path), backend=model.backend,
                                storage=model.storage, file=name, **r))
        del model
    mode = "per-document" if args.per_document else "continuous"
    if args.json:
        print(json.dumps(dict(mode=mode, separator=separator if separator is not None else (
            "blank line" if args.per_document else None), max_tokens=args.max_tokens,
            results=results), indent=1))
    else:
        print(table(results, mode, separator))
    return 0


def describe_mode(mode, separator):
    if mode == "per-document":
        cut = "blank lines" if separator is None else repr(separator)
        return f"per-document: documents cut at {cut}, each read from a fresh state"
    if separator is None:
        return "continuous: each file one stream, the state carried from chunk to chunk"
    return (f"continuous: documents cut at {separator!r} and joined by the end-of-text token, "
            "one stream per file")


def table(results, mode, separator=None):
    """The results as a text table, one row per model and file, grouped by file; 'vs first':
    bits/byte minus the first model's on that file."""
    head = ["file", "model", "docs", "tokens", "bytes", "bits/byte", "vs first", "ppl/token",
            "tokens/s"]
    rows, first = [], {}
    for r in results:
        base = first.setdefault(r["file"], r)
        delta = "" if base is r else f"{r['bits_per_byte'] - base['bits_per_byte']:+.4f}"
        rows.append([Path(r["file"]).name, r["model"], f"{r['documents']:,}",
                     f"{r['tokens']:,}{'*' if r['truncated'] else ''}", f"{r['bytes']:,}",
                     f"{r['bits_per_byte']:.4f}", delta, f"{r['perplexity']:.3f}",
                     f"{r['tokens_per_second']:,.0f}"])
    rows.sort(key=lambda row: row[0])         # stable: models stay in the order given
    widths = [max(len(h), *(len(row[i]) for row in rows)) for i, h in enumerate(head)]
    line = lambda cells: "  ".join(c.ljust(w) if i < 2 else c.rjust(w)
                                   for i, (c, w) in enumerate(zip(cells, widths))).rstrip()
    out = [describe_mode(mode, separator), line(head)] + [line(row) for row in rows]
    if any(r["truncated"] for r in results):
        out.append("* cut at --max-tokens")
    return "\n".join(out)


def add_parser(sub, formatter_class=argparse.HelpFormatter):
    """`tinyrwkv eval` in the subcommands `sub` (argparse)."""
    p = sub.add_parser(
        "eval", formatter_class=formatter_class,
        help="bits per byte, perplexity and tokens/s of a model on text files",
        description="How well a model predicts text files: bits per byte (total nats / ln 2 / "
                    "UTF-8 bytes: comparable across tokenizers), perplexity per token, tokens/s. "
                    "By default each file is read as one stream with the state carried "
                    "(continuous); --per-document reads each document from a fresh state.",
        epilog="Examples: 'tinyrwkv eval valid.txt' (the shipped model); 'tinyrwkv eval "
               "valid.txt --per-document --separator \"<|endoftext|>\"'; 'tinyrwkv eval -m "
               "a.pth valid.txt --compare :int8 --compare b.pth --json'.")
    p.add_argument("files", nargs="+", metavar="FILE", help="UTF-8 text files")
    p.add_argument("--model", "-m", metavar="PATH",
                   help="RWKV-7 model (.pth, .safetensors, .gguf, HF folder); default: the model "
                        "in weights/")
    p.add_argument("--compare", action="append", metavar="M",
                   help="another model in the same table (repeatable): PATH, PATH:STORAGE, or "
                        ":STORAGE for --model in another storage (e.g. :int8, :bfloat16)")
    p.add_argument("--storage", choices=["float32", "bfloat16", "float16", "int8"],
                   help="how --model's large matrices are kept (numba: float32 by default)")
    p.add_argument("--backend", choices=["numpy", "numba", "cupy"],
                   help="numba where installed, else numpy")
    p.add_argument("--tokenizer", metavar="PATH",
                   help="'world' or a tokenizer.json; default: chosen from the vocabulary size")
    p.add_argument("--threads", type=option(int, POSITIVE), metavar="N",
                   help="CPU threads (default: all cores)")
    p.add_argument("--state", metavar="FILE",
                   help="start every stream from this state instead of zeros: a state-tuning "
                        "file (time_state.pth from `tinyrwkv train --state-tune`, RWKV-PEFT's) "
                        "or a saved state (.npz)")
    p.add_argument("--per-document", action="store_true",
                   help="read each document from a fresh state (documents: cut at blank lines, "
                        "or at --separator); default: each file as one continuous stream")
    p.add_argument("--separator", metavar="TEXT",
                   help="what separates documents, e.g. '<|endoftext|>' (\\n: newline); "
                        "default with --per-document: a blank line")
    p.add_argument("--max-tokens", type=option(int, POSITIVE), metavar="N",
                   help="predict at most N tokens per file and model (a quick look at a long file)")
    p.add_argument("--json", action="store_true", help="print the results as JSON")
    p.set_defaults(func=run)
    return p
