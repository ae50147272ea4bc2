"""Where a decode token's time goes: the fused step (tinyrwkv/backends/numba_decode.py) split
into its parts, each timed on its own with the same kernels, against the machine's read bandwidth.

    PYTHONPATH=$PWD python benchmarks/decode_profile.py [--shape 0.1B] [--storages float32,int8]
        [--threads 1,2] [--reps 30] [--json FILE]

For each storage type and Numba thread count, milliseconds per token of:

  token            decode_token with the head: what forward() runs per generated token
  big products     the six Linear products of every layer (matvec3 r/k/v, output, channel-mix key
                   and value): the same calls, parallel regions and barriers as in the token
  head             the head product (V x C)
  WKV heads        wkv_heads of every layer (decay, removal, state update, group norm, gate)
  LoRAs            the four LoRAs of every layer (numba_decode.loras)
  rest             token - the above: norms, lerps, the embedding row, the calls between
  barriers         an empty parallel region of ROW_CHUNKS tasks, times the number the token runs
                   (5 per layer + the head): the cost of the barriers alone, part of the products

and the bytes the products read per token, their rate in GB/s, and that rate as a fraction of the
machine's read bandwidth on the same threads (`read_bandwidth`: what a product could reach if it
did nothing but read). "floor" is the token's bytes / that bandwidth: the time
no implementation can beat on this machine without reading fewer bytes.

Each part is the median of --reps calls of a compiled loop over all layers, after one untimed
call; with cold caches (--caches, by default when a token reads more than 64 MiB of weights) each
call comes after a cache flush (reading 1 GiB). The parts are timed apart, so they do not add up exactly to the token (in the token, the
threads wake from the one-thread steps before each parallel region; timed alone, the regions run
back to back: "rest" includes that difference).
Other processes slow every figure: the header prints the load average before and after.
"""
import argparse
import json
import os
import sys
import time
from pathlib import Path

import numba
import numpy as np
from numba import njit, prange

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cpu_harness.machine import machine_info          # noqa: E402
from cpu_harness.shapes import parse_shape            # noqa: E402

import tinyrwkv                                       # noqa: E402
from tinyrwkv.backends import numba_decode as nd      # noqa: E402
from tinyrwkv.backends.numba_cpu import RWKV7Numba    # noqa: E402
from tinyrwkv.synthetic import make_weights           # noqa: E402


@njit
def _products(W, s, n_layer):
    for l in range(n_layer):
        nd.matvec3(W.Wr[l], s.mixed[0], s.r, W.Wk[l], s.mixed[2], s.k, W.Wv[l], s.mixed[3], s.v,
                   s.pairs)
        nd.matvec(W.Wo[l], s.y, s.xk, s.pairs)
        nd.matvec(W.Wfk[l], s.xk, s.hidden, s.pairs)
        nd.matvec(W.Wfv[l], s.hidden, s.xk, s.pairs)


@njit
def _head(W, s):
    nd.matvec(W.head, s.xf, s.logits, s.pairs)


@njit
def _wkv(W, s, wkv):
    for l in range(wkv.shape[0]):
        nd.wkv_heads(wkv[l], s, W.r_k[l], W.k_k[l], W.k_a[l], W.ln_x_w[l], W.ln_x_b[l], l == 0)


@njit
def _loras(W, s, n_layer):
    for l in range(n_layer):
        nd.loras(l, W, s.mixed, s.lora, s.w_pre, s.a, s.g, s.v_gate, l > 0)


@njit(parallel=True)
def _empty_region(out):
    for c in prange(out.shape[0]):
        out[c] += 1.0


@njit
def _barriers(out, count):
    for _ in range(count):
        _empty_region(out)


@njit(parallel=True, fastmath=True)          # fastmath: the sum vectorises, as a product's dot does
def _read_all(a, partial):
    step = (a.shape[0] + partial.shape[0] - 1) // partial.shape[0]
    for c in prange(partial.shape[0]):
        acc = np.float32(0.0)
        for i in range(c * step, min(a.shape[0], (c + 1) * step)):
            acc += a[i]
        partial[c] = acc


FLUSH = np.ones(2 ** 28, np.float32)         # 1 GiB: read between timed calls, it evicts the caches
PARTIAL = np.zeros(1024, np.float32)


def median_seconds(fn, reps, cold=True):
    """Median wall time of fn() over `reps` calls after one untimed call; with `cold`, the
    caches are flushed before each call (by reading 1 GiB), as they are for every part inside a
    token: a token reads more bytes than any cache holds, so each part finds its weights in
    memory, not in a cache left warm by the same part's previous call."""
    fn()
    times = []
    for _ in range(reps):
        if cold:
            _read_all(FLUSH, PARTIAL)
        start = time.perf_counter()
        fn()
        times.append(time.perf_counter() - start)
    return float(np.median(times))


def read_bandwidth():
    """Bytes per second the machine reads on Numba's current thread count: the better of a
    parallel sum over 1 GiB of float32 (Numba) and NumPy's BLAS matrix-vector product over a
    512 MiB matrix on as many BLAS threads (the probe of benchmarks/bench_cpu.py): the most a
    bandwidth-bound product can read."""
    n = numba.get_num_threads()
    summed = FLUSH.nbytes / median_seconds(lambda: _read_all(FLUSH, PARTIAL), 5, cold=False)
    m = FLUSH[:2 ** 27].reshape(2 ** 14, 2 ** 13)                    # 512 MiB
    v = np.ones(m.shape[1], np.float32)
    try:
        from threadpoolctl import threadpool_limits
    except ImportError:
        return summed
    with threadpool_limits(n):
        product = m.nbytes / median_seconds(lambda: m @ v, 5, cold=False)
    return max(summed, product)


