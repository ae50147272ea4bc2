"""The CPU benchmark's report: markdown tables from the runner's results."""

from __future__ import annotations

import statistics

from . import BUSY_CORES, CHECK_TOKENS, check_tol
from .runner import ratio, row_key, shape_named

SHORT = {"float32": "fp32", "bfloat16": "bf16", "float16": "fp16", "int8": "int8 (Q8_0 blocks)",
         "f32": "GGUF F32", "f16": "GGUF F16", "q8_0": "GGUF Q8_0"}


def _fmt_rate(x):
    if x is None:
        return "-"
    return f"{x:.0f}" if x >= 100 else f"{x:.1f}" if x >= 10 else f"{x:.2f}"


def _fmt_ratio(x):
    return "-" if x is None else f"{x:.2f}"


def _fmt_pct(x):
    return "-" if x is None else f"{100 * x:.0f}%" if x >= 0.1 else f"{100 * x:.1f}%"


def format_header(machine, result):
    env = ", ".join(f"{k}={v if v is not None else '(unset)'}" for k, v in result["env"].items())
    lim = result["limits"]
    v = machine["versions"]
    lines = [f"## {result['label']}", "",
             f"- machine: {machine['cpu']}, {machine['logical_cores']} logical cores "
             f"({machine['physical_cores'] or '?'} physical, {machine['usable_cores']} usable), "
             f"{(machine['memory_gb'] or 0):.1f} GB RAM; {machine['os']}",
             f"- software: Python {machine['python']}, tinyrwkv {v['tinyrwkv']}, numpy {v['numpy']}, "
             f"numba {v['numba']}, torch {v['torch']}, rwkv {v['rwkv']}"
             + (f", llama-cpp-python {v['llama-cpp-python']}, gguf {v['gguf']}"
                if "llama" in machine else ""),
             f"- OpenBLAS environment of the runs: {env}"]
    llama = machine.get("llama")
    if llama:
        lines.append("- llama.cpp: " + (f"not available: {llama['error']}" if "error" in llama else
                                        f"llama_print_system_info(): {llama['system_info'].strip()}"))
    bg = result.get("background") or {}
    if bg.get("processes"):
        rates = ", ".join(f"{r / 1e6:.2f}" for r in bg["rates"]) or "none reported"
        shares = ", ".join(f"{x:.2f}" for x in bg["cpu_shares"]) or "-"
        solo = bg.get("solo_rate")
        lines.append(f"- background load: {bg['processes']} busy process(es) ({bg['kind']}) for the "
                     f"whole pass ({bg['wall_s'] / 60:.1f} min; stopped during the {bg['paused_s']:.0f} s "
                     f"of limit probes): {rates} M iterations/s each"
                     + (f" (alone: {solo / 1e6:.2f})" if solo else "")
                     + f", CPU share {shares} (1.0 = a whole core)")
    else:
        lines.append("- background load: none (a quiet pass: only other users' processes, "
                     "measured per run below)")
    blas = lim.get("numpy_blas") or {}
    if blas and "error" not in blas:
        lines.append(f"- NumPy BLAS (build): {blas.get('name')} {blas.get('version')} "
                     f"({' '.join((blas.get('openblas configuration') or '').split())})")
    pools = (lim.get("threads") or {}).get("threadpools")
    if pools:
        lines.append("- BLAS at run time (threadpoolctl): " + "; ".join(
            f"{p['internal_api']} {p.get('version') or ''} kernel {p.get('architecture') or '?'}, "
            f"{p['num_threads']} threads ({p['file']})" for p in pools if p["user_api"] == "blas"))
    elif pools is None:
        lines.append("- BLAS at run time: unknown (pip install threadpoolctl to see the kernel "
                     "OpenBLAS chose)")
    if lim.get("torch_blas"):
        lines.append(f"- torch BLAS: {lim['torch_blas']}")
    if "error" in lim:
        lines.append(f"- machine limits: not measured: {lim['error']}")
    else:
        bw = ", ".join(f"{k} {x:.1f}" for k, x in lim["bandwidth_by"].items())
        mm = ", ".join(f"{k} {x:.0f}" for k, x in lim["matmul_by"].items())
        n = lim["gemm_n"]
        lines.append(f"- memory bandwidth: **{lim['bandwidth_gb_s']:.1f} GB/s**, the best of: {bw} "
                     f"GB/s (matvec: {lim['matvec_bytes'] / 2 ** 20:.0f} MiB float32 matrix; "
                     f"copy: {lim['copy_bytes'] / 2 ** 20:.0f} MiB, read + write counted; "
                     f"sum: the same array, read)")
        lines.append(f"- matmul rate: **{lim['matmul_gflops']:.0f} GFLOP/s**, the best of: {mm} "
                     f"GFLOP/s (float32 GEMM {n}x{n}x{n})")
        d = lim["drift"]
        if len(d) > 1:
            bws, mms = [x["bandwidth_gb_s"] for x in d], [x["matmul_gflops"] for x in d]
            lines.append(f"- limits are the best repetition over {len(d)} measurements during the pass; "
                         f"the best of each measurement ranged {min(bws):.1f}-{max(bws):.1f} GB/s and "
                         f"{min(mms):.0f}-{max(mms):.0f} GFLOP/s"
                         + (" (the machine's speed drifted)" if max(mms) > 1.3 * min(mms)
                            or max(bws) > 1.3 * min(bws) else ""))
    return "\n".join(lines)


