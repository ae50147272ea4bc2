"""The `tinyrwkv` command end to end, on a tiny synthetic model with the World vocabulary."""
import os
import subprocess
import sys

import numpy as np
import pytest

from tinyrwkv.formats import save_safetensors
from tinyrwkv.synthetic import make_weights

from conftest import ROOT, TOKENIZER_20B, have


def run(*args, stdin=None):
    """Run the CLI; output decoded as UTF-8 without newline translation (random text has '\r')."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "tinyrwkv", *map(str, args)],
                          input=None if stdin is None else stdin.encode(), capture_output=True,
                          timeout=300, cwd=ROOT, env=env)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    """2 layers, C=64, the World vocabulary's 65536 rows: the CLI picks the World tokenizer."""
    path = tmp_path_factory.mktemp("cli") / "tiny-world.safetensors"
    save_safetensors(path, make_weights(n_layer=2, n_embd=64, vocab_size=65536, seed=3))
    return path


def test_generate_streams_and_reports_speed(world_model):
    rc, out, err = run("generate", "--model", world_model, "Once upon a time", "-n", "12", "--seed", "1")
    assert rc == 0, err
    assert out.strip()                                   # random weights: some text
    backend = "numba" if have("numba") else "numpy"
    assert "tok/s" in err and f"backend {backend}" in err and "rwkv_vocab_v20230424" in err
    rc2, out2, _ = run("generate", "--model", world_model, "Once upon a time", "-n", "12", "--seed", "1")
    assert out2 == out                                   # seeded: the same text again


def test_generate_greedy_matches_the_library(world_model):
    import tinyrwkv
    model = tinyrwkv.load(world_model)
    ids = model.tokenizer.encode("Hello")
    expect, state = [], None
    logits, state = model.forward(ids)
    for _ in range(5):
        t = int(np.argmax(logits))
        if t == 0:                                       # end of text: the CLI stops there
            break
        expect.append(t)
        logits, state = model.forward([t], state)
    rc, out, err = run("generate", "--model", world_model, "Hello", "-n", "5", "-t", "0",
                       "--presence-penalty", "0", "--frequency-penalty", "0")
    assert rc == 0, err
    assert out == model.tokenizer.decode(expect) + "\n"


def test_backend_and_weights_options(world_model):
    rc, out, err = run("generate", "--model", world_model, "Hi", "-n", "4", "--backend", "numpy",
                       "--threads", "1")
    assert rc == 0 and "backend numpy" in err, err
    if have("numba"):
        rc, out, err = run("generate", "--model", world_model, "Hi", "-n", "4", "--weights", "bfloat16")
        assert rc == 0 and "backend numba-bf16" in err, err
    rc, _, err = run("generate", "--model", world_model, "Hi", "--backend", "numpy", "--weights", "bfloat16")
    assert rc == 1 and "16-bit storage needs backend='numba'" in err, err
    if have("numba"):
        rc, _, err = run("generate", "--model", world_model, "Hi", "-n", "2", "--strategy", "cpu fp16")
        assert rc == 0 and "backend numba-fp16" in err, err


def test_storage_int8_option(world_model):
    """--storage int8 (also as --weights int8): GGUF Q8_0 blocks on the numba backend; refused
    by name elsewhere, and the official package's 'fp32i8' strategy points to it."""
    if have("numba"):
        for option in ("--storage", "--weights"):
            rc, out, err = run("generate", "--model", world_model, "Hi", "-n", "2", option, "int8")
            assert rc == 0 and "backend numba-int8" in err, err
    rc, _, err = run("generate", "--model", world_model, "Hi", "--backend", "numpy", "--storage", "int8")
    assert rc == 1 and "int8 storage (GGUF Q8_0 blocks) needs backend='numba'" in err, err
    rc, _, err = run("generate", "--model", world_model, "Hi", "--strategy", "cpu fp32i8")
    assert rc == 1 and "storage='int8'" in err, err


def test_chat_keeps_state_between_turns(world_model):
    rc, out, err = run("chat", "--model", world_model, "-n", "8", stdin="Hi there\nTell me more\n")
    assert rc == 0, err
    assert out.count("User: ") == 2 and out.count("Assistant:") == 2


def test_info_describes_without_loading(world_model):
    rc, out, err = run("info", world_model)
    assert rc == 0, err
    for text in ("x070", "layers", "65536", "rwkv_vocab_v20230424", "fp32"):
        assert text in out


def test_help_reads_well():
    rc, out, _ = run("--help")
    assert rc == 0 and "generate" in out and "chat" in out and "info" in out
    rc, out, _ = run("generate", "--help")
    assert rc == 0 and "--max-tokens" in out and "--top-p" in out and "default: 0.85" in out


def test_clear_errors(tmp_path):
    rc, _, err = run("generate", "--model", tmp_path / "nope.pth", "hi")
    assert rc == 1 and "no checkpoint at" in err and "Traceback" not in err
    bad = tmp_path / "bad.pth"
    bad.write_bytes(b"PK\x03\x04 this is not really a zip")
    rc, _, err = run("generate", "--model", bad, "hi")
    assert rc == 1 and "Traceback" not in err
    pile = tmp_path / "pile.safetensors"
    save_safetensors(pile, make_weights(n_layer=1, n_embd=64, vocab_size=50304))
    rc, _, err = run("generate", "--model", pile, "hi")
    assert rc == 1 and "20B_tokenizer.json" in err


@pytest.mark.skipif(not TOKENIZER_20B.exists(), reason="20B_tokenizer.json not in ../shared")
def test_pile_model_with_its_tokenizer(tmp_path):
    pile = tmp_path / "pile.safetensors"
    save_safetensors(pile, make_weights(n_layer=1, n_embd=64, vocab_size=50304))
    rc, out, err = run("generate", "--model", pile, "--tokenizer", TOKENIZER_20B, "hi", "-n", "5")
    assert rc == 0, err
    assert "20B_tokenizer" in err


def test_bench_smoke():
    """`tinyrwkv bench` runs end to end (speed itself is measured by the benchmark, not here)."""
    rc, out, err = run("bench", "--quick", "--backends", "numpy", "--runs", "1")
    assert rc == 0, err[-2000:]
    assert "| numpy | fp32 |" in out and "memory bandwidth" in out
