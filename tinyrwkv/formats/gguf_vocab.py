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


def add_tokenizer(writer, tok, vocab_size, gguf):
    """Put `tok` (a WorldTokenizer or HFTokenizer) into a GGUFWriter's metadata."""
    from ..tokenizer import HFTokenizer, WorldTokenizer
    if isinstance(tok, WorldTokenizer):
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


def read_tokenizer(reader, value):
    """The tokenizer a GGUFReader's metadata describes, or None. `value(key)`: a scalar field."""
    model = value("tokenizer.ggml.model")
    if model == "rwkv":
        from ..tokenizer import WorldTokenizer
        return WorldTokenizer()
    if model == "gpt2":
        from tokenizers import Tokenizer, decoders, models, pre_tokenizers
        from ..tokenizer import HFTokenizer
        f = reader.fields["tokenizer.ggml.tokens"]
        tokens = [bytes(f.parts[i]).decode() for i in f.data]
        m = reader.fields["tokenizer.ggml.merges"]
        merges = [tuple(bytes(m.parts[i]).decode().split(" ", 1)) for i in m.data]
        tok = Tokenizer(models.BPE({t: i for i, t in enumerate(tokens)}, merges))
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        tmp = Path(tempfile.mkdtemp()) / "gguf.tokenizer.json"      # HFTokenizer reads files
        tok.save(str(tmp))
        return HFTokenizer(tmp)
    return None
