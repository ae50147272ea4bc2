"""False alarms and planted bugs: the oracle's fixed tolerances against the calibrated ones.

    python benchmarks/oracle_alarms.py --shape 0.1B --tokens 128 [--tokens 512 ...] [--out F]

On an official-shape synthetic model (a non-zero initial state, token ids over the whole
vocabulary, ids >= 32768 included), a float64 reference trace, then:
- correct implementations (VARIANTS): the reference's own float32 trace and float32 variants that
  compute the same functions another way (one-pass variances, the WKV output read from the old
  state, other summation orders for the products, sigmoid through tanh, ...), and the same in
  emulated float16 and bfloat16 (fp32 state): each compared with the fixed tolerance (the first
  edition's) and with the calibrated one (compare(..., model=)); any failure is a false alarm;
- planted bugs (BUGS: the tests' table and the bugs an outside implementer found): each must
  fail, and the first divergence must name the layer and op where it was planted.
Prints a table and writes JSON lines with --out. Long runs keep states every --state-every tokens.
"""
import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinyrwkv  # noqa: E402
from tinyrwkv import oracle  # noqa: E402
from tinyrwkv.synthetic import make_weights  # noqa: E402

sys.path.insert(0, str(ROOT / "tests"))
import oracle_cases  # noqa: E402
from oracle_cases import BUGS, variant_steps  # noqa: E402

SHAPES = {"small": (2, 256, 65536, 64), "mid": (4, 768, 65536, 64),
          "0.1B": (12, 768, 65536, 64), "1.5B": (24, 2048, 65536, 64)}


SELECT = [None]


def bug_trace(w, ids, state, bug, dtype):
    return oracle_cases.bug_trace(w, ids, state, bug, dtype, SELECT[0])


def verdict(report, where=None):
    f = report["first"]
    out = dict(ok=report["ok"], first=None if f is None else f"L{f['layer']}.{f['op']}"
               if f["layer"] is not None else f["op"], token=None if f is None else f["token"],
               check=None if f is None else f.get("check"))
    worst = max(report["rows"], key=lambda r: r["max_rel"] / r["tol"])
    out["worst"] = f"{worst['name']} {worst['max_rel'] / worst['tol']:.2g}"
    locs = [r for r in report["rows"] if "local" in r]
    if locs:
        wl = max(locs, key=lambda r: r["local"]["ratio"])
        out["worst_local"] = f"{wl['name']} {wl['local']['ratio']:.2g}"
    if where is not None:
        layer, op = where
        out["located"] = bool(f) and f["op"] == op and (layer is None or f["layer"] == layer)
    return out


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--shape", default="0.1B", choices=list(SHAPES))
    ap.add_argument("--tokens", type=int, action="append")
    ap.add_argument("--state-every", type=int, default=1)
    ap.add_argument("--dtypes", default="fp32,fp16,bf16")
    ap.add_argument("--variants", default="plain,norms,fused_wkv,products,einsum,pointwise,all")
    ap.add_argument("--bugs", default="all", help="'all', 'none' or comma-separated names")
    ap.add_argument("--seed", type=int, default=1)
    ap.add_argument("--out")
    args = ap.parse_args()
    L, C, V, N = SHAPES[args.shape]
    out = open(args.out, "a") if args.out else None
    print(f"# {args.shape} (L{L} C{C} V{V}), {platform.processor() or platform.machine()}, "
          f"numpy {np.__version__}", flush=True)

    def emit(row):
        print(json.dumps(row), flush=True)
        if out:
            out.write(json.dumps(row) + "\n")
            out.flush()

    w = make_weights(L, C, V, head_size=N, seed=args.seed)
    ref_model = tinyrwkv.RWKV7(w, dtype="float64")
    rng = np.random.default_rng(args.seed)
    _, state = ref_model.forward(rng.integers(0, V, 16))       # a non-zero initial state
    for T in args.tokens or [128]:
        ids = rng.integers(0, V, T)
        ids[:4] = [V - 1, 32768, 40000, 1]                     # ids >= 32768 early on
        SELECT[0] = oracle.Selection(state_every=args.state_every)
        t0 = time.time()
        ref = oracle.trace(ref_model, ids, state=state, select=SELECT[0])
        ref.meta = {"selection": SELECT[0].meta(), "ids": ids.tolist()}
        base = dict(shape=args.shape, T=T, state_every=args.state_every)
        emit(dict(base, what="reference trace", seconds=round(time.time() - t0, 1)))
        for dtype in args.dtypes.split(","):
            t0 = time.time()
            noise = oracle.noise_scales(ref_model, ref, dtype, ids, state)
            emit(dict(base, what="noise", dtype=dtype, seconds=round(time.time() - t0, 1)))
            for ways in [] if args.variants == "none" else args.variants.split(","):
                m = tinyrwkv.RWKV7(w, dtype="float32", steps=variant_steps(ways, dtype))
                other = oracle.trace(m, ids, state=state, select=SELECT[0])
                t0 = time.time()
                old = oracle.compare(ref, other, dtype)
                new = oracle.compare(ref, other, dtype, model=ref_model, state=state, noise=noise)
                emit(dict(base, what="correct", dtype=dtype, variant=ways,
                          fixed=verdict(old), calibrated=verdict(new),
                          seconds=round(time.time() - t0, 1)))
            bugs = list(BUGS) if args.bugs == "all" else [] if args.bugs == "none" else args.bugs.split(",")
            for bug in bugs if dtype == "fp32" else []:
                other = bug_trace(w, ids, state.copy(), bug, dtype)
                old = oracle.compare(ref, other, dtype)
                new = oracle.compare(ref, other, dtype, model=ref_model, state=state, noise=noise)
                emit(dict(base, what="bug", dtype=dtype, bug=bug, where=BUGS[bug][3],
                          fixed=verdict(old, BUGS[bug][3]), calibrated=verdict(new, BUGS[bug][3])))


if __name__ == "__main__":
    main()
