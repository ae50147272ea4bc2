"""Training speed of the WKV operator's two forms, recurrent and chunked (issue 18 item 7):
tokens/s of (a) the WKV operator's forward + backward alone and (b) a whole training step
(train.loss_and_grad: forward, loss, every gradient), at several sequence lengths T.

    PYTHONPATH=$PWD python benchmarks/train_wkv.py [--T 128 512 2048] [--tokens 4096]
        [--op-runs 5] [--step-runs 3] [--variants numpy-recurrent,numpy-chunked,...]
        [--threads N] [--host NAME] [--out-dir benchmarks/results]

The model is the shipped model's shape (L6 C256, H4 N64, V4096, F1024, the default LoRA ranks)
from tinyrwkv.synthetic.make_weights(..., training_init=True), float32: the numbers, not the
weights, decide the speed. Every T uses B = tokens / T sequences, so each measurement covers the
same number of tokens (4096 by default) and the tokens/s are comparable across T.

Variants (those whose library or device is missing are left out, and the report says so):
    numpy-recurrent   train.RECURRENT_WKV     (wkv_forward / wkv_backward, model.wkv_step per token)
    numpy-chunked     train.CHUNKED_WKV       (the closed form over chunks of 16, matrix products)
    numba-recurrent   backends.numba_train.WKV_OPS   (Numba kernels, (sequence, head) in parallel)
    cupy-recurrent    backends.cupy_train.WKV_OPS    (CUDA kernels, a block per (sequence, head))
    cupy-chunked      train.CHUNKED_WKV on CuPy arrays (the NumPy code, run by CuPy/cuBLAS)

Method: one untimed warm-up per (variant, T) (Numba compiles, CuPy builds its kernels), which
also checks that variant against numpy-recurrent on the same inputs (max|d|/std of y and of the
gradients; reported); then runs interleaved across variants (A B C A B C ...), wall clock,
GPU work synchronised before the clock stops; reported: the median and the best run.
Results: Markdown and JSONL (a header line with the machine, one line per measurement) at
<out-dir>/train_wkv_<host>.md / .jsonl, written atomically.
"""
from __future__ import annotations

import argparse
import importlib.util
import json
import os
import platform
import socket
import statistics
import sys
import time
from pathlib import Path

import numpy as np

from tinyrwkv import train
from tinyrwkv.synthetic import make_weights

SHAPE = dict(n_layer=6, n_embd=256, vocab_size=4096, head_size=64)      # the shipped model's
VARIANTS = ("numpy-recurrent", "numpy-chunked", "numba-recurrent", "cupy-recurrent", "cupy-chunked")


def have_gpu():
    if importlib.util.find_spec("cupy") is None:
        return False
    try:
        import cupy
        return cupy.cuda.runtime.getDeviceCount() > 0
    except Exception:
        return False


def available(variant):
    """None if the variant can run here, else why not."""
    if variant.startswith("numba") and importlib.util.find_spec("numba") is None:
        return "numba is not installed"
    if variant.startswith("cupy") and not have_gpu():
        return "needs CuPy and a CUDA GPU"
    return None


def ops_of(variant):
    """(forward, backward, to_device, synchronise) of a variant."""
    if variant == "numpy-recurrent":
        return (*train.RECURRENT_WKV, lambda a: a, lambda: None)
    if variant == "numpy-chunked":
        return (*train.CHUNKED_WKV, lambda a: a, lambda: None)
    if variant == "numba-recurrent":
        from tinyrwkv.backends.numba_train import WKV_OPS
        return (*WKV_OPS, lambda a: a, lambda: None)
    import cupy
    sync = cupy.cuda.Device().synchronize
    if variant == "cupy-recurrent":
        from tinyrwkv.backends.cupy_train import WKV_OPS
        return (*WKV_OPS, cupy.asarray, sync)
    if variant == "cupy-chunked":
        return (*train.CHUNKED_WKV, cupy.asarray, sync)
    raise ValueError(f"unknown variant {variant!r}: one of {', '.join(VARIANTS)}")


def wkv_inputs(rng, B, T, H, N):
    """The operator's inputs with a real layer's ranges (float32): r, k, v normal, the decay in
    (e^-0.6065, 1), alpha = -kappa_hat of unit length, beta = kappa_hat * a, a in (0, 1)."""
    r, k, v = (rng.standard_normal((B, T, H, N)) for _ in range(3))
    w = np.exp(-np.exp(-0.5) * rng.uniform(size=(B, T, H, N)))
    kh = rng.standard_normal((B, T, H, N))
    kh /= np.linalg.norm(kh, axis=-1, keepdims=True)
    x = [r, w, k, v, -kh, kh * rng.uniform(size=(B, T, H, N))]
    dy = rng.standard_normal((B, T, H, N))
    return [u.astype(np.float32) for u in x], dy.astype(np.float32)


def rel(got, ref):
    got = got.get() if hasattr(got, "get") else got
    return float(np.abs(np.asarray(got, np.float64) - ref).max() / ref.std())


