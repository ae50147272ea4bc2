"""Hostile and unlucky use of the command line and the API (issue 13, items 3, 4, 6, 8, 9):
NaN and out-of-range arguments refused with a usage message (exit 2); NaN/Inf weights found at
load and never written; compare never passes a NaN; every tokenizer checked against the model,
wherever it comes from, and a tokenizers panic caught; every error a user can cause is one line
`tinyrwkv: error: ...` (exit 1), never a traceback."""
import argparse
import errno
import json
import math
import os
import shutil
import signal
import subprocess
import sys
import time

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import oracle, trainer
from tinyrwkv.cli import main
from tinyrwkv.errors import CheckpointError
from tinyrwkv.formats import save_safetensors, write_hf
from tinyrwkv.formats.lora import LoraMerged, merge_lora
from tinyrwkv.formats.numerics import to_bf16_bits
from tinyrwkv.sampling import SamplingParams
from tinyrwkv.synthetic import make_weights
from tinyrwkv.tokenizer import HFTokenizer, TokenizerError, WorldTokenizer

from conftest import ROOT, SHAKESPEARE, have, needs_shared_data

SHIPPED_TOKENIZER = ROOT / "weights" / "model.tokenizer.json"      # 4096 ids


def run(*args, stdin=None, env=None):
    """The CLI in a fresh process, this checkout's package first on the path."""
    env = dict(os.environ, PYTHONIOENCODING="utf-8", PYTHONPATH=str(ROOT), **(env or {}))
    proc = subprocess.run([sys.executable, "-m", "tinyrwkv", *map(str, args)], input=stdin,
                          capture_output=True, timeout=300, cwd=ROOT, env=env)
    return proc.returncode, proc.stdout.decode("utf-8", "replace"), proc.stderr.decode("utf-8", "replace")


def in_process(capsys, *args):
    """main(args) in this process: (exit code, stderr). For checks that end before any work."""
    with pytest.raises(SystemExit) as e:
        main([str(a) for a in args])
    return e.value.code, capsys.readouterr().err


def assert_one_error_line(rc, err, *words, code=1):
    """Exit `code`, no traceback, and exactly one line `tinyrwkv: error: ...` holding `words`
    (other stderr lines: the model summary before the error, and Rust's own panic hook)."""
    assert rc == code, err
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if line.startswith("tinyrwkv: error:")]
    assert len(lines) == 1, err
    for word in words:
        assert word in lines[0], lines[0]
    return lines[0]


def assert_usage_error(rc, err, *words):
    """argparse's format: the usage, then `tinyrwkv CMD: error: ...`, exit 2, nothing else."""
    assert rc == 2, err
    assert err.startswith("usage: tinyrwkv") and "Traceback" not in err, err
    last = err.strip().splitlines()[-1]
    assert last.startswith("tinyrwkv ") and ": error: " in last, err
    for word in words:
        assert word in last, last


def tiny_weights(vocab_size=4096, seed=1):
    """1 layer, C=64: a model that loads and runs in a fraction of a second."""
    return make_weights(n_layer=1, n_embd=64, vocab_size=vocab_size, seed=seed)


@pytest.fixture(scope="module")
def nan_model(tmp_path_factory):
    """A 4096-row model with one NaN in head.weight, the shipped tokenizer beside it."""
    folder = tmp_path_factory.mktemp("nan")
    w = tiny_weights()
    w["head.weight"] = w["head.weight"].copy()
    w["head.weight"][7, 3] = np.nan
    save_safetensors(folder / "nan.safetensors", w)
    shutil.copy(SHIPPED_TOKENIZER, folder / "nan.tokenizer.json")
    return folder / "nan.safetensors"


# ---------------------------------------------------------------------------------------------
# 1. arguments: NaN, infinities and out-of-range numbers are usage errors (exit 2)
# ---------------------------------------------------------------------------------------------

