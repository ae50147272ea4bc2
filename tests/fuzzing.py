"""A seeded byte-mutation fuzzer over every reader: the seeds (one small, valid file of each kind
tinyrwkv reads), the mutations, and what counts as a pass.

A case is a seed file with a few mutations applied (truncations, bit flips, bytes set to 0x00 /
0xff / 0x7f / 0x80, 8-byte integers overwritten with awkward values, insertions, deletions,
duplicated spans). Most mutations land in the first 4 KiB, where the headers are: that is where a
reader's parsing decisions are made, and where random flips in a mostly-data file would otherwise
rarely reach. The reader is then run on the mutated file, and the case passes when it ends in
either

  * a clear error: an exception of one of tinyrwkv's own error types (CheckpointError,
    TokenizerError: both ValueErrors), its message one line that names the file;
  * or a correct load: the same keys with the same shapes as the seed (a flip inside tensor data
    changes values, not structure; the load's finiteness check refuses NaN/Inf).

Anything else (a TypeError, a MemoryError, an IndexError from deep inside a parser, a message
without the file's name) is a failure. Time and memory per case are measured by the callers
(tests/test_fuzz.py, in-process with tracemalloc; tests/hostile_report.py, in worker processes
under a memory limit, counting crashes and hangs too).
"""
from __future__ import annotations

import json
import shutil
import struct
from dataclasses import dataclass
from pathlib import Path

import numpy as np

# Every kind of file a user can hand to tinyrwkv; each has a seed and a reader below.
KINDS = ("pth", "safetensors", "gguf-f32", "gguf-q8_0", "hf-folder", "state", "trace",
         "tokenizer")

# 8-byte values written over headers: lengths and counts at the edges of every integer type.
AWKWARD = (0, 1, 2**31 - 1, 2**31, 2**32 - 1, 2**32, 2**40, 2**63 - 1, 2**64 - 1)

HEADER_BYTES = 4096


def have(module):
    import importlib.util
    return importlib.util.find_spec(module) is not None


def seed_weights():
    """The seed model: 2 layers, C=64, heads of 32, unequal LoRA ranks (as releases have), V=97:
    small enough that a case takes milliseconds, with every kind of tensor an x070 has."""
    from tinyrwkv.synthetic import make_weights
    return make_weights(2, 64, 97, head_size=32, ranks=(32, 64, 16, 48), seed=5)


def make_seeds(folder):
    """{kind: path} of one valid file (or folder) per kind, written into `folder`. Kinds whose
    writer is not installed (torch for .pth, gguf for GGUF) are left out."""
    from tinyrwkv import RWKV7, save_state
    from tinyrwkv.formats import save_safetensors, write_gguf, write_hf
    from tinyrwkv.oracle import save_trace, trace
    folder = Path(folder)
    w = seed_weights()
    seeds = {}
    save_safetensors(folder / "m.safetensors", w)
    seeds["safetensors"] = folder / "m.safetensors"
    if have("torch"):
        import torch
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in w.items()},
                   folder / "m.pth")
        seeds["pth"] = folder / "m.pth"
    if have("gguf"):
        for kind in ("f32", "q8_0"):
            write_gguf(folder / f"m-{kind}.gguf", w, kind)
            seeds[f"gguf-{kind}"] = folder / f"m-{kind}.gguf"
    write_hf(folder / "hf", w)
    seeds["hf-folder"] = folder / "hf"
    model = RWKV7(w)
    _, state = model.forward(np.arange(1, 6), None)
    save_state(state, folder / "s.npz")
    seeds["state"] = folder / "s.npz"
    save_trace(folder / "t.npz", trace(model, np.arange(1, 4)))
    seeds["trace"] = folder / "t.npz"
    (folder / "tok.json").write_text(json.dumps(_tiny_tokenizer()), encoding="utf-8")
    seeds["tokenizer"] = folder / "tok.json"
    return seeds


def _tiny_tokenizer():
    """A byte-level BPE tokenizer.json with a handful of merges, written by hand (the format of
    the `tokenizers` library), so the seed does not depend on training one."""
    from tinyrwkv.tokenizer import _byte_level_char_to_byte
    chars = sorted(_byte_level_char_to_byte(), key=lambda c: _byte_level_char_to_byte()[c])
    vocab = {c: i for i, c in enumerate(chars)}
    merges = [("t", "h"), ("th", "e"), ("Ġ", "t"), ("a", "n"), ("i", "n")]
    for a, b in merges:
        vocab[a + b] = len(vocab)
    return {"version": "1.0", "truncation": None, "padding": None, "added_tokens": [],
            "normalizer": None,
            "pre_tokenizer": {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": True,
                              "use_regex": True},
            "post_processor": None,
            "decoder": {"type": "ByteLevel", "add_prefix_space": True, "trim_offsets": True,
                        "use_regex": True},
            "model": {"type": "BPE", "dropout": None, "unk_token": None,
                      "continuing_subword_prefix": None, "end_of_word_suffix": None,
                      "fuse_unk": False, "byte_fallback": False, "vocab": vocab,
                      "merges": [f"{a} {b}" for a, b in merges]}}