def machine(threads):
    info = {"host": socket.gethostname(), "cpu": platform.processor() or "unknown",
            "logical_cores": os.cpu_count(), "python": platform.python_version(),
            "numpy": np.__version__, "os": platform.platform()}
    try:
        sys.path.insert(0, str(Path(__file__).resolve().parent))
        from cpu_harness.machine import machine_info            # Unix only
        info.update(machine_info())
    except ImportError:
        pass
    info["openblas_env"] = {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")}
    info["thread_env_all"] = {k: os.environ.get(k) for k in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS",
                                                               "MKL_NUM_THREADS", "NUMBA_NUM_THREADS")}
    try:
        from threadpoolctl import threadpool_info
        info["blas"] = [{k: p.get(k) for k in ("internal_api", "version", "num_threads",
                                               "threading_layer", "architecture")}
                        for p in threadpool_info()]
    except ImportError:
        info["blas"] = "threadpoolctl not installed"
    if importlib.util.find_spec("numba"):
        import numba
        info["numba_threads"] = numba.get_num_threads()
        info["numba"] = numba.__version__
    if have_gpu():
        import cupy
        props = cupy.cuda.runtime.getDeviceProperties(0)
        info["gpu"] = props["name"].decode() if isinstance(props["name"], bytes) else props["name"]
        info["cupy"] = cupy.__version__
    info["threads_option"] = threads
    info["load_average_start"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    return info


def set_threads(n):
    if n is None:
        return
    if importlib.util.find_spec("numba"):
        import numba                      # first: its OpenMP runtime is then limited below too
        numba.set_num_threads(n)
    from threadpoolctl import threadpool_limits
    threadpool_limits(n)


def atomic_write(path, text):
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".partial")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--T", type=int, nargs="+", default=[128, 512, 2048])
    p.add_argument("--tokens", type=int, default=4096, help="B * T of every measurement")
    p.add_argument("--op-runs", type=int, default=5, help="timed runs of the operator alone")
    p.add_argument("--step-runs", type=int, default=3, help="timed runs of a whole training step")
    p.add_argument("--step-runs-long", type=int, default=None,
                   help="timed step runs at the largest T (default: --step-runs)")
    p.add_argument("--variants", default=",".join(VARIANTS))
    p.add_argument("--parts", default="op,step", help="op, step or both")
    p.add_argument("--threads", type=int, default=None, help="BLAS and Numba threads (default: theirs)")
    p.add_argument("--host", default=None, help="name in the result files (default: hostname)")
    p.add_argument("--out-dir", default=str(Path(__file__).resolve().parent / "results"))
    args = p.parse_args(argv)
    for T in args.T:
        if T < 1 or args.tokens % T:
            p.error(f"--tokens {args.tokens} must be a multiple of every T (got T = {T})")
    wanted = [v.strip() for v in args.variants.split(",") if v.strip()]
    for v in wanted:
        if v not in VARIANTS:
            p.error(f"unknown variant {v!r}: one of {', '.join(VARIANTS)}")
    parts = [s.strip() for s in args.parts.split(",")]
    set_threads(args.threads)
    skipped = {v: available(v) for v in wanted if available(v)}
    variants = [v for v in wanted if v not in skipped]
    info = machine(args.threads)
    host = args.host or info["host"].split(".")[0]
    print(f"{info.get('cpu')}, {info.get('logical_cores')} logical cores; BLAS {info.get('blas')}; "
          f"numba threads {info.get('numba_threads')}; GPU {info.get('gpu')}", flush=True)
    for v, why in skipped.items():
        print(f"  {v}: left out ({why})")
    ops = {v: ops_of(v) for v in variants}
    weights = make_weights(**SHAPE, training_init=True, dtype=np.float32)
    H, N = SHAPE["n_embd"] // SHAPE["head_size"], SHAPE["head_size"]
    rng = np.random.default_rng(0)
    rows = []

    for T in args.T:
        B = args.tokens // T
        x, dy = wkv_inputs(rng, B, T, H, N)
        ids = rng.integers(0, SHAPE["vocab_size"], (B, T))
        targets = rng.integers(0, SHAPE["vocab_size"], (B, T))
        S0 = np.zeros((B, H, N, N), np.float32)
        # reference for the check: numpy-recurrent in float64
        x64 = [u.astype(np.float64) for u in x]
        _, y_ref, saved = train.wkv_forward(S0.astype(np.float64), *x64)
        g_ref = train.wkv_backward(None, dy.astype(np.float64), saved, *x64)
        check = {}
        dev_args = {}
        dev_weights = {}
        for v in variants:
            fwd, bwd, dev, sync = ops[v]
            dev_args[v] = [dev(u) for u in [S0, dy] + x]
            S0_d, dy_d, *x_d = dev_args[v]
            _, y, sv = fwd(S0_d, *x_d)
            g = bwd(None, dy_d, sv, *x_d)
            sync()
            check[v] = max([rel(y, y_ref)] + [rel(a, b) for a, b in zip(g, g_ref)])
            if "step" in parts:
                dev_weights[v] = {k: dev(a) for k, a in weights.items()}
                train.loss_and_grad(dev_weights[v], ids, targets, wkv_ops=(fwd, bwd))
                sync()
            print(f"T={T} B={B} {v}: warmed up; max|d|/std against float64 recurrent {check[v]:.1e}",
                  flush=True)

        def timed(v, part):
            fwd, bwd, dev, sync = ops[v]
            sync()
            t0 = time.perf_counter()
            if part == "op":
                S0_d, dy_d, *x_d = dev_args[v]
                _, _, sv = fwd(S0_d, *x_d)
                bwd(None, dy_d, sv, *x_d)
            else:
                train.loss_and_grad(dev_weights[v], ids, targets, wkv_ops=(fwd, bwd))
            sync()
            return time.perf_counter() - t0

        for part in parts:
            runs = args.op_runs if part == "op" else (
                args.step_runs_long if (args.step_runs_long and T == max(args.T)) else args.step_runs)
            times = {v: [] for v in variants}
            for _ in range(runs):
                for v in variants:                                   # interleaved
                    times[v].append(timed(v, part))
            for v in variants:
                med, best = statistics.median(times[v]), min(times[v])
                row = {"part": part, "variant": v, "T": T, "B": B, "tokens": B * T, "runs": runs,
                       "seconds": times[v], "median_s": med, "tokens_per_s": B * T / med,
                       "best_tokens_per_s": B * T / best, "check_rel_err": check[v]}
                rows.append(row)
                print(f"  {part:4} T={T:5} {v:16} {row['tokens_per_s']:10.0f} tok/s "
                      f"(best {row['best_tokens_per_s']:.0f}, {runs} runs)", flush=True)

    info["load_average_end"] = os.getloadavg() if hasattr(os, "getloadavg") else None
    info["skipped"] = skipped
    info["command"] = " ".join([Path(sys.argv[0]).name] + (argv if argv is not None else sys.argv[1:]))
    info["shape"] = SHAPE
    out = Path(args.out_dir)
    atomic_write(out / f"train_wkv_{host}.jsonl",
                 "".join(json.dumps(r) + "\n" for r in [{"machine": info}] + rows))
    atomic_write(out / f"train_wkv_{host}.md", markdown(info, rows, args, host))
    print(f"wrote {out / f'train_wkv_{host}.md'} and .jsonl")


