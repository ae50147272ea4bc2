"""Tests for tinyrwkv.tokenizer.

The World tokenizer is checked three ways: against the published test vectors (docs/tokenizers.md §1),
id for id against the official pip ``rwkv`` ``TRIE_TOKENIZER`` on several hundred KB of varied
text (and on random text from hypothesis), and on a hand-made vocabulary whose greedy result we
can work out by hand. The HF wrapper is checked against the ``tokenizers`` library itself on the
Pile 20B tokenizer. Shared files live in ../shared relative to the repo root; tests that need a
missing one are skipped with the path in the reason.
"""

import importlib.util
import inspect
import shutil
import sys
import unicodedata
from functools import lru_cache
from pathlib import Path

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tinyrwkv.tokenizer import HFTokenizer, TokenizerError, WorldTokenizer, get_tokenizer

SHARED = Path(__file__).resolve().parents[2] / "shared"
TOKENIZER_20B = SHARED / "reference/tokenizers/20B_tokenizer.json"
SHAKESPEARE = SHARED / "data/tinyshakespeare/train.txt"

needs_20b = pytest.mark.skipif(
    not TOKENIZER_20B.is_file(),
    reason=f"Pile 20B tokenizer not found at {TOKENIZER_20B} "
    "(copy 20B_tokenizer.json from BlinkDL/ChatRWKV there)",
)

WORLD_MAX_ID = 65529


@pytest.fixture(scope="module")
def world():
    return WorldTokenizer()


@pytest.fixture(scope="module")
def official():
    """The official pip rwkv TRIE_TOKENIZER, built from the vocabulary inside the installed wheel."""
    spec = importlib.util.find_spec("rwkv")
    if spec is None:
        pytest.skip("the official package is not installed (pip install rwkv==0.8.32); parity tests need it")
    from rwkv.rwkv_tokenizer import TRIE_TOKENIZER

    vocab = Path(spec.submodule_search_locations[0]) / "rwkv_vocab_v20230424.txt"
    return TRIE_TOKENIZER(str(vocab))


@pytest.fixture(scope="module")
def hf20b():
    if not TOKENIZER_20B.is_file():
        pytest.skip(f"Pile 20B tokenizer not found at {TOKENIZER_20B}")
    pytest.importorskip("tokenizers", reason="HF tokenizers is not installed (pip install tokenizers)")
    return HFTokenizer(TOKENIZER_20B)


# ---------------------------------------------------------------------------------------------
# A large, varied, deterministic test text
# ---------------------------------------------------------------------------------------------


