"""A model file whose tensors carry another tool's names and layouts (fla, llama.cpp), read as
official keys: a table says, for each official key, which stored tensor holds it and how it is
laid out there; the schema (tinyrwkv/schema.py) gives the official shape to restore.

How a tensor is stored, in the tables of formats/hf.py and formats/gguf.py:
    "same"        as the official tensor (maybe squeezed: (1, 1, C) stored as (C,))
    "T"           transposed (the LoRA matrices: fla and llama.cpp store (D, C) for w1 (C, D))
    ("part", j, n)  row j of a stored (n, ...) stack (llama.cpp fuses the six lerps x_r..x_g)
Reading restores the official stored shape with a reshape, so "same" also covers squeezed
vectors and flattened r_k (H, N) -> (C,).
"""

from __future__ import annotations

import math

import numpy as np

from ..errors import CheckpointError
from .source import TensorInfo, TensorSource


def restore(array, how, shape):
    """A stored tensor -> the official tensor of `shape` (see the module docstring)."""
    if how == "T":
        return np.ascontiguousarray(array.T).reshape(shape)          # (D, C) -> (C, D)
    if isinstance(how, tuple):                                       # ("part", j, n)
        _, j, n = how
        return array.reshape(n, -1)[j].reshape(shape)                # (n, ..., C) -> (1, 1, C)
    return array.reshape(shape)


def fits(stored, how, shape):
    """Whether a stored tensor of shape `stored` can hold the official tensor of `shape`: the same
    shape once axes of length 1 are dropped (transposed for "T", with the stack's axis first for
    a part), or a flattened copy (1-D, as many numbers)."""
    squeeze = lambda s: tuple(d for d in s if d != 1)
    if how == "T":
        return tuple(stored) == tuple(reversed(shape))
    if isinstance(how, tuple):
        return squeeze(stored) == (how[2],) + squeeze(shape)
    return squeeze(stored) == squeeze(shape) or (len(stored) == 1 and stored[0] == math.prod(shape))


class Renamed(TensorSource):
    """Official keys over a file with other names.

    Args:
        path, format: for messages and descriptions.
        table: {official key: (stored name, how)}, in the order to present the keys.
        shapes: {official key: official stored shape} (schema.x070_shapes for the file's sizes).
        raw: the file's own tensors: an object with infos() -> {stored name: TensorInfo} and
            read(stored name, dtype) -> array.
        ignored: stored names that are known and deliberately dropped (llama.cpp's layer-0
            copies of a0/a1/a2 in v0/v1/v2).
        tokenizer: the vocabulary the file carries, or None.
    Raises CheckpointError (naming the file, the tensor and the fix) when a stored tensor is
    missing, has a size that does not fit, or is not known at all.
    """

    def __init__(self, path, format, table, shapes, raw, ignored=(), tokenizer=None):
        self.path, self.format, self.table, self.shapes, self.raw = path, format, table, shapes, raw
        self.tokenizer = tokenizer
        infos = raw.infos()
        problems = []
        for key, (name, how) in table.items():
            info = infos.get(name)
            if info is None:
                problems.append(f"no tensor {name} (official {key})")
            elif not fits(info.shape, how, shapes[key]):
                problems.append(f"{name} has shape {info.shape}, which does not fit {key} "
                                f"{shapes[key]}")
        used = {name for name, _ in table.values()} | set(ignored)
        unknown = [name for name in infos if name not in used]
        if unknown:
            problems.append(f"{len(unknown)} tensors that RWKV-7 has no place for: "
                            f"{', '.join(unknown[:5])}")
        if problems:
            more = f" (and {len(problems) - 5} more)" if len(problems) > 5 else ""
            raise CheckpointError(f"{path} is not a complete RWKV-7 x070 model in the {format} "
                                  f"layout: {'; '.join(problems[:5])}{more}. The file is damaged "
                                  "or a different model; re-convert it from the original "
                                  "checkpoint (layouts: docs/formats.md)")
        self._infos = infos

    def tensors(self):
        return {key: TensorInfo(self.shapes[key], self._infos[name].dtype)
                for key, (name, _) in self.table.items()}

    def read(self, key, dtype=None):
        name, how = self.table[key]
        return restore(self.raw.read(name, dtype), how, self.shapes[key])
