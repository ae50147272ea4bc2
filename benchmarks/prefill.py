"""Prefill speed of RWKV7Numba: the fused path (backends/numba_prefill.py) against the path before
it (the reference's composition, model.block, with the Numba WKV kernel) and the official `rwkv`
package, on a 0.1B-shaped synthetic model, at 1 and 2 threads, quiet or beside a busy process.

    PYTHONPATH=$PWD python benchmarks/prefill.py [--T 512 2048] [--threads 1 2] [--runs 5]
                                                 [--busy] [--official] [--storage float32]

Each measurement is one `model.forward(ids)` of T tokens from the zero state (the logits of the
last token included), timed with the wall clock; variants and thread counts are interleaved
(A B C A B C ...) and the median of `runs` is printed as tokens/s, with the machine's load
average at the end of each row. --busy runs one `while True: pass` process beside the
measurement (killed after): the case where threads that spin while waiting lose most.
--official adds `rwkv` 0.8.32 ("cpu fp32", torch threads = the thread count), reading the same
weights from a float32 .pth written once to --cache (RWKV_V7_ON=1, no CUDA, TorchScript on).
"""
import argparse
import os
import platform
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path

import numpy as np

from tinyrwkv import model as ref
from tinyrwkv.backends.numba_cpu import RWKV7Numba, set_threads, wkv_seq
from tinyrwkv.synthetic import make_weights

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


def tinyrwkv_forward(model):
    def forward(ids, threads):
        set_threads(threads)
        return model.forward(ids)[0]
    return forward


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--T", type=int, nargs="+", default=[512, 2048])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--busy", action="store_true", help="one busy process beside the runs")
    parser.add_argument("--official", action="store_true", help="the official rwkv package too")
    parser.add_argument("--storage", default="float32", choices=["float32", "bfloat16"])
    parser.add_argument("--cache", default="/tmp/tinyrwkv-prefill-bench")
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
    rng = np.random.default_rng(0)
    busy = None
    if args.busy:
        busy = subprocess.Popen([sys.executable, "-c", "while True: pass"])
    try:
        print(f"0.1B (L12 C768 V65536), storage {args.storage}, {'one busy process beside' if busy else 'quiet'}; "
              f"tokens/s, median of {args.runs} (interleaved)")
        print(f"{'T':>5} {'threads':>7} " + " ".join(f"{v:>9}" for v in variants)
              + "  fused/before" + ("  fused/official" if args.official else "") + "   load")
        for T in args.T:
            ids = rng.integers(0, SHAPE["vocab_size"], T)
            for th in args.threads:                                    # warm-up (compiles)
                for forward in variants.values():
                    forward(ids[:32], th)
            times = {(v, th): [] for v in variants for th in args.threads}
            for _ in range(args.runs):
                for th in args.threads:
                    for v, forward in variants.items():
                        start = time.perf_counter()
                        forward(ids, th)
                        times[v, th].append(time.perf_counter() - start)
            for th in args.threads:
                rate = {v: T / np.median(times[v, th]) for v in variants}
                row = f"{T:5d} {th:7d} " + " ".join(f"{rate[v]:9.1f}" for v in variants)
                row += f"  {rate['fused'] / rate['before']:12.2f}"
                if args.official:
                    row += f"  {rate['fused'] / rate['official']:15.2f}"
                print(row + f"   {os.getloadavg()[0]:.1f}", flush=True)
    finally:
        if busy is not None:
            busy.kill()
            busy.wait()


if __name__ == "__main__":
    main()
