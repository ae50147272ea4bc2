"""`tinyrwkv train --init-from` end to end, in its three modes, on a small base model trained here
on Shakespeare and fine-tuned on children's stories (a new style):

* every weight: DIR/model.safetensors with the base's tokenizer beside it;
* LoRA: DIR/lora_adapter.pth, in RWKV-PEFT's format: torch.load reads it, RWKV-PEFT's merge
  rule (rewritten here in torch) and `tinyrwkv merge-lora` make the same model, and that model
  scores what the trainer reported;
* state tuning: DIR/time_state.pth, which the official package (as a state) and tinyrwkv's
  `--state` load, with the same logits.

Tolerances: merged models and bits per byte computed along two float32 paths (the trainer merges
in float32, merge-lora in float64 then rounds): 1e-4 relative, ~100x the float32 rounding of a
bits/byte summed over a few thousand tokens and far below a wrong merge (percents). The official
package against tinyrwkv: conftest.TOL_F32, as every official comparison.
"""
import json

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv import train as train_math
from tinyrwkv.cli import main
from tinyrwkv.evaluate import evaluate_text
from tinyrwkv.formats import read_checkpoint
from tinyrwkv.formats.lora import read_start_state
from tinyrwkv.formats.pth_writer import save_pth

from conftest import (ROOT, SHAKESPEARE, TOL_F32, have, needs_official, needs_shared_data,
                      rel_err, run_official)

pytestmark = needs_shared_data

STORIES = ROOT / "chapters" / "data" / "stories_slice.txt"
MERGE_TOL = 1e-4


def cli(*args):
    try:
        main([str(a) for a in args])
    except SystemExit as e:
        assert e.code in (0, None), e.code


@pytest.fixture(scope="module")
def base(tmp_path_factory):
    """A 2-layer, head-size-64 model (the official package's head size) trained briefly on
    Shakespeare, with its own 300-token tokenizer beside it; and the stories to fine-tune on."""
    d = tmp_path_factory.mktemp("base")
    text = SHAKESPEARE.read_text()
    (d / "train.txt").write_text(text[:40000])
    (d / "valid.txt").write_text(text[40000:48000])
    cli("train", "--data", d / "train.txt", "--out", d / "run", "--vocab", 300, "--layers", 2,
        "--width", 128, "--head-size", 64, "--batch", 4, "--ctx", 24, "--steps", 12,
        "--lr", 3e-3, "--eval-every", 6, "--eval-windows", 4, "--sample-every", 0, "--seed", 1,
        "--backend", "numpy", "--threads", 1,
        "--save-dtype", "float32")
    stories = STORIES.read_text()
    cut = stories.index("<|endoftext|>", 30000) + len("<|endoftext|>")
    (d / "stories.txt").write_text(stories[:cut])
    (d / "stories_valid.txt").write_text(stories[cut:])
    return d


def finetune(base, out, *extra):
    cli("train", "--init-from", base / "run" / "model.safetensors", "--data", base / "stories.txt",
        "--valid", base / "stories_valid.txt", "--out", out, "--batch", 4, "--ctx", 32,
        "--steps", 12, "--eval-every", 4, "--eval-windows", 8, "--sample-every", 0, "--seed", 2,
        "--backend", "numpy", "--threads", 1, *extra)     # one thread: bit-exact reruns
    losses = [json.loads(line)["loss"] for line in (out / "log.jsonl").read_text().splitlines()]
    result = out / "result.json"
    return losses, json.loads(result.read_text()) if result.is_file() else None


def per_document(model, path, state=None):
    return evaluate_text(model, path.read_text(), per_document=True, separator="<|endoftext|>",
                         state=state)["bits_per_byte"]


def test_full_fine_tune_keeps_the_tokenizer_and_learns(base, tmp_path):
    losses, result = finetune(base, tmp_path / "full", "--lr", 3e-3)
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert result["mode"] == "full" and result["before"] is not None
    assert result["valid_bits_per_byte_per_document"] < result["before"]["per_document"]
    model = tinyrwkv.load(tmp_path / "full" / "model.safetensors", backend="numpy")
    assert model.tokenizer.vocab_size == 300
    assert (tmp_path / "full" / "model.tokenizer.json").read_bytes() == \
        (base / "run" / "model.tokenizer.json").read_bytes()
    card = (tmp_path / "full" / "MODEL_CARD.md").read_text()
    assert "fine-tuned on `stories.txt` (full)" in card and "before (the base model)" in card


