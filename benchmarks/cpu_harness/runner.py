"""The parent side of the CPU benchmark: plans the runs, starts a fresh child process for each
(worker.py), and summarises. It never imports torch, the official package or a backend."""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import asdict, replace
from pathlib import Path

from . import BUSY_CORES, CHECK_TOKENS, GB, OPENBLAS_VARS, THREAD_VARS, backend_setup
from .background import Background, active
from .machine import children_cpu_seconds, cpu_seconds, machine_info, mem_available_bytes
from .shapes import checkpoint_name, find_checkpoint


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
    result["returncode"] = proc.returncode
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
    busy_limit = busy_threshold(opts) if busy_limit is None else busy_limit
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


def busy_threshold(opts):
    """Cores other processes may use before a run counts as disturbed: a quarter of a core, plus
    the pass's own --busy processes (one core each)."""
    return BUSY_CORES + opts.busy


def limits_threads(opts):
    """Threads of the limits probes: the largest count of the sweep (None: the libraries' own)."""
    given = [t for t in opts.threads if t]
    return max(given) if given else None


def measure_limits(opts, workdir, env):
    """The machine's limits, in a child. Busy background processes (--busy) are stopped
    meanwhile: the limits are the quiet machine's in every pass."""
    bgs = active()
    for bg in bgs:
        bg.pause()
    try:
        wait_for_quiet(replace(opts, busy=0))
        t = limits_threads(opts)
        return run_child({"task": "limits", "quick": opts.quick, "threads": t},
                         workdir, {**env, **_thread_env(t)}, opts.timeout)
    finally:
        for bg in bgs:
            bg.resume()


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


def row_key(name, threads, opts):
    """A row of the measurement: the backend's name, with '@threads' in a thread sweep."""
    return f"{name}@{threads}" if opts.sweep else name


def _new_row(name, threads, shape, files, opts, available):
    """The record of one (backend, threads) row before its runs: what it reads, what decode
    reads per token, or why it cannot run."""
    kind, storage = backend_setup(name)
    row = {"name": name, "backend": kind, "weights": storage, "threads_asked": threads,
           "runs": [], "error": None, "skipped_prefill": {}, "discarded_busy": [], "notes": []}
    row["decode_bytes_per_token"] = shape.decode_bytes(storage)
    if kind == "official":
        row["checkpoint"] = files.get("pth")
        if available["official"] is not True:
            row["error"] = available["official"]
        elif not row["checkpoint"]:
            row["error"] = files.get("pth_error") or "the official package needs a .pth"
    elif kind == "llama":
        conv = files.get("gguf", {}).get(storage) or {}
        row["checkpoint"] = conv.get("path")
        if available["llama"] is not True:
            row["error"] = available["llama"]
        elif not conv.get("ok"):
            row["error"] = conv.get("error") or "no GGUF file"
        elif conv.get("decode_bytes"):
            row["decode_bytes_per_token"] = conv["decode_bytes"]     # exact, from the file
            row["decode_bytes_by_type"] = conv.get("decode_bytes_by_type")
        row["extra_bufts"] = {"on": True, "off": False}.get(opts.llama_extra_bufts)
        if opts.llama_extra_bufts == "off":
            row["notes"].append("loaded with use_extra_bufts=False (--llama-extra-bufts off): "
                                "no repacked CPU weight buffers")
    else:
        row["checkpoint"] = files.get("tinyrwkv")     # None: the shipped model, load() no path
    need = shape.counts()["params"] * 4 * 1.2     # float32 weights plus headroom
    free = mem_available_bytes()
    if row["error"] is None and free is not None and need > free:
        row["error"] = f"not run: needs about {need / GB:.1f} GB, {free / GB:.1f} GB available"
    return row


def _spec(row, shape, opts, prefill, workdir, key, first):
    spec = {"task": "measure", "backend": row["backend"], "storage": row["weights"],
            "checkpoint": row["checkpoint"], "vocab_size": shape.vocab_size,
            "seed": opts.seed, "warmup": opts.warmup, "decode_tokens": opts.decode_tokens,
            "prefill": prefill, "threads": row["threads_asked"],
            "batch": list(opts.batch) if row["backend"] in ("numpy", "numba") else [],
            "check_out": str(Path(workdir) / f"check-{shape.name}-{key}.npy") if first else None}
    if row["backend"] == "llama":
        spec["llama"] = {"extra_bufts": row.get("extra_bufts"),
                         "n_ctx": max([*opts.prefill, CHECK_TOKENS + opts.warmup
                                       + opts.decode_tokens]) + 64,
                         "n_batch": max([*opts.prefill, CHECK_TOKENS, 32])}
    return spec


