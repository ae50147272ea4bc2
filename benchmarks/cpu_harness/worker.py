"""The worker side of the CPU benchmark: what runs in each fresh child process.

    python -m cpu_harness.worker SPEC.json   (runner.run_child starts it, benchmarks/ on the path)

reads the task from SPEC.json ("limits": the machine's bandwidth and matmul rate; "measure": one
backend, one run; "make": write a synthetic checkpoint) and writes its JSON result to spec["out"].
"""

from __future__ import annotations

import json
import os
import re
import resource          # Unix only, as the whole harness (see __init__.py)
import sys
import time
from pathlib import Path

from . import CHECK_TOKENS, GB, installed_version
from .shapes import Shape, write_checkpoint


def _peak_rss_bytes():
    """Peak resident set size of this process: ru_maxrss is KiB on Linux, bytes on macOS."""
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    return peak if sys.platform == "darwin" else peak * 1024


def _thread_info():
    """What the thread pools and BLAS libraries loaded in this process are (threadpoolctl: the
    OpenBLAS kernel chosen at run time is `architecture`), plus numba's and torch's threads."""
    info = {}
    try:
        import threadpoolctl
        info["threadpools"] = [
            {k: p.get(k) for k in ("user_api", "internal_api", "prefix", "version",
                                   "num_threads", "threading_layer", "architecture")}
            | {"file": os.path.basename(p.get("filepath") or "")}
            for p in threadpoolctl.threadpool_info()]
    except ImportError:
        info["threadpools"] = None      # pip install threadpoolctl to see the BLAS kernel
    if "numba" in sys.modules:
        info["numba_threads"] = sys.modules["numba"].get_num_threads()
    if "torch" in sys.modules:
        info["torch_threads"] = sys.modules["torch"].get_num_threads()
        info["torch_blas"] = _torch_blas(sys.modules["torch"])
    return info


def _times(fn, reps):
    """Wall times of `reps` calls of fn(), after one untimed call."""
    fn()
    times = []
    for _ in range(reps):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def _worker_limits(spec):
    """Machine limits, each probe timed `reps` times: {probe: {"amount": bytes or FLOPs per call,
    "unit": "GB/s" or "GFLOP/s", "seconds": [...]}}. The parent takes the best time of each.

    Bandwidth probes (bytes per call / time): float32 matrix-vector product through NumPy's BLAS
    and through torch (the access pattern of decode: the matrix is read once); `np.copyto`,
    counting read + write; a sum over the array (read only), NumPy (one thread) and torch
    (all threads). Matmul probes: float32 GEMM n x n x n through NumPy's BLAS and torch.
    """
    import numpy as np
    quick, reps = spec["quick"], spec.get("reps", 7)
    rng = np.random.default_rng(0)
    probes = {}

    def probe(name, amount, unit, fn):
        probes[name] = {"amount": amount, "unit": unit, "seconds": _times(fn, reps)}

    n = 1024 if quick else 2048
    a, b = rng.standard_normal((n, n), dtype=np.float32), rng.standard_normal((n, n), dtype=np.float32)
    probe("gemm numpy", 2 * n ** 3, "GFLOP/s", lambda: a @ b)
    m = rng.standard_normal((4096 if quick else 16384, 8192), dtype=np.float32)   # 128 / 512 MiB
    v = rng.standard_normal(8192, dtype=np.float32)
    probe("matvec numpy", m.nbytes, "GB/s", lambda: m @ v)
    src = np.ones((64 if quick else 256) * 2 ** 20, dtype=np.float32)              # 256 MiB / 1 GiB
    dst = np.empty_like(src)
    probe("copy numpy", 2 * src.nbytes, "GB/s", lambda: np.copyto(dst, src))
    probe("sum numpy", src.nbytes, "GB/s", lambda: src.sum())
    threads = _thread_info()             # before torch: NumPy's BLAS as the models see it
    try:
        import torch
    except ImportError:
        torch = None
    if torch is not None:
        if spec.get("threads"):
            torch.set_num_threads(spec["threads"])
        ta, tb, tm, tv, ts = (torch.from_numpy(x) for x in (a, b, m, v, src))
        probe("gemm torch", 2 * n ** 3, "GFLOP/s", lambda: torch.mm(ta, tb))
        probe("matvec torch", m.nbytes, "GB/s", lambda: torch.mv(tm, tv))
        probe("sum torch", src.nbytes, "GB/s", lambda: ts.sum())
    return {"probes": probes, "gemm_n": n, "matvec_bytes": m.nbytes, "copy_bytes": src.nbytes,
            "numpy_blas": _numpy_blas_config(), "threads": threads,
            "torch_blas": _torch_blas(torch) if torch is not None else None}


