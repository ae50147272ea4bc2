"""`tinyrwkv train` end to end on a small text: it learns, it is deterministic, --resume continues
exactly where it stopped, and its output loads with its own tokenizer."""
import json

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.formats import read_checkpoint
from tinyrwkv.cli import main

from conftest import SHAKESPEARE, needs_shared_data

pytestmark = needs_shared_data


def small_text(tmp_path):
    text = SHAKESPEARE.read_text()
    (tmp_path / "train.txt").write_text(text[:40000])
    (tmp_path / "valid.txt").write_text(text[40000:48000])
    return tmp_path / "train.txt"


def train(tmp_path, out, *extra):
    args = ["train", "--data", str(small_text(tmp_path)), "--out", str(out), "--vocab", "300",
            "--layers", "2", "--width", "64", "--head-size", "32", "--batch", "4", "--ctx", "24",
            "--steps", "12", "--warmup", "3", "--lr", "3e-3", "--eval-every", "4",
            "--eval-windows", "8", "--sample-every", "0", "--seed", "3", *extra]
    if "--threads" not in extra:
        args += ["--threads", "2"]          # a fixed count: bit-exact reruns (trainer docstring)
    try:
        main(args)
    except SystemExit as e:
        assert e.code in (0, None)
    return [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]


def test_train_learns_and_is_deterministic_and_resumes(tmp_path):
    a = train(tmp_path, tmp_path / "a")
    losses = [r["loss"] for r in a]
    assert losses[-1] < losses[0] - 0.5, losses               # it learns (from ~ln 300 = 5.7)
    b = train(tmp_path, tmp_path / "b")
    assert [r["loss"] for r in b] == losses                    # same seed, same run
    train(tmp_path, tmp_path / "c", "--stop-after", "5")
    c = train(tmp_path, tmp_path / "c", "--resume")
    assert [r["loss"] for r in c] == losses                    # 5 steps, then 7 more = 12 steps
    pa = read_checkpoint(tmp_path / "a" / "model.safetensors")
    pc = read_checkpoint(tmp_path / "c" / "model.safetensors")
    assert all(np.array_equal(pa[k], pc[k]) for k in pa)
    result = json.loads((tmp_path / "a" / "result.json").read_text())
    assert 0 < result["valid_bits_per_byte"] < 5.5     # uniform over 300 tokens: 5.9 bits/byte
    card = (tmp_path / "a" / "MODEL_CARD.md").read_text()
    assert "validation bits per byte" in card
    model = tinyrwkv.load(tmp_path / "a" / "model.safetensors")
    assert model.tokenizer is not None and model.config.vocab_size == 300
    text = "".join(tinyrwkv.generate(model, "First", max_tokens=5, seed=1))
    assert isinstance(text, str)


def test_threads_option(tmp_path):
    """--threads sets the CPU threads (Numba and BLAS) and says so; the losses match a run with
    the libraries' default threads (float32 sums in another order: 1e-4 relative is ~1000x the
    rounding and far below what a wrong thread split would change). The one-thread run is a
    child process, so this process keeps its thread settings."""
    import os
    import subprocess
    import sys
    from conftest import ROOT
    args = ["--steps", "4", "--eval-every", "2"]
    default = train(tmp_path, tmp_path / "a", *args)
    command = [sys.executable, "-m", "tinyrwkv", "train", "--data", str(tmp_path / "train.txt"),
               "--out", str(tmp_path / "b"), "--vocab", "300", "--layers", "2", "--width", "64",
               "--head-size", "32", "--batch", "4", "--ctx", "24", "--warmup", "3", "--lr",
               "3e-3", "--eval-windows", "8", "--sample-every", "0", "--seed", "3",
               "--threads", "1", *args]
    done = subprocess.run(command, capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    assert done.returncode == 0 and ", 1 thread" in done.stderr, done.stderr[-600:]
    one = [json.loads(line) for line in (tmp_path / "b" / "log.jsonl").read_text().splitlines()]
    losses = lambda log: np.array([r["loss"] for r in log if "loss" in r])
    assert len(losses(one)) == 4
    np.testing.assert_allclose(losses(one), losses(default), rtol=1e-4)


def test_training_puts_the_thread_settings_back(tmp_path, capsys):
    """run() changes BLAS's and Numba's threads (--threads, or the governor's choice) only while it
    trains: a program that trains and then does other work keeps its own settings."""
    threadpoolctl = pytest.importorskip("threadpoolctl")
    first = {lib["filepath"] for lib in threadpoolctl.threadpool_info()}
    blas = lambda: {lib["filepath"]: lib["num_threads"] for lib in threadpoolctl.threadpool_info()
                    if lib["filepath"] in first}     # libraries loaded later start as they do
    before = blas()
    with threadpoolctl.threadpool_limits(1):
        inside = blas()
        train(tmp_path, tmp_path / "a", "--steps", "4", "--eval-every", "4", "--threads", "2")
        assert blas() == inside
        try:                                # no --threads: the governor chooses
            main(["train", "--data", str(tmp_path / "train.txt"), "--out", str(tmp_path / "b"),
                  "--vocab", "300", "--layers", "2", "--width", "64", "--head-size", "32",
                  "--batch", "4", "--ctx", "24", "--steps", "4", "--sample-every", "0"])
        except SystemExit as e:
            assert e.code in (0, None)
        assert "threads chosen as it runs" in capsys.readouterr().err
        assert blas() == inside
    assert blas() == before
