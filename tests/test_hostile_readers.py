"""Hostile and inconsistent model files (issue 13): every reader except the .pth pickle and the
state files. Each crafted file is built here, byte by byte where the writers would refuse to make
it; each must end in one CheckpointError naming the file, within a time and a memory bound, or
load exactly what its shapes say.

Bounds. Time: every crafted file here is under 1 MB, and a correct reader decides on it from its
header in milliseconds; 10 s is room for a slow, shared CI machine, and far below the hang (a FIFO
blocks forever) or the minutes a reader that believes the counts spends. Memory (tracemalloc
peak, which sees NumPy's buffers): 32 MB is above what the readers need for these files (a small
model, the header, Python's bookkeeping) and far below what the amplifications of the issue cost
(3.9 GB for one stray layer key, 3.8 GB for one GGUF array declared 2^40 long).
"""
import json
import os
import struct
import subprocess
import sys
import threading
import time
import tracemalloc

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.cli import main
from tinyrwkv.errors import CheckpointError
from tinyrwkv.formats import open_model, read_checkpoint, read_model, save_safetensors, write_hf
from tinyrwkv.formats.gguf_header import GGML_TYPES, OTHER_GGML_TYPES, read_gguf_header
from tinyrwkv.formats.lora import read_adapter
from tinyrwkv.synthetic import make_weights
from tinyrwkv.tokenizer import get_tokenizer

from conftest import ROOT, have

SECONDS = 10            # the time bound (module docstring)
MEGABYTES = 32          # the memory bound (module docstring)
IDS = np.arange(1, 9)

needs_gguf = pytest.mark.skipif(not have("gguf"), reason="the gguf package is not installed "
                                                          "(pip install -e '.[gguf]')")


def small_weights(seed=0):
    """2 layers, C=64 as 2 heads of 32, V=50, unequal ranks (as the releases have)."""
    return make_weights(2, 64, 50, head_size=32, ranks=(32, 64, 16, 48), seed=seed)


def refused(call, *names, within=SECONDS, megabytes=MEGABYTES):
    """Run call(); it must raise CheckpointError within the time and memory bounds. Returns the
    message, after checking it is one line naming each of `names` (the file, the problem)."""
    tracemalloc.start()
    start = time.perf_counter()
    try:
        with pytest.raises(CheckpointError) as excinfo:
            call()
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    seconds = time.perf_counter() - start
    message = str(excinfo.value)
    assert seconds < within, f"{seconds:.1f} s: {message}"
    assert peak < megabytes * 2**20, f"peak {peak / 2**20:.0f} MB: {message}"
    assert "\n" not in message, message
    for name in names:
        assert str(name) in message, (name, message)
    return message


def copies(tensors):
    """Arrays of their own: read_checkpoint maps the file, which the tests then rewrite."""
    return {k: np.array(v) for k, v in tensors.items()}


def cli_error(capsys, *args):
    """`tinyrwkv ARGS` in this process: it must exit 1 with one line on stderr, no traceback."""
    with pytest.raises(SystemExit) as excinfo:
        main([str(a) for a in args])
    err = capsys.readouterr().err
    assert excinfo.value.code == 1, err
    assert err.startswith("tinyrwkv: error: ") and err.count("\n") == 1, err
    return err


# ---- 1. regular files only ----

posix_only = pytest.mark.skipif(not hasattr(os, "mkfifo"), reason="FIFOs are POSIX-only")


def returns_within(call, seconds):
    """call() on a daemon thread: (finished, its exception or None). A call blocked in open() on a
    FIFO never finishes; the caller unblocks it by opening the FIFO's write end."""
    outcome = {}

    def run():
        try:
            call()
            outcome["error"] = None
        except BaseException as e:        # SystemExit from the CLI, too
            outcome["error"] = e
    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    thread.join(seconds)
    return "error" in outcome, outcome.get("error")


@posix_only
def test_a_fifo_is_refused_without_being_opened(tmp_path, capsys):
    """Reading a FIFO blocks until something writes to it: forever, for a model path typed by
    mistake. Every entry point must refuse it from os.stat, naming it."""
    fifo = tmp_path / "model.safetensors"
    os.mkfifo(fifo)
    calls = {"read_checkpoint": lambda: read_checkpoint(fifo), "load": lambda: tinyrwkv.load(fifo),
             "open_model": lambda: open_model(fifo), "read_adapter": lambda: read_adapter(fifo),
             "info": lambda: main(["info", str(fifo)])}
    try:
        for name, call in calls.items():
            finished, error = returns_within(call, SECONDS)
            assert finished, f"{name} blocked on the FIFO"
            message = str(error) if isinstance(error, CheckpointError) else capsys.readouterr().err
            assert isinstance(error, (CheckpointError, SystemExit)), (name, error)
            assert "FIFO" in message and str(fifo) in message, (name, message)
    finally:                                  # unblock a reader stuck in open() (before the fix)
        try:
            os.close(os.open(fifo, os.O_WRONLY | os.O_NONBLOCK))
        except OSError:
            pass


