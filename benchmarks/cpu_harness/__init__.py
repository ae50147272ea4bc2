"""The CPU benchmark: speed of tinyrwkv's backends beside the official `rwkv` package and llama.cpp.

Speed is measured here, never in the tests. One run prints a markdown table per model shape,
with the official package measured in the same run (so ratios hold on a noisy machine), and the
machine's own limits measured in the same run (so "how far from the hardware" is a number, not
a guess).

    python benchmarks/bench_cpu.py --quick                  # a smoke run: a tiny model
    python benchmarks/bench_cpu.py --shapes 0.1B --runs 3   # one real shape
    python benchmarks/bench_cpu.py --out results.json       # all shapes, every raw number saved
    python benchmarks/bench_cpu.py --device-cpu             # a many-core machine: thread sweep

(`tinyrwkv bench ...` runs the same script in a checkout.) It is a measurement harness, not
part of the `tinyrwkv` package, and Unix-only: it reads peak RSS and the children's CPU time with
the `resource` module and the machine's load from /proc (Linux).

    __init__.py    this description, the constants, the options and the rows' names
    shapes.py      model shapes (synthetic, or the shipped model's) and the seeded checkpoints
    worker.py      what runs in each fresh child process: load, validate, time; the machine
                   limits; conversions (tinyrwkv convert) for the official package and llama.cpp
    runner.py      the parent: plans the runs, starts the children, summarises
    background.py  the busy background processes (--busy, --load both)
    machine.py     what the machine is and how busy it is (/proc, `resource`)
    report.py      the markdown tables (and --markdown-out's README-style table)

The rows
--------
* tinyrwkv: `numpy`, `numba` (float32 weights), `numba-bf16`, `numba-f16`, `numba-int8`,
  `numpy-bf16`: `tinyrwkv.load(path, backend=..., storage=...)` with storage "float32",
  "bfloat16", "float16" or "int8", passed through as it is: a tinyrwkv that refuses a storage
  (ValueError) gives the row "not available: <its message>", the others run.
* `official`: the `rwkv` package (0.8.32), RWKV_V7_ON=1, strategy `cpu fp32`, TorchScript on.
* `llama-f32`, `llama-f16`, `llama-q8_0`: llama.cpp through llama-cpp-python's low-level C
  bindings (worker._load_llama says exactly which calls), on GGUF files that tinyrwkv's own
  converter writes from the same checkpoint (`tinyrwkv convert IN OUT.gguf --type T`), once per
  shape, beside the .pth (kept with --cache-dir). `--llama-extra-bufts` controls llama.cpp's
  repacked CPU weight buffers (model parameter use_extra_bufts): `auto` leaves llama.cpp's
  default and, when a llama row's process dies of a signal (the Q8_0 repacking segfaulted on an
  AVX-512 Intel host), runs that row again with them off and says so under the table.
* Shapes: 0.1B, 0.4B, 1.5B, tiny and custom ones are synthetic (below); `shipped` is the model
  in weights/: tinyrwkv rows call `tinyrwkv.load()` with no path, the official package reads a
  bf16 .pth that `tinyrwkv convert` writes from it (the same numbers: the file is bf16), and
  llama.cpp the GGUFs converted from it.

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
* llama.cpp rows: decode = one llama_decode of a one-token batch continuing the context's
  recurrent state, plus copying that token's V logits (what every other row also returns);
  prefill@T = llama_memory_clear (the zero state) + one llama_decode of the T tokens, which
  llama.cpp cuts into ubatches of 512 itself. Threads: n_threads = n_threads_batch = --threads
  (default: all cores). "load s" is llama_model_load_from_file (mmap) + the context.
* threads (a sweep, `--threads 1,2,4,8,16`): every row runs at every count (each count its own
  fresh processes, interleaved with the rest). The main table shows each backend at its best
  decode count (column threads) and each prefill length at its best count (marked "(8t)" where
  that differs); "x official" compares best with best. A second table and the JSON
  (summary.sweep) give every count. The count goes to the loader (threads=, torch.set_num_threads,
  n_threads) and to OMP/OPENBLAS/MKL/NUMBA_NUM_THREADS of that child.
* batched decode (`--batch 1,2,4,8`, tinyrwkv rows): after the prefills, in the same process,
  B states (model.new_state(), or zero_state()) advanced together by model.forward_batch(B ids,
  B states) -> (B, V) logits; `--warmup` untimed steps, then `--decode-tokens` timed steps;
  aggregate tok/s = B x steps / their time (per sequence: / B), and its ratio to the row's
  single-state decode. First, once: forward_batch of B different tokens from zero states against
  B separate forward() calls (max|delta logit|/std, under the table). A tinyrwkv without
  forward_batch: "not available".
* busy background (`--busy N`, `--load both`): background.py's docstring. N pure-Python
  single-thread loops at normal priority for the whole pass (stopped while the limits are
  probed), killed at its end; the header gives each one's rate and CPU share. "Other processes
  used X cores" then includes them, and a run counts as disturbed (notes, --retry-busy,
  --wait-quiet) only above N + 0.25 cores.

Machine limits, measured in a fresh process of the same environment at the start of a pass and
after each shape (at the sweep's largest thread count), 7 repetitions of each probe. A limit is a ceiling, so it is the best
repetition of the best probe over the whole pass (the backends' medians are then, if anything,
a low fraction of it); the header shows how much the best of each measurement drifted.

* memory bandwidth, GB/s: a float32 matrix-vector product of a 512 MiB matrix through NumPy's
  BLAS and through torch, bytes of the matrix / time (decode's access pattern: weights read
  once); `np.copyto` of a 1 GiB float32 array, counting read + write (2 GiB) / time; the sum of
  that array (read only) through NumPy and torch.
* matmul rate, GFLOP/s: float32 GEMM 2048x2048x2048 through NumPy's BLAS and torch, 2*n^3 / time.
* % bandwidth = decode bytes per token * decode tok/s / bandwidth. Decode bytes per token = every
  weight the forward reads, except the embedding table (decode reads one row of it) and layer
  0's unused v0/v1/v2, at 4 bytes each; with bf16 or float16 storage, the Linear matrices and the
  head at 2, with int8 storage at 34/32 (GGUF Q8_0 blocks: a float16 scale per 32 int8 weights);
  the LoRA matrices and vectors stay float32. llama.cpp rows: the exact stored bytes of every
  tensor of their GGUF file except token_embd (read with gguf-py; F16/Q8_0 files keep the
  vectors and some LoRAs F32). The table's note lists the GB/token of every row. A fraction
  above 100% means the caches held part of the weights (the tiny and shipped shapes fit in
  cache), or the machine was faster than when its limits were measured.
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
and shapes (those `tinyrwkv.load` checks) and realistic scales (matrices std 0.02, lerps in [0, 1], decay
biases in [-8, 3], ...). Speed does not depend on the values; the values only need to keep every
number finite, which the validation checks. The file is a bf16 `.pth` written by torch, as
released models are, read by both tinyrwkv and the official package (the same bytes); without
torch, a bf16 `.safetensors` for tinyrwkv only. They are written to a temporary folder (removed
at the end) or to `--cache-dir` (kept and reused).

Validation (before any timing): each process computes the logits of a
fixed 16-token prefill and of one decode step after it; the table's notes give
max|delta logit| / std(logits) against the official package (or, without it, against the numpy
backend). Above its limit (`CHECK_TOLS`: 1e-3 for float32 and bf16 storage, which hold the
checkpoint's bf16 numbers exactly; 1e-2 for float16 (llama.cpp's F16 products also round the
activations); 3e-1 for int8 / Q8_0, which differ by design (0.04-0.1 measured): the number is
reported, the limit only catches a broken row) the row is marked "CHECK FAILED".

worker.py runs inside the child processes; the parent side (runner.py, report.py) never imports
torch, the official package or a backend, so its own memory and threads stay out of the
measurements.
"""

