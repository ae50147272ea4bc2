"""Prefill speed of RWKV7Numba: the fused path (backends/numba_prefill.py) against the path before
it (the reference's composition, model.block, with the Numba WKV kernel) and the official `rwkv`
package, on a 0.1B-shaped synthetic model, at 1 and 2 threads, quiet or beside a busy process.

    PYTHONPATH=$PWD python benchmarks/prefill.py [--T 512 2048] [--threads 1 2] [--runs 5]
                                                 [--busy] [--official] [--storage float32]

Each measurement is one `model.forward(ids)` of T tokens from the zero state (the logits of the
last token included), timed with the wall clock; variants and thread counts are interleaved
(A B C A B C ...). On a shared machine other processes come and go, so each run also records how
many cores they used meanwhile (Linux: /proc/stat's busy time less this process's CPU time, per
second of the run). Printed per variant: tokens/s, the median of the undisturbed runs (others
used under 0.25 core, beyond the busy process of --busy) and, in brackets, how many of the runs
that was and the median of all runs; then the load average. --busy runs one
`while True: pass` process beside the measurement (killed after): the case where threads that
spin while waiting lose most.
--official adds `rwkv` 0.8.32 ("cpu fp32", torch threads = the thread count), reading the same
weights from a float32 .pth written once to --cache (RWKV_V7_ON=1, no CUDA, TorchScript on).
--llamacpp adds llama.cpp (llama-cpp-python) on the same weights written once as an F32 GGUF
(tinyrwkv's writer, the World tokenizer), one Llama object per thread count, n_batch 512.
"""
import argparse
import os
import subprocess
import sys
import time
import tempfile
from dataclasses import replace
from pathlib import Path

import numpy as np


from tinyrwkv import model as ref
from tinyrwkv.backends.numba_cpu import RWKV7Numba, set_threads, wkv_seq
from tinyrwkv.synthetic import make_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_harness.machine import cpu_name                # noqa: E402

SHAPE = dict(n_layer=12, n_embd=768, vocab_size=65536, ranks=(64, 64, 32, 128))   # 0.1B


class Before(RWKV7Numba):
    """RWKV7Numba with the prefill it had before the fused path: the reference's composition
    (model.block over (T, C) arrays, BLAS and Numba each with their own threads) and the Numba
    WKV kernel with heads in parallel. The fused model still runs this when asked for `acts`."""

    def forward_seq(self, ids, state, steps=None, acts=None):
        x0 = ref.layer_norm(self.emb[ids].astype(np.float32), *self.ln0)
        return self._forward_seq_reference(ids, x0, state, replace(ref.STEPS, wkv=wkv_seq), None)


def official_model(weights, cache):
    """The official package on the same weights, from a float32 .pth (written once)."""
    os.environ.update({"RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1"})
    import torch
    from rwkv.model import RWKV
    path = Path(cache) / "prefill-bench-0.1B-seed0.pth"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        torch.save({k: torch.from_numpy(np.ascontiguousarray(v)) for k, v in weights.items()},
                   path.with_suffix(".partial"))
        os.replace(path.with_suffix(".partial"), path)
    model = RWKV(str(path)[: -len(".pth")], "cpu fp32")

    def forward(ids, threads):
        torch.set_num_threads(threads)
        return model.forward([int(i) for i in ids], None)[0]
    return forward


def llamacpp_model(weights, cache, threads, max_T):
    """llama.cpp on the same weights, from an F32 GGUF (written once)."""
    from llama_cpp import Llama
    from tinyrwkv.formats import write_gguf
    from tinyrwkv.tokenizer import get_tokenizer
    path = Path(cache) / "prefill-bench-0.1B-seed0-f32.gguf"
    if not path.exists():
        path.parent.mkdir(parents=True, exist_ok=True)
        write_gguf(path.with_suffix(".partial"), weights, "f32",
                   tokenizer=get_tokenizer(SHAPE["vocab_size"]))            # World
        os.replace(path.with_suffix(".partial"), path)
    models = {th: Llama(model_path=str(path), n_ctx=max_T + 8, n_batch=512, n_threads=th,
                        n_threads_batch=th, verbose=False) for th in threads}

    def forward(ids, threads):
        llm = models[threads]
        llm.reset()
        llm.eval([int(i) for i in ids])
    return forward