@pytest.mark.skipif(not os.path.exists("/dev/zero"), reason="no /dev/zero (not POSIX)")
def test_a_device_is_refused():
    """/dev/zero reports size 0 and never ends; /dev/null is empty: neither is a model file."""
    for device in ("/dev/zero", "/dev/null"):
        refused(lambda: read_checkpoint(device), device, "device")
        refused(lambda: tinyrwkv.load(device), device, "device")


def test_folders_are_read_only_as_model_folders(tmp_path):
    (tmp_path / "notes.txt").write_text("no model here")
    refused(lambda: read_checkpoint(tmp_path), tmp_path, "directory")
    refused(lambda: tinyrwkv.load(tmp_path), tmp_path, "directory")
    write_hf(tmp_path / "hf", small_weights())
    refused(lambda: read_checkpoint(tmp_path / "hf"), "directory")     # a folder is not a file


# ---- 2. memory amplification: a stray layer key ----

STRAY = 100_000_000           # the key: blocks.100000000.att.x_r


def test_a_stray_layer_key_is_named_in_bounded_memory(tmp_path, capsys):
    """One stray key made the schema list 10^8 layers (3.9 GB, then a bare MemoryError)."""
    w = make_weights(1, 64, 50)
    w[f"blocks.{STRAY}.att.x_r"] = np.zeros((1, 1, 64), np.float32)
    path = tmp_path / "stray.safetensors"
    save_safetensors(path, w)
    refused(lambda: tinyrwkv.load(path, backend="numpy"), path, f"blocks.{STRAY}.att.x_r")
    for command in (["info", path], ["convert", path, tmp_path / "out.safetensors"]):
        err = cli_error(capsys, *command)
        assert f"blocks.{STRAY}.att.x_r" in err and str(path) in err, err
    assert not (tmp_path / "out.safetensors").exists()


def test_a_stray_layer_key_in_an_fla_file_or_folder(tmp_path):
    write_hf(tmp_path / "hf", small_weights())
    fla = copies(read_checkpoint(tmp_path / "hf" / "model.safetensors"))
    fla[f"model.layers.{STRAY}.attn.x_r"] = np.zeros(64, np.float32)
    save_safetensors(tmp_path / "hf" / "model.safetensors", fla)
    refused(lambda: open_model(tmp_path / "hf"), f"model.layers.{STRAY}.attn.x_r")
    refused(lambda: open_model(tmp_path / "hf" / "model.safetensors"),
            f"model.layers.{STRAY}.attn.x_r")


def test_layer_numbers_are_plain_decimals(tmp_path, capsys):
    """A 5000-digit layer number (Python's int() refuses it with a message naming no file) and
    a zero-padded one are stray keys too."""
    for number in ("9" * 5000, "01"):
        w = make_weights(1, 64, 50)
        w[f"blocks.{number}.att.x_r"] = np.zeros((1, 1, 64), np.float32)
        path = tmp_path / f"pad{len(number)}.safetensors"
        save_safetensors(path, w)
        assert "stray key" in cli_error(capsys, "info", path)


# ---- GGUF files built byte by byte ----

SCALAR_FORMATS = {0: "<B", 1: "<b", 2: "<H", 3: "<h", 4: "<I", 5: "<i", 6: "<f", 7: "<B",
                  10: "<Q", 11: "<q", 12: "<d"}


def gguf_string(text):
    data = text.encode("utf-8") if isinstance(text, str) else text
    return struct.pack("<Q", len(data)) + data


def gguf_value(vtype, value):
    """The bytes of a metadata value: vtype a value type code, or (9, element type) for arrays."""
    if isinstance(vtype, tuple):
        return struct.pack("<IQ", vtype[1], len(value)) + b"".join(gguf_value(vtype[1], v)
                                                                   for v in value)
    if vtype == 8:
        return gguf_string(value)
    return struct.pack(SCALAR_FORMATS[vtype], value)


