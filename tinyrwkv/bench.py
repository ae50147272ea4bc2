"""`tinyrwkv bench`: CPU speed of tinyrwkv's backends beside the official `rwkv` package.

Speed is measured here, never in the tests. One run prints a markdown table per model shape,
with the official package measured in the same run (so ratios hold on a noisy machine), and the
machine's own limits measured in the same run (so "how far from the hardware" is a number, not
a guess).

    tinyrwkv bench --quick                           # a smoke run: a tiny model, seconds
    tinyrwkv bench --shapes 0.1B --runs 3            # one real shape
    tinyrwkv bench --out results.json                # all shapes, every raw number saved

What each number is, and how it is measured
-------------------------------------------
Every (backend, run) is a **fresh Python process** that loads the checkpoint, validates, warms
up and measures, then reports JSON. Runs of the backends are interleaved (run 1: A B C, run 2:
B C A, ...) so that drift of a shared machine hits all of them alike. The table shows the
**median over runs** (peak RSS: the maximum).

* load s: wall time of `tinyrwkv.load(...)` or `rwkv.model.RWKV(path, "cpu fp32")` in that
  process: read the bf16 file, widen to float32, prepare. Imports are not included (they are in
  the JSON as `import_s`). The file was just written, so it is read from the page cache.
* peak RSS GB: `getrusage(RUSAGE_SELF).ru_maxrss` of the process at its end, in 10^9 bytes:
  interpreter, libraries (torch for the official package), weights and the largest prefill's
  activations.
* decode tok/s: after the validation (below; its 16-token prefill runs three times, because
  the official package's TorchScript profiles its first calls and optimises after) and
  `--warmup` single-token forwards (these include any JIT compilation), `--decode-tokens`
  single-token forwards are timed one by one,
  each continuing the state of the last; tok/s = tokens / their summed time. The ids are fixed
  random ids (seeded), the same for every backend.
* prefill@T tok/s: one forward of T seeded random ids from the zero state, logits of the last
  position only (as a prompt is read before generation), after one untimed warm-up prefill of
  `min(128, T)` tokens; tok/s = T / time. When the first run of a prefill length takes longer
  than `--prefill-budget` seconds, later runs skip it, and the table marks the cell "(n=1)".
* x official: this backend's tok/s / the official package's tok/s in the same table (>1: faster).

Machine limits, measured in a fresh process of the same environment at the start of a pass and
after each shape, 7 repetitions of each probe. A limit is a ceiling, so it is the best
repetition of the best probe over the whole pass (the backends' medians are then, if anything,
a low fraction of it); the header shows how much the best of each measurement drifted.

* memory bandwidth, GB/s: a float32 matrix-vector product of a 512 MiB matrix through NumPy's
  BLAS and through torch, bytes of the matrix / time (decode's access pattern: weights read
  once); `np.copyto` of a 1 GiB float32 array, counting read + write (2 GiB) / time; the sum of
  that array (read only) through NumPy and torch.
* matmul rate, GFLOP/s: float32 GEMM 2048x2048x2048 through NumPy's BLAS and torch, 2*n^3 / time.
* % bandwidth = decode bytes per token * decode tok/s / bandwidth. Decode bytes per token = every
  weight the forward reads, except the embedding table (decode reads one row of it) and layer
  0's unused v0/v1/v2, at 4 bytes each; with bf16 weights, the Linear matrices and the head at 2
  (the LoRA matrices and vectors stay float32). A fraction above 100% means the caches held
  part of the weights, or the machine was faster than when its limits were measured.
* % matmul = prefill FLOPs per token * prefill tok/s / matmul rate, at the longest prefill
  length. Prefill FLOPs per token = 2 * (non-embedding weights - the LM head): only the last
  position's logits are computed, so the head's (V, C) product happens once per prompt, not per
  token (counting it per token would overstate 0.1B's work by 60%). The WKV recurrence (about
  6*C*N FLOPs per layer and token, ~1% at these shapes) is not counted.

A shared machine: for each run, the parent reads /proc/stat and reports how many cores other
processes used meanwhile (the table's notes flag runs above a quarter of a core: on 2 cores, a
backend's threads then share a core, and parallel code such as OpenMP or Numba's can slow down
several-fold). `--wait-quiet S` waits up to S seconds for a quiet machine before each run;
`--retry-busy N` repeats a run that was disturbed anyway (up to N times; the repeated runs stay
in the JSON and are counted under the table).

Synthetic checkpoints: generated on the fly from a seed (`--seed`), with the official key set
and shapes (rwkv7.md §1.1) and realistic scales (matrices std 0.02, lerps in [0, 1], decay
biases in [-8, 3], ...). Speed does not depend on the values; the values only need to keep every
number finite, which the validation checks. The file is a bf16 `.pth` written by torch, as
released models are, read by both tinyrwkv and the official package (the same bytes); without
torch, a bf16 `.safetensors` for tinyrwkv only. They are written to a temporary folder (removed
at the end) or to `--cache-dir` (kept and reused).

Validation (before any timing, R9 of the style guide): each process computes the logits of a
fixed 16-token prefill and of one decode step after it; the table's notes give
max|delta logit| / std(logits) against the official package (or, without it, against the numpy
backend). Above `CHECK_TOL` the row is marked "CHECK FAILED".

The worker side of this module (`_worker_*`) runs inside the child processes; the parent side
(`run_pass`, `format_pass`) never imports torch, the official package or a backend, so its own
memory and threads stay out of the measurements.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import re
import resource
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import zlib
from dataclasses import asdict, dataclass
from pathlib import Path

GENERATOR_VERSION = 1      # bump when the synthetic values change, so cached files are remade
CHECK_TOKENS = 16          # validation prefill length (>= 4: exercises the chunked WKV path)
CHECK_TOL = 1e-3           # max|delta logit|/std: float32 reorderings give ~1e-6 to 1e-5; a real
                           # bug (e.g. a wrong GroupNorm eps) gives ~1e-2
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
BUSY_CORES = 0.25          # other processes using more cores than this during a run: a noisy run
GB = 1e9


# ----------------------------------------------------------------------------------------------
# Shapes
# ----------------------------------------------------------------------------------------------

@dataclass(frozen=True)
class Shape:
    """A model shape. F = 4C, head size N = 64 (as in every released RWKV-7)."""
    name: str
    n_layer: int
    n_embd: int
    vocab_size: int
    ranks: tuple            # LoRA ranks (Dw, Da, Dv, Dg)
    head_size: int = 64

    @property
    def dim_ffn(self):
        return 4 * self.n_embd

    def tensor_shapes(self):
        """Official key -> stored shape (rwkv7.md §1.1), layer 0's v0/v1/v2 included as in
        released files."""
        L, C, V, N, F = self.n_layer, self.n_embd, self.vocab_size, self.head_size, self.dim_ffn
        H = C // N
        Dw, Da, Dv, Dg = self.ranks
        vec = (1, 1, C)
        out = {"emb.weight": (V, C), "blocks.0.ln0.weight": (C,), "blocks.0.ln0.bias": (C,)}
        for i in range(L):
            b = f"blocks.{i}."
            out.update({b + "ln1.weight": (C,), b + "ln1.bias": (C,),
                        b + "ln2.weight": (C,), b + "ln2.bias": (C,)})
            out.update({b + f"att.x_{c}": vec for c in "rwkvag"})
            out.update({
                b + "att.w0": vec, b + "att.w1": (C, Dw), b + "att.w2": (Dw, C),
                b + "att.a0": vec, b + "att.a1": (C, Da), b + "att.a2": (Da, C),
                b + "att.v0": vec, b + "att.v1": (C, Dv), b + "att.v2": (Dv, C),
                b + "att.g1": (C, Dg), b + "att.g2": (Dg, C),
                b + "att.k_k": vec, b + "att.k_a": vec, b + "att.r_k": (H, N),
                b + "att.receptance.weight": (C, C), b + "att.key.weight": (C, C),
                b + "att.value.weight": (C, C), b + "att.output.weight": (C, C),
                b + "att.ln_x.weight": (C,), b + "att.ln_x.bias": (C,),
                b + "ffn.x_k": vec, b + "ffn.key.weight": (F, C), b + "ffn.value.weight": (C, F),
            })
        out.update({"ln_out.weight": (C,), "ln_out.bias": (C,), "head.weight": (V, C)})
        return out

    def counts(self):
        """Weights by role: `params` read by the forward pass (layer 0's v0/v1/v2 are not),
        `embedding`, `head`, `non_embedding` (all but the embedding), `body` (all but the
        embedding and the head), `big` (the Linear matrices and the head: what a bf16 backend
        keeps 16-bit, see fast.BIG_MATRICES; LoRA and vectors stay float32)."""
        unused = {f"blocks.0.att.{n}" for n in ("v0", "v1", "v2")}
        sizes = {k: _prod(s) for k, s in self.tensor_shapes().items() if k not in unused}
        total, emb, head = sum(sizes.values()), sizes["emb.weight"], sizes["head.weight"]
        big = sum(n for k, n in sizes.items() if k.endswith(".weight") and len(
            self.tensor_shapes()[k]) == 2 and k != "emb.weight")
        return {"params": total, "embedding": emb, "head": head,
                "non_embedding": total - emb, "body": total - emb - head, "big": big}

    def decode_bytes(self, weights):
        """Bytes of weights one decode step reads: all but the embedding table (one row of it
        is read), 4 bytes each, or 2 for the big matrices when stored as bf16."""
        n = self.counts()
        if weights == "bfloat16":
            return 2 * n["big"] + 4 * (n["non_embedding"] - n["big"])
        return 4 * n["non_embedding"]

    def describe(self):
        n = self.counts()
        return (f"L{self.n_layer} C{self.n_embd} V{self.vocab_size} "
                f"H{self.n_embd // self.head_size}x{self.head_size} F{self.dim_ffn}, "
                f"LoRA {'/'.join(map(str, self.ranks))}: {n['params'] / 1e6:.1f}M weights "
                f"({n['non_embedding'] / 1e6:.1f}M non-embedding)")


SHAPES = {
    "0.1B": Shape("0.1B", 12, 768, 65536, (64, 64, 32, 128)),
    "0.4B": Shape("0.4B", 24, 1024, 65536, (64, 64, 32, 128)),
    "1.5B": Shape("1.5B", 24, 2048, 65536, (96, 96, 64, 256)),
    "tiny": Shape("tiny", 2, 256, 65536, (32, 32, 32, 64)),      # --quick
}


def parse_shape(text):
    """A named shape (0.1B, 0.4B, 1.5B, tiny) or a custom one such as L4-C512 or L4-C512-V1024
    (LoRA ranks from the training-code formula, `synthetic.lora_ranks`)."""
    if text in SHAPES:
        return SHAPES[text]
    m = re.fullmatch(r"L(\d+)-?C(\d+)(?:-?V(\d+))?", text)
    if not m:
        raise ValueError(f"unknown shape {text!r}: use {', '.join(SHAPES)} or e.g. L4-C512-V1024")
    from .synthetic import lora_ranks
    L, C, V = int(m[1]), int(m[2]), int(m[3] or 65536)
    if C % 64:
        raise ValueError(f"shape {text!r}: n_embd must be a multiple of the head size 64")
    return Shape(text, L, C, V, lora_ranks(C))


def _prod(shape):
    n = 1
    for d in shape:
        n *= d
    return n


# ----------------------------------------------------------------------------------------------
# Synthetic checkpoints
# ----------------------------------------------------------------------------------------------

def synthetic_tensor(key, shape, seed):
    """Seeded float32 values of realistic scale for one official key.

    Each key has its own random stream (seed, crc32(key)), so a tensor does not depend on the
    order of generation. Much faster than `synthetic.make_weights` (no orthogonalisation), which
    matters at 1.5B; speed does not depend on the values.
    """
    import numpy as np
    rng = np.random.default_rng([seed, zlib.crc32(key.encode())])
    f32 = np.float32

    def normal(mean, std):
        return rng.standard_normal(shape, dtype=f32) * f32(std) + f32(mean)

    def uniform(lo, hi):
        return rng.random(shape, dtype=f32) * f32(hi - lo) + f32(lo)

    name = key.split(".", 2)[-1] if key.startswith("blocks.") else key
    if name in ("ln0.weight", "ln1.weight", "ln2.weight", "ln_out.weight"):
        return normal(1.0, 0.02)
    if name.endswith(".bias") or name == "ln_out.bias":
        return normal(0.0, 0.02)
    if name == "att.ln_x.weight":
        return uniform(0.5, 1.0)
    if re.fullmatch(r"att\.x_[rwkvag]|ffn\.x_k", name):
        return uniform(0.0, 1.0)                       # token-shift lerps, ~0.5 on average
    special = {
        "att.w0": lambda: uniform(-8.0, 3.0),          # decay bias: decays spread over (0.55, 1)
        "att.a0": lambda: normal(-0.2, 0.3),           # in-context learning rate bias
        "att.v0": lambda: normal(0.7, 0.1),            # value-residual gate bias
        "att.k_k": lambda: normal(0.7, 0.05),
        "att.k_a": lambda: normal(1.0, 0.02),
        "att.r_k": lambda: normal(-0.04, 0.3),
    }
    if name in special:
        return special[name]()
    if name in ("att.w2", "att.a2", "att.v2", "att.g2"):
        return normal(0.0, 0.1)                        # LoRA up-projections
    return normal(0.0, 0.02)                           # every other matrix, emb and head


def checkpoint_name(shape, seed, suffix):
    r = "-".join(map(str, shape.ranks))
    return (f"rwkv7-synthetic-L{shape.n_layer}-C{shape.n_embd}-V{shape.vocab_size}-N{shape.head_size}"
            f"-r{r}-seed{seed}-g{GENERATOR_VERSION}{suffix}")


def write_checkpoint(shape, seed, folder):
    """Write the bf16 checkpoint for `shape` into `folder` (in this process) and return its path.

    With torch: a `.pth` from `torch.save`, bf16 tensors, as released models are (the official
    package needs it). Without torch: a bf16 `.safetensors` (tinyrwkv reads it; the official
    package cannot). Written to a temporary name and renamed, so an interrupted run never leaves
    a half-written file in a cache folder. Peak memory: one float32 tensor plus the bf16 file's
    contents (3 GB at 1.5B); without torch, the float32 weights (6 GB at 1.5B).
    """
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shapes = shape.tensor_shapes()
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        path = folder / checkpoint_name(shape, seed, ".pth")
        tensors = {k: torch.from_numpy(synthetic_tensor(k, s, seed)).to(torch.bfloat16)
                   for k, s in shapes.items()}
        tmp = path.with_name(path.name + ".partial")
        torch.save(tensors, tmp)
    else:
        from .checkpoint import save_safetensors
        path = folder / checkpoint_name(shape, seed, ".safetensors")
        tensors = {k: synthetic_tensor(k, s, seed) for k, s in shapes.items()}
        tmp = path.with_name(path.name + ".partial")
        save_safetensors(tmp, tensors, bf16_keys=tensors.keys())
    os.replace(tmp, path)
    return path


def find_checkpoint(shape, seed, folder):
    """An already written checkpoint for this shape and seed in `folder`, or None."""
    for suffix in (".pth", ".safetensors"):
        path = Path(folder) / checkpoint_name(shape, seed, suffix)
        if path.is_file():
            return path
    return None


# ----------------------------------------------------------------------------------------------
# Worker side: runs in a fresh child process (python -m tinyrwkv.bench --worker spec.json)
# ----------------------------------------------------------------------------------------------

def _peak_rss_bytes():
    """Peak resident set size of this process: ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _thread_info():
    """What the thread pools and BLAS libraries loaded in this process are (threadpoolctl: the
    OpenBLAS kernel chosen at run time is `architecture`), plus numba's and torch's threads."""
    info = {}
    try:
        import threadpoolctl
        info["threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                   "num_threads", "threading_layer", "architecture")}
            | {"file": os.path.basename(p.get("filepath") or "")}
            for p in threadpoolctl.threadpool_info()]
    except ImportError:
        info["threadpools"] = None      # pip install threadpoolctl to see the BLAS kernel
    if "numba" in sys.modules:
        info["numba_threads"] = sys.modules["numba"].get_num_threads()
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
        info["torch_blas"] = _torch_blas(sys.modules["torch"])
    return info


def _times(fn, reps):
    """Wall times of `reps` calls of fn(), after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _worker_limits(spec):
    """Machine limits, each probe timed `reps` times: {probe: {"amount": bytes or FLOPs per call,
    "unit": "GB/s" or "GFLOP/s", "seconds": [...]}}. The parent takes the best time of each.

    Bandwidth probes (bytes per call / time): float32 matrix-vector product through NumPy's BLAS
    and through torch (the access pattern of decode: the matrix is read once); `np.copyto`,
    counting read + write; a sum over the array (read only), NumPy (one thread) and torch
    (all threads). Matmul probes: float32 GEMM n x n x n through NumPy's BLAS and torch.
    """
    import numpy as np
    quick, reps = spec["quick"], spec.get("reps", 7)
    rng = np.random.default_rng(0)
    probes = {}

    def probe(name, amount, unit, fn):
        probes[name] = {"amount": amount, "unit": unit, "seconds": _times(fn, reps)}

    n = 1024 if quick else 2048
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    probe("gemm numpy", 2 * n ** 3, "GFLOP/s", lambda: a @ b)
    m = rng.standard_normal((4096 if quick else 16384, 8192), dtype=np.float32)   # 128 / 512 MiB
    v = rng.standard_normal(8192, dtype=np.float32)
    probe("matvec numpy", m.nbytes, "GB/s", lambda: m @ v)
    src = np.ones((64 if quick else 256) * 2 ** 20, dtype=np.float32)              # 256 MiB / 1 GiB
    dst = np.empty_like(src)
    probe("copy numpy", 2 * src.nbytes, "GB/s", lambda: np.copyto(dst, src))
    probe("sum numpy", src.nbytes, "GB/s", lambda: src.sum())
    threads = _thread_info()             # before torch: NumPy's BLAS as the models see it
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        ta, tb, tm, tv, ts = (torch.from_numpy(x) for x in (a, b, m, v, src))
        probe("gemm torch", 2 * n ** 3, "GFLOP/s", lambda: torch.mm(ta, tb))
        probe("matvec torch", m.nbytes, "GB/s", lambda: torch.mv(tm, tv))
        probe("sum torch", src.nbytes, "GB/s", lambda: ts.sum())
    return {"probes": probes, "gemm_n": n, "matvec_bytes": m.nbytes, "copy_bytes": src.nbytes,
            "numpy_blas": _numpy_blas_config(), "threads": threads,
            "torch_blas": _torch_blas(torch) if torch is not None else None}


def _numpy_blas_config():
    """NumPy's BLAS as built (name, version, OpenBLAS build configuration)."""
    import numpy as np
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
    except Exception as e:               # older NumPy: no mode="dicts"
        return {"error": f"{type(e).__name__}: {e}"}


def _torch_blas(torch):
    config = torch.__config__.show()
    m = re.search(r"BLAS_INFO=(\w+)", config)
    return m[1] if m else "unknown"


def _load_tinyrwkv(spec):
    """tinyrwkv.load with the backend, weight storage and threads of the spec, passing each
    option only if this tinyrwkv's loader has it (an older loader is the numpy backend with
    float32 weights); asking for what the loader cannot do raises, and the row says why."""
    import inspect

    import numpy as np
    import tinyrwkv
    has = inspect.signature(tinyrwkv.load).parameters
    kwargs = {"dtype": "float32", "progress": False}
    for option, value, implied in (("backend", spec["backend"], "numpy"),
                                   ("weights", spec["weights"], "float32"),
                                   ("threads", spec.get("threads"), None)):
        if option in has:
            kwargs[option] = value
        elif value != implied:
            raise RuntimeError(f"this tinyrwkv.load has no {option!r} option "
                               f"(needed for {option}={value!r})")
    t0 = time.perf_counter()
    model = tinyrwkv.load(spec["checkpoint"], **kwargs)
    load_s = time.perf_counter() - t0

    def prefill(ids, state=None):
        logits, state = model.forward(np.asarray(ids), state)
        return np.asarray(logits), state

    def step(token, state):
        logits, state = model.forward([int(token)], state)
        return logits, state

    info = {"backend_reported": getattr(model, "backend", None),
            "n_params_reported": int(getattr(model, "n_params", 0) or 0)}
    return load_s, prefill, step, info


def _official_env():
    """The official package reads these once, at import: RWKV-7 on, no CUDA, TorchScript on."""
    os.environ.update({"RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1"})


def _load_official(spec):
    """The official package, `cpu fp32`. It mutates the state list it is given, which is what we
    want here (each step continues the last)."""
    _official_env()
    import torch
    torch.set_num_threads(spec.get("threads") or os.cpu_count() or 1)
    from rwkv.model import RWKV
    path = spec["checkpoint"]
    if not path.endswith(".pth"):
        raise RuntimeError("the official package reads only .pth files (torch is needed to write one)")
    t0 = time.perf_counter()
    model = RWKV(path[: -len(".pth")], "cpu fp32")  # the official loader appends '.pth'
    load_s = time.perf_counter() - t0

    def prefill(ids, state=None):
        logits, state = model.forward([int(i) for i in ids], state)
        return logits.float().numpy(), state

    def step(token, state):
        return model.forward([int(token)], state)

    info = {"backend_reported": "official rwkv " + _version("rwkv") + ", cpu fp32",
            "torch": torch.__version__}
    return load_s, prefill, step, info


def _worker_measure(spec):
    """One backend, one run: load, validate, warm up, decode, prefill at each T."""
    import numpy as np
    t0 = time.perf_counter()
    out = {}
    loader = _load_official if spec["backend"] == "official" else _load_tinyrwkv
    if spec["backend"] == "official":   # import time is reported apart from load time
        _official_env()
        import torch  # noqa: F401
        import rwkv.model  # noqa: F401
    else:
        import tinyrwkv  # noqa: F401
    out["import_s"] = time.perf_counter() - t0
    out["rss_after_import_gb"] = _peak_rss_bytes() / GB

    load_s, prefill, step, info = loader(spec)
    out.update(info, load_s=load_s, rss_after_load_gb=_peak_rss_bytes() / GB)

    V = spec["vocab_size"]
    rng = np.random.default_rng(spec["seed"] + 1)
    check_ids = rng.integers(0, V, CHECK_TOKENS)
    decode_ids = rng.integers(0, V, spec["warmup"] + spec["decode_tokens"])

    # Validation (before any timing): a 16-token prefill and one decode step after it. The
    # prefill runs 3 times: TorchScript (official) profiles the first calls and optimises after.
    t = time.perf_counter()
    seq_logits, state = prefill(check_ids)
    out["first_prefill_s"] = time.perf_counter() - t
    for _ in range(2):
        prefill(check_ids)
    t = time.perf_counter()
    step_logits, state = step(decode_ids[0], state)
    out["first_step_s"] = time.perf_counter() - t
    check = np.stack([np.asarray(seq_logits, np.float32), np.asarray(step_logits, np.float32)])
    out["finite"] = bool(np.isfinite(check).all())
    if spec.get("check_out"):
        np.save(spec["check_out"], check)

    # Decode: warm-up steps (JIT, TorchScript profiling), then timed steps.
    for token in decode_ids[1: spec["warmup"]]:
        _, state = step(token, state)
    times = []
    for token in decode_ids[spec["warmup"]:]:
        t = time.perf_counter()
        _, state = step(token, state)
        times.append(time.perf_counter() - t)
    out["decode_step_s"] = times
    out["decode_tok_s"] = len(times) / sum(times) if times else None

    # Prefill: one untimed warm-up, then one timed forward per length.
    out["prefill_s"] = {}
    if spec["prefill"]:
        n_warm = min(128, min(spec["prefill"]))
        t = time.perf_counter()
        prefill(rng.integers(0, V, n_warm))
        out["warmup_prefill"] = {"tokens": n_warm, "seconds": time.perf_counter() - t}
        for T in spec["prefill"]:
            ids = np.random.default_rng([spec["seed"] + 2, T]).integers(0, V, T)
            t = time.perf_counter()
            prefill(ids)
            out["prefill_s"][str(T)] = time.perf_counter() - t
    out["peak_rss_gb"] = _peak_rss_bytes() / GB
    out["threads"] = _thread_info()
    return out


def _worker_make(spec):
    shape = Shape(**{**spec["shape"], "ranks": tuple(spec["shape"]["ranks"])})
    t0 = time.perf_counter()
    path = write_checkpoint(shape, spec["seed"], spec["folder"])
    return {"checkpoint": str(path), "seconds": time.perf_counter() - t0,
            "bytes": path.stat().st_size}


def worker_main(spec_path):
    """Entry point of a child process: read the spec, do the task, write JSON to spec['out']."""
    spec = json.loads(Path(spec_path).read_text())
    tasks = {"limits": _worker_limits, "measure": _worker_measure, "make": _worker_make}
    try:
        result = {"ok": True, **tasks[spec["task"]](spec)}
    except Exception as e:                 # reported as "not available: <reason>" by the parent
        import traceback
        result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    Path(spec["out"]).write_text(json.dumps(result))


# ----------------------------------------------------------------------------------------------
# Parent side: plans the runs, starts the children, summarises
# ----------------------------------------------------------------------------------------------

@dataclass
class Options:
    """Everything a benchmark pass needs (the CLI options, resolved)."""
    shapes: list
    backends: list
    runs: int = 3
    decode_tokens: int = 32
    warmup: int = 8
    prefill: tuple = (512, 2048)
    prefill_budget: float = 60.0
    threads: int | None = None
    seed: int = 0
    quick: bool = False
    timeout: float = 3600.0
    verbose: bool = True
    cache_dir: str | None = None
    wait_quiet: float = 0.0
    retry_busy: int = 0


BACKENDS = ("numpy", "numba", "numba-bf16", "official")


def backend_setup(name):
    """'numpy', 'numba', 'numba-bf16', 'numpy-bf16', 'official' -> (backend, weights)."""
    if name == "official":
        return "official", "float32"
    backend, _, suffix = name.partition("-")
    if backend not in ("numpy", "numba") or suffix not in ("", "bf16"):
        raise ValueError(f"unknown backend {name!r}: use {', '.join(BACKENDS)} or numpy-bf16")
    return backend, "bfloat16" if suffix == "bf16" else "float32"


def _log(opts, message):
    if opts.verbose:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def _cpu_seconds():
    """(busy, steal) CPU seconds of the whole machine since boot, from /proc/stat (None
    elsewhere). busy = user + nice + system + irq + softirq; steal = time the hypervisor gave
    our virtual CPUs to someone else."""
    try:
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:9]]
    except (OSError, ValueError):
        return None
    tick = os.sysconf("SC_CLK_TCK")
    user, nice, system, idle, iowait, irq, softirq, steal = v
    return (user + nice + system + irq + softirq) / tick, steal / tick