def best_values(summary, name, opts):
    """One backend's numbers as the main table shows them: {"decode": (tok/s, threads, row),
    T: (tok/s, threads, row)}; each at its best thread count in a sweep, else the one row."""
    rows = summary["rows"]
    keys = [row_key(name, t, opts) for t in opts.threads]
    ok = [k for k in keys if "error" not in rows[k]]
    out = {}
    for metric in ["decode", *map(str, opts.prefill)]:
        get = (lambda k: rows[k]["decode_tok_s"]) if metric == "decode" else \
            (lambda k, T=metric: rows[k]["prefill_tok_s"].get(T))
        have = [k for k in ok if get(k)]
        if have:
            k = max(have, key=get)
            out[metric] = (get(k), rows[k]["threads_asked"], k)
    return out


def _weights_label(storage):
    return SHORT.get(storage, storage)


def format_shape(name, shape_result, opts, background=0):
    if "summary" not in shape_result:
        return f"### {name}\n\nnot run: {shape_result.get('error')}"
    shape = shape_named(opts, name)
    summary = shape_result["summary"]
    rows, best = summary["rows"], summary["best"]
    Ts = [str(T) for T in opts.prefill]
    long_T = Ts[-1] if Ts else None
    sweep = opts.sweep
    head = ["backend", "weights"] + (["threads"] if sweep else []) + \
        ["load s", "peak RSS GB", "decode tok/s", "x official"]
    for T in Ts:
        head += [f"prefill@{T} tok/s", "x official"]
    head += ["% bandwidth", f"% matmul@{long_T}" if long_T else "% matmul"]
    lines = [f"### {name}: {shape.describe()}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes, partial, extra_notes = [], [], []
    ref = best_values(summary, "official", opts) if "official" in opts.backends else {}
    for backend in opts.backends:
        key = best[backend]
        s = rows[key]
        weights = _weights_label(shape_result["rows"][key]["weights"])
        for note in dict.fromkeys(s.get("notes") or []):
            extra_notes.append(f"{backend}: {note}")
        if "error" in s:
            reason = str(s["error"]).replace("|", "/").splitlines()[0]
            cells = [backend, weights] + ([""] if sweep else []) + [f"not available: {reason}"]
            lines.append("| " + " | ".join(cells + [""] * (len(head) - len(cells))) + " |")
            continue
        vals = best_values(summary, backend, opts)
        label = backend
        got = s.get("backend_reported")
        kind = shape_result["rows"][key]["backend"]
        if kind in ("numpy", "numba") and got and got.split("-")[0] != kind:
            label += f" (ran {got}!)"
        check = s.get("check")
        tol = check_tol(shape_result["rows"][key]["weights"])
        if (check and check["max_abs_over_std"] > tol) or s.get("finite") is False:
            label += " CHECK FAILED"
        dec = vals.get("decode")
        cells = [label, weights] + ([str(dec[1]) if dec else "-"] if sweep else []) + \
            [f"{s['load_s']:.2f}", f"{s['peak_rss_gb']:.2f}",
             _fmt_rate(dec[0] if dec else None),
             _fmt_ratio(ratio(dec[0] if dec else None, (ref.get("decode") or (None,))[0]))]
        for T in Ts:
            v = vals.get(T)
            cell = _fmt_rate(v[0] if v else None)
            if v is not None:
                n = rows[v[2]]["prefill_runs"].get(T, 0)
                if n < rows[v[2]]["runs"]:
                    cell += f" (n={n})"
                if sweep and dec and v[1] != dec[1]:
                    cell += f" ({v[1]}t)"
            cells += [cell, _fmt_ratio(ratio(v[0] if v else None, (ref.get(T) or (None,))[0]))]
        lv = vals.get(long_T) if long_T else None
        cells += [_fmt_pct(s.get("bandwidth_fraction")),
                  _fmt_pct((rows[lv[2]].get("matmul_fraction") or {}).get(long_T) if lv else None)]
        lines.append("| " + " | ".join(cells) + " |")
        if check:
            flag = " (over its limit)" if check["max_abs_over_std"] > tol else ""
            notes.append(f"{backend} {check['max_abs_over_std']:.1e}{flag}")
        if s["runs"] < opts.runs:
            partial.append(f"{backend}: {s['runs']} of {opts.runs} runs succeeded; then "
                           f"{s.get('error_in_later_run')}")
    lines += [""] + partial if partial else []
    ok = {k: s for k, s in rows.items() if "error" not in s}
    if ok:
        s0 = next(iter(ok.values()))
        ref_name = next((s["check"]["against"] for s in ok.values() if s.get("check")), None)
        gb = {}
        for backend in opts.backends:
            r = shape_result["rows"][best[backend]]
            gb.setdefault(f"{r['decode_bytes_per_token'] / 1e9:.3g}", []).append(
                backend + (" (from the GGUF)" if r.get("decode_bytes_by_type") else ""))
        lines += ["",
                  f"Medians of {opts.runs} runs, each a fresh process, backends interleaved; peak "
                  f"RSS: the largest. Decode: {opts.decode_tokens} tokens after {opts.warmup} "
                  f"warm-up; prefill: zero state, last-position logits."
                  + (f" Threads {', '.join(map(str, opts.threads))}: each backend at its best "
                     f"decode thread count (column threads); a prefill cell measured best at "
                     f"another count says which ((8t)); % bandwidth at the decode count, "
                     f"% matmul at the prefill's." if sweep else "")
                  + " % bandwidth: decode GB/token x decode tok/s / bandwidth, GB/token: "
                  + "; ".join(f"{', '.join(b)} {g}" for g, b in gb.items())
                  + f". % matmul: {s0['prefill_flops_per_token'] / 1e9:.3g} GFLOP/token x "
                  f"prefill tok/s / matmul rate."]
        if any(n < s["runs"] for s in ok.values() for n in s["prefill_runs"].values()):
            lines.append(f"(n=k): fewer runs, because the first run of that length took longer "
                         f"than --prefill-budget {opts.prefill_budget:.0f} s.")
        busy = [(c, k, i + 1) for k, s in ok.items()
                for i, c in enumerate(s["other_cores"]) if c is not None]
        if busy:
            worst = max(busy)
            limit = BUSY_CORES + background
            own = (f", this pass's {background} busy background process"
                   f"{'es' if background > 1 else ''} included" if background else "")
            lines.append(f"Other processes on the machine used {statistics.mean(c for c, _, _ in busy):.2f} "
                         f"cores on average during the runs (most: {worst[0]:.2f}, {worst[1]} "
                         f"run {worst[2]}{own})"
                         + (": numbers are noisy, rerun on a quiet machine" if worst[0] > limit
                            else "") + ".")
        dropped = {k: len(r["discarded_busy"]) for k, r in shape_result["rows"].items()
                   if r["discarded_busy"]}
        if dropped:
            lines.append("Runs repeated because other processes were busy (--retry-busy; kept in "
                         "the JSON, not in the medians): "
                         + ", ".join(f"{b} {n}" for b, n in dropped.items()) + ".")
        pools = [f"{best[b]}: {_pools_text(rows[best[b]])}" for b in opts.backends
                 if "error" not in rows[best[b]]]
        lines.append("Thread pools at run time: " + "; ".join(pools) + ".")
        calls = {rows[best[b]].get("llama_call") for b in opts.backends
                 if "error" not in rows[best[b]] and rows[best[b]].get("llama_call")}
        if calls:
            lines.append("llama.cpp: " + "; ".join(sorted(calls)) + ".")
        if ref_name and notes:
            lines.append(f"Validation, max|delta logit|/std against {ref_name} ({CHECK_TOKENS}-token "
                         f"prefill and one decode step; limits: {_tol_text(opts)}): "
                         + ", ".join(notes) + ".")
    lines += extra_notes and [""] + [f"Note: {n}" for n in extra_notes]
    if sweep:
        lines += ["", format_sweep(summary, opts)]
    if opts.batch:
        lines += ["", format_batch(summary, opts)]
    return "\n".join(lines)


def _tol_text(opts):
    from . import backend_setup
    tols = {}
    for b in opts.backends:
        tols.setdefault(f"{check_tol(backend_setup(b)[1]):g}", []).append(b)
    return "; ".join(f"{', '.join(b)} {t}" for t, b in tols.items())


def format_sweep(summary, opts):
    """decode tok/s (and the longest prefill's) of every backend at every thread count."""
    Ts = [str(T) for T in opts.prefill]
    metrics = ["decode"] + ([f"prefill@{Ts[-1]}"] if Ts else [])
    head = ["backend", "tok/s"] + [f"{t} thread{'s' if t != 1 else ''}" for t in opts.threads]
    lines = ["Thread sweep (medians; the best of each line in bold):", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    for name in opts.backends:
        per = summary["sweep"][name]
        for m in metrics:
            vals = {t: (per[str(t)].get(m) if "error" not in per[str(t)] else None)
                    for t in opts.threads}
            if all(v is None for v in vals.values()):
                if m == "decode":
                    err = next((per[str(t)]["error"] for t in opts.threads if "error" in per[str(t)]),
                               "no result")
                    lines.append(f"| {name} | {m} | not available: "
                                 f"{str(err).splitlines()[0].replace('|', '/')} |"
                                 + " |" * (len(opts.threads) - 1))
                continue
            top = max(v for v in vals.values() if v is not None)
            cells = [f"**{_fmt_rate(v)}**" if v == top else _fmt_rate(v) for v in vals.values()]
            lines.append(f"| {name} | {m} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def format_batch(summary, opts):
    """Aggregate tok/s of batched decode (model.forward_batch) per batch size, tinyrwkv rows, at
    each backend's best decode thread count."""
    head = ["backend"] + [f"B={b} tok/s" for b in opts.batch] + ["single-state decode tok/s"]
    lines = ["Batched decode: B states advanced together by model.forward_batch; aggregate tok/s "
             "= B x steps / time (median of runs; x: / the single-state decode of the same row):",
             "", "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    checks = []
    for name in opts.backends:
        s = summary["rows"][summary["best"][name]]
        if name.split("-")[0] not in ("numpy", "numba"):
            continue
        if "error" in s:
            lines.append(f"| {name} | not available: {str(s['error']).splitlines()[0]} |"
                         + " |" * len(opts.batch))
            continue
        if "batch_error" in s:
            lines.append(f"| {name} | not available: {s['batch_error'].replace('|', '/')} |"
                         + " |" * len(opts.batch))
            continue
        bt = s.get("batch_tok_s") or {}
        errs = s.get("batch_errors") or {}
        cells = []
        for b in opts.batch:
            v = bt.get(str(b))
            cells.append(f"{_fmt_rate(v)} ({_fmt_ratio(ratio(v, s['decode_tok_s']))}x)" if v
                         else f"failed: {errs.get(str(b), '-')}")
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {_fmt_rate(s['decode_tok_s'])} |")
        if s.get("batch_check"):
            checks.append(f"{name} {s['batch_check']['max_abs_over_std']:.1e} "
                          f"(B={s['batch_check']['B']})")
    if checks:
        lines += ["", "forward_batch against separate forward() calls, max|delta logit|/std: "
                  + ", ".join(checks) + "."]
    return "\n".join(lines)


def _pools_text(s):
    """'numba x2, openblas 0.3.30 SkylakeX x2, ...' for one backend's first run."""
    t = s.get("threads") or {}
    parts = []
    if "numba_threads" in t:
        parts.append(f"numba x{t['numba_threads']}")
    if "torch_threads" in t:
        parts.append(f"torch ({t.get('torch_blas') or 'its BLAS'}) x{t['torch_threads']}")
    if "llama_threads" in t:
        parts.append(f"llama.cpp x{t['llama_threads']}")
    for p in t.get("threadpools") or []:
        if p["user_api"] == "blas":
            parts.append(f"{p['internal_api']} {p.get('version') or ''} "
                         f"{p.get('architecture') or ''} x{p['num_threads']}".replace("  ", " "))
    if t.get("threadpools") is None:
        parts.append("BLAS unknown (no threadpoolctl)")
    return ", ".join(parts)


def format_pass(machine, result, opts):
    parts = [format_header(machine, result)]
    parts += [format_shape(name, sh, opts, result.get("busy", 0))
              for name, sh in result["shapes"].items()]
    parts.append(f"(pass took {result['seconds'] / 60:.1f} min)")
    return "\n\n".join(parts)


def format_report(report, opts):
    parts = [format_pass(report["machine"], p, opts) for p in report["passes"]]
    if report.get("note"):
        parts.append(f"Note: {report['note']}")
    for p in report["passes"][1:]:
        parts.append(_format_comparison(report["passes"][0], p, opts))
    parts.append(f"Total time: {report['seconds'] / 60:.1f} min.")
    return "\n\n".join(parts)


def _format_comparison(a, b, opts):
    """tok/s of pass b / pass a, per shape and backend at its best thread count (>1: faster in
    b)."""
    la, lb = a.get("parts") or [a["label"]], b.get("parts") or [b["label"]]
    differ = [(x, y) for x, y in zip(la, lb) if x != y] or [(a["label"], b["label"])]
    title = "; ".join(f"{y} / {x}" for x, y in differ)
    lines = [f"## {title} (tok/s ratio, each backend at its best thread count)", ""]
    for name, sa in a["shapes"].items():
        sb = b["shapes"].get(name, {})
        if "summary" not in sa or "summary" not in sb:
            continue
        for backend in opts.backends:
            xa, xb = best_values(sa["summary"], backend, opts), best_values(sb["summary"], backend, opts)
            parts = [f"{m if m == 'decode' else 'prefill@' + m} "
                     f"{_fmt_ratio(ratio(xb[m][0], xa[m][0]))}" for m in xa if m in xb]
            if parts:
                lines.append(f"- {name} {backend}: " + ", ".join(parts))
    return "\n".join(lines)


def format_markdown(report, opts, full_text, argv):
    """--markdown-out: per pass, one compact table in the layout of README.md's speed section
    (shape | backend | weights | threads | load s | peak RSS GB | decode tok/s (x official) |
    prefill tok/s (x official) ... | % bandwidth), then the full report."""
    m = report["machine"]
    out = ["# tinyrwkv CPU benchmark", "",
           f"`python benchmarks/bench_cpu.py {' '.join(argv)}` on {m['cpu']}, "
           f"{m['usable_cores']} usable cores, {(m['memory_gb'] or 0):.0f} GB; "
           f"total {report['seconds'] / 60:.1f} min.", ""]
    Ts = [str(T) for T in opts.prefill]
    for p in report["passes"]:
        lim = p["limits"]
        out += [f"## {p['label']}", ""]
        if "error" not in lim:
            out += [f"Machine limits measured in the run: {lim['matmul_gflops']:.0f} GFLOP/s float32 "
                    f"GEMM, memory bandwidth {lim['bandwidth_gb_s']:.1f} GB/s (best probe).", ""]
        head = ["shape", "backend", "weights", "threads", "load s", "peak RSS GB", "decode tok/s"]
        head += [f"prefill T={T} tok/s" for T in Ts] + ["% bandwidth"]
        out += ["| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
        for name, sh in p["shapes"].items():
            if "summary" not in sh:
                continue
            shape = shape_named(opts, name)
            first = f"{name} (L{shape.n_layer} C{shape.n_embd})"
            summary = sh["summary"]
            ref = best_values(summary, "official", opts) if "official" in opts.backends else {}
            order = (["official"] if "official" in opts.backends else []) + \
                [b for b in opts.backends if b != "official"]
            for backend in order:
                s = summary["rows"][summary["best"][backend]]
                if "error" in s:
                    continue
                vals = best_values(summary, backend, opts)

                def cell(metric):
                    v = vals.get(metric)
                    if not v:
                        return "-"
                    r = ratio(v[0], (ref.get(metric) or (None,))[0])
                    text = _fmt_rate(v[0])
                    if r and backend != "official":
                        text += f" ({r:.2f}x)"
                    if opts.sweep and metric != "decode" and v[1] != vals["decode"][1]:
                        text += f" @{v[1]}t"
                    return text
                threads = vals["decode"][1] if "decode" in vals else None
                if threads is None:
                    t = s.get("threads") or {}
                    threads = t.get("numba_threads") or t.get("torch_threads") or \
                        t.get("llama_threads") or "default"
                out.append("| " + " | ".join(
                    [first, backend.split("-")[0] if backend.split("-")[0] != "llama" else "llama.cpp",
                     _weights_label(sh["rows"][summary["best"][backend]]["weights"]), str(threads),
                     f"{s['load_s']:.2f}", f"{s['peak_rss_gb']:.2f}", cell("decode")]
                    + [cell(T) for T in Ts] + [_fmt_pct(s.get("bandwidth_fraction"))]) + " |")
                first = ""
        out.append("")
    out += ["Ratios are against the official package in the same pass.", "",
            "<details><summary>Full report</summary>", "", full_text, "", "</details>", ""]
    return "\n".join(out)