# ---- mutations ----

@dataclass(frozen=True)
class Mutation:
    """One edit of a file's bytes. `where` is a fraction in [0, 1): of the header region (the first
    HEADER_BYTES) when `in_header`, else of the whole payload. `inner` edits go inside the
    container, where a raw flip would only trip a checksum: into the pickle of a .pth or a .npy
    member of an .npz (re-zipped with correct CRCs), or the JSON header of a .safetensors (its
    length field rewritten), so the parser behind the checksum is what gets fuzzed."""
    op: str              # one of OPS
    where: float
    in_header: bool
    value: int           # the bit, the byte, the index into AWKWARD, or a length
    inner: bool = False

    def apply(self, data: bytes) -> bytes:
        if not data:
            return data
        if self.op == "json":
            return _json_edit(data, self.where, self.value)
        span = min(len(data), HEADER_BYTES) if self.in_header else len(data)
        i = min(int(self.where * span), len(data) - 1)
        b = bytearray(data)
        if self.op == "truncate":
            return bytes(b[:i])
        if self.op == "flip":
            b[i] ^= 1 << (self.value % 8)
        elif self.op == "set":
            b[i] = (0x00, 0xFF, 0x7F, 0x80)[self.value % 4]
        elif self.op == "int":
            value = AWKWARD[self.value % len(AWKWARD)]
            width = 4 if self.value % 2 else 8
            b[i: i + width] = (value % 2 ** (8 * width)).to_bytes(width, "little")
        elif self.op == "insert":
            b[i:i] = bytes([self.value % 256]) * (1 + self.value % 13)
        elif self.op == "delete":
            del b[i: i + 1 + self.value % 13]
        elif self.op == "duplicate":
            n = 1 + self.value % 64
            b[i:i] = b[i: i + n]
        return bytes(b)


OPS = ("truncate", "flip", "flip", "set", "int", "int", "insert", "delete", "duplicate", "json")

# Values a JSON edit puts in place of a number, string or list: wrong types, signs and sizes.
JSON_AWKWARD = (-1, 0, 2**31, 2**64, 1e308, "F32", "", None, True, [], [2**40], [1, -1],
                {"a": 1}, [[1]], 0.5, "../../etc/passwd")


def _json_edit(data, where, value):
    """Replace the n-th scalar or list of a JSON document with an awkward value (data unchanged
    when it is not JSON)."""
    try:
        doc = json.loads(data)
    except (UnicodeDecodeError, json.JSONDecodeError):
        return data
    slots = []

    def walk(node, depth=0):
        items = node.items() if isinstance(node, dict) else \
            enumerate(node) if isinstance(node, list) else ()
        for key, child in items:
            slots.append((node, key))
            if depth < 6:
                walk(child, depth + 1)
    walk(doc)
    if not slots:
        return data
    node, key = slots[min(int(where * len(slots)), len(slots) - 1)]
    node[key] = JSON_AWKWARD[value % len(JSON_AWKWARD)]
    return json.dumps(doc).encode()


def random_mutations(rng, n_max=3):
    """1..n_max mutations drawn with a NumPy Generator (the report's fuzzer)."""
    return [Mutation(OPS[rng.integers(len(OPS))], float(rng.random()), bool(rng.random() < 0.8),
                     int(rng.integers(0, 2**16)), bool(rng.random() < 0.5))
            for _ in range(rng.integers(1, n_max + 1))]


def mutation_strategy():
    """The same space of mutations as a hypothesis strategy (the test's fuzzer: it shrinks a
    failing case to a minimal one)."""
    from hypothesis import strategies as st
    one = st.builds(Mutation, st.sampled_from(OPS), st.floats(0, 1, exclude_max=True),
                    st.booleans(), st.integers(0, 2**16), st.booleans())
    return st.lists(one, min_size=1, max_size=3)


def mutated_copy(kind, seed, mutations, folder):
    """Copy the seed into `folder` with the mutations applied; return the path to read. For an
    HF folder the mutations go into one of its files, chosen by the first mutation's `value`."""
    folder = Path(folder)
    if kind == "hf-folder":
        target = folder / "hf"
        if target.exists():
            shutil.rmtree(target)
        shutil.copytree(seed, target)
        files = sorted(p for p in target.iterdir() if p.is_file())
        victim = files[mutations[0].value % len(files)]
        _mutate_file(victim, mutations)
        return target
    target = folder / Path(seed).name
    shutil.copyfile(seed, target)
    _mutate_file(target, mutations)
    return target