@lru_cache(maxsize=None)
def varied_sections() -> tuple:
    """(name, text) pairs covering the kinds of input a tokenizer meets; about 0.5 MB of UTF-8."""
    rng = np.random.default_rng(20230424)
    sections = []

    # English prose: the docstrings of stdlib modules, plus a hand-written paragraph.
    import argparse, collections, csv, datetime, decimal, difflib, email, fractions, functools, heapq
    import itertools, json, logging, os, re, statistics, string, subprocess, textwrap, typing, unittest

    modules = [argparse, collections, csv, datetime, decimal, difflib, email, fractions, functools, heapq,
               itertools, json, logging, os, re, statistics, string, subprocess, textwrap, typing, unittest]
    prose = [m.__doc__ or "" for m in modules]
    prose.append(
        "It was the best of times, it was the worst of times. The quick brown fox jumps over the "
        "lazy dog; \"quoted\" and 'single-quoted' words, don't, can't, e.g. i.e. U.S.A. -- dashes "
        "-- and ellipses... Numbers: 3.14159, 1,000,000, 2024-05-01, 0x1F, 1e-5, $12.50, 50%.\n"
    )
    sections.append(("english prose", "\n\n".join(prose)))

    # Source code with its indentation, as the models see it in training data.
    code_modules = (argparse, difflib, json.decoder, textwrap, heapq)
    sections.append(("python code", "".join(inspect.getsource(m) for m in code_modules)))

    # Chinese, Japanese, Korean sentences, shuffled and repeated.
    cjk = [
        "你好，世界！今天天气很好，我们去公园散步吧。",
        "人工智能正在改变我们的生活方式，语言模型可以写诗、翻译和编程。",
        "这是一个测试：数字１２３、标点《》“”、以及繁體字與簡體字混合。",
        "こんにちは、世界。今日はいい天気ですね。カタカナとひらがなと漢字を混ぜます。",
        "東京都渋谷区で会議があります。ｶﾀｶﾅ（半角）も使います。",
        "안녕하세요, 세계! 오늘 날씨가 정말 좋네요. 한국어 문장을 토큰화합니다.",
        "대한민국의 수도는 서울입니다. 123 숫자와 English가 섞여 있습니다.",
    ]
    sections.append(("cjk", "".join(cjk[i] + "\n" * (i % 3) for i in rng.integers(0, len(cjk), 1500))))

    # Emoji: plain, skin tones, ZWJ sequences (families, professions), flags (regional-indicator
    # pairs), tag sequences (England), keycaps, variation selectors.
    emoji = [
        "🙂", "😀", "🤖", "❤️", "👍🏽", "👩‍💻", "👨‍👩‍👧‍👦", "🧑🏿‍🚀", "🏳️‍🌈", "🇫🇷", "🇯🇵", "🇺🇸",
        "🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f", "1️⃣", "#️⃣", "✌\ufe0e", "☺\ufe0f",
    ]
    sections.append(("emoji", "".join(emoji[i] + " " * (i % 2) for i in rng.integers(0, len(emoji), 4000))))

    # Combining marks and scripts that use them: decomposed accents, stacked marks, Vietnamese,
    # Devanagari, Thai, Arabic with harakat, Hebrew with niqqud, decomposed Hangul.
    marks = [
        "e\u0301", "a\u0308\u0304", "n\u0303", "Tiếng Việt có dấu", "Tie\u0302\u0301ng Vie\u0323\u0302t",
        "हिन्दी भाषा", "ภาษาไทย", "اَلْعَرَبِيَّةُ", "עִבְרִית", unicodedata.normalize("NFD", "한국어"),
        "Z" + "".join(chr(c) for c in range(0x300, 0x36F, 7)),
    ]
    sections.append(("combining marks", " ".join(marks[i] for i in rng.integers(0, len(marks), 3000))))

    # Whitespace runs of every length up to past the longest space token, CRLF, tabs and
    # exotic spaces, and long runs of the characters that have long run tokens (up to 128 bytes).
    ws = []
    for k in rng.integers(1, 140, 400):
        ws.append(str(rng.choice([" ", "\t", "\n", "\r\n", " \t", "\u3000", "\xa0", "\u2028"])) * int(k))
        ws.append(str(rng.choice(["x", "word", "=", "-", "#", "*", "_", "."])) * int(rng.integers(1, 200)))
    sections.append(("whitespace and runs", "".join(ws)))

    # Random code points from several planes (surrogates excluded: UTF-8 cannot encode them).
    planes = [(0x20, 0x7F), (0x80, 0x800), (0x800, 0xD800), (0xE000, 0x10000), (0x10000, 0x20000),
              (0x20000, 0x30000), (0xE0000, 0xE0200), (0xF0000, 0x110000)]
    chars = []
    for _ in range(25000):
        lo, hi = planes[rng.integers(len(planes))]
        chars.append(chr(int(rng.integers(lo, hi))))
        if rng.random() < 0.1:
            chars.append(" ")
    sections.append(("random unicode", "".join(chars)))

    return tuple(sections)


def test_varied_text_is_large_and_valid():
    """The parity tests are only as good as their text: make sure it really is ~300 KB+."""
    text = "".join(t for _, t in varied_sections())
    assert len(text.encode("utf-8")) >= 300_000
    assert not any(0xD800 <= ord(c) <= 0xDFFF for c in text)


# ---------------------------------------------------------------------------------------------
# World tokenizer: published vectors and parity with the official tokenizer
# ---------------------------------------------------------------------------------------------

