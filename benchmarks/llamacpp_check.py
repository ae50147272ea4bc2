"""llama.cpp against tinyrwkv's oracle, and their speeds, on the same GGUF files.

    pip install llama-cpp-python gguf
    python benchmarks/llamacpp_check.py                     # the shipped model, F32/F16/Q8_0

For each type: tinyrwkv writes the GGUF; llama.cpp (through llama-cpp-python) evaluates a
story prompt with logits for every token; tinyrwkv evaluates the same GGUF in float64 (the
weights as stored, dequantised); the table gives max|d|/std of llama.cpp's logits. Then speed on
the same files, same threads: decode (one token at a time) and prefill (one call) tokens/s of
llama.cpp and of tinyrwkv's numba backend (which reads the GGUF dequantised to float32).
"""
import argparse
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinyrwkv  # noqa: E402
from tinyrwkv.formats import read_checkpoint, write_gguf  # noqa: E402


def llama_logits(path, ids, threads):
    from llama_cpp import Llama
    llm = Llama(model_path=str(path), n_ctx=max(512, len(ids) + 8), logits_all=True,
                verbose=False, n_threads=threads, n_batch=512)
    llm.eval(list(map(int, ids)))
    return np.array(llm.scores[:len(ids)], np.float64), llm


def timed(fn, runs=3):
    fn()                                      # warm-up: JIT compilation, caches, first allocations
    ts = []
    for _ in range(runs):
        t0 = time.perf_counter()
        fn()
        ts.append(time.perf_counter() - t0)
    return statistics.median(ts)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--types", default="f32,f16,q8_0")
    ap.add_argument("--threads", type=int, default=os.cpu_count())
    ap.add_argument("--decode", type=int, default=64)
    ap.add_argument("--prefill", type=int, default=512)
    ap.add_argument("--out")
    args = ap.parse_args()
    model = tinyrwkv.load(backend="numpy")
    weights = read_checkpoint(ROOT / "weights" / "model.safetensors", dtype="float32")
    text = (ROOT.parent / "shared/data/tinystories-subset/valid.txt")
    text = text.read_text() if text.exists() else "Once upon a time, there was a little dog. " * 100
    ids = np.array(model.tokenizer.encode(text)[:max(args.prefill, 128)])
    tmp = Path(tempfile.mkdtemp())
    rows = []
    for t in args.types.split(","):
        path = tmp / f"m_{t}.gguf"
        write_gguf(path, weights, t, tokenizer=model.tokenizer)
        ref = tinyrwkv.load(path, dtype="float64", backend="numpy")
        prompt = ids[:128]
        want, _ = ref.forward(prompt, full_output=True)
        got, llm = llama_logits(path, prompt, args.threads)
        row = {"type": t, "logits_dev": float(np.abs(got - want).max() / want.std())}
        # speed: llama.cpp
        def ll_decode(llm=llm):
            llm.reset()
            for tok in ids[:args.decode]:
                llm.eval([int(tok)])
        def ll_prefill(llm=llm):
            llm.reset()
            llm.eval(list(map(int, ids[:args.prefill])))
        row["llama_decode_tok_s"] = args.decode / timed(ll_decode)
        row["llama_prefill_tok_s"] = args.prefill / timed(ll_prefill)
        fast = tinyrwkv.load(path, backend="numba", threads=args.threads)
        def tr_decode():
            state = None
            for tok in ids[:args.decode]:
                _, state = fast.forward([int(tok)], state)
        row["tinyrwkv_decode_tok_s"] = args.decode / timed(tr_decode)
        row["tinyrwkv_prefill_tok_s"] = args.prefill / timed(lambda: fast.forward(ids[:args.prefill]))
        rows.append(row)
        print(json.dumps(row), flush=True)
        del llm
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print(f"\nthreads {args.threads}; decode {args.decode} tokens, prefill {args.prefill} tokens; medians of 3")
    print("| GGUF type | llama.cpp logits vs tinyrwkv float64 | llama.cpp decode | tinyrwkv decode | llama.cpp prefill | tinyrwkv prefill |")
    print("|---|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['type']} | {r['logits_dev']:.1e} | {r['llama_decode_tok_s']:.0f} | "
              f"{r['tinyrwkv_decode_tok_s']:.0f} | {r['llama_prefill_tok_s']:.0f} | {r['tinyrwkv_prefill_tok_s']:.0f} |")


if __name__ == "__main__":
    main()
