# %% [markdown]
# # 07 · Tokenizers, briefly
#
# **What you will see.** A model never reads text. It reads integers, token ids, and everything
# it learned is tied to what each id meant in its training text: row 1012 of the embedding is
# "what token 1012 means". The tokenizer is the fixed map from text to ids and back. Give the
# model the right text through the wrong map and every matrix product is still computed exactly,
# on the wrong question. So token ids must match before logits can.
#
# tinyrwkv ships two tokenizers (docs/tokenizers.md):
#
# | | World tokenizer | the shipped model's tokenizer |
# |---|---|---|
# | used by | every released RWKV-7 World model (65536 embedding rows) | the story model in `weights/` (4096 rows) |
# | file | `tinyrwkv/data/rwkv_vocab_v20230424.txt` | `weights/model.tokenizer.json` |
# | rule | greedy longest match over bytes (a trie) | byte-level BPE (merges applied in order) |
# | class | `tinyrwkv.WorldTokenizer` | `tinyrwkv.HFTokenizer` |
#
# 1. The World tokenizer's rule, on a trie built by hand, then on the real vocabulary.
# 2. The shipped BPE: its merges, and how many bytes one token covers on a real story.
# 3. Round trips, and the same text under both tokenizers.
# 4. The shipped model fed ids from the wrong tokenizer: its loss.
#
# **Prerequisites.** [00 · Quickstart](00_quickstart.ipynb). Bytes and UTF-8: a character is one
# to four bytes ("é" is 2, "你" is 3, "🙂" is 4).

# %%
import json
import re
import tempfile
import time
from pathlib import Path

import matplotlib.pyplot as plt
import numpy as np
from tokenizers import pre_tokenizers

import tinyrwkv
from tinyrwkv.loader import shipped_model_path
from tinyrwkv.tokenizer import WORLD_VOCAB_PATH, read_world_vocab
from tinyrwkv.trainer import train_tokenizer

CHAPTER_START = time.perf_counter()
WEIGHTS = shipped_model_path().parent                      # the repository's weights/ folder

# %% [markdown]
# ## 1 · The World tokenizer: greedy longest match over bytes
#
# The World vocabulary is a plain list of 65529 byte strings, no merges and no rules beyond one
# (docs/tokenizers.md §1.3): turn the text into its UTF-8 bytes; from the current position take
# the **longest** vocabulary entry that matches the bytes there; emit its id; jump past it;
# repeat. Every single byte is an entry, so the walk never gets stuck.
#
# A **trie** finds that longest entry in one walk. It is a tree with one edge per byte: the path
# from the root spells a byte string, and a node is marked when that string is a token. To
# tokenize, walk down from the root along the next bytes, remember the last marked node you
# passed, and stop when no edge continues. Here it is on a toy vocabulary: the 26 letters plus
# `ab`, `abc`, `cdef` and `abcdx`.

# %%
def build_trie(tokens):
    """A byte trie from {token id: bytes}. A node is a dict {byte: child node}; the key None
    marks "a token ends here" and holds that token's id."""
    root = {}
    for token_id, token in tokens.items():
        node = root
        for byte in token:
            node = node.setdefault(byte, {})
        node[None] = token_id
    return root


def trie_encode(trie, data):
    """Greedy longest match (official: rwkv/rwkv_tokenizer.py, TRIE_TOKENIZER.encodeBytes).

    From `start`, walk down the trie as far as the bytes allow, remembering the last node where
    a token ended; emit that token and start again right after it. Bytes read past the emitted
    token are read again by the next walk."""
    ids, start = [], 0
    while start < len(data):
        node, pos, best = trie, start, None
        while pos < len(data) and data[pos] in node:
            node = node[data[pos]]
            pos += 1
            if None in node:
                best = (node[None], pos)                 # the longest token so far
        if best is None:
            raise ValueError(f"byte {data[start]:#04x} is not a token: a vocabulary needs all 256")
        ids.append(best[0])
        start = best[1]
    return ids


toy_tokens = [bytes([c]) for c in b"abcdefghijklmnopqrstuvwxyz"] + [b"ab", b"abc", b"cdef", b"abcdx"]
toy_vocab = dict(enumerate(toy_tokens, start=1))          # {id: bytes}
toy_trie = build_trie(toy_vocab)
spell = lambda ids: "·".join(toy_vocab[i].decode() for i in ids)
for text in ("abcdef", "abcdy", "cdefab"):
    print(f"{text!r:10} -> {spell(trie_encode(toy_trie, text.encode()))}")