# Test vectors published in docs/tokenizers.md §1; they were produced with the official pip rwkv 0.8.32
# TRIE_TOKENIZER, so these hold even where the official package is not installed.
PUBLISHED_VECTORS = [
    ("\n\n", [261]),
    ("Hello world", [33155, 40213]),
    ("User: hi\n\nAssistant:", [24281, 59, 4571, 261, 5585, 41693, 59]),
    ("Assistant: <think", [5585, 41693, 59, 295, 35762]),
    ("1234567890", [632, 654, 676, 698, 710]),
    ("你好，世界", [10464, 11685, 19137, 10267, 14610]),
    ("🙂", [3319, 2417]),
    (" ", [33]),
    ("\n", [11]),
]


@pytest.mark.parametrize("text, ids", PUBLISHED_VECTORS)
def test_published_vectors(world, text, ids):
    assert world.encode(text) == ids
    assert world.decode(ids) == text


def test_world_attributes(world):
    assert world.name == "rwkv_vocab_v20230424"
    assert world.vocab_size == 65536
    assert world.eot_id == 0
    assert world.max_id == WORLD_MAX_ID
    assert world.token_bytes(0) == b""
    assert world.encode("") == []
    # ids 1..256 are the single bytes 0x00..0xFF (docs/tokenizers.md §1)
    assert all(world.token_bytes(b + 1) == bytes([b]) for b in range(256))


@pytest.mark.parametrize("name", [name for name, _ in varied_sections()])
def test_parity_with_official_per_section(world, official, name):
    text = dict(varied_sections())[name]
    ids = world.encode(text)
    assert ids == official.encode(text), f"ids differ from the official tokenizer on section {name!r}"
    assert world.decode(ids) == text
    assert official.decode(ids) == text


def test_parity_with_official_whole_text(world, official):
    """All sections glued together, so tokens that span section boundaries are covered too."""
    text = "".join(t for _, t in varied_sections())
    ids = world.encode(text)
    assert ids == official.encode(text)
    assert world.decode_bytes(ids) == text.encode("utf-8")


@pytest.mark.skipif(not SHAKESPEARE.is_file(), reason=f"tinyshakespeare not found at {SHAKESPEARE}")
def test_parity_with_official_tinyshakespeare(world, official):
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = world.encode(text)
    assert ids == official.encode(text)
    assert world.decode(ids) == text


# Text strategies: hypothesis' default text (all planes, no surrogates), plus text biased to
# multi-byte characters and to the ASCII runs that have long tokens.
any_text = st.one_of(
    st.text(),
    st.text(st.characters(min_codepoint=0x80, exclude_categories=("Cs",))),
    st.lists(st.sampled_from([" ", "\n", "\r\n", "\t", "=", "-", "a", "the", "é", "你", "🙂", "\u200d"]),
             max_size=300).map("".join),
)


@settings(max_examples=300, deadline=None)
@given(text=any_text)
def test_parity_with_official_random_text(world, official, text):
    assert world.encode(text) == official.encode(text)


@settings(max_examples=300, deadline=None)
@given(text=any_text)
def test_round_trip_text(world, text):
    assert world.decode(world.encode(text)) == text


@settings(max_examples=300, deadline=None)
@given(text=any_text)
def test_round_trip_bytes(world, text):
    assert world.decode_bytes(world.encode(text)) == text.encode("utf-8")


def test_every_id_decodes_and_reencodes(world, official):
    """Every id's bytes equal the official table's, and each token's bytes re-encode to itself."""
    for token_id in range(1, WORLD_MAX_ID + 1):
        data = world.decode_bytes([token_id])
        assert data == official.idx2token[token_id], token_id
        # Greedy longest match on a token's own bytes must find that whole token.
        assert world.encode_bytes(data) == [token_id], token_id

    # Spot check through text (only tokens that are valid UTF-8 can come from text) against the
    # official tokenizer on a seeded sample.
    rng = np.random.default_rng(0)
    checked = 0
    for token_id in rng.choice(np.arange(1, WORLD_MAX_ID + 1), size=3000, replace=False):
        try:
            text = world.token_bytes(token_id).decode("utf-8")
        except UnicodeDecodeError:
            continue
        expected = official.encode(text)
        assert world.encode(text) == expected
        if expected == [token_id]:
            checked += 1
    assert checked > 2500  # nearly all sampled tokens are whole UTF-8 text that re-encodes to itself