def weights_for(shape_name):
    if shape_name == "shipped":
        return tinyrwkv.load(backend="numba", progress=False).stored_tensors(), "the shipped model"
    shape = parse_shape(shape_name)
    weights = make_weights(shape.n_layer, shape.n_embd, shape.vocab_size, ranks=shape.ranks,
                           seed=0)
    return weights, shape.describe()


def profile(model, reps, cold):
    """{part: seconds per token} and the bytes the products read, for one model as loaded."""
    W, s = model._decode_weights, model._scratch
    L = model.config.n_layer
    state = model.zero_state()
    rng = np.random.default_rng(0)
    for t in rng.integers(0, model.config.vocab_size, 8):       # a lived-in state and scratch
        model.forward([int(t)], state)
    wkv = state.wkv.copy()
    token = int(rng.integers(0, model.config.vocab_size))
    run_token = lambda: nd.decode_token(token, W, state.att_shift, state.wkv, state.ffn_shift, s,
                                        True)
    marks = np.zeros(nd.ROW_CHUNKS, np.float32)
    parts = {
        "token": median_seconds(run_token, reps, cold),
        "big products": median_seconds(lambda: _products(W, s, L), reps, cold),
        "head": median_seconds(lambda: _head(W, s), reps, cold),
        "WKV heads": median_seconds(lambda: _wkv(W, s, wkv), reps, cold),
        "LoRAs": median_seconds(lambda: _loras(W, s, L), reps, cold),
        "barriers": median_seconds(lambda: _barriers(marks, 5 * L + 1), reps, cold),
    }
    parts["rest"] = max(parts["token"] - parts["big products"] - parts["head"]
                        - parts["WKV heads"] - parts["LoRAs"], 0.0)
    big = sum(m.nbytes for name in nd.BIG for m in getattr(W, name))
    return parts, big, W.head.nbytes


def main():
    parser = argparse.ArgumentParser(
        description="Where a decode token's time goes (fused Numba step), part by part, against "
                    "the machine's read bandwidth.")
    parser.add_argument("--shape", default="0.1B",
                        help="0.1B, 0.4B, 1.5B, shipped, or custom like L4-C512-V1024 "
                             "(default: 0.1B)")
    parser.add_argument("--storages", default="float32,bfloat16,float16,int8",
                        help="comma-separated weight storage types (default: all four)")
    parser.add_argument("--threads", default=None,
                        help="comma-separated Numba thread counts (default: 1 and all cores)")
    parser.add_argument("--reps", type=int, default=30, help="timed calls per part (default: 30)")
    parser.add_argument("--caches", choices=("auto", "cold", "warm"), default="auto",
                        help="cold: flush the caches before every timed call (a model larger than "
                             "the caches: each token reads its weights from memory); warm: do not "
                             "(a model that stays in cache from token to token); auto: cold when "
                             "the weights a token reads exceed 64 MiB (default: auto)")
    parser.add_argument("--json", default=None, help="also write every figure to this JSON file")
    args = parser.parse_args()
    most = numba.config.NUMBA_NUM_THREADS
    threads = [int(n) for n in args.threads.split(",")] if args.threads else sorted({1, most})
    info = machine_info()
    weights, described = weights_for(args.shape)
    print(f"CPU: {info['cpu']}, {info['usable_cores']} usable cores; Numba threads available: "
          f"{most}; OPENBLAS_*: { {k: v for k, v in os.environ.items() if k.startswith('OPENBLAS')} }")
    print(f"model: {described}; load average before: {os.getloadavg()[0]:.2f}")
    results = []
    for storage in args.storages.split(","):
        model = RWKV7Numba(weights, storage=storage, threads=max(threads))
        W = model._decode_weights
        token_bytes = sum(a.nbytes for name in W._fields for a in
                          (getattr(W, name) if isinstance(getattr(W, name), tuple)
                           else (getattr(W, name),)) if name != "emb")
        cold = args.caches == "cold" or (args.caches == "auto" and token_bytes > 64 * 2 ** 20)
        for n in threads:
            numba.set_num_threads(n)
            bandwidth = read_bandwidth()
            parts, big, head = profile(model, args.reps, cold)
            token = parts["token"]
            floor = (big + head) / bandwidth
            print(f"\n{storage}, {n} thread{'s' * (n > 1)}: {1 / token:.1f} tok/s, "
                  f"{token * 1e3:.2f} ms/token; read bandwidth {bandwidth / 1e9:.1f} GB/s; "
                  f"floor {floor * 1e3:.2f} ms ({1 / floor:.0f} tok/s) for "
                  f"{(big + head) / 1e6:.0f} MB of products; caches {'cold' if cold else 'warm'}")
            for name, sec in parts.items():
                if name == "token":
                    continue
                rate = ""
                if name in ("big products", "head"):
                    nbytes = big if name == "big products" else head
                    rate = (f"  {nbytes / sec / 1e9:6.1f} GB/s = "
                            f"{nbytes / sec / bandwidth:4.0%} of read bandwidth")
                inside = " (inside the products)" if name == "barriers" else ""
                print(f"  {name:13} {sec * 1e3:8.3f} ms  {sec / token:5.1%}{rate}{inside}")
            results.append({"storage": storage, "threads": n, "bandwidth_Bps": bandwidth,
                            "caches": "cold" if cold else "warm",
                            "product_bytes": big, "head_bytes": head, "seconds": parts})
    print(f"\nload average after: {os.getloadavg()[0]:.2f}")
    if args.json:
        Path(args.json).write_text(json.dumps({"machine": info, "model": described,
                                               "results": results}, indent=1))


if __name__ == "__main__":
    main()