GEN = ("generate", "hi", "--model", "missing.safetensors")
BAD_ARGUMENTS = [
    (GEN + ("--temperature", "nan"), "--temperature", "finite"),
    (GEN + ("--temperature", "inf"), "--temperature", "finite"),
    (GEN + ("--temperature", "-1"), "--temperature", ">= 0"),
    (GEN + ("--top-p", "nan"), "--top-p", "finite"),
    (GEN + ("--top-p", "1.5"), "--top-p", "between 0 and 1"),
    (GEN + ("--presence-penalty", "nan"), "--presence-penalty", "finite"),
    (GEN + ("--frequency-penalty=-inf",), "--frequency-penalty", "finite"),
    (GEN + ("--penalty-decay", "nan"), "--penalty-decay", "finite"),
    (GEN + ("--max-tokens", "-3"), "--max-tokens", "> 0"),
    (GEN + ("--max-tokens", "ten"), "--max-tokens", "integer"),
    (GEN + ("--top-k", "-1"), "--top-k", ">= 0"),
    (GEN + ("--threads", "0"), "--threads", "> 0"),
    (GEN + ("--seed", "-5"), "--seed", "-1"),
    (("chat", "--model", "missing.safetensors", "--top-p", "nan"), "--top-p", "finite"),
    (("compare", "a.npz", "b.npz", "--tol", "nan"), "--tol", "finite"),
    (("compare", "a.npz", "b.npz", "--tol", "0"), "--tol", "> 0"),
    (("merge-lora", "a", "b", "c.safetensors", "--alpha", "nan"), "--alpha", "finite"),
    (("merge-lora", "a", "b", "c.safetensors", "--alpha", "inf"), "--alpha", "finite"),
]
TRAIN = ("train", "--data", "missing.txt", "--out", "unused-dir")
BAD_ARGUMENTS += [
    (TRAIN + (option, value), option, why) for option, value, why in [
        ("--lr", "nan", "finite"), ("--lr", "0", "> 0"), ("--weight-decay", "inf", "finite"),
        ("--min-lr-ratio", "nan", "finite"), ("--beta1", "1.5", "in [0, 1)"),
        ("--beta2", "nan", "finite"), ("--eps", "0", "> 0"), ("--clip", "nan", "finite"),
        ("--layers", "0", "> 0"), ("--width", "0", "> 0"), ("--head-size", "-64", "> 0"),
        ("--eval-every", "0", "> 0"), ("--batch", "0", "> 0"), ("--steps", "0", "> 0"),
        ("--ctx", "0", "> 0"), ("--vocab", "0", "> 0"), ("--eval-windows", "0", "> 0"),
        ("--warmup", "-1", ">= 0"), ("--sample-every", "-1", ">= 0"),
        ("--stop-after", "-2", ">= 0"), ("--seed", "-1", ">= 0")]]


@pytest.mark.parametrize("argv, option, why", BAD_ARGUMENTS,
                         ids=[" ".join(a[0:1] + a[-2:]) for a, _, _ in BAD_ARGUMENTS])
def test_bad_numbers_are_usage_errors(capsys, argv, option, why):
    rc, err = in_process(capsys, *argv)
    assert_usage_error(rc, err, option, why)


def test_width_must_be_a_multiple_of_the_head_size(capsys):
    rc, err = in_process(capsys, *TRAIN, "--width", "65", "--head-size", "64")
    assert_usage_error(rc, err, "--width 65", "multiple of --head-size 64")


def test_usage_error_in_a_subprocess():
    """The same through `python -m tinyrwkv`, as a user runs it."""
    rc, _, err = run("generate", "hi", "--temperature", "nan")
    assert_usage_error(rc, err, "--temperature", "finite")


@pytest.mark.parametrize("field, value", [
    ("temperature", math.nan), ("temperature", math.inf), ("top_p", math.nan),
    ("presence_penalty", math.nan), ("frequency_penalty", -math.inf), ("penalty_decay", math.nan),
    ("top_k", 1.5), ("top_k", True)])
def test_sampling_params_refuse_nan(field, value):
    with pytest.raises(ValueError, match=field):
        SamplingParams(**{field: value})


