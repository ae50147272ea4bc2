"""`tinyrwkv eval` (tinyrwkv/evaluate.py): bits per byte against a direct float64 computation from
model.forward's logits, per-document reading from fresh states, the trainer's validation sharing
the same math, the command's JSON and table, and its errors."""
import json
import math

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import evaluate
from tinyrwkv.formats import save_safetensors
from tinyrwkv.synthetic import make_weights

from conftest import ROOT, have

TOKENIZER = ROOT / "weights" / "model.tokenizer.json"      # the shipped 4096-token BPE
DOCS = ["Once upon a time, a little cat named Tom found a red ball in the garden.",
        "Lily liked the café. \"It is naïve,\" she said, and smiled. 🙂 The end.",
        "The dog ran and ran.\nThen it slept under the big tree, happy and warm."]


@pytest.fixture(scope="module")
def files(tmp_path_factory):
    d = tmp_path_factory.mktemp("eval")
    for seed in (5, 6):
        save_safetensors(d / f"tiny{seed}.safetensors", make_weights(2, 64, 4096, head_size=32,
                                                                      seed=seed))
    (d / "docs.txt").write_text("\n\n".join(DOCS) + "\n", encoding="utf-8")
    return d


@pytest.fixture(scope="module")
def model(files):                     # float64: the chunked reading agrees with one pass to ~1e-12
    return tinyrwkv.load(files / "tiny5.safetensors", tokenizer=str(TOKENIZER), backend="numpy",
                         dtype="float64")


def direct_nats(model, text):
    """The definition, by hand: every token of the text predicted after the end-of-text token,
    from one forward pass over all of them, log-softmax in float64."""
    ids = [model.tokenizer.eot_id] + model.tokenizer.encode(text)
    logits, _ = model.forward(ids[:-1], full_output=True)
    logits = logits.astype(np.float64)
    log_p = logits - np.log(np.exp(logits - logits.max(-1, keepdims=True)).sum(-1, keepdims=True)) \
        - logits.max(-1, keepdims=True)
    return -float(log_p[np.arange(len(ids) - 1), ids[1:]].sum()), len(ids) - 1


def test_bits_per_byte_is_the_direct_computation(model):
    text = " ".join(DOCS)
    want_nats, n_tokens = direct_nats(model, text)
    n_bytes = len(text.encode("utf-8"))
    assert n_bytes > len(text)                           # non-ASCII: bytes, not characters
    for chunk in (7, 512):                               # chunks with the state carried, or one
        r = evaluate.evaluate_text(model, text, chunk=chunk)
        assert r["tokens"] == n_tokens and r["bytes"] == n_bytes and r["documents"] == 1
        assert r["nats"] == pytest.approx(want_nats, rel=1e-10)
        assert r["bits_per_byte"] == pytest.approx(want_nats / math.log(2) / n_bytes, rel=1e-10)
        assert r["perplexity"] == pytest.approx(math.exp(want_nats / n_tokens), rel=1e-10)
        assert r["mode"] == "continuous" and r["tokens_per_second"] > 0


def test_per_document_reads_each_from_a_fresh_state(model):
    text = "\n\n".join(DOCS)
    r = evaluate.evaluate_text(model, text, per_document=True)
    alone = [evaluate.evaluate_text(model, d) for d in DOCS]
    assert r["documents"] == len(DOCS) and r["mode"] == "per-document"
    assert r["nats"] == sum(a["nats"] for a in alone)       # exactly: the same computation
    assert r["tokens"] == sum(a["tokens"] for a in alone)
    assert r["bytes"] == sum(len(d.encode()) for d in DOCS)  # the documents', not the blank lines
    continuous = evaluate.evaluate_text(model, text)
    assert continuous["nats"] != pytest.approx(r["nats"])   # the carried state matters
    sep = evaluate.evaluate_text(model, "\n<|endoftext|>\n".join(DOCS), per_document=True,
                                 separator="<|endoftext|>")
    assert sep["nats"] == r["nats"] and sep["documents"] == len(DOCS)


def test_max_tokens_caps_the_tokens_predicted(model):
    r = evaluate.evaluate_text(model, "\n\n".join(DOCS), per_document=True, max_tokens=20)
    assert r["tokens"] == 20 and r["truncated"]
    assert not evaluate.evaluate_text(model, DOCS[0])["truncated"]


