"""`tinyrwkv train`'s hygiene (issue 18, item 4): warm-up that scales with --steps and a clear error
when it does not fit, progress lines by wall time away from a terminal, a model card that describes
the actual run, and a loss-curve PNG (a one-line note without matplotlib). Tiny models, few steps,
no shared data."""
import argparse
import hashlib
import json
import sys

import numpy as np
import pytest

import tinyrwkv.model
from tinyrwkv import trainer
from tinyrwkv.synthetic import make_weights
from tinyrwkv.cli import build_parser, main

NAMES = ["Ann", "Bob", "Cat", "Dan", "Eve"]
THINGS = ["a red ball", "the old boat", "a small key", "the green door", "two blue cups"]


def corpus(seed, n):
    rng = np.random.default_rng(seed)
    docs = []
    for _ in range(n):
        a, b = rng.choice(NAMES, 2, replace=False)
        t = rng.choice(THINGS)
        docs.append(f"{a} saw {t}. {a} gave {t} to {b}. {b} was glad and said thank you.")
    return "\n<|endoftext|>\n".join(docs) + "\n<|endoftext|>\n"


def write_data(tmp_path):
    (tmp_path / "tales.txt").write_text(corpus(1, 200), encoding="utf-8")
    (tmp_path / "held.txt").write_text(corpus(2, 40), encoding="utf-8")
    return tmp_path / "tales.txt", tmp_path / "held.txt"


def parse(*extra):
    return build_parser().parse_args(["train", "--data", "d.txt", "--out", "o", *extra])


def test_warmup_that_does_not_fit_is_a_usage_error_naming_both(capsys):
    for warmup in ("100", "150"):
        with pytest.raises(SystemExit) as e:
            parse("--steps", "100", "--warmup", warmup)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert f"--warmup {warmup}" in err and "--steps 100" in err
        assert "below 100" in err and "e.g. 5" in err               # the fix, with a number
    with pytest.raises(ValueError, match="--warmup 10 does not fit in --steps 10"):
        trainer.check_config(argparse.Namespace(**{**vars(parse("--steps", "20")),
                                                   "steps": 10, "warmup": 10}))


def test_default_warmup_scales_with_steps_and_the_lr_peaks_early():
    assert parse().warmup == 100                                   # the default 2000 steps: as before
    assert parse("--steps", "100").warmup == 5
    assert parse("--steps", "10").warmup == 0                      # too short for one: none
    assert parse("--steps", "100", "--warmup", "30").warmup == 30  # given: kept
    args = parse("--steps", "100")
    lrs = [trainer.lr_at(s, args) for s in range(args.steps)]
    assert int(np.argmax(lrs)) == 4 and lrs[-1] < 0.2 * args.lr  # peak after warm-up, then decay
    ns = argparse.Namespace(**{k: v for k, v in vars(parse("--steps", "40")).items()
                               if k != "warmup"})                  # from Python, no warmup at all
    trainer.check_config(ns)
    assert ns.warmup == 2


def test_progress_prints_by_wall_time_away_from_a_terminal(capsys):
    now = [0.0]
    progress = trainer.Progress(1000, last=30, every=5.0, clock=lambda: now[0])
    printed = []
    for step in range(1, 31):
        now[0] += 1.0                                              # one second a step
        progress(step, 2.0, 100.0, 1e-3, step)
        if capsys.readouterr().err:
            printed.append(step)
    assert printed == [5, 10, 15, 20, 25, 30]                      # every 5 s, and the run's end
    progress = trainer.Progress(1000, every=5.0, clock=lambda: now[0])
    for step in range(1, 51):
        progress(step, 2.0, 100.0, 1e-3, step)                     # no time passes: every 50 steps
    assert capsys.readouterr().err.count("\n") == 1