def test_lora_adapter_is_rwkv_peft_format_and_merges(base, tmp_path):
    out = tmp_path / "lora"
    losses, result = finetune(base, out, "--lora", 4, "--lora-alpha", 8, "--lr", 1e-2,
                              "--save-dtype", "float32")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert result["valid_bits_per_byte_per_document"] < result["before"]["per_document"]
    adapter = out / "lora_adapter.pth"
    lora = read_checkpoint(adapter)
    expected = {f"blocks.{i}.{t}.lora_{ab}" for i in range(2) for t in train_math.LORA_TARGETS
                for ab in "AB"}
    assert set(lora) == expected
    assert lora["blocks.0.att.key.lora_A"].shape == (4, 128)        # (r, in)
    assert lora["blocks.1.ffn.value.lora_B"].shape == (128, 4)      # (out, r)
    assert not (out / "model.safetensors").exists()
    # tinyrwkv merge-lora reads it; the merged model scores what the trainer reported
    merged = tmp_path / "merged.safetensors"
    cli("merge-lora", "--alpha", 8, "--type", "f32", base / "run" / "model.safetensors", adapter,
        merged)
    model = tinyrwkv.load(merged, tokenizer=base / "run" / "model.tokenizer.json",
                          backend="numpy")
    bpb = per_document(model, base / "stories_valid.txt")
    assert abs(bpb - result["valid_bits_per_byte_per_document"]) < MERGE_TOL * bpb
    if have("torch"):                       # RWKV-PEFT's merge/merge_lora.py rule, in torch
        import torch
        w = {k: torch.tensor(v) for k, v in read_checkpoint(base / "run" / "model.safetensors",
                                                           dtype="float32").items()}
        w_lora = torch.load(adapter, map_location="cpu", weights_only=True)
        for k in list(w_lora):
            w[k] = w_lora[k]
        for k in list(w):
            if k.endswith(".weight") and k[:-len("weight")] + "lora_A" in w:
                A, B = w[k[:-len("weight")] + "lora_A"], w[k[:-len("weight")] + "lora_B"]
                w[k] = w[k] + B @ A * (8 / B.shape[1])
        ours = read_checkpoint(merged)
        for k, v in ours.items():
            assert np.abs(v - w[k].numpy()).max() <= 1e-6 * max(np.abs(v).max(), 1e-30), k


def test_lora_resume_is_exact(base, tmp_path):
    a, _ = finetune(base, tmp_path / "a", "--lora", 2, "--lr", 1e-2)
    finetune(base, tmp_path / "b", "--lora", 2, "--lr", 1e-2, "--stop-after", 5)
    b, _ = finetune(base, tmp_path / "b", "--lora", 2, "--lr", 1e-2, "--resume")
    assert a == b
    la, lb = (read_checkpoint(tmp_path / d / "lora_adapter.pth") for d in "ab")
    assert all(np.array_equal(la[k], lb[k]) for k in la)
    with pytest.raises(AssertionError, match="1"):      # exit 1: a LoRA checkpoint is not
        finetune(base, tmp_path / "b", "--state-tune", "--resume")     # resumed as a state tune