def test_numpy_ids_are_accepted(world):
    ids = np.array([33155, 40213], dtype=np.int64)
    assert world.decode_bytes(ids) == b"Hello world"
    assert world.decode(ids) == "Hello world"
    assert world.token_bytes(np.int32(33)) == b" "


def test_decode_errors_argument(world):
    lead_byte_e4 = 0xE4 + 1  # the single byte 0xE4 (id = byte + 1): a lone UTF-8 lead byte
    assert world.decode([lead_byte_e4]) == "\ufffd"
    assert world.decode([lead_byte_e4], errors="ignore") == ""
    with pytest.raises(UnicodeDecodeError):
        world.decode([lead_byte_e4], errors="strict")
    # Unlike the official decode (which returns a single "\ufffd" for the whole call), valid
    # text around the broken byte survives.
    hello = world.encode("Hello")
    assert world.decode(hello + [lead_byte_e4] + hello) == "Hello\ufffdHello"
    assert world.decode([0] + hello + [0]) == "Hello"  # end-of-text has no text


# ---------------------------------------------------------------------------------------------
# World tokenizer on hand-made vocabularies: greedy behaviour and malformed files
# ---------------------------------------------------------------------------------------------


def byte_lines() -> list:
    """Vocabulary lines for the 256 single bytes (ids 1..256), in the official file's style."""
    lines = []
    for b in range(256):
        literal = repr(chr(b)) if b < 0x80 else repr(bytes([b]))  # bytes >= 0x80 are not text alone
        lines.append(f"{b + 1} {literal} 1")
    return lines


def write_vocab(path: Path, extra_tokens=(), line_end="\r\n", lines=None) -> Path:
    lines = byte_lines() if lines is None else lines
    for token in extra_tokens:
        lines.append(f"{len(lines) + 1} {token!r} {len(token.encode('utf-8'))}")
    path.write_text("".join(line + line_end for line in lines), encoding="utf-8", newline="")
    return path


@pytest.mark.parametrize("line_end", ["\r\n", "\n"])
def test_greedy_longest_match_by_hand(tmp_path, line_end):
    extra = ["ab", "abc", "abcdx", "cdef", "é", "é!"]
    tok = WorldTokenizer(write_vocab(tmp_path / "tiny_vocab.txt", extra, line_end))
    ids = {t: 257 + i for i, t in enumerate(extra)}
    byte = lambda ch: ord(ch) + 1  # noqa: E731  (id of a single ASCII byte)

    assert tok.name == "tiny_vocab"
    assert tok.max_id == 262 and tok.vocab_size == 263
    # Longest match wins, even when a shorter first token would give fewer tokens overall:
    # "abcdef" -> abc|d|e|f (4 tokens), not ab|cdef (2).
    assert tok.encode("abcdef") == [ids["abc"], byte("d"), byte("e"), byte("f")]
    # The walk goes past the best match ("abcd" is a prefix of "abcdx") and must fall back to "abc".
    assert tok.encode("abcdy") == [ids["abc"], byte("d"), byte("y")]
    assert tok.encode("abcdx") == [ids["abcdx"]]
    assert tok.encode("ab") == [ids["ab"]]
    assert tok.encode("é!é") == [ids["é!"], ids["é"]]
    assert tok.encode("a") == [byte("a")]
    assert tok.decode(tok.encode("xabcdefé!abcdy")) == "xabcdefé!abcdy"


