"""Text generation and chat on top of the forward pass.

A `Session` owns a model, a tokenizer and a state. `feed` reads text into the state; `stream`
samples tokens one at a time and yields text pieces as soon as they are complete UTF-8 (a piece
never splits a character) and cannot be the start of a stop string. Because RWKV is an RNN, the
state after a reply is all a chat needs to continue: nothing is re-read.

Several prompts at once (`generate_batch`, `stream_batch`): each prompt is read into its own
Session (prefill one by one: prompts differ in length), then all are decoded together, one
`model.forward_batch` per step, so that each step reads the weights once for all of them. Each
sequence keeps its own sampling state (`Continuation`: penalties, RNG, UTF-8 decoder, stop
strings) and ends on its own; a finished one leaves the batch.
"""

from __future__ import annotations

import codecs
import re
import time

import numpy as np

from .checks import NON_NEGATIVE, check_int
from .prompts import is_prompt_list, no_tokenizer_message, prompt_ids
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
        ids = list(prompt_ids(text_or_ids, self.tokenizer, self.model, "read text"))
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
        if self.tokenizer is None:
            raise ValueError(no_tokenizer_message(self.model, "generate text"))
        sequence = Continuation(self.tokenizer, sampling or SamplingParams(), self.rng, stop,
                                stop_at_eot)
        t0 = time.perf_counter()
        try:
            for _ in range(max_tokens):
                token = sequence.choose(self.logits)
                if token is None:                          # end of text
                    break
                self.logits, self.state = self.model.forward([token], self.state)
                self.generated.append(token)
                self.stats["tokens"] += 1
                text, stopped = sequence.add(token)
                if text:
                    yield text
                if stopped:
                    return
            text = sequence.finish()
            if text:
                yield text
        finally:
            self.stats["seconds"] += time.perf_counter() - t0


class Continuation:
    """What one sequence's generation keeps from token to token, apart from the model's state:
    its repetition penalties, its RNG, the UTF-8 decoder of its bytes and the text held back
    because it may be the start of a stop string. `Session.stream` uses one; `stream_batch` one
    per sequence, so sequences decoded together sample exactly as they would alone.
    """

    def __init__(self, tokenizer, sampling, rng, stop=(), stop_at_eot=True):
        self.tokenizer, self.sampling, self.rng = tokenizer, sampling, rng
        self.stop, self.stop_at_eot = stop, stop_at_eot
        self.penalties = Penalties(sampling)
        self.decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")
        self.eot = getattr(tokenizer, "eot_id", None)
        # Embedding rows past the tokenizer's last id (World: 65530..65535) have no text: never
        # sample them (a trained model gives them ~0 probability, an untrained one may not).
        self.max_id = getattr(tokenizer, "max_id", None)
        self.held = ""   # text decoded but not yet given out: it may be the start of a stop string

    def choose(self, logits):
        """The next token, sampled from the penalised `logits`; None when it is the end-of-text
        token and stop_at_eot (that token is not to be fed)."""
        logits = self.penalties.apply(logits)
        if self.max_id is not None:
            logits[self.max_id + 1:] = -np.inf
        s = self.sampling
        token = sample_logits(logits, s.temperature, s.top_p, s.top_k, self.rng)
        return None if self.stop_at_eot and token == self.eot else token

    def add(self, token):
        """Take `token` as generated (fed to the model): count it for the penalties and decode
        it. Returns (text that is safe to show now, whether a stop string has appeared)."""
        piece = self.tokenizer.decode_bytes([token])
        self.penalties.update(token, piece.decode("utf-8", errors="replace"))
        self.held += self.decoder.decode(piece)
        text, self.held, stopped = _split_at_stop(self.held, self.stop)
        return text, stopped

    def finish(self):
        """The text still held back when the generation ends without a stop string."""
        self.held += self.decoder.decode(b"", final=True)
        text, _, _ = _split_at_stop(self.held, self.stop, final=True)
        self.held = ""
        return text


