"""`tinyrwkv golden --out DIR`: golden vectors an implementation in any language can test against.

For each case: a deterministic synthetic checkpoint (`.safetensors` with the official key names,
float32; `.pth` too when torch is installed), token ids, and the float64 oracle's expected
outputs in `.npz` files: logits of every token (sequence form, from the case's initial state), the final
state, and a full trace (every intermediate, names in tinyrwkv/oracle.py). Raw little-endian
`.bin` copies of ids, logits and final state are written too, for languages without an npz
reader. `manifest.json` describes everything: shapes, dtypes, files with SHA-256, the state
layout, and the suggested tolerances.

Second edition (issue 16): cases with options (OPTIONS): a continued call (`split`: the ids in two
calls, the second from the first's returned state, with that middle state written too), a non-zero
initial state (`init_state`), 256 tokens (crossing 64-token chunk boundaries), the 65536 World
vocabulary with ids >= 32768, bf16 storage (the expectation computed in float64 from exactly the
stored bf16 numbers); tokenizer cases (text -> ids, World and the shipped BPE) and sampling cases
(fixed logits -> the allowed set and exact probabilities, tinyrwkv/sampling.py). Beside
manifest.json, `manifest.txt` says the same in lines a C program reads without a JSON parser
(format in docs/formats.md §8.2; `examples/golden_check.c` reads it).

The folder is written whole beside DIR and swapped in at the end (tinyrwkv/files.py): a kill or an
error leaves the old DIR or none; an existing DIR that holds other files is refused, not replaced.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np

from . import oracle
from .files import atomic_folder
from .formats import save_safetensors
from .formats import bf16_to_float32, to_bf16_bits
from .model import RWKV7, State
from .sampling import Penalties, SamplingParams, sampling_probs
from .synthetic import make_weights

# name, (layers, width, vocab, head size, DeepEmbed, LoRA ranks Dw/Da/Dv/Dg or None), tokens
CASES = [
    ("tiny_L1_C64", (1, 64, 97, 64, False, None), 13),
    ("small_L2_C128_V1001", (2, 128, 1001, 64, False, None), 24),
    ("heads32_L3_C96", (3, 96, 257, 32, False, None), 17),
    ("deepembed_L2_C128", (2, 128, 301, 64, True, None), 19),
    # the released 0.1B model's unequal ranks (docs/architecture.md §8): a reader that assumes
    # one rank for all four LoRAs, or takes Dv from layer 0, fails here
    ("official_ranks_L2_C256", (2, 256, 1001, 64, False, (64, 64, 32, 128)), 33),
]
# Options of the cases above (all default off):
#   split: the ids in two calls, ids[:split] from the initial state, then ids[split:] from the
#          state the first call returned (the expected logits are the same rows either way; the
#          middle state is written as <case>_mid_*.bin)
#   init_state: start from a deterministic non-zero state (<case>_init_*.bin), not zeros
#   bf16: the checkpoint stores every tensor as bf16; the float64 expectation is computed from
#         exactly those numbers (a bf16 value is exact in float64)
#   high_ids: draw the ids from [32768, V) (plus 32768 and V - 1 themselves)
#   trace: write <case>_trace.npz (off for the long and the 65536-vocabulary cases: size)
#   pth: write the .pth when torch is installed
OPTIONS = {
    "long_L2_C64_T256_split": dict(split=100, trace=False),
    "initstate_L2_C64_split": dict(init_state=True, split=9),
    "bf16_L2_C64_V1001": dict(bf16=True, trace=False),
    "world65536_L2_C32_bf16": dict(bf16=True, high_ids=True, trace=False, pth=False),
    "ranks_mixed_L2_C64": dict(init_state=True, trace=False),
}
CASES += [
    ("long_L2_C64_T256_split", (2, 64, 257, 64, False, None), 256),
    ("initstate_L2_C64_split", (2, 64, 301, 32, False, None), 21),
    ("bf16_L2_C64_V1001", (2, 64, 1001, 64, False, None), 23),
    ("world65536_L2_C32_bf16", (2, 32, 65536, 32, False, None), 5),
    # unequal ranks again, all four different (the 0.1B pattern (64, 64, 32, 128) is the
    # official_ranks case): a reader that takes one rank for all four LoRAs fails here
    ("ranks_mixed_L2_C64", (2, 64, 211, 64, False, (32, 16, 8, 48)), 15),
]
SEED = 20261126
STATE_KEYS = ("wkv", "att_shift", "ffn_shift")

# Tokenizer cases: strings the tokenizer tests know are tricky (tests/test_tokenizer.py): CJK,
# emoji with ZWJ/skin tones/flags/tags/keycaps, combining marks, whitespace runs past the longest
# space token, CRLF, exotic spaces, long runs of characters that have run tokens, "<|endoftext|>"
# as text, and the empty string.
TOKENIZER_TEXTS = [
    "",
    "Hello, world!",
    "\n\n",
    "User: hi\r\n\r\nAssistant:",
    "你好，世界！今天天气很好，我们去公园散步吧。",
    "こんにちは、世界。ｶﾀｶﾅ（半角）も使います。",
    "안녕하세요, 세계! 123 숫자와 English가 섞여 있습니다.",
    "🙂👍🏽👩\u200d💻👨\u200d👩\u200d👧\u200d👦🇫🇷🇯🇵🏴\U000e0067\U000e0062\U000e0065\U000e006e\U000e0067\U000e007f1️⃣#️⃣✌\ufe0e",
    "e\u0301 a\u0308\u0304 Tie\u0302\u0301ng Vie\u0323\u0302t हिन्दी ภาษาไทย اَلْعَرَبِيَّةُ עִבְרִית",
    " " * 70 + "x" + "\t" * 9 + "\u3000\xa0\u2028" + "=" * 130 + "-" * 67 + "\n" * 33,
    "<|endoftext|>text after",
    "def f(x):\n    return x**2  # 平方\n",
]

# Sampling cases: (name, V, logits seed, temperature, top_p, top_k, presence, frequency, decay,
#                  history: the tokens generated so far with their texts, ban_tokens)
SAMPLING_CASES = [
    ("top_p_only", 50, 1, 1.0, 0.85, 0, 0.0, 0.0, 0.996, [], ()),
    ("top_k_5", 50, 2, 1.0, 1.0, 5, 0.0, 0.0, 0.996, [], ()),
    ("top_p_top_k_temp", 64, 3, 0.7, 0.6, 4, 0.0, 0.0, 0.996, [], ()),
    ("hot_temp_2", 40, 4, 2.0, 0.9, 0, 0.0, 0.0, 0.996, [], ()),
    ("keep_all", 30, 5, 1.3, 1.0, 0, 0.0, 0.0, 0.996, [], ()),
    ("ties_at_cutoff", 24, None, 1.0, 0.5, 0, 0.0, 0.0, 0.996, [], ()),
    ("penalties", 50, 6, 1.0, 0.85, 0, 0.2, 0.2, 0.996,
     [(3, "a"), (7, "b"), (3, "a"), (11, " "), (7, "b"), (3, "a")], ()),
    ("penalties_strong_ban", 60, 7, 0.8, 0.95, 10, 0.5, 0.4, 0.9,
     [(0, "x"), (1, "7"), (2, "yz"), (0, "x")], (5, 9)),
]


def _sha(path):
    return hashlib.sha256(Path(path).read_bytes()).hexdigest()


def golden_files():
    """Every name write_golden may put in its folder (whether torch is installed or not)."""
    per_case = ("{}.safetensors", "{}.pth", "{}_expected.npz", "{}_trace.npz",
                *(f"{{}}_{key}.bin" for key in ("ids", "logits", *STATE_KEYS)),
                *(f"{{}}_{when}_{key}.bin" for when in ("init", "mid") for key in STATE_KEYS))
    sampling = ("{}_logits.bin", "{}_penalised.bin", "{}_probs.bin")
    return {"manifest.json", "manifest.txt", "world_vocab.txt", "bpe_tokenizer.json",
            *(pattern.format(name) for name, _, _ in CASES for pattern in per_case),
            *(pattern.format("sampling_" + c[0]) for c in SAMPLING_CASES for pattern in sampling)}


def write_golden(out):
    """Write the golden folder `out` (module docstring); returns the manifest."""
    with atomic_folder(out, golden_files()) as folder:
        return _write_cases(folder)


def _state_arrays(state):
    return {key: np.asarray(getattr(state, key), dtype="<f8") for key in STATE_KEYS}


def initial_state(config, seed):
    """The deterministic non-zero initial state of a case with `init_state` (float64): token-shift
    slots like LN outputs (N(0, 1)), WKV entries N(0, 0.3^2)."""
    rng = np.random.default_rng(seed)
    zero = State.zeros(config, np.float64)
    return State(rng.standard_normal(zero.att_shift.shape), 0.3 * rng.standard_normal(zero.wkv.shape),
                 rng.standard_normal(zero.ffn_shift.shape))


def case_weights(n, spec, options):
    """The case's weights exactly as stored (bf16 cases: rounded to bf16, then float32)."""
    L, C, V, N, deep, ranks = spec
    w = make_weights(L, C, V, head_size=N, deep_embed=deep, ranks=ranks, seed=SEED + n)
    if options.get("bf16"):
        w = {k: bf16_to_float32(to_bf16_bits(np.asarray(v, np.float32))) for k, v in w.items()}
    return w