def test_merge_lora_refuses_nan_alpha():
    w = tiny_weights(vocab_size=50)
    lora = {"blocks.0.att.key.lora_A": np.ones((2, 64), np.float32),
            "blocks.0.att.key.lora_B": np.ones((64, 2), np.float32)}
    for alpha in (math.nan, math.inf, "8"):
        with pytest.raises(ValueError, match="alpha"):
            merge_lora(w, lora, alpha)
    with pytest.raises(ValueError, match="alpha"):
        LoraMerged(tinyrwkv.formats.InMemory(w), lora, math.nan)


def test_compare_refuses_a_tolerance_that_is_not_finite_and_positive():
    tr = {"logits": np.ones((2, 3))}
    for tol in (math.nan, math.inf, 0.0, -1e-3):
        with pytest.raises(ValueError, match="tol"):
            oracle.compare(tr, tr, tol=tol)
    with pytest.raises(ValueError, match="fp32"):
        oracle.compare(tr, tr, dtype="fp64")


def train_args(**changes):
    """The trainer's defaults (as the CLI parses them), with `changes`."""
    parser = argparse.ArgumentParser()
    trainer.add_arguments(parser)
    args = parser.parse_args(["--data", "x.txt", "--out", "out"])
    vars(args).update(changes)
    return args


@pytest.mark.parametrize("changes, word", [
    (dict(lr=math.nan), "lr"), (dict(beta2=math.inf), "beta2"), (dict(layers=0), "layers"),
    (dict(width=65, head_size=64), "multiple"), (dict(eval_every=0), "eval-every")])
def test_trainer_config_is_checked(changes, word):
    with pytest.raises(ValueError, match=word):
        trainer.check_config(train_args(**changes))
    trainer.check_config(train_args())                  # the defaults pass


# ---------------------------------------------------------------------------------------------
# 2. compare: a NaN is never agreement
# ---------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def reference_trace():
    model = tinyrwkv.RWKV7(make_weights(2, 64, 97, head_size=32, seed=4), dtype="float64")
    return oracle.trace(model, [3, 1, 4, 1, 5])


def test_an_all_nan_reference_does_not_pass(reference_trace):
    nan = {name: np.full_like(a, np.nan) for name, a in reference_trace.items()}
    report = oracle.compare(nan, reference_trace)
    assert not report["ok"]
    assert report["first"]["name"] == "ln0" and report["first"]["token"] == 0
    assert "NaN" in oracle.format_report(report)


@pytest.mark.parametrize("where", ["other", "reference", "both"])
def test_a_nan_is_reported_at_the_first_op_where_it_appears(reference_trace, where):
    """A NaN planted at layer 1's key, token 2, and carried into everything after (as a real
    NaN would be): the first divergence is exactly there, whichever trace holds it."""
    poisoned = {name: a.copy() for name, a in reference_trace.items()}
    poisoned["L1.k"][2, 5] = np.nan
    for name in oracle.order(poisoned)[oracle.order(poisoned).index("L1.k") + 1:]:
        poisoned[name][2:] = np.nan
    ref, other = {"other": (reference_trace, poisoned), "reference": (poisoned, reference_trace),
                  "both": (poisoned, poisoned)}[where]
    report = oracle.compare(ref, other)
    assert not report["ok"]
    assert (report["first"]["layer"], report["first"]["op"], report["first"]["token"]) == (1, "k", 2)


def test_compare_command_with_nan_trace(tmp_path, reference_trace):
    oracle.save_trace(tmp_path / "ref.npz", reference_trace)
    oracle.save_trace(tmp_path / "nan.npz", {k: np.full_like(v, np.nan) for k, v in reference_trace.items()})
    rc, out, err = run("compare", tmp_path / "nan.npz", tmp_path / "ref.npz")
    assert rc == 1 and "FIRST DIVERGENCE" in out and "Traceback" not in err, out + err