def test_state_tune_file_loads_in_tinyrwkv_and_the_official_package(base, tmp_path):
    out = tmp_path / "state"
    losses, result = finetune(base, out, "--state-tune", "--lr", 0.1, "--save-dtype", "float32")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]), losses
    assert result["valid_bits_per_byte_per_document"] < result["before"]["per_document"]
    tuned = read_checkpoint(out / "time_state.pth")
    assert set(tuned) == {"blocks.0.att.time_state", "blocks.1.att.time_state"}
    assert tuned["blocks.0.att.time_state"].shape == (2, 64, 64) and \
        np.abs(tuned["blocks.0.att.time_state"]).max() > 0
    model = tinyrwkv.load(base / "run" / "model.safetensors", backend="numpy")
    start = read_start_state(out / "time_state.pth", model.config)
    bpb = per_document(model, base / "stories_valid.txt", start)
    assert abs(bpb - result["valid_bits_per_byte_per_document"]) < MERGE_TOL * bpb
    # the generate/chat/eval option reads it
    cli("eval", "--model", base / "run" / "model.safetensors", "--state", out / "time_state.pth",
        "--per-document", "--separator", "<|endoftext|>", "--backend", "numpy",
        base / "stories_valid.txt")
    if not have("rwkv") or not have("torch"):
        pytest.skip("the official rwkv package (and torch) are not installed")
    pth = tmp_path / "base.pth"
    save_pth(pth, read_checkpoint(base / "run" / "model.safetensors", dtype="float32"))
    ids = model.tokenizer.encode("Once upon a time, a little dog found a ball.")
    job = {"pth": str(pth), "ids": ids, "split": len(ids) - 3, "init_state": None,
           "time_state": str(out / "time_state.pth"), "out": str(tmp_path / "official.npz")}
    ref = run_official([job], tmp_path)[0]
    logits, _ = model.forward(ids[:-3], start.copy(), full_output=True)
    assert rel_err(logits, ref["seq_logits"]) < TOL_F32
    plain, _ = model.forward(ids[:-3], full_output=True)    # the state is not a no-op
    assert rel_err(plain, ref["seq_logits"]) > 100 * TOL_F32


@pytest.mark.parametrize("extra, message", [
    (("--lora", "4"), "fine-tunes a model: give it with --init-from"),
    (("--state-tune",), "fine-tunes a model: give it with --init-from"),
    (("--init-from", "M", "--layers", "3"), "with --init-from the shape"),
    (("--init-from", "M", "--lora", "4", "--state-tune"), "give one of them"),
    (("--init-from", "M", "--lora", "4", "--lora-targets", "att.key,att.gate"),
     "--lora-targets att.gate"),
    (("--init-from", "M", "--lora-alpha", "8"), "give --lora RANK too"),
])
def test_fine_tuning_usage_errors(tmp_path, capsys, extra, message):
    with pytest.raises(SystemExit) as e:
        main(["train", "--data", "x.txt", "--out", str(tmp_path / "o"), *extra])
    assert e.value.code == 2
    assert message in capsys.readouterr().err


def test_the_kept_step_is_the_best_validation(base, tmp_path):
    """--keep best writes the parameters of the evaluation with the lowest validation loss (kept
    in the checkpoint as they were then); --keep last the last step's."""
    from tinyrwkv.trainer import read_training_checkpoint
    runs = {}
    for keep in ("best", "last"):
        out = tmp_path / keep
        _, result = finetune(base, out, "--lr", 3e-2, "--keep", keep, "--save-dtype", "float32")
        meta, params, _, best = read_training_checkpoint(out / "train_state.npz", "full")
        curve = meta["curve"]
        saved = read_checkpoint(out / "model.safetensors")
        runs[keep] = (result, curve, best, params, saved)
    result, curve, best, _, saved = runs["best"]
    assert result["kept_step"] == min(curve, key=lambda c: c["valid_loss"])["step"] == best[0]
    assert all(np.array_equal(saved[k], best[2][k].astype(np.float32)) for k in saved)
    result, curve, _, last, saved = runs["last"]
    assert result["kept_step"] == 12
    assert all(np.array_equal(saved[k], last[k].astype(np.float32)) for k in saved)


def test_windows_at_documents():
    from tinyrwkv.trainer import window_starts
    ids = np.array([5, 6, 0, 7, 8, 9, 0, 1, 2, 3, 4, 5, 0, 6, 7])
    starts = window_starts(ids, 4, 200, np.random.default_rng(0), "documents")
    assert set(starts.tolist()) == {2, 6}            # end-of-text ids with 4 + 1 tokens after
    plain = window_starts(np.arange(1, 30), 4, 50, np.random.default_rng(0), "documents")
    assert plain.min() >= 0 and plain.max() < 29 - 5 and len(set(plain.tolist())) > 5
