"""Text generation and chat on top of the forward pass.

A `Session` owns a model, a tokenizer and a state. `feed` reads text into the state; `stream`
samples tokens one at a time and yields text pieces as soon as they are complete UTF-8 (a piece
never splits a character) and cannot be the start of a stop string. Because RWKV is an RNN, the
state after a reply is all a chat needs to continue: nothing is re-read.
"""

from __future__ import annotations

import codecs
import re
import time

import numpy as np

from .checks import NON_NEGATIVE, check_int
from .sampling import Penalties, SamplingParams, sample_logits

CHAT_SAMPLING = dict(temperature=1.0, top_p=0.3, presence_penalty=0.5, frequency_penalty=0.5,
                     penalty_decay=0.996, penalty_exempt="")  # ChatRWKV API_DEMO_CHAT.py


class Session:
    """Model + tokenizer + state, for generation that continues where it left off.

    Attributes after use: `state` (the State after everything fed or generated), `logits` (the
    next-token logits), `generated` (every token id sampled so far), `stats` (prompt and
    generated token counts and seconds).
    """

    def __init__(self, model, tokenizer, state=None, seed=None):
        self.model, self.tokenizer = model, tokenizer
        self.state = state
        self.logits = None
        self.generated = []
        self.rng = np.random.default_rng(seed)
        self.stats = dict(prompt_tokens=0, prompt_seconds=0.0, tokens=0, seconds=0.0)

    def feed(self, text_or_ids, chunk_len=256):
        """Read text (or token ids) into the state. Long prompts go in chunks of `chunk_len` tokens
        (same result as one piece; bounds memory). Returns the next-token logits (V,)."""
        ids = self.tokenizer.encode(text_or_ids) if isinstance(text_or_ids, str) else list(text_or_ids)
        if not ids:
            raise ValueError("nothing to feed: the prompt encodes to no tokens")
        t0 = time.perf_counter()
        for start in range(0, len(ids), chunk_len):
            self.logits, self.state = self.model.forward(ids[start:start + chunk_len], self.state)
        self.stats["prompt_tokens"] += len(ids)
        self.stats["prompt_seconds"] += time.perf_counter() - t0
        return self.logits

    def stream(self, max_tokens=100, sampling=None, stop=(), stop_at_eot=True):
        """Generate up to `max_tokens` tokens, yielding text pieces.

        stop: strings that end the generation; the stop string itself is not yielded (the tokens
        that formed it are in the state, as in the official chat demo).
        stop_at_eot: end when the tokenizer's end-of-text token is sampled (it is not fed).
        """
        if self.logits is None:
            raise ValueError("feed a prompt before generating")
        check_int("max_tokens", max_tokens, NON_NEGATIVE)
        sampling = sampling or SamplingParams()
        penalties = Penalties(sampling)
        decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        eot = getattr(self.tokenizer, "eot_id", None)
        # Embedding rows past the tokenizer's last id (World: 65530..65535) have no text: never
        # sample them (a trained model gives them ~0 probability, an untrained one may not).
        max_id = getattr(self.tokenizer, "max_id", None)
        held = ""   # text decoded but not yet yielded: it may be the start of a stop string
        t0 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                logits = penalties.apply(self.logits)
                if max_id is not None:
                    logits[max_id + 1:] = -np.inf
                token = sample_logits(logits, sampling.temperature, sampling.top_p, sampling.top_k,
                                      self.rng)
                if stop_at_eot and token == eot:
                    break
                piece = self.tokenizer.decode_bytes([token])
                penalties.update(token, piece.decode("utf-8", errors="replace"))
                self.logits, self.state = self.model.forward([token], self.state)
                self.generated.append(token)
                self.stats["tokens"] += 1
                held += decoder.decode(piece)
                text, held, stopped = _split_at_stop(held, stop)
                if text:
                    yield text
                if stopped:
                    return
            held += decoder.decode(b"", final=True)
            text, _, _ = _split_at_stop(held, stop, final=True)
            if text:
                yield text
        finally:
            self.stats["seconds"] += time.perf_counter() - t0


def _split_at_stop(text, stop, final=False):
    """Split decoded text into (safe to show, hold back, stopped)."""
    for s in stop:
        i = text.find(s)
        if i >= 0:
            return text[:i], "", True
    if final or not stop:
        return text, "", False
    # Hold back the longest tail of `text` that is the beginning of some stop string.
    keep = 0
    for s in stop:
        for n in range(min(len(s) - 1, len(text)), keep, -1):
            if text.endswith(s[:n]):
                keep = n
                break
    return text[:len(text) - keep], text[len(text) - keep:], False


def generate(model, prompt, tokenizer=None, max_tokens=100, seed=None, stop=(), state=None,
             **sampling):
    """Stream a continuation of `prompt` as text pieces.

    `tokenizer` defaults to `model.tokenizer` (set by tinyrwkv.load); `sampling` takes the fields
    of SamplingParams (temperature, top_p, top_k, presence_penalty, ...).
    """
    tokenizer = tokenizer or model.tokenizer
    session = Session(model, tokenizer, state=state, seed=seed)
    session.feed(prompt)
    yield from session.stream(max_tokens, SamplingParams(**sampling), stop=stop)


def chat_message(text):
    """One user turn in the RWKV chat format (ChatRWKV API_DEMO_CHAT.py): the message stripped,
    runs of newlines collapsed to one (a blank line would end the turn), then the cue for the reply."""
    text = re.sub(r"\n+", "\n", text.replace("\r\n", "\n").strip())
    return f"User: {text}\n\nAssistant:"
