"""`tinyrwkv.load`: from a checkpoint file to a ready model (and its tokenizer)."""

from __future__ import annotations

import importlib.util
from pathlib import Path

import numpy as np

from .checkpoint import CheckpointError, check_x070_keys, detect_version, read_checkpoint
from .model import RWKV7
from .tokenizer import TokenizerError, get_tokenizer


def resolve_model_path(path):
    """The file to open. Like the official package, accept a path given without its '.pth'."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    for suffix in (".pth", ".safetensors"):
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file inside it "
                              "(a .pth or .safetensors file)")
    raise CheckpointError(f"no checkpoint at {path}: the file does not exist")


def default_backend(dtype="float32"):
    """"numba" where numba is installed and the dtype is float32; else the NumPy reference."""
    if np.dtype(dtype) != np.float32:
        return "numpy"
    return "numba" if importlib.util.find_spec("numba") is not None else "numpy"


def load(path, dtype="float32", tokenizer=None, progress=None, wkv="auto", backend=None,
         weights="float32", threads=None):
    """Load an RWKV-7 checkpoint (.pth or .safetensors, official key names) without torch.

    Args:
        path: the checkpoint file (the '.pth' may be left off, as with the official package)
        dtype: "float32" (default) or "float64" (the oracle mode, NumPy backend only)
        tokenizer: None to choose from the vocabulary size (65536 rows: World), "world", or a
            path to a tokenizer.json (e.g. the Pile models' 20B_tokenizer.json)
        progress: None (a progress bar for large files on a terminal), False, or a callable
            progress(done_bytes, total_bytes)
        wkv: "auto", "recurrent" or "chunked": how the sequence form runs the WKV operator
            (see RWKV7; the same function either way). With backend "numba", "auto" and
            "recurrent" use its compiled recurrence, "chunked" the NumPy chunked form.
        backend: "numpy" (the reference, model.py), "numba" (compiled kernels, fast.py), or None:
            numba where it is installed and dtype is float32, else numpy. `model.backend` says
            which one runs.
        weights: how the numba backend stores the large matrices: "float32" or "bfloat16"
            (half the bytes per token; exact for bf16 checkpoints, which released models are)
        threads: threads for the kernels and BLAS (default: all cores)
    Returns:
        an RWKV7 model with `.tokenizer` set (None if it could not be chosen: then
        `.tokenizer_error` says why, and generation raises it).
    """
    backend = backend or default_backend(dtype)
    if backend not in ("numpy", "numba"):
        raise ValueError(f"backend must be 'numpy' or 'numba', not {backend!r}")
    if weights not in ("float32", "bfloat16"):
        raise ValueError(f"weights must be 'float32' or 'bfloat16', not {weights!r}")
    if backend == "numpy" and weights != "float32":
        raise ValueError("16-bit weight storage needs the numba backend (backend='numba'); "
                         "the NumPy reference keeps weights in its compute dtype")
    if backend == "numba":
        try:
            from .fast import RWKV7Numba
        except ImportError as e:
            raise ValueError(f"backend 'numba' is not available: {e}. Install it with "
                             "pip install numba, or use backend='numpy'") from e
        if np.dtype(dtype) != np.float32:
            raise ValueError("the numba backend computes in float32; for float64 use backend='numpy'")
    path = resolve_model_path(path)
    # bf16 storage: bf16 tensors stay memory-mapped as they are in the file (uint16 bits).
    tensors = read_checkpoint(path, dtype="bfloat16" if weights == "bfloat16" else dtype,
                              progress=progress)
    detect_version(tensors.keys())          # refuses RWKV-4/5/6, RC versions, fla/HF layouts
    check_x070_keys(tensors)                # every key present with the right shape, no extras
    if backend == "numba":
        model = RWKV7Numba(tensors, name=path.name, wkv=wkv, weight_dtype=weights, threads=threads)
    else:
        model = RWKV7(tensors, dtype=dtype, name=path.name, wkv=wkv)
        if threads is not None:
            _blas_threads(threads)
    model.path = path
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
