"""tinyrwkv's float64 oracle against other implementations, on the shipped (trained) model.

    python benchmarks/cross_impl.py --device cpu      # the official package, cpu fp32
    python benchmarks/cross_impl.py --device cuda     # official CUDA fp32 (TF32 on/off), fp16,
                                                      # bf16; tinyrwkv cupy; fla's WKV operator

For each implementation: max|d|/std of the logits of a 128-token story prompt, in the sequence
form (prefill) and token by token (decode), and of the WKV state after it, against tinyrwkv
float64 on the same weights. fla: its chunked and fused-recurrent RWKV-7 operators against
tinyrwkv.ops.wkv7 (float64) on random inputs (T = 1024, H = 4, N = 64, non-zero initial state).
"""
import argparse
import json
import os
import sys
import tempfile
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))
import tinyrwkv  # noqa: E402
from tinyrwkv.formats import read_checkpoint  # noqa: E402


def rel(a, b):
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.abs(a - b).max() / b.std())


def official_rows(pth, ids, ref_logits, ref_wkv, strategies):
    import torch
    from rwkv.model import RWKV
    rows = []
    for name, strategy, tf32 in strategies:
        model = RWKV(str(pth)[:-4], strategy)
        torch.backends.cuda.matmul.allow_tf32 = tf32
        logits, state = model.forward(list(ids), None, full_output=True)
        L = len(ref_wkv)
        wkv = np.stack([state[3 * i + 1].float().cpu().numpy() for i in range(L)])
        state, one = None, []
        for t in ids:
            out, state = model.forward([int(t)], state)
            one.append(out.float().cpu().numpy())
        rows.append(dict(impl=f"official rwkv 0.8.32 {name}",
                         seq_logits=rel(logits.float().cpu().numpy(), ref_logits),
                         one_logits=rel(np.stack(one), ref_logits), state=rel(wkv, ref_wkv)))
        print(json.dumps(rows[-1]), flush=True)
        del model
    return rows


def tinyrwkv_rows(path, ids, ref_logits, ref_wkv, device):
    rows = []
    configs = [("numba float32", dict(backend="numba")), ("numpy float32", dict(backend="numpy"))]
    if device == "cuda":
        configs = [(f"cupy {w}", dict(backend="cupy", weights=w)) for w in ("float32", "float16", "bfloat16")]
    for name, kw in configs:
        m = tinyrwkv.load(path, **kw)
        seq, st = m.forward(ids, full_output=True)
        one, _ = m.forward(ids, full_output=True, mode="recurrent")
        rows.append(dict(impl=f"tinyrwkv {name}", seq_logits=rel(seq, ref_logits),
                         one_logits=rel(one, ref_logits), state=rel(st.to_host().wkv, ref_wkv)))
        print(json.dumps(rows[-1]), flush=True)
    return rows


def fla_rows():
    import torch
    from tinyrwkv import ops
    rng = np.random.default_rng(0)
    B, T, H, N = 1, 1024, 4, 64
    r, k, v = (rng.standard_normal((B, T, H, N)) for _ in range(3))
    w_log = -np.exp(-0.5) / (1 + np.exp(-rng.uniform(-8, 3, (B, T, H, N))))
    kh = rng.standard_normal((B, T, H, N))
    kh /= np.linalg.norm(kh, axis=-1, keepdims=True)
    a, b = -kh, kh * rng.uniform(size=(B, T, H, N))
    S = 0.3 * rng.standard_normal((B, H, N, N))          # fla layout [K][V]
    y_ref, S_ref = ops.wkv7(r, w_log, k, v, a, b, S, **ops.FLA)
    rows = []
    try:
        from fla.ops.rwkv7 import chunk_rwkv7, fused_recurrent_rwkv7
    except Exception as e:
        return [dict(impl="fla", error=repr(e)[:200])]
    for fname, fn in (("chunk_rwkv7", chunk_rwkv7), ("fused_recurrent_rwkv7", fused_recurrent_rwkv7)):
        for dt in (torch.float32, torch.float16, torch.bfloat16):
            t = lambda x: torch.tensor(x, device="cuda", dtype=dt)
            try:
                y, S_out = fn(t(r), t(w_log), t(k), t(v), t(a), t(b), scale=1.0,
                              initial_state=torch.tensor(S, device="cuda", dtype=torch.float32),
                              output_final_state=True)
                rows.append(dict(impl=f"fla 0.6.0 {fname} {str(dt)[6:]} (WKV operator)",
                                 y=rel(y.float().cpu().numpy(), y_ref),
                                 state=rel(S_out.float().cpu().numpy(), S_ref)))
            except Exception as e:
                rows.append(dict(impl=f"fla {fname} {str(dt)[6:]}", error=repr(e)[:200]))
            print(json.dumps(rows[-1]), flush=True)
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--device", choices=["cpu", "cuda"], default="cpu")
    ap.add_argument("--text", default=str(ROOT.parent / "shared/data/tinystories-subset/valid.txt"))
    ap.add_argument("--out")
    args = ap.parse_args()
    os.environ["RWKV_V7_ON"] = "1"
    os.environ["RWKV_CUDA_ON"] = "1" if args.device == "cuda" else "0"
    import torch
    path = ROOT / "weights" / "model.safetensors"
    ref_model = tinyrwkv.load(path, dtype="float64", backend="numpy")
    text = Path(args.text).read_text() if Path(args.text).exists() else "Once upon a time " * 40
    ids = np.array(ref_model.tokenizer.encode(text)[:128])
    ref_logits, ref_state = ref_model.forward(ids, full_output=True)
    tmp = Path(tempfile.mkdtemp())
    pth = tmp / "shipped.pth"
    torch.save({k: torch.tensor(v).to(torch.bfloat16)
                for k, v in read_checkpoint(path, dtype="float32").items()}, pth)
    if args.device == "cpu":
        strategies = [("cpu fp32", "cpu fp32", False)]
    else:
        strategies = [("cuda fp32 (TF32, as shipped)", "cuda fp32", True),
                      ("cuda fp32 (TF32 off)", "cuda fp32", False),
                      ("cuda fp16", "cuda fp16", True), ("cuda bf16", "cuda bf16", True)]
    rows = official_rows(pth, ids, ref_logits, ref_state.wkv, strategies)
    rows += tinyrwkv_rows(path, ids, ref_logits, ref_state.wkv, args.device)
    if args.device == "cuda":
        rows += fla_rows()
    if args.out:
        Path(args.out).write_text(json.dumps(rows, indent=1))
    print("\n| implementation | prefill logits | decode logits | WKV state |")
    print("|---|---|---|---|")
    for r in rows:
        if "error" in r:
            print(f"| {r['impl']} | error: {r['error'][:60]} | | |")
        elif "y" in r:
            print(f"| {r['impl']} | y {r['y']:.1e} | | {r['state']:.1e} |")
        else:
            print(f"| {r['impl']} | {r['seq_logits']:.1e} | {r['one_logits']:.1e} | {r['state']:.1e} |")


if __name__ == "__main__":
    main()