@pytest.mark.skipif(not have("tokenizers"), reason="the trainer needs the tokenizers package")
def test_trainer_and_eval_share_one_bits_per_byte(model, files, tmp_path):
    """The trainer's validation number (trainer.bits_per_byte over encode_file's ids) is eval's
    continuous reading with the separator: the same ids and the same math (evaluate.nats_of_ids),
    once both predict the first token after the end-of-text token."""
    from tinyrwkv import trainer
    from tinyrwkv.tokenizer import HFTokenizer
    path = tmp_path / "stories.txt"
    path.write_text("\n<|endoftext|>\n".join(DOCS) + "\n<|endoftext|>\n", encoding="utf-8")
    ids, n_bytes = trainer.encode_file(HFTokenizer(TOKENIZER), path)
    weights = make_weights(2, 64, 4096, head_size=32, seed=5)
    got = trainer.bits_per_byte(weights, np.concatenate([[0], ids]), n_bytes, backend="numpy")
    float32 = tinyrwkv.load(files / "tiny5.safetensors", tokenizer=str(TOKENIZER), backend="numpy")
    r = evaluate.evaluate_text(float32, path.read_text(encoding="utf-8"), separator="<|endoftext|>")
    assert r["bytes"] == n_bytes and r["tokens"] == len(ids)
    assert r["bits_per_byte"] == got


def cli(files, *argv):
    from tinyrwkv.cli import main
    return main(["eval", "--model", str(files / "tiny5.safetensors"), "--tokenizer",
                 str(TOKENIZER), "--backend", "numpy", *map(str, argv)])


def test_json_output(files, capsys):
    cli(files, files / "docs.txt", "--json", "--per-document")
    out = json.loads(capsys.readouterr().out)
    assert out["mode"] == "per-document" and out["separator"] == "blank line"
    (r,) = out["results"]
    for key in ("model", "path", "backend", "storage", "file", "mode", "documents", "tokens",
                "bytes", "nats", "bits_per_byte", "perplexity", "seconds", "tokens_per_second",
                "truncated"):
        assert key in r, key
    assert r["documents"] == len(DOCS) and r["backend"] == "numpy"
    assert r["bits_per_byte"] == pytest.approx(r["nats"] / math.log(2) / r["bytes"])


def test_compare_puts_models_in_one_table(files, capsys):
    other = files / "tiny6.safetensors"
    cli(files, files / "docs.txt", "--compare", other)
    out = capsys.readouterr().out.splitlines()
    assert out[0].startswith("continuous:")
    assert "bits/byte" in out[1] and "vs first" in out[1]
    first, second = out[2], out[3]
    assert "tiny5.safetensors float32" in first and "tiny6.safetensors float32" in second
    b1, b2 = (float(line.split()[6]) for line in (first, second))
    assert second.split()[7] == f"{b2 - b1:+.4f}"


@pytest.mark.parametrize("spec, want", [
    ("a.pth", ("a.pth", None)), ("a.pth:int8", ("a.pth", "int8")),
    (":bfloat16", ("main.pth", "bfloat16")), ("C:\\m\\a.pth", ("C:\\m\\a.pth", None)),
    ("x:y.pth", ("x:y.pth", None))])
def test_model_specs(spec, want):
    assert evaluate.parse_model_spec(spec, "main.pth") == want


@pytest.mark.parametrize("content, words", [
    (None, ["no such file", "check the path"]),
    (b"", ["is empty", "nothing to evaluate"]),
    (b"caf\xe9 au lait", ["not UTF-8", "0xE9", "save it as UTF-8"]),
    (b"\n\n  \n", ["no documents"])])
def test_errors_name_the_file_and_the_fix(files, tmp_path, capsys, content, words):
    path = tmp_path / "input.txt"
    if content is not None:
        path.write_bytes(content)
    with pytest.raises(SystemExit) as e:
        cli(files, path)
    assert e.value.code == 1
    err = capsys.readouterr().err
    assert err.startswith("tinyrwkv: error: ") and "input.txt" in err and err.count("\n") == 1
    for word in words:
        assert word in err, (word, err)


def test_a_model_without_a_tokenizer_is_refused_clearly(files):
    bare = tinyrwkv.RWKV7(make_weights(2, 64, 4096, head_size=32, seed=5))
    with pytest.raises(ValueError, match="no tokenizer.*tokenizer="):
        evaluate.evaluate_text(bare, "Once upon a time")


def test_progress_reaches_the_total(model):
    calls = []
    r = evaluate.evaluate_text(model, "\n\n".join(DOCS), per_document=True, chunk=5,
                               progress=lambda done, total: calls.append((done, total)))
    assert len(calls) > len(DOCS)                       # per chunk, not per document
    assert [d for d, _ in calls] == sorted(d for d, _ in calls)
    assert calls[-1] == (r["tokens"], r["tokens"])


def test_help_says_what_the_modes_are(capsys):
    import argparse
    from tinyrwkv.cli import HelpFormatter
    parser = argparse.ArgumentParser(prog="tinyrwkv")
    evaluate.add_parser(parser.add_subparsers(), HelpFormatter)
    with pytest.raises(SystemExit):
        parser.parse_args(["eval", "--help"])
    text = capsys.readouterr().out
    for words in ("bits per byte", "continuous", "--per-document", "--compare", "--separator",
                  "--json", "--max-tokens"):
        assert words in text, words
    assert "default: []" not in text
