"""`tinyrwkv.load`: from a checkpoint file to a ready model (and its tokenizer)."""

from __future__ import annotations

import re
import warnings
from pathlib import Path

import numpy as np

from .backends import NAMES as BACKENDS, STORAGE
from .checks import NON_NEGATIVE, POSITIVE, check_int
from .errors import CheckpointError
from .formats import numerics, open_model, resolve_model_path
from .formats.q8_0 import Q8_0Matrix, blocks_per_row
from .formats.source import TensorSource
from .model import RWKV7
from .schema import check_x070_keys, detect_version
from .tokenizer import TokenizerError, get_tokenizer


# Where the shipped model is: installed from a wheel, in the package (tinyrwkv/weights/, package
# data: see pyproject.toml); run from a checkout (source or `pip install -e .`), in the
# repository's top-level weights/.
WEIGHTS_DIRS = tuple(folder / "weights" for folder in Path(__file__).resolve().parents[:2])


def shipped_model_path():
    """The model shipped in weights/ (trained by `tinyrwkv train`, see weights/MODEL_CARD.md)."""
    for folder in WEIGHTS_DIRS:
        found = sorted(p for ext in ("*.pth", "*.safetensors") for p in folder.glob(ext))
        if found:
            return found[0]
    where = " or ".join(map(str, WEIGHTS_DIRS))
    raise CheckpointError(
        f"no model path given, and no shipped model was found in {where}: pass an RWKV-7 "
        "checkpoint (README: 'Official models'), or train one with `tinyrwkv train`")


def numba_missing():
    """None where numba can be imported; else why not, and how to get it. (Importing is the
    check: an installed numba can still fail to import, e.g. when built for another NumPy.)"""
    try:
        import numba  # noqa: F401
    except ImportError as e:
        return f"numba is not available ({e}); install it with: pip install numba"
    return None


def default_backend(dtype="float32"):
    """"numba" where numba imports and the dtype is float32; else the NumPy reference.
    (The GPU backend is never chosen silently: ask for backend="cupy" or a "cuda ..." strategy.)"""
    if np.dtype(dtype) != np.float32:
        return "numpy"
    return "numba" if numba_missing() is None else "numpy"


_PRECISIONS = {"fp32": "float32", "fp16": "float16", "bf16": "bfloat16"}