# A child that died of one of these signals (llama.cpp's Q8_0 repacking on some AVX-512 hosts)
CRASH_SIGNALS = {-signal.SIGSEGV, -signal.SIGBUS, -signal.SIGILL, -signal.SIGABRT, -signal.SIGFPE}


def run_shape(shape, files, opts, workdir, env, available):
    """All runs of all backends (and thread counts) on one shape, interleaved. Returns
    {row key: record}."""
    rows = {}
    for name in opts.backends:
        for t in opts.threads:
            rows[row_key(name, t, opts)] = _new_row(name, t, shape, files, opts, available)

    first_prefill = {}      # (key, T) -> seconds of the first run
    for r in range(opts.runs):
        live = [k for k in rows if rows[k]["error"] is None]
        n = max(len(live), 1)
        for key in live[r % n:] + live[:r % n]:                # rotate the order every run
            row = rows[key]
            if row["error"] is not None:       # set meanwhile (e.g. another thread count's)
                continue
            prefill = []
            for T in opts.prefill:
                took = first_prefill.get((key, T))
                if r > 0 and took is not None and took > opts.prefill_budget:
                    row["skipped_prefill"][str(T)] = row["skipped_prefill"].get(str(T), 0) + 1
                else:
                    prefill.append(T)
            run_env = {**env, **_thread_env(row["threads_asked"])}
            for attempt in range(2 + opts.retry_busy):
                spec = _spec(row, shape, opts, prefill, workdir, key, not row["runs"])
                waited = wait_for_quiet(opts)
                result = run_child(spec, workdir, run_env, opts.timeout)
                result["waited_for_quiet_s"] = waited
                if (not result.get("ok") and row["backend"] == "llama"
                        and result.get("returncode") in CRASH_SIGNALS
                        and opts.llama_extra_bufts == "auto" and row.get("extra_bufts") is None):
                    note = (f"crashed ({result.get('error')}) with llama.cpp's repacked CPU "
                            f"buffers; rerun with use_extra_bufts=False (--llama-extra-bufts auto)")
                    _log(opts, f"{shape.name} {key}: {note}")
                    for other in rows.values():        # every thread count of this file
                        if other["name"] == row["name"]:
                            other["extra_bufts"] = False
                            other["notes"].append(note)
                    continue
                busy = result.get("machine_load", {}).get("other_cores") or 0.0
                if (not result.get("ok") or busy <= busy_threshold(opts)
                        or attempt >= opts.retry_busy):
                    break
                row["discarded_busy"].append(result)      # kept in the JSON, not in the medians
                _log(opts, f"{shape.name} run {r + 1}/{opts.runs} {key}: other processes used "
                           f"{busy:.2f} cores: run again (--retry-busy)")
            if not result.get("ok"):
                row["error"] = result.get("error")
                row["traceback"] = result.get("traceback")
                _log(opts, f"{shape.name} {key}: not available: {row['error']}")
                if not row["runs"] and str(row["error"]).startswith(("ValueError", "RuntimeError",
                                                                     "ImportError")):
                    for other in rows.values():   # refused by the loader: at any thread count
                        if other["name"] == row["name"] and other["error"] is None:
                            other["error"] = row["error"]
                continue
            for T, sec in result["prefill_s"].items():
                first_prefill.setdefault((key, int(T)), sec)
            row["runs"].append(result)
            pre = ", ".join(f"prefill@{T} {int(T) / sec:.1f} tok/s"
                            for T, sec in result["prefill_s"].items())
            bat = ", ".join(f"B{b} {x['tok_s']:.1f}" for b, x in (result.get("batch") or {}).items()
                            if isinstance(x, dict) and "tok_s" in x)
            busy = result.get("machine_load", {}).get("other_cores")
            _log(opts, f"{shape.name} run {r + 1}/{opts.runs} {key}: load {result['load_s']:.2f} s, "
                       f"decode {result['decode_tok_s']:.2f} tok/s" + (f", {pre}" if pre else "")
                       + (f", batched {bat} tok/s" if bat else "")
                       + (f"; other processes used {busy:.2f} cores" if busy is not None else ""))
    _check_logits(shape, rows, workdir)
    return rows