def gguf_bytes(kvs, tensors, version=3, alignment=32, offsets=None):
    """A GGUF file: kvs [(key, vtype, value)], tensors [(name, NumPy shape, ggml type id, data
    bytes)], laid out one after another, aligned (or at `offsets`, to craft them)."""
    out = [b"GGUF", struct.pack("<IQQ", version, len(tensors), len(kvs))]
    for key, vtype, value in kvs:
        out += [gguf_string(key), struct.pack("<I", 9 if isinstance(vtype, tuple) else vtype),
                gguf_value(vtype, value)]
    placed, end = [], 0
    for _, _, _, data in tensors:
        placed.append(end)
        end += len(data) + (-len(data) % alignment)
    offsets = offsets or placed
    for (name, shape, type_id, _), offset in zip(tensors, offsets):
        out += [gguf_string(name), struct.pack("<I", len(shape)),
                *(struct.pack("<Q", d) for d in reversed(shape)), struct.pack("<IQ", type_id, offset)]
    head = b"".join(out)
    head += bytes(-len(head) % alignment)
    body = bytearray(max((o + len(t[3]) for o, t in zip(offsets, tensors)), default=0))
    for (_, _, _, data), offset in zip(tensors, offsets):
        body[offset: offset + len(data)] = data
    return head + bytes(body)


def gguf_parts(path):
    """(kvs, tensors) of a GGUF file, as gguf_bytes takes them: to rewrite it with edits."""
    header = read_gguf_header(path)
    data = path.read_bytes()
    kvs = [(k, header.types[k], v.tolist() if isinstance(v, np.ndarray) else v)
           for k, v in header.metadata.items() if k != "general.alignment"]
    tensors = [(t.name, t.shape, t.type_id, data[t.offset: t.offset + t.nbytes])
               for t in header.tensors.values()]
    return kvs, tensors


def edited(kvs, set_=(), drop=()):
    """kvs with the keys in `drop` removed and the (key, vtype, value) in `set_` put in."""
    names = {k for k, _, _ in set_} | set(drop)
    return [kv for kv in kvs if kv[0] not in names] + list(set_)


F32 = 0
ARCH = ("general.architecture", 8, "rwkv7")
ONE_TENSOR = [("x", (32,), F32, bytes(128))]


@pytest.fixture(scope="module")
def gguf_model(tmp_path_factory):
    """small_weights as a float32 GGUF from our writer, and its (kvs, tensors)."""
    if not have("gguf"):
        pytest.skip("writing GGUF needs the gguf package")
    from tinyrwkv.formats import write_gguf
    path = tmp_path_factory.mktemp("gguf") / "m.gguf"
    w = small_weights()
    write_gguf(path, w, "f32")
    return w, path, gguf_parts(path)


def write(tmp_path, name, data):
    path = tmp_path / name
    path.write_bytes(data)
    return path


# ---- 2. memory amplification: GGUF counts ----

HUGE = 2**40


@pytest.mark.parametrize("case", ["array", "string-array", "string", "tensors", "metadata"])
def test_gguf_counts_are_checked_against_the_file_before_anything_is_allocated(tmp_path, case):
    """A count declared far past the end of a small file is refused from the count alone (the
    gguf package's reader allocated 3.8 GB for the array, then raised an empty error)."""
    if case in ("array", "string-array"):
        etype = 6 if case == "array" else 8
        data = (b"GGUF" + struct.pack("<IQQ", 3, 0, 2) + gguf_string("general.architecture") +
                struct.pack("<I", 8) + gguf_string("rwkv7") + gguf_string("tokenizer.ggml.scores") +
                struct.pack("<IIQ", 9, etype, HUGE) + bytes(1000))
    elif case == "string":
        data = (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("general.name") +
                struct.pack("<IQ", 8, HUGE) + bytes(1000))
    elif case == "tensors":
        data = b"GGUF" + struct.pack("<IQQ", 3, HUGE, 0) + bytes(1000)
    else:
        data = b"GGUF" + struct.pack("<IQQ", 3, 0, HUGE) + bytes(1000)
    path = write(tmp_path, f"{case}.gguf", data)
    message = refused(lambda: open_model(path), path, f"{HUGE:,}", megabytes=4)
    assert "left" in message                          # "... but only N are left in the file"


# ---- GGUF structure ----

