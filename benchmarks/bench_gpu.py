"""GPU benchmark: tinyrwkv's cupy backend beside the official `rwkv` package's CUDA path.

    python benchmarks/bench_gpu.py                          # 0.1B, 1.5B, 7B; --runs 3
    python benchmarks/bench_gpu.py --shapes 0.1B --runs 2 --out gpu.json

Per shape (0.1B = L12 C768, 1.5B = L24 C2048, 7B = L32 C4096; V 65536, head size 64, F = 4C,
the released LoRA ranks), in a fresh process each:
  1. seeded synthetic weights, made on the GPU with torch (the statistics of
     tinyrwkv.synthetic.make_weights; Gaussian instead of orthogonal matrices, which makes no
     difference to speed), handed to both implementations: the official package through its own
     loader (torch.load is pointed at the in-memory dict, so no 30 GB file is written);
  2. the official package, RWKV_V7_ON=1 RWKV_CUDA_ON=1 (its CUDA WKV kernel), strategies
     'cuda fp16' and 'cuda fp32'; tinyrwkv with weights float16, bfloat16 and float32;
  3. validation before timing: logits of a 64-token prompt against the official fp32 run;
  4. decode tok/s (a loop of forward([token], state), synchronised; median of --runs loops of
     --decode-tokens tokens), prefill tok/s at T = 512 and 4096 (forward of the whole prompt,
     median of --runs), GPU memory (weights; peak during the T=4096 prefill);
  5. the WKV operator alone at the shape's heads and T = 4096: tinyrwkv's kernel, the official
     wkv7s kernel, and flash-linear-attention's chunk_rwkv7 when importable, with each one's
     deviation from tinyrwkv float32;
  6. the card's measured memory bandwidth (device-to-device copy, bytes read + written) and
     decode's fraction of it: bytes of weights read per token x tok/s / bandwidth.
Prints one table at the end; --out writes every number as JSON.
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SHAPES = {"0.1B": (12, 768), "0.4B": (24, 1024), "1.5B": (24, 2048), "2.9B": (32, 2560),
          "7B": (32, 4096)}
VOCAB = 65536


# ---------------------------------------------------------------------------------------------
# weights
# ---------------------------------------------------------------------------------------------

def synthetic_weights(L, C, V=VOCAB, N=64, seed=0):
    """make_weights' statistics, generated on the GPU with torch (float32, stored shapes)."""
    import torch
    sys.path.insert(0, str(ROOT))
    from tinyrwkv.synthetic import lora_ranks
    g = torch.Generator(device="cuda").manual_seed(seed)
    dev = dict(device="cuda", dtype=torch.float32)
    randn = lambda *s, scale=1.0: torch.randn(*s, generator=g, **dev) * scale
    H, F = C // N, 4 * C
    Dw, Da, Dv, Dg = lora_ranks(C)
    n = torch.arange(C, **dev)
    ddd, lin = n / C, n / (C - 1) - 0.5
    zz = ((n % N) - (N - 1) / 2) / ((N - 1) / 2)
    zigzag = zz * zz.abs()
    vec = lambda a: a.reshape(1, 1, -1)
    mat = lambda rows, cols, gain: randn(rows, cols, scale=gain / min(rows, cols) ** 0.5)
    small = lambda rows, cols: randn(rows, cols, scale=0.3 / rows ** 0.5)
    w = {"emb.weight": (torch.rand(V, C, generator=g, **dev) - 0.5) * 2e-4,
         "blocks.0.ln0.weight": 1 + randn(C, scale=0.1), "blocks.0.ln0.bias": randn(C, scale=0.1)}
    for i in range(L):
        r01, r10 = i / max(L - 1, 1), 1 - i / L
        www = -6 + 6 * (n / (C - 1)) ** (1 + r01 ** 0.3)
        b = f"blocks.{i}."
        w.update({
            b + "ln1.weight": 1 + randn(C, scale=0.1), b + "ln1.bias": randn(C, scale=0.1),
            b + "ln2.weight": 1 + randn(C, scale=0.1), b + "ln2.bias": randn(C, scale=0.1),
            **{b + f"att.x_{c}": vec(1 - ddd ** (e * r10) + randn(C, scale=0.02))
               for c, e in zip("rwkvag", (0.2, 0.9, 0.7, 0.7, 0.9, 0.2))},
            b + "att.w0": vec(www + 0.5 + 2.5 * zigzag + randn(C, scale=0.3)),
            b + "att.w1": small(C, Dw), b + "att.w2": mat(Dw, C, 0.1),
            b + "att.a0": vec(-0.19 + 0.3 * zigzag + 0.4 * lin + randn(C, scale=0.3)),
            b + "att.a1": small(C, Da), b + "att.a2": mat(Da, C, 0.1),
            b + "att.v0": vec(0.73 - 0.4 * lin + randn(C, scale=0.3)),
            b + "att.v1": small(C, Dv), b + "att.v2": mat(Dv, C, 0.1),
            b + "att.g1": small(C, Dg), b + "att.g2": mat(Dg, C, 0.1),
            b + "att.k_k": vec(0.71 - 0.1 * lin + randn(C, scale=0.02)),
            b + "att.k_a": vec(1.02 + randn(C, scale=0.02)),
            b + "att.r_k": -0.04 + randn(H, N, scale=0.3),
            b + "att.receptance.weight": mat(C, C, 1.0),
            b + "att.key.weight": mat(C, C, 0.1) + small(C, C) * 0.3,
            b + "att.value.weight": mat(C, C, 1.0),
            b + "att.output.weight": small(C, C),
            b + "att.ln_x.weight": ((1 + i) / L) ** 0.7 + randn(C, scale=0.1),
            b + "att.ln_x.bias": randn(C, scale=0.1),
            b + "ffn.x_k": vec(1 - ddd ** (r10 ** 4) + randn(C, scale=0.02)),
            b + "ffn.key.weight": mat(F, C, 1.0),
            b + "ffn.value.weight": small(C, F),
        })
    w.update({"ln_out.weight": 1 + randn(C, scale=0.1), "ln_out.bias": randn(C, scale=0.1),
              "head.weight": mat(V, C, 0.5 * (V / C) ** 0.5)})
    return w