def case_ids(n, V, T, options):
    rng = np.random.default_rng(SEED + n)
    if options.get("high_ids"):
        ids = rng.integers(32768, V, T)
        ids[0], ids[-1] = 32768, V - 1
        return ids
    return rng.integers(0, V, T)


def run_case(model, ids, init, split):
    """Logits (T, V) and final state from `init` (None = zeros); with `split`, two calls, the
    second from the first's state (also returned, else None)."""
    if not split:
        logits, state = model.forward(ids, state=init, full_output=True)
        return logits, state, None
    first, mid = model.forward(ids[:split], state=init, full_output=True)
    second, state = model.forward(ids[split:], state=mid, full_output=True)
    return np.concatenate([first, second]), state, mid


def sampling_case(case):
    """A sampling case's logits (float32), penalised logits, probabilities (float64), the decayed
    occurrence counts and exempt flags of its history, and its SamplingParams."""
    name, V, seed, temperature, top_p, top_k, presence, frequency, decay, history, ban = case
    if seed is None:    # ties: groups of equal logits, so a cutoff falls inside a tie
        logits = np.repeat(np.array([3.0, 2.0, 2.0, 1.0, 0.5, 0.0], np.float32), 4)[:V]
    else:
        logits = (2.0 * np.random.default_rng(seed).standard_normal(V)).astype(np.float32)
    params = SamplingParams(temperature=temperature, top_p=top_p, top_k=top_k,
                            presence_penalty=presence, frequency_penalty=frequency,
                            penalty_decay=decay, ban_tokens=tuple(ban))
    penalties = Penalties(params)
    exempt = []
    for token, text in history:
        exempt.append(int(bool(params.penalty_exempt) and text in params.penalty_exempt))
        penalties.update(token, text)
    penalised = penalties.apply(logits)
    probs = sampling_probs(penalised, temperature, top_p, top_k)
    return logits, penalised, probs, dict(penalties.occurrence), exempt, params