def _children_cpu_seconds():
    r = resource.getrusage(resource.RUSAGE_CHILDREN)
    return r.ru_utime + r.ru_stime


def run_child(spec, workdir, env, timeout):
    """Run one task in a fresh `python -m tinyrwkv.bench --worker` and return its JSON result.
    A crash (e.g. killed for memory) becomes {"ok": False, "error": ...}.

    Also measures how busy the rest of the machine was meanwhile: `other_cores` = (CPU time of
    the whole machine - the child's) / wall time, i.e. how many cores other processes used on
    average (0 on a quiet machine; on 2 cores, 1 means our threads had to share), and
    `steal_cores`, the same for time taken by the hypervisor.
    """
    workdir = Path(workdir)
    n = len(list(workdir.glob("spec-*.json")))
    spec_path, out_path = workdir / f"spec-{n}.json", workdir / f"result-{n}.json"
    spec = {**spec, "out": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    # The child imports this very tinyrwkv, installed or not (benchmarks/bench_cpu.py from a checkout).
    root = str(Path(__file__).resolve().parents[1])
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)}
    cpu0, child0, t0 = _cpu_seconds(), _children_cpu_seconds(), time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "tinyrwkv.bench", "--worker", str(spec_path)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall, cpu1 = time.perf_counter() - t0, _cpu_seconds()
    if out_path.is_file():
        result = json.loads(out_path.read_text())
    else:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
        why = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        result = {"ok": False, "error": f"worker exited with code {proc.returncode}{why}: {tail[0]}"}
    result["stdout_tail"] = (proc.stdout or "")[-2000:]
    if cpu0 and cpu1 and wall > 0:
        child = _children_cpu_seconds() - child0
        result["machine_load"] = {"wall_s": wall, "child_cpu_s": child,
                                  "other_cores": max(0.0, (cpu1[0] - cpu0[0] - child) / wall),
                                  "steal_cores": (cpu1[1] - cpu0[1]) / wall}
    return result


