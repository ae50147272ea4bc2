"""The vocabulary inside a GGUF file: written from our tokenizers, read back into them.

World vocabulary (tokenizer.ggml.model "rwkv", as llama.cpp's converter writes it): "<s>"
(control) for id 0, then each token's Python bytes-repr text without the b'...' wrapper, then
"[PAD{id}]" (unused) up to V; end of turn 261 ("\\n\\n"); chat template "rwkv-world".
A Hugging Face BPE vocabulary (the Pile tokenizer, our trained one): model "gpt2", tokens and
merges. Details: docs/formats.md.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from ..errors import CheckpointError


def add_tokenizer(writer, tok, vocab_size, gguf):
    """Put `tok` (a WorldTokenizer or HFTokenizer) into a GGUFWriter's metadata."""
    from ..tokenizer import HFTokenizer, WorldTokenizer
    if isinstance(tok, WorldTokenizer):
        if tok.max_id >= vocab_size:
            raise ValueError(f"the World vocabulary has ids up to {tok.max_id}, more than the "
                             f"model's {vocab_size} embedding rows: it is not this model's "
                             "tokenizer")
        tokens, types = ["<s>"], [gguf.TokenType.CONTROL]
        for i in range(1, vocab_size):
            if i <= tok.max_id:
                tokens.append(repr(tok.token_bytes(i))[2:-1])   # the bytes-repr text
                types.append(gguf.TokenType.NORMAL)
            else:
                tokens.append(f"[PAD{i}]")
                types.append(gguf.TokenType.UNUSED)
        writer.add_tokenizer_model("rwkv")
        writer.add_token_list(tokens)
        writer.add_token_types(types)
        writer.add_eot_token_id(261)
        writer.add_chat_template("rwkv-world")
    elif isinstance(tok, HFTokenizer):
        spec = json.loads(tok._tok.to_str())
        vocab = spec["model"]["vocab"]
        tokens = [None] * len(vocab)
        for text, i in vocab.items():
            tokens[i] = text
        merges = [m if isinstance(m, str) else " ".join(m) for m in spec["model"].get("merges", [])]
        writer.add_tokenizer_model("gpt2")
        writer.add_tokenizer_pre("default")
        writer.add_token_list(tokens)
        writer.add_token_types([gguf.TokenType.CONTROL if t == "<|endoftext|>" else
                                gguf.TokenType.NORMAL for t in tokens])
        writer.add_token_merges(merges)
        writer.add_eos_token_id(0)
    else:
        raise ValueError(f"cannot write a {type(tok).__name__} into GGUF")


def read_tokenizer(header, vocab_rows):
    """The tokenizer a GGUF header's metadata describes (None when it names none, or one tinyrwkv
    does not build), checked against the file: the token list may not have more entries than
    the embedding has rows (`vocab_rows`: ids past them could not be embedded; for the World
    vocabulary, written padded to V, exactly V), token types and scores have one entry per
    token, and a gpt2 (byte-level BPE) vocabulary has its merges, each "left right".
    CheckpointError naming the file and the key otherwise."""
    model = header.string("tokenizer.ggml.model")
    if model not in ("rwkv", "gpt2"):
        return None
    path = header.path
    tokens = header.strings("tokenizer.ggml.tokens")
    if tokens is None:
        raise _vocab_error(path, f"tokenizer model {model!r} but no tokenizer.ggml.tokens")
    if len(tokens) > vocab_rows or (model == "rwkv" and len(tokens) != vocab_rows):
        raise _vocab_error(path, f"{len(tokens)} tokens in tokenizer.ggml.tokens for an embedding "
                                 f"of {vocab_rows} rows (token_embd.weight)")
    for key in ("tokenizer.ggml.token_type", "tokenizer.ggml.scores"):
        values = header.numbers(key)
        if values is not None and len(values) != len(tokens):
            raise _vocab_error(path, f"{len(values)} entries in {key} for {len(tokens)} tokens")
    if model == "rwkv":
        from ..tokenizer import _packaged_world_tokenizer     # the one instance, shared
        world = _packaged_world_tokenizer()
        if world.max_id >= vocab_rows:
            raise _vocab_error(path, f"the World vocabulary (tokenizer model 'rwkv', ids up to "
                                     f"{world.max_id}) for an embedding of {vocab_rows} rows")
        return world
    return _bpe_tokenizer(path, tokens, header.strings("tokenizer.ggml.merges"))


def _bpe_tokenizer(path, tokens, merges):
    """A byte-level BPE HFTokenizer from a gpt2 GGUF vocabulary (tokens by id, "left right"
    merges)."""
    if merges is None:
        raise _vocab_error(path, "a gpt2 (BPE) vocabulary without tokenizer.ggml.merges")
    pairs = [tuple(m.split(" ", 1)) for m in merges]
    bad = next((m for m, pair in zip(merges, pairs) if len(pair) != 2), None)
    if bad is not None:
        raise _vocab_error(path, f"the merge {bad[:40]!r} in tokenizer.ggml.merges, which is not "
                                 "two tokens separated by a space")
    ids = {t: i for i, t in enumerate(tokens)}
    if len(ids) != len(tokens):
        raise _vocab_error(path, "a token that appears twice in tokenizer.ggml.tokens")
    try:
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    except ImportError:
        raise CheckpointError(f"{path} carries a BPE vocabulary; building its tokenizer needs "
                              "the Hugging Face tokenizers package: pip install tokenizers") from None
    from ..tokenizer import HFTokenizer
    try:
        tok = Tokenizer(models.BPE(ids, pairs))
    except Exception as e:     # tokenizers raises a bare Exception (a merge of an unknown token)
        raise _vocab_error(path, f"a BPE vocabulary the tokenizers library refuses ({e})") from None
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    with tempfile.TemporaryDirectory() as folder:          # HFTokenizer reads a file, once
        saved = Path(folder) / "gguf.tokenizer.json"
        tok.save(str(saved))
        return HFTokenizer(saved)


def _vocab_error(path, problem):
    return CheckpointError(f"{path} has {problem}; its vocabulary does not fit the model: the "
                           "file is damaged or was edited: re-convert it")