assert spell(trie_encode(toy_trie, b"abcdef")) == "abc·d·e·f"     # not the shorter ab·cdef
assert spell(trie_encode(toy_trie, b"abcdy")) == "abc·d·y"        # read "abcd", fell back to "abc"
assert spell(trie_encode(toy_trie, b"cdefab")) == "cdef·ab"

# %% [markdown]
# Two things to notice. `abcdef` becomes four tokens, `abc·d·e·f`, although `ab·cdef` would be
# two: greedy longest match is not the *shortest* segmentation. And in `abcdy` the walk read
# `abcd` (a prefix of `abcdx`), found no `y` edge, and fell back to the last token it had passed,
# `abc`. Neither is a flaw to fix: the World models were trained on exactly this segmentation,
# so a tokenizer that did "better" would hand them sequences they never saw.
#
# Now the real vocabulary, which ships inside the package. Each line is
# `<id> <python literal> <byte length>` (docs/tokenizers.md §1.1); `read_world_vocab` parses and
# validates it. The same two functions, on all 65529 tokens, must give the library's ids.

# %%
world_tokens = read_world_vocab(WORLD_VOCAB_PATH)           # world_tokens[id - 1] = bytes
print(f"{WORLD_VOCAB_PATH.name}: {len(world_tokens)} tokens, longest "
      f"{max(map(len, world_tokens))} bytes")
print("ids 1..5:", world_tokens[:5], "  id 262..266:", world_tokens[261:266])
assert len(world_tokens) == 65529 and max(map(len, world_tokens)) == 128
assert all(world_tokens[b] == bytes([b]) for b in range(256))   # ids 1..256 are the 256 bytes

world_trie = build_trie(dict(enumerate(world_tokens, start=1)))
world = tinyrwkv.WorldTokenizer()                           # the library's
my_world_encode = lambda text: trie_encode(world_trie, text.encode("utf-8"))

# The test vectors of docs/tokenizers.md §1.5, made with the official TRIE_TOKENIZER.
for text, ids in [("Hello world", [33155, 40213]), ("\n\n", [261]),
                  ("User: hi\n\nAssistant:", [24281, 59, 4571, 261, 5585, 41693, 59]),
                  ("1234567890", [632, 654, 676, 698, 710]),
                  ("你好，世界", [10464, 11685, 19137, 10267, 14610]), ("🙂", [3319, 2417])]:
    assert my_world_encode(text) == world.encode(text) == ids, text
print("our trie == WorldTokenizer == the official test vectors: OK")

# %% [markdown]
# A real story to work on: the samples in `weights/MODEL_CARD.md`, written by the shipped model
# itself. Greedy longest match means that at every token boundary, **no** longer vocabulary
# entry starts there. We check exactly that, at every token of the story, by brute force (the
# longest entry has 128 bytes).

# %%
card = (WEIGHTS / "MODEL_CARD.md").read_text(encoding="utf-8")
samples = card.split("Samples of the saved model")[1].split(":\n", 1)[1].split("\n## ")[0]
stories = [s.strip() for s in re.split(r"\n\n+", samples.strip())]   # one quoted block each
stories = ["\n".join(line[2:] for line in s.splitlines()).strip()       # drop the "> " quote marks
           for s in stories]
story = "\n\n".join(stories)
data = story.encode("utf-8")
print(f"{len(stories)} stories, {len(story)} characters, {len(data)} bytes")
print(stories[0][:200], "...")

world_ids = world.encode(story)
assert my_world_encode(story) == world_ids
vocab_set = set(world_tokens)
start = 0
for token_id in world_ids:
    n = len(world_tokens[token_id - 1])
    assert data[start:start + n] == world_tokens[token_id - 1]
    longer = (data[start:start + m] for m in range(n + 1, min(128, len(data) - start) + 1))
    assert not any(piece in vocab_set for piece in longer), (start, world_tokens[token_id - 1])
    start += n
assert start == len(data)
print(f"World: {len(world_ids)} tokens; at each of them no longer vocabulary entry matches: OK")
print("first tokens:", [world_tokens[i - 1].decode() for i in world_ids[:14]])

