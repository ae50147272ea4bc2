"""Batched decode (model.forward_batch, numba_decode.decode_batch) and generation of several prompts
at once (generate_batch, `tinyrwkv generate --prompt ... --prompt ...`), against one sequence at a
time."""
import os
import subprocess
import sys

import numpy as np
import pytest

import tinyrwkv
from tinyrwkv.formats import save_safetensors
from tinyrwkv.generate import Session, stream_batch
from tinyrwkv.model import BatchState
from tinyrwkv.synthetic import make_weights

from conftest import ROOT, TOL_F32, have, numba_model, on_threads, random_state, rel_err

needs_numba = pytest.mark.skipif(not have("numba"), reason="numba is not installed")

# One shape for every numba test (compile time counts; Numba compiles per type, not per size):
# 3 layers, C 512 (8 heads of 64), V 1000, the 0.1B release's unequal LoRA ranks (Dw, Da, Dv, Dg).
# Big enough that the batched products, the WKV heads and the LoRAs (numba_decode.loras: 2 x 512 x
# 288 multiply-adds >= LORA_PARALLEL_FROM) run their parallel branches from B = 1.
L, C, V, RANKS = 3, 512, 1000, (64, 64, 32, 128)
STEPS = 6
PROMPT_LENGTHS = (1, 5, 12)      # three sequences, each at another position when decoding starts


@pytest.fixture(scope="module")
def weights():
    return make_weights(L, C, V, ranks=RANKS, seed=11)


def starting_states(model, n_seq):
    """n_seq sequences at different positions: a random state each, then a prompt of
    PROMPT_LENGTHS[b] tokens read by `forward` (the prefill a batch starts from)."""
    rng = np.random.default_rng(n_seq)
    states = []
    for b in range(n_seq):
        _, state = model.forward(rng.integers(0, V, PROMPT_LENGTHS[b]),
                                 random_state(model.config, seed=100 + b))
        states.append(state)
    return states


def decode_alone(model, tokens, states):
    """tokens (steps, B): each sequence on its own through model.forward, one token at a time.
    Returns the logits (steps, B, V) and the final States."""
    states = list(states)
    logits = [[None] * len(states) for _ in tokens]
    for b in range(len(states)):
        for t, step in enumerate(tokens):
            logits[t][b], states[b] = model.forward([int(step[b])], states[b])
    return np.array(logits), states


def decode_batched(model, tokens, states, form):
    """The same through forward_batch, the states as a list of States or one BatchState."""
    batch = states if form == "list" else model.batch_state(states)
    logits = []
    for step in tokens:
        out, batch = model.forward_batch(step, batch)
        logits.append(out)
    final = batch if form == "list" else batch.split()
    return np.stack(logits), final


def assert_same_bits(a_logits, a_states, b_logits, b_states):
    assert np.array_equal(a_logits, b_logits)
    for sa, sb in zip(a_states, b_states):
        for name in ("att_shift", "wkv", "ffn_shift"):
            assert np.array_equal(getattr(sa, name), getattr(sb, name)), name


# ---- the reference: the plain composition ----

@pytest.mark.parametrize("n_seq", [1, 3])
@pytest.mark.parametrize("form", ["list", "batch"])
def test_reference_forward_batch_is_forward_per_sequence(weights, n_seq, form):
    """model.py's forward_batch is a loop over `forward`: the same bits, the given States kept."""
    model = tinyrwkv.RWKV7(weights, dtype="float64")
    states = starting_states(model, n_seq)
    before = [s.copy() for s in states]
    tokens = np.random.default_rng(0).integers(0, V, (STEPS, n_seq))
    got = decode_batched(model, tokens, states, form)
    assert got[0].shape == (STEPS, n_seq, V) and got[0].dtype == np.float64
    assert_same_bits(*decode_alone(model, tokens, states), *got)
    assert_same_bits(np.zeros(1), before, np.zeros(1), states)          # not modified