# ---------------------------------------------------------------------------------------------
# 3. NaN/Inf weights: found at load, named, never written
# ---------------------------------------------------------------------------------------------

def test_load_refuses_nan_weights_and_names_the_tensor(nan_model):
    with pytest.raises(CheckpointError, match=r"head\.weight.*check_finite=False"):
        tinyrwkv.load(nan_model, backend="numpy")
    model = tinyrwkv.load(nan_model, backend="numpy", check_finite=False)
    assert np.isnan(model.forward([1, 2])[0]).any()          # what the check protects from


def test_check_finite_finds_every_kind():
    """float32, float16, float64, bf16 bit patterns, non-contiguous views; integers skipped."""
    from tinyrwkv.formats.numerics import check_finite
    good = np.arange(12, dtype=np.float32).reshape(3, 4)
    check_finite({"a": good, "b": good.T, "c": to_bf16_bits(good), "i": np.arange(3)}, "x")
    for name, bad in [("f32", np.array([1, np.inf], np.float32)),
                      ("f16", np.array([1, np.inf], np.float16)),
                      ("f64", np.array([[np.nan]])),
                      ("bf16", to_bf16_bits(np.array([1, -np.inf, np.nan], np.float32))),
                      ("view", np.pad(np.ones((4, 4)), 1, constant_values=np.nan)[:, 0])]:
        with pytest.raises(CheckpointError, match=f"x: .*{name}"):
            check_finite({"ok": good, name: bad}, "x")


def test_check_finite_is_exact_where_a_sum_overflows():
    """Finite values whose sum overflows (the fast path's false alarm) are not NaN/Inf."""
    from tinyrwkv.formats.numerics import check_finite
    big = np.full(1000, 3e38, np.float32)
    check_finite({"big": big}, "x")


def test_generate_with_nan_weights_is_an_error_not_silence(nan_model):
    rc, out, err = run("generate", "--model", nan_model, "Once", "-t", "0", "-n", "5")
    assert_one_error_line(rc, err, "head.weight", "--no-check-finite")
    assert out == ""
    rc, out, err = run("generate", "--model", nan_model, "Once", "-t", "0", "-n", "5",
                       "--no-check-finite", "--backend", "numpy")
    assert_one_error_line(rc, err, "NaN")                   # caught at the first sampled token


def test_merge_lora_refuses_to_write_nan(tmp_path):
    w = tiny_weights(vocab_size=50)
    save_safetensors(tmp_path / "base.safetensors", w)
    lora = {"blocks.0.att.key.lora_A": np.ones((2, 64), np.float32),
            "blocks.0.att.key.lora_B": np.full((64, 2), np.nan, np.float32)}
    save_safetensors(tmp_path / "lora.safetensors", lora)
    out = tmp_path / "out.safetensors"
    rc, _, err = run("merge-lora", tmp_path / "base.safetensors", tmp_path / "lora.safetensors",
                     out, "--alpha", "8", "--type", "f32")
    assert_one_error_line(rc, err, "blocks.0.att.key.lora_B")
    assert not out.exists()


@needs_shared_data
@pytest.mark.filterwarnings("ignore:overflow:RuntimeWarning", "ignore:invalid:RuntimeWarning")
def test_train_stops_when_it_diverges_and_writes_no_model(tmp_path, capsys):
    """--lr 1e30 overflows in the first updates: the run stops with the step and the fix, and no
    NaN model (nor a NaN checkpoint) is written."""
    text = SHAKESPEARE.read_text()[:20000]
    (tmp_path / "train.txt").write_text(text[:16000])
    (tmp_path / "valid.txt").write_text(text[16000:])
    out = tmp_path / "run"
    rc, err = in_process(capsys, "train", "--data", tmp_path / "train.txt", "--out", out,
                         "--vocab", "300", "--layers", "1", "--width", "32", "--head-size", "16",
                         "--batch", "2", "--ctx", "16", "--steps", "6", "--warmup", "1",
                         "--lr", "1e30", "--eval-every", "2", "--eval-windows", "2",
                         "--sample-every", "0", "--backend", "numpy", "--clip", "0")
    assert_one_error_line(rc, err, "diverged", "--lr")
    assert not (out / "model.safetensors").exists()
    if (out / "train_state.npz").exists():
        with np.load(out / "train_state.npz") as f:
            assert all(np.isfinite(f[k]).all() for k in f.files if k.startswith("p:"))


