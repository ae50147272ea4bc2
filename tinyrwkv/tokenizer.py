"""Tokenizers for RWKV-7 models: text <-> token ids.

Two families of released RWKV-7 checkpoints use two different tokenizers (docs/tokenizers.md):

* **World models** (65536 embedding rows) use the RWKV World tokenizer, vocabulary file
  ``rwkv_vocab_v20230424.txt`` (shipped in ``tinyrwkv/data/``, Apache-2.0, see the licence file
  next to it). It is not BPE and has no merges; it is a plain dictionary of 65529 byte strings:

  - Text is turned into its **UTF-8 bytes**, with **no normalisation** (no NFC, no lower-casing,
    no prefix space) and **no special-token parsing**: the text "<|endoftext|>" is just 13 bytes.
  - Starting at the first byte, take the **longest token that matches the bytes here**, emit its
    id, jump past it, repeat. Every single byte is a token (ids 1..256 are bytes 0x00..0xFF), so
    this never gets stuck. Greedy longest match is not "optimal" (it can use more tokens than
    necessary), but it is what the models were trained on, so we must reproduce it exactly.
  - **Id 0 is end-of-text** ("<|endoftext|>"): it has no bytes and is never produced by
    ``encode``; the model emits it to end a document. Ids 65530..65535 are unused padding
    rows of the embedding.
  - Decoding is concatenating each id's bytes and decoding the result as UTF-8.

  Official implementation: pip ``rwkv`` 0.8.32, ``rwkv/rwkv_tokenizer.py``: class
  ``TRIE_TOKENIZER`` (``__init__`` parses the file, ``encodeBytes`` is the greedy loop,
  ``decodeBytes``/``decode``), with class ``TRIE`` (``add``, ``find_longest``) as the byte trie.
  Identical copies live in BlinkDL/ChatRWKV ``rwkv_pip_package/src/rwkv/`` and (as a table
  tokenizer with the same output) in the BlinkDL/RWKV-LM ``RWKV-v7`` demos. ``WorldTokenizer``
  below reproduces its ids exactly (tests/test_tokenizer.py checks this on ~0.7 MB of mixed
  text, tinyshakespeare and random text);
  the deliberate differences are listed in its docstring.

* **Pile models** (50277 ids, embedding padded to 50304 rows) use the GPT-NeoX 20B BPE tokenizer
  ``20B_tokenizer.json`` (from BlinkDL/ChatRWKV), a Hugging Face ``tokenizers`` file.
  ``HFTokenizer`` wraps any such ``tokenizer.json``; models we train ourselves ship one beside
  the weights. This is the only place that imports ``tokenizers``, and only lazily (STYLE R14).

``get_tokenizer(vocab_size, tokenizer_path, model_path)`` picks the right one for a model and
refuses a tokenizer whose ids do not fit the model's embedding.

All tokenizers share one small interface: ``name``, ``vocab_size``, ``eot_id``,
``encode(text) -> list[int]``, ``decode_bytes(ids) -> bytes``, ``decode(ids, errors) -> str``.
Generation should decode with ``decode_bytes`` and buffer incomplete UTF-8 itself, because one
character (e.g. an emoji) may be spread over several tokens.
"""

from __future__ import annotations

import ast
import json
from contextlib import contextmanager
from functools import lru_cache
from pathlib import Path

import numpy as np

__all__ = ["TokenizerError", "WorldTokenizer", "HFTokenizer", "get_tokenizer", "check_fits"]

# The World vocabulary that ships with this package.
WORLD_VOCAB_PATH = Path(__file__).parent / "data" / "rwkv_vocab_v20230424.txt"
# The World models' embedding has 65536 rows although the file's ids stop at 65529 (docs/tokenizers.md §1).
WORLD_EMBEDDING_ROWS = 65536
# HF vocabulary sizes of the Pile (GPT-NeoX 20B tokenizer) models: 50277 ids in the tokenizer,
# padded to 50304 (a multiple of 64) in the checkpoints (docs/tokenizers.md §2).
PILE_VOCAB_SIZES = (50277, 50304)


class TokenizerError(ValueError):
    """A problem with a tokenizer, its file, or the ids/text given to it.

    Subclasses ValueError, so existing ``except ValueError`` code still catches it. The message
    always says what is wrong and how to fix it.
    """