def test_batch_state_views_copies_and_checks(weights):
    model = tinyrwkv.RWKV7(weights)
    states = starting_states(model, 3)
    batch = model.batch_state([states[0], None, states[2]])
    assert len(batch) == 3 and batch.wkv.shape == (3, L, C // 64, 64, 64)
    assert batch.wkv.dtype == np.float32 and not batch[1].wkv.any()     # None: the zero state
    view = batch[2]
    view.wkv[0, 0, 0, 0] = 7.0                                          # a view: writes through
    assert batch.wkv[2, 0, 0, 0, 0] == 7.0 and states[2].wkv[0, 0, 0, 0] != 7.0
    smaller = batch.take([2, 0])
    assert np.array_equal(smaller.wkv[0], batch.wkv[2]) and smaller.wkv.base is not batch.wkv
    assert [s.wkv.shape for s in batch.split()] == [states[0].wkv.shape] * 3
    with pytest.raises(ValueError, match="one next token per sequence"):
        model.forward_batch([1, 2], states)
    with pytest.raises(ValueError, match="out of range"):
        model.forward_batch([1, 2, V], states)
    with pytest.raises(ValueError, match=r"states\[1\]\.wkv has shape"):
        model.batch_state([states[0], tinyrwkv.State(states[1].att_shift, states[1].wkv[:1],
                                                     states[1].ffn_shift)])
    bad = BatchState(batch.att_shift, batch.wkv[:, :1], batch.ffn_shift)
    with pytest.raises(ValueError, match="BatchState.wkv has shape"):
        bad.check_fits(model.config)


# ---- the numba backend: one compiled call per step for the whole batch ----

@needs_numba
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_numba_batch_is_bit_identical_to_one_by_one(weights, storage):
    """Batched decode computes each sequence with the same functions, in the same order, as the
    single-token decode (every product a dot_row of the same row and input; nothing summed across
    sequences), so the result is not merely close: it is the same bits, B = 1 or 3, with the
    sequences at different positions, in both forms; and within TOL_F32 of float64."""
    from tinyrwkv.backends.numba_decode import decode_batch
    model = numba_model(weights, storage=storage)
    for n_seq in (1, 3):                # also: the scratch made for B = 1 grows to B = 3
        states = starting_states(model, n_seq)
        tokens = np.random.default_rng(n_seq).integers(0, V, (STEPS, n_seq))
        alone = decode_alone(model, tokens, states)
        for form in ("list", "batch"):
            got = decode_batched(model, tokens, states, form)
            assert got[0].dtype == np.float32
            assert_same_bits(*alone, *got)
    compiled = len(decode_batch.signatures)   # per argument types (storage, read-only or not:
    model.forward_batch([5, 6], [None, None])  # other tests' models add their own)
    # B = 2, a smaller batch: B is a loop bound, not part of a type, so nothing new compiles
    assert len(decode_batch.signatures) == compiled
    if storage == "float32":        # the reference on the same weights (bf16: test_numba_decode)
        reference = tinyrwkv.RWKV7(weights, dtype="float64")
        want = decode_alone(reference, tokens, states)
        assert rel_err(got[0], want[0]) < TOL_F32
        assert max(rel_err(g.wkv, w.wkv) for g, w in zip(got[1], want[1])) < TOL_F32


@needs_numba
@pytest.mark.parametrize("storage", ["float32", "bfloat16"])
def test_numba_batch_is_bit_identical_across_threads(weights, storage):
    """Threads share out whole row chunks and whole (sequence, head) pairs; each output is one
    thread's sequential loop, so 1 and 2 threads give the same bits."""
    model = numba_model(weights, storage=storage)
    states = starting_states(model, 3)
    tokens = np.random.default_rng(7).integers(0, V, (STEPS, 3))
    results = on_threads(lambda: decode_batched(model, tokens, states, "batch"))
    assert_same_bits(*results[0], *results[1])


@needs_numba
def test_numba_paths_without_the_fused_step_take_the_reference_loop():
    """decode="per-kernel", DeepEmbed models, and a BatchState the kernel cannot write in place
    (float64 here) run the reference's loop over forward: same results as one by one."""
    w = make_weights(2, 128, 300, seed=8)
    cases = [(numba_model(w, decode="per-kernel"), "list"),
             (numba_model(make_weights(2, 128, 300, deep_embed=True, seed=8)), "list"),
             (numba_model(w), "float64 batch")]
    for model, form in cases:
        states = [random_state(model.config, seed) for seed in (1, 2)]
        tokens = np.array([[3, 4], [5, 6]])
        alone = decode_alone(model, tokens, states)
        if form == "list":
            got = decode_batched(model, tokens, states, "list")
        else:
            batch = BatchState(*(np.stack([getattr(s, n) for s in states]).astype(np.float64)
                                 for n in ("att_shift", "wkv", "ffn_shift")))
            logits = []
            for step in tokens:
                out, batch = model.forward_batch(step, batch)
                logits.append(out)
            got = np.stack(logits), batch.split()
        assert rel_err(got[0], alone[0]) < TOL_F32
        assert max(rel_err(g.wkv, a.wkv) for g, a in zip(got[1], alone[1])) < TOL_F32


# ---- generation: several prompts as one batch ----

class ByteTokenizer:
    """Token t < 256 is the byte t. eot_id: the end-of-text token (None: there is none)."""
    name, vocab_size = "bytes", 257

    def __init__(self, eot_id=256):
        self.eot_id = eot_id

    def encode(self, text):
        return list(text.encode())

    def decode_bytes(self, ids):
        return bytes(i for i in ids if i < 256)


PROMPTS = ["Once upon a time", "a", "The quick brown fox jumps over"]


def generation_model(backend):
    w = make_weights(2, 128, 257, seed=5)
    return tinyrwkv.RWKV7(w) if backend == "numpy" else numba_model(w)


@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=needs_numba)])
@pytest.mark.parametrize("sampling", [dict(temperature=0), dict(temperature=1.0, top_p=0.9)],
                         ids=["greedy", "seeded"])