from __future__ import annotations

from dataclasses import dataclass

GENERATOR_VERSION = 1      # bump when the synthetic values change, so cached files are remade
CHECK_TOKENS = 16          # validation prefill length (>= 4: exercises the chunked WKV path)
CHECK_TOL = 1e-3           # max|delta logit|/std: float32 reorderings give ~1e-6 to 1e-5; a real
                           # bug (e.g. a wrong GroupNorm eps) gives ~1e-2
OPENBLAS_VARS = ("OPENBLAS_CORETYPE", "OPENBLAS_L2_SIZE")
BUSY_CORES = 0.25          # other processes using more cores than this during a run: a noisy run
GB = 1e9


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
    threads: tuple = (None,)       # one entry: every run at that count; several: the thread sweep
    seed: int = 0
    quick: bool = False
    timeout: float = 3600.0
    verbose: bool = True
    cache_dir: str | None = None
    wait_quiet: float = 0.0
    retry_busy: int = 0
    batch: tuple = ()              # batch sizes of the batched-decode measurement (tinyrwkv rows)
    busy: int = 0                  # background busy processes during this pass
    load: str = "quiet"            # "quiet", "busy" or "both" (passes with and without them)
    llama_extra_bufts: str = "auto"   # llama.cpp's repacked CPU buffers: "auto", "on", "off"

    @property
    def sweep(self):
        """True when several thread counts are measured (--threads 1,2,4)."""
        return len(self.threads) > 1