def stream_batch(sessions, max_tokens=100, sampling=None, stop=(), stop_at_eot=True):
    """Continue several fed Sessions of one model together, yielding (i, text) pieces, i the
    index of the session the text belongs to.

    Each step samples every running session's next token from its own logits with its own RNG,
    then one `model.forward_batch` moves them all on: the weights are read once per step for the
    whole batch. A session ends on its own, as `Session.stream` ends (end-of-text, a stop string,
    max_tokens), and leaves the batch: its state is copied out and the others go on in a smaller
    BatchState (leaving, rather than riding along masked, saves its share of every later step).
    Session i's text is then what `sessions[i].stream(...)` would give alone, given the same
    logits; forward_batch gives the same bits as forward on the reference and the numba backend.
    Afterwards each session's state, logits, generated and stats are as after its own stream
    (stats["seconds"]: the time until it left the batch).
    """
    check_int("max_tokens", max_tokens, NON_NEGATIVE)
    sessions = list(sessions)
    if not sessions:
        return
    model = sessions[0].model
    if any(session.model is not model for session in sessions):
        raise ValueError("stream_batch decodes sessions of one model together; these have several")
    if any(session.logits is None for session in sessions):
        raise ValueError("feed every session a prompt before generating")
    sampling = sampling or SamplingParams()
    sequences = [Continuation(s.tokenizer, sampling, s.rng, stop, stop_at_eot) for s in sessions]
    running = list(range(len(sessions)))        # the session of each row of the batch
    batch = model.batch_state([session.state for session in sessions])
    t0 = time.perf_counter()

    def leave(rows):
        """Sessions at these rows of the batch are done: state out, rows dropped."""
        nonlocal batch, running
        for row in rows:
            session = sessions[running[row]]
            session.state = batch[row].copy()
            session.stats["seconds"] += time.perf_counter() - t0
        keep = [row for row in range(len(running)) if row not in rows]
        batch, running = batch.take(keep), [running[row] for row in keep]

    try:
        for _ in range(max_tokens):
            tokens = [sequences[i].choose(sessions[i].logits) for i in running]
            ended = [row for row, token in enumerate(tokens) if token is None]   # end of text
            for row in ended:
                text = sequences[running[row]].finish()
                if text:
                    yield running[row], text
            if ended:
                tokens = [token for token in tokens if token is not None]
                leave(ended)
            if not running:
                break
            logits, batch = model.forward_batch(tokens, batch)
            stopped = []
            for row, (i, token) in enumerate(zip(running, tokens)):
                session = sessions[i]
                session.logits = logits[row]
                session.generated.append(token)
                session.stats["tokens"] += 1
                text, stop_found = sequences[i].add(token)
                if text:
                    yield i, text
                if stop_found:
                    stopped.append(row)
            if stopped:
                leave(stopped)
        for i in running:                              # max_tokens reached
            text = sequences[i].finish()
            if text:
                yield i, text
    finally:
        leave(list(range(len(running))))


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
    """Stream a continuation of `prompt` as text pieces. Given a list of prompts instead, return
    the list of their continuations, generated together as one batch (`generate_batch`).

    A prompt is text or a list of token ids; a list of prompts is a list (or tuple) of those.
    `tokenizer` defaults to `model.tokenizer` (set by tinyrwkv.load); `sampling` takes the fields
    of SamplingParams (temperature, top_p, top_k, presence_penalty, ...).
    """
    tokenizer = _tokenizer_of(model, tokenizer)       # checked now, not at the first piece
    if is_prompt_list(prompt):
        return generate_batch(model, prompt, tokenizer, max_tokens, seed, stop, state, **sampling)
    return _stream_one(model, prompt, tokenizer, max_tokens, seed, stop, state, **sampling)


def _tokenizer_of(model, tokenizer):
    """`tokenizer`, else the model's; generating text needs one (to decode what is sampled)."""
    tokenizer = tokenizer or getattr(model, "tokenizer", None)
    if tokenizer is None:
        raise ValueError(no_tokenizer_message(model, "generate text"))
    return tokenizer


def _stream_one(model, prompt, tokenizer, max_tokens, seed, stop, state, **sampling):
    session = Session(model, tokenizer, state=state, seed=seed)
    session.feed(prompt)
    yield from session.stream(max_tokens, SamplingParams(**sampling), stop=stop)


def generate_batch(model, prompts, tokenizer=None, max_tokens=100, seed=None, stop=(), state=None,
                   **sampling):
    """Continuations of several prompts, a list of strings in the prompts' order.

    Prefill is one prompt at a time (`Session.feed`: prompts differ in length), then the decode
    runs them as one batch (`stream_batch`): one forward_batch per step, each sequence ending on
    its own. Every sequence draws from its own RNG, seeded with `seed` (or seed[i] when `seed` is
    a list), so that continuation i is exactly what `generate(model, prompts[i], seed=...)` gives
    alone with the same seed (the same prompt twice with one seed gives the same text twice).
    `state`: where every prompt starts (not modified); the other arguments are generate's.
    """
    tokenizer = _tokenizer_of(model, tokenizer)
    prompts = list(prompts)
    seeds = list(seed) if isinstance(seed, (list, tuple)) else [seed] * len(prompts)
    if len(seeds) != len(prompts):
        raise ValueError(f"{len(seeds)} seeds for {len(prompts)} prompts: give one seed, or one "
                         "per prompt")
    sessions = [Session(model, tokenizer, state=state, seed=s) for s in seeds]
    for session, prompt in zip(sessions, prompts):
        session.feed(prompt)
    pieces = [[] for _ in prompts]
    for i, text in stream_batch(sessions, max_tokens, SamplingParams(**sampling), stop=stop):
        pieces[i].append(text)
    return ["".join(p) for p in pieces]


def chat_message(text):
    """One user turn in the RWKV chat format (ChatRWKV API_DEMO_CHAT.py): the message stripped,
    runs of newlines collapsed to one (a blank line would end the turn), then the cue for the reply."""
    text = re.sub(r"\n+", "\n", text.replace("\r\n", "\n").strip())
    return f"User: {text}\n\nAssistant:"