# ---------------------------------------------------------------------------------------------
# timing
# ---------------------------------------------------------------------------------------------

def sync():
    import cupy
    import torch
    torch.cuda.synchronize()
    cupy.cuda.Device().synchronize()


def timed(fn, runs):
    """Median wall time of `runs` calls (device synchronised before and after each)."""
    times = []
    for _ in range(runs):
        sync()
        t0 = time.perf_counter()
        fn()
        sync()
        times.append(time.perf_counter() - t0)
    return statistics.median(times), times


def bandwidth():
    """Device-to-device copy of 2 GiB, bytes read + written per second (median of 10)."""
    import cupy
    a = cupy.empty(2 << 30, cupy.uint8)
    b = cupy.empty_like(a)
    b[...] = a
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    times = []
    for _ in range(10):
        start.record()
        b[...] = a
        end.record()
        end.synchronize()
        times.append(cupy.cuda.get_elapsed_time(start, end) / 1e3)
    del a, b
    cupy.get_default_memory_pool().free_all_blocks()
    return 2 * (2 << 30) / statistics.median(times)


def rel(a, b):
    import numpy as np
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / b.std())


# ---------------------------------------------------------------------------------------------
# one shape (runs in its own process)
# ---------------------------------------------------------------------------------------------

def official_model(weights, strategy):
    import torch
    import rwkv.model as official
    real_load = torch.load
    torch.load = lambda *args, **kwargs: dict(weights)    # the loader deletes keys it has read
    try:
        return official.RWKV(model="synthetic", strategy=strategy)
    finally:
        torch.load = real_load