# ---------------------------------------------------------------------------------------------
# 4. one clear line for every error a user can cause
# ---------------------------------------------------------------------------------------------

def test_input_text_that_is_not_utf8_names_the_file(tmp_path):
    model = tmp_path / "m.safetensors"
    save_safetensors(model, tiny_weights(vocab_size=97))
    ids = tmp_path / "ids.txt"
    ids.write_bytes(b"1 2 \xff\xfe 3")
    rc, _, err = run("trace", "--model", model, "--ids", ids, "--out", tmp_path / "t.npz")
    assert_one_error_line(rc, err, str(ids), "UTF-8")
    rc, _, err = run("generate", stdin=b"Once upon \xff a time")
    assert_one_error_line(rc, err, "stdin", "UTF-8")


def test_os_errors_name_the_file_and_the_fix(tmp_path):
    model = tmp_path / "m.safetensors"
    save_safetensors(model, tiny_weights(vocab_size=97))
    rc, _, err = run("trace", "--model", model, "--ids", tmp_path, "--out", tmp_path / "t.npz")
    assert_one_error_line(rc, err, str(tmp_path), "is a folder")
    if os.path.exists("/dev/full"):                       # Linux: every write fails with ENOSPC
        with open("/dev/full", "w") as full:
            proc = subprocess.run([sys.executable, "-m", "tinyrwkv", "generate", "-n", "3", "hi"],
                                  stdout=full, stderr=subprocess.PIPE, cwd=ROOT, timeout=300,
                                  env=dict(os.environ, PYTHONPATH=str(ROOT)))
        assert_one_error_line(proc.returncode, proc.stderr.decode(), "stdout", "no space left",
                              "free")


def test_a_missing_optional_package_is_one_line(capsys):
    from tinyrwkv.cli import one_line_errors
    with pytest.raises(SystemExit) as e, one_line_errors():
        raise ModuleNotFoundError("No module named 'gguf'", name="gguf")
    assert_one_error_line(e.value.code, capsys.readouterr().err, "pip install gguf")


def test_a_bug_keeps_its_traceback_and_says_it_is_a_bug(capsys):
    """An exception no user input can cause: the traceback stays (it is what a fix needs), and a
    last line says it is a bug, not the user's fault."""
    from tinyrwkv.cli import one_line_errors
    with pytest.raises(SystemExit) as e, one_line_errors():
        {}["no such key"]
    err = capsys.readouterr().err
    assert e.value.code == 1
    assert "Traceback" in err and "KeyError" in err
    assert err.strip().splitlines()[-1].startswith("tinyrwkv: internal error")
    assert "bug" in err.strip().splitlines()[-1]


def test_keyboard_interrupt_is_exit_130(capsys):
    from tinyrwkv.cli import one_line_errors
    with pytest.raises(SystemExit) as e, one_line_errors():
        raise KeyboardInterrupt
    assert e.value.code == 130 and "Traceback" not in capsys.readouterr().err


@pytest.mark.skipif(sys.platform == "win32", reason="SIGINT to a child process: POSIX")
def test_ctrl_c_in_chat_is_exit_130():
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "tinyrwkv", "chat"], cwd=ROOT, env=env,
                            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE)
    try:
        ready = proc.stderr.readline()                   # the model summary: now it reads stdin
        assert b"tinyrwkv:" in ready, ready
        time.sleep(0.2)
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        proc.kill()
    assert proc.returncode == 130 and b"Traceback" not in err, err


# ---------------------------------------------------------------------------------------------
# 5. tokenizers: checked against the model wherever they come from; their failures caught
# ---------------------------------------------------------------------------------------------