# What the rows are. tinyrwkv: BACKEND[-STORAGE]; the official package; llama.cpp: llama-GGUFTYPE.
BACKENDS = ("numpy", "numba", "numba-bf16", "numba-f16", "numba-int8", "official",
            "llama-f32", "llama-f16", "llama-q8_0")
TINYRWKV_STORAGE = {"": "float32", "bf16": "bfloat16", "f16": "float16", "int8": "int8"}
LLAMA_TYPES = ("f32", "f16", "q8_0")
# Validation limits, max|delta logit|/std, per storage (or GGUF type). float32 and bf16 storage of
# a bf16 checkpoint hold the same numbers as the official package: CHECK_TOL. float16: llama.cpp's
# F16 products round the activations to float16 too (measured 1.6e-3 on the shipped model,
# tests/test_llamacpp.py). int8 / Q8_0: the weights are quantised (and llama.cpp quantises the
# activations to 8 bits as well: measured 3.6e-2 on the shipped model, 1.0e-1 on the synthetic
# 0.1B); these rows differ by design: the number is reported, and the limit only catches a
# broken row (a wrong tensor mapping gives O(1)).
CHECK_TOLS = {"float32": CHECK_TOL, "bfloat16": CHECK_TOL, "float16": 1e-2, "int8": 3e-1,
              "f32": CHECK_TOL, "f16": 1e-2, "q8_0": 3e-1}
THREAD_VARS = ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")


def backend_setup(name):
    """A row's name -> (kind, storage).

    'numpy', 'numba' -> float32; 'numba-bf16', 'numpy-bf16' -> bfloat16; 'numba-f16' -> float16;
    'numba-int8' -> int8 (the storage name is passed to tinyrwkv.load as it is: a tinyrwkv that
    refuses it gives a "not available" row); 'official' -> ('official', 'float32');
    'llama-f32', 'llama-f16', 'llama-q8_0' -> ('llama', GGUF type)."""
    if name == "official":
        return "official", "float32"
    backend, _, suffix = name.partition("-")
    if backend == "llama" and suffix in LLAMA_TYPES:
        return "llama", suffix
    if backend not in ("numpy", "numba") or suffix not in TINYRWKV_STORAGE:
        raise ValueError(f"unknown backend {name!r}: use {', '.join(BACKENDS)} or numpy-bf16")
    return backend, TINYRWKV_STORAGE[suffix]


def check_tol(storage):
    return CHECK_TOLS.get(storage, CHECK_TOL)


def installed_version(dist):
    """The installed version of a distribution, read without importing it."""
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return "not installed"