# %% [markdown]
# ## 2 · The shipped model's tokenizer: byte-level BPE
#
# The model in `weights/` has 4096 embedding rows, and its own tokenizer beside it,
# `weights/model.tokenizer.json`, which `tinyrwkv.load()` picks up (docs/tokenizers.md §3). It
# is a **byte-level BPE** trained by `tinyrwkv train` on the model's training stories:
#
# * The alphabet is the 256 bytes, each written as one printable character (GPT-2's table:
#   printable bytes stand for themselves, a space is `Ġ`, a newline `Ċ`).
# * Training started from those bytes and, 3839 times, **merged** the most frequent adjacent
#   pair in the training text into a new token. The merges are stored in the order they were
#   learned, and the new tokens got ids in that order too.
# * To encode, the text is first cut into words ("pre-tokens": a word with its leading space,
#   a run of digits, punctuation). Inside each word, apply the merges by rank: repeatedly merge
#   the adjacent pair that was learned **earliest**, until no learned pair is left.
#
# Like the World rule, this is deterministic, and a model is tied to it. Unlike the World rule,
# the tokenizer is not a free-standing dictionary: the merges *are* the tokenizer.

# %%
model = tinyrwkv.load()                                     # the shipped model (weights/)
bpe = model.tokenizer
print(model.config.n_layer, "layers,", model.config.vocab_size, "embedding rows; tokenizer", bpe)

spec = json.loads((WEIGHTS / "model.tokenizer.json").read_text(encoding="utf-8"))
vocab = spec["model"]["vocab"]                              # {token string: id}
merges = [tuple(m) for m in spec["model"]["merges"]]       # [(left, right)], earliest first
rank = {pair: i for i, pair in enumerate(merges)}
print(f"{len(vocab)} token strings, {len(merges)} merges, added tokens:",
      [t["content"] for t in spec["added_tokens"]])
print("the first 8 merges:", [" + ".join(m) for m in merges[:8]])
assert len(vocab) == 4096 and len(merges) == 3839 and vocab["<|endoftext|>"] == 0
assert bpe.eot_id == 0 and model.config.vocab_size == 4096
# ids: 0 end-of-text, 1..256 the bytes, then one new token per merge, in the merges' order
assert all(vocab[left + right] == 257 + i for i, (left, right) in enumerate(merges))

# %% [markdown]
# The merge loop, for one word, is a few lines. We let the `tokenizers` library do the
# pre-tokenization (its ByteLevel regex, as the file specifies), and apply the merges ourselves.

# %%
pre_tokenize = pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True).pre_tokenize_str


def bpe_word(word, trace=None):
    """Merge the adjacent pair learned earliest, until no learned pair is left.
    word: a pre-token in byte-level characters, e.g. "ĠTimmy". Returns its token strings."""
    parts = list(word)                                      # one character per byte
    while len(parts) > 1:
        best, i = min((rank.get(pair, len(rank)), i) for i, pair in enumerate(zip(parts, parts[1:])))
        if best == len(rank):                               # no adjacent pair was ever learned
            break
        parts[i:i + 2] = [parts[i] + parts[i + 1]]
        if trace is not None:
            trace.append(f"merge #{best:<4} -> {'·'.join(parts)}")
    return parts


def my_bpe_encode(text):
    return [vocab[piece] for word, _ in pre_tokenize(text) for piece in bpe_word(word)]


print("pre-tokens:", [w for w, _ in pre_tokenize("Timmy's mom called him.")])
steps = []
print(bpe_word("Ġsurfielded", steps))
print("\n".join(steps))

assert "Ġsurfielded" not in vocab and len(bpe_word("Ġsurfielded")) == 4
assert len(bpe.encode(" Timmy")) == 1 and len(world.encode(" Timmy")) == 2   # ' Tim' + 'my'

bpe_ids = bpe.encode(story)
assert my_bpe_encode(story) == bpe_ids
print(f"our merge loop == HFTokenizer.encode on the whole story ({len(bpe_ids)} tokens): OK")

# %% [markdown]
# `surfielded` (a word an earlier shipped model made up in a sample) is not in the vocabulary; BPE
# still spells it, out of pieces it learned from real words. Words that are common in the
# training stories became single tokens: ` Timmy` is one BPE token (id 471), but two World
# tokens, ` Tim` and `my`.
#
# **How many bytes does a token cover?** That is the tokenizer's compression, and it decides
# how much text fits in a context of T tokens. On the model's own stories, its BPE with 4096
# tokens is compared with the World tokenizer's 65529. The figure shows how long the tokens
# are, in bytes: in each vocabulary, and as actually used on the story.