def _txt(value):
    """A manifest.txt value: no spaces; lists comma-separated; floats as repr (round-trip)."""
    if isinstance(value, (list, tuple)):
        return ",".join(_txt(v) for v in value)
    if isinstance(value, float):
        return repr(value)
    return str(value)


def _line(**fields):
    line = " ".join(f"{k}={_txt(v)}" for k, v in fields.items())
    assert "\n" not in line and all(" " not in _txt(v) for v in fields.values()), line
    return line


TXT_HEADER = """\
# tinyrwkv golden vectors, line-oriented manifest (docs/formats.md §8.2): one record per line,
# fields separated by one space, each key=value (values hold no spaces), lists comma-separated,
# floats printed to round-trip, text as the hex of its UTF-8 bytes. Lines starting with # are
# comments. Files: .bin are raw little-endian C-order arrays (ids int32; logits, states and
# probabilities float64; sampling logits float32), named relative to this file.
# kind=meta: format, seed, tolerances (max|yours - expected| / std(expected) per tensor).
# kind=model: a checkpoint and ids; call 1 = ids[0:split] from the initial state (init=zero, or
#   the init_* files), call 2 = ids[split:T] from call 1's state (split=0: one call); logits are
#   (T, V), row t after token t; wkv (L, H, N, N) [layer][head][value][key]; att_shift and
#   ffn_shift (L, C): the state after the last call; mid_* the state after call 1.
# kind=tokenizer: text_hex encoded with tokenizer (world: vocab file; bpe: tokenizer.json,
#   encode without special tokens) gives ids (n_ids of them; ids= is empty when n_ids=0).
# kind=sampling: logits (V,) float32; the history tokens (in order, history_exempt=1 for those
#   that do not count) give occurrence (token:decayed count); penalised = logits - presence -
#   count * frequency for each counted token, banned tokens -inf (float32); probs (V,) float64
#   from softmax (float32), top-p, top-k, temperature (tinyrwkv/sampling.py); allowed = the ids
#   with probs > 0, ascending.
"""


