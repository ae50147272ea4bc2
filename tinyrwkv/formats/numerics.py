"""Element types and the conversions between them: bf16 <-> float32 (NumPy has no bf16), and the
rule for what a reader returns for each stored type and requested dtype; and check_finite, the
NaN/Inf check that models go through when loaded (tinyrwkv.load) and before they are written.

bf16 -> float32 is exact: a bf16 is the top half of a float32 (docs/formats.md). Released RWKV-7
weights are bf16; dtype="bfloat16" keeps them so, as uint16 bit patterns (BF16_BITS).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError
from .q8_0 import Q8_0Matrix

# read(..., dtype=BF16_BITS): floating tensors as bf16 bit patterns in np.uint16 arrays.
BF16_BITS = "bfloat16"


@dataclass(frozen=True, slots=True)
class DType:
    """One stored element type. Frozen and slotted: the .pth unpickler hands these objects to the
    pickle stream (as the value of `torch.BFloat16Storage` etc.), and a crafted pickle must not be
    able to change them (pickle's BUILD opcode sets attributes)."""
    name: str            # short name used in messages and by inspect_checkpoint: "bf16", "fp32", ...
    numpy: str           # little-endian NumPy dtype of the stored bytes ("<u2" for bf16)

    @property
    def itemsize(self):
        return np.dtype(self.numpy).itemsize

    @property
    def is_float(self):
        return self.name in ("bf16", "fp16", "fp32", "fp64")


BF16, FP16, FP32, FP64 = DType("bf16", "<u2"), DType("fp16", "<f2"), DType("fp32", "<f4"), \
    DType("fp64", "<f8")
I64, I32, I16, I8 = DType("i64", "<i8"), DType("i32", "<i4"), DType("i16", "<i2"), \
    DType("i8", "i1")
U8, BOOL = DType("u8", "u1"), DType("bool", "?")


def bf16_to_float32(bits):
    """bf16 bit patterns -> float32, exactly: a bf16 is the upper 16 bits of a float32, so this
    only shifts. `bits`: a np.uint16 array of any byte order, as `read_checkpoint(path,
    dtype="bfloat16")` returns (or np.int16, as torch's `t.view(torch.int16).numpy()` gives).
    Returns a new C-contiguous float32 array, same shape."""
    bits = np.asarray(bits)
    if bits.dtype.kind not in "ui" or bits.dtype.itemsize != 2:
        raise TypeError(f"bf16 bits are 16-bit integers (np.uint16), not {bits.dtype}")
    wide = bits.astype(np.uint32)              # new array, native byte order (int16: bits kept)
    if bits.dtype.kind == "i":
        wide &= 0xFFFF                         # int16 -> uint32 sign-extends; keep the 16 bits
    wide <<= 16                                # in place: peak memory is one float32 tensor
    return wide.view(np.float32)


def to_bf16_bits(x):
    """float32 array -> uint16 bf16 bit patterns, rounding to nearest, ties to even (as torch's
    `.to(torch.bfloat16)` does). NaNs stay NaN (quiet bit set); overflow rounds to +-inf.

    Used to write bf16 safetensors files, since NumPy has no bf16 type.
    """
    bits = np.asarray(x, dtype=np.float32, order="C").view(np.uint32)
    # Adding 0x7FFF plus the lowest kept bit rounds the discarded 16 bits to nearest-even;
    # a carry into the exponent is exactly right (it rounds up to the next binade or to inf).
    with np.errstate(over="ignore"):     # only NaN bit patterns wrap around; replaced below
        rounded = ((bits + (0x7FFF + ((bits >> 16) & 1))) >> 16).astype(np.uint16)
    quiet_nan = ((bits >> 16) | 0x0040).astype(np.uint16)
    return np.where(np.isnan(bits.view(np.float32)), quiet_nan, rounded)


def parse_target(dtype):
    """The dtype argument of the readers: None, BF16_BITS, or a NumPy floating dtype."""
    if isinstance(dtype, str) and dtype == BF16_BITS:
        return BF16_BITS
    target = None if dtype is None else np.dtype(dtype)
    if target is not None and target.kind != "f":
        raise ValueError(f"dtype must be None, 'bfloat16' or a floating dtype such as "
                         f"'float32', not {dtype!r}")
    return target


def result_dtype(stored, target):
    """The NumPy dtype a reader returns for a tensor stored as `stored` (a DType), asked for
    `target` (from parse_target): integers are never converted; bf16 widens to float32 unless
    kept as bits."""
    if not stored.is_float:
        return np.dtype(stored.numpy).newbyteorder("=")     # integers/bools: never converted
    if target is BF16_BITS:
        return np.dtype(np.uint16)                          # bf16 bit patterns
    if target is None:
        return np.dtype(np.float32) if stored == BF16 else np.dtype(stored.numpy).newbyteorder("=")
    return target


def convert_into(src, stored_type, target, dst):
    """Write the stored values `src` (the file's dtype and byte order) into `dst` (same shape, of
    result_dtype(stored_type, target))."""
    if stored_type == BF16 and target is BF16_BITS:
        np.copyto(dst, src)                         # bits as they are (byte order fixed)
    elif target is BF16_BITS and stored_type.is_float:     # float16/32/64 -> bf16, nearest even
        dst[...] = to_bf16_bits(src)
    elif stored_type == BF16 and dst.dtype == np.float32:
        wide = dst.view(np.uint32)                  # widen in place, copy then shift: 3.5 ms
        np.copyto(wide, src)                        # per 16 MB, faster than a casting left_shift
        wide <<= 16                                 # (5.3 ms) or an astype (13 ms)
    elif stored_type == BF16:                      # float64 (exact) or float16 (rounds), via f32
        np.copyto(dst, bf16_to_float32(src), casting="unsafe")
    else:
        np.copyto(dst, src, casting="unsafe")       # as astype: rounds; or a byte-order swap


def from_float32(array, target):
    """A float32 array (a dequantised GGUF tensor, say) as `target` asks: float32 for None,
    bf16 bits (rounded to nearest even) for BF16_BITS, else cast."""
    if target is BF16_BITS:
        return to_bf16_bits(array)
    if target is None or target == np.float32:
        return array
    return array.astype(target)


# ---------------------------------------------------------------------------------------------
# NaN and Inf: a damaged or diverged file is refused at load (and never written), by name
# ---------------------------------------------------------------------------------------------

# Elements checked per step: the boolean temporary stays at 4 MiB whatever the tensor's size (a
# whole-tensor np.isfinite would add a quarter of a float32 model's size at once). Measured on a
# 64 MB float32 matrix: as fast as one whole-tensor pass (4.7 ms, memory-bound).
FINITE_CHUNK = 1 << 22

LOAD_ANYWAY = "to load it anyway: check_finite=False, or --no-check-finite on the command line"


def nonfinite_count(array, bf16_bits=True):
    """How many NaN or +-Inf values `array` holds, read FINITE_CHUNK elements at a time along its
    first axis (any strides: a view is never copied whole). uint16 arrays are bf16 bit patterns
    (the readers' dtype="bfloat16") when bf16_bits, whose exponent bits are all ones for NaN and
    Inf; other integer and bool arrays hold neither. A Q8_0Matrix (an int8 tensor) is finite
    exactly when its float16 scales are (its quants are integers): those are counted."""
    if isinstance(array, Q8_0Matrix):
        array = array.scales()
    array = np.asarray(array)
    is_bits = bf16_bits and array.dtype == np.uint16
    if array.dtype.kind not in "fc" and not is_bits:
        return 0
    if array.size == 0:
        return 0
    if array.ndim == 0:
        array = array.reshape(1)
    row_size = array.size // len(array)
    rows = max(1, FINITE_CHUNK // row_size)
    scratch = np.empty(min(rows, len(array)) * row_size, np.uint16) if is_bits else None
    bad = 0
    for start in range(0, len(array), rows):
        block = array[start:start + rows]
        if is_bits:                     # sign bit dropped: NaN and Inf are the values >= 0x7F80
            magnitude = np.bitwise_and(block, 0x7FFF, out=scratch[:block.size].reshape(block.shape))
            if magnitude.max() >= 0x7F80:           # a max, no boolean temporary: 2x faster
                bad += int(np.count_nonzero(magnitude >= 0x7F80))
        elif not np.isfinite(block).all():          # the common case costs one pass, no count
            bad += int(block.size - np.count_nonzero(np.isfinite(block)))
    return bad


def check_finite(arrays, source, fix=None, bf16_bits=True):
    """Raise CheckpointError naming every tensor of `arrays` ({name: array}) that holds NaN or
    Inf. `source`: what the tensors are (a file path, "the merged model"), for the message;
    `fix`: what to do about it (default: the file is damaged, and how to load it anyway).
    One pass over the data (nonfinite_count): 3 ms for the shipped model, 0.3 s for 1.8 GB of
    float32 (L24 C1024 V65536), with 4 MiB of temporaries."""
    bad = {name: n for name, array in arrays.items()
           if (n := nonfinite_count(array, bf16_bits))}
    if not bad:
        return
    listed = ", ".join(f"{name} ({n:,} value{'s' if n > 1 else ''})"
                       for name, n in list(bad.items())[:4])
    more = f" and {len(bad) - 4} more" if len(bad) > 4 else ""
    fix = fix or ("the file is damaged or comes from a training run that diverged: re-download "
                  f"it or use an earlier checkpoint ({LOAD_ANYWAY})")
    raise CheckpointError(f"{source}: NaN or Inf in {len(bad)} tensor{'s' if len(bad) > 1 else ''}: "
                          f"{listed}{more}; {fix}")