def test_loss_curve_without_matplotlib_is_one_note(tmp_path, monkeypatch, capsys):
    log = tmp_path / "log.jsonl"
    log.write_text("".join(json.dumps({"step": s, "loss": 5.0 - s / 10}) + "\n"
                           for s in range(1, 11)))
    curve = [{"step": 5, "valid_loss": 4.8}, {"step": 10, "valid_loss": 4.5}]
    png = tmp_path / "loss_curve.png"
    monkeypatch.setitem(sys.modules, "matplotlib", None)           # import matplotlib fails
    plotted = trainer.write_loss_curve(png, log, curve)
    assert plotted is False and not png.exists()
    plotted = trainer.write_loss_curve(png, log, curve, plotted)   # said once only
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and "matplotlib" in err and "loss_curve.png" in err
    monkeypatch.undo()
    pytest.importorskip("matplotlib")
    assert trainer.write_loss_curve(png, log, curve) is True
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_model_card_describes_the_run(tmp_path, capsys):
    data, valid = write_data(tmp_path)
    out = tmp_path / "run"
    argv = ["train", "--data", str(data), "--valid", str(valid), "--out", str(out),
            "--vocab", "300", "--layers", "1", "--width", "32", "--head-size", "16",
            "--batch", "2", "--ctx", "16", "--steps", "6", "--eval-every", "3",
            "--eval-windows", "4", "--sample-every", "0", "--backend", "numpy", "--seed", "1"]
    try:
        main(argv)
    except SystemExit as e:
        assert e.code in (0, None)
    card = (out / "MODEL_CARD.md").read_text()
    blob = data.read_bytes()
    assert "tales.txt" in card and f"{len(blob):,} bytes" in card
    assert hashlib.sha256(blob).hexdigest() in card
    assert hashlib.sha256(valid.read_bytes()).hexdigest() in card
    assert "byte-level BPE trained by this run on `tales.txt`" in card and "300 tokens" in card
    assert "tinyrwkv train --data " + str(data) in card and "--steps 6 " in card
    assert 'license: "unknown: fill in the data\'s licence"' in card
    for template in ("TinyStories", "CDLA", "shipped", "children's stories", "Once upon a time"):
        assert template not in card, template
    assert "validation bits per byte" in card and "best, nats/token" in card
    lines = card.splitlines()
    samples = [line[2:] for before, line in zip(lines, lines[1:])
               if line.startswith("> ") and not before.startswith(">")]  # each sample's start
    assert len(samples) == 3
    assert samples and all(s.split()[0] in NAMES for s in samples)  # prompts from held.txt
    result = json.loads((out / "result.json").read_text())
    assert f"**{result['valid_bits_per_byte']:.3f}**" in card
    steps = [json.loads(line)["step"] for line in (out / "log.jsonl").read_text().splitlines()]
    assert steps == list(range(1, 7))
    if (out / "loss_curve.png").exists():
        assert "![learning curve](loss_curve.png)" in card
    else:
        assert "matplotlib" in capsys.readouterr().err

    assert "beside the data" not in card

    def card_with(**changes):
        args = {**vars(parse("--steps", "6")), "data": str(data), "out": str(out),
                "backend": "numpy", **changes}
        trainer.check_config(argparse.Namespace(**args))
        trainer.write_card(argparse.Namespace(**args),
                           {"n_params": 1, "bytes": 1, "wall_seconds": 1.0, "kept_step": 6,
                            "valid_bits_per_byte": 2.0, "valid_bits_per_byte_per_document": 2.1,
                            "documents": "blank lines", "output": "model.safetensors"},
                           [], ["Ann saw"], 100, 300,
                           {"tokenizer": "t", "train_bytes": 400, "valid_path": str(valid),
                            "mode": "scratch", "n_trained": 1, "tokenizer_file": None,
                            "config": tinyrwkv.model.Config.from_weights(
                                make_weights(2, 64, 300, head_size=32))})
        return (out / "MODEL_CARD.md").read_text()

    card = card_with(data_license="CC0-1.0")
    assert 'license: "CC0-1.0"' in card and "unknown" not in card
    (tmp_path / "PROVENANCE.md").write_text("where the tales came from")
    card = card_with()
    assert "fill in the data's licence (see PROVENANCE.md beside the data)" in card