def parse_strategy(strategy):
    """The official `rwkv` package's strategy string -> (backend, storage, device).

    'cuda fp16' -> ("cupy", "float16", 0); 'cuda:1 bf16' -> ("cupy", "bfloat16", 1);
    'cpu fp32' -> (the default CPU backend, "float32", None); 'cpu bf16' -> ("numba", "bfloat16");
    'cpu fp16' -> ("numba", "float16") (16-bit weights, float32 compute, as for bf16).
    What tinyrwkv does not do (layers split over devices, the official package's i8/i4/i3
    weights, mps/dml) is refused by name; tinyrwkv's own int8 is storage="int8" (GGUF Q8_0).
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
        raise ValueError(f"strategy {strategy!r}: {precision}{quant} (the official package's "
                         f"quantised weights) is not supported; use '{device} {precision}', or "
                         "tinyrwkv's own int8 weights: storage='int8' (GGUF Q8_0 blocks, backend "
                         "numba; CLI --storage int8), which is not the official package's scheme")
    if device in ("mps", "dml"):
        raise ValueError(f"strategy {strategy!r}: device {device} is not supported; tinyrwkv "
                         "runs on 'cpu' (NumPy/Numba) and 'cuda' (CuPy)")
    storage = _PRECISIONS[precision]
    if device == "cpu":
        return (default_backend() if storage == "float32" else "numba"), storage, None
    return "cupy", storage, int(index or 0)


def _renamed(old, old_value, new, new_value, default=None):
    """A keyword under its old name still works for one release, with a DeprecationWarning."""
    if old_value is None:
        return new_value
    warnings.warn(f"tinyrwkv.load({old}=...) is now {new}=...; the old name goes in the next "
                  "release", DeprecationWarning, stacklevel=3)
    if new_value not in (None, default, old_value):
        raise ValueError(f"{old}= (the old name of {new}=) and {new}= disagree; pass {new}= only")
    return old_value


def load(path=None, dtype="float32", tokenizer=None, progress=None, wkv_method="auto",
         backend=None, storage=None, threads=None, strategy=None, device=None, *,
         check_finite=True, weights=None, wkv=None):
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
        wkv_method: "auto", "recurrent" or "chunked": how the sequence form runs the WKV
            operator (see RWKV7; the same function either way). With backend "numba", "auto" and
            "recurrent" use its compiled recurrence, "chunked" the NumPy chunked form; the cupy
            backend always runs its recurrence kernel.
        backend: "numpy" (the reference, model.py), "numba" (compiled CPU kernels,
            backends/numba_cpu.py), "cupy" (CUDA GPU, backends/cupy_gpu.py; needs CuPy), or
            None: numba where it is installed and dtype is float32, else numpy. `model.backend`
            says which one runs.
        storage: how the large matrices are kept: numba "float32" (default), "bfloat16",
            "float16" or "int8" (GGUF Q8_0 blocks: a Q8_0 GGUF is used as it is, memory-mapped;
            other files are quantised on load); cupy "float16" (default), "bfloat16" or
            "float32". Activations are float32 always.
        threads: threads for the CPU kernels and BLAS (default: all cores)
        strategy: instead of backend/storage, the official package's words: "cpu fp32",
            "cpu bf16", "cpu fp16", "cuda fp16", "cuda:1 bf16", "cuda fp32" (see parse_strategy)
        device: the CUDA device for backend "cupy" (default 0)
        check_finite: refuse a file with NaN or Inf in any tensor (CheckpointError naming them),
            checked as it is read: one pass over the weights (formats.numerics.check_finite;
            3 ms on the shipped model, 0.3 s per 1.8 GB). False loads it anyway (its outputs
            will be NaN).
        weights, wkv: the old names of storage and wkv_method (deprecated: they still work, with
            a DeprecationWarning, until the next release)
    Returns:
        a model with `.tokenizer` set (None if it could not be chosen: then `.tokenizer_error`
        says why, and generation raises it).
    """
    storage = _renamed("weights", weights, "storage", storage)
    _check_arguments(dtype, threads, device)
    wkv_method = _renamed("wkv", wkv, "wkv_method", wkv_method, default="auto")
    if strategy is not None:
        s_backend, s_storage, s_device = parse_strategy(strategy)
        for name, given, implied in (("backend", backend, s_backend), ("storage", storage, s_storage),
                                     ("device", device, s_device)):
            if given is not None and given != implied:
                raise ValueError(f"strategy {strategy!r} means {name}={implied!r}, but "
                                 f"{name}={given!r} was also given; pass one or the other")
        backend, storage, device = s_backend, s_storage, s_device
    backend = backend or default_backend(dtype)
    if backend not in BACKENDS:
        raise ValueError(f"backend must be one of {', '.join(BACKENDS)}, not {backend!r}")
    storage = storage or STORAGE[backend][0]
    if storage not in STORAGE[backend]:
        fix = ("; int8 storage (GGUF Q8_0 blocks) needs backend='numba'" if storage == "int8"
               else "; 16-bit storage needs backend='numba' (CPU) or 'cupy' (GPU)"
               if backend == "numpy" else "")
        raise ValueError(f"backend {backend!r} stores weights as {' or '.join(STORAGE[backend])}, "
                         f"not {storage!r}{fix}")
    if backend != "cupy" and device is not None:
        raise ValueError("device= is for backend='cupy' (a CUDA device number)")
    if backend == "numba":
        missing = numba_missing()           # say so before reading the file
        if missing:
            raise ValueError(f"backend 'numba': {missing} (or use backend='numpy')")
    if backend in ("numba", "cupy") and np.dtype(dtype) != np.float32:
        raise ValueError(f"the {backend} backend computes in float32; for float64 use "
                         "backend='numpy'")
    if backend == "cupy":
        from .backends.cupy_gpu import check_available
        check_available(device or 0)         # before reading a large file: say so now
    path = shipped_model_path() if path is None else resolve_model_path(path)
    source = open_model(path)               # any format, official keys (tinyrwkv/formats)
    if backend == "numba" and storage in ("float16", "int8"):
        source = StoredForm(source, storage)     # converted a tensor at a time, as it is read
    tensors = source.read_all(dtype=_read_dtype(source, backend, dtype, storage), progress=progress)
    return _build(tensors, path, backend, dtype, wkv_method, storage, threads, device,
                  tokenizer, source.tokenizer, check_finite)


