"""The parent side of the CPU benchmark: plans the runs, starts a fresh child process for each
(worker.py), and summarises. It never imports torch, the official package or a backend."""

from __future__ import annotations

import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict
from pathlib import Path

from . import BUSY_CORES, GB, OPENBLAS_VARS, backend_setup
from .machine import children_cpu_seconds, cpu_seconds, machine_info, mem_available_bytes
from .shapes import find_checkpoint


def _log(opts, message):
    if opts.verbose:
        print(f"[bench] {message}", file=sys.stderr, flush=True)


def run_child(spec, workdir, env, timeout):
    """Run one task in a fresh `python -m cpu_harness.worker` and return its JSON result.
    A crash (e.g. killed for memory) becomes {"ok": False, "error": ...}.

    Also measures how busy the rest of the machine was meanwhile: `other_cores` = (CPU time of
    the whole machine - the child's) / wall time, i.e. how many cores other processes used on
    average (0 on a quiet machine; on 2 cores, 1 means our threads had to share), and
    `steal_cores`, the same for time taken by the hypervisor.
    """
    workdir = Path(workdir)
    n = len(list(workdir.glob("spec-*.json")))
    spec_path, out_path = workdir / f"spec-{n}.json", workdir / f"result-{n}.json"
    spec = {**spec, "out": str(out_path)}
    spec_path.write_text(json.dumps(spec))
    # The child imports this harness and this checkout's tinyrwkv, whatever else is installed.
    benchmarks = Path(__file__).resolve().parents[1]
    path = (str(benchmarks.parent), str(benchmarks), env.get("PYTHONPATH"))
    env = {**env, "PYTHONPATH": os.pathsep.join(p for p in path if p)}
    cpu0, child0, t0 = cpu_seconds(), children_cpu_seconds(), time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "cpu_harness.worker", str(spec_path)],
                              env=env, capture_output=True, text=True, timeout=timeout)
    except subprocess.TimeoutExpired:
        return {"ok": False, "error": f"timed out after {timeout:.0f} s"}
    wall, cpu1 = time.perf_counter() - t0, cpu_seconds()
    if out_path.is_file():
        result = json.loads(out_path.read_text())
    else:
        tail = (proc.stderr or proc.stdout or "").strip().splitlines()[-1:] or [""]
        why = " (killed: out of memory?)" if proc.returncode in (-9, 137) else ""
        result = {"ok": False, "error": f"worker exited with code {proc.returncode}{why}: {tail[0]}"}
    result["stdout_tail"] = (proc.stdout or "")[-2000:]
    if cpu0 and cpu1 and wall > 0:
        child = children_cpu_seconds() - child0
        result["machine_load"] = {"wall_s": wall, "child_cpu_s": child,
                                  "other_cores": max(0.0, (cpu1[0] - cpu0[0] - child) / wall),
                                  "steal_cores": (cpu1[1] - cpu0[1]) / wall}
    return result


def wait_for_quiet(opts, busy_limit=None, sample_s=2.0):
    """With --wait-quiet S: before a run, wait (at most S seconds) until other processes use
    less than `busy_limit` cores, sampled over `sample_s` seconds. Returns the seconds waited."""
    if not opts.wait_quiet or cpu_seconds() is None:
        return 0.0
    busy_limit = BUSY_CORES if busy_limit is None else busy_limit
    t0, said = time.perf_counter(), False
    while True:
        a = cpu_seconds()
        time.sleep(sample_s)
        busy = (cpu_seconds()[0] - a[0]) / sample_s
        waited = time.perf_counter() - t0
        if busy < busy_limit or waited >= opts.wait_quiet:
            return waited
        if not said:
            _log(opts, f"other processes use {busy:.2f} cores: waiting up to "
                       f"{opts.wait_quiet:.0f} s for a quiet machine")
            said = True


def measure_limits(opts, workdir, env):
    wait_for_quiet(opts)
    return run_child({"task": "limits", "quick": opts.quick, "threads": opts.threads},
                     workdir, env, opts.timeout)


