"""The model shipped in weights/: it is what tinyrwkv.load() and the CLI use by default, it fits
the size budget, it meets its model card's bits per byte, and it is a real RWKV-7: the official
package loads it (as a .pth) and computes the same logits."""
import json

import pytest

import tinyrwkv
from tinyrwkv.formats import read_checkpoint
from tinyrwkv.loader import shipped_model_path

from conftest import ROOT, SHARED, TOL_F32, needs_official, rel_err, run_official

WEIGHTS = ROOT / "weights"
pytestmark = pytest.mark.skipif(not (WEIGHTS / "model.safetensors").exists(),
                                reason="no shipped model in weights/")


def test_load_without_a_path_is_the_shipped_model_with_its_tokenizer():
    model = tinyrwkv.load()
    assert model.path == shipped_model_path() == WEIGHTS / "model.safetensors"
    assert model.tokenizer is not None and model.config.vocab_size == 4096
    ids = model.tokenizer.encode("Once upon a time, there was a little dog.")
    assert model.tokenizer.decode(ids) == "Once upon a time, there was a little dog."
    text = "".join(tinyrwkv.generate(model, "Once upon a time", max_tokens=20, seed=0))
    assert len(text) > 20


def test_shipped_files_fit_in_20_mb_and_the_card_states_the_result():
    size = sum(p.stat().st_size for p in WEIGHTS.iterdir() if p.name.startswith("model."))
    assert size <= 20e6, size
    card = (WEIGHTS / "MODEL_CARD.md").read_text()
    # the trainer's two numbers for the whole valid.txt (GPU machine), as the card states them;
    # the per-story one is measured again below on a slice, and in full by `tinyrwkv eval`
    assert "| **validation bits per byte** | **0.818** reading the whole validation file" in card
    assert "**0.830** reading each document" in card


def test_bits_per_byte_on_the_start_of_valid_txt():
    """The card's 0.818 is over all 802 kB of valid.txt read as one text (measured by the trainer
    on the GPU machine); here the first 40 kB, on the CPU: a slice of simple stories from the
    same distribution (measured 0.666 here, and 0.689 with the previous model, whose card said
    0.844: its first stories are easier than average), so the bound is the first issue's
    target, 1.0."""
    valid = SHARED / "data" / "tinystories-subset" / "valid.txt"
    if not valid.exists():
        pytest.skip(f"{valid} not found")
    from tokenizers import Tokenizer
    from tinyrwkv.trainer import bits_per_byte
    text = valid.read_text()[:40000]
    tok = Tokenizer.from_file(str(WEIGHTS / "model.tokenizer.json"))
    ids = []
    for n, piece in enumerate(text.split("<|endoftext|>")):
        ids += ([0] if n else []) + (tok.encode(piece.strip("\n")).ids if piece.strip("\n") else [])
    bpb = bits_per_byte(read_checkpoint(WEIGHTS / "model.safetensors", dtype="float32"), ids,
                        len(text.encode()))
    print(f"shipped model: {bpb:.3f} bits/byte on the first 40 kB of valid.txt")
    assert bpb < 1.0


@needs_official
def test_official_package_loads_the_shipped_model(tmp_path):
    """Converted to .pth (bf16, as stored), the official rwkv 0.8.32 (cpu fp32) gives the same
    logits and state as tinyrwkv on a story prompt, in sequence mode and token by token."""
    import torch
    weights = read_checkpoint(WEIGHTS / "model.safetensors", dtype="float32")
    pth = tmp_path / "shipped.pth"
    torch.save({k: torch.tensor(v).to(torch.bfloat16) for k, v in weights.items()}, pth)
    model = tinyrwkv.load()
    ids = model.tokenizer.encode("Once upon a time, there was a little girl named Lily. She")
    jobs = [dict(pth=str(pth), ids=ids, split=len(ids) - 3, init_state=None,
                 out=str(tmp_path / "o.npz"))]
    ref = run_official(jobs, tmp_path)[0]
    ours = tinyrwkv.load(backend="numpy")
    logits, state = ours.forward(ids[:-3], full_output=True)
    cont, state = ours.forward(ids[-3:], state)
    errs = {"seq_logits": rel_err(logits, ref["seq_logits"]),
            "cont_logits": rel_err(cont, ref["cont_logits"]),
            "wkv": rel_err(state.wkv, ref["seq_wkv"])}
    one, _ = ours.forward(ids, full_output=True, mode="recurrent")
    errs["one_logits"] = rel_err(one, ref["one_logits"])
    print("shipped model vs official:", json.dumps({k: f"{v:.1e}" for k, v in errs.items()}))
    assert max(errs.values()) < TOL_F32, errs


def test_cli_uses_the_shipped_model_without_model():
    import subprocess
    import sys
    proc = subprocess.run([sys.executable, "-m", "tinyrwkv", "generate", "Once upon a time",
                           "-n", "12", "--seed", "1"], capture_output=True, text=True, cwd=ROOT,
                          timeout=300)
    assert proc.returncode == 0, proc.stderr
    assert "model.safetensors" in proc.stderr and "model.tokenizer.json" in proc.stderr
    assert len(proc.stdout.strip()) > 10
