"""Q8_0: ggml's 8-bit block format, the one int8 layout tinyrwkv reads, writes and computes on.

A matrix (rows, cols) is stored row by row; each row is cols / 32 blocks of 32 consecutive
weights along the input axis, and a block is 34 bytes:

    bytes 0-1    d        float16 scale, little-endian
    bytes 2-33   q[0:32]  int8 quants
    weight j of the block = d * q[j]

so a row takes cols / 32 * 34 bytes (8.5 bits a weight) and a matrix is held as a uint8 array
(rows, cols / 32 * 34), byte for byte as in a GGUF file's Q8_0 tensor (ggml's `block_q8_0`,
ggml/src/ggml-common.h; docs/formats.md §4.5). That is why a Q8_0 GGUF loads with
storage="int8" without any conversion: the file's bytes, memory-mapped, are the storage.

Quantising (`quantize_q8_0`) is ggml's reference rule (quantize_row_q8_0_ref in
ggml/src/ggml-quants.c), computed in float32 as there:

    amax = max |x| over the block;  d = amax / 127;  id = 1 / d (0 when d == 0)
    q = roundf(x * id)      round half away from zero; note id comes from the float32 d
    stored d = float16(d)   round to nearest even

This module is the only copy of that rule: write_gguf (formats/gguf.py) writes q8_0 with it, and
the numba backend quantises a float checkpoint on load with it, so both give the same bytes
(tests/test_quantised.py checks them against the gguf package's quantiser as well).

Dequantising (`dequantize_q8_0`) is exact in float32: d has 11 significant bits and q 8, so
d * q needs at most 19 of float32's 24. The float64 reference therefore sees exactly the numbers
the int8 kernels compute with (backends/numba_cpu.py, `stored_tensors`).
"""

from __future__ import annotations

import numpy as np

BLOCK = 32                 # weights per block
BLOCK_BYTES = 2 + BLOCK    # the float16 scale, then the int8 quants
FLOAT16_MAX = 65504.0
# Rows quantised at a time: the float32 temporaries stay a few MiB whatever the tensor's size.
CHUNK_VALUES = 1 << 20


def blocks_per_row(cols, name="a tensor"):
    """cols / 32, or a ValueError naming the tensor: Q8_0 needs whole blocks in every row."""
    if cols % BLOCK:
        raise ValueError(f"{name} has rows of {cols} values, not a multiple of {BLOCK}, so it "
                         f"cannot be stored as int8 (Q8_0 blocks of {BLOCK} along each row); "
                         "use storage='float16' or 'bfloat16' for this model")
    return cols // BLOCK


