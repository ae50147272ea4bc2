"""The CPU benchmark's report: markdown tables from the runner's results."""

from __future__ import annotations

import statistics

from . import BUSY_CORES, CHECK_TOL, GB
from .runner import ratio, shape_named


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
             f"numba {v['numba']}, torch {v['torch']}, rwkv {v['rwkv']}",
             f"- OpenBLAS environment of the runs: {env}"]
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


def format_shape(name, shape_result, opts):
    if "summary" not in shape_result:
        return f"### {name}\n\nnot run: {shape_result.get('error')}"
    shape = shape_named(opts, name)
    summary = shape_result["summary"]
    Ts = [str(T) for T in opts.prefill]
    long_T = Ts[-1] if Ts else None
    head = ["backend", "weights", "load s", "peak RSS GB", "decode tok/s", "x official"]
    for T in Ts:
        head += [f"prefill@{T} tok/s", "x official"]
    head += ["% bandwidth", f"% matmul@{long_T}" if long_T else "% matmul"]
    lines = [f"### {name}: {shape.describe()}", "",
             "| " + " | ".join(head) + " |", "|" + "|".join("---" for _ in head) + "|"]
    notes, partial = [], []
    for backend, s in summary.items():
        weights = shape_result["rows"][backend]["weights"]
        if "error" in s:
            reason = str(s["error"]).replace("|", "/").splitlines()[0]
            cells = [backend, weights, f"not available: {reason}"] + [""] * (len(head) - 3)
            lines.append("| " + " | ".join(cells) + " |")
            continue
        label = backend
        got = s.get("backend_reported")
        if backend != "official" and got and got not in (backend, shape_result["rows"][backend]["backend"]):
            label += f" (ran {got}!)"
        check = s.get("check")
        if (check and check["max_abs_over_std"] > CHECK_TOL) or s.get("finite") is False:
            label += " CHECK FAILED"
        xo = s.get("x_official", {})
        cells = [label, weights, f"{s['load_s']:.2f}", f"{s['peak_rss_gb']:.2f}",
                 _fmt_rate(s["decode_tok_s"]), _fmt_ratio(xo.get("decode"))]
        for T in Ts:
            v = s["prefill_tok_s"].get(T)
            n = s["prefill_runs"].get(T, 0)
            cell = _fmt_rate(v)
            if v is not None and n < s["runs"]:
                cell += f" (n={n})"
            cells += [cell, _fmt_ratio(xo.get(T))]
        cells += [_fmt_pct(s.get("bandwidth_fraction")),
                  _fmt_pct((s.get("matmul_fraction") or {}).get(long_T))]
        lines.append("| " + " | ".join(cells) + " |")
        if check:
            notes.append(f"{backend} {check['max_abs_over_std']:.1e}")
        if s["runs"] < opts.runs:
            partial.append(f"{backend}: {s['runs']} of {opts.runs} runs succeeded; then "
                           f"{s.get('error_in_later_run')}")
    lines += [""] + partial if partial else []
    ok = [s for s in summary.values() if "error" not in s]
    if ok:
        s0 = ok[0]
        ref = next((s["check"]["against"] for s in ok if s.get("check")), None)
        lines += ["",
                  f"Medians of {opts.runs} runs, each a fresh process, backends interleaved; peak "
                  f"RSS: the largest. Decode: {opts.decode_tokens} tokens after {opts.warmup} "
                  f"warm-up; prefill: zero state, last-position logits. "
                  f"% bandwidth: {shape.decode_bytes('float32') / GB:.3g} GB/token float32, "
                  f"{shape.decode_bytes('bfloat16') / GB:.3g} bf16, x decode tok/s / bandwidth; "
                  f"% matmul: {s0['prefill_flops_per_token'] / 1e9:.3g} GFLOP/token x prefill "
                  f"tok/s / matmul rate."]
        if any(n < s["runs"] for s in ok for n in s["prefill_runs"].values()):
            lines.append(f"(n=k): fewer runs, because the first run of that length took longer "
                         f"than --prefill-budget {opts.prefill_budget:.0f} s.")
        busy = [(c, b, i + 1) for b, s in summary.items() if "error" not in s
                for i, c in enumerate(s["other_cores"]) if c is not None]
        if busy:
            worst = max(busy)
            lines.append(f"Other processes on the machine used {statistics.mean(c for c, _, _ in busy):.2f} "
                         f"cores on average during the runs (most: {worst[0]:.2f}, {worst[1]} run "
                         f"{worst[2]})" + (": numbers are noisy, rerun on a quiet machine"
                                           if worst[0] > BUSY_CORES else "") + ".")
        dropped = {b: len(r["discarded_busy"]) for b, r in shape_result["rows"].items()
                   if r["discarded_busy"]}
        if dropped:
            lines.append("Runs repeated because other processes were busy (--retry-busy; kept in "
                         "the JSON, not in the medians): "
                         + ", ".join(f"{b} {n}" for b, n in dropped.items()) + ".")
        pools = [f"{b}: {_pools_text(s)}" for b, s in summary.items() if "error" not in s]
        lines.append("Thread pools at run time: " + "; ".join(pools) + ".")
        if ref and notes:
            lines.append(f"Validation, max|delta logit|/std against {ref} (16-token prefill and one "
                         f"decode step; limit {CHECK_TOL:g}): " + ", ".join(notes) + ".")
    return "\n".join(lines)