def wait_for_quiet(opts, busy_limit=None, sample_s=2.0):
    """With --wait-quiet S: before a run, wait (at most S seconds) until other processes use
    less than `busy_limit` cores, sampled over `sample_s` seconds. Returns the seconds waited."""
    if not opts.wait_quiet or _cpu_seconds() is None:
        return 0.0
    busy_limit = BUSY_CORES if busy_limit is None else busy_limit
    t0, said = time.perf_counter(), False
    while True:
        a = _cpu_seconds()
        time.sleep(sample_s)
        busy = (_cpu_seconds()[0] - a[0]) / sample_s
        waited = time.perf_counter() - t0
        if busy < busy_limit or waited >= opts.wait_quiet:
            return waited
        if not said:
            _log(opts, f"other processes use {busy:.2f} cores: waiting up to "
                       f"{opts.wait_quiet:.0f} s for a quiet machine")
            said = True


def _mem_available_bytes():
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemAvailable:"):
                return int(line.split()[1]) * 1024
    except OSError:
        pass
    return None


def measure_limits(opts, workdir, env):
    wait_for_quiet(opts)
    return run_child({"task": "limits", "quick": opts.quick, "threads": opts.threads},
                     workdir, env, opts.timeout)


def combine_limits(samples):
    """The machine's limits from every limits measurement of a pass.

    A limit is a ceiling, so each probe's rate is its best (fastest) repetition, over all
    measurements, and the limit is the best probe: the most this machine was seen to do. (The
    backends' numbers are medians, so their fractions of the limit are, if anything, low.)
    `drift` gives, per measurement, the best bandwidth and matmul rate seen then: a wide range
    means the machine's speed changed during the pass.
    """
    ok = [s for s in samples if s.get("ok")]
    if not ok:
        return {"error": samples[0].get("error") if samples else "not measured"}
    rate = lambda p: p["amount"] / min(p["seconds"]) / 1e9
    by = {"GB/s": {}, "GFLOP/s": {}}
    drift = []
    for sample in ok:
        now = {"GB/s": 0.0, "GFLOP/s": 0.0}
        for name, p in sample["probes"].items():
            r = rate(p)
            by[p["unit"]][name] = max(by[p["unit"]].get(name, 0.0), r)
            now[p["unit"]] = max(now[p["unit"]], r)
        drift.append({"bandwidth_gb_s": now["GB/s"], "matmul_gflops": now["GFLOP/s"]})
    first = ok[0]
    return {"bandwidth_gb_s": max(by["GB/s"].values()), "bandwidth_by": by["GB/s"],
            "matmul_gflops": max(by["GFLOP/s"].values()), "matmul_by": by["GFLOP/s"],
            "drift": drift, "gemm_n": first["gemm_n"], "copy_bytes": first["copy_bytes"],
            "matvec_bytes": first["matvec_bytes"], "numpy_blas": first.get("numpy_blas"),
            "threads": first.get("threads"), "torch_blas": first.get("torch_blas")}