def _check_logits(shape, rows, workdir):
    """max|delta logit|/std of each row's validation logits against the official package's
    (or, without it, the numpy backend's): its first row that ran."""
    import numpy as np
    logits = {}
    for key in rows:
        path = Path(workdir) / f"check-{shape.name}-{key}.npy"
        if path.is_file() and rows[key]["runs"]:
            logits[key] = np.load(path).astype(np.float64)
    ref = next((k for k in logits if rows[k]["name"] == "official"), None) or \
        next((k for k in logits if rows[k]["name"] == "numpy"), None)
    for key, got in logits.items():
        rows[key]["finite"] = all(run.get("finite", False) for run in rows[key]["runs"])
        if ref is not None and key != ref:
            want = logits[ref]
            rows[key]["check"] = {"against": rows[ref]["name"],
                                  "max_abs_over_std": float(np.abs(got - want).max() / want.std())}


def _median(xs):
    xs = [x for x in xs if x is not None]
    return statistics.median(xs) if xs else None


def summarize(shape, rows, limits, opts):
    """Medians per row, ratios to the official package, fractions of the machine limits; in a
    thread sweep, also `best`: per backend, the row of its best decode tok/s (and `sweep`: every
    thread count's decode and prefill medians)."""
    counts = shape.counts()
    out = {}
    for key, row in rows.items():
        runs = row["runs"]
        if not runs:
            out[key] = {"error": row["error"] or "no successful run", "name": row["name"],
                        "threads_asked": row["threads_asked"], "notes": row["notes"]}
            continue
        s = {"name": row["name"], "weights": row["weights"], "runs": len(runs),
             "threads_asked": row["threads_asked"],
             "backend_reported": runs[0].get("backend_reported"),
             "threads": runs[0].get("threads"),
             "other_cores": [x.get("machine_load", {}).get("other_cores") for x in runs],
             "load_s": _median([x["load_s"] for x in runs]),
             "peak_rss_gb": max(x["peak_rss_gb"] for x in runs),
             "decode_tok_s": _median([x["decode_tok_s"] for x in runs]),
             "prefill_tok_s": {}, "prefill_runs": {},
             "error_in_later_run": row["error"], "notes": row["notes"],
             "extra_bufts": row.get("extra_bufts"), "llama_call": runs[0].get("llama_call")}
        for T in opts.prefill:
            vals = [T / x["prefill_s"][str(T)] for x in runs if str(T) in x["prefill_s"]]
            if vals:
                s["prefill_tok_s"][str(T)] = statistics.median(vals)
                s["prefill_runs"][str(T)] = len(vals)
        batch = {}
        for x in runs:
            for B, b in (x.get("batch") or {}).items():
                if B == "error" or B == "check":
                    continue
                batch.setdefault(B, []).append(b.get("tok_s"))
        if batch:
            s["batch_tok_s"] = {B: _median(v) for B, v in batch.items()}
        b0 = runs[0].get("batch") or {}
        if "error" in b0:
            s["batch_error"] = b0["error"]
        elif "check" in b0:
            s["batch_check"] = b0["check"]
        errs = {B: b["error"] for B, b in b0.items() if isinstance(b, dict) and "error" in b
                and B not in ("check",)}
        if errs:
            s["batch_errors"] = errs
        s["decode_bytes_per_token"] = row["decode_bytes_per_token"]
        s["prefill_flops_per_token"] = 2 * counts["body"]
        if limits.get("bandwidth_gb_s") and s["decode_tok_s"]:
            s["bandwidth_fraction"] = (s["decode_bytes_per_token"] * s["decode_tok_s"]
                                       / (limits["bandwidth_gb_s"] * GB))
        if limits.get("matmul_gflops"):
            s["matmul_fraction"] = {T: s["prefill_flops_per_token"] * v / (limits["matmul_gflops"] * 1e9)
                                    for T, v in s["prefill_tok_s"].items()}
        s["check"], s["finite"] = row.get("check"), row.get("finite")
        out[key] = s
    best = best_rows(out, opts)
    ref = out.get(best.get("official", ""))
    if ref and "error" not in ref:
        for key, s in out.items():
            if "error" in s:
                continue
            s["x_official"] = {"decode": ratio(s["decode_tok_s"], ref["decode_tok_s"])}
            for T, v in s["prefill_tok_s"].items():
                s["x_official"][T] = ratio(v, ref["prefill_tok_s"].get(T))
    return {"rows": out, "best": best, "sweep": sweep_table(out, opts) if opts.sweep else None}


def best_rows(summary, opts):
    """{backend name: row key}: the row shown in the main table. Without a sweep, the one row;
    with one, the thread count of the best median decode tok/s (a backend that ran at none: its
    first row, which says why)."""
    best = {}
    for name in opts.backends:
        keys = [row_key(name, t, opts) for t in opts.threads]
        ok = [k for k in keys if "error" not in summary[k] and summary[k]["decode_tok_s"]]
        best[name] = max(ok, key=lambda k: summary[k]["decode_tok_s"]) if ok else keys[0]
    return best