def markdown(info, rows, args, host):
    lines = [f"# Training speed of the WKV operator, recurrent and chunked: {host}", "",
             f"`{info['command']}`", "",
             f"- CPU: {info.get('cpu')}; {info.get('logical_cores')} logical cores"
             + (f", {info.get('physical_cores')} physical" if info.get("physical_cores") else "")
             + (f"; GPU: {info['gpu']} (CuPy {info.get('cupy')})" if info.get("gpu") else "; no GPU"),
             f"- BLAS: {info.get('blas')}",
             f"- Numba threads: {info.get('numba_threads')}; --threads: {info.get('threads_option')}; "
             f"thread variables: {info.get('thread_env_all')}; OPENBLAS_* set: {info.get('openblas_env') or 'none'}",
             f"- load average at start / end: {info.get('load_average_start')} / {info.get('load_average_end')}",
             f"- model: the shipped shape, L{SHAPE['n_layer']} C{SHAPE['n_embd']} "
             f"H{SHAPE['n_embd'] // SHAPE['head_size']} N{SHAPE['head_size']} V{SHAPE['vocab_size']}, "
             "make_weights(training_init=True), float32",
             f"- every measurement is {args.tokens} tokens: B = {args.tokens} / T sequences of T tokens",
             "- tokens/s: median of the runs (best run in brackets); check: max|d|/std of y and the "
             "gradients against the float64 recurrent pair on the same inputs (warm-up run)", ""]
    if info.get("skipped"):
        lines += [f"Left out: " + "; ".join(f"{v} ({why})" for v, why in info["skipped"].items()), ""]
    Ts = sorted({r["T"] for r in rows})
    for part, title in (("op", "(a) the WKV operator alone, forward + backward, one layer's shape"),
                        ("step", "(b) a whole training step, train.loss_and_grad")):
        prow = [r for r in rows if r["part"] == part]
        if not prow:
            continue
        lines += [f"## {title}", "",
                  "| variant | " + " | ".join(f"T = {T} (B = {args.tokens // T})" for T in Ts) + " | operator check |",
                  "|---|" + "---:|" * len(Ts) + "---:|"]
        for v in dict.fromkeys(r["variant"] for r in prow):
            cells = []
            for T in Ts:
                r = next((r for r in prow if r["variant"] == v and r["T"] == T), None)
                cells.append("" if r is None else f"{r['tokens_per_s']:,.0f} ({r['best_tokens_per_s']:,.0f})")
            worst = max(r["check_rel_err"] for r in prow if r["variant"] == v)
            lines.append(f"| {v} | " + " | ".join(cells) + f" | {worst:.0e} |")
        lines.append("")
    return "\n".join(lines)


if __name__ == "__main__":
    main()