def run_shape(shape, checkpoint, opts, workdir, env, available_official):
    """All runs of all backends on one shape, interleaved. Returns {backend: record}."""
    rows = {}
    for name in opts.backends:
        backend, weights = backend_setup(name)
        rows[name] = {"backend": backend, "weights": weights, "runs": [], "error": None,
                      "skipped_prefill": {}, "discarded_busy": []}
        if backend == "official" and available_official is not True:
            rows[name]["error"] = available_official
        elif backend == "official" and not str(checkpoint).endswith(".pth"):
            rows[name]["error"] = "the official package needs a .pth (torch is not installed)"
        need = shape.counts()["params"] * 4 * 1.2     # float32 weights plus headroom
        free = _mem_available_bytes()
        if rows[name]["error"] is None and free is not None and need > free:
            rows[name]["error"] = (f"not run: needs about {need / GB:.1f} GB, "
                                   f"{free / GB:.1f} GB available")

    first_prefill = {}      # (backend, T) -> seconds of the first run
    for r in range(opts.runs):
        live = [n for n in opts.backends if rows[n]["error"] is None]
        k = r % max(len(live), 1)
        for name in live[k:] + live[:k]:                # rotate the order every run
            row = rows[name]
            prefill = []
            for T in opts.prefill:
                took = first_prefill.get((name, T))
                if r > 0 and took is not None and took > opts.prefill_budget:
                    row["skipped_prefill"][str(T)] = row["skipped_prefill"].get(str(T), 0) + 1
                else:
                    prefill.append(T)
            spec = {"task": "measure", "backend": row["backend"], "weights": row["weights"],
                    "checkpoint": str(checkpoint), "vocab_size": shape.vocab_size,
                    "seed": opts.seed, "warmup": opts.warmup, "decode_tokens": opts.decode_tokens,
                    "prefill": prefill, "threads": opts.threads,
                    "check_out": str(Path(workdir) / f"check-{shape.name}-{name}.npy") if r == 0 else None}
            for attempt in range(1 + opts.retry_busy):
                waited = wait_for_quiet(opts)
                result = run_child(spec, workdir, env, opts.timeout)
                result["waited_for_quiet_s"] = waited
                busy = result.get("machine_load", {}).get("other_cores") or 0.0
                if not result.get("ok") or busy <= BUSY_CORES or attempt == opts.retry_busy:
                    break
                row["discarded_busy"].append(result)      # kept in the JSON, not in the medians
                _log(opts, f"{shape.name} run {r + 1}/{opts.runs} {name}: other processes used "
                           f"{busy:.2f} cores: run again (--retry-busy)")
            if not result.get("ok"):
                row["error"] = result.get("error")
                row["traceback"] = result.get("traceback")
                _log(opts, f"{shape.name} {name}: not available: {row['error']}")
                continue
            for T, s in result["prefill_s"].items():
                first_prefill.setdefault((name, int(T)), s)
            row["runs"].append(result)
            pre = ", ".join(f"prefill@{T} {int(T) / s:.1f} tok/s" for T, s in result["prefill_s"].items())
            busy = result.get("machine_load", {}).get("other_cores")
            _log(opts, f"{shape.name} run {r + 1}/{opts.runs} {name}: load {result['load_s']:.2f} s, "
                       f"decode {result['decode_tok_s']:.2f} tok/s" + (f", {pre}" if pre else "")
                       + (f"; other processes used {busy:.2f} cores" if busy is not None else ""))
    _check_logits(shape, rows, workdir)
    return rows