def crafted_gguf_cases():
    """name -> (file bytes, a phrase the message must contain)."""
    good_kvs = [ARCH]
    q8_1 = [("w", (32,), 9, bytes(40))]
    return {
        "version-1": (gguf_bytes(good_kvs, ONE_TENSOR, version=1), "version 1"),
        "big-endian": (b"GGUF" + struct.pack(">I", 3) + bytes(100), "big-endian"),
        "version-99": (gguf_bytes(good_kvs, ONE_TENSOR, version=99), "version is 99"),
        "five-dims": (gguf_bytes(good_kvs, [("x", (1, 1, 1, 1, 32), F32, bytes(128))]),
                      "5 dimensions"),
        "empty-dim": (gguf_bytes(good_kvs, [("x", (0, 32), F32, b"")]), "empty dimension"),
        "q8_1": (gguf_bytes(good_kvs, q8_1), "Q8_1"),
        "i32": (gguf_bytes(good_kvs, [("w", (8,), 26, bytes(32))]), "I32"),
        "f64": (gguf_bytes(good_kvs, [("w", (8,), 28, bytes(64))]), "F64"),
        "unknown-type": (gguf_bytes(good_kvs, [("w", (8,), 77, bytes(64))]), "unknown ggml type 77"),
        "partial-block": (gguf_bytes(good_kvs, [("w", (40,), 8, bytes(34))]), "whole number"),
        "unaligned": (gguf_bytes(good_kvs, ONE_TENSOR + [("y", (2,), F32, bytes(8))],
                                 offsets=[0, 136]),
                      "not a multiple"),
        "past-the-end": (gguf_bytes(good_kvs, ONE_TENSOR)[:-64], "past the end"),
        "overlap": (gguf_bytes(good_kvs, [("x", (32,), F32, bytes(128)),
                                          ("y", (32,), F32, bytes(128))], offsets=[0, 64]),
                    "overlap"),
        "same-name": (gguf_bytes(good_kvs, ONE_TENSOR * 2), "two tensors named 'x'"),
        "same-key": (gguf_bytes([ARCH, ARCH], ONE_TENSOR), "twice"),
        "alignment-3": (gguf_bytes([ARCH, ("general.alignment", 4, 3)], ONE_TENSOR),
                        "power of two"),
        "bool-2": (gguf_bytes([ARCH, ("flag", 7, 2)], ONE_TENSOR), "not 0 or 1"),
        "value-type-13": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("flag") +
                          struct.pack("<I", 13) + bytes(64), "unknown value type 13"),
        "not-utf8": (gguf_bytes(good_kvs, [(b"\xff\xfe", (32,), F32, bytes(128))]), "not UTF-8"),
        "deep-arrays": (b"GGUF" + struct.pack("<IQQ", 3, 0, 1) + gguf_string("a") +
                        struct.pack("<I", 9) + struct.pack("<IQ", 9, 1) * 6 + bytes(64),
                        "nests arrays"),
        "cut-in-header": (gguf_bytes(good_kvs, ONE_TENSOR)[:30], "left in the file"),
    }


@pytest.mark.parametrize("case", list(crafted_gguf_cases()))
def test_crafted_gguf_headers_are_refused_by_name(tmp_path, case):
    data, phrase = crafted_gguf_cases()[case]
    path = write(tmp_path, f"{case}.gguf", data)
    refused(lambda: open_model(path), path, phrase)
    refused(lambda: tinyrwkv.load(path), path, phrase)


@needs_gguf
def test_our_ggml_type_table_matches_ggml():
    """GGML_TYPES' block sizes and the refused types' names, against the gguf package's own."""
    import gguf
    for type_id, (name, block, block_bytes) in GGML_TYPES.items():
        q = gguf.GGMLQuantizationType(type_id)
        assert q.name.lower() == name and gguf.GGML_QUANT_SIZES[q] == (block, block_bytes)
    for type_id, name in OTHER_GGML_TYPES.items():
        if type_id in (4, 5):                        # removed from ggml long ago
            continue
        assert gguf.GGMLQuantizationType(type_id).name == name


