"""Count what bad files do to tinyrwkv: the numbers in the closing note of the hostile-files work.

    python tests/hostile_report.py                    # 300 fuzzed cases per kind + the crafted files
    python tests/hostile_report.py --cases 2000 --timeout 60 --memory-gib 4

Every case runs in a worker process (POSIX: under an address-space limit of --memory-gib), so a
crash (the worker dies by a signal) or a hang (no answer within --timeout seconds: the worker is
killed and replaced) is counted instead of taking the run down. A case is one of

  * a fuzzed file: a seed of each kind with random mutations (tests/fuzzing.py);
  * a crafted file: every hostile file the tests build (tests/hostile_files.py, when present),
    among them pickles that try to run code: each such payload would create a marker file, and
    the marker's existence afterwards is counted as "code executed".

Outcomes: clear error (a tinyrwkv error, one line, naming the file), correct load, traceback (any
other exception), unclear message, hang, crash, code executed. The slowest case and the largest
Python-visible allocation (tracemalloc peak) are reported with the case that caused them.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from collections import Counter
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]      # the checkout's tinyrwkv, and fuzzing.py

import fuzzing  # noqa: E402  (tests/ is not a package)


def worker(memory_gib):
    """Read cases from stdin (one JSON per line), answer each on stdout."""
    import tracemalloc
    import warnings
    import numpy as np
    if memory_gib and os.name == "posix":
        import resource
        limit = int(memory_gib * 2**30)
        resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    warnings.simplefilter("ignore")
    np.seterr(all="ignore")
    for line in sys.stdin:
        case = json.loads(line)
        tracemalloc.start()
        t0 = time.perf_counter()
        try:
            verdict, error = fuzzing.run_case(case["kind"], case["path"],
                                              {k: tuple(v) for k, v in case["summary"].items()}
                                              if case["summary"] else None)
        except BaseException as e:          # noqa: BLE001 -- reported, not hidden
            verdict, error = f"{type(e).__name__} escaped: {e}"[:300], e
        seconds = time.perf_counter() - t0
        peak = tracemalloc.get_traced_memory()[1]
        tracemalloc.stop()
        print(json.dumps({"verdict": verdict, "error": type(error).__name__ if error else None,
                          "message": str(error)[:300] if error else None,
                          "seconds": seconds, "peak": peak, "rss": peak_rss()}), flush=True)


def peak_rss():
    """The worker's peak resident memory so far, in bytes (POSIX; 0 elsewhere): it includes what
    tracemalloc cannot see (the tokenizers library's Rust heap, pages of memory-mapped files)."""
    if os.name != "posix":
        return 0
    import resource
    kb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return kb * (1 if sys.platform == "darwin" else 1024)     # bytes on macOS, KiB on Linux


class Worker:
    def __init__(self, memory_gib, package_root):
        self.memory_gib, self.package_root = memory_gib, package_root
        self.proc = None

    def start(self):
        self.proc = subprocess.Popen(
            [sys.executable, __file__, "--worker", "--memory-gib", str(self.memory_gib),
             "--against", str(self.package_root)],
            stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.DEVNULL, text=True)

    def ask(self, case, timeout):
        """The worker's answer, or {"verdict": "hang"/"crash"}."""
        import selectors
        if self.proc is None or self.proc.poll() is not None:
            self.start()
        self.proc.stdin.write(json.dumps(case) + "\n")
        self.proc.stdin.flush()
        sel = selectors.DefaultSelector()
        sel.register(self.proc.stdout, selectors.EVENT_READ)
        t0 = time.perf_counter()
        ready = sel.select(timeout)
        sel.close()
        if not ready:
            self.proc.kill()
            self.proc.wait()
            self.proc = None
            return {"verdict": "hang", "seconds": time.perf_counter() - t0, "peak": 0}
        line = self.proc.stdout.readline()
        if not line:
            code = self.proc.wait()
            self.proc = None
            return {"verdict": f"crash (exit {code})", "seconds": time.perf_counter() - t0,
                    "peak": 0}
        return json.loads(line)

    def close(self):
        if self.proc is not None:
            self.proc.stdin.close()
            self.proc.wait()


def category(answer, marker_created):
    if marker_created:
        return "code executed"
    v = answer["verdict"]
    if v == "hang" or v.startswith("crash"):
        return v.split(" ")[0]
    if v == "ok":
        return "clear error" if answer.get("error") else "correct load"
    if "not a tinyrwkv error" in v or "escaped" in v:
        return "traceback"
    return "unclear message"


def crafted_cases(folder):
    """[(label, kind, path, marker or None)] from tests/hostile_files.py, if it exists."""
    try:
        import hostile_files
    except ImportError:
        return []
    return hostile_files.all_cases(folder)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                 formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--cases", type=int, default=300, help="fuzzed cases per kind (default 300)")
    ap.add_argument("--seed", type=int, default=0, help="the fuzzer's random seed (default 0)")
    ap.add_argument("--timeout", type=float, default=30.0,
                    help="seconds before a case counts as a hang (default 30)")
    ap.add_argument("--memory-gib", type=float, default=4.0,
                    help="address-space limit of the worker, POSIX only (default 4 GiB)")
    ap.add_argument("--kinds", nargs="+", choices=fuzzing.KINDS, default=fuzzing.KINDS,
                    help="which kinds of file to fuzz (default: all)")
    ap.add_argument("--against", metavar="CHECKOUT", default=str(HERE.parent),
                    help="read the cases with the tinyrwkv of this checkout (default: this one), "
                         "e.g. a worktree of an older commit, to count what it did")
    ap.add_argument("--json", metavar="PATH", help="also write every case's outcome here")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        sys.path.insert(0, args.against)
        for name in [m for m in sys.modules if m == "tinyrwkv" or m.startswith("tinyrwkv.")]:
            del sys.modules[name]
        return worker(args.memory_gib)

    import numpy as np
    print(f"# {platform.platform()}, Python {platform.python_version()}, "
          f"{os.cpu_count()} cores, worker limit {args.memory_gib} GiB, timeout {args.timeout} s",
          file=sys.stderr)
    rng = np.random.default_rng(args.seed)
    work = Worker(args.memory_gib, Path(args.against).resolve())
    counts, rows = {}, []
    worst_time, worst_peak, worst_rss = (0.0, None), (0, None), 0
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        seeds = fuzzing.make_seeds(tmp)
        summaries = {kind: {k: list(v) for k, v in fuzzing.read(kind, p).items()}
                     for kind, p in seeds.items()}
        jobs = [("crafted", label, kind, str(path), marker)
                for label, kind, path, marker in crafted_cases(tmp / "crafted")]
        for kind, seed in seeds.items():
            if kind not in args.kinds:
                continue
            for i in range(args.cases):
                mutations = fuzzing.random_mutations(rng)
                folder = tmp / "fuzz" / f"{kind}-{i}"
                folder.mkdir(parents=True)
                path = fuzzing.mutated_copy(kind, seed, mutations, folder)
                jobs.append(("fuzzed", fuzzing.describe(mutations), kind, str(path), None))
        t_start = time.perf_counter()
        for n, (origin, label, kind, path, marker) in enumerate(jobs):
            answer = work.ask({"kind": kind, "path": path,
                               "summary": summaries.get(kind) if origin == "fuzzed" else None},
                              args.timeout)
            cat = category(answer, marker is not None and Path(marker).exists())
            if origin == "crafted" and cat == "correct load":
                cat = "loaded"               # a crafted file that is in fact valid
            counts.setdefault(origin, Counter())[cat] += 1
            rows.append({"origin": origin, "kind": kind, "case": label, "outcome": cat, **answer})
            if answer["seconds"] > worst_time[0]:
                worst_time = (answer["seconds"], f"{origin} {kind}: {label}")
            worst_rss = max(worst_rss, answer.get("rss", 0))
            if answer["peak"] > worst_peak[0]:
                worst_peak = (answer["peak"], f"{origin} {kind}: {label}")
            if cat in ("traceback", "unclear message", "hang", "crash", "code executed"):
                print(f"  {cat}: {origin} {kind} {label}: {answer.get('verdict', '')[:160]}",
                      file=sys.stderr)
            if (n + 1) % 200 == 0:
                print(f"  {n + 1}/{len(jobs)} cases, {time.perf_counter() - t_start:.0f} s",
                      file=sys.stderr)
        work.close()
    print(f"# read by the tinyrwkv of {Path(args.against).resolve()}")
    every = ("clear error", "correct load", "loaded", "traceback", "unclear message", "hang",
             "crash", "code executed")
    for origin, c in counts.items():
        print(f"{origin}: {sum(c.values())} files: " +
              ", ".join(f"{k} {c[k]}" for k in every if k in c or k not in ("loaded",
                                                                            "correct load")))
    print(f"slowest case: {worst_time[0]:.2f} s ({worst_time[1]})")
    print(f"largest allocation: {worst_peak[0] / 2**20:.1f} MiB ({worst_peak[1]})")
    print(f"largest worker peak RSS: {worst_rss / 2**20:.0f} MiB (over every case a worker read, "
          "its Python, NumPy and libraries included)")
    if args.json:
        Path(args.json).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
