"""Training speed against CPU threads, on a quiet machine and next to one busy process.

    python benchmarks/train_threads.py [--steps 40] [--runs 3] [--host NAME]

Runs `tinyrwkv train` (the shipped model's shape, L6 C256 V4096, batches of 8 x 128 tokens, the
Numba backend, from scratch on TinyStories text with the shipped tokenizer) with `--threads 1`,
`--threads <all cores>` and without --threads (the thread count chosen as it runs, trainer.
StepThreads), each on a quiet machine and with one busy Python process beside it (one core held,
as a user's other program would). Reported: the median over runs of each run's median step
throughput (tokens/s of the steps after the first 5, from the run's log.jsonl), and that as a
share of the machine's matrix-multiply rate (a float32 1024^3 product, measured here: a training
step is ~6 x parameters x tokens flops, nearly all in such products).

Writes benchmarks/results/train_threads_<host>.md and .jsonl.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
DATA = ROOT.parent / "shared" / "data" / "tinystories-subset"
BUSY = "import time\nwhile True:\n    pass\n"


def cpu_name():
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def matmul_gflops(threads=None, n=1024, runs=5):
    """float32 n x n x n products per second, in GFLOP/s (2 n^3 flops each), median of runs."""
    import threadpoolctl
    a = np.random.default_rng(0).standard_normal((n, n)).astype(np.float32)
    with threadpoolctl.threadpool_limits(threads):
        a @ a
        times = []
        for _ in range(runs):
            t = time.perf_counter()
            a @ a
            times.append(time.perf_counter() - t)
    return 2 * n ** 3 / statistics.median(times) / 1e9


def one_run(work, threads, steps):
    """Median tokens/s of steps 6.. of one training run, and the thread counts the log shows."""
    out = work / f"run{time.monotonic_ns()}"
    cmd = [sys.executable, "-m", "tinyrwkv", "train", "--data", str(work / "train.txt"),
           "--valid", str(work / "valid.txt"), "--tokenizer",
           str(ROOT / "weights" / "model.tokenizer.json"), "--out", str(out),
           "--layers", "6", "--width", "256", "--batch", "8", "--ctx", "128",
           "--steps", str(steps), "--eval-every", str(steps), "--eval-windows", "8",
           "--sample-every", "0", "--backend", "numba", "--seed", "0"]
    if threads:
        cmd += ["--threads", str(threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, cwd=ROOT,
                          env=dict(os.environ, PYTHONPATH=str(ROOT)))
    if done.returncode:
        raise SystemExit(f"training failed:\n{done.stderr[-2000:]}")
    log = [json.loads(line) for line in (out / "log.jsonl").read_text().splitlines()]
    # tok_s in the log is cumulative since the start: per-step rates from its differences
    rates, used = [], []
    for prev, cur in zip(log, log[1:]):
        if cur["step"] <= 5:
            continue
        tokens = 8 * 128
        t_prev = prev["step"] * tokens / prev["tok_s"]
        t_cur = cur["step"] * tokens / cur["tok_s"]
        rates.append(tokens / max(t_cur - t_prev, 1e-9))
        used.append(cur.get("threads"))
    return statistics.median(rates), sorted({u for u in used if u is not None})


def main():
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--steps", type=int, default=40)
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--host", default=platform.node() or "host")
    p.add_argument("--out-dir", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args()
    cores = os.cpu_count() or 1
    work = Path(tempfile.mkdtemp(prefix="train_threads_"))
    text = (DATA / "train.txt").read_text(encoding="utf-8")
    (work / "train.txt").write_text(text[:2_000_000], encoding="utf-8")
    (work / "valid.txt").write_text((DATA / "valid.txt").read_text(encoding="utf-8")[:100_000],
                                    encoding="utf-8")
    machine = {"host": args.host, "cpu": cpu_name(), "cores": cores,
               "python": platform.python_version(), "numpy": np.__version__,
               "openblas_env": {k: v for k, v in os.environ.items() if k.startswith("OPENBLAS")},
               "matmul_gflops_1": matmul_gflops(1), "matmul_gflops_all": matmul_gflops(cores),
               "load_average_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    print(json.dumps(machine), file=sys.stderr)
    flops_per_token = 6 * 7_337_472
    configs = [("1", 1), (str(cores), cores), ("auto", None)]
    rows = []
    for busy in (False, True):
        proc = subprocess.Popen([sys.executable, "-c", BUSY]) if busy else None
        try:
            time.sleep(1 if busy else 0)
            runs = {name: [] for name, _ in configs}
            used = {name: set() for name, _ in configs}
            for _ in range(args.runs):                       # interleaved: A B C A B C ...
                for name, threads in configs:
                    rate, counts = one_run(work, threads, args.steps)
                    runs[name].append(rate)
                    used[name].update(counts)
            for name, _ in configs:
                tok_s = statistics.median(runs[name])
                peak = machine["matmul_gflops_all"]
                row = {"machine": "busy (one process)" if busy else "quiet", "threads": name,
                       "threads_used": sorted(used[name]), "tok_s": tok_s,
                       "runs": runs[name], "gflops": tok_s * flops_per_token / 1e9,
                       "share_of_matmul": tok_s * flops_per_token / 1e9 / peak}
                rows.append(row)
                print(json.dumps(row), file=sys.stderr)
        finally:
            if proc is not None:
                proc.kill()
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    with open(out / f"train_threads_{args.host}.jsonl", "w", encoding="utf-8") as f:
        f.write(json.dumps({"machine": machine, "command": " ".join(sys.argv)}) + "\n")
        for row in rows:
            f.write(json.dumps(row) + "\n")
    lines = [f"# Training speed against threads: {machine['cpu']}, {cores} cores", "",
             f"`python benchmarks/train_threads.py {' '.join(sys.argv[1:])}`: L6 C256 V4096, "
             f"8 x 128 tokens per step, numba backend, {args.steps} steps per run, median of "
             f"{args.runs} runs of each run's median step (steps 6 on). float32 1024^3 matmul: "
             f"{machine['matmul_gflops_1']:.0f} GFLOP/s on 1 thread, "
             f"{machine['matmul_gflops_all']:.0f} on {cores}. OPENBLAS_* set: "
             f"{machine['openblas_env'] or 'none'}.", "",
             "| machine | --threads | counts used | tokens/s | GFLOP/s (6 x params x tokens) "
             "| of the matmul rate |", "|---|---|---|---|---|---|"]
    for r in rows:
        lines.append(f"| {r['machine']} | {r['threads']} | {r['threads_used']} | "
                     f"{r['tok_s']:,.0f} | {r['gflops']:.1f} | {r['share_of_matmul']:.0%} |")
    (out / f"train_threads_{args.host}.md").write_text("\n".join(lines) + "\n", encoding="utf-8")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
