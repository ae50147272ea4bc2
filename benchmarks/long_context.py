"""float32 against float64 over a long context: does the error grow, saturate, or stay bounded?

    python benchmarks/long_context.py --tokens 100000            # the shipped model, TinyStories

Reads a long text (valid.txt repeated until --tokens) through the shipped model twice, carrying
the state across chunks of --chunk tokens: once in float64 (the NumPy reference, the oracle) and
once in float32 (the Numba backend, as used for generation). At each checkpoint it prints
max|d|/std of the last chunk's logits and of the WKV state, against float64.
"""
import argparse
import json
import time
from pathlib import Path

import numpy as np

import tinyrwkv

ROOT = Path(__file__).resolve().parents[1]


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--tokens", type=int, default=100_000)
    ap.add_argument("--chunk", type=int, default=1000)
    ap.add_argument("--text", default=str(ROOT.parent / "shared/data/tinystories-subset/valid.txt"))
    ap.add_argument("--out", help="JSON of every checkpoint")
    args = ap.parse_args()
    m64 = tinyrwkv.load(dtype="float64", backend="numpy")
    m32 = tinyrwkv.load(backend="numba")
    text = Path(args.text).read_text()
    ids = m64.tokenizer.encode(text)
    while len(ids) < args.tokens:
        ids = ids + ids
    ids = ids[:args.tokens]
    checkpoints = {1000, 3000, 10000, 30000, 100000, args.tokens}
    s64 = s32 = None
    rows, t0 = [], time.time()
    for start in range(0, args.tokens, args.chunk):
        piece = ids[start:start + args.chunk]
        l64, s64 = m64.forward(piece, s64, full_output=True)
        l32, s32 = m32.forward(piece, s32, full_output=True)
        done = start + len(piece)
        if done in checkpoints:
            rel = lambda a, b: float(np.abs(a - b).max() / b.std())
            row = {"tokens": done, "logits": rel(l32, l64), "wkv_state": rel(s32.wkv, s64.wkv),
                   "att_shift": rel(s32.att_shift, s64.att_shift), "seconds": time.time() - t0}
            rows.append(row)
            print(f"{done:>7} tokens: logits {row['logits']:.2e}  wkv state {row['wkv_state']:.2e}"
                  f"  token shift {row['att_shift']:.2e}  ({row['seconds']:.0f} s)", flush=True)
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))


if __name__ == "__main__":
    main()
