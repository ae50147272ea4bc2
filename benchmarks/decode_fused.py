"""Decode speed of RWKV7Numba.forward_one: the per-kernel path against the fused step
(tinyrwkv/backends/numba_decode.py), on the shipped model and a 0.1B-shaped synthetic model, for
each weight storage type (float32, bfloat16, float16, int8 = GGUF Q8_0).

    PYTHONPATH=$PWD python benchmarks/decode_fused.py [--runs 5] [--tokens 200]
        [--storages float32,bfloat16,float16,int8] [--threads 1,2] [--models shipped,0.1B]

Prints tokens/s, the median of `runs` runs of `tokens` tokens each after a warm-up, per model,
storage, path and Numba thread count; with the CPU model name, the OPENBLAS_* variables and the
load average before and after (other processes on the machine slow every number down).
"""
import argparse
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np

import tinyrwkv
from tinyrwkv.backends.numba_cpu import RWKV7Numba
from tinyrwkv.synthetic import make_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_harness.machine import cpu_name                # noqa: E402


def tokens_per_second(model, n_tokens, runs):
    """Median tokens/s of forward_one over `runs` runs of n_tokens, after a 20-token warm-up:
    (per wall-clock second, per CPU second of this thread). With one Numba thread the calling
    thread does all the work, so the second is the speed with the core to itself: time while
    other processes run is not counted (a busy machine still slows it, less)."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, n_tokens)
    state = model.zero_state()
    for t in ids[:20]:
        model.forward_one(int(t), state)
    wall, cpu = [], []
    for _ in range(runs):
        start, start_cpu = time.perf_counter(), time.thread_time()
        for t in ids:
            model.forward_one(int(t), state)
        wall.append(n_tokens / (time.perf_counter() - start))
        cpu.append(n_tokens / (time.thread_time() - start_cpu))
    return float(np.median(wall)), float(np.median(cpu))



def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=200)
    parser.add_argument("--storages", default="float32,bfloat16,float16,int8")
    parser.add_argument("--threads", default="1,2")
    parser.add_argument("--models", default="shipped,0.1B")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; Numba threads available: {numba.config.NUMBA_NUM_THREADS}; "
          f"OPENBLAS_*: { {k: v for k, v in os.environ.items() if k.startswith('OPENBLAS')} }; "
          f"load average {os.getloadavg()[0]:.2f}")
    wanted = args.models.split(",")
    models = {}
    if "shipped" in wanted:
        models["shipped"] = tinyrwkv.load(backend="numba").stored_tensors()
    if "0.1B" in wanted:
        models["0.1B-shaped"] = make_weights(12, 768, 65536, ranks=(64, 64, 32, 128), seed=0)
    print(f"{'model':12} {'storage':9} {'threads':>7} {'per-kernel':>11} {'fused':>9} {'ratio':>6}"
          f" {'fused, per CPU s (1 thread)':>28}")
    for name, weights in models.items():
        for storage in args.storages.split(","):
            paths = {d: RWKV7Numba(weights, storage=storage, decode=d) for d in ("per-kernel", "fused")}
            for threads in map(int, args.threads.split(",")):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                rate = {d: tokens_per_second(m, args.tokens, args.runs) for d, m in paths.items()}
                (per_kernel, _), (fused, fused_cpu) = rate["per-kernel"], rate["fused"]
                cpu = f"{fused_cpu:28.1f}" if threads == 1 else f"{'-':>28}"
                print(f"{name:12} {storage:9} {threads:7} {per_kernel:11.1f} {fused:9.1f} "
                      f"{fused / per_kernel:6.2f} {cpu}", flush=True)
    print(f"load average after: {os.getloadavg()[0]:.2f}")


if __name__ == "__main__":
    main()