def test_generate_batch_equals_each_prompt_alone(backend, sampling):
    """Each sequence samples with its own RNG (seeded alike) from logits that are the same bits as
    alone, so every completion is exactly the prompt's own. One sequence is made to leave the
    batch early by a stop string taken from its own text, another by end-of-text."""
    model = generation_model(backend)
    alone = lambda prompt, tok, **kw: "".join(tinyrwkv.generate(
        model, prompt, tokenizer=tok, max_tokens=16, seed=3, **sampling, **kw))
    free = ByteTokenizer(eot_id=None)
    texts = [alone(p, free) for p in PROMPTS]
    session = Session(model, free, seed=3)
    session.feed(PROMPTS[2])
    _ = list(session.stream(16, tinyrwkv.SamplingParams(**sampling)))
    eot = ByteTokenizer(eot_id=session.generated[6])       # prompt 2 ends by its 7th token
    stop = [texts[1][4:7]]                                  # prompt 1 stops by its 7th character
    want = [alone(p, eot, stop=stop) for p in PROMPTS]
    assert len(want[1]) < len(texts[1]) and len(want[2]) < len(texts[2])
    got = tinyrwkv.generate(model, PROMPTS, tokenizer=eot, max_tokens=16, seed=3, stop=stop,
                            **sampling)
    assert got == want
    assert tinyrwkv.generate(model, [PROMPTS[1]], tokenizer=eot, max_tokens=16, seed=3,
                             stop=stop, **sampling) == [want[1]]


@pytest.mark.parametrize("backend", ["numpy", pytest.param("numba", marks=needs_numba)])
def test_stream_batch_leaves_each_session_as_alone(backend):
    """After stream_batch every session's state, logits and tokens are those of its own stream;
    seeds may differ per session."""
    model, tok = generation_model(backend), ByteTokenizer()
    params = tinyrwkv.SamplingParams(temperature=1.0, top_p=1.0)
    alone, together = [], []
    for seed, prompt in zip((1, 2, 3), PROMPTS):
        for sessions in (alone, together):
            sessions.append(Session(model, tok, seed=seed))
            sessions[-1].feed(prompt)
    texts = ["".join(s.stream(10, params, stop=["e"])) for s in alone]
    pieces = [[] for _ in PROMPTS]
    for i, text in stream_batch(together, 10, params, stop=["e"]):
        pieces[i].append(text)
    assert ["".join(p) for p in pieces] == texts
    for a, b in zip(alone, together):
        assert a.generated == b.generated and np.array_equal(a.logits, b.logits)
        assert np.array_equal(a.state.wkv, b.state.wkv)
        assert a.stats["tokens"] == b.stats["tokens"]
    seeds = tinyrwkv.generate(model, PROMPTS, tokenizer=tok, max_tokens=8, seed=[1, 2, 3],
                              temperature=1.0, top_p=1.0)
    assert seeds == ["".join(tinyrwkv.generate(model, p, tokenizer=tok, max_tokens=8, seed=s,
                                                temperature=1.0, top_p=1.0))
                     for s, p in zip((1, 2, 3), PROMPTS)]
    with pytest.raises(ValueError, match="2 seeds for 3 prompts"):
        tinyrwkv.generate(model, PROMPTS, tokenizer=tok, seed=[1, 2])


def run_cli(*args):
    env = dict(os.environ, PYTHONIOENCODING="utf-8")
    proc = subprocess.run([sys.executable, "-m", "tinyrwkv", *map(str, args)], capture_output=True,
                          timeout=300, cwd=ROOT, env=env)
    return proc.returncode, proc.stdout.decode("utf-8"), proc.stderr.decode("utf-8")


def test_cli_generates_several_prompts_as_one_batch(tmp_path):
    """--prompt (repeatable) and --prompts-file: each completion under its label, in order, and
    each the same text as that prompt generated alone."""
    model = tmp_path / "tiny-world.safetensors"
    save_safetensors(model, make_weights(n_layer=2, n_embd=64, vocab_size=65536, seed=3))
    options = ["--model", model, "-n", "6", "-t", "0"]
    alone = []
    for prompt in ("Hello", "Once upon a time"):
        rc, out, err = run_cli("generate", prompt, *options)
        assert rc == 0, err
        alone.append(out)
    prompts_file = tmp_path / "prompts.txt"
    prompts_file.write_text("\nOnce upon a time\n\n", encoding="utf-8")
    rc, out, err = run_cli("generate", "--prompt", "Hello", "--prompts-file", prompts_file,
                           *options)
    assert rc == 0, err
    assert out == f"==> prompt 1 <==\n{alone[0]}\n==> prompt 2 <==\n{alone[1]}"
    assert "as a batch of 2" in err and "tok/s" in err
    rc, _, err = run_cli("generate", "--prompt", "a", "--prompt", "b", "--save-state",
                         tmp_path / "s.npz", *options)
    assert rc == 1 and "--save-state saves one state" in err