def test_lf_copy_of_packaged_vocab_is_the_same(tmp_path, world):
    """The wheel's file has CRLF line ends, the git copies LF (docs/tokenizers.md §1.1): same tokenizer."""
    from tinyrwkv.tokenizer import WORLD_VOCAB_PATH

    data = WORLD_VOCAB_PATH.read_bytes()
    assert b"\r\n" in data  # otherwise this test would compare the file with itself
    lf = tmp_path / "rwkv_vocab_v20230424.txt"
    lf.write_bytes(data.replace(b"\r\n", b"\n"))
    tok = WorldTokenizer(vocab_path=lf)
    assert tok.name == world.name and tok.vocab_size == world.vocab_size
    all_ids = range(WORLD_MAX_ID + 1)
    assert [tok.token_bytes(i) for i in all_ids] == [world.token_bytes(i) for i in all_ids]


@pytest.mark.parametrize(
    "bad_line, problem",
    [
        ("3 'ab' 3", "UTF-8 bytes"),  # wrong byte length
        ("3 'ab 2", "not a valid Python literal"),  # unterminated string
        ("3 __import__('os').getcwd() 2", "not a valid Python literal"),  # code is never run
        ("3 42 2", "not str or bytes"),
        ("7 'ab' 2", "out of order"),
        ("3'ab' 2", "three space-separated fields"),
        ("x 'ab' 2", "decimal integers"),
        ("", "three space-separated fields"),  # blank line in the middle of the file
        ("3 '' 0", "empty"),
    ],
)
def test_malformed_vocab_names_the_line(tmp_path, bad_line, problem):
    lines = ["1 'q' 1", "2 'r' 1", bad_line] + [f"{i + 4} {repr(chr(b)) if b < 0x80 else repr(bytes([b]))} 1"
                                               for i, b in enumerate(range(256))]
    path = write_vocab(tmp_path / "bad.txt", lines=lines)
    with pytest.raises(TokenizerError) as excinfo:
        WorldTokenizer(path)
    message = str(excinfo.value)
    assert "line 3" in message and "bad.txt" in message
    assert problem in message


def test_duplicate_token_is_rejected(tmp_path):
    path = write_vocab(tmp_path / "dup.txt", extra_tokens=["ab", "ab"])
    with pytest.raises(TokenizerError, match=r"line 258: .*already appeared as id 257"):
        WorldTokenizer(path)


def test_vocab_missing_a_single_byte_is_rejected(tmp_path):
    lines = [line for line in byte_lines() if not line.startswith("66 ")]  # drop byte 0x41 "A"
    lines = [f"{i + 1} {line.split(' ', 1)[1]}" for i, line in enumerate(lines)]  # renumber
    with pytest.raises(TokenizerError, match="0x41"):
        WorldTokenizer(write_vocab(tmp_path / "no_A.txt", lines=lines))


def test_missing_or_binary_vocab_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        WorldTokenizer(tmp_path / "nope.txt")
    (tmp_path / "binary.txt").write_bytes(b"1 '\xff\xfe' 2\n")
    with pytest.raises(TokenizerError, match="not UTF-8"):
        WorldTokenizer(tmp_path / "binary.txt")


# ---------------------------------------------------------------------------------------------
# Errors for bad ids and bad text
# ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad_id", [-1, WORLD_MAX_ID + 1, 65535, 10**9, "x", 1.0, True, None])
def test_world_bad_ids(world, bad_id):
    for call in (lambda: world.decode_bytes([1, bad_id]), lambda: world.decode([bad_id]),
                 lambda: world.token_bytes(bad_id)):
        with pytest.raises(TokenizerError) as excinfo:
            call()
        assert repr(bad_id) in str(excinfo.value)
        assert "0..65529" in str(excinfo.value)


def test_world_bad_text(world):
    with pytest.raises(TokenizerError, match="U\\+D800"):
        world.encode("a\ud800b")  # a lone surrogate has no UTF-8 form
    with pytest.raises(TokenizerError, match="expects a str"):
        world.encode(b"bytes are not text")
    with pytest.raises(TokenizerError, match="sequence of token ids"):
        world.decode(5)  # a lone id, not a list