# %%
bpe_token_bytes = [bpe.decode_bytes([i]) for i in range(1, bpe.vocab_size)]   # id 0 has none
bytes_per_token = {"shipped BPE (4096)": len(data) / len(bpe_ids),
                   "World (65529)": len(data) / len(world_ids)}
for name, bpt in bytes_per_token.items():
    print(f"{name:20} {bpt:.2f} bytes per token on the story")
used = {"shipped BPE (4096)": [len(bpe.decode_bytes([i])) for i in bpe_ids],
        "World (65529)": [len(world_tokens[i - 1]) for i in world_ids]}
in_vocab = {"shipped BPE (4096)": [len(b) for b in bpe_token_bytes],
            "World (65529)": [len(b) for b in world_tokens]}

fig, axes = plt.subplots(1, 2, figsize=(12, 3.6))
bins = np.arange(1, 18) - 0.5
for ax, counts, title in ((axes[0], in_vocab, "tokens in the vocabulary"),
                          (axes[1], used, "tokens used on the model card's stories")):
    for shift, (name, lengths) in zip((-0.2, 0.2), counts.items()):
        hist, _ = np.histogram(np.minimum(lengths, 16), bins=bins)
        label = name + (f": {bytes_per_token[name]:.2f} bytes/token" if counts is used else "")
        ax.bar(np.arange(1, 17) + shift, hist / hist.sum(), width=0.4, label=label)
    ax.set_xlabel("token length in bytes (16 = 16 or more)")
    ax.set_title(title)
axes[0].set_ylabel("fraction of tokens")
axes[1].legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# On this text the small BPE does about as well as a vocabulary sixteen times larger, because it
# was trained on exactly this kind of text. The World vocabulary is built for many languages,
# code and rare words: more than a quarter of its entries are not ASCII at all, and its tokens
# are longer on average (left), but a children's story has no use for them. A tokenizer is a
# compression scheme fitted to a corpus.

# %%
bpt_bpe, bpt_world = bytes_per_token.values()
non_ascii = np.mean([not t.isascii() for t in world_tokens])
print(f"World entries that are not ASCII: {non_ascii:.1%}; mean token length in the vocabulary: "
      + ", ".join(f"{name} {np.mean(lengths):.2f} bytes" for name, lengths in in_vocab.items()))
assert 3.5 < bpt_bpe < 5.0          # the model card measured 4.06 on the whole training text
assert abs(bpt_bpe - bpt_world) < 0.15 * bpt_world   # "about as well": within 15 %
assert non_ascii > 0.25
assert np.mean(in_vocab["World (65529)"]) > np.mean(in_vocab["shipped BPE (4096)"])

# %% [markdown]
# ## 3 · Round trips, and one text, two sets of ids
#
# Both tokenizers are **lossless**: `decode(encode(s)) == s` for any string, because both work
# on the raw UTF-8 bytes (the World tokenizer has no normaliser at all; the shipped BPE's file
# has `"normalizer": null`). Characters outside the training text still work: they fall back to
# single bytes, so one character can be several tokens, and a single such token is not valid
# UTF-8 on its own (`decode_bytes` gives the exact bytes; generation waits for a whole
# character before printing, docs/tokenizers.md §1.4).

# %%
texts = ["Once upon a time, there was a little girl named Lily.", "naïve café, Ünïcödé",
         "你好，世界", "🙂 and 🐕", "tabs\tand\nnew lines\n\n", "  two spaces, 1234567890",
         story]
for text in texts:
    for tok in (world, bpe):
        assert tok.decode(tok.encode(text)) == text, (tok.name, text)
        assert tok.decode_bytes(tok.encode(text)) == text.encode("utf-8")
print(f"decode(encode(s)) == s for {len(texts)} strings under both tokenizers: OK")

for text in ("é", "你", "🙂"):
    ids = bpe.encode(text)
    print(f"{text!r}: {len(text.encode())} bytes -> BPE {len(ids)} tokens {ids}, "
          f"first token alone: {bpe.decode_bytes(ids[:1])!r} -> {bpe.decode(ids[:1])!r};"
          f"  World {len(world.encode(text))} token(s)")
assert len(bpe.encode("🙂")) == 4 and bpe.decode(bpe.encode("🙂")[:1]) == "\ufffd"