def tinyrwkv_forward(model):
    def forward(ids, threads):
        set_threads(threads)
        return model.forward(ids)[0]
    return forward


def machine_busy_seconds():
    """CPU seconds all processes have been busy since boot (Linux /proc/stat), or None."""
    try:
        with open("/proc/stat") as f:
            fields = [int(v) for v in f.readline().split()[1:]]
    except OSError:
        return None
    user, nice, system, idle, iowait, irq, softirq, steal = (fields + [0] * 8)[:8]
    return (user + nice + system + irq + softirq + steal) / os.sysconf("SC_CLK_TCK")


def timed(forward, ids, threads):
    """(seconds, cores other processes used meanwhile or None) of one forward."""
    busy0, own0, start = machine_busy_seconds(), time.process_time(), time.perf_counter()
    forward(ids, threads)
    wall = time.perf_counter() - start
    if busy0 is None:
        return wall, None
    others = (machine_busy_seconds() - busy0 - (time.process_time() - own0)) / wall
    return wall, max(0.0, others)



def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--busy", action="store_true", help="one busy process beside the runs")
    parser.add_argument("--official", action="store_true", help="the official rwkv package too")
    parser.add_argument("--llamacpp", action="store_true", help="llama.cpp (F32 GGUF) too")
    parser.add_argument("--storage", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cache", default=str(Path(tempfile.gettempdir()) / "tinyrwkv-prefill-bench"),
                        help="folder for the checkpoints it writes (kept between runs)")
    args = parser.parse_args()

    import numba
    print(f"CPU: {cpu_name()}, {os.cpu_count()} cores; Numba threads available: "
          f"{numba.config.NUMBA_NUM_THREADS}; numpy {np.__version__}, numba {numba.__version__}; "
          f"OPENBLAS_*/OMP_*: { {k: v for k, v in os.environ.items() if k.startswith(('OPENBLAS', 'OMP'))} }")
    weights = make_weights(**SHAPE, seed=0)
    variants = {"before": tinyrwkv_forward(Before(weights, storage=args.storage)),
                "fused": tinyrwkv_forward(RWKV7Numba(weights, storage=args.storage))}
    if args.official:
        variants["official"] = official_model(weights, args.cache)
    if args.llamacpp:
        variants["llama.cpp"] = llamacpp_model(weights, args.cache, args.threads, max(args.T))
    rng = np.random.default_rng(0)
    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        print(f"0.1B (L12 C768 V65536), storage {args.storage}, "
              f"{'one busy process beside' if busy else 'no busy process added'}; tokens/s of "
              f"the undisturbed runs (how many of {args.runs}, median of all), interleaved")
        print(f"{'T':>5} {'threads':>7} " + " ".join(f"{v:>20}" for v in variants)
              + "  fused/before" + "".join(f"  {'fused/' + v:>15}" for v in variants
                                           if v in ("official", "llama.cpp")) + "   load")
        for T in args.T:
            ids = rng.integers(0, SHAPE["vocab_size"], T)
            for th in args.threads:                                    # warm-up (compiles)
                for forward in variants.values():
                    forward(ids[:32], th)
            runs = {(v, th): [] for v in variants for th in args.threads}
            for _ in range(args.runs):
                for th in args.threads:
                    for v, forward in variants.items():
                        runs[v, th].append(timed(forward, ids, th))
            expected = 1.0 if busy else 0.0          # the busy process is not a disturbance
            for th in args.threads:
                rate, cells = {}, []
                for v in variants:
                    every = [T / wall for wall, _ in runs[v, th]]
                    calm = [T / wall for wall, others in runs[v, th]
                            if others is None or others < expected + 0.25]
                    rate[v] = np.median(calm) if calm else float("nan")
                    cells.append(f"{rate[v]:7.1f} ({len(calm)}, {np.median(every):5.1f})")
                row = f"{T:5d} {th:7d} " + " ".join(f"{c:>20}" for c in cells)
                row += f"  {rate['fused'] / rate['before']:12.2f}"
                for other in ("official", "llama.cpp"):
                    if other in rate:
                        row += f"  {rate['fused'] / rate[other]:15.2f}"
                print(row + f"   {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