def run_shape(name, args):
    import cupy
    import numpy as np
    import torch
    sys.path.insert(0, str(ROOT))
    from tinyrwkv.backends.cupy_gpu import RWKV7CuPy
    L, C = SHAPES[name]
    rng = np.random.default_rng(0)
    prompt = rng.integers(1, VOCAB, 64).tolist()
    long_ids = {T: rng.integers(1, VOCAB, T).tolist() for T in args.prefill}
    res = {"shape": name, "L": L, "C": C, "rows": []}
    phase_start = [time.perf_counter()]
    weights = synthetic_weights(L, C)
    torch.cuda.synchronize()
    print(f"# {name}: weights made in {time.perf_counter() - phase_start[0]:.1f} s", flush=True)
    ref_logits = None

    def record(impl, decode_fn, prefill_fn, mem_weights, peak_fn, logits):
        row = {"impl": impl, "weights_GB": mem_weights / 1e9}
        if logits is not None and ref_logits is not None:
            row["dev_vs_official_fp32"] = rel(logits, ref_logits)
        n = args.decode_tokens
        t, ts = timed(lambda: decode_fn(n), args.runs)
        row["decode_tok_s"], row["decode_runs_s"] = n / t, ts
        for T in args.prefill:
            t, ts = timed(lambda: prefill_fn(long_ids[T]), args.runs)
            row[f"prefill{T}_tok_s"], row[f"prefill{T}_runs_s"] = T / t, ts
        row["peak_GB"] = peak_fn() / 1e9
        row["phase_s"] = time.perf_counter() - phase_start[0]
        phase_start[0] = time.perf_counter()
        res["rows"].append(row)
        print(json.dumps(row), flush=True)

    # ---- the official package ----
    if not args.no_official:
        for strategy in ("cuda fp32", "cuda fp16"):
            torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated()
            model = official_model(weights, strategy)
            torch.cuda.synchronize()
            mem = torch.cuda.memory_allocated() - before
            if strategy == "cuda fp32":
                # The validation reference: the official fp32 path with TF32 off (the package
                # turns TF32 on at import, which costs ~4e-3 in max|d|/std; timed as it ships).
                torch.backends.cuda.matmul.allow_tf32 = False
                ref_logits = model.forward(prompt, None)[0].float().cpu().numpy()
                torch.backends.cuda.matmul.allow_tf32 = True
            out, _ = model.forward(prompt, None)
            logits = out.float().cpu().numpy()

            def decode(n, model=model):
                state = None
                out, state = model.forward([1], state)
                for t in range(n):
                    out, state = model.forward([t % 1000 + 1], state)
            decode(4)                                      # JIT warm-up
            for T in args.prefill:
                model.forward(long_ids[T][:T], None)
            torch.cuda.reset_peak_memory_stats()
            base = torch.cuda.memory_allocated()
            record(f"official {strategy}", decode, lambda ids, model=model: model.forward(ids, None),
                   mem, lambda base=base, mem=mem: torch.cuda.max_memory_allocated() - base + mem,
                   logits)
            del model, decode
            gc.collect()
            torch.cuda.empty_cache()

    # ---- tinyrwkv ----
    pool = cupy.get_default_memory_pool()
    for wd in args.weights:
        pool.free_all_blocks()
        model = RWKV7CuPy(weights, storage=wd)
        logits, _ = model.forward(prompt)

        def decode(n, model=model):
            _, state = model.forward([1])
            for t in range(n):
                _, state = model.forward([t % 1000 + 1], state)
        decode(4)
        for T in args.prefill:
            model.forward(long_ids[T])
        record(f"tinyrwkv cupy {wd}", decode, lambda ids, model=model: model.forward(ids),
               model.weight_bytes, lambda: pool.total_bytes(), logits)
        # decode bytes per token: every weight except the embedding table (one row is read)
        if args.profile and wd == "float16":
            res["decode_profile_us"] = profile_decode(model)
            print("# decode profile (us per token):", json.dumps(res["decode_profile_us"]), flush=True)
        res["rows"][-1]["decode_bytes"] = model.weight_bytes - model.emb.nbytes
        res["rows"][-1]["launches_per_token"] = model.launches_per_token
        del model, decode                      # the closure holds the model too
        gc.collect()
        pool.free_all_blocks()

    # ---- the WKV operator alone ----
    res["wkv"] = wkv_operator(C // 64, args) if name in args.wkv_shapes.split(",") else {}
    return res


def profile_decode(model, reps=20):
    """Each launch of the decode graph timed alone (events, `reps` repeats), summed per kernel:
    where a token's time goes. (The state buffers drift meanwhile; only the time is used.)"""
    import cupy
    names = {id(f): n for n, f in model._k.items()}
    start, end = cupy.cuda.Event(), cupy.cuda.Event()
    total = {}
    with model.gpu, model.stream:
        for kernel, grid, block, a in model._decode_steps:
            start.record(model.stream)
            for _ in range(reps):
                kernel(grid, block, a)
            end.record(model.stream)
            end.synchronize()
            us = cupy.cuda.get_elapsed_time(start, end) * 1e3 / reps
            key = names.get(id(kernel), "?")
            total[key] = total.get(key, 0.0) + us
        # the whole graph, for comparison
        start.record(model.stream)
        for _ in range(reps):
            model._graph.launch(model.stream)
        end.record(model.stream)
        end.synchronize()
        total["graph (all)"] = cupy.cuda.get_elapsed_time(start, end) * 1e3 / reps
    return {k: round(v, 1) for k, v in total.items()}


def wkv_operator(H, args, T=4096, N=64):
    """The WKV recurrence alone on (T, H, N) inputs: tinyrwkv's kernel, official wkv7s, fla."""
    import cupy
    import numpy as np
    import torch
    from tinyrwkv.backends.cupy_gpu import _module
    C = H * N
    g = torch.Generator(device="cuda").manual_seed(1)
    rnd = lambda: torch.randn(T, C, generator=g, device="cuda")
    r, k, v = rnd(), rnd() * 0.3, rnd()
    w = torch.exp(-0.6065 * torch.sigmoid(rnd() * 2))               # decay in (0.545, 1)
    kh = torch.nn.functional.normalize(rnd().view(T, H, N), dim=-1).view(T, C)
    a = torch.sigmoid(rnd())
    S0 = torch.randn(H, N, N, generator=g, device="cuda") * 0.3
    out = {}

    kern = _module(N, "float32").get_function("wkv")
    cp = lambda t: cupy.asarray(t.contiguous())
    y = cupy.empty((T, C), cupy.float32)

    def ours():
        S = cp(S0.clone())
        kern((H,), (N,), (np.int32(T), np.int32(C), S, cp(r), cp(w), cp(k), cp(v), cp(kh), cp(a), y))
        return S
    ours()
    y_ref = torch.as_tensor(y, device="cuda").clone()
    t, _ = timed(ours, args.runs + 2)
    out["tinyrwkv fp32"] = {"ms": t * 1e3}

    try:
        import rwkv.model  # noqa: F401  (registers torch.ops.wkv7s when RWKV_CUDA_ON=1)
        w_off = torch.log(-torch.log(w))                              # decay = exp(-exp(w_off))
        for dt, op in ((torch.float32, torch.ops.wkv7s.forward_fp32),
                       (torch.float16, torch.ops.wkv7s.forward_fp16)):
            ins = [u.to(dt).contiguous() for u in (r, w_off, k, v, -kh, kh * a)]
            yo = torch.empty(T, C, device="cuda", dtype=dt)

            def official(ins=ins, yo=yo, op=op):
                S = S0.clone()
                op(1, T, C, H, S, *ins, yo)
            official()
            t, _ = timed(official, args.runs + 2)
            out[f"official wkv7s {str(dt)[6:]}"] = {"ms": t * 1e3, "dev": rel(yo.float().cpu(), y_ref.cpu())}
    except Exception as e:
        out["official wkv7s"] = {"error": repr(e)[:200]}

    try:
        from fla.ops.rwkv7 import chunk_rwkv7
        for dt in (torch.bfloat16,):          # fla's usual type (each type costs a Triton autotune)
            B = lambda u: u.view(1, T, H, N).to(dt).contiguous()
            ins = [B(r), B(torch.log(w)), B(k), B(v), B(-kh), B(kh * a)]
            S_kv = S0.transpose(1, 2).contiguous()[None]              # fla: [B, H, K, V]

            def fla(ins=ins):
                return chunk_rwkv7(*ins, scale=1.0, initial_state=S_kv.clone(),
                                   output_final_state=True)
            try:
                o, _ = fla()
                t, _ = timed(fla, args.runs + 2)
                out[f"fla chunk_rwkv7 {str(dt)[6:]}"] = {
                    "ms": t * 1e3, "dev": rel(o.float().view(T, C).cpu(), y_ref.cpu())}
            except Exception as e:
                out[f"fla chunk_rwkv7 {str(dt)[6:]}"] = {"error": repr(e)[:300]}
    except Exception as e:
        out["fla"] = {"error": repr(e)[:200]}
    return out


# ---------------------------------------------------------------------------------------------
# driver
# ---------------------------------------------------------------------------------------------

def table(results, bw):
    lines = []
    cols = ["shape", "implementation", "decode tok/s", "x off fp16", "BW %"] + \
           [f"prefill{T} tok/s" for T in results[0]["prefill"]] + ["weights GB", "peak GB", "dev"]
    lines.append("| " + " | ".join(cols) + " |")
    lines.append("|" + "---|" * len(cols))
    for res in results:
        base = next((r for r in res["rows"] if r["impl"] == "official cuda fp16"), None)
        for r in res["rows"]:
            ratio = f"{r['decode_tok_s'] / base['decode_tok_s']:.2f}x" if base else ""
            frac = f"{100 * r['decode_bytes'] * r['decode_tok_s'] / bw:.0f}%" if "decode_bytes" in r else ""
            pre = []
            for T in res["prefill"]:
                v = r[f"prefill{T}_tok_s"]
                b = f" ({v / base[f'prefill{T}_tok_s']:.2f}x)" if base else ""
                pre.append(f"{v:,.0f}{b}")
            dev = f"{r['dev_vs_official_fp32']:.1e}" if "dev_vs_official_fp32" in r else ""
            lines.append("| " + " | ".join([res["shape"], r["impl"], f"{r['decode_tok_s']:.1f}",
                                             ratio, frac, *pre, f"{r['weights_GB']:.2f}",
                                             f"{r['peak_GB']:.2f}", dev]) + " |")
    lines.append("dev: max|d|/std of the logits of a 64-token prompt against the official "
                 "package's cuda fp32 run with TF32 off (as shipped it turns TF32 on).")
    lines.append("")
    lines.append("| shape | WKV operator, T=4096 | ms | max|d|/std vs tinyrwkv fp32 |")
    lines.append("|---|---|---|---|")
    for res in results:
        for k, v in res["wkv"].items():
            lines.append(f"| {res['shape']} (H={res['C'] // 64}) | {k} | "
                         f"{v.get('ms', float('nan')):.2f} | {v.get('dev', v.get('error', ''))} |")
    return "\n".join(lines)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0],
                                 formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    ap.add_argument("--shapes", default="0.1B,1.5B,7B", help=f"of {', '.join(SHAPES)}")
    ap.add_argument("--runs", type=int, default=3, help="timed repetitions (median reported)")
    ap.add_argument("--decode-tokens", type=int, default=64, help="tokens per decode loop")
    ap.add_argument("--prefill", default="512,4096", help="prompt lengths for prefill")
    ap.add_argument("--weights", default="float16,bfloat16,float32", help="tinyrwkv storage types")
    ap.add_argument("--no-official", action="store_true", help="skip the official package")
    ap.add_argument("--wkv-shapes", default="7B",
                    help="shapes whose heads the WKV operator comparison uses (fla compiles and "
                         "autotunes its Triton kernels for each: minutes)")
    ap.add_argument("--out", help="write every number as JSON here")
    ap.add_argument("--profile", action="store_true",
                    help="also time each decode launch alone (float16), summed per kernel")
    ap.add_argument("--one", help=argparse.SUPPRESS)
    args = ap.parse_args()
    args.prefill = [int(t) for t in args.prefill.split(",")]
    args.weights = args.weights.split(",")
    os.environ.setdefault("RWKV_V7_ON", "1")
    os.environ.setdefault("RWKV_CUDA_ON", "1")
    os.environ.setdefault("RWKV_JIT_ON", "1")
    if args.one:                                   # child: one shape, JSON on the last line
        res = run_shape(args.one, args)
        res["prefill"] = args.prefill
        print("RESULT " + json.dumps(res), flush=True)
        return
    import cupy
    props = cupy.cuda.runtime.getDeviceProperties(0)
    bw = bandwidth()
    info = {"gpu": props["name"].decode(), "bandwidth_GBs": bw / 1e9,
            "cupy": cupy.__version__, "cuda_runtime": cupy.cuda.runtime.runtimeGetVersion()}
    print(json.dumps(info), flush=True)
    results = []
    for shape in args.shapes.split(","):
        cmd = [sys.executable, __file__, "--one", shape, "--runs", str(args.runs),
               "--decode-tokens", str(args.decode_tokens), "--prefill",
               ",".join(map(str, args.prefill)), "--weights", ",".join(args.weights),
               "--wkv-shapes", args.wkv_shapes] + (["--profile"] if args.profile else [])
        if args.no_official:
            cmd.append("--no-official")
        t0 = time.perf_counter()
        proc = subprocess.run(cmd, capture_output=True, text=True)
        sys.stdout.write(proc.stdout)
        print(f"shape {shape}: {time.perf_counter() - t0:.0f} s", flush=True)
        if proc.returncode != 0:
            print(f"shape {shape} failed:\n{proc.stderr[-4000:]}", flush=True)
            continue
        results.append(json.loads(proc.stdout.strip().splitlines()[-1][len("RESULT "):]))
    if args.out:
        Path(args.out).write_text(json.dumps({"machine": info, "results": results}, indent=1))
    print(f"\nGPU: {info['gpu']}; measured copy bandwidth {bw / 1e9:.0f} GB/s (read + write); "
          f"CuPy {info['cupy']}")
    if results:
        print(table(results, bw))


if __name__ == "__main__":
    main()
