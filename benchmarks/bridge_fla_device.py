"""The fla bridge on a GPU machine: fla 0.6.0's RWKV7ForCausalLM traced (tinyrwkv/bridges/fla.py)
on the 0.1B-shape synthetic model, against tinyrwkv's float64 trace.

    python benchmarks/bridge_fla_device.py                       # everything below
    python benchmarks/bridge_fla_device.py --lengths 128 --dtypes float32 --modes chunk

The model: make_weights(12, 768, 65536, head_size=64, seed=1), written in fla's format
(formats/hf.py). For each length (128 and 2048 tokens, random ids), tinyrwkv's float64 trace is
made once (the 2048-token one keeps the states every 64 tokens, docs/formats.md §8.4); then for
each dtype (float32, float16, bfloat16) and mode (chunk, fused_recurrent) the bridge records fla's
trace and oracle.compare holds it to the dtype's tolerance (fp32 / fp16 / bf16; fp32 chunk also
to tf32's: fla's chunked kernel multiplies fp32 blocks with tl.dot, TF32 on NVIDIA from Ampere
on). Prints each report, then one JSON line per case ({"case": ...}) and a summary table as JSON
lines ({"summary": ...}). Each case runs in its own try/except, so one failure hides nothing.
--save writes the traces (about 260 MB at 128 tokens, 4.7 GB at 2048, float64) to --out.
--state starts every run from the same random non-zero state.
"""

import argparse
import json
import sys
import time
import traceback
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from tinyrwkv import RWKV7, oracle  # noqa: E402
from tinyrwkv.bridges import fla as fb  # noqa: E402
from tinyrwkv.formats.hf import write_hf  # noqa: E402
from tinyrwkv.model import State  # noqa: E402
from tinyrwkv.synthetic import make_weights  # noqa: E402

TOL = {"float32": "fp32", "float16": "fp16", "bfloat16": "bf16"}


def emit(kind, row):
    print(json.dumps({kind: row}, default=str), flush=True)


def versions():
    out = {}
    for name in ("torch", "triton", "transformers", "fla", "numpy"):
        try:
            out[name] = __import__(name).__version__
        except Exception as e:  # noqa: BLE001 - report, go on
            out[name] = f"missing ({type(e).__name__}: {e})"
    try:
        import torch
        out["gpu"] = torch.cuda.get_device_name(0) if torch.cuda.is_available() else "none"
    except Exception:  # noqa: BLE001
        out["gpu"] = "?"
    return out


def summarise(report, n_layer):
    rows = [r for r in report["rows"] if "max_rel" in r]
    ratio = {r["name"]: r["max_rel"] for r in rows}
    worst = max(rows, key=lambda r: r["ratio"]) if rows else None
    first = report["first"]
    return dict(ok=report["ok"], tol=report["tol"], compared=len(rows),
                first=None if not first else dict(name=first["name"], token=first["token"],
                                                  ratio=round(first["ratio"], 3)),
                worst=None if not worst else worst["name"],
                worst_max_rel=None if not worst else worst["max_rel"],
                logits_max_rel=ratio.get("logits"), final_wkv_max_rel=ratio.get("final.wkv"),
                last_block_max_rel=ratio.get(f"L{n_layer - 1}.block"),
                not_recorded=sorted({n.split(".", 1)[-1] for n in report["missing"]}))


def random_state(w, seed=5, scale=0.3):
    st = State.zeros(RWKV7(w, dtype="float64").config, np.float32)
    rng = np.random.default_rng(seed)
    for name in ("att_shift", "wkv", "ffn_shift"):
        a = getattr(st, name)
        a[...] = scale * rng.standard_normal(a.shape)
    return st


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--lengths", default="128,2048")
    ap.add_argument("--dtypes", default="float32,float16,bfloat16")
    ap.add_argument("--modes", default="chunk,fused_recurrent")
    ap.add_argument("--out", default="/tmp/bridge_fla")
    ap.add_argument("--save", action="store_true", help="write every trace to --out")
    ap.add_argument("--state", action="store_true", help="start from a random non-zero state")
    ap.add_argument("--seed", type=int, default=0)
    args = ap.parse_args()
    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    emit("versions", versions())

    t = time.perf_counter()
    w = make_weights(12, 768, 65536, head_size=64, seed=1)
    folder = write_hf(out / "model-0.1b-fla", w)
    n_layer = sum(k.endswith(".att.key.weight") for k in w)
    vocab, n_embd = w["head.weight"].shape
    emit("model", dict(folder=str(folder), n_layer=n_layer, n_embd=n_embd, vocab=vocab,
                       seconds=round(time.perf_counter() - t, 1)))
    reference = RWKV7(w, dtype="float64")
    state = random_state(w) if args.state else None
    rng = np.random.default_rng(args.seed)
    summary = []
    for T in [int(x) for x in args.lengths.split(",")]:
        ids = rng.integers(0, vocab, T)
        try:
            t = time.perf_counter()
            select = oracle.Selection(state_every=1 if T <= 256 else 64)
            ref = oracle.trace(reference, ids, state=state, select=select)
            emit("reference", dict(T=T, seconds=round(time.perf_counter() - t, 1),
                                   mb=round(sum(a.nbytes for a in ref.values()) / 2**20, 1)))
        except Exception:  # noqa: BLE001
            traceback.print_exc()
            emit("case", dict(T=T, error="the reference trace failed (above)"))
            continue
        for dtype in args.dtypes.split(","):
            for mode in args.modes.split(","):
                case = dict(T=T, dtype=dtype, mode=mode, state=args.state)
                try:
                    t = time.perf_counter()
                    tr, final = fb.record(folder, ids, state=state, dtype=dtype, mode=mode)
                    case.update(record_s=round(time.perf_counter() - t, 2),
                                **{k: tr.info[k] for k in ("load_s", "run_s", "calls")},
                                trace_mb=round(sum(a.nbytes for a in tr.values()) / 2**20, 1),
                                names=len(tr))
                    if args.save:
                        path = out / f"fla-{T}-{dtype}-{mode}.npz"
                        oracle.save_trace(path, tr)
                        case["file_mb"] = round(path.stat().st_size / 2**20, 1)
                    tols = [TOL[dtype]] + (["tf32"] if dtype == "float32" and mode == "chunk"
                                           else [])
                    for tol in tols:
                        report = oracle.compare(ref, tr, tol)
                        print(f"\n=== fla {dtype} {mode}, {T} tokens, against tinyrwkv float64 "
                              f"({tol} tolerance) ===", flush=True)
                        print(oracle.format_report(report), flush=True)
                        row = dict(case, tol_name=tol, **summarise(report, n_layer))
                        emit("case", row)
                        summary.append(row)
                    del tr, final
                except Exception as e:  # noqa: BLE001 - one failure must not hide the rest
                    traceback.print_exc()
                    row = dict(case, error=f"{type(e).__name__}: {str(e)[:500]}")
                    emit("case", row)
                    summary.append(row)
        del ref
    print("\n--- summary ---", flush=True)
    keys = ("T", "dtype", "mode", "tol_name", "ok", "first", "worst", "worst_max_rel",
            "logits_max_rel", "final_wkv_max_rel", "record_s", "load_s", "run_s", "trace_mb",
            "error")
    for row in summary:
        emit("summary", {k: row.get(k) for k in keys if k in row})


if __name__ == "__main__":
    main()