def _write_cases(out):
    try:
        import torch
    except ImportError:
        torch = None
    manifest = {"format": "tinyrwkv-golden-v2", "seed": SEED,
                "state_layout": "[layer][head][value][key] (the official layout)",
                "logits": "float64, sequence form, one row per token, from the initial state "
                          "(zero unless init_state), in one call or two (split)",
                "tolerances_max_abs_over_std": oracle.TOLERANCES,
                "metric": "max|yours - expected| / std(expected), per tensor",
                "cases": [], "tokenizer_cases": [], "sampling_cases": []}
    lines = [TXT_HEADER.rstrip("\n"),
             _line(kind="meta", format="tinyrwkv-golden-txt-v1", seed=SEED,
                   **{f"tol_{k}": float(v) for k, v in oracle.TOLERANCES.items()})]
    for n, (name, spec, T) in enumerate(CASES):
        options = OPTIONS.get(name, {})
        L, C, V, N, deep, ranks = spec
        w = case_weights(n, spec, options)
        ids = case_ids(n, V, T, options)
        model = RWKV7(w, dtype="float64")
        init = initial_state(model.config, SEED + 1000 + n) if options.get("init_state") else None
        split = options.get("split", 0)
        logits, state, mid = run_case(model, ids, init, split)
        files = {}
        st = out / f"{name}.safetensors"
        save_safetensors(st, w, metadata={"golden": name},
                         bf16_keys=w.keys() if options.get("bf16") else ())
        files["safetensors"] = st
        if torch is not None and options.get("pth", True):
            pth = out / f"{name}.pth"
            to = (lambda v: torch.tensor(v).to(torch.bfloat16)) if options.get("bf16") else torch.tensor
            torch.save({k: to(v) for k, v in w.items()}, pth)
            files["pth"] = pth
        exp = out / f"{name}_expected.npz"
        extra = {f"{when}_{k}": v for when, s in (("init", init), ("mid", mid)) if s is not None
                 for k, v in _state_arrays(s).items()}
        np.savez(exp, ids=ids, logits=logits, att_shift=state.att_shift, wkv=state.wkv,
                 ffn_shift=state.ffn_shift, **extra)
        files["expected"] = exp
        if options.get("trace", True):
            tr = out / f"{name}_trace.npz"
            oracle.save_trace(tr, oracle.trace(model, ids, state=init), meta={"case": name})
            files["trace"] = tr
        arrays = [("ids", ids.astype("<i4")), ("logits", logits.astype("<f8")),
                  *_state_arrays(state).items(),
                  *((f"init_{k}", v) for k, v in (_state_arrays(init).items() if init is not None else ())),
                  *((f"mid_{k}", v) for k, v in (_state_arrays(mid).items() if mid is not None else ()))]
        for key, arr in arrays:
            path = out / f"{name}_{key}.bin"
            arr.tofile(path)
            files[f"{key}.bin"] = path
        cfg = model.config
        config = {k: getattr(cfg, k) for k in ("n_layer", "n_embd", "n_head", "head_size",
                                               "vocab_size", "dim_ffn", "d_decay", "d_aaa",
                                               "d_mv", "d_gate", "d_deepembed")}
        storage = "bf16" if options.get("bf16") else "float32"
        manifest["cases"].append({
            "name": name, "variant": cfg.variant, "config": config,
            "storage": storage, "split": split,
            "initial_state": "init_* files" if init is not None else "zero",
            "ids": ids.tolist(),
            "shapes": {"logits": list(logits.shape), "wkv": list(state.wkv.shape),
                       "att_shift": list(state.att_shift.shape),
                       "ffn_shift": list(state.ffn_shift.shape)},
            "bin_dtypes": {"ids": "int32 little-endian", "others": "float64 little-endian, C order"},
            "files": {k: {"path": p.name, "sha256": _sha(p)} for k, p in files.items()},
            "notes": "; ".join(filter(None, [
                "DeepEmbed: the official package needs RWKV_DE_VERSION=1" if deep else "plain x070",
                f"two calls: ids[:{split}], then the rest from the returned state" if split else "",
                "non-zero initial state (init_*)" if init is not None else "",
                "weights stored as bf16; expected from exactly those numbers" if storage == "bf16" else "",
                "ids >= 32768" if options.get("high_ids") else ""])),
        })
        lines.append(_line(
            kind="model", name=name, variant=cfg.variant, L=cfg.n_layer, C=cfg.n_embd,
            H=cfg.n_head, N=cfg.head_size, V=cfg.vocab_size, F=cfg.dim_ffn, d_decay=cfg.d_decay,
            d_aaa=cfg.d_aaa, d_mv=cfg.d_mv, d_gate=cfg.d_gate, d_deepembed=cfg.d_deepembed,
            storage=storage, T=len(ids), split=split,
            init="file" if init is not None else "zero",
            checkpoint=files["safetensors"].name,
            **{k.replace(".bin", ""): p.name for k, p in files.items() if k.endswith(".bin")}))
    _write_tokenizer_cases(out, manifest, lines)
    for case in SAMPLING_CASES:
        name = "sampling_" + case[0]
        logits, penalised, probs, occurrence, exempt, params = sampling_case(case)
        files = {}
        for key, arr in (("logits", logits.astype("<f4")), ("penalised", penalised.astype("<f4")),
                         ("probs", probs.astype("<f8"))):
            path = out / f"{name}_{key}.bin"
            arr.tofile(path)
            files[key] = path
        allowed = np.flatnonzero(probs > 0).tolist()
        history = [t for t, _ in case[9]]
        entry = {"name": name, "V": len(logits), "temperature": params.temperature,
                 "top_p": params.top_p, "top_k": params.top_k,
                 "presence_penalty": params.presence_penalty,
                 "frequency_penalty": params.frequency_penalty,
                 "penalty_decay": params.penalty_decay, "penalty_exempt": params.penalty_exempt,
                 "history": [[t, text] for t, text in case[9]], "history_exempt": exempt,
                 "ban_tokens": list(params.ban_tokens),
                 "occurrence": {str(k): v for k, v in occurrence.items()},
                 "allowed": allowed, "probs_allowed": probs[allowed].tolist(),
                 "files": {k: {"path": p.name, "sha256": _sha(p)} for k, p in files.items()}}
        manifest["sampling_cases"].append(entry)
        lines.append(_line(
            kind="sampling", name=name, V=len(logits), temperature=float(params.temperature),
            top_p=float(params.top_p), top_k=params.top_k,
            presence=float(params.presence_penalty), frequency=float(params.frequency_penalty),
            decay=float(params.penalty_decay), history=history, history_exempt=exempt,
            ban=list(params.ban_tokens),
            occurrence=[f"{k}:{v!r}" for k, v in occurrence.items()],
            logits=files["logits"].name, penalised=files["penalised"].name,
            probs=files["probs"].name, n_allowed=len(allowed), allowed=allowed))
    (out / "manifest.json").write_text(json.dumps(manifest, indent=1))
    (out / "manifest.txt").write_text("\n".join(lines) + "\n")
    return manifest