def q8_0_shape(shape):
    """The values' shape (..., cols) -> the blocks' shape (..., cols / 32 * 34)."""
    return (*shape[:-1], shape[-1] // BLOCK * BLOCK_BYTES)


def values_shape(blocks_shape):
    """The blocks' shape (..., nbytes) -> the values' shape (..., nbytes / 34 * 32)."""
    return (*blocks_shape[:-1], blocks_shape[-1] // BLOCK_BYTES * BLOCK)


def round_half_away(v):
    """C's roundf, elementwise, exactly (np.round rounds half to even; v + 0.5 can round up
    in float32 before the truncation). The same formula as the gguf package's np_roundf."""
    a = np.abs(v)
    whole = np.floor(a)
    return np.copysign(whole + np.floor(2 * (a - whole)), v)


def quantize_q8_0(values, name="a tensor"):
    """float values (..., cols) -> Q8_0 blocks, uint8 (..., cols / 32 * 34), by ggml's rule (module
    docstring). `name` goes in the errors: rows that are not whole blocks, or a block whose
    scale does not fit float16 (|x| > 127 * 65504)."""
    values = np.asarray(values)
    blocks_per_row(values.shape[-1], name)
    rows = values.reshape(-1, values.shape[-1])
    out = np.empty(q8_0_shape(rows.shape), np.uint8)
    step = max(1, CHUNK_VALUES // max(rows.shape[1], 1))
    for start in range(0, rows.shape[0], step):
        x = rows[start: start + step].astype(np.float32).reshape(-1, BLOCK)   # (blocks, 32)
        d = np.abs(x).max(axis=1, keepdims=True) / np.float32(127)            # float32 (blocks, 1)
        with np.errstate(over="ignore", invalid="ignore"):    # NaN/Inf in: a NaN/Inf scale out,
            d16 = d.astype("<f2")                             # which load's check_finite names
            if np.any(np.isinf(d16) & np.isfinite(d)):
                raise ValueError(f"{name} has values up to {float(np.abs(x).max()):.3g}, too "
                                 f"large for Q8_0's float16 scale (at most "
                                 f"{127 * FLOAT16_MAX:.3g}); keep this model in float32 or "
                                 "bfloat16")
            inverse = np.divide(np.float32(1), d, out=np.zeros_like(d), where=d != 0)
            q = round_half_away(x * inverse).astype(np.int8)                   # in [-127, 127]
        block = out[start: start + step].reshape(-1, BLOCK_BYTES)             # (blocks, 34)
        block[:, :2] = d16.view(np.uint8)
        block[:, 2:] = q.view(np.uint8)
    return out.reshape(q8_0_shape(values.shape))


def dequantize_q8_0(blocks):
    """Q8_0 blocks, uint8 (..., nbytes) -> float32 values (..., nbytes / 34 * 32), exactly."""
    blocks = np.asarray(blocks)
    if blocks.dtype != np.uint8 or blocks.shape[-1] % BLOCK_BYTES:
        raise ValueError(f"Q8_0 blocks are uint8 rows of whole {BLOCK_BYTES}-byte blocks, not "
                         f"{blocks.dtype} {blocks.shape}")
    b = blocks.reshape(-1, BLOCK_BYTES)                                        # (blocks, 34)
    out = np.empty((b.shape[0], BLOCK), np.float32)
    step = max(1, CHUNK_VALUES // BLOCK)
    for start in range(0, b.shape[0], step):
        chunk = b[start: start + step]
        d = np.ascontiguousarray(chunk[:, :2]).view("<f2").astype(np.float32)  # (n, 1)
        np.multiply(chunk[:, 2:].view(np.int8), d, out=out[start: start + step])
    return out.reshape(values_shape(blocks.shape))


def scales(blocks):
    """The float16 scales d of Q8_0 blocks (..., nbytes): (..., nbytes / 34), a copy (the
    blocks' 2-byte scales sit at odd offsets, so they cannot be viewed in place)."""
    b = np.asarray(blocks).reshape(-1, BLOCK_BYTES)
    d = np.ascontiguousarray(b[:, :2]).view("<f2")
    return d.reshape(*np.shape(blocks)[:-1], -1)


class Q8_0Matrix:
    """A matrix held as Q8_0 blocks, with the shape of the values it stands for: how a loaded
    int8 tensor travels from the reader to the backend (tinyrwkv.load checks shapes against the
    schema, and the model reads its sizes from them, before the backend keeps `blocks` alone).

    blocks: uint8 (rows, cols / 32 * 34): a memory map of a GGUF's tensor, or quantised.
    shape:  (rows, cols), the values' shape.
    """

    def __init__(self, blocks, shape):
        if tuple(np.shape(blocks)) != q8_0_shape(tuple(shape)) or np.asarray(blocks).dtype != np.uint8:
            raise ValueError(f"Q8_0 blocks of a {tuple(shape)} matrix are uint8 "
                             f"{q8_0_shape(tuple(shape))}, not {np.asarray(blocks).dtype} "
                             f"{np.shape(blocks)}")
        self.blocks, self.shape = blocks, tuple(shape)

    @classmethod
    def quantize(cls, values, name="a tensor"):
        values = np.asarray(values)
        return cls(quantize_q8_0(values, name), values.shape)

    @property
    def ndim(self):
        return len(self.shape)

    def dequantize(self):
        return dequantize_q8_0(self.blocks)

    def scales(self):
        return scales(self.blocks)

    def __repr__(self):
        return f"Q8_0Matrix(shape={self.shape}, {self.blocks.nbytes:,} bytes)"