def combine_limits(samples):
    """The machine's limits from every limits measurement of a pass.

    A limit is a ceiling, so each probe's rate is its best (fastest) repetition, over all
    measurements, and the limit is the best probe: the most this machine was seen to do. (The
    backends' numbers are medians, so their fractions of the limit are, if anything, low.)
    `drift` gives, per measurement, the best bandwidth and matmul rate seen then: a wide range
    means the machine's speed changed during the pass.
    """
    ok = [s for s in samples if s.get("ok")]
    if not ok:
        return {"error": samples[0].get("error") if samples else "not measured"}
    rate = lambda p: p["amount"] / min(p["seconds"]) / 1e9
    by = {"GB/s": {}, "GFLOP/s": {}}
    drift = []
    for sample in ok:
        now = {"GB/s": 0.0, "GFLOP/s": 0.0}
        for name, p in sample["probes"].items():
            r = rate(p)
            by[p["unit"]][name] = max(by[p["unit"]].get(name, 0.0), r)
            now[p["unit"]] = max(now[p["unit"]], r)
        drift.append({"bandwidth_gb_s": now["GB/s"], "matmul_gflops": now["GFLOP/s"]})
    first = ok[0]
    return {"bandwidth_gb_s": max(by["GB/s"].values()), "bandwidth_by": by["GB/s"],
            "matmul_gflops": max(by["GFLOP/s"].values()), "matmul_by": by["GFLOP/s"],
            "drift": drift, "gemm_n": first["gemm_n"], "copy_bytes": first["copy_bytes"],
            "matvec_bytes": first["matvec_bytes"], "numpy_blas": first.get("numpy_blas"),
            "threads": first.get("threads"), "torch_blas": first.get("torch_blas")}


def run_shape(shape, checkpoint, opts, workdir, env, available_official):
    """All runs of all backends on one shape, interleaved. Returns {backend: record}."""
    rows = {}
    for name in opts.backends:
        backend, weights = backend_setup(name)
        rows[name] = {"backend": backend, "weights": weights, "runs": [], "error": None,
                      "skipped_prefill": {}, "discarded_busy": []}
        if backend == "official" and available_official is not True:
            rows[name]["error"] = available_official
        elif backend == "official" and not str(checkpoint).endswith(".pth"):
            rows[name]["error"] = "the official package needs a .pth (torch is not installed)"
        need = shape.counts()["params"] * 4 * 1.2     # float32 weights plus headroom
        free = mem_available_bytes()
        if rows[name]["error"] is None and free is not None and need > free:
            rows[name]["error"] = (f"not run: needs about {need / GB:.1f} GB, "
                                   f"{free / GB:.1f} GB available")

    first_prefill = {}      # (backend, T) -> seconds of the first run
    for r in range(opts.runs):
        live = [n for n in opts.backends if rows[n]["error"] is None]
        k = r % max(len(live), 1)
        for name in live[k:] + live[:k]:                # rotate the order every run
            row = rows[name]
            prefill = []
            for T in opts.prefill:
                took = first_prefill.get((name, T))
                if r > 0 and took is not None and took > opts.prefill_budget:
                    row["skipped_prefill"][str(T)] = row["skipped_prefill"].get(str(T), 0) + 1
                else:
                    prefill.append(T)
            spec = {"task": "measure", "backend": row["backend"], "weights": row["weights"],
                    "checkpoint": str(checkpoint), "vocab_size": shape.vocab_size,
                    "seed": opts.seed, "warmup": opts.warmup, "decode_tokens": opts.decode_tokens,
                    "prefill": prefill, "threads": opts.threads,
                    "check_out": str(Path(workdir) / f"check-{shape.name}-{name}.npy") if r == 0 else None}
            for attempt in range(1 + opts.retry_busy):
                waited = wait_for_quiet(opts)
                result = run_child(spec, workdir, env, opts.timeout)
                result["waited_for_quiet_s"] = waited
                busy = result.get("machine_load", {}).get("other_cores") or 0.0
                if not result.get("ok") or busy <= BUSY_CORES or attempt == opts.retry_busy:
                    break
                row["discarded_busy"].append(result)      # kept in the JSON, not in the medians
                _log(opts, f"{shape.name} run {r + 1}/{opts.runs} {name}: other processes used "
                           f"{busy:.2f} cores: run again (--retry-busy)")
            if not result.get("ok"):
                row["error"] = result.get("error")
                row["traceback"] = result.get("traceback")
                _log(opts, f"{shape.name} {name}: not available: {row['error']}")
                continue
            for T, s in result["prefill_s"].items():
                first_prefill.setdefault((name, int(T)), s)
            row["runs"].append(result)
            pre = ", ".join(f"prefill@{T} {int(T) / s:.1f} tok/s" for T, s in result["prefill_s"].items())
            busy = result.get("machine_load", {}).get("other_cores")
            _log(opts, f"{shape.name} run {r + 1}/{opts.runs} {name}: load {result['load_s']:.2f} s, "
                       f"decode {result['decode_tok_s']:.2f} tok/s" + (f", {pre}" if pre else "")
                       + (f"; other processes used {busy:.2f} cores" if busy is not None else ""))
    _check_logits(shape, rows, workdir)
    return rows