def bpe_tokenizer_path():
    """The shipped BPE tokenizer (weights/model.tokenizer.json), or None."""
    from .loader import WEIGHTS_DIRS
    for folder in WEIGHTS_DIRS:
        if (folder / "model.tokenizer.json").is_file():
            return folder / "model.tokenizer.json"
    return None


def golden_tokenizers():
    """[(kind, tokenizer, source file)]: the World tokenizer, and the shipped BPE when it and
    the `tokenizers` package are there."""
    from . import tokenizer as tk
    world = tk._packaged_world_tokenizer()
    found = [("world", world, Path(tk.__file__).parent / "data" / "rwkv_vocab_v20230424.txt")]
    bpe = bpe_tokenizer_path()
    if bpe is not None:
        try:
            found.append(("bpe", tk.HFTokenizer(bpe), bpe))
        except (ImportError, tk.TokenizerError):
            pass
    return found


def _write_tokenizer_cases(out, manifest, lines):
    import shutil
    for kind, tokenizer, source in golden_tokenizers():
        copy = out / ("world_vocab.txt" if kind == "world" else "bpe_tokenizer.json")
        shutil.copyfile(source, copy)
        for i, text in enumerate(TOKENIZER_TEXTS):
            ids = list(map(int, tokenizer.encode(text)))
            name = f"tok_{kind}_{i:02d}"
            manifest["tokenizer_cases"].append({
                "name": name, "tokenizer": kind, "text": text,
                "text_hex": text.encode("utf-8").hex(), "ids": ids,
                "files": {"tokenizer": {"path": copy.name, "sha256": _sha(copy)}}})
            lines.append(_line(kind="tokenizer", name=name, tokenizer=kind, vocab=copy.name,
                               text_hex=text.encode("utf-8").hex(), n_ids=len(ids), ids=ids))