@needs_gguf
def test_truncated_gguf_at_every_cut_is_an_error_or_a_model(tmp_path, gguf_model):
    """Every cut of a real (small) GGUF: a CheckpointError naming the file, never another
    exception; a cut inside the last tensor's padding may still read."""
    _, source, _ = gguf_model
    data = source.read_bytes()
    path = tmp_path / "cut.gguf"
    for cut in list(range(0, 4000, 97)) + list(range(4000, len(data), len(data) // 40)):
        path.write_bytes(data[:cut])
        try:
            read_model(path)
        except CheckpointError as e:
            assert str(path) in str(e)


def test_an_f32_gguf_is_read_without_the_gguf_package(tmp_path, gguf_model):
    """Nothing from the file reaches gguf.GGUFReader: an f32 GGUF loads without importing the
    gguf package at all (it is needed to dequantise and to write only)."""
    _, path, _ = gguf_model
    code = ("import sys, tinyrwkv; m = tinyrwkv.load(sys.argv[1], backend='numpy'); "
            "m.forward([1, 2]); print('gguf' in sys.modules)")
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True,
                          text=True, env=env, timeout=120)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == "False"


# ---- 3. shapes are the truth: GGUF metadata ----

def rewritten(tmp_path, gguf_model, name, set_=(), drop=(), tensors=None):
    _, _, (kvs, original) = gguf_model
    return write(tmp_path, name, gguf_bytes(edited(kvs, set_, drop), tensors or original))


def test_a_good_gguf_rewritten_by_the_test_builder_still_loads(tmp_path, gguf_model):
    """The builder above is faithful: the unedited rewrite loads as the original model."""
    w, _, _ = gguf_model
    path = rewritten(tmp_path, gguf_model, "same.gguf")
    assert np.array_equal(tinyrwkv.load(path, backend="numpy").forward(IDS)[0],
                          tinyrwkv.RWKV7(w).forward(IDS)[0])


METADATA_CASES = {
    "block_count-1": ("rwkv7.block_count", 1, "block_count = 1 but the tensors say 2"),
    "block_count-3": ("rwkv7.block_count", 3, "block_count = 3 but the tensors say 2"),
    "block_count-0": ("rwkv7.block_count", 0, "without a positive rwkv7.block_count"),
    "embedding_length": ("rwkv7.embedding_length", 128, "embedding_length = 128"),
    "feed_forward_length": ("rwkv7.feed_forward_length", 64, "feed_forward_length = 64"),
    "decay_rank": ("rwkv7.attention.decay_lora_rank", 64, "decay_lora_rank = 64"),
    "iclr_rank": ("rwkv7.attention.iclr_lora_rank", 32, "iclr_lora_rank = 32"),
    "value_rank": ("rwkv7.attention.value_residual_mix_lora_rank", 64,
                   "value_residual_mix_lora_rank = 64"),
    "gate_rank": ("rwkv7.attention.gate_lora_rank", 32, "gate_lora_rank = 32"),
    "head_size-0": ("rwkv7.wkv.head_size", 0, "head_size = 0"),
    "head_size-48": ("rwkv7.wkv.head_size", 48, "does not divide the width C = 64"),
}


@pytest.mark.parametrize("case", list(METADATA_CASES))
def test_gguf_metadata_that_disagrees_with_the_shapes_is_an_error(tmp_path, gguf_model, case):
    """The issue: block_count=1 on a 2-layer file dropped a layer; every size llama.cpp reads
    from the metadata must match the tensors (the shapes are the model)."""
    key, value, phrase = METADATA_CASES[case]
    path = rewritten(tmp_path, gguf_model, f"{case}.gguf", set_=[(key, 4, value)])
    refused(lambda: tinyrwkv.load(path, backend="numpy"), path, phrase, "re-convert")


@pytest.mark.parametrize("key", ["rwkv7.wkv.head_size", "rwkv7.block_count"])
def test_gguf_without_head_size_or_block_count_is_an_error(tmp_path, gguf_model, key):
    path = rewritten(tmp_path, gguf_model, "missing.gguf", drop=[key])
    refused(lambda: open_model(path), path, key, "re-convert")


def test_gguf_metadata_of_the_wrong_type_is_an_error(tmp_path, gguf_model):
    path = rewritten(tmp_path, gguf_model, "typed.gguf", set_=[("rwkv7.wkv.head_size", 8, "32")])
    refused(lambda: open_model(path), path, "'rwkv7.wkv.head_size' is a string, not an integer")


def test_gguf_head_size_is_the_one_size_not_cross_checked(tmp_path, gguf_model):
    """Documented limitation (formats/gguf.py, docs/formats.md §4): llama.cpp's layout flattens
    r_k, so no tensor shows N; a wrong divisor of C loads as a different head split. This test
    pins the behaviour the docs describe, so a future check that can see N will update both."""
    path = rewritten(tmp_path, gguf_model, "h16.gguf", set_=[("rwkv7.wkv.head_size", 4, 16)])
    with pytest.warns(UserWarning, match="head size 16 from the metadata"):
        config = tinyrwkv.load(path, backend="numpy").config
    assert (config.n_head, config.head_size) == (4, 16)           # written as 2 x 32


def test_gguf_tensor_types_tinyrwkv_cannot_decode_are_named(tmp_path, gguf_model):
    _, _, (kvs, tensors) = gguf_model
    C = 64
    for type_id, name in ((9, "Q8_1"), (26, "I32")):
        block_bytes = {9: 40 * C // 32, 26: 4 * C}[type_id]
        changed = [(n, s, type_id, bytes(block_bytes)) if n == "blk.0.attn_norm.weight" else
                   (n, s, t, d) for n, s, t, d in tensors]
        path = write(tmp_path, f"{name}.gguf", gguf_bytes(kvs, changed))
        refused(lambda: tinyrwkv.load(path), path, name, "blk.0.attn_norm.weight")


# ---- the vocabulary a GGUF carries ----

BPE_TOKENS = ["a", "b", "ab"] + [f"t{i}" for i in range(47)]            # 50: one per row


@pytest.mark.parametrize("case", ["no-merges", "more-tokens-than-rows", "types-length",
                                  "scores-length", "bad-merge", "world-for-50-rows",
                                  "world-token-count", "no-tokens"])
def test_gguf_vocabulary_must_fit_the_model(tmp_path, gguf_model, case):
    gpt2 = [("tokenizer.ggml.model", 8, "gpt2"), ("tokenizer.ggml.tokens", (9, 8), BPE_TOKENS),
            ("tokenizer.ggml.merges", (9, 8), ["a b"])]
    edits, phrase = {
        "no-merges": (gpt2[:2], "without tokenizer.ggml.merges"),
        "more-tokens-than-rows": (gpt2[:1] + [("tokenizer.ggml.tokens", (9, 8), BPE_TOKENS + ["x"])]
                                  + gpt2[2:], "51 tokens"),
        "types-length": (gpt2 + [("tokenizer.ggml.token_type", (9, 5), [1] * 49)], "49 entries"),
        "scores-length": (gpt2 + [("tokenizer.ggml.scores", (9, 6), [0.0] * 51)], "51 entries"),
        "bad-merge": (gpt2[:2] + [("tokenizer.ggml.merges", (9, 8), ["ab"])], "the merge 'ab'"),
        "world-for-50-rows": ([("tokenizer.ggml.model", 8, "rwkv"), gpt2[1]], "World vocabulary"),
        "world-token-count": ([("tokenizer.ggml.model", 8, "rwkv"),
                               ("tokenizer.ggml.tokens", (9, 8), BPE_TOKENS[:20])], "20 tokens"),
        "no-tokens": (gpt2[:1], "no tokenizer.ggml.tokens"),
    }[case]
    path = rewritten(tmp_path, gguf_model, f"{case}.gguf", set_=edits)
    get_tokenizer(65536)        # builds the shared World tokenizer outside the bounds (0.5 s)
    refused(lambda: open_model(path), path, phrase)


@pytest.mark.skipif(not have("tokenizers"), reason="needs the tokenizers package")
def test_a_gguf_bpe_vocabulary_that_fits_loads(tmp_path, gguf_model):
    """The checks refuse only what does not fit: 50 tokens and their merges for 50 rows load."""
    path = rewritten(tmp_path, gguf_model, "bpe.gguf", set_=[
        ("tokenizer.ggml.model", 8, "gpt2"), ("tokenizer.ggml.tokens", (9, 8), BPE_TOKENS),
        ("tokenizer.ggml.merges", (9, 8), ["a b"]),
        ("tokenizer.ggml.token_type", (9, 5), [1] * 50)])
    tok = open_model(path).tokenizer
    assert tok is not None and tok.encode("ab") == [2]


@needs_gguf
def test_writing_the_world_vocabulary_for_a_small_embedding_is_refused(tmp_path):
    """The writer's side of the same rule: the World vocabulary (65530 ids) into a 50-row model
    would make a file whose tokenizer emits ids the model cannot embed."""
    from tinyrwkv.formats import write_gguf
    from tinyrwkv.tokenizer import WorldTokenizer
    with pytest.raises(ValueError, match="50 embedding rows"):
        write_gguf(tmp_path / "w.gguf", small_weights(), "f32", tokenizer=WorldTokenizer())


# ---- 4. safetensors headers ----

def safetensors_bytes(header, data=b""):
    text = header if isinstance(header, bytes) else json.dumps(header).encode()
    return struct.pack("<Q", len(text)) + text + data


def entry(dtype="F32", shape=(2,), offsets=(0, 8)):
    return {"dtype": dtype, "shape": shape, "data_offsets": offsets}


SAFETENSORS_CASES = {
    "dtype-list": ({"w": entry(dtype=["F32"])}, "dtype ['F32']"),
    "dtype-number": ({"w": entry(dtype=4)}, "dtype 4"),
    "shape-int": ({"w": entry(shape=2)}, "malformed shape 2"),
    "shape-string": ({"w": entry(shape="ab")}, "malformed shape"),
    "shape-floats": ({"w": entry(shape=[2.0])}, "malformed shape"),
    "shape-bool": ({"w": entry(shape=[True, 2])}, "malformed shape"),
    "shape-nested": ({"w": entry(shape=[[2]])}, "malformed shape"),
    "shape-huge-but-empty": ({"w": entry(shape=[2**62, 2**62, 0], offsets=[0, 0])}, "too large"),
    "shape-65-dims": ({"w": entry(shape=[1] * 64 + [2])}, "at most 64"),
    "offsets-string": ({"w": entry(offsets="08")}, "malformed data_offsets"),
    "offsets-three": ({"w": entry(offsets=[0, 4, 8])}, "malformed data_offsets"),
    "offsets-dict": ({"w": entry(offsets={"begin": 0})}, "malformed data_offsets"),
    "offsets-reversed": ({"w": entry(offsets=[8, 0])}, "outside"),
    "overlap": ({"w": entry(), "v": entry(offsets=[4, 12])}, "overlap"),
    "entry-string": ({"w": "F32"}, "lacks dtype"),
    "duplicate-key": (b'{"w":{"dtype":"F32","shape":[2],"data_offsets":[0,8]},'
                      b'"w":{"dtype":"F32","shape":[2],"data_offsets":[8,16]}}', "twice"),
    "huge-integer": (b'{"w":{"dtype":"F32","shape":[' + b"9" * 5000 + b'],"data_offsets":[0,8]}}',
                     "not valid JSON"),
}


@pytest.mark.parametrize("case", list(SAFETENSORS_CASES))
def test_malformed_safetensors_headers_are_one_clear_error(tmp_path, case):
    header, phrase = SAFETENSORS_CASES[case]
    path = write(tmp_path, f"{case}.safetensors", safetensors_bytes(header, bytes(16)))
    refused(lambda: read_checkpoint(path), path, phrase)
    refused(lambda: tinyrwkv.load(path), path, phrase)


def test_a_safetensors_header_over_100_mb_is_refused_unread(tmp_path):
    """The reference safetensors library refuses headers over 100,000,000 bytes; so do we, from
    the length field alone (a sparse file: nothing is written to disk but the first bytes)."""
    path = tmp_path / "big-header.safetensors"
    n = 100_000_001
    with open(path, "wb") as f:
        f.write(struct.pack("<Q", n) + b"{")
        f.truncate(8 + n + 8)
    refused(lambda: read_checkpoint(path), path, "100,000,000-byte limit", megabytes=4)


# ---- info and convert on inconsistent files ----

def inconsistent_cases():
    w = small_weights()
    r_k_1d = dict(w, **{"blocks.0.att.r_k": np.zeros(64, np.float32)})
    no_emb = {k: v for k, v in w.items() if k != "emb.weight"}
    return {
        "no-emb": (no_emb, "emb.weight"),
        "r_k-1d": (r_k_1d, "blocks.0.att.r_k"),
        "heads-times-size": (dict(w, **{"blocks.0.att.r_k": np.zeros((2, 16), np.float32)}),
                             "!= 2 x 16"),
        "empty-vocabulary": (dict(w, **{"emb.weight": np.zeros((0, 64), np.float32),
                                        "head.weight": np.zeros((0, 64), np.float32)}),
                             "empty vocabulary"),
        "stray-key": (dict(w, **{"blocks.2.att.x_r": np.zeros((1, 1, 64), np.float32)}),
                      "blocks.2"),
    }


@pytest.mark.parametrize("case", list(inconsistent_cases()))
def test_info_and_convert_of_inconsistent_files_give_one_line(tmp_path, capsys, case):
    weights, phrase = inconsistent_cases()[case]
    path = tmp_path / f"{case}.safetensors"
    save_safetensors(path, weights)
    out = tmp_path / "out.safetensors"
    for command in (["info", path], ["convert", path, out]):
        err = cli_error(capsys, *command)
        assert str(path) in err and phrase in err, err
    assert not out.exists()


def test_convert_refuses_an_rwkv6_file_before_writing(tmp_path, capsys):
    """`convert` runs load's version detection and key check first (on caac346 an RWKV-6 file
    converted "successfully")."""
    C = 64
    v6 = {"emb.weight": np.zeros((50, C), np.float32), "blocks.0.ln0.weight": np.ones(C, np.float32),
          "blocks.0.att.time_maa_x": np.zeros((1, 1, C), np.float32),
          "blocks.0.att.time_decay_w1": np.zeros((C, 64), np.float32),
          "blocks.0.att.time_faaaa": np.zeros((2, 32), np.float32),
          "head.weight": np.zeros((50, C), np.float32)}
    path = tmp_path / "rwkv6.safetensors"
    save_safetensors(path, v6)
    for out in (tmp_path / "out.safetensors", tmp_path / "out.gguf", tmp_path / "folder"):
        assert "RWKV-6" in cli_error(capsys, "convert", path, out)
        assert not out.exists()


# ---- 3. Hugging Face folders read what their index names ----

@pytest.fixture
def hf_folder(tmp_path):
    """small_weights as an fla folder, and its tensors under fla's names."""
    w = small_weights()
    folder = write_hf(tmp_path / "hf", w)
    return w, folder, copies(read_checkpoint(folder / "model.safetensors"))


def logits(path):
    return tinyrwkv.load(path, backend="numpy").forward(IDS)[0]


def shard(folder, fla, index=True, names=("model-00001-of-00002.safetensors",
                                          "model-00002-of-00002.safetensors")):
    """Split the folder's model.safetensors into two shards (and their index)."""
    (folder / "model.safetensors").unlink()
    keys = sorted(fla)
    parts = {names[0]: keys[::2], names[1]: keys[1::2]}
    for name, part in parts.items():
        save_safetensors(folder / name, {k: fla[k] for k in part})
    if index:
        weight_map = {k: name for name, part in parts.items() for k in part}
        (folder / "model.safetensors.index.json").write_text(json.dumps(
            {"metadata": {}, "weight_map": weight_map}))
    return parts


def test_a_stray_backup_beside_model_safetensors_is_not_read(hf_folder):
    """An HF folder merged every *.safetensors it found: a backup with other weights replaced
    the model's (the backup sorts after model.safetensors)."""
    w, folder, fla = hf_folder
    save_safetensors(folder / "model_backup.safetensors",
                     {k: v + 1 for k, v in fla.items()})
    assert np.array_equal(logits(folder), tinyrwkv.RWKV7(w).forward(IDS)[0])


def test_sharded_folders_read_exactly_the_indexed_shards(hf_folder):
    w, folder, fla = hf_folder
    shard(folder, fla)
    save_safetensors(folder / "old-copy.safetensors", {k: v + 1 for k, v in fla.items()})
    assert np.array_equal(logits(folder), tinyrwkv.RWKV7(w).forward(IDS)[0])


def test_a_shard_the_index_names_must_exist(hf_folder):
    w, folder, fla = hf_folder
    parts = shard(folder, fla)
    missing = next(iter(parts))
    (folder / missing).unlink()
    refused(lambda: open_model(folder), missing, "missing")


def test_a_tensor_in_two_shards_is_an_error(hf_folder):
    w, folder, fla = hf_folder
    parts = shard(folder, fla)
    first, second = parts
    key = parts[first][0]
    save_safetensors(folder / second, {k: fla[k] for k in parts[second] + [key]})
    refused(lambda: open_model(folder), key, second)


def test_unindexed_shards_are_an_error_naming_them(hf_folder):
    w, folder, fla = hf_folder
    parts = shard(folder, fla, index=False)
    refused(lambda: open_model(folder), *parts, "model.safetensors.index.json")


def test_an_index_cannot_point_outside_its_folder(hf_folder):
    w, folder, fla = hf_folder
    save_safetensors(folder.parent / "elsewhere.safetensors", fla)
    (folder / "model.safetensors.index.json").write_text(json.dumps(
        {"weight_map": {k: "../elsewhere.safetensors" for k in fla}}))
    refused(lambda: open_model(folder), "../elsewhere.safetensors", "not a file name")


def test_a_peft_folder_reads_its_adapter_only(tmp_path):
    """The same rule for PEFT adapter folders: adapter_model.safetensors, not a stray copy."""
    folder = tmp_path / "adapter"
    folder.mkdir()
    A = np.ones((4, 64), np.float32)
    B = np.ones((64, 4), np.float32)
    name = "base_model.model.model.layers.0.attn.k_proj.lora_{}.weight"
    save_safetensors(folder / "adapter_model.safetensors", {name.format("A"): A,
                                                            name.format("B"): B})
    save_safetensors(folder / "adapter_model_old.safetensors", {name.format("A"): A * 0,
                                                                name.format("B"): B * 0})
    lora, _ = read_adapter(folder)
    assert np.array_equal(lora["blocks.0.att.key.lora_A"], A)
    (folder / "adapter_model.safetensors").rename(folder / "adapter_model_new.safetensors")
    refused(lambda: read_adapter(folder), "adapter_model_new.safetensors",
            "adapter_model_old.safetensors")


@needs_gguf
def test_a_gguf_adapter_with_a_stray_layer_is_bounded(tmp_path):
    """The GGUF adapter reader built the whole tensor table up to the largest layer number."""
    data = gguf_bytes([ARCH, ("general.type", 8, "adapter")],
                      [(f"blk.{STRAY}.time_mix_key.weight.lora_a", (4, 64), F32, bytes(1024)),
                       (f"blk.{STRAY}.time_mix_key.weight.lora_b", (64, 4), F32, bytes(1024))])
    path = write(tmp_path, "adapter.gguf", data)
    tracemalloc.start()
    try:
        lora, _ = read_adapter(path)
        peak = tracemalloc.get_traced_memory()[1]
    finally:
        tracemalloc.stop()
    assert set(lora) == {f"blocks.{STRAY}.att.key.lora_A", f"blocks.{STRAY}.att.key.lora_B"}
    assert peak < MEGABYTES * 2**20, peak
