"""The logits error of each weight storage type of the numba backend, against the float64 model
on the ORIGINAL weights: the rounding of the storage type plus float32 arithmetic.

    PYTHONPATH=$PWD python benchmarks/storage_error.py [--tokens 64] [--no-synthetic]

For the shipped model (weights/, bf16) and a 0.1B-shaped synthetic model (float32 weights,
synthetic.make_weights(12, 768, 65536, ranks=(64, 64, 32, 128))): the same `tokens` token ids run
token by token (the fused decode step, each token's logits) through RWKV7Numba with storage
float32, bfloat16, float16 and int8 (GGUF Q8_0), and in sequence mode through the NumPy reference
in float64 on the weights as given. Printed per model and storage: max|Δlogit| / std(logits)
over all positions (the tests' metric, tests/conftest.py rel_err) and the mean |Δ| / std.
"""
import argparse

import numpy as np

import tinyrwkv
from tinyrwkv.backends.numba_cpu import RWKV7Numba
from tinyrwkv.synthetic import make_weights

STORAGES = ("float32", "bfloat16", "float16", "int8")
TEXT = ("Once upon a time there was a little fox who lived at the edge of a great forest. Every "
        "morning she ran down to the river to drink, and every evening she told the owls what "
        "she had seen.")


def errors(weights, ids):
    """{storage: (max |Δ| / std, mean |Δ| / std)} of the logits over every position."""
    want, _ = tinyrwkv.RWKV7(weights, dtype="float64").forward(ids, full_output=True)
    scale = want.std()
    out = {}
    for storage in STORAGES:
        model = RWKV7Numba(weights, storage=storage)
        got, _ = model.forward(ids, full_output=True, mode="recurrent")      # the fused step
        delta = np.abs(got.astype(np.float64) - want)
        out[storage] = (delta.max() / scale, delta.mean() / scale)
    return out


def main():
    parser = argparse.ArgumentParser(description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tokens", type=int, default=64)
    parser.add_argument("--no-synthetic", action="store_true", help="the shipped model only")
    args = parser.parse_args()
    shipped = tinyrwkv.load(backend="numpy")             # the file's numbers, widened exactly
    ids = shipped.tokenizer.encode(TEXT * 8)[:args.tokens]
    models = {"shipped (bf16 file)": (shipped.stored_tensors(), ids)}
    if not args.no_synthetic:
        rng = np.random.default_rng(0)
        models["0.1B synthetic (float32)"] = (
            make_weights(12, 768, 65536, ranks=(64, 64, 32, 128), seed=0),
            rng.integers(0, 65536, args.tokens))
    print(f"logits error against float64 on the original weights, {args.tokens} tokens "
          "(max|Δ|/std; mean|Δ|/std)")
    print(f"{'model':26}" + "".join(f"{s:>22}" for s in STORAGES))
    for name, (weights, tokens) in models.items():
        row = errors(weights, np.asarray(tokens))
        print(f"{name:26}" + "".join(f"{m:>12.1e} ({a:.1e})" for m, a in row.values()),
              flush=True)


if __name__ == "__main__":
    main()