def _numpy_blas_config():
    """NumPy's BLAS as built (name, version, OpenBLAS build configuration)."""
    import numpy as np
    try:
        blas = np.show_config(mode="dicts")["Build Dependencies"]["blas"]
        return {k: blas.get(k) for k in ("name", "version", "openblas configuration")}
    except Exception as e:               # older NumPy: no mode="dicts"
        return {"error": f"{type(e).__name__}: {e}"}


def _torch_blas(torch):
    config = torch.__config__.show()
    m = re.search(r"BLAS_INFO=(\w+)", config)
    return m[1] if m else "unknown"


def _load_tinyrwkv(spec):
    """tinyrwkv.load with the backend, weight storage and threads of the spec, passing each
    option only if this tinyrwkv's loader has it (an older loader is the numpy backend with
    float32 weights); asking for what the loader cannot do raises, and the row says why."""
    import inspect

    import numpy as np
    import tinyrwkv
    has = inspect.signature(tinyrwkv.load).parameters
    kwargs = {"dtype": "float32", "progress": False}
    for option, value, implied in (("backend", spec["backend"], "numpy"),
                                   ("storage" if "storage" in has else "weights", spec["weights"],
                                    "float32"),
                                   ("threads", spec.get("threads"), None)):
        if option in has:
            kwargs[option] = value
        elif value != implied:
            raise RuntimeError(f"this tinyrwkv.load has no {option!r} option "
                               f"(needed for {option}={value!r})")
    t0 = time.perf_counter()
    model = tinyrwkv.load(spec["checkpoint"], **kwargs)
    load_s = time.perf_counter() - t0

    def prefill(ids, state=None):
        logits, state = model.forward(np.asarray(ids), state)
        return np.asarray(logits), state

    def step(token, state):
        logits, state = model.forward([int(token)], state)
        return logits, state

    info = {"backend_reported": getattr(model, "backend", None),
            "n_params_reported": int(getattr(model, "n_params", 0) or 0)}
    return load_s, prefill, step, info


def _official_env():
    """The official package reads these once, at import: RWKV-7 on, no CUDA, TorchScript on."""
    os.environ.update({"RWKV_V7_ON": "1", "RWKV_CUDA_ON": "0", "RWKV_JIT_ON": "1"})


def _load_official(spec):
    """The official package, `cpu fp32`. It mutates the state list it is given, which is what we
    want here (each step continues the last)."""
    _official_env()
    import torch
    torch.set_num_threads(spec.get("threads") or os.cpu_count() or 1)
    from rwkv.model import RWKV
    path = spec["checkpoint"]
    if not path.endswith(".pth"):
        raise RuntimeError("the official package reads only .pth files (torch is needed to write one)")
    t0 = time.perf_counter()
    model = RWKV(path[: -len(".pth")], "cpu fp32")  # the official loader appends '.pth'
    load_s = time.perf_counter() - t0

    def prefill(ids, state=None):
        logits, state = model.forward([int(i) for i in ids], state)
        return logits.float().numpy(), state

    def step(token, state):
        return model.forward([int(token)], state)

    info = {"backend_reported": "official rwkv " + installed_version("rwkv") + ", cpu fp32",
            "torch": torch.__version__}
    return load_s, prefill, step, info


