"""`tinyrwkv.load`: from a checkpoint file to a ready model (and its tokenizer)."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import numpy as np

from .errors import CheckpointError
from .formats import open_model, resolve_model_path
from .model import RWKV7
from .schema import check_x070_keys, detect_version
from .tokenizer import TokenizerError, get_tokenizer


WEIGHTS_DIR = Path(__file__).resolve().parents[1] / "weights"   # the repo's weights/ folder


def shipped_model_path():
    """The model shipped in weights/ (trained by `tinyrwkv train`, see weights/MODEL_CARD.md)."""
    found = sorted(p for ext in ("*.pth", "*.safetensors") for p in WEIGHTS_DIR.glob(ext))
    if not found:
        raise CheckpointError(
            f"no model path given, and no shipped model was found in {WEIGHTS_DIR}: pass an "
            "RWKV-7 checkpoint (README: 'Official models'), or train one with `tinyrwkv train`")
    return found[0]


def default_backend(dtype="float32"):
    """"numba" where numba is installed and the dtype is float32; else the NumPy reference.
    (The GPU backend is never chosen silently: ask for backend="cupy" or a "cuda ..." strategy.)"""
    if np.dtype(dtype) != np.float32:
        return "numpy"
    return "numba" if importlib.util.find_spec("numba") is not None else "numpy"


BACKENDS = ("numpy", "numba", "cupy")
STORAGE = {"numpy": ("float32",), "numba": ("float32", "bfloat16"),
           "cupy": ("float16", "bfloat16", "float32")}   # the first is each backend's default
_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_strategy(strategy):
    """The official `rwkv` package's strategy string -> (backend, weights, device).

    'cuda fp16' -> ("cupy", "float16", 0); 'cuda:1 bf16' -> ("cupy", "bfloat16", 1);
    'cpu fp32' -> (the default CPU backend, "float32", None); 'cpu bf16' -> ("numba", "bfloat16").
    What tinyrwkv does not do (layers split over devices, int8 weights, mps/dml) is refused by
    name; so is 'cpu fp16' (the CPU backends store float32 or bfloat16).
    """
    s = " ".join(str(strategy).split())
    if "->" in s or "*" in s:
        raise ValueError(f"strategy {strategy!r}: splitting the layers across devices ('->', "
                         "'*N') is not supported; tinyrwkv runs the whole model on one device, "
                         "e.g. 'cuda fp16' or 'cpu fp32'")
    m = re.fullmatch(r"(cuda(?::(\d+))?|cpu|mps|dml) (fp16|fp32|bf16)(i8|i4|i3)?", s)
    if not m:
        raise ValueError(f"strategy {strategy!r} is not '<device> <precision>' as the official "
                         "package writes it: device cpu, cuda or cuda:N; precision fp16, bf16 "
                         "or fp32 (e.g. 'cuda fp16')")
    device, index, precision, quant = m.groups()
    if quant:
        raise ValueError(f"strategy {strategy!r}: {precision}{quant} (quantised weights) is not "
                         f"supported; use '{device} {precision}'")
    if device in ("mps", "dml"):
        raise ValueError(f"strategy {strategy!r}: device {device} is not supported; tinyrwkv "
                         "runs on 'cpu' (NumPy/Numba) and 'cuda' (CuPy)")
    weights = _PRECISIONS[precision]
    if device == "cpu":
        if weights == "float16":
            raise ValueError("strategy 'cpu fp16' is not supported: the CPU backends store "
                             "weights as float32 or bfloat16; use 'cpu bf16' or 'cpu fp32'")
        return ("numba" if weights == "bfloat16" else default_backend()), weights, None
    return "cupy", weights, int(index or 0)


def load(path=None, dtype="float32", tokenizer=None, progress=None, wkv="auto", backend=None,
         weights=None, threads=None, strategy=None, device=None):
    """Load an RWKV-7 checkpoint without torch: .pth, .safetensors (official or fla names),
    llama.cpp .gguf, or a Hugging Face / fla folder (tinyrwkv.formats.open_model reads them all).

    Args:
        path: the checkpoint file or folder (the '.pth' may be left off, as with the official
            package);
            None: the small model shipped in weights/ (with its own tokenizer)
        dtype: "float32" (default) or "float64" (the oracle mode, NumPy backend only)
        tokenizer: None to choose from the vocabulary size (65536 rows: World), "world", or a
            path to a tokenizer.json (e.g. the Pile models' 20B_tokenizer.json)
        progress: None (a progress bar for large files on a terminal), False, or a callable
            progress(done_bytes, total_bytes)
        wkv: "auto", "recurrent" or "chunked": how the sequence form runs the WKV operator
            (see RWKV7; the same function either way). With backend "numba", "auto" and
            "recurrent" use its compiled recurrence, "chunked" the NumPy chunked form; the cupy
            backend always runs its recurrence kernel.
        backend: "numpy" (the reference, model.py), "numba" (compiled CPU kernels, fast.py),
            "cupy" (CUDA GPU, gpu.py; needs CuPy), or None: numba where it is installed and
            dtype is float32, else numpy. `model.backend` says which one runs.
        weights: how the large matrices are stored: numba "float32" (default) or "bfloat16";
            cupy "float16" (default), "bfloat16" or "float32". Activations are float32 always.
        threads: threads for the CPU kernels and BLAS (default: all cores)
        strategy: instead of backend/weights, the official package's words: "cpu fp32",
            "cpu bf16", "cuda fp16", "cuda:1 bf16", "cuda fp32" (see parse_strategy)
        device: the CUDA device for backend "cupy" (default 0)
    Returns:
        a model with `.tokenizer` set (None if it could not be chosen: then `.tokenizer_error`
        says why, and generation raises it).
    """
    if strategy is not None:
        s_backend, s_weights, s_device = parse_strategy(strategy)
        for name, given, implied in (("backend", backend, s_backend), ("weights", weights, s_weights),
                                     ("device", device, s_device)):
            if given is not None and given != implied:
                raise ValueError(f"strategy {strategy!r} means {name}={implied!r}, but "
                                 f"{name}={given!r} was also given; pass one or the other")
        backend, weights, device = s_backend, s_weights, s_device
    backend = backend or default_backend(dtype)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    weights = weights or STORAGE[backend][0]
    if weights not in STORAGE[backend]:
        raise ValueError(f"backend {backend!r} stores weights as {' or '.join(STORAGE[backend])}, "
                         f"not {weights!r}"
                         + ("; 16-bit storage needs backend='numba' (CPU) or 'cupy' (GPU)"
                            if backend == "numpy" else ""))
    if backend != "cupy" and device is not None:
        raise ValueError("device= is for backend='cupy' (a CUDA device number)")
    if backend == "numba":
        try:
            from . import fast  # noqa: F401  (is numba there? say so before reading the file)
        except ImportError as e:
            raise ValueError(f"backend 'numba' is not available: {e}. Install it with "
                             "pip install numba, or use backend='numpy'") from e
    if backend in ("numba", "cupy") and np.dtype(dtype) != np.float32:
        raise ValueError(f"the {backend} backend computes in float32; for float64 use "
                         "backend='numpy'")
    if backend == "cupy":
        from .gpu import check_available
        check_available(device or 0)         # before reading a large file: say so now
    path = shipped_model_path() if path is None else resolve_model_path(path)
    source = open_model(path)               # any format, official keys (tinyrwkv/formats)
    tensors = source.read_all(dtype=_read_dtype(source, backend, dtype, weights), progress=progress)
    return _build(tensors, path, backend, dtype, wkv, weights, threads, device, tokenizer,
                  source.tokenizer)


def _read_dtype(source, backend, dtype, weights):
    """How to read the tensors. 16-bit storage: bf16 tensors stay memory-mapped as they are in
    the file (uint16 bits); the GPU converts them to its storage type itself. Otherwise the
    compute dtype (a float32 file read as float32 stays memory-mapped too)."""
    if weights == "bfloat16":
        return "bfloat16"
    if backend == "cupy":
        stored = {info.dtype for info in source.tensors().values()}
        return "bfloat16" if stored == {"bf16"} else None
    return dtype


def _build(tensors, path, backend, dtype, wkv, weights, threads, device, tokenizer, own_tokenizer):
    """The model object for the tensors of `path`, checked, with its tokenizer (`own_tokenizer`:
    one the file carried, e.g. a GGUF's vocabulary; an explicit `tokenizer` wins)."""
    detect_version(tensors.keys(), source=path)   # refuses RWKV-4/5/6, RC versions, ...
    check_x070_keys(tensors, source=path)   # every key present with the schema's shape, no extras
    if backend == "cupy":
        from .gpu import RWKV7CuPy
        model = RWKV7CuPy(tensors, name=path.name, wkv=wkv, weight_dtype=weights,
                          device=device or 0)
    elif backend == "numba":
        from .fast import RWKV7Numba
        model = RWKV7Numba(tensors, name=path.name, wkv=wkv, weight_dtype=weights, threads=threads)
    else:
        model = RWKV7(tensors, dtype=dtype, name=path.name, wkv=wkv)
        if threads is not None:
            _blas_threads(threads)
    model.path = path
    if own_tokenizer is not None and tokenizer is None:
        model.tokenizer, model.tokenizer_error = own_tokenizer, None
        return model
    try:
        model.tokenizer = get_tokenizer(model.config.vocab_size, tokenizer, model_path=path)
        model.tokenizer_error = None
    except TokenizerError as e:
        if tokenizer is not None:           # asked for explicitly: a mismatch is an error now
            raise
        model.tokenizer, model.tokenizer_error = None, e
    return model


def _blas_threads(threads):
    try:
        import threadpoolctl
    except ImportError:
        raise ValueError("setting threads for the numpy backend needs threadpoolctl "
                         "(pip install threadpoolctl), or set OMP_NUM_THREADS before starting")
    threadpoolctl.threadpool_limits(int(threads))