def _utf8(text) -> bytes:
    """UTF-8 bytes of ``text``, with a TokenizerError (not a bare UnicodeEncodeError) for bad input."""
    if not isinstance(text, str):
        raise TokenizerError(
            f"encode expects a str, got {type(text).__name__}; "
            "decode bytes to str first (e.g. data.decode('utf-8'))"
        )
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as e:
        # Only lone surrogates (U+D800..U+DFFF) cannot be written as UTF-8.
        bad = text[e.start]
        raise TokenizerError(
            f"text contains the lone surrogate U+{ord(bad):04X} at index {e.start}, which has no "
            "UTF-8 encoding; fix the text (e.g. read files with errors='replace', or re-pair "
            "surrogates with s.encode('utf-16', 'surrogatepass').decode('utf-16'))"
        ) from None


def _check_id(token_id, max_id: int, tokenizer_name: str) -> int:
    """Return ``token_id`` as an int if it is an integer in 0..max_id, else raise TokenizerError.

    numpy integers are accepted (sampling code returns them); bools and floats are not, because
    they almost always mean a bug in the caller.
    """
    is_int = isinstance(token_id, (int, np.integer)) and not isinstance(token_id, (bool, np.bool_))
    if not is_int or not 0 <= token_id <= max_id:
        raise TokenizerError(
            f"token id {token_id!r} is not valid for tokenizer {tokenizer_name}: ids are "
            f"integers in 0..{max_id}; check that the ids come from a model that uses this "
            "tokenizer (see get_tokenizer)"
        )
    return int(token_id)


def _id_list(ids) -> list:
    """Accept any iterable of ids (list, tuple, numpy array), but not a lone id or a string."""
    if isinstance(ids, (int, np.integer, str, bytes)):
        raise TokenizerError(
            f"expected a sequence of token ids, got {type(ids).__name__} {ids!r}; "
            "wrap a single id in a list, e.g. decode([id])"
        )
    return list(ids)


# ---------------------------------------------------------------------------------------------
# World tokenizer
# ---------------------------------------------------------------------------------------------


def read_world_vocab(path) -> list[bytes]:
    """Parse a World-format vocabulary file; return the tokens' bytes, index = id - 1.

    Each line is ``<id> <python literal> <byte length>``. The literal may itself contain spaces,
    so (like ``TRIE_TOKENIZER.__init__``) we split at the *first* and the *last* space. The
    literal is a ``str`` repr (its UTF-8 bytes are the token; e.g. ``'\\n\\n'``) or a ``bytes``
    repr for tokens that are not whole characters (e.g. ``b'\\xe5\\xbe'``). The official code uses
    ``eval`` for this, which would run any code a tampered file contains; ``ast.literal_eval``
    accepts literals only.

    The packaged file has CRLF line ends (the copy in the git repos has LF; docs/tokenizers.md §1.1),
    so we split on "\\n" and drop one trailing "\\r". We do not use ``str.splitlines``: it also
    splits at characters such as U+2028 or U+0085, which a future vocabulary could contain raw.

    Checks (each failure names the line): three fields; ids run 1, 2, 3, ... in order; the
    literal is a str or bytes literal; its UTF-8 length equals the stated length; no empty or
    duplicate tokens; and, over the whole file, every single byte 0x00..0xFF is a token (the
    greedy encoder relies on that to always make progress).
    """
    path = Path(path)
    try:
        text = path.read_bytes().decode("utf-8")
    except FileNotFoundError:
        raise TokenizerError(
            f"vocabulary file {str(path)!r} does not exist; pass the path of a World vocabulary "
            "such as rwkv_vocab_v20230424.txt, or leave vocab_path unset for the packaged one"
        ) from None
    except UnicodeDecodeError as e:
        raise TokenizerError(
            f"vocabulary file {str(path)!r} is not UTF-8 text (bad byte at offset {e.start}); "
            "is it really a World vocabulary (.txt)?"
        ) from None

    lines = text.split("\n")
    if lines and lines[-1] == "":
        lines.pop()  # the final line end, not an empty line
    tokens: list[bytes] = []
    seen: dict[bytes, int] = {}  # bytes -> id, to reject duplicates
    for line_no, line in enumerate(lines, start=1):
        if line.endswith("\r"):
            line = line[:-1]

        def bad(problem: str) -> TokenizerError:
            return TokenizerError(
                f"{path.name} line {line_no}: {problem} (line is {line[:80]!r}); expected "
                "'<id> <python str or bytes literal> <byte length>' with ids 1, 2, 3, ... in "
                "order; fix or re-download the vocabulary file"
            )

        first, last = line.find(" "), line.rfind(" ")
        if first < 0 or last == first:
            raise bad("expected three space-separated fields")
        id_text, literal, length_text = line[:first], line[first + 1 : last], line[last + 1 :]
        if not (id_text + length_text).isascii() or not id_text.isdigit() or not length_text.isdigit():
            raise bad("the id and the byte length must be decimal integers")
        if int(id_text) != len(tokens) + 1:
            raise bad(f"id {int(id_text)} is out of order, expected id {len(tokens) + 1}")
        try:
            value = ast.literal_eval(literal)
        except (ValueError, SyntaxError, MemoryError, RecursionError):
            raise bad("the token is not a valid Python literal") from None
        if isinstance(value, str):
            try:
                value = value.encode("utf-8")
            except UnicodeEncodeError:
                raise bad("the token string contains a lone surrogate") from None
        elif not isinstance(value, bytes):
            raise bad(f"the token is a {type(value).__name__} literal, not str or bytes")
        if len(value) != int(length_text):
            raise bad(f"the token has {len(value)} UTF-8 bytes but the line says {length_text}")
        if not value:
            raise bad("the token is empty")
        if value in seen:
            raise bad(f"the token {value!r} already appeared as id {seen[value]}")
        seen[value] = len(tokens) + 1
        tokens.append(value)

    missing = [b for b in range(256) if bytes([b]) not in seen]
    if missing:
        raise TokenizerError(
            f"{path.name}: {len(missing)} single bytes are not tokens (first: 0x{missing[0]:02X}); "
            "a World vocabulary must contain all 256 single bytes so that any text can be encoded"
        )
    return tokens