def test_a_tokenizer_inside_the_model_folder_is_checked(tmp_path):
    """An HF folder whose tokenizer.json has 4096 ids, for a 300-row model."""
    write_hf(tmp_path / "hf", tiny_weights(vocab_size=300), HFTokenizer(SHIPPED_TOKENIZER))
    model = tinyrwkv.load(tmp_path / "hf", backend="numpy")
    assert model.tokenizer is None
    assert "4096 ids" in str(model.tokenizer_error) and "300 rows" in str(model.tokenizer_error)
    rc, _, err = run("generate", "--model", tmp_path / "hf", "hi")
    assert_one_error_line(rc, err, "4096 ids", "300 rows")


@pytest.mark.skipif(not have("gguf"), reason="the gguf package is not installed")
def test_a_world_vocabulary_inside_a_gguf_is_checked(tmp_path):
    """The issue's case: a GGUF whose vocabulary is the World one (65530 ids), 300 rows. The
    writer refuses to make such a file; a crafted one is refused by the reader
    (tests/test_hostile_readers.py, "world-for-50-rows")."""
    from tinyrwkv.formats import write_gguf
    with pytest.raises(ValueError, match="World vocabulary"):
        write_gguf(tmp_path / "m.gguf", tiny_weights(vocab_size=300), "f32",
                   tokenizer=WorldTokenizer())
    assert not (tmp_path / "m.gguf").exists()


def tokenizer_file(tmp_path, name, change):
    spec = json.loads(SHIPPED_TOKENIZER.read_text())
    change(spec)
    path = tmp_path / name
    path.write_text(json.dumps(spec))
    return path


# A Split pre-tokenizer whose regex backtracks without end on a run of "a"s not followed by the
# end: Oniguruma gives up ("retry-limit-in-match over") and the tokenizers library panics
# (pyo3_runtime.PanicException, a BaseException) inside encode.
CATASTROPHIC = {"type": "Split", "pattern": {"Regex": "(a*)*$"}, "behavior": "Isolated",
                "invert": False}
PANIC_TEXT = "a" * 40 + "b"


def test_a_panicking_tokenizer_is_a_tokenizer_error(tmp_path):
    path = tokenizer_file(tmp_path, "panic.json", lambda s: s.update(pre_tokenizer=CATASTROPHIC))
    tok = HFTokenizer(path)
    with pytest.raises(TokenizerError, match="panic.json"):
        tok.encode(PANIC_TEXT)
    assert tok.encode("hi")                                 # the tokenizer still works after it
    from tinyrwkv.tokenizer import is_rust_panic
    assert not is_rust_panic(KeyboardInterrupt()) and not is_rust_panic(ValueError())