def _mutate_file(path, mutations):
    data = Path(path).read_bytes()
    for m in mutations:
        data = _apply_inner(data, m) if m.inner else m.apply(data)
    Path(path).write_bytes(data)


def _apply_inner(data, m):
    """Apply m to the payload inside a zip (one member) or a safetensors file (its header)."""
    if data[:4] == b"PK\x03\x04":
        import io
        import zipfile
        try:
            with zipfile.ZipFile(io.BytesIO(data)) as zf:
                members = [(info, zf.read(info)) for info in zf.infolist()]
        except Exception:                   # already broken by an earlier edit: edit the bytes
            return m.apply(data)
        pkl = [i for i, (info, _) in enumerate(members) if info.filename.endswith("data.pkl")]
        chosen = pkl[0] if pkl else m.value % len(members)
        out = io.BytesIO()
        with zipfile.ZipFile(out, "w", zipfile.ZIP_STORED) as zf:
            for i, (info, payload) in enumerate(members):
                zf.writestr(info.filename, m.apply(payload) if i == chosen else payload)
        return out.getvalue()
    if len(data) >= 9 and data[8:9] == b"{":  # safetensors: the JSON header, length rewritten
        n = struct.unpack("<Q", data[:8])[0]
        header = m.apply(data[8: 8 + n])
        return struct.pack("<Q", len(header)) + header + data[8 + n:]
    return m.apply(data)


# ---- the readers, and what a pass is ----

def read(kind, path):
    """Run the reader of `kind` on `path` the way a user's call would; return a structure summary
    ({name: shape}) to compare with the seed's."""
    import tinyrwkv
    if kind in ("pth", "safetensors", "gguf-f32", "gguf-q8_0", "hf-folder"):
        model = tinyrwkv.load(path, backend="numpy", progress=False)
        if not hasattr(model, "stored_tensors"):    # an older tinyrwkv (hostile_report --against):
            return None                              # loaded, its structure not comparable
        return {k: tuple(np.shape(v)) for k, v in model.stored_tensors().items()}
    if kind == "state":
        from tinyrwkv import RWKV7
        config = RWKV7(seed_weights()).config
        s = tinyrwkv.load_state(path, config)
        return {"att_shift": s.att_shift.shape, "wkv": s.wkv.shape, "ffn_shift": s.ffn_shift.shape}
    if kind == "trace":
        from tinyrwkv.oracle import load_trace
        return {k: v.shape for k, v in load_trace(path).items()}
    if kind == "tokenizer":
        from tinyrwkv.tokenizer import HFTokenizer
        tok = HFTokenizer(path)
        ids = tok.encode("then the tin")
        tok.decode(ids)
        return {"tokenizer": ()}        # an edited vocabulary that still parses is a valid file
    raise ValueError(kind)


def error_types():
    """tinyrwkv's own error types: what a clear error is raised as."""
    from tinyrwkv import CheckpointError
    from tinyrwkv.tokenizer import TokenizerError
    return CheckpointError, TokenizerError


def judge(kind, path, seed_summary, outcome):
    """'ok' (a clear error or a correct load), or a string saying what went wrong. `outcome` is
    the reader's return value or the exception it raised."""
    if isinstance(outcome, BaseException):
        message = str(outcome)
        if not isinstance(outcome, error_types()):
            return f"{type(outcome).__name__} (not a tinyrwkv error): {message[:200]}"
        if "\n" in message.strip():
            return f"a message of several lines: {message[:200]!r}"
        if Path(path).name not in message:
            return f"a message that does not name the file {Path(path).name}: {message[:200]!r}"
        return "ok"
    if outcome is not None and outcome != seed_summary:
        changed = {k for k in set(outcome) | set(seed_summary)
                   if outcome.get(k) != seed_summary.get(k)}
        return f"loaded with a different structure: {sorted(changed)[:5]}"
    return "ok"


def run_case(kind, path, seed_summary):
    """Read `path`; return (verdict, exception or None)."""
    try:
        outcome = read(kind, path)
    except Exception as e:                  # judged below: only tinyrwkv's errors pass
        return judge(kind, path, seed_summary, e), e
    return judge(kind, path, seed_summary, outcome), None


def describe(mutations):
    return "; ".join(f"{m.op}{'(inner)' if m.inner else ''}@{'hdr' if m.in_header else 'all'}"
                     f"{m.where:.3f}/{m.value}"
                     for m in mutations)


def pack_mutations(mutations):
    """JSON-able form, to pass a case to a worker process."""
    return [[m.op, m.where, m.in_header, m.value, m.inner] for m in mutations]


def unpack_mutations(rows):
    return [Mutation(op, float(w), bool(h), int(v), bool(i)) for op, w, h, v, i in rows]


__all__ = ["KINDS", "make_seeds", "Mutation", "random_mutations", "mutation_strategy",
           "mutated_copy", "read", "run_case", "judge", "describe"]