class WorldTokenizer:
    """The RWKV World tokenizer: greedy longest match over UTF-8 bytes (see the module docstring).

    Reproduces pip ``rwkv`` ``rwkv/rwkv_tokenizer.py`` ``TRIE_TOKENIZER.encode`` id for id.
    Deliberate differences from the official class:

    * id 0 (end-of-text) decodes to b"" (official: KeyError); any other unknown id raises
      TokenizerError naming the id (official: KeyError).
    * ``decode`` replaces each invalid UTF-8 sequence with U+FFFD (``errors="replace"``) and keeps
      the rest; the official ``decode`` returns a single "\\ufffd" for the *whole* call as soon as
      anything is invalid (ChatRWKV uses that to hold back half-printed characters). Pass
      ``errors="strict"`` to get an exception instead.
    * the vocabulary is parsed with ``ast.literal_eval`` instead of ``eval``, and validated.
    * the trie is nested dicts instead of one 256-slot list per node: same walk, about an
      order of magnitude less memory, and somewhat faster in CPython.

    Args:
        vocab_path: a World-format vocabulary file; default the packaged rwkv_vocab_v20230424.txt.
    """

    eot_id = 0  # end-of-text / document separator; has no bytes (docs/tokenizers.md §1)

    def __init__(self, vocab_path=None):
        path = WORLD_VOCAB_PATH if vocab_path is None else Path(vocab_path)
        tokens = read_world_vocab(path)  # tokens[id - 1] = bytes of that id
        self.name = path.stem  # "rwkv_vocab_v20230424" for the packaged file
        self.max_id = len(tokens)  # largest valid id; 65529 for the World vocabulary
        # Embedding rows a model needs: the World models pad 65530 ids to 65536 rows. For any
        # other (e.g. a home-made) vocabulary we can only say "one row per id".
        self.vocab_size = WORLD_EMBEDDING_ROWS if self.max_id == 65529 else self.max_id + 1
        self._id_to_bytes: list[bytes] = [b""] + tokens  # index = id; id 0 has no bytes

        # Byte trie for the longest-match walk (official: class TRIE, built in
        # TRIE_TOKENIZER.__init__). A node is a dict {next byte: [child node, token id]}; the
        # token id is that of the token spelled by the path from the root to the child, or 0 if
        # no token ends there (0 can double as "none" because end-of-text has no bytes).
        self._trie: dict[int, list] = {}
        for token_id, token in enumerate(tokens, start=1):
            node = self._trie
            for byte in token:
                if byte not in node:
                    node[byte] = [{}, 0]
                entry = node[byte]
                node = entry[0]
            entry[1] = token_id

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text`` (official: ``TRIE_TOKENIZER.encode``). No end-of-text is added."""
        return self.encode_bytes(_utf8(text))

    def encode_bytes(self, data: bytes) -> list[int]:
        """Token ids of raw bytes by greedy longest match (official: ``TRIE_TOKENIZER.encodeBytes``).

        From position ``start`` we walk down the trie byte by byte, remembering the last node at
        which a token ends; when the walk falls off the trie (or the data ends) we emit that
        token and restart right after it. Bytes read past the emitted token are read again by
        the next walk, exactly as ``TRIE.find_longest`` does. The loop is written flat, with
        locals only, because it is the hot path of tokenising a corpus.
        """
        if not isinstance(data, (bytes, bytearray)):
            raise TokenizerError(f"encode_bytes expects bytes, got {type(data).__name__}")
        root = self._trie
        ids: list[int] = []
        n = len(data)
        start = 0
        while start < n:
            # The first byte always matches: every single byte is a token (checked at load).
            node, best_id = root[data[start]]
            pos = best_end = start + 1
            while pos < n:
                entry = node.get(data[pos])
                if entry is None:  # no token continues with this byte: the walk is over
                    break
                node, token_id = entry
                pos += 1
                if token_id:  # a token ends here: the longest match so far
                    best_id, best_end = token_id, pos
            ids.append(best_id)
            start = best_end
        return ids

    def token_bytes(self, token_id) -> bytes:
        """The bytes of one token id (b"" for end-of-text, id 0)."""
        return self._id_to_bytes[_check_id(token_id, self.max_id, self.name)]

    def decode_bytes(self, ids) -> bytes:
        """Concatenated bytes of ``ids`` (official: ``TRIE_TOKENIZER.decodeBytes``).

        The result need not be valid UTF-8: a token can end in the middle of a character.
        """
        table, max_id, name = self._id_to_bytes, self.max_id, self.name
        return b"".join([table[_check_id(i, max_id, name)] for i in _id_list(ids)])

    def decode(self, ids, errors: str = "replace") -> str:
        """Text of ``ids``: UTF-8 decode of ``decode_bytes(ids)``; ``errors`` goes to bytes.decode.

        Differs from the official ``decode`` on invalid UTF-8: see the class docstring.
        """
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def __repr__(self) -> str:
        return f"WorldTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, max_id={self.max_id})"


# ---------------------------------------------------------------------------------------------
# Hugging Face tokenizer.json (Pile 20B tokenizer, our own trained tokenizers)
# ---------------------------------------------------------------------------------------------


def _byte_level_char_to_byte() -> dict[str, int]:
    """Inverse of the GPT-2 ``bytes_to_unicode`` table used by ByteLevel BPE tokenizers.

    ByteLevel BPE (GPT-2, GPT-NeoX 20B) stores every token as a string of printable characters,
    one per byte: the printable bytes ``!``..``~``, ``¡``..``¬``, ``®``..``ÿ`` stand for
    themselves, and the remaining 68 bytes (controls, space, 0x7F..0xA0, 0xAD) are given the
    characters U+0100, U+0101, ... in increasing byte order (so space 0x20 is "Ġ" U+0120 and
    "\\n" is "Ċ" U+010A). Source: openai/gpt-2 ``src/encoder.py`` ``bytes_to_unicode``; HF
    tokenizers ``pre_tokenizers/byte_level.rs`` uses the same table.
    """
    printable = [*range(ord("!"), ord("~") + 1),  # 0x21..0x7E
                 *range(ord("¡"), ord("¬") + 1),  # 0xA1..0xAC
                 *range(ord("®"), ord("ÿ") + 1)]  # 0xAE..0xFF
    char_to_byte = {chr(b): b for b in printable}
    next_code = 256
    for b in range(256):
        if b not in printable:
            char_to_byte[chr(next_code)] = b
            next_code += 1
    return char_to_byte


def is_rust_panic(error) -> bool:
    """Whether ``error`` is a Rust panic surfacing in Python (``pyo3_runtime.PanicException``).

    The tokenizers library panics, rather than raising, on some crafted files: a tokenizer.json
    whose regex backtracks without end (e.g. a Split pre-tokenizer ``(a*)*$``) panics inside
    ``encode`` once Oniguruma gives up ("retry-limit-in-match over"). PanicException derives from
    BaseException, not Exception, so ``except Exception`` misses it; and ``pyo3_runtime`` cannot
    be imported, so it is recognised by its class's name and module.
    """
    return any(cls.__name__ == "PanicException" and cls.__module__ == "pyo3_runtime"
               for cls in type(error).__mro__)


def _first_line(error, limit=200) -> str:
    text = str(error).strip().splitlines()
    return (text[0][:limit] if text else type(error).__name__)


@contextmanager
def tokenizers_failures(path, problem):
    """Inside the block, whatever the tokenizers library raises (a bare Exception for a bad
    file) or panics with (is_rust_panic) becomes a TokenizerError naming ``path``, the
    ``problem`` ("encoding text failed"), the library's reason and the fix. KeyboardInterrupt,
    SystemExit and our own errors pass through.

    Rust's panic hook has already printed its message (and a backtrace when RUST_BACKTRACE is
    set) on stderr when the panic reaches Python; a library cannot silence it.
    """
    try:
        yield
    except BaseException as e:
        panic = is_rust_panic(e)
        if isinstance(e, TokenizerError) or not (panic or isinstance(e, Exception)):
            raise
        hint = ("the file is damaged or crafted (e.g. a regex in its pre_tokenizer or "
                "normalizer that backtracks without end): " if panic else "")
        raise TokenizerError(
            f"{path}: {problem}: the tokenizers library "
            f"{'crashed (a Rust panic)' if panic else 'failed'}: {_first_line(e)}; {hint}pass a "
            "tokenizer.json written by the tokenizers library (the model's own), or a World "
            "vocabulary .txt"
        ) from None


def open_tokenizers_file(path):
    """A Hugging Face ``tokenizers.Tokenizer`` read from ``path``, or a TokenizerError naming the
    file and the fix (missing file, tokenizers not installed, not JSON, a JSON the library
    rejects, a library panic)."""
    path = Path(path)
    if not path.is_file():
        raise TokenizerError(
            f"tokenizer file {str(path)!r} does not exist; pass the path of a Hugging Face "
            "tokenizer.json (for Pile models: 20B_tokenizer.json from BlinkDL/ChatRWKV)"
        )
    try:
        import tokenizers  # lazy: only HF-tokenizer users need it (STYLE R14)
    except ImportError:
        raise TokenizerError(
            f"reading {path.name} needs the Hugging Face tokenizers package: "
            "pip install tokenizers"
        ) from None
    text = _checked_tokenizer_json(path)
    with tokenizers_failures(path, "not a valid Hugging Face tokenizer.json"):
        return tokenizers.Tokenizer.from_str(text)


# The largest tokenizer.json we read: the Pile 20B tokenizer is 2.4 MB, the largest public BPE
# vocabularies (~256k tokens) about 20 MB.
MAX_TOKENIZER_BYTES = 64 * 2**20


def _checked_tokenizer_json(path):
    """The text of tokenizer.json `path`, after the checks the tokenizers library does not make
    before it allocates: a bounded size, and token ids that are dense. The library sizes its id
    table by the largest id, so a 1 KB file giving one token the id 2**31 makes it reserve tens
    of GB (under a memory limit the process aborts). Real files number their tokens 0..n-1
    (added tokens continue the count); ids up to 2n + 1024 are accepted."""
    def bad(problem):
        return TokenizerError(f"{path.name} is not a usable Hugging Face tokenizer.json: "
                              f"{problem}; pass a tokenizer.json written by tokenizers")
    if path.stat().st_size > MAX_TOKENIZER_BYTES:
        raise bad(f"it is {path.stat().st_size:,} bytes, more than any real tokenizer "
                  f"({MAX_TOKENIZER_BYTES:,})")
    raw = path.read_bytes()
    try:
        text = raw.decode("utf-8")
        spec = json.loads(text)
    except (UnicodeDecodeError, ValueError, RecursionError) as e:
        raise bad(f"it is not JSON ({type(e).__name__})") from None
    model = spec.get("model") if isinstance(spec, dict) else None
    vocab = model.get("vocab") if isinstance(model, dict) else None
    ids = list(vocab.values()) if isinstance(vocab, dict) else []      # BPE, WordPiece, WordLevel
    added = spec.get("added_tokens") if isinstance(spec, dict) else None
    if isinstance(added, list):
        ids += [t.get("id") for t in added if isinstance(t, dict)]
    count = len(ids) + (len(vocab) if isinstance(vocab, list) else 0)    # Unigram: a list
    limit = 2 * count + 1024
    wrong = next((i for i in ids if type(i) is not int or not 0 <= i < limit), None)
    if ids and wrong is not None:
        shown = repr(wrong)[:40] if not isinstance(wrong, int) else f"{wrong:,}"
        raise bad(f"a token id is {shown}, where its {count:,} tokens need ids below {limit:,}")
    return text


class HFTokenizer:
    """A Hugging Face ``tokenizers`` ``tokenizer.json`` (Pile 20B tokenizer, our trained ones).

    * ``encode`` is ``Tokenizer.encode(text, add_special_tokens=False).ids``: whatever the file
      says (for the 20B tokenizer: NFC normalisation, ByteLevel BPE) happens, and text such as
      "<|endoftext|>" *is* parsed as the special token, unlike the World tokenizer. This is what
      the official pip ``rwkv`` ``PIPELINE`` does when given a ``.json`` path (docs/tokenizers.md §2).
    * ``decode_bytes`` gives exact bytes even when a token ends in the middle of a UTF-8
      character. If the file's decoder is ByteLevel, each token string is mapped back through
      the GPT-2 byte table (``_byte_level_char_to_byte``); a token with a character outside that
      table (the 20B file's added runs of spaces) is taken as its own UTF-8 text, and special
      tokens (e.g. "<|endoftext|>") give b"". This mirrors ``Tokenizer.decode`` (default
      ``skip_special_tokens=True``) and its ByteLevel decoder, token by token, but without its
      lossy UTF-8 step. For any other decoder we fall back to
      ``Tokenizer.decode(ids).encode()``, which is exact only when the ids decode to whole
      characters (a split character comes back as U+FFFD).

    Args:
        path: the ``tokenizer.json`` file.
    """

    def __init__(self, path):
        path = Path(path)
        self._tok = open_tokenizers_file(path)
        with tokenizers_failures(path, "reading its vocabulary failed"):
            self._read_vocabulary(path)

    def _read_vocabulary(self, path):
        self.name, self.path = path.name, path
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.max_id = self.vocab_size - 1
        self.eot_id = self._tok.token_to_id("<|endoftext|>")  # None if the file has no such token

        # Precompute each id's exact bytes when the decoder is ByteLevel (see class docstring).
        config = json.loads(self._tok.to_str())
        decoder = config.get("decoder") or {}
        self._id_to_bytes: list[bytes] | None = None
        if decoder.get("type") == "ByteLevel":
            special = {t["id"] for t in config.get("added_tokens", []) if t.get("special")}
            char_to_byte = _byte_level_char_to_byte()
            table = []
            for token_id in range(self.vocab_size):
                token = self._tok.id_to_token(token_id)
                if token is None or token_id in special:
                    table.append(b"")  # holes in the id space, and special tokens, decode to nothing
                elif all(c in char_to_byte for c in token):
                    table.append(bytes(char_to_byte[c] for c in token))
                else:  # e.g. an added token written as plain text, such as a run of spaces
                    table.append(token.encode("utf-8"))
            self._id_to_bytes = table

    def encode(self, text: str) -> list[int]:
        """Token ids of ``text``; no special tokens are added."""
        _utf8(text)  # type and lone-surrogate check with a clear message
        with tokenizers_failures(self.path, "encoding text failed"):
            return self._tok.encode(text, add_special_tokens=False).ids

    def decode_bytes(self, ids) -> bytes:
        """Concatenated bytes of ``ids`` (exact for ByteLevel tokenizers; see class docstring)."""
        checked = [_check_id(i, self.max_id, self.name) for i in _id_list(ids)]
        if self._id_to_bytes is not None:
            return b"".join([self._id_to_bytes[i] for i in checked])
        with tokenizers_failures(self.path, "decoding ids failed"):
            return self._tok.decode(checked).encode("utf-8")

    def decode(self, ids, errors: str = "replace") -> str:
        """Text of ``ids``: UTF-8 decode of ``decode_bytes(ids)``; ``errors`` goes to bytes.decode."""
        return self.decode_bytes(ids).decode("utf-8", errors=errors)

    def __repr__(self) -> str:
        return f"HFTokenizer(name={self.name!r}, vocab_size={self.vocab_size}, eot_id={self.eot_id})"


# ---------------------------------------------------------------------------------------------
# Choosing the tokenizer for a model
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=1)
def _packaged_world_tokenizer() -> WorldTokenizer:
    # Building the World tokenizer takes ~0.5 s (parse 65529 lines, build the trie). It is never
    # modified after construction, so get_tokenizer shares one instance between models.
    return WorldTokenizer()


def get_tokenizer(vocab_size: int, tokenizer_path=None, model_path=None, carried=None):
    """The tokenizer for a model whose embedding has ``vocab_size`` rows.

    Order of choice:
      1. ``tokenizer_path``: the string "world" -> WorldTokenizer; a ``.json`` file ->
         HFTokenizer; a ``.txt`` file -> WorldTokenizer with that vocabulary.
      2. ``carried``: the tokenizer that came inside the model file (a GGUF's vocabulary, an
         HF folder's tokenizer.json), as the format readers return it.
      3. ``model_path``: a ``<model stem>.tokenizer.json`` or ``tokenizer.json`` beside the
         weights -> HFTokenizer (this is how models we train ship their tokenizer).
      4. ``vocab_size`` 65536 -> the World tokenizer (all released World/G-series models).
      5. Pile sizes (50277, 50304) -> error asking for 20B_tokenizer.json: we do not ship it.
      6. Anything else -> error asking for ``--tokenizer``.
    Then, wherever it came from, the tokenizer's largest id must be a row of the embedding
    (check_fits), or it is refused: a tokenizer with more ids than the model has rows cannot
    belong to that model. The packaged World tokenizer is built once and shared between calls
    (it is read-only).

    Args:
        vocab_size: rows of the model's ``emb.weight`` (V).
        tokenizer_path: "world", or a path to a tokenizer.json / World vocabulary .txt.
        model_path: the checkpoint's path, to look for a tokenizer shipped beside it.
        carried: the tokenizer the model file carries, or None.
    """
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size <= 0:
        raise TokenizerError(
            f"vocab_size must be a positive integer (rows of emb.weight), got {vocab_size!r}"
        )
    vocab_size = int(vocab_size)

    if tokenizer_path is not None:
        if isinstance(tokenizer_path, str) and tokenizer_path.lower() == "world":
            tokenizer = _packaged_world_tokenizer()
        else:
            path = Path(tokenizer_path)
            suffix = path.suffix.lower()
            if suffix == ".json":
                tokenizer = HFTokenizer(path)
            elif suffix == ".txt":
                tokenizer = WorldTokenizer(vocab_path=path)
            else:
                raise TokenizerError(
                    f"don't know how to read tokenizer {str(path)!r}: pass 'world', a Hugging "
                    "Face tokenizer .json, or a World vocabulary .txt"
                )
    elif carried is not None:
        tokenizer = carried
    else:
        beside_model = []
        if model_path is not None:
            model_path = Path(model_path)
            beside_model = [
                model_path.with_name(model_path.stem + ".tokenizer.json"),
                model_path.with_name("tokenizer.json"),
            ]
        found = next((p for p in beside_model if p.is_file()), None)
        if found is not None:
            tokenizer = HFTokenizer(found)
        elif vocab_size == WORLD_EMBEDDING_ROWS:
            tokenizer = _packaged_world_tokenizer()
        elif vocab_size in PILE_VOCAB_SIZES:
            raise TokenizerError(
                f"this looks like a Pile model ({vocab_size} rows); it uses the GPT-NeoX 20B "
                "tokenizer: pass --tokenizer path/to/20B_tokenizer.json (from BlinkDL/ChatRWKV)"
            )
        else:
            raise TokenizerError(
                f"no known tokenizer for a model with vocab size {vocab_size} (rows of "
                "emb.weight): pass --tokenizer with its tokenizer.json or World vocabulary "
                ".txt, or 'world'"
            )

    return check_fits(tokenizer, vocab_size, model_path)


def check_fits(tokenizer, vocab_size: int, model=None):
    """``tokenizer`` if its largest id is a row of a ``vocab_size``-row embedding, else a
    TokenizerError (naming ``model``, the checkpoint's path, when given): a tokenizer with more
    ids than the model has rows cannot belong to it. (Fewer is fine: embeddings are padded,
    e.g. the World models' 65530 ids in 65536 rows.)"""
    if tokenizer.max_id >= vocab_size:
        owner = f"the embedding of {model}" if model is not None else "the model's embedding"
        raise TokenizerError(
            f"tokenizer {tokenizer.name} has {tokenizer.max_id + 1} ids but {owner} has only "
            f"{vocab_size} rows: they do not belong together; pass the model's own tokenizer "
            "with --tokenizer"
        )
    return tokenizer