# ---------------------------------------------------------------------------------------------
# HFTokenizer
# ---------------------------------------------------------------------------------------------


@needs_20b
def test_hf_20b_attributes(hf20b):
    assert hf20b.name == "20B_tokenizer.json"
    assert hf20b.vocab_size == 50277
    assert hf20b.eot_id == 0
    assert hf20b.decode_bytes([0]) == b""  # special tokens are skipped, as tokenizers' decode does
    assert hf20b.decode_bytes([50276]) == b"  "  # added token: a run of two spaces, stored as plain text


@needs_20b
@pytest.mark.parametrize("name", [name for name, _ in varied_sections()])
def test_hf_20b_matches_tokenizers_library(hf20b, name):
    import tokenizers

    reference = tokenizers.Tokenizer.from_file(str(TOKENIZER_20B))
    text = dict(varied_sections())[name][:60_000]  # the library is fast, but keep the suite quick
    ids = hf20b.encode(text)
    assert ids == reference.encode(text).ids
    assert hf20b.decode(ids) == reference.decode(ids)
    # ByteLevel BPE is lossless after the tokenizer's NFC normaliser.
    assert hf20b.decode_bytes(ids) == unicodedata.normalize("NFC", text).encode("utf-8")


@needs_20b
def test_hf_20b_decode_bytes_of_a_split_character(hf20b):
    """A character whose UTF-8 bytes are spread over several tokens comes back exactly."""
    split_found = []
    for text in ["🤖", "🦜", "𝔘𝔫𝔦𝔠𝔬𝔡𝔢", "龘", "鑫", "の🙂", "🇯🇵"]:
        ids = hf20b.encode(text)
        pieces = [hf20b.decode_bytes([i]) for i in ids]
        assert b"".join(pieces) == text.encode("utf-8")
        assert hf20b.decode_bytes(ids) == text.encode("utf-8")
        for piece in pieces:
            try:
                piece.decode("utf-8")
            except UnicodeDecodeError:
                split_found.append(text)
    assert split_found, "no token ended mid-character; pick texts that the 20B vocabulary splits"


@needs_20b
@pytest.mark.parametrize("bad_id", [-1, 50277, 10**9, "x"])
def test_hf_bad_ids(hf20b, bad_id):
    with pytest.raises(TokenizerError) as excinfo:
        hf20b.decode_bytes([bad_id])
    assert repr(bad_id) in str(excinfo.value)


def test_hf_missing_file(tmp_path):
    with pytest.raises(TokenizerError, match="does not exist"):
        HFTokenizer(tmp_path / "nope.json")


def test_hf_invalid_file(tmp_path):
    pytest.importorskip("tokenizers")
    bad = tmp_path / "bad.json"
    bad.write_text('{"not": "a tokenizer"}')
    with pytest.raises(TokenizerError, match="not a valid Hugging Face tokenizer.json"):
        HFTokenizer(bad)


def test_hf_without_tokenizers_package(tmp_path, monkeypatch):
    path = tmp_path / "tokenizer.json"
    path.write_text("{}")
    monkeypatch.setitem(sys.modules, "tokenizers", None)  # makes `import tokenizers` fail
    with pytest.raises(TokenizerError, match="pip install tokenizers"):
        HFTokenizer(path)


def test_hf_non_byte_level_decoder_falls_back_to_library_decode(tmp_path):
    """A WordLevel tokenizer (no ByteLevel decoder, no <|endoftext|>) uses tokenizers' decode.

    Its post-processor would prepend [BOS]: our encode must not add special tokens.
    """
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {"hello": 0, "world": 1, "[UNK]": 2, "[BOS]": 3}
    library = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    library.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    library.decoder = tokenizers.decoders.WordPiece()
    library.post_processor = tokenizers.processors.TemplateProcessing(
        single="[BOS] $A", special_tokens=[("[BOS]", 3)]
    )
    path = tmp_path / "word_level.json"
    library.save(str(path))
    assert library.encode("hello").ids == [3, 0]  # the library's default does add it

    tok = HFTokenizer(path)
    assert tok.vocab_size == 4 and tok.eot_id is None
    ids = tok.encode("hello world hello")
    assert ids == [0, 1, 0]
    assert tok.decode_bytes(ids) == library.decode(ids).encode("utf-8") == b"hello world hello"
    with pytest.raises(TokenizerError, match="0..3"):
        tok.decode([4])


