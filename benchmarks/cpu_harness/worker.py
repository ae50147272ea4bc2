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
    float32 weights); asking for what the loader cannot do raises, and the row says why. The
    storage name ("float32", "bfloat16", "float16", "int8") is passed as it is: a tinyrwkv
    that does not know it raises ValueError, and the row reads "not available: ValueError: ...".
    No checkpoint (the shipped shape): tinyrwkv.load() with no path, the model in weights/."""
    import inspect

    import numpy as np
    import tinyrwkv
    has = inspect.signature(tinyrwkv.load).parameters
    kwargs = {"dtype": "float32", "progress": False}
    for option, value, implied in (("backend", spec["backend"], "numpy"),
                                   ("storage" if "storage" in has else "weights", spec["storage"],
                                    "float32"),
                                   ("threads", spec.get("threads"), None)):
        if option in has:
            kwargs[option] = value
        elif value != implied:
            raise RuntimeError(f"this tinyrwkv.load has no {option!r} option "
                               f"(needed for {option}={value!r})")
    path = spec.get("checkpoint")
    t0 = time.perf_counter()
    model = tinyrwkv.load(path, **kwargs) if path else tinyrwkv.load(**kwargs)
    load_s = time.perf_counter() - t0

    def prefill(ids, state=None):
        logits, state = model.forward(np.asarray(ids), state)
        return np.asarray(logits), state

    def step(token, state):
        logits, state = model.forward([int(token)], state)
        return logits, state

    info = {"backend_reported": getattr(model, "backend", None),
            "storage_reported": getattr(model, "storage", None),
            "n_params_reported": int(getattr(model, "n_params", 0) or 0), "model": model}
    return load_s, prefill, step, info


def _measure_batch(model, spec, V):
    """Batched decode: for each batch size B, B independent states (model.new_state(), or
    zero_state() on a tinyrwkv without it) advanced together by model.forward_batch(B token
    ids, the B states), which returns (B, V) logits and updates the states (a returned
    (logits, states) pair is accepted too). After `warmup` untimed steps, `decode_tokens` steps
    are timed; aggregate tok/s = B x steps / their time (per-sequence speed: / B).

    Also a consistency check, once: forward_batch of B different tokens from zero states against
    B separate forward() calls, max|delta logit|/std (should be float32 reordering, ~1e-6)."""
    import numpy as np
    fb = getattr(model, "forward_batch", None)
    if fb is None:
        return {"error": f"{type(model).__name__} has no forward_batch (this tinyrwkv)"}
    new_state = getattr(model, "new_state", None) or getattr(model, "zero_state", None)
    if new_state is None:
        return {"error": f"{type(model).__name__} has neither new_state nor zero_state"}

    def advance(ids, states):
        res = fb([int(i) for i in ids], states)
        if isinstance(res, tuple) and len(res) == 2 and isinstance(res[1], (list, tuple)):
            return np.asarray(res[0]), list(res[1])
        return np.asarray(res[0] if isinstance(res, tuple) else res), states

    out = {}
    rng = np.random.default_rng(spec["seed"] + 3)
    try:
        B = max(spec["batch"])
        ids = rng.integers(0, V, B)
        got, _ = advance(ids, [new_state() for _ in range(B)])
        want = np.stack([np.asarray(model.forward([int(i)], None)[0]).reshape(-1) for i in ids])
        out["check"] = {"B": B, "max_abs_over_std": float(np.abs(got.reshape(want.shape) - want).max()
                                                          / want.std())}
    except Exception as e:
        return {"error": f"{type(e).__name__}: {e}"}
    for B in spec["batch"]:
        try:
            states = [new_state() for _ in range(B)]
            ids = rng.integers(0, V, (spec["warmup"] + spec["decode_tokens"], B))
            for row in ids[: spec["warmup"]]:
                _, states = advance(row, states)
            t = time.perf_counter()
            for row in ids[spec["warmup"]:]:
                _, states = advance(row, states)
            dt = time.perf_counter() - t
            out[str(B)] = {"tok_s": B * spec["decode_tokens"] / dt, "seconds": dt,
                           "steps": spec["decode_tokens"]}
        except Exception as e:
            out[str(B)] = {"error": f"{type(e).__name__}: {e}"}
    return out


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


def _load_llama(spec):
    """llama.cpp through llama-cpp-python's low-level bindings (the C API, no `Llama` object):
    llama_model_load_from_file (model parameter use_extra_bufts from the spec: None = llama.cpp's
    default, False = no repacked CPU buffers), llama_init_from_model with n_threads =
    n_threads_batch = the spec's threads (default: all cores), n_ctx and n_batch large enough
    for the longest prefill, n_ubatch llama.cpp's default (512), one sequence.

    decode step = one llama_decode of a one-token batch (llama_batch_get_one: position and
    recurrent state continue from the context's memory) + a copy of that token's logits
    (llama_get_logits_ith(ctx, -1), V floats): the least a caller can do per token; the
    high-level `Llama.eval` adds Python bookkeeping per call. prefill@T = llama_memory_clear
    (the zero state) + one llama_decode of the T tokens (llama.cpp splits it into ubatches
    itself) + the last position's logits."""
    import numpy as np
    from llama_cpp import llama_cpp as L
    cfg = spec["llama"]
    threads = spec.get("threads") or os.cpu_count() or 1
    quiet = L.llama_log_callback(lambda level, text, user_data: None)   # no load log
    L.llama_log_set(quiet, None)
    L.llama_backend_init()
    mp = L.llama_model_default_params()
    if cfg.get("extra_bufts") is not None:
        mp.use_extra_bufts = bool(cfg["extra_bufts"])
    t0 = time.perf_counter()
    model = L.llama_model_load_from_file(spec["checkpoint"].encode(), mp)
    if not model:
        raise RuntimeError(f"llama.cpp could not load {spec['checkpoint']}")
    cp = L.llama_context_default_params()
    cp.n_ctx, cp.n_batch, cp.n_seq_max = cfg["n_ctx"], cfg["n_batch"], 1
    cp.n_ubatch = min(cp.n_ubatch, cfg["n_batch"])
    cp.n_threads = cp.n_threads_batch = threads
    cp.no_perf = True
    ctx = L.llama_init_from_model(model, cp)
    if not ctx:
        raise RuntimeError("llama.cpp could not create a context")
    load_s = time.perf_counter() - t0
    V = L.llama_vocab_n_tokens(L.llama_model_get_vocab(model))
    memory = L.llama_get_memory(ctx)
    buf = (L.llama_token * cfg["n_batch"])()

    def run(ids):
        n = len(ids)
        if n > cfg["n_batch"]:
            raise RuntimeError(f"{n} tokens in one call, n_batch is {cfg['n_batch']}")
        for i, t in enumerate(ids):
            buf[i] = int(t)
        rc = L.llama_decode(ctx, L.llama_batch_get_one(buf, n))
        if rc != 0:
            raise RuntimeError(f"llama_decode returned {rc}")
        return np.ctypeslib.as_array(L.llama_get_logits_ith(ctx, -1), (V,)).copy()

    def prefill(ids, state=None):
        L.llama_memory_clear(memory, True)
        return run(ids), None

    def step(token, state):
        return run([token]), None

    info = {"backend_reported": f"llama.cpp (llama-cpp-python {installed_version('llama-cpp-python')})",
            "llama_threads": threads, "use_extra_bufts": bool(mp.use_extra_bufts),
            "llama_params": {"n_ctx": cp.n_ctx, "n_batch": cp.n_batch, "n_ubatch": cp.n_ubatch},
            "llama_call": (f"decode = llama_decode of one token (llama_batch_get_one) + its logits; "
                           f"prefill = llama_memory_clear + one llama_decode of T tokens "
                           f"(n_ubatch {cp.n_ubatch})"),
            "_keep": (model, ctx, buf, quiet)}
    return load_s, prefill, step, info


def _worker_measure(spec):
    """One backend, one run: load, validate, warm up, decode, prefill at each T."""
    import numpy as np
    t0 = time.perf_counter()
    out = {}
    loader = {"official": _load_official, "llama": _load_llama}.get(spec["backend"], _load_tinyrwkv)
    if spec["backend"] == "official":   # import time is reported apart from load time
        _official_env()
        import torch  # noqa: F401
        import rwkv.model  # noqa: F401
    elif spec["backend"] == "llama":
        import llama_cpp  # noqa: F401
    else:
        import tinyrwkv  # noqa: F401
    out["import_s"] = time.perf_counter() - t0
    out["rss_after_import_gb"] = _peak_rss_bytes() / GB

    load_s, prefill, step, info = loader(spec)
    model = info.pop("model", None)
    keep = info.pop("_keep", None)  # noqa: F841  (llama.cpp's model and context stay alive)
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
    if spec.get("batch") and model is not None:
        out["batch"] = _measure_batch(model, spec, V)
    out["peak_rss_gb"] = _peak_rss_bytes() / GB
    out["threads"] = _thread_info()
    if "llama_threads" in out:
        out["threads"]["llama_threads"] = out["llama_threads"]
    return out


def _worker_make(spec):
    shape = Shape(**{**spec["shape"], "ranks": tuple(spec["shape"]["ranks"])})
    t0 = time.perf_counter()
    path = write_checkpoint(shape, spec["seed"], spec["folder"])
    return {"checkpoint": str(path), "seconds": time.perf_counter() - t0,
            "bytes": path.stat().st_size}


def _worker_convert(spec):
    """Write spec["output"] from spec["input"] with tinyrwkv's own converter, `python -m
    tinyrwkv convert IN OUT --type T` (this checkout's, as a subprocess), unless the file is
    already there (a cache folder); then, for a GGUF, read its tensor table (gguf-py): the bytes
    decode reads per token = every tensor's stored bytes except token_embd.weight (one row of
    it is read), by type."""
    import subprocess
    out = Path(spec["output"])
    t0 = time.perf_counter()
    reused = out.is_file()
    if not reused:
        out.parent.mkdir(parents=True, exist_ok=True)
        proc = subprocess.run([sys.executable, "-m", "tinyrwkv", "convert", spec["input"], str(out),
                               "--type", spec["type"]], capture_output=True, text=True)
        if proc.returncode != 0 or not out.is_file():
            tail = (proc.stderr or proc.stdout).strip().splitlines()[-1:] or [""]
            raise RuntimeError(f"tinyrwkv convert --type {spec['type']} failed "
                               f"(exit {proc.returncode}): {tail[0]}")
    result = {"path": str(out), "bytes": out.stat().st_size, "reused": reused,
              "seconds": time.perf_counter() - t0}
    if out.suffix == ".gguf":
        from gguf import GGUFReader
        reader = GGUFReader(str(out))
        by_type = {}
        for t in reader.tensors:
            if t.name != "token_embd.weight":
                name = t.tensor_type.name
                by_type[name] = by_type.get(name, 0) + int(t.n_bytes)
        result["decode_bytes"] = sum(by_type.values())
        result["decode_bytes_by_type"] = by_type
    return result


def _worker_llama_info(spec):
    """llama.cpp as llama-cpp-python loaded it: versions and llama_print_system_info() (the
    CPU features its ggml was built for and found)."""
    import llama_cpp
    info = llama_cpp.llama_print_system_info()
    return {"llama_cpp_python": getattr(llama_cpp, "__version__", installed_version("llama-cpp-python")),
            "system_info": info.decode(errors="replace") if isinstance(info, bytes) else str(info)}


def worker_main(spec_path):
    """Entry point of a child process: read the spec, do the task, write JSON to spec['out']."""
    spec = json.loads(Path(spec_path).read_text())
    tasks = {"limits": _worker_limits, "measure": _worker_measure, "make": _worker_make,
             "convert": _worker_convert, "llama_info": _worker_llama_info}
    try:
        result = {"ok": True, **tasks[spec["task"]](spec)}
    except Exception as e:                 # reported as "not available: <reason>" by the parent
        import traceback
        result = {"ok": False, "error": f"{type(e).__name__}: {e}",
                  "traceback": traceback.format_exc()}
    Path(spec["out"]).write_text(json.dumps(result))



if __name__ == "__main__":
    worker_main(sys.argv[1])