# %% [markdown]
# One exception: the BPE knows `<|endoftext|>` as a *special token* (id 0, the separator between
# training stories), so that text becomes id 0, which decodes to nothing. The World tokenizer
# has no special-token parsing: for it, the same 13 characters are ordinary bytes
# (docs/tokenizers.md §1.3).

# %%
print("BPE:  ", bpe.encode("<|endoftext|>"), "->", repr(bpe.decode(bpe.encode("<|endoftext|>"))))
print("World:", world.encode("<|endoftext|>"))
assert bpe.encode("<|endoftext|>") == [0] and bpe.decode([0]) == ""
assert world.decode(world.encode("<|endoftext|>")) == "<|endoftext|>"

# %% [markdown]
# The same sentence under the two tokenizers. Here both happen to cut it into the same thirteen
# pieces, and still not one id agrees: an id is only a row number, and what row 410 means is
# decided by the tokenizer the model was trained with.

# %%
sentence = "Once upon a time, there was a little girl named Lily."
pieces = {}
for tok in (bpe, world):
    ids = tok.encode(sentence)
    pieces[tok.name] = [tok.decode([i]) for i in ids]
    print(f"{tok.name:28} {len(ids):2} tokens  {ids}")
    print(" " * 32, pieces[tok.name])
assert pieces[bpe.name] == pieces[world.name]                      # the same cuts ...
assert all(a != b for a, b in zip(bpe.encode(sentence), world.encode(sentence)))   # ... no id alike

# %% [markdown]
# ## 4 · The wrong ids: every number right, every answer wrong
#
# We measure how surprised the shipped model is by a text, three ways. Each time the model reads
# id 0 (end-of-text, which starts every training story) and then the text's ids, and at each
# position we take the negative log-probability of the next id. Different tokenizers cut the
# text into different numbers of tokens, so the fair unit is **bits per byte** of the text:
# total bits over the text's 639 bytes.
#
# 1. **Its own tokenizer.**
# 2. **Another BPE.** Same algorithm, same byte alphabet, same size (4096), but trained on other
#    text: tinyrwkv's own documentation. Every id is in range, so nothing complains. This is
#    what happens when a `tokenizer.json` from another training run sits beside the weights.
# 3. **Its own tokenizer, cut differently.** The same vocabulary, but every byte as its own
#    token (ids of the 256 byte tokens). `decode` gives back exactly the same text, and still the
#    model never saw text cut this way. This is the BPE version of the World lesson above: the
#    segmentation is part of what the model learned.
#
# The World ids cannot even be tried: they go up to 65529 and the model has 4096 rows, so
# `forward` refuses them. Loud is good.

# %%
try:
    model.forward(world.encode(sentence))
    raise AssertionError("World ids should not fit a 4096-row model")
except ValueError as e:
    print("World ids -> ValueError:", e)

docs = Path(tinyrwkv.__file__).resolve().parents[1] / "docs"
doc_text = [p.read_text(encoding="utf-8") for p in sorted(docs.glob("*.md"))]
with tempfile.TemporaryDirectory() as tmp:
    train_tokenizer(doc_text, 4096, Path(tmp) / "other.tokenizer.json")
    other = tinyrwkv.HFTokenizer(Path(tmp) / "other.tokenizer.json")
byte_ids = lambda text: [vocab[ch] for word, _ in pre_tokenize(text) for ch in word]

tokenizations = {"own BPE": bpe.encode(story), "another BPE": other.encode(story),
                 "own BPE, byte by byte": byte_ids(story)}
assert other.vocab_size == model.config.vocab_size == 4096               # same size
assert other.decode(tokenizations["another BPE"]) == story
assert bpe.decode(tokenizations["own BPE, byte by byte"]) == story     # decodes to the same text!
assert all(max(ids) < model.config.vocab_size for ids in tokenizations.values())   # all "valid"
print("the same sentence, own vs another BPE:", bpe.encode(sentence)[:8], other.encode(sentence)[:8])

# %% [markdown]
# The loss, with the model's full output: logits at every position, `(T, V)`.

# %%
def log_softmax(logits):
    z = logits - logits.max(axis=-1, keepdims=True)               # (T, V)
    return z - np.log(np.exp(z).sum(axis=-1, keepdims=True))