@pytest.mark.skipif(os.name != "posix", reason="needs resource.RLIMIT_AS")
def test_a_sparse_token_id_is_refused_before_the_library_allocates(tmp_path):
    """Found by tests/hostile_report.py: one token given the id 2**31 in a 1 KB tokenizer.json
    made the tokenizers library size its id table by that id; under a 2 GiB memory limit the
    process aborted (SIGABRT, no Python error). The ids are checked before the library sees the
    file. Run in a child under the limit, so a regression aborts the child, not the tests."""
    path = tokenizer_file(tmp_path, "sparse.json",
                          lambda s: s["model"]["vocab"].update({"zzz": 2**31}))
    code = ("import resource; resource.setrlimit(resource.RLIMIT_AS, (2**31, 2**31))\n"
            "from tinyrwkv.tokenizer import HFTokenizer, TokenizerError\n"
            f"try: HFTokenizer({str(path)!r})\n"
            "except TokenizerError as e: print('refused:', e)\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)), timeout=120)
    assert done.returncode == 0, done.stderr[-500:]
    assert "refused: sparse.json" in done.stdout and "2,147,483,648" in done.stdout


def test_bad_tokenizer_files_in_the_cli(tmp_path, nan_model):
    model = tmp_path / "m.safetensors"
    save_safetensors(model, tiny_weights())
    panic = tokenizer_file(tmp_path, "panic.json", lambda s: s.update(pre_tokenizer=CATASTROPHIC))
    rc, _, err = run("generate", "--model", model, "--tokenizer", panic, PANIC_TEXT, "-n", "2",
                     env={"RUST_BACKTRACE": "0"})
    assert_one_error_line(rc, err, "panic.json")
    not_json = tmp_path / "notjson.json"
    not_json.write_text("this is { not json")
    unknown = tokenizer_file(tmp_path, "unknown.json", lambda s: s["model"].update(type="Nope"))
    for bad in (not_json, unknown):
        rc, _, err = run("generate", "--model", model, "--tokenizer", bad, "hi", "-n", "2")
        assert_one_error_line(rc, err, bad.name)


def test_train_with_a_bad_tokenizer_file(tmp_path, capsys):
    (tmp_path / "train.txt").write_text("Once upon a time. " * 50)
    (tmp_path / "valid.txt").write_text("Once upon a time. " * 10)
    not_json = tmp_path / "notjson.json"
    not_json.write_text("this is { not json")
    rc, err = in_process(capsys, "train", "--data", tmp_path / "train.txt", "--out", tmp_path / "o",
                         "--tokenizer", not_json, "--backend", "numpy")
    assert_one_error_line(rc, err, "notjson.json")
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("caf\xe9 ".encode("latin-1") * 50)
    rc, err = in_process(capsys, "train", "--data", latin1, "--valid", tmp_path / "valid.txt",
                         "--out", tmp_path / "o2", "--backend", "numpy")
    assert_one_error_line(rc, err, "latin1.txt", "UTF-8")


@pytest.mark.parametrize("content", [b"hello", b"", b"PK\x03\x04 cut short", "npy"])
def test_compare_refuses_files_that_are_not_traces(tmp_path, capsys, reference_trace, content):
    bad = tmp_path / "bad.npz"
    if content == "npy":
        np.save(tmp_path / "bad.npy", np.zeros(3))
        (tmp_path / "bad.npy").rename(bad)
    else:
        bad.write_bytes(content)
    oracle.save_trace(tmp_path / "ref.npz", reference_trace)
    rc, err = in_process(capsys, "compare", tmp_path / "ref.npz", bad)
    assert_one_error_line(rc, err, str(bad), "is not a readable trace")


@pytest.mark.parametrize("arguments, word", [
    (dict(threads=0), "threads"), (dict(threads=1.5), "threads"), (dict(device=-1), "device"),
    (dict(dtype="nonsense"), "dtype")])
def test_load_checks_its_arguments_before_reading(arguments, word):
    with pytest.raises(ValueError, match=word):
        tinyrwkv.load("no-such-file.safetensors", **arguments)


def test_stream_checks_max_tokens():
    model = tinyrwkv.RWKV7(tiny_weights(vocab_size=97))
    session = tinyrwkv.Session(model, None)
    session.feed([1, 2])
    for bad in (math.nan, -1, 2.5):
        with pytest.raises(ValueError, match="max_tokens"):
            next(session.stream(bad))


@pytest.mark.parametrize("code, words", [
    (errno.EACCES, ("/x/m.pth", "permission denied", "permissions")),
    (errno.ENOSPC, ("/x/m.pth", "no space left", "free")),
    (errno.EROFS, ("/x/m.pth", "read-only", "elsewhere")),
    (errno.ENOENT, ("/x/m.pth", "no such file", "check the path"))])
def test_os_errors_are_one_line_with_the_fix(capsys, code, words):
    """Permission denied cannot be made for a test run as root: the OSError is raised here."""
    from tinyrwkv.cli import one_line_errors
    with pytest.raises(SystemExit) as e, one_line_errors():
        raise OSError(code, os.strerror(code), "/x/m.pth")
    assert_one_error_line(e.value.code, capsys.readouterr().err, *words)