def _check_logits(shape, rows, workdir):
    """max|delta logit|/std of each backend's validation logits against the official package's
    (or, without it, the numpy backend's)."""
    import numpy as np
    logits = {}
    for name in rows:
        path = Path(workdir) / f"check-{shape.name}-{name}.npy"
        if path.is_file() and rows[name]["runs"]:
            logits[name] = np.load(path).astype(np.float64)
    ref = "official" if "official" in logits else ("numpy" if "numpy" in logits else None)
    for name, got in logits.items():
        rows[name]["finite"] = all(run.get("finite", False) for run in rows[name]["runs"])
        if ref is not None and name != ref:
            want = logits[ref]
            rows[name]["check"] = {"against": ref,
                                   "max_abs_over_std": float(np.abs(got - want).max() / want.std())}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(shape, rows, limits, opts):
    """Medians per backend, ratios to the official package, fractions of the machine limits."""
    counts = shape.counts()
    out = {}
    for name, row in rows.items():
        runs = row["runs"]
        if not runs:
            out[name] = {"error": row["error"] or "no successful run"}
            continue
        s = {"weights": row["weights"], "runs": len(runs),
             "backend_reported": runs[0].get("backend_reported"),
             "threads": runs[0].get("threads"),
             "other_cores": [x.get("machine_load", {}).get("other_cores") for x in runs],
             "load_s": _median([x["load_s"] for x in runs]),
             "peak_rss_gb": max(x["peak_rss_gb"] for x in runs),
             "decode_tok_s": _median([x["decode_tok_s"] for x in runs]),
             "prefill_tok_s": {}, "prefill_runs": {},
             "error_in_later_run": row["error"]}
        for T in opts.prefill:
            vals = [T / x["prefill_s"][str(T)] for x in runs if str(T) in x["prefill_s"]]
            if vals:
                s["prefill_tok_s"][str(T)] = statistics.median(vals)
                s["prefill_runs"][str(T)] = len(vals)
        s["decode_bytes_per_token"] = shape.decode_bytes(row["weights"])
        s["prefill_flops_per_token"] = 2 * counts["body"]
        if limits.get("bandwidth_gb_s") and s["decode_tok_s"]:
            s["bandwidth_fraction"] = (s["decode_bytes_per_token"] * s["decode_tok_s"]
                                       / (limits["bandwidth_gb_s"] * GB))
        if limits.get("matmul_gflops"):
            s["matmul_fraction"] = {T: s["prefill_flops_per_token"] * v / (limits["matmul_gflops"] * 1e9)
                                    for T, v in s["prefill_tok_s"].items()}
        s["check"], s["finite"] = row.get("check"), row.get("finite")
        out[name] = s
    ref = out.get("official")
    if ref and "error" not in ref:
        for name, s in out.items():
            if "error" in s:
                continue
            s["x_official"] = {"decode": _ratio(s["decode_tok_s"], ref["decode_tok_s"])}
            for T, v in s["prefill_tok_s"].items():
                s["x_official"][T] = _ratio(v, ref["prefill_tok_s"].get(T))
    return out