def sweep_table(summary, opts):
    """{backend: {threads: {"decode": tok/s, "prefill@T": tok/s, ...} or {"error": ...}}}."""
    table = {}
    for name in opts.backends:
        table[name] = {}
        for t in opts.threads:
            s = summary[row_key(name, t, opts)]
            if "error" in s:
                table[name][str(t)] = {"error": s["error"]}
            else:
                table[name][str(t)] = {"decode": s["decode_tok_s"],
                                       **{f"prefill@{T}": v for T, v in s["prefill_tok_s"].items()}}
    return table


def ratio(a, b):
    return a / b if a and b else None


def run_pass(opts, workdir, env, label, checkpoints, available):
    """One whole benchmark (limits + every shape) in the environment `env` of the children, with
    opts.busy background processes running throughout (started and stopped by the caller)."""
    t0 = time.perf_counter()
    _log(opts, f"pass '{label}': measuring the machine's limits")
    samples = [measure_limits(opts, workdir, env)]
    shapes = {}
    for shape in opts.shapes:
        if shape.name not in checkpoints:
            _log(opts, f"{shape.name}: preparing the checkpoint files ({shape.describe()})")
            checkpoints[shape.name] = prepare_files(shape, opts, workdir, env, available)
        files = checkpoints[shape.name]
        if not files.get("ok"):
            shapes[shape.name] = {"shape": asdict(shape), "error": files.get("error")}
            continue
        ts = time.perf_counter()
        rows = run_shape(shape, files, opts, workdir, env, available)
        shapes[shape.name] = {"shape": asdict(shape), "counts": shape.counts(),
                              "checkpoint": files, "rows": rows,
                              "seconds": time.perf_counter() - ts}
        if not opts.quick:                 # again after each shape: the machine may drift
            _log(opts, f"pass '{label}': measuring the machine's limits again")
            samples.append(measure_limits(opts, workdir, env))
    limits = combine_limits(samples)
    for name, sh in shapes.items():
        if "rows" in sh:
            sh["summary"] = summarize(shape_named(opts, name), sh["rows"], limits, opts)
    return {"label": label, "env": {v: env.get(v) for v in OPENBLAS_VARS}, "busy": opts.busy,
            "limits": limits, "limit_samples": samples, "shapes": shapes,
            "seconds": time.perf_counter() - t0}


def shape_named(opts, name):
    return next(s for s in opts.shapes if s.name == name)


def prepare_files(shape, opts, workdir, env, available):
    """The files one shape's rows read, made once per run (and kept with --cache-dir):

    * synthetic shapes: the seeded bf16 .pth (or, without torch, .safetensors), reused from the
      cache folder or written by a child process (so the parent never holds the weights nor
      imports torch); tinyrwkv and the official package read it;
    * the shipped shape: tinyrwkv rows call tinyrwkv.load() with no path; the official package
      gets a bf16 .pth written by `tinyrwkv convert` (the same numbers: the file is bf16);
    * llama.cpp rows: `tinyrwkv convert SOURCE NAME-TYPE.gguf --type TYPE` beside the .pth (the
      checkpoint's name plus the type), and the bytes of its tensors by type.
    """
    folder = Path(opts.cache_dir) if opts.cache_dir else Path(workdir)
    files = {"ok": True, "gguf": {}}
    if shape.source:
        src = Path(shape.source)
        digest = hashlib.sha256(src.read_bytes()).hexdigest()[:12]
        files.update(checkpoint=str(src), source=str(src), tinyrwkv=None, sha256_12=digest)
        if any(backend_setup(b)[0] == "official" for b in opts.backends):
            if available["official"] is True:
                conv = run_child({"task": "convert", "input": str(src), "type": "bf16",
                                  "output": str(folder / f"shipped-{digest}.pth")},
                                 workdir, env, opts.timeout)
                files["pth"] = conv.get("path") if conv.get("ok") else None
                files["pth_error"] = conv.get("error")
        stem = folder / f"shipped-{digest}"
    else:
        found = find_checkpoint(shape, opts.seed, folder)
        if found is not None:
            made = {"ok": True, "checkpoint": str(found), "reused": True,
                    "bytes": found.stat().st_size}
        else:
            made = run_child({"task": "make", "shape": asdict(shape), "seed": opts.seed,
                              "folder": str(folder)}, workdir, env, opts.timeout)
        if not made.get("ok"):
            return made
        files.update(made)
        path = made["checkpoint"]
        files["tinyrwkv"] = path
        files["pth"] = path if path.endswith(".pth") else None
        files["pth_error"] = None if files["pth"] else \
            "the official package needs a .pth (torch is not installed)"
        src = Path(path)
        stem = folder / checkpoint_name(shape, opts.seed, "")
    types = [backend_setup(b)[1] for b in opts.backends if backend_setup(b)[0] == "llama"]
    for t in types if available["llama"] is True else ():
        _log(opts, f"{shape.name}: GGUF {t} (tinyrwkv convert)")
        files["gguf"][t] = run_child({"task": "convert", "input": str(src), "type": t,
                                      "output": f"{stem}-{t}.gguf"}, workdir, env, opts.timeout)
    return files


