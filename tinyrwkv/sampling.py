"""Choosing the next token: temperature, top-p, top-k and repetition penalties.

The semantics follow the official pip package (rwkv/utils.py, `PIPELINE.sample_logits` and
`PIPELINE.generate`), with one deliberate difference: there, top_p = 1.0 can silently turn
sampling greedy (when the float32 cumulative sum never reaches 1.0, the cutoff becomes the largest
probability); here top_p >= 1 keeps every token.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np

from .checks import NON_NEGATIVE, UNIT, check_float, check_int


def softmax(logits):
    z = logits - logits.max()
    e = np.exp(z)
    return e / e.sum()


def sampling_probs(logits, temperature=1.0, top_p=0.85, top_k=0):
    """The distribution the next token is drawn from, (V,) float64 summing to 1.

    1. p = softmax(logits) in float32, as the official code does.
    2. top-p: keep the most probable tokens whose cumulative probability first reaches top_p
       (ties with the cutoff probability are kept); decided at temperature 1.
    3. top-k (0 = off): keep only the k most probable of those.
    4. temperature: p ** (1 / temperature) on what is kept, renormalised.
    """
    logits = np.asarray(logits, dtype=np.float32)
    if not temperature > 0 or not 0 < top_p <= 1 or top_k < 0:
        raise ValueError("need temperature > 0, 0 < top_p <= 1 and top_k >= 0 (greedy is "
                         f"temperature 0), got temperature={temperature}, top_p={top_p}, top_k={top_k}")
    p = softmax(logits)
    order = np.argsort(p)[::-1]                      # most probable first
    if top_p < 1:
        cumulative = np.cumsum(p[order])
        cutoff = p[order][np.argmax(cumulative >= top_p)]
        p = np.where(p < cutoff, 0, p)
    if 0 < top_k < len(p):
        p[order[top_k:]] = 0
    if temperature != 1:
        p = p ** (1.0 / temperature)
    p = p.astype(np.float64)
    return p / p.sum()


def sample_logits(logits, temperature=1.0, top_p=0.85, top_k=0, rng=None):
    """Sample a token id from logits (V,): greedy (argmax) when temperature or top_p is 0,
    else a draw from `sampling_probs`. `rng`: a numpy Generator (for reproducible runs)."""
    if temperature < 0 or top_p < 0:
        raise ValueError(f"temperature and top_p must be >= 0, got {temperature}, {top_p}")
    if np.isnan(logits).any():      # argmax would pick the first NaN: id 0, end-of-text
        raise ValueError("the model's logits are NaN: its weights or its state hold NaN or Inf "
                         "(tinyrwkv.load refuses such weights unless check_finite=False / "
                         "--no-check-finite; a --state file can hold them too)")
    if temperature == 0 or top_p == 0:
        return int(np.argmax(logits))
    p = sampling_probs(logits, temperature, top_p, top_k)
    rng = np.random.default_rng() if rng is None else rng
    return int(rng.choice(len(p), p=p))


@dataclass
class SamplingParams:
    """Defaults are the official PIPELINE_ARGS (rwkv/utils.py)."""
    temperature: float = 1.0
    top_p: float = 0.85
    top_k: int = 0
    presence_penalty: float = 0.2    # alpha_presence: subtracted once a token has appeared
    frequency_penalty: float = 0.2   # alpha_frequency: subtracted per (decayed) occurrence
    penalty_decay: float = 0.996     # alpha_decay: occurrence counts shrink by this every step
    # A token whose text is a substring of this string does not count as an occurrence (the
    # official generate exempts spaces, tabs and digits this way; its chat demo exempts nothing:
    # pass "").
    penalty_exempt: str = " \t0123456789"
    ban_tokens: tuple = ()           # logits of these are set to -inf

    def __post_init__(self):
        """Every number checked here: a NaN would not fail, it would make every logit NaN (and
        greedy decoding return id 0, end-of-text, every time)."""
        check_float("temperature", self.temperature, NON_NEGATIVE)
        check_float("top_p", self.top_p, UNIT)
        check_int("top_k", self.top_k, NON_NEGATIVE)
        check_float("presence_penalty", self.presence_penalty)
        check_float("frequency_penalty", self.frequency_penalty)
        check_float("penalty_decay", self.penalty_decay, UNIT)


@dataclass
class Penalties:
    """Repetition penalties with decay, as the official PIPELINE.generate applies them."""
    params: SamplingParams
    occurrence: dict = field(default_factory=dict)   # token id -> decayed count

    def apply(self, logits):
        """Return a penalised copy of logits (V,)."""
        logits = np.array(logits, dtype=np.float32)
        for token in self.params.ban_tokens:
            logits[token] = -np.inf
        for token, count in self.occurrence.items():
            logits[token] -= self.params.presence_penalty + count * self.params.frequency_penalty
        return logits

    def update(self, token, text):
        """Record that `token` (decoded as `text`) was generated."""
        for t in self.occurrence:
            self.occurrence[t] *= self.params.penalty_decay
        exempt = bool(self.params.penalty_exempt) and text in self.params.penalty_exempt
        self.occurrence[token] = self.occurrence.get(token, 0.0) + (0.0 if exempt else 1.0)