def _worker_measure(spec):
    """One backend, one run: load, validate, warm up, decode, prefill at each T."""
    import numpy as np
    t0 = time.perf_counter()
    out = {}
    loader = _load_official if spec["backend"] == "official" else _load_tinyrwkv
    if spec["backend"] == "official":   # import time is reported apart from load time
        _official_env()
        import torch  # noqa: F401
        import rwkv.model  # noqa: F401
    else:
        import tinyrwkv  # noqa: F401
    out["import_s"] = time.perf_counter() - t0
    out["rss_after_import_gb"] = _peak_rss_bytes() / GB

    load_s, prefill, step, info = loader(spec)
    out.update(info, load_s=load_s, rss_after_load_gb=_peak_rss_bytes() / GB)

    V = spec["vocab_size"]
    rng = np.random.default_rng(spec["seed"] + 1)
    check_ids = rng.integers(0, V, CHECK_TOKENS)
    decode_ids = rng.integers(0, V, spec["warmup"] + spec["decode_tokens"])

    # Validation (before any timing): a 16-token prefill and one decode step after it. The
    # prefill runs 3 times: TorchScript (official) profiles the first calls and optimises after.
    t = time.perf_counter()
    seq_logits, state = prefill(check_ids)
    out["first_prefill_s"] = time.perf_counter() - t
    for _ in range(2):
        prefill(check_ids)
    t = time.perf_counter()
    step_logits, state = step(decode_ids[0], state)
    out["first_step_s"] = time.perf_counter() - t
    check = np.stack([np.asarray(seq_logits, np.float32), np.asarray(step_logits, np.float32)])
    out["finite"] = bool(np.isfinite(check).all())
    if spec.get("check_out"):
        np.save(spec["check_out"], check)

    # Decode: warm-up steps (JIT, TorchScript profiling), then timed steps.
    for token in decode_ids[1: spec["warmup"]]:
        _, state = step(token, state)
    times = []
    for token in decode_ids[spec["warmup"]:]:
        t = time.perf_counter()
        _, state = step(token, state)
        times.append(time.perf_counter() - t)
    out["decode_step_s"] = times
    out["decode_tok_s"] = len(times) / sum(times) if times else None

    # Prefill: one untimed warm-up, then one timed forward per length.
    out["prefill_s"] = {}
    if spec["prefill"]:
        n_warm = min(128, min(spec["prefill"]))
        t = time.perf_counter()
        prefill(rng.integers(0, V, n_warm))
        out["warmup_prefill"] = {"tokens": n_warm, "seconds": time.perf_counter() - t}
        for T in spec["prefill"]:
            ids = np.random.default_rng([spec["seed"] + 2, T]).integers(0, V, T)
            t = time.perf_counter()
            prefill(ids)
            out["prefill_s"][str(T)] = time.perf_counter() - t
    out["peak_rss_gb"] = _peak_rss_bytes() / GB
    out["threads"] = _thread_info()
    return out


def _worker_make(spec):
    shape = Shape(**{**spec["shape"], "ranks": tuple(spec["shape"]["ranks"])})
    t0 = time.perf_counter()
    path = write_checkpoint(shape, spec["seed"], spec["folder"])
    return {"checkpoint": str(path), "seconds": time.perf_counter() - t0,
            "bytes": path.stat().st_size}


def worker_main(spec_path):
    """Entry point of a child process: read the spec, do the task, write JSON to spec['out']."""
    spec = json.loads(Path(spec_path).read_text())
    tasks = {"limits": _worker_limits, "measure": _worker_measure, "make": _worker_make}
    try:
        result = {"ok": True, **tasks[spec["task"]](spec)}
    except Exception as e:                 # reported as "not available: <reason>" by the parent
        import traceback
        result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    Path(spec["out"]).write_text(json.dumps(result))



if __name__ == "__main__":
    worker_main(sys.argv[1])