def bits_per_token(ids):
    """Bits the model needs for each of `ids`, read after end-of-text. (T,)"""
    logits, _ = model.forward([0] + ids, full_output=True)        # (T + 1, V)
    logp = log_softmax(logits[:-1].astype(np.float64))            # predictions for ids, (T, V)
    return -logp[np.arange(len(ids)), ids] / np.log(2)


results = {}
for name, ids in tokenizations.items():
    bits = bits_per_token(ids)
    logits, _ = model.forward([0] + ids[:36])                      # what comes after 36 tokens?
    results[name] = dict(bits=bits, bpb=bits.sum() / len(data),
                         next=bpe.decode([int(np.argmax(logits))]))
    print(f"{name:22} {len(ids):5} tokens  {bits.mean():5.2f} bits/token  "
          f"{results[name]['bpb']:.3f} bits/byte  after 36 tokens it expects {results[name]['next']!r}")
print("the story's 37th BPE token is", repr(bpe.decode(tokenizations["own BPE"][36:37])))

# %% [markdown]
# The figure shows the running total of bits against the bytes of the text read so far; each
# line's slope is its bits per byte.

# %%
fig, ax = plt.subplots(figsize=(9, 3.8))
for name, ids in tokenizations.items():
    ends = np.cumsum([len(bpe.decode_bytes([i]) if name != "another BPE" else other.decode_bytes([i]))
                      for i in ids])                              # byte position after each token
    ax.plot(ends, np.cumsum(results[name]["bits"]),
            label=f"{name}: {results[name]['bpb']:.2f} bits/byte")
ax.set_xlabel("bytes of the story read")
ax.set_ylabel("total bits (−log₂ p)")
ax.set_title("The shipped model on its own stories, through three tokenizations")
ax.legend()
plt.tight_layout()
plt.show()

# %% [markdown]
# With its own tokenizer the model needs two thirds of a bit per byte: these are its own stories
# (the model card reports 0.830 bits per byte on held-out stories), and after "My heart has been
# my" it expects " friend", the word that follows. Another BPE's ids cost it nearly ten times as
# many bits: to the model they are a sequence of unrelated words. The byte-by-byte cut decodes to
# exactly the same text and is worse still: its training text was always cut by the BPE, so a
# word spelled out one byte at a time is new to it. Nothing crashed, no number was computed wrongly, and `decode` even gave
# the right text back. The only check that catches this is one that looks at what the model
# does: a loss on known text, or logits compared with another implementation on the *same ids*.

# %%
own, wrong, bytewise = (results[n]["bpb"] for n in tokenizations)
# Bounds with wide margins (measured: 0.67, 6.3 and 11.5 bits/byte): "another BPE" is trained
# here by the installed tokenizers library, whose version may move its ids a little.
assert own < 1.0                    # its own samples: below the 1.0 bits/byte of early training
assert wrong > 5 * own              # a mismatched vocabulary: more than five times the bits
assert bytewise > 5 * own           # the right vocabulary, the wrong cuts: the same
assert results["own BPE"]["next"] == bpe.decode(tokenizations["own BPE"][36:37]) == " friend"
assert results["another BPE"]["next"] != " friend" != results["own BPE, byte by byte"]["next"]

# %% [markdown]
# ## Summary
#
# * A tokenizer is part of the model. The World tokenizer is a dictionary of 65529 byte strings
#   and one rule, greedy longest match, done with a byte trie; the shipped model's tokenizer is a
#   byte-level BPE whose 3839 ordered merges *are* the tokenizer.
# * Both are lossless on any UTF-8 text; characters they did not learn fall back to bytes.
# * Ids from another tokenizer are either refused (too large for the embedding: `forward` and
#   `get_tokenizer`'s `check_fits` say so) or, worse, accepted and silently meaningless. Even
#   the right vocabulary cut the wrong way costs the model many times the bits.
# * So: load the tokenizer that shipped with the weights (`tinyrwkv.load` looks beside them,
#   docs/tokenizers.md §5), and when comparing two implementations, compare logits on the same
#   ids, never on the same text through two tokenizers.
#
# The claims, once more in one place:

# %%
assert spell(trie_encode(toy_trie, b"abcdef")) == "abc·d·e·f"
assert my_world_encode(story) == world.encode(story) and my_bpe_encode(story) == bpe.encode(story)
assert own < 1.0 and wrong > 5 * own and bytewise > 5 * own
print(f"chapter ran in {time.perf_counter() - CHAPTER_START:.1f} s")