def _check_arguments(dtype, threads, device):
    """What load's arguments must be, before they reach NumPy or a backend (threads=0 and a
    dtype NumPy does not know would otherwise fail there, or not at all)."""
    try:
        np.dtype(dtype)
    except TypeError:
        raise ValueError(f"dtype must be 'float32' or 'float64', not {dtype!r}") from None
    if threads is not None:
        check_int("threads", threads, POSITIVE)
    if device is not None:
        check_int("device", device, NON_NEGATIVE)


class StoredForm(TensorSource):
    """`source`, read one tensor at a time, each converted at once to what the numba backend keeps
    for storage "float16" or "int8" (backends/numba_cpu.py, `stored_form`): the big matrices in
    the storage type, everything else float32. So loading holds the stored model plus one tensor
    in conversion, never a float32 copy of the model.

    int8: a GGUF tensor stored as Q8_0 is not read at all: its blocks are memory-mapped and become
    the storage as they are (a Q8_0Matrix); any other is read as float32 and quantised by ggml's
    rule (formats/q8_0.py), so a float checkpoint gives the bytes `tinyrwkv convert --type q8_0`
    writes. float16: an fp16/f16 tensor is read as float16 (no conversion), any other as float32
    and rounded to nearest.
    """

    def __init__(self, source, storage):
        from .backends.numba_cpu import BIG_MATRICES
        self.source, self.storage, self.big = source, storage, BIG_MATRICES
        self.path, self.format, self.tokenizer = source.path, source.format, source.tokenizer
        self.infos = source.tensors()

    def tensors(self):
        return self.infos

    def read(self, key, dtype=None):
        from .backends.numba_cpu import stored_form
        info = self.infos[key]
        if not key.endswith(self.big):
            return self.source.read(key, "float32")
        if self.storage == "int8":
            if info.dtype == "q8_0" and hasattr(self.source, "quantized"):
                stored = self.source.quantized(key)                 # a memory map of the file
                if not stored.transposed and tuple(stored.shape) == tuple(info.shape):
                    return Q8_0Matrix(stored.blocks, info.shape)
            blocks_per_row(info.shape[-1], key)          # refused before anything is read
            return Q8_0Matrix(stored_form(key, self.source.read(key, "float32"), "int8"),
                              info.shape)
        as_stored = info.dtype in ("fp16", "f16")
        return stored_form(key, self.source.read(key, "float16" if as_stored else "float32"),
                           "float16")


def _read_dtype(source, backend, dtype, storage):
    """How to read the tensors. 16-bit storage: bf16 tensors stay memory-mapped as they are in
    the file (uint16 bits); the GPU converts them to its storage type itself. Otherwise the
    compute dtype (a float32 file read as float32 stays memory-mapped too). (float16 and int8
    storage on the numba backend read through StoredForm, which chooses per tensor.)"""
    if isinstance(source, StoredForm):
        return None
    if storage == "bfloat16":
        return "bfloat16"
    if backend == "cupy":
        stored = {info.dtype for info in source.tensors().values()}
        return "bfloat16" if stored == {"bf16"} else None
    return dtype


def _build(tensors, path, backend, dtype, wkv_method, storage, threads, device, tokenizer,
           own_tokenizer, check_finite=True):
    """The model object for the tensors of `path`, checked, with its tokenizer (`own_tokenizer`:
    one the file carried, e.g. a GGUF's vocabulary; an explicit `tokenizer` wins). Whichever
    tokenizer it is, get_tokenizer checks it against the embedding's rows."""
    detect_version(tensors.keys(), source=path)   # refuses RWKV-4/5/6, RC versions, ...
    check_x070_keys(tensors, source=path)   # every key present with the schema's shape, no extras
    if check_finite:
        numerics.check_finite(tensors, path)   # no NaN/Inf: they would only show as empty output
    if backend == "cupy":
        from .backends.cupy_gpu import RWKV7CuPy
        model = RWKV7CuPy(tensors, name=path.name, wkv_method=wkv_method, storage=storage,
                          device=device or 0)
    elif backend == "numba":
        from .backends.numba_cpu import RWKV7Numba
        model = RWKV7Numba(tensors, name=path.name, wkv_method=wkv_method, storage=storage,
                           threads=threads)
    else:
        model = RWKV7(tensors, dtype=dtype, name=path.name, wkv_method=wkv_method)
        if threads is not None:
            _blas_threads(threads)
    model.path = path
    try:
        model.tokenizer = get_tokenizer(model.config.vocab_size, tokenizer, model_path=path,
                                        carried=own_tokenizer)
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
