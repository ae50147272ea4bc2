"""Sampling, penalties and streaming generation."""
import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.generate import Session, _split_at_stop, chat_message
from tinyrwkv.sampling import Penalties, SamplingParams, sample_logits, sampling_probs
from tinyrwkv.synthetic import make_weights

from conftest import needs_official


@needs_official
@pytest.mark.parametrize("temperature, top_p, top_k", [
    (1.0, 0.85, 0), (0.7, 0.5, 0), (1.3, 0.95, 5), (1.0, 0.99, 0), (2.0, 0.3, 2), (1.0, 0.9, 1)])
def test_distribution_matches_official_pipeline(monkeypatch, temperature, top_p, top_k):
    """Capture the probabilities the official PIPELINE.sample_logits hands to np.random.choice and
    compare with ours on the same logits (random, with ties)."""
    import torch
    from rwkv import utils
    rng = np.random.default_rng(int(temperature * 100 + top_p * 10 + top_k))
    logits = rng.standard_normal(1000).astype(np.float32) * 3
    logits[10:20] = logits[9]                      # ties around the cutoff
    captured = {}
    monkeypatch.setattr(utils.np.random, "choice",
                        lambda a, p: captured.setdefault("p", np.array(p, dtype=np.float64)) is None or 0)
    pipeline = utils.PIPELINE.__new__(utils.PIPELINE)   # no tokenizer needed for sample_logits
    pipeline.sample_logits(torch.tensor(logits), temperature=temperature, top_p=top_p, top_k=top_k)
    ours = sampling_probs(logits, temperature, top_p, top_k)
    assert np.array_equal(ours > 0, captured["p"] > 0)
    assert np.allclose(ours, captured["p"], rtol=1e-5, atol=1e-9)


def test_greedy_and_seeded_sampling():
    logits = np.array([0.1, 3.0, 2.9, -1.0], dtype=np.float32)
    assert sample_logits(logits, temperature=0) == 1
    assert sample_logits(logits, top_p=0) == 1
    def draws(seed):
        rng = np.random.default_rng(seed)
        return [sample_logits(logits, 1.0, 1.0, 0, rng) for _ in range(20)]
    assert draws(3) == draws(3)
    rng = np.random.default_rng(0)
    counts = np.bincount([sample_logits(logits, 1.0, 1.0, 0, rng) for _ in range(4000)], minlength=4)
    expected = np.exp(logits) / np.exp(logits).sum() * 4000
    assert np.all(np.abs(counts - expected) < 5 * np.sqrt(expected) + 5)   # 5 sigma


def test_top_p_one_keeps_every_token():
    """The official code can turn greedy at top_p=1.0 (float32 cumsum < 1); ours keeps all."""
    logits = np.random.default_rng(0).standard_normal(65536).astype(np.float32)
    assert np.all(sampling_probs(logits, 1.0, 1.0, 0) > 0)


def test_top_k_and_bad_arguments():
    logits = np.arange(10, dtype=np.float32)
    p = sampling_probs(logits, 1.0, 1.0, 3)
    assert set(np.flatnonzero(p)) == {7, 8, 9}
    for bad in [dict(temperature=-1), dict(top_p=1.5), dict(top_k=-2)]:
        with pytest.raises(ValueError):
            sampling_probs(logits, **{**dict(temperature=1.0, top_p=0.9, top_k=0), **bad})


def test_penalties_follow_pipeline_generate():
    params = SamplingParams(presence_penalty=0.2, frequency_penalty=0.3, penalty_decay=0.5)
    pen = Penalties(params)
    pen.update(4, "cat")
    pen.update(4, "cat")       # 1 * 0.5 + 1
    pen.update(7, " ")         # exempt: counts 0 but is present
    pen.update(8, "12")        # a substring of " \t0123456789": exempt, as in the official code
    out = pen.apply(np.zeros(10, np.float32))
    assert np.isclose(out[4], -(0.2 + 0.3 * 1.5 * 0.25))
    assert np.isclose(out[7], -0.2) and np.isclose(out[8], -0.2) and out[0] == 0
    banned = Penalties(SamplingParams(ban_tokens=(0,))).apply(np.zeros(3, np.float32))
    assert banned[0] == -np.inf


