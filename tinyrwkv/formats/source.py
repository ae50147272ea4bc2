"""What every reader returns: a `TensorSource`, a model file opened but not yet read.

    source.tensors()          {official key: TensorInfo(shape, dtype)}, from headers only
    source.read(key, dtype)   one tensor, as an array (a conversion streams: one key at a time)
    source.read_all(dtype)    every tensor (loading; containers read on several threads)
    source.tokenizer          the vocabulary the file carries (GGUF, HF folder), or None
    source.description        e.g. "GGUF (llama.cpp rwkv7), stored f32, q8_0"

`dtype` everywhere: None (as stored, except bf16 and GGUF types -> float32), a NumPy floating
dtype, or "bfloat16" (bf16 bit patterns in np.uint16 arrays; see formats/numerics.py).
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .numerics import BF16_BITS, bf16_to_float32, check_finite, parse_target, to_bf16_bits
from .progress import choose_progress


@dataclass(frozen=True)
class TensorInfo:
    """A tensor as stored: its shape under the official key, and its element type's short name
    ("bf16", "fp16", "fp32", ... for containers; "f32", "f16", "q8_0", ... for GGUF)."""
    shape: tuple
    dtype: str


class TensorSource:
    """Base of the readers; subclasses give `tensors()` and `read()`."""
    format = "tensors"            # a short label: "pth", "safetensors", "gguf", "hf-folder", ...
    path: Path | None = None
    tokenizer = None

    def tensors(self):
        raise NotImplementedError

    def read(self, key, dtype=None):
        raise NotImplementedError

    def keys(self):
        return list(self.tensors())

    @property
    def nbytes(self):
        """Bytes of tensor data (for progress): numel x itemsize of the stored type."""
        return sum(int(np.prod(t.shape)) * _itemsize(t.dtype) for t in self.tensors().values())

    @property
    def description(self):
        dtypes = sorted({t.dtype for t in self.tensors().values()})
        return f"{self.format}, stored {', '.join(dtypes)}"

    def read_all(self, dtype=None, progress=None):
        """{key: array} for every tensor, one read at a time, reporting progress by bytes."""
        label = self.path.name if self.path is not None else "tensors"
        report, bar = choose_progress(progress, label, self.nbytes)
        try:
            infos, done, out = self.tensors(), 0, {}
            if report:
                report(0, self.nbytes)
            for key, info in infos.items():
                out[key] = self.read(key, dtype)
                done += int(np.prod(info.shape)) * _itemsize(info.dtype)
                if report:
                    report(done, self.nbytes)
            return out
        finally:
            if bar is not None:
                bar.close()


def _itemsize(name):
    """Bytes per element of a stored type name, for progress only (GGUF block types: ~1)."""
    sizes = {"fp64": 8, "i64": 8, "fp32": 4, "f32": 4, "i32": 4, "bf16": 2, "fp16": 2,
             "f16": 2, "i16": 2}
    return sizes.get(name, 1)


class InMemory(TensorSource):
    """A dict {key: array} as a source (merged weights, a model built in memory). uint16 arrays
    are bf16 bit patterns, as the readers return them."""
    format = "arrays"

    def __init__(self, arrays, tokenizer=None):
        self.arrays = arrays
        self.tokenizer = tokenizer

    def tensors(self):
        names = {np.dtype(np.uint16): "bf16", np.dtype(np.float32): "fp32",
                 np.dtype(np.float16): "fp16", np.dtype(np.float64): "fp64"}
        return {k: TensorInfo(tuple(np.shape(v)), names.get(np.asarray(v).dtype,
                                                             str(np.asarray(v).dtype)))
                for k, v in self.arrays.items()}

    def read(self, key, dtype=None):
        array = np.asarray(self.arrays[key])
        target = parse_target(dtype)
        if array.dtype == np.uint16:                     # bf16 bits
            return array if target is BF16_BITS else _cast(bf16_to_float32(array), target)
        if array.dtype.kind != "f":
            return array
        if target is BF16_BITS:
            return to_bf16_bits(array)
        return _cast(array, target)


def _cast(array, target):
    return array if target is None else array.astype(target, copy=False)


def as_source(weights):
    """A TensorSource for `weights`: itself, or an InMemory around a dict."""
    return weights if isinstance(weights, TensorSource) else InMemory(weights)


class FiniteOnly(TensorSource):
    """A TensorSource that refuses, with a CheckpointError naming it, any tensor holding NaN or
    Inf as it is read: a writer streaming from it stops at that tensor."""

    def __init__(self, source, what, fix):
        self.source, self.what, self.fix = source, what, fix
        self.path, self.format, self.tokenizer = source.path, source.format, source.tokenizer

    def tensors(self):
        return self.source.tensors()

    def read(self, key, dtype=None):
        array = self.source.read(key, dtype)
        check_finite({key: array}, self.what, fix=self.fix)
        return array
