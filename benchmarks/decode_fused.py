"""Decode speed of RWKV7Numba.forward_one: the per-kernel path against the fused step
(tinyrwkv/backends/numba_decode.py), on the shipped model and a 0.1B-shaped synthetic model.

    PYTHONPATH=$PWD python benchmarks/decode_fused.py [--runs 5] [--tokens 200]

Prints tokens/s, the median of `runs` runs of `tokens` tokens each after a warm-up, per model,
storage, path and Numba thread count; with the CPU model name and the OPENBLAS_* variables.
"""
import argparse
import os
import platform
import subprocess
import time

import numba
import numpy as np

import tinyrwkv
from tinyrwkv.backends.numba_cpu import RWKV7Numba
from tinyrwkv.synthetic import make_weights


def tokens_per_second(model, n_tokens, runs):
    """Median tokens/s of forward_one over `runs` runs of n_tokens, after a 20-token warm-up."""
    rng = np.random.default_rng(0)
    ids = rng.integers(0, model.config.vocab_size, n_tokens)
    state = model.zero_state()
    for t in ids[:20]:
        model.forward_one(int(t), state)
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        for t in ids:
            model.forward_one(int(t), state)
        rates.append(n_tokens / (time.perf_counter() - start))
    return float(np.median(rates))


def cpu_name():
    try:
        out = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
        return next(line.split(":", 1)[1].strip() for line in out.splitlines()
                    if line.startswith("Model name"))
    except (OSError, StopIteration):
        return platform.processor()


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=200)
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; Numba threads available: {numba.config.NUMBA_NUM_THREADS}; "
          f"OPENBLAS_*: { {k: v for k, v in os.environ.items() if k.startswith('OPENBLAS')} }")
    shipped = tinyrwkv.load(backend="numba")
    models = {"shipped": shipped.stored_tensors(),
              "0.1B-shaped": make_weights(12, 768, 65536, ranks=(64, 64, 32, 128), seed=0)}
    print(f"{'model':12} {'storage':9} {'threads':>7} {'per-kernel':>11} {'fused':>9} {'ratio':>6}")
    for name, weights in models.items():
        for storage in ("float32", "bfloat16"):
            paths = {d: RWKV7Numba(weights, storage=storage, decode=d) for d in ("per-kernel", "fused")}
            for threads in (1, 2):
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                rate = {d: tokens_per_second(m, args.tokens, args.runs) for d, m in paths.items()}
                print(f"{name:12} {storage:9} {threads:7} {rate['per-kernel']:11.1f} "
                      f"{rate['fused']:9.1f} {rate['fused'] / rate['per-kernel']:6.2f}", flush=True)


if __name__ == "__main__":
    main()
