"""Shared test helpers: where the shared reference material is, the error metric, and the
official package run as a subprocess."""
import importlib.util
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

ROOT = Path(__file__).resolve().parents[1]
# ../shared beside the checkout (and in CI); TINYRWKV_SHARED points elsewhere (the GPU machine,
# where only the repository travels: a copy is carried in a git-ignored folder).
SHARED = Path(os.environ.get("TINYRWKV_SHARED", ROOT.parent / "shared"))
FIXTURES = SHARED / "reference" / "rwkv7_fixtures"
TOKENIZER_20B = SHARED / "reference" / "tokenizers" / "20B_tokenizer.json"

# float32 against the official package (also float32): both round every op to float32 (~6e-8
# relative), and those errors add up over C-long dot products, 3-4 layers and the T-step WKV
# recurrence; measured on the fixtures: 1e-6 to 4e-6. 5e-5 leaves 10x headroom and is still
# ~1000x below what a real bug does (a wrong GroupNorm eps alone moves logits by ~1e-2, see
# test_tolerance_catches_a_small_bug).
TOL_F32 = 5e-5


def rel_err(got, ref):
    """max|got - ref| / std(ref): the scale-aware metric used in every numerical test."""
    got, ref = np.asarray(got, np.float64), np.asarray(ref, np.float64)
    assert got.shape == ref.shape, (got.shape, ref.shape)
    return float(np.abs(got - ref).max() / ref.std())


def random_wkv_inputs(rng, B, T, H, N, dtype=np.float64):
    """Inputs of the WKV operator with a real layer's ranges, each (B, T, H, N): r, k, v normal;
    the decay in (e^-0.6, 1); alpha = -kappa_hat (unit length per head); beta = kappa_hat * a with
    a in (0, 1); and a non-zero initial state (B, H, N, N), [value][key]. Returns
    r, w, k, v, alpha, beta, S0 in `dtype`."""
    r, k, v = (rng.standard_normal((B, T, H, N)) for _ in range(3))
    w = np.exp(-0.6 * rng.uniform(size=(B, T, H, N)))
    kh = rng.standard_normal((B, T, H, N))
    kh /= np.linalg.norm(kh, axis=-1, keepdims=True)
    alpha, beta = -kh, kh * rng.uniform(size=(B, T, H, N))
    S0 = 0.5 * rng.standard_normal((B, H, N, N))
    return tuple(np.asarray(x, dtype) for x in (r, w, k, v, alpha, beta, S0))


def have(module):
    return importlib.util.find_spec(module) is not None


SHAKESPEARE = SHARED / "data" / "tinyshakespeare" / "train.txt"
needs_shared_data = pytest.mark.skipif(not SHAKESPEARE.is_file(),
                                       reason=f"the shared training text is not at {SHAKESPEARE} "
                                              "(set TINYRWKV_SHARED to the shared folder)")


needs_official = pytest.mark.skipif(not (have("rwkv") and have("torch")),
                                    reason="the official rwkv package (and torch) are not installed: "
                                           "pip install -e '.[test]'")


def run_official(jobs, tmp_path, deep_embed=False):
    """Run tests/official_runner.py on jobs (see its docstring) in a fresh process."""
    job_file = tmp_path / "jobs.json"
    job_file.write_text(json.dumps(jobs))
    env = dict(os.environ, RWKV_V7_ON="1", RWKV_CUDA_ON="0")
    if deep_embed:
        env["RWKV_DE_VERSION"] = "1"
    else:
        env.pop("RWKV_DE_VERSION", None)
    proc = subprocess.run([sys.executable, str(ROOT / "tests" / "official_runner.py"), str(job_file)],
                          env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, f"official package failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    return [dict(np.load(job["out"])) for job in jobs]


def pytest_addoption(parser):
    parser.addoption("--long", action="store_true",
                     help="the long modes: many more fuzz cases and kill-during-write runs "
                          "(the same as TINYRWKV_LONG_TESTS=1)")


@pytest.fixture(scope="session")
def long_mode(request):
    """True under `pytest --long` (or TINYRWKV_LONG_TESTS=1): tests that sample (fuzzing, kills
    during writes) run many more cases; CI runs the short mode with a fixed seed."""
    return bool(request.config.getoption("--long") or os.environ.get("TINYRWKV_LONG_TESTS"))


# ----------------------------------------------------------------------------------------------
# Shared by the Numba backend's tests (test_numba_decode, test_batched, test_prefill,
# test_quantised, test_fast)
# ----------------------------------------------------------------------------------------------

def numba_model(weights, **options):
    """An RWKV7Numba model (imported here, so that a test module imports without numba)."""
    from tinyrwkv.backends.numba_cpu import RWKV7Numba
    return RWKV7Numba(weights, **options)


def random_state(config, seed, dtype=np.float32):
    """A non-zero state with a real state's ranges, so every state term takes part from token 1."""
    import tinyrwkv
    rng = np.random.default_rng(seed)
    s = tinyrwkv.State.zeros(config, dtype)
    s.att_shift[:] = rng.standard_normal(s.att_shift.shape)
    s.ffn_shift[:] = rng.standard_normal(s.ffn_shift.shape)
    s.wkv[:] = 0.3 * rng.standard_normal(s.wkv.shape)
    return s


def run_tokens(model, ids, state):
    """Token by token through model.forward: the logits of each, (T, V), and the last state."""
    logits = []
    for t in ids:
        l, state = model.forward([int(t)], state)
        logits.append(l)
    return np.stack(logits), state


def on_threads(run, counts=(1, 2)):
    """run() once with each Numba thread count in `counts`, the previous count restored after:
    the list of results. Skips the test when Numba has fewer threads than the largest count."""
    import numba
    if numba.config.NUMBA_NUM_THREADS < max(counts):
        pytest.skip(f"needs {max(counts)} Numba threads")
    saved = numba.get_num_threads()
    try:
        results = []
        for n in counts:
            numba.set_num_threads(n)
            results.append(run())
        return results
    finally:
        numba.set_num_threads(saved)