def _check_logits(shape, rows, workdir):
    """max|delta logit|/std of each backend's validation logits against the official package's
    (or, without it, the numpy backend's)."""
    import numpy as np
    logits = {}
    for name in rows:
        path = Path(workdir) / f"check-{shape.name}-{name}.npy"
        if path.is_file() and rows[name]["runs"]:
            logits[name] = np.load(path).astype(np.float64)
    ref = "official" if "official" in logits else ("numpy" if "numpy" in logits else None)
    for name, got in logits.items():
        rows[name]["finite"] = all(run.get("finite", False) for run in rows[name]["runs"])
        if ref is not None and name != ref:
            want = logits[ref]
            rows[name]["check"] = {"against": ref,
                                   "max_abs_over_std": float(np.abs(got - want).max() / want.std())}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(shape, rows, limits, opts):
    """Medians per backend, ratios to the official package, fractions of the machine limits."""
    counts = shape.counts()
    out = {}
    for name, row in rows.items():
        runs = row["runs"]
        if not runs:
            out[name] = {"error": row["error"] or "no successful run"}
            continue
        s = {"weights": row["weights"], "runs": len(runs),
             "backend_reported": runs[0].get("backend_reported"),
             "threads": runs[0].get("threads"),
             "other_cores": [x.get("machine_load", {}).get("other_cores") for x in runs],
             "load_s": _median([x["load_s"] for x in runs]),
             "peak_rss_gb": max(x["peak_rss_gb"] for x in runs),
             "decode_tok_s": _median([x["decode_tok_s"] for x in runs]),
             "prefill_tok_s": {}, "prefill_runs": {},
             "error_in_later_run": row["error"]}
        for T in opts.prefill:
            vals = [T / x["prefill_s"][str(T)] for x in runs if str(T) in x["prefill_s"]]
            if vals:
                s["prefill_tok_s"][str(T)] = statistics.median(vals)
                s["prefill_runs"][str(T)] = len(vals)
        s["decode_bytes_per_token"] = shape.decode_bytes(row["weights"])
        s["prefill_flops_per_token"] = 2 * counts["body"]
        if limits.get("bandwidth_gb_s") and s["decode_tok_s"]:
            s["bandwidth_fraction"] = (s["decode_bytes_per_token"] * s["decode_tok_s"]
                                       / (limits["bandwidth_gb_s"] * GB))
        if limits.get("matmul_gflops"):
            s["matmul_fraction"] = {T: s["prefill_flops_per_token"] * v / (limits["matmul_gflops"] * 1e9)
                                    for T, v in s["prefill_tok_s"].items()}
        s["check"], s["finite"] = row.get("check"), row.get("finite")
        out[name] = s
    ref = out.get("official")
    if ref and "error" not in ref:
        for name, s in out.items():
            if "error" in s:
                continue
            s["x_official"] = {"decode": ratio(s["decode_tok_s"], ref["decode_tok_s"])}
            for T, v in s["prefill_tok_s"].items():
                s["x_official"][T] = ratio(v, ref["prefill_tok_s"].get(T))
    return out


def ratio(a, b):
    return a / b if a and b else None