# ---------------------------------------------------------------------------------------------
# get_tokenizer
# ---------------------------------------------------------------------------------------------


def test_get_tokenizer_world_by_vocab_size():
    tok = get_tokenizer(65536)
    assert isinstance(tok, WorldTokenizer) and tok.name == "rwkv_vocab_v20230424"
    assert get_tokenizer(65536) is tok  # the packaged World tokenizer is built once and shared


def test_get_tokenizer_world_by_name_and_by_txt_path(tmp_path):
    assert isinstance(get_tokenizer(65536, tokenizer_path="world"), WorldTokenizer)
    tiny = write_vocab(tmp_path / "tiny.txt", ["ab"])
    tok = get_tokenizer(512, tokenizer_path=str(tiny))
    assert isinstance(tok, WorldTokenizer) and tok.name == "tiny" and tok.encode("ab") == [257]


@pytest.mark.parametrize("vocab_size", [50277, 50304])
def test_get_tokenizer_pile_without_path(vocab_size):
    with pytest.raises(TokenizerError, match="20B_tokenizer.json") as excinfo:
        get_tokenizer(vocab_size)
    assert str(vocab_size) in str(excinfo.value)


@needs_20b
def test_get_tokenizer_pile_with_path():
    tok = get_tokenizer(50304, tokenizer_path=TOKENIZER_20B)
    assert isinstance(tok, HFTokenizer) and tok.vocab_size == 50277


def test_get_tokenizer_unknown_vocab_size():
    with pytest.raises(TokenizerError, match="1234") as excinfo:
        get_tokenizer(1234)
    assert "--tokenizer" in str(excinfo.value)


def test_get_tokenizer_refuses_a_tokenizer_too_big_for_the_model():
    with pytest.raises(TokenizerError, match="do not belong together") as excinfo:
        get_tokenizer(512, tokenizer_path="world")
    assert "65530 ids" in str(excinfo.value) and "512 rows" in str(excinfo.value)


def test_get_tokenizer_unknown_file_type(tmp_path):
    with pytest.raises(TokenizerError, match="don't know how to read"):
        get_tokenizer(65536, tokenizer_path=tmp_path / "vocab.model")


@needs_20b
@pytest.mark.parametrize("file_name", ["model.tokenizer.json", "tokenizer.json"])
def test_get_tokenizer_finds_tokenizer_beside_the_model(tmp_path, file_name):
    model_path = tmp_path / "model.pth"
    model_path.write_bytes(b"")  # only its location matters
    shutil.copy(TOKENIZER_20B, tmp_path / file_name)
    tok = get_tokenizer(50304, model_path=model_path)
    assert isinstance(tok, HFTokenizer) and tok.name == file_name
    # ... and it is still checked against the model: 50277 ids do not fit 50000 rows.
    with pytest.raises(TokenizerError, match="do not belong together"):
        get_tokenizer(50000, model_path=model_path)


@needs_20b
def test_get_tokenizer_prefers_the_model_specific_file(tmp_path):
    model_path = tmp_path / "model.pth"
    shutil.copy(TOKENIZER_20B, tmp_path / "model.tokenizer.json")
    shutil.copy(TOKENIZER_20B, tmp_path / "tokenizer.json")
    assert get_tokenizer(50304, model_path=model_path).name == "model.tokenizer.json"


def test_get_tokenizer_without_tokenizer_beside_model_uses_vocab_size(tmp_path):
    assert isinstance(get_tokenizer(65536, model_path=tmp_path / "model.pth"), WorldTokenizer)