def _ratio(a, b):
    return a / b if a and b else None


def run_pass(opts, workdir, env, label, checkpoints):
    """One whole benchmark (limits + every shape) in the environment `env` of the children."""
    t0 = time.perf_counter()
    official = official_available()
    _log(opts, f"pass '{label}': measuring the machine's limits")
    samples = [measure_limits(opts, workdir, env)]
    shapes = {}
    for shape in opts.shapes:
        if shape.name not in checkpoints:
            _log(opts, f"{shape.name}: writing the synthetic checkpoint ({shape.describe()})")
            checkpoints[shape.name] = ensure_checkpoint(shape, opts, workdir, env)
        ckpt = checkpoints[shape.name]
        if not ckpt.get("ok"):
            shapes[shape.name] = {"shape": asdict(shape), "error": ckpt.get("error")}
            continue
        ts = time.perf_counter()
        rows = run_shape(shape, ckpt["checkpoint"], opts, workdir, env, official)
        shapes[shape.name] = {"shape": asdict(shape), "counts": shape.counts(),
                              "checkpoint": ckpt, "rows": rows,
                              "seconds": time.perf_counter() - ts}
        if not opts.quick:                 # again after each shape: the machine may drift
            _log(opts, f"pass '{label}': measuring the machine's limits again")
            samples.append(measure_limits(opts, workdir, env))
    limits = combine_limits(samples)
    for name, sh in shapes.items():
        if "rows" in sh:
            sh["summary"] = summarize(_shape_named(opts, name), sh["rows"], limits, opts)
    return {"label": label, "env": {v: env.get(v) for v in OPENBLAS_VARS},
            "limits": limits, "limit_samples": samples, "shapes": shapes,
            "seconds": time.perf_counter() - t0}


def _shape_named(opts, name):
    return next(s for s in opts.shapes if s.name == name)


def ensure_checkpoint(shape, opts, workdir, env):
    """The checkpoint for `shape`: reused from the cache folder, or written by a child process
    (so the parent never holds the weights nor imports torch)."""
    folder = Path(opts.cache_dir) if opts.cache_dir else Path(workdir)
    found = find_checkpoint(shape, opts.seed, folder)
    if found is not None:
        return {"ok": True, "checkpoint": str(found), "reused": True, "bytes": found.stat().st_size}
    return run_child({"task": "make", "shape": asdict(shape), "seed": opts.seed,
                      "folder": str(folder)}, workdir, env, opts.timeout)