def run_pass(opts, workdir, env, label, checkpoints):
    """One whole benchmark (limits + every shape) in the environment `env` of the children."""
    t0 = time.perf_counter()
    official = official_available()
    _log(opts, f"pass '{label}': measuring the machine's limits")
    samples = [measure_limits(opts, workdir, env)]
    shapes = {}
    for shape in opts.shapes:
        if shape.name not in checkpoints:
            _log(opts, f"{shape.name}: writing the synthetic checkpoint ({shape.describe()})")
            checkpoints[shape.name] = ensure_checkpoint(shape, opts, workdir, env)
        ckpt = checkpoints[shape.name]
        if not ckpt.get("ok"):
            shapes[shape.name] = {"shape": asdict(shape), "error": ckpt.get("error")}
            continue
        ts = time.perf_counter()
        rows = run_shape(shape, ckpt["checkpoint"], opts, workdir, env, official)
        shapes[shape.name] = {"shape": asdict(shape), "counts": shape.counts(),
                              "checkpoint": ckpt, "rows": rows,
                              "seconds": time.perf_counter() - ts}
        if not opts.quick:                 # again after each shape: the machine may drift
            _log(opts, f"pass '{label}': measuring the machine's limits again")
            samples.append(measure_limits(opts, workdir, env))
    limits = combine_limits(samples)
    for name, sh in shapes.items():
        if "rows" in sh:
            sh["summary"] = summarize(shape_named(opts, name), sh["rows"], limits, opts)
    return {"label": label, "env": {v: env.get(v) for v in OPENBLAS_VARS},
            "limits": limits, "limit_samples": samples, "shapes": shapes,
            "seconds": time.perf_counter() - t0}


def shape_named(opts, name):
    return next(s for s in opts.shapes if s.name == name)


def ensure_checkpoint(shape, opts, workdir, env):
    """The checkpoint for `shape`: reused from the cache folder, or written by a child process
    (so the parent never holds the weights nor imports torch)."""
    folder = Path(opts.cache_dir) if opts.cache_dir else Path(workdir)
    found = find_checkpoint(shape, opts.seed, folder)
    if found is not None:
        return {"ok": True, "checkpoint": str(found), "reused": True, "bytes": found.stat().st_size}
    return run_child({"task": "make", "shape": asdict(shape), "seed": opts.seed,
                      "folder": str(folder)}, workdir, env, opts.timeout)


def official_available():
    """True, or the reason the official package cannot run."""
    import importlib.util
    missing = [m for m in ("torch", "rwkv") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {' and '.join(missing)} (pip install rwkv torch)"
    return True


def environments(both_openblas, base=None):
    """[(label, env)]: the environment as it is, and (with both_openblas) the same without
    OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE (both together). When neither is set the second
    would be the same run, so it is left out and a note says so."""
    base = dict(os.environ if base is None else base)
    now = ", ".join(f"{v}={base[v]}" if v in base else f"{v} unset" for v in OPENBLAS_VARS)
    passes = [(f"OpenBLAS settings as they are ({now})", base)]
    note = None
    if both_openblas:
        if any(v in base for v in OPENBLAS_VARS):
            unset = {k: v for k, v in base.items() if k not in OPENBLAS_VARS}
            passes.append(("OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE unset", unset))
        else:
            note = ("OPENBLAS_CORETYPE and OPENBLAS_L2_SIZE are both unset in this environment, so "
                    "the 'unset' pass would repeat the first: one pass only.")
    return passes, note


def benchmark(opts, both_openblas=False, env=None):
    """Run the benchmark (one or two passes) and return every raw number and summary as a dict.
    `env`: the environment of the child processes (default: this process's)."""
    machine = machine_info()
    passes, note = environments(both_openblas, env)
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tinyrwkv-bench-"))
    try:
        checkpoints = {}
        results = []
        for label, pass_env in passes:
            pass_env = {**pass_env, **_thread_env(opts.threads)}
            results.append(run_pass(opts, workdir, pass_env, label, checkpoints))
    finally:
        shutil.rmtree(workdir, ignore_errors=True)
    return {"machine": machine, "options": _options_dict(opts), "note": note,
            "passes": results, "checkpoints": checkpoints, "seconds": time.perf_counter() - t0}


def _thread_env(threads):
    """With --threads, every thread pool of the children gets it, whether or not a backend's
    loader takes a threads option."""
    if not threads:
        return {}
    n = str(threads)
    return {"OMP_NUM_THREADS": n, "OPENBLAS_NUM_THREADS": n, "MKL_NUM_THREADS": n,
            "NUMBA_NUM_THREADS": n}


def _options_dict(opts):
    d = asdict(opts)
    d["shapes"] = [s.name for s in opts.shapes]
    return d
