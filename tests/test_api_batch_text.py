"""The Python API takes text and lists of prompts (model.embed, tinyrwkv.generate), and models and
states print as their facts (repr). Text must give exactly what its token ids give; a list exactly
what its prompts give one by one (batched decode is bit-identical to one sequence at a time on the
numpy and numba backends: tests/test_batched.py)."""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.formats import save_safetensors
from tinyrwkv.synthetic import make_weights

from conftest import ROOT, have

TOKENIZER = ROOT / "weights" / "model.tokenizer.json"      # the shipped 4096-token BPE
BACKENDS = ["numpy"] + (["numba"] if have("numba") else [])
PROMPTS = ["Once upon a time", "The little dog ran", "Hi"]


@pytest.fixture(scope="module")
def model_file(tmp_path_factory):
    path = tmp_path_factory.mktemp("m") / "tiny.safetensors"
    save_safetensors(path, make_weights(2, 64, 4096, head_size=32, seed=5))
    return path


@pytest.fixture(scope="module", params=BACKENDS)
def model(request, model_file):
    return tinyrwkv.load(model_file, tokenizer=str(TOKENIZER), backend=request.param)


def test_embed_text_is_embed_of_its_ids(model):
    for text in PROMPTS:
        ids = model.tokenizer.encode(text)
        assert np.array_equal(model.embed(text), model.embed(ids))
        assert np.array_equal(model.embed(text, pool="mean"), model.embed(ids, pool="mean"))


def test_embed_list_is_one_row_per_prompt(model):
    mixed = [PROMPTS[0], model.tokenizer.encode(PROMPTS[1]), PROMPTS[2]]
    rows = model.embed(mixed)
    assert rows.shape == (3, model.config.n_embd)
    for row, prompt in zip(rows, PROMPTS):
        assert np.array_equal(row, model.embed(prompt))


def test_generate_text_is_generate_of_its_ids(model):
    for text in PROMPTS:
        from_text = "".join(tinyrwkv.generate(model, text, max_tokens=12, seed=3))
        from_ids = "".join(tinyrwkv.generate(model, model.tokenizer.encode(text), max_tokens=12,
                                             seed=3))
        assert from_text == from_ids and from_text


def test_generate_list_equals_one_by_one(model):
    batch = tinyrwkv.generate(model, PROMPTS, max_tokens=12, seed=[1, 2, 3], temperature=1.0)
    alone = ["".join(tinyrwkv.generate(model, p, max_tokens=12, seed=s, temperature=1.0))
             for p, s in zip(PROMPTS, [1, 2, 3])]
    assert isinstance(batch, list) and len(batch) == len(PROMPTS)
    assert batch == alone
    # text and ids mixed in one list: the same continuations
    mixed = [PROMPTS[0], model.tokenizer.encode(PROMPTS[1]), PROMPTS[2]]
    assert tinyrwkv.generate(model, mixed, max_tokens=12, seed=[1, 2, 3], temperature=1.0) == alone


def test_model_repr_states_the_facts(model, model_file):
    text = repr(model)
    c = model.config
    for fact in ("RWKV7", "'tiny.safetensors'", f"L{c.n_layer}", f"C{c.n_embd}", f"H{c.n_head}",
                 f"V{c.vocab_size}", f"{model.n_params / 1e6:.1f}M params", model.backend,
                 "float32"):
        assert fact in text, (fact, text)
    assert "\n" not in text and len(text) < 120


def test_numpy_float64_model_repr_says_float64(model_file):
    model = tinyrwkv.load(model_file, tokenizer=str(TOKENIZER), backend="numpy", dtype="float64")
    assert repr(model).endswith("numpy float64>")


def test_state_reprs(model):
    c = model.config
    zero = model.zero_state()
    _, read = model.forward(model.tokenizer.encode("Once upon a time"))
    for state, zeros in ((zero, "zeros"), (read, "not zeros")):
        text = repr(state)
        nbytes = c.n_layer * c.n_embd * (c.head_size + 2) * 4      # docs/architecture.md §5
        assert text.startswith("<State ") and text.endswith(f", {zeros}>"), text
        for fact in (f"L{c.n_layer}", f"H{c.n_head}x{c.head_size}", "float32",
                     f"{nbytes / 1e3:.1f} kB"):
            assert fact in text, (fact, text)
        assert state.nbytes == nbytes
    batch = model.batch_state([zero, read, None])
    text = repr(batch)
    assert text.startswith("<BatchState B3 ") and "2 of 3 zeros" in text, text
    assert f"{3 * nbytes / 1e3:.1f} kB" in text


def test_text_without_a_tokenizer_says_how_to_fix_it(model_file):
    bare = tinyrwkv.RWKV7(make_weights(2, 64, 4096, head_size=32, seed=5))
    assert bare.tokenizer is None
    with pytest.raises(ValueError, match="no tokenizer.*tokenizer="):
        bare.embed("Once upon a time")
    with pytest.raises(ValueError, match="no tokenizer.*tokenizer="):
        tinyrwkv.generate(bare, "Once upon a time")            # at the call, not the first piece
    with pytest.raises(ValueError, match="no tokenizer"):
        tinyrwkv.generate(bare, ["a", "b"])
    assert bare.embed([1, 2, 3]).shape == (64,)                  # ids need no tokenizer
    tok = tinyrwkv.get_tokenizer(4096, str(TOKENIZER))
    assert np.array_equal(bare.embed("Once", tokenizer=tok), bare.embed(tok.encode("Once")))


def test_forward_given_text_names_the_fix(model):
    with pytest.raises(ValueError, match="token ids, not text.*encode"):
        model.forward("Once upon a time")