def official_available():
    """True, or the reason the official package cannot run."""
    import importlib.util
    missing = [m for m in ("torch", "rwkv") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {' and '.join(missing)} (pip install rwkv torch)"
    return True


def _version(dist):
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return "not installed"


def machine_info():
    """CPU model, cores, memory, OS and library versions (read without importing them)."""
    cpu, physical = platform.processor() or "unknown", None
    try:
        text = Path("/proc/cpuinfo").read_text()
        m = re.search(r"^model name\s*:\s*(.+)$", text, re.M)
        cpu = m[1].strip() if m else cpu
        cores = set()
        for block in text.split("\n\n"):          # one block per logical CPU
            ids = dict(re.findall(r"^(physical id|core id)\s*:\s*(\d+)", block, re.M))
            if len(ids) == 2:
                cores.add((ids["physical id"], ids["core id"]))
        physical = len(cores) or None
    except OSError:
        pass
    mem = None
    try:
        mem = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    except (ValueError, OSError, AttributeError):
        pass
    usable = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return {"cpu": cpu, "logical_cores": os.cpu_count(), "physical_cores": physical,
            "usable_cores": usable, "memory_gb": mem / GB if mem else None,
            "os": platform.platform(), "python": platform.python_version(),
            "versions": {d: _version(d) for d in ("tinyrwkv", "numpy", "numba", "torch", "rwkv",
                                                  "threadpoolctl")},
            "thread_env": {v: os.environ.get(v) for v in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                          "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}}


# ----------------------------------------------------------------------------------------------
# Report
# ----------------------------------------------------------------------------------------------

def _fmt_rate(x):
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def _fmt_pct(x):
    return "-" if x is None else f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def format_header(machine, result):
    env = ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in result["env"].items())
    lim = result["limits"]
    v = machine["versions"]
    lines = [f"## {result['label']}", "",
             f"- machine: {machine['cpu']}, {machine['logical_cores']} logical cores "
             f"({machine['physical_cores'] or '?'} physical, {machine['usable_cores']} usable), "
             f"{(machine['memory_gb'] or 0):.1f} GB RAM; {machine['os']}",
             f"- software: Python {machine['python']}, tinyrwkv {v['tinyrwkv']}, numpy {v['numpy']}, "
             f"numba {v['numba']}, torch {v['torch']}, rwkv {v['rwkv']}",
             f"- OpenBLAS environment of the runs: {env}"]
    blas = lim.get("numpy_blas") or {}
    if blas and "error" not in blas:
        lines.append(f"- NumPy BLAS (build): {blas.get('name')} {blas.get('version')} "
                     f"({' '.join((blas.get('openblas configuration') or '').split())})")
    pools = (lim.get("threads") or {}).get("threadpools")
    if pools:
        lines.append("- BLAS at run time (threadpoolctl): " + "; ".join(
            f"{p['internal_api']} {p.get('version') or ''} kernel {p.get('architecture') or '?'}, "
            f"{p['num_threads']} threads ({p['file']})" for p in pools if p["user_api"] == "blas"))
    elif pools is None:
        lines.append("- BLAS at run time: unknown (pip install threadpoolctl to see the kernel "
                     "OpenBLAS chose)")
    if lim.get("torch_blas"):
        lines.append(f"- torch BLAS: {lim['torch_blas']}")
    if "error" in lim:
        lines.append(f"- machine limits: not measured: {lim['error']}")
    else:
        bw = ", ".join(f"{k} {x:.1f}" for k, x in lim["bandwidth_by"].items())
        mm = ", ".join(f"{k} {x:.0f}" for k, x in lim["matmul_by"].items())
        n = lim["gemm_n"]
        lines.append(f"- memory bandwidth: **{lim['bandwidth_gb_s']:.1f} GB/s**, the best of: {bw} "
                     f"GB/s (matvec: {lim['matvec_bytes'] / 2 ** 20:.0f} MiB float32 matrix; "
                     f"copy: {lim['copy_bytes'] / 2 ** 20:.0f} MiB, read + write counted; "
                     f"sum: the same array, read)")
        lines.append(f"- matmul rate: **{lim['matmul_gflops']:.0f} GFLOP/s**, the best of: {mm} "
                     f"GFLOP/s (float32 GEMM {n}x{n}x{n})")
        d = lim["drift"]
        if len(d) > 1:
            bws, mms = [x["bandwidth_gb_s"] for x in d], [x["matmul_gflops"] for x in d]
            lines.append(f"- limits are the best repetition over {len(d)} measurements during the pass; "
                         f"the best of each measurement ranged {min(bws):.1f}-{max(bws):.1f} GB/s and "
                         f"{min(mms):.0f}-{max(mms):.0f} GFLOP/s"
                         + (" (the machine's speed drifted)" if max(mms) > 1.3 * min(mms)
                            or max(bws) > 1.3 * min(bws) else ""))
    return "\n".join(lines)


def format_shape(name, shape_result, opts):
    if "summary" not in shape_result:
        return f"### {name}\n\nnot run: {shape_result.get('error')}"
    shape = _shape_named(opts, name)
    summary = shape_result["summary"]
    Ts = [str(T) for T in opts.prefill]
    long_T = Ts[-1] if Ts else None
    head = ["backend", "weights", "load s", "peak RSS GB", "decode tok/s", "x official"]
    for T in Ts:
        head += [f"prefill@{T} tok/s", "x official"]
    head += ["% bandwidth", f"% matmul@{long_T}" if long_T else "% matmul"]
    lines = [f"### {name}: {shape.describe()}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes, partial = [], []
    for backend, s in summary.items():
        weights = shape_result["rows"][backend]["weights"]
        if "error" in s:
            reason = str(s["error"]).replace("|", "/").splitlines()[0]
            cells = [backend, weights, f"not available: {reason}"] + [""] * (len(head) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        label = backend
        got = s.get("backend_reported")
        if backend != "official" and got and got not in (backend, shape_result["rows"][backend]["backend"]):
            label += f" (ran {got}!)"
        check = s.get("check")
        if (check and check["max_abs_over_std"] > CHECK_TOL) or s.get("finite") is False:
            label += " CHECK FAILED"
        xo = s.get("x_official", {})
        cells = [label, weights, f"{s['load_s']:.2f}", f"{s['peak_rss_gb']:.2f}",
                 _fmt_rate(s["decode_tok_s"]), _fmt_ratio(xo.get("decode"))]
        for T in Ts:
            v = s["prefill_tok_s"].get(T)
            n = s["prefill_runs"].get(T, 0)
            cell = _fmt_rate(v)
            if v is not None and n < s["runs"]:
                cell += f" (n={n})"
            cells += [cell, _fmt_ratio(xo.get(T))]
        cells += [_fmt_pct(s.get("bandwidth_fraction")),
                  _fmt_pct((s.get("matmul_fraction") or {}).get(long_T))]
        lines.append("| " + " | ".join(cells) + " |")
        if check:
            notes.append(f"{backend} {check['max_abs_over_std']:.1e}")
        if s["runs"] < opts.runs:
            partial.append(f"{backend}: {s['runs']} of {opts.runs} runs succeeded; then "
                           f"{s.get('error_in_later_run')}")
    lines += [""] + partial if partial else []
    ok = [s for s in summary.values() if "error" not in s]
    if ok:
        s0 = ok[0]
        ref = next((s["check"]["against"] for s in ok if s.get("check")), None)
        lines += ["",
                  f"Medians of {opts.runs} runs, each a fresh process, backends interleaved; peak "
                  f"RSS: the largest. Decode: {opts.decode_tokens} tokens after {opts.warmup} "
                  f"warm-up; prefill: zero state, last-position logits. "
                  f"% bandwidth: {shape.decode_bytes('float32') / GB:.3g} GB/token float32, "
                  f"{shape.decode_bytes('bfloat16') / GB:.3g} bf16, x decode tok/s / bandwidth; "
                  f"% matmul: {s0['prefill_flops_per_token'] / 1e9:.3g} GFLOP/token x prefill "
                  f"tok/s / matmul rate."]
        if any(n < s["runs"] for s in ok for n in s["prefill_runs"].values()):
            lines.append(f"(n=k): fewer runs, because the first run of that length took longer "
                         f"than --prefill-budget {opts.prefill_budget:.0f} s.")
        busy = [(c, b, i + 1) for b, s in summary.items() if "error" not in s
                for i, c in enumerate(s["other_cores"]) if c is not None]
        if busy:
            worst = max(busy)
            lines.append(f"Other processes on the machine used {statistics.mean(c for c, _, _ in busy):.2f} "
                         f"cores on average during the runs (most: {worst[0]:.2f}, {worst[1]} run "
                         f"{worst[2]})" + (": numbers are noisy, rerun on a quiet machine"
                                           if worst[0] > BUSY_CORES else "") + ".")
        dropped = {b: len(r["discarded_busy"]) for b, r in shape_result["rows"].items()
                   if r["discarded_busy"]}
        if dropped:
            lines.append("Runs repeated because other processes were busy (--retry-busy; kept in "
                         "the JSON, not in the medians): "
                         + ", ".join(f"{b} {n}" for b, n in dropped.items()) + ".")
        pools = [f"{b}: {_pools_text(s)}" for b, s in summary.items() if "error" not in s]
        lines.append("Thread pools at run time: " + "; ".join(pools) + ".")
        if ref and notes:
            lines.append(f"Validation, max|delta logit|/std against {ref} (16-token prefill and one "
                         f"decode step; limit {CHECK_TOL:g}): " + ", ".join(notes) + ".")
    return "\n".join(lines)


def _pools_text(s):
    """'numba x2, openblas 0.3.30 SkylakeX x2, ...' for one backend's first run."""
    t = s.get("threads") or {}
    parts = []
    if "numba_threads" in t:
        parts.append(f"numba x{t['numba_threads']}")
    if "torch_threads" in t:
        parts.append(f"torch ({t.get('torch_blas') or 'its BLAS'}) x{t['torch_threads']}")
    for p in t.get("threadpools") or []:
        if p["user_api"] == "blas":
            parts.append(f"{p['internal_api']} {p.get('version') or ''} "
                         f"{p.get('architecture') or ''} x{p['num_threads']}".replace("  ", " "))
    if t.get("threadpools") is None:
        parts.append("BLAS unknown (no threadpoolctl)")
    return ", ".join(parts)


def format_pass(machine, result, opts):
    parts = [format_header(machine, result)]
    parts += [format_shape(name, sh, opts) for name, sh in result["shapes"].items()]
    parts.append(f"(pass took {result['seconds'] / 60:.1f} min)")
    return "\n\n".join(parts)


# ----------------------------------------------------------------------------------------------
# Running the passes, and the CLI
# ----------------------------------------------------------------------------------------------

def environments(both_openblas, base=None):
    """[(label, env)]: the environment as it is, and (with both_openblas) the same without
    OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (both together). When neither is set the second
    would be the same run, so it is left out and a note says so."""
    base = dict(os.environ if base is None else base)
    now = ", ".join(f"{v}={base[v]}" if v in base else f"{v} unset" for v in OPENBLAS_VARS)
    passes = [(f"OpenBLAS settings as they are ({now})", base)]
    note = None
    if both_openblas:
        if any(v in base for v in OPENBLAS_VARS):
            unset = {k: v for k, v in base.items() if k not in OPENBLAS_VARS}
            passes.append(("OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset", unset))
        else:
            note = ("OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are both unset in this environment, so "
                    "the 'unset' pass would repeat the first: one pass only.")
    return passes, note


def benchmark(opts, both_openblas=False, env=None):
    """Run the benchmark (one or two passes) and return every raw number and summary as a dict.
    `env`: the environment of the child processes (default: this process's)."""
    machine = machine_info()
    passes, note = environments(both_openblas, env)
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tinyrwkv-bench-"))
    try:
        checkpoints = {}
        results = []
        for label, pass_env in passes:
            pass_env = {**pass_env, **_thread_env(opts.threads)}
            results.append(run_pass(opts, workdir, pass_env, label, checkpoints))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"machine": machine, "options": _options_dict(opts), "note": note,
            "passes": results, "checkpoints": checkpoints, "seconds": time.perf_counter() - t0}


def _thread_env(threads):
    """With --threads, every thread pool of the children gets it, whether or not a backend's
    loader takes a threads option."""
    if not threads:
        return {}
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "NUMBA_NUM_THREADS": n}


def _options_dict(opts):
    d = asdict(opts)
    d["shapes"] = [s.name for s in opts.shapes]
    return d


def format_report(report, opts):
    parts = [format_pass(report["machine"], p, opts) for p in report["passes"]]
    if report.get("note"):
        parts.append(f"Note: {report['note']}")
    if len(report["passes"]) > 1:
        parts.append(_format_openblas_comparison(report))
    parts.append(f"Total time: {report['seconds'] / 60:.1f} min.")
    return "\n\n".join(parts)


def _format_openblas_comparison(report):
    """tok/s of the second pass / the first, per shape and backend (>1: faster with the
    OpenBLAS variables unset)."""
    a, b = report["passes"][:2]
    lines = ["## OpenBLAS variables unset / as they are (tok/s ratio)", ""]
    for name, sa in a["shapes"].items():
        sb = b["shapes"].get(name, {})
        for backend, xa in (sa.get("summary") or {}).items():
            xb = (sb.get("summary") or {}).get(backend, {})
            if "error" in xa or "error" in xb or not xb:
                continue
            parts = [f"decode {_fmt_ratio(_ratio(xb['decode_tok_s'], xa['decode_tok_s']))}"]
            parts += [f"prefill@{T} {_fmt_ratio(_ratio(xb['prefill_tok_s'].get(T), v))}"
                      for T, v in xa["prefill_tok_s"].items()]
            lines.append(f"- {name} {backend}: " + ", ".join(parts))
    return "\n".join(lines)


# --quick replaces these options when they are left at their defaults.
QUICK = {"shapes": "tiny", "runs": 1, "decode_tokens": 8, "warmup": 4, "prefill": "64,256"}


def add_arguments(parser):
    """The options of `tinyrwkv bench` (and of benchmarks/bench_cpu.py)."""
    parser.add_argument("--shapes", default="0.1B,0.4B,1.5B",
                        help="comma-separated: 0.1B, 0.4B, 1.5B, tiny (L2 C256), or custom like "
                             "L4-C512-V1024")
    parser.add_argument("--backends", default=",".join(BACKENDS),
                        help="comma-separated: numpy, numba, numba-bf16, numpy-bf16, official")
    parser.add_argument("--runs", type=int, default=3,
                        help="runs (fresh processes) per backend and shape; medians are reported")
    parser.add_argument("--decode-tokens", type=int, default=32,
                        help="timed single-token forwards per run")
    parser.add_argument("--warmup", type=int, default=8,
                        help="untimed single-token forwards before decode timing")
    parser.add_argument("--prefill", default="512,2048",
                        help="comma-separated prompt lengths T ('' for none)")
    parser.add_argument("--prefill-budget", type=float, default=60.0, metavar="SECONDS",
                        help="a prefill length whose first run took longer is not repeated")
    parser.add_argument("--threads", type=int, default=None,
                        help="threads for every backend and library (default: each library's own)")
    parser.add_argument("--seed", type=int, default=0, help="seed of the synthetic weights and ids")
    parser.add_argument("--cache-dir", default=None,
                        help="keep the synthetic checkpoints here and reuse them "
                             "(default: a temporary folder, removed at the end)")
    parser.add_argument("--out", default=None, help="write every raw number to this JSON file")
    parser.add_argument("--both-openblas", action="store_true",
                        help="run everything twice: OpenBLAS environment as it is, then with "
                             "OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset")
    parser.add_argument("--wait-quiet", type=float, default=0.0, metavar="SECONDS",
                        help="before each run, wait up to this long for other processes to use "
                             "less than a quarter of a core (a shared machine)")
    parser.add_argument("--retry-busy", type=int, default=0, metavar="N",
                        help="repeat a run (up to N times) when other processes used more than a "
                             "quarter of a core during it; repeated runs stay in the JSON")
    parser.add_argument("--timeout", type=float, default=3600.0, metavar="SECONDS",
                        help="time one child process may take")
    parser.add_argument("--quick", action="store_true",
                        help="a smoke run in under a minute: options left at their defaults become "
                             "--shapes tiny --runs 1 --decode-tokens 8 --warmup 4 --prefill 64,256")
    parser.add_argument("--quiet", action="store_true", help="no progress lines on stderr")
    return parser


def options_from_args(args):
    """Options from parsed arguments (with --quick applied); ValueError for a bad value."""
    given = vars(args).copy()
    if args.quick:
        defaults = add_arguments(argparse.ArgumentParser()).parse_args([])
        for key, value in QUICK.items():
            if given[key] == getattr(defaults, key):
                given[key] = value
    shapes = [parse_shape(s.strip()) for s in given["shapes"].split(",") if s.strip()]
    backends = [b.strip() for b in args.backends.split(",") if b.strip()]
    for b in backends:
        backend_setup(b)
    opts = Options(shapes=shapes, backends=backends, runs=given["runs"],
                   decode_tokens=given["decode_tokens"], warmup=max(1, given["warmup"]),
                   prefill=tuple(int(t) for t in given["prefill"].split(",") if t.strip()),
                   prefill_budget=args.prefill_budget, threads=args.threads, seed=args.seed,
                   quick=args.quick, timeout=args.timeout, verbose=not args.quiet,
                   wait_quiet=args.wait_quiet, retry_busy=max(0, args.retry_busy),
                   cache_dir=args.cache_dir)
    if not shapes or not backends:
        raise ValueError("give at least one shape and one backend")
    if opts.runs < 1 or opts.decode_tokens < 1 or any(T < 1 for T in opts.prefill):
        raise ValueError("--runs, --decode-tokens and every --prefill length must be at least 1")
    return opts


def run(args):
    """`tinyrwkv bench`: run, print the tables on stdout, and write --out JSON."""
    opts = options_from_args(args)
    report = benchmark(opts, both_openblas=args.both_openblas)
    print(format_report(report, opts))
    if args.out:
        Path(args.out).write_text(json.dumps(report, indent=1, default=str))
        print(f"\n(raw numbers written to {args.out})")
    return report


def main(argv=None, prog="tinyrwkv bench"):
    """`python -m tinyrwkv.bench [options]` (and the worker entry of the child processes)."""
    argv = sys.argv[1:] if argv is None else argv
    if argv[:1] == ["--worker"]:
        worker_main(argv[1])
        return
    parser = argparse.ArgumentParser(
        prog=prog, formatter_class=argparse.ArgumentDefaultsHelpFormatter,
        description="CPU speed of tinyrwkv's backends beside the official rwkv package, on "
                    "synthetic models, with the machine's measured limits.")
    add_arguments(parser)
    args = parser.parse_args(argv)
    try:
        run(args)
    except ValueError as e:               # a bad option value: say which, like argparse does
        parser.error(str(e))


if __name__ == "__main__":
    main()