def official_available():
    """True, or the reason the official package cannot run."""
    import importlib.util
    missing = [m for m in ("torch", "rwkv") if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {' and '.join(missing)} (pip install rwkv torch)"
    return True


def llama_available():
    """True, or the reason the llama.cpp rows cannot run: llama-cpp-python runs the files, gguf
    (gguf-py) is what tinyrwkv's converter writes them with."""
    import importlib.util
    missing = [d for m, d in (("llama_cpp", "llama-cpp-python"), ("gguf", "gguf"))
               if importlib.util.find_spec(m) is None]
    if missing:
        return f"not installed: {' and '.join(missing)} (pip install llama-cpp-python gguf)"
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


def load_levels(opts):
    """The background loads to run each environment with: [0] (quiet), [N] (--busy N), or with
    --load both [0, max(N, 1)]."""
    if opts.load == "both":
        return [0, max(opts.busy, 1)]
    if opts.load == "busy":
        return [max(opts.busy, 1)]
    return [opts.busy]


def _load_label(n):
    if n == 0:
        return "quiet"
    return f"{n} busy background process{'es' if n > 1 else ''}"


def benchmark(opts, both_openblas=False, env=None):
    """Run the benchmark (one pass per OpenBLAS environment and background load) and return every
    raw number and summary as a dict. `env`: the environment of the child processes (default:
    this process's). Background processes (--busy, --load) are stopped when a pass ends, also on
    an exception, Ctrl-C or SIGTERM (and at interpreter exit)."""
    machine = machine_info()
    passes, note = environments(both_openblas, env)
    levels = load_levels(opts)
    available = {"official": official_available(), "llama": llama_available()}
    t0 = time.perf_counter()
    workdir = Path(tempfile.mkdtemp(prefix="tinyrwkv-bench-"))
    old_term = signal.getsignal(signal.SIGTERM)
    signal.signal(signal.SIGTERM, _sigterm)
    try:
        if any(backend_setup(b)[0] == "llama" for b in opts.backends):
            if available["llama"] is True:
                info = run_child({"task": "llama_info"}, workdir, dict(os.environ), opts.timeout)
                machine["llama"] = info if info.get("ok") else {"error": info.get("error")}
            else:
                machine["llama"] = {"error": available["llama"]}
        checkpoints = {}
        results = []
        for label, pass_env in passes:
            for n_busy in levels:
                pass_opts = replace(opts, busy=n_busy)
                full = label if len(levels) == 1 and n_busy == 0 else f"{label}; {_load_label(n_busy)}"
                with Background(n_busy, workdir, log=lambda m: _log(opts, m)) as bg:
                    result = run_pass(pass_opts, workdir, pass_env, full, checkpoints, available)
                result["background"] = bg.report()
                result["parts"] = [label, _load_label(n_busy)]
                results.append(result)
    finally:
        signal.signal(signal.SIGTERM, old_term)
        shutil.rmtree(workdir, ignore_errors=True)
    return {"machine": machine, "options": _options_dict(opts), "note": note,
            "available": available, "passes": results, "checkpoints": checkpoints,
            "seconds": time.perf_counter() - t0}


def _sigterm(signum, frame):
    """SIGTERM ends the benchmark as Ctrl-C does: the finally blocks stop the background
    processes and remove the temporary folder."""
    raise SystemExit(128 + signum)


def _thread_env(threads):
    """With --threads, every thread pool of the child gets its count, whether or not a backend's
    loader takes a threads option (in a sweep: each run its own count)."""
    if not threads:
        return {}
    return {v: str(threads) for v in THREAD_VARS}


def _options_dict(opts):
    d = asdict(opts)
    d["shapes"] = [s.name for s in opts.shapes]
    return d
