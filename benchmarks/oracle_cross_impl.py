"""Other implementations against the float64 oracle, through the bridges (tinyrwkv/bridges): the
first edition's fixed tolerance and the calibrated one side by side.

    python benchmarks/oracle_cross_impl.py --shape 0.1B --tokens 128 [--impls official,llama.cpp]

An official-shape synthetic model saved in bf16 (as released models are), a non-zero initial
state and ids over the whole vocabulary (>= 32768 included). Each implementation is traced by its
bridge and compared with the float64 trace of the numbers it computes with (the bf16 file; for
llama.cpp, the GGUF of each type, dequantised), at the precision it computes in: official
(cpu fp32, bf16, fp16; decode and prefill, detail=fine), llama.cpp (F32; F16, whose products
round activations to fp16; Q8_0, whose products quantise them to 8-bit blocks, compared as bf16),
fla on a CUDA GPU (fp32 chunked: TF32 products; fp16; bf16), and tinyrwkv's own float32 trace.
Prints JSON lines: per case the verdicts, the worst error/tolerance, seconds and trace size.
"""
import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinyrwkv  # noqa: E402
from tinyrwkv import oracle  # noqa: E402
from tinyrwkv.bridges import bridge  # noqa: E402
from tinyrwkv.cli import write_weights  # noqa: E402
from tinyrwkv.synthetic import make_weights  # noqa: E402

SHAPES = {"small": (2, 256, 65536, 64), "mid": (4, 768, 65536, 64),
          "0.1B": (12, 768, 65536, 64), "1.5B": (24, 2048, 65536, 64)}

# (impl, file kind, record options, compare dtype)
CASES = {
    "official": [("official", "pth", dict(mode=m, strategy=f"cpu {p}", detail="fine"), p)
                 for m in ("decode", "prefill") for p in ("fp32", "bf16", "fp16")],
    "official-cuda": [("official", "pth", dict(mode=m, strategy=f"cuda {p}", detail="coarse"), p)
                      for m in ("decode", "prefill") for p in ("fp32", "bf16", "fp16")],
    "llama.cpp": [("llama.cpp", t, dict(), d) for t, d in (("f32", "fp32"), ("f16", "fp16"),
                                                            ("q8_0", "bf16"))],
    # fla's chunked kernels take their float32 products in TF32 (tl.dot): compared as tf32
    "fla": [("fla", "pth", dict(mode=m, dtype=t), d)
            for m, t, d in (("chunk", "bfloat16", "bf16"), ("chunk", "float16", "fp16"),
                            ("fused_recurrent", "float32", "fp32"), ("chunk", "float32", "tf32"),
                            ("fused_recurrent", "bfloat16", "bf16"))],
    "tinyrwkv": [("tinyrwkv", "pth", dict(), "fp32")],
}


def summary(report):
    f = report["first"]
    worst = max(report["rows"], key=lambda r: r["max_rel"] / r["tol"])
    out = dict(ok=report["ok"], first=None if f is None else
               f"{f['name']} t{f['token']} {f.get('check', 'global')} {f['ratio']:.3g}x",
               worst=f"{worst['name']} {worst['max_rel'] / worst['tol']:.3g}",
               logits=next((r["max_rel"] for r in report["rows"] if r["name"] == "logits"), None))
    locs = [r for r in report["rows"] if "local" in r]
    if locs:
        wl = max(locs, key=lambda r: r["local"]["ratio"])
        out["worst_local"] = f"{wl['name']} {wl['local']['ratio']:.3g}"
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.1B", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, default=128)
    ap.add_argument("--impls", default="tinyrwkv,official,llama.cpp")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    L, C, V, N = SHAPES[args.shape]
    out = open(args.out, "a") if args.out else None

    def emit(row):
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    emit(dict(what="machine", cpu=platform.processor() or platform.machine(),
              cores=os.cpu_count(), numpy=np.__version__, shape=args.shape, T=args.tokens,
              OPENBLAS=" ".join(f"{k}={v}" for k, v in os.environ.items() if "OPENBLAS" in k)))
    tmp = Path(tempfile.mkdtemp(prefix="cross-impl-"))
    weights = make_weights(L, C, V, head_size=N, seed=args.seed)
    files = {"pth": tmp / "model.pth"}
    write_weights(files["pth"], weights, "bf16")
    rng = np.random.default_rng(args.seed)
    ids = rng.integers(0, V, args.tokens)
    ids[:3] = [V - 1, 32768, 40000]
    refs = {}

    def reference(kind):
        """(model, state, trace, noise by dtype) of the file the implementation reads."""
        if kind not in refs:
            path = files.get(kind)
            if path is None:
                path = files[kind] = tmp / f"model-{kind}.gguf"
                bridge("llama.cpp").write_gguf_for_llama(files["pth"], path, kind)
            model = tinyrwkv.load(path, dtype="float64", backend="numpy", progress=False)
            _, state = model.forward(np.random.default_rng(7).integers(0, V, 16))
            t0 = time.time()
            tr = oracle.trace(model, ids, state=state)
            emit(dict(what="reference", file=kind, seconds=round(time.time() - t0, 1)))
            refs[kind] = (model, state, tr, {})
        return refs[kind]

    for group in args.impls.split(","):
        for impl, kind, options, dtype in CASES[group]:
            model, state, ref, noise = reference(kind if impl != "llama.cpp" else kind)
            name = f"{impl} " + " ".join(f"{v}" for v in options.values())
            try:
                t0 = time.time()
                if impl == "tinyrwkv":
                    tr = oracle.trace(model, ids, state=state, dtype="float32")
                else:
                    tr, _ = bridge(impl).record(files[kind], ids, state=state, **options)
                seconds = time.time() - t0
                size = sum(np.asarray(v).nbytes for v in tr.values())
                if dtype not in noise:
                    noise[dtype] = oracle.noise_scales(model, ref, dtype, ids, state)
                t0 = time.time()
                fixed = oracle.compare(ref, tr, dtype, problems="warn")
                calibrated = oracle.compare(ref, tr, dtype, problems="warn", model=model, ids=ids,
                                            state=state, noise=noise[dtype])
                emit(dict(what="case", case=name, dtype=dtype, seconds=round(seconds, 1),
                          compare_s=round(time.time() - t0, 1), MB=round(size / 1e6, 1),
                          names=len(tr), fixed=summary(fixed), calibrated=summary(calibrated),
                          not_compared=len(calibrated["missing"])))
                print(oracle.format_report(calibrated), flush=True)
            except Exception as e:                    # one case failing must not hide the rest
                emit(dict(what="case", case=name, error=f"{type(e).__name__}: {e}"[:400]))


if __name__ == "__main__":
    main()