@pytest.mark.parametrize("text, stop, expect", [
    ("hello wor", ["world"], ("hello ", "wor", False)),
    ("hello world!", ["world"], ("hello ", "", True)),
    ("abc", [], ("abc", "", False)),
    ("a\n", ["\n\n"], ("a", "\n", False)),
    ("a\n\nb", ["\n\n"], ("a", "", True)),
])
def test_stop_strings_hold_back_only_what_may_start_one(text, stop, expect):
    assert _split_at_stop(text, stop) == expect


class ByteTokenizer:
    """Token t < 256 is the byte t; 256 is end of text. Lets us force multi-byte splits."""
    name, vocab_size, eot_id = "bytes", 257, 256

    def encode(self, text):
        return list(text.encode())

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)


class ScriptedModel:
    """After a one-token prompt, predicts `script` token by token (one-hot logits), then end of text."""
    def __init__(self, script):
        self.script, self.fed = list(script), []

    def forward(self, ids, state=None):
        self.fed += list(ids)
        n = len(self.fed) - 1                                  # tokens generated so far
        logits = np.full(257, -1e9, np.float32)
        logits[self.script[n] if n < len(self.script) else 256] = 0
        return logits, n


def test_stream_never_splits_a_character_and_stops():
    text = "héllo 🙂 wörld. THE END and more"
    model = ScriptedModel(text.encode())
    session = Session(model, ByteTokenizer(), seed=0)
    session.feed("x")
    pieces = list(session.stream(200, SamplingParams(temperature=0), stop=["THE END"]))
    for piece in pieces:
        assert "\ufffd" not in piece                          # no character was cut in two
    assert "".join(pieces) == "héllo 🙂 wörld. "
    assert any(len(p.encode()) > 1 for p in pieces)             # multi-byte characters came whole
    assert model.fed[-1] == ord("D")                            # the stop text is in the state


def test_stream_stops_at_end_of_text():
    model = ScriptedModel(b"ok")
    session = Session(model, ByteTokenizer(), seed=0)
    session.feed("x")
    assert "".join(session.stream(50, SamplingParams(temperature=0))) == "ok"
    assert 256 not in model.fed                                 # end of text is not fed


def test_ids_past_the_tokenizer_are_never_sampled():
    """A model with more embedding rows than the tokenizer has ids (World: 65536 vs 65529)."""
    class Small(ByteTokenizer):
        max_id = 99
    model = ScriptedModel([])
    session = Session(model, Small(), seed=0)
    session.logits = np.zeros(257, np.float32)
    session.logits[200] = 50.0                      # the model's favourite has no text
    out = list(session.stream(30, SamplingParams(temperature=1.0, top_p=1.0), stop_at_eot=False))
    assert session.generated and max(session.generated) <= 99


def test_generate_is_reproducible_with_a_seed():
    model = tinyrwkv.RWKV7(make_weights(vocab_size=257))
    tok = ByteTokenizer()
    run = lambda seed: "".join(tinyrwkv.generate(model, "abc", tokenizer=tok, max_tokens=20, seed=seed,
                                                 temperature=1.0, top_p=1.0))
    assert run(5) == run(5)
    assert run(5) != run(6) or run(5) != run(7)


def test_session_continues_from_its_state():
    """Feeding a prompt and then generating equals one forward over prompt + generated tokens."""
    model = tinyrwkv.RWKV7(make_weights(vocab_size=257), dtype="float64")
    tok = ByteTokenizer()
    s = Session(model, tok, seed=1)
    s.feed("hi")
    out = "".join(s.stream(10, SamplingParams(temperature=0, presence_penalty=0, frequency_penalty=0),
                           stop_at_eot=False))
    assert len(s.generated) == 10
    assert out == tok.decode_bytes(s.generated).decode("utf-8", errors="replace")
    full = tok.encode("hi") + s.generated
    _, state = model.forward(full)
    assert np.allclose(state.wkv, s.state.wkv, atol=1e-12)


def test_chat_message_format():
    assert chat_message("  hi\r\n\n\nthere ") == "User: hi\nthere\n\nAssistant:"