def _pools_text(s):
    """'numba x2, openblas 0.3.30 SkylakeX x2, ...' for one backend's first run."""
    t = s.get("threads") or {}
    parts = []
    if "numba_threads" in t:
        parts.append(f"numba x{t['numba_threads']}")
    if "torch_threads" in t:
        parts.append(f"torch ({t.get('torch_blas') or 'its BLAS'}) x{t['torch_threads']}")
    for p in t.get("threadpools") or []:
        if p["user_api"] == "blas":
            parts.append(f"{p['internal_api']} {p.get('version') or ''} "
                         f"{p.get('architecture') or ''} x{p['num_threads']}".replace("  ", " "))
    if t.get("threadpools") is None:
        parts.append("BLAS unknown (no threadpoolctl)")
    return ", ".join(parts)


def format_pass(machine, result, opts):
    parts = [format_header(machine, result)]
    parts += [format_shape(name, sh, opts) for name, sh in result["shapes"].items()]
    parts.append(f"(pass took {result['seconds'] / 60:.1f} min)")
    return "\n\n".join(parts)


def format_report(report, opts):
    parts = [format_pass(report["machine"], p, opts) for p in report["passes"]]
    if report.get("note"):
        parts.append(f"Note: {report['note']}")
    if len(report["passes"]) > 1:
        parts.append(_format_openblas_comparison(report))
    parts.append(f"Total time: {report['seconds'] / 60:.1f} min.")
    return "\n\n".join(parts)


def _format_openblas_comparison(report):
    """tok/s of the second pass / the first, per shape and backend (>1: faster with the
    OpenBLAS variables unset)."""
    a, b = report["passes"][:2]
    lines = ["## OpenBLAS variables unset / as they are (tok/s ratio)", ""]
    for name, sa in a["shapes"].items():
        sb = b["shapes"].get(name, {})
        for backend, xa in (sa.get("summary") or {}).items():
            xb = (sb.get("summary") or {}).get(backend, {})
            if "error" in xa or "error" in xb or not xb:
                continue
            parts = [f"decode {_fmt_ratio(ratio(xb['decode_tok_s'], xa['decode_tok_s']))}"]
            parts += [f"prefill@{T} {_fmt_ratio(ratio(xb['prefill_tok_s'].get(T), v))}"
                      for T, v in xa["prefill_tok_s"].items()]
            lines.append(f"- {name} {backend}: " + ", ".join(parts))
    return "\n".join(lines)
