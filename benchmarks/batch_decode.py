"""Batched decode throughput: aggregate tokens/s of RWKV7Numba.forward_batch against batch size,
on the shipped model and a 0.1B-shaped synthetic model, float32 and bfloat16 storage, 1 and 2
Numba threads.

    PYTHONPATH=$PWD python benchmarks/batch_decode.py [--runs 3] [--tokens 128] [--batches 1 2 4 8 16]

Per row: `single`, one sequence decoded alone through `forward` (logits included, as generation
does: the baseline); then for each batch size B, B sequences decoded together, B tokens a step,
the states kept in one BatchState across steps (moved on in place: no copy). Each number is the best of `runs`
runs of about `tokens` tokens in all (tokens // B steps, at least 4), after a warm-up of 2 steps.
`--list-form` adds, for each B, forward_batch given a list of States (gathered into a new
BatchState every step: one copy of the B states a step), to show what that copy costs.

The machine's load (`uptime`) is printed before and after, and the 1-minute load average at the
end of each row: on a shared machine the numbers are only as good as the quiet they were
measured in (with more runnable threads than cores, a 2-thread parallel region waits for a
descheduled thread at every barrier, and 2 threads can measure slower than 1).
"""
import argparse
import os
import sys
import subprocess
import time
from pathlib import Path

import numba
import numpy as np

import tinyrwkv
from tinyrwkv.backends.numba_cpu import RWKV7Numba
from tinyrwkv.synthetic import make_weights

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_harness.machine import cpu_name                # noqa: E402



def load_average():
    try:
        return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()
    except OSError:
        return "(uptime not available)"


def best_rate(run_once, n_tokens, runs):
    """The best tokens/s of `runs` calls of run_once(), each decoding n_tokens tokens: on a shared
    machine, the run least disturbed by other processes (the median measures their load)."""
    rates = []
    for _ in range(runs):
        start = time.perf_counter()
        run_once()
        rates.append(n_tokens / (time.perf_counter() - start))
    return float(np.max(rates))


def single_rate(model, n_tokens, runs):
    """One sequence through model.forward, a token at a time, logits included: what
    Session.stream does for each token (the fused single-token decode, plus a copy of the state)."""
    ids = np.random.default_rng(0).integers(0, model.config.vocab_size, n_tokens)
    holder = [None]
    for t in ids[:2]:
        _, holder[0] = model.forward([int(t)], holder[0])

    def run_once():
        state = holder[0]
        for t in ids:
            _, state = model.forward([int(t)], state)
        holder[0] = state
    return best_rate(run_once, n_tokens, runs)


def batch_rate(model, n_seq, n_tokens, runs, list_form=False):
    """n_seq sequences through forward_batch, the states in a BatchState (or, with list_form, a
    list of States handed in and returned every step)."""
    steps = max(4, n_tokens // n_seq)
    ids = np.random.default_rng(n_seq).integers(0, model.config.vocab_size, (steps, n_seq))
    states = [model.zero_state() for _ in range(n_seq)]
    if not list_form:
        states = model.batch_state(states)
    for step in ids[:2]:
        _, states = model.forward_batch(step, states)
    holder = [states]

    def run_once():
        s = holder[0]
        for step in ids:
            _, s = model.forward_batch(step, s)
        holder[0] = s
    return best_rate(run_once, steps * n_seq, runs)


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--tokens", type=int, default=128, help="tokens per run, about")
    parser.add_argument("--batches", type=int, nargs="+", default=[1, 2, 4, 8, 16])
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--models", nargs="+", default=["shipped", "0.1B-shaped"],
                        choices=["shipped", "0.1B-shaped"])
    parser.add_argument("--storages", nargs="+", default=["float32", "bfloat16"],
                        choices=["float32", "bfloat16"])
    parser.add_argument("--list-form", action="store_true",
                        help="also time forward_batch given a list of States (one copy a step)")
    args = parser.parse_args()
    print(f"CPU: {cpu_name()}; {os.cpu_count()} CPUs; Numba threads available: "
          f"{numba.config.NUMBA_NUM_THREADS}; numba {numba.__version__}")
    print(f"load before: {load_average()}")
    weights = {}
    if "shipped" in args.models:
        weights["shipped"] = tinyrwkv.load(backend="numba").stored_tensors()
    if "0.1B-shaped" in args.models:
        weights["0.1B-shaped"] = make_weights(12, 768, 65536, ranks=(64, 64, 32, 128), seed=0)
    forms = ("batch", "list") if args.list_form else ("batch",)
    header = f"{'model':12} {'storage':9} {'thr':>3} {'form':5} {'single':>8} " + " ".join(
        f"{'B=' + str(b):>8}" for b in args.batches) + "  B=max/single  load"
    print("aggregate tokens/s (B tokens a step); single: one sequence alone through forward")
    print(header)
    for name, w in weights.items():
        for storage in args.storages:
            model = RWKV7Numba(w, storage=storage)
            for threads in args.threads:
                numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
                single = single_rate(model, args.tokens, args.runs)
                for form in forms:
                    rates = [batch_rate(model, b, args.tokens, args.runs, form == "list")
                             for b in args.batches]
                    print(f"{name:12} {storage:9} {threads:3} {form:5} {single:8.1f} "
                          + " ".join(f"{r:8.1f}" for r in rates)
                          + f"  {rates[-1] / single:11.2f}x  {os.getloadavg()[0]:4.1f}", flush=True)
    print(f"load after: {load_average()}")


if __name__ == "__main__":
    main()
