"""GGUF (llama.cpp's format) in and out for RWKV-7: read by our own header parser, written (and
quantised tensors decoded) with the `gguf` package (pip install gguf).

    source = open_gguf("model.gguf")      # a TensorSource: official keys, nothing read yet
    source.read("blocks.0.att.key.weight")                 # float32 (C, C), dequantised
    source.quantized("blocks.0.att.key.weight")            # the raw q8_0 blocks, not widened
    write_gguf("out.gguf", weights, out_type="q8_0", tokenizer=model.tokenizer)

The layout is llama.cpp's RWKV7 architecture (its HF->GGUF converter, Rwkv7Model; docs/formats.md):
the six time-mix lerps fused into one (6, 1, 1, C) tensor, the LoRA matrices transposed, r_k
flattened, vectors squeezed, and in layer 0 **copies of a0/a1/a2 where v0/v1/v2 go**: llama.cpp
requires layer-0 v tensors, although layer 0 never uses them. Those copies have the rank Da, not
Dv (0.1B: Da = 64, Dv = 32), so the reader drops them: a model read from a GGUF has no layer-0
v0/v1/v2, like one read from fla, and validates and converts like any other.

Reading: the header through our own bounded parser (formats/gguf_header.py: every count and
offset checked against the file before anything is allocated; the `gguf` package's GGUFReader
never sees the file), then the metadata checked against the tensors' shapes, which are the truth:
block_count, embedding_length, feed_forward_length and the LoRA ranks must agree with them.
The head size is the exception: llama.cpp flattens r_k (H, N) to (C,), so rwkv7.wkv.head_size is
the only place N is written and **it cannot be cross-checked** (it must divide C; a wrong divisor,
head_size=16 on a model with heads of 32, loads as a different model).

Quantised tensors (q8_0, q4_0, K-quants) are widened to float32 by `read` with the `gguf`
package's dequantisers (f32/f16/bf16 need no package). `quantized(key)` gives a tensor's blocks
as stored, memory-mapped: the numba backend's storage="int8" computes on q8_0 blocks as they
are (formats/q8_0.py), and `write_gguf` writes q8_0 with that module's quantiser (ggml's rule,
bit for bit), the other quantised types with the gguf package's.
Reading uses plain file reads, one tensor at a time, and writing uses the gguf package's
streaming mode (tensor infos first, then each tensor's data as it is made), so converting to or
from GGUF holds one tensor, not the model.
"""

from __future__ import annotations

import math
import re
import warnings
from dataclasses import dataclass

import numpy as np

from ..errors import CheckpointError
from ..files import atomic_path
from ..schema import LAYER0_UNUSED, ModelSize, layer_count, sizes_from_shapes
from .gguf_header import UNQUANTISED, read_gguf_header
from .gguf_vocab import add_tokenizer, read_tokenizer
from .numerics import (BF16_BITS, FP32, bf16_to_float32, from_float32, parse_target,
                       result_dtype, to_bf16_bits)
from .q8_0 import quantize_q8_0
from .reading import read_exactly
from .renamed import Renamed
from .source import TensorInfo, as_source

ARCH = "rwkv7"
OUT_TYPES = ("f32", "f16", "bf16", "q8_0", "q5_0", "q4_1", "q4_0")
_FILE_TYPES = {"f32": 0, "f16": 1, "q4_0": 2, "q4_1": 3, "q8_0": 7, "q5_0": 8, "bf16": 32}

# official name inside a block -> GGUF name inside blk.{i}. (stored "same" or transposed "T")
_BLOCK = {"ln1.weight": "attn_norm.weight", "ln1.bias": "attn_norm.bias",
          "ln2.weight": "attn_norm_2.weight", "ln2.bias": "attn_norm_2.bias",
          "att.k_k": "time_mix_k_k.weight", "att.k_a": "time_mix_k_a.weight",
          "att.r_k": "time_mix_r_k.weight",                          # (H, N) flattened to (C,)
          "att.receptance.weight": "time_mix_receptance.weight",
          "att.key.weight": "time_mix_key.weight", "att.value.weight": "time_mix_value.weight",
          "att.output.weight": "time_mix_output.weight",
          "att.ln_x.weight": "time_mix_ln.weight", "att.ln_x.bias": "time_mix_ln.bias",
          "ffn.x_k": "channel_mix_lerp_k.weight", "ffn.key.weight": "channel_mix_key.weight",
          "ffn.value.weight": "channel_mix_value.weight"}
LERPS = "rwkvag"                  # the order of the fused lerp's six rows
# Bytes of rows (de)quantised at a time: gguf.quants makes several float32 temporaries the size
# of its input, which for a whole (V, C) embedding would triple a conversion's memory.
_CHUNK_BYTES = 4 * 2**20


def gguf_module(what="GGUF files"):
    """The `gguf` package (quantised tensors and writing need it), or a CheckpointError saying
    how to install it: `what` names what needs it."""
    try:
        import gguf
    except ImportError as e:
        raise CheckpointError(f"{what} need the `gguf` package: pip install gguf "
                              "(or pip install -e '.[gguf]')") from e
    return gguf


def gguf_table(n_layer, layer0_v=False):
    """{official key: (GGUF name, how)} (how: formats/renamed.py). layer0_v adds llama.cpp's
    layer-0 v0/v1/v2, which hold copies of a0/a1/a2 (the writer's view; the reader drops them)."""
    table = {"emb.weight": ("token_embd.weight", "same"),
             "blocks.0.ln0.weight": ("token_embd_norm.weight", "same"),
             "blocks.0.ln0.bias": ("token_embd_norm.bias", "same")}
    for i in range(n_layer):
        b, g = f"blocks.{i}.", f"blk.{i}."
        table.update({b + k: (g + name, "same") for k, name in _BLOCK.items()})
        table.update({b + f"att.x_{c}": (g + "time_mix_lerp_fused.weight", ("part", j, 6))
                      for j, c in enumerate(LERPS)})
        for x in "wavg":
            if x == "v" and i == 0 and not layer0_v:
                continue
            if x != "g":
                table[b + f"att.{x}0"] = (g + f"time_mix_{x}0.weight", "same")
            table[b + f"att.{x}1"] = (g + f"time_mix_{x}1.weight", "T")     # (C, D) -> (D, C)
            table[b + f"att.{x}2"] = (g + f"time_mix_{x}2.weight", "T")     # (D, C) -> (C, D)
    table.update({"ln_out.weight": ("output_norm.weight", "same"),
                  "ln_out.bias": ("output_norm.bias", "same"),
                  "head.weight": ("output.weight", "same")})
    return table


def official_gguf_name(name):
    """The official key of a GGUF tensor stored as it is ("same" in gguf_table: not fused, not
    transposed), or None: for adapters (formats/lora.py). Looked up in one layer's table, so a
    name with a huge layer number costs nothing."""
    match = re.fullmatch(r"blk\.(0|[1-9][0-9]*)\.(.+)", name)
    if match is None:
        return _TOP_LEVEL.get(name)
    layer, rest = match.groups()
    key = _SAME_IN_LAYER.get(rest)
    return None if key is None else f"blocks.{layer}.{key}"


_SAME_IN_LAYER = {name[len("blk.1."):]: key[len("blocks.1."):]
                  for key, (name, how) in gguf_table(2).items()
                  if how == "same" and name.startswith("blk.1.")}
_TOP_LEVEL = {name: key for key, (name, how) in gguf_table(0).items() if how == "same"}


# ---- reading ----

@dataclass
class QuantizedTensor:
    """A GGUF tensor as stored, not widened (GGUFModel.quantized).

    blocks: uint8 (rows, bytes per row), a read-only memory map of the file: each row is
        cols / block_size blocks of ggml type `ggml_type` (q8_0: 32 int8 + an fp16 scale).
    shape: (rows, cols), the numpy shape of the values in the GGUF (ne reversed).
    transposed: the official tensor is shape's transpose (the LoRA matrices w1, w2, ...).
    """
    name: str
    ggml_type: str
    shape: tuple
    blocks: np.ndarray
    transposed: bool


class GGUFTensors:
    """A GGUF file's tensors by GGUF name: the header from our bounded parser
    (formats/gguf_header.py), the data by plain reads (not a memory map: mapped pages would stay
    in this process's memory). f32/f16/bf16 are decoded with NumPy; the quantised types need the
    `gguf` package (checked when the file is opened, so a missing package is said at once)."""

    def __init__(self, header):
        self.path, self.by_name = header.path, header.tensors
        quantised = sorted({t.type_name for t in self.by_name.values()} - set(UNQUANTISED))
        self.gguf = gguf_module(f"{self.path} holds {', '.join(quantised)} tensors, which") \
            if quantised else None

    def infos(self):
        return {name: TensorInfo(t.shape, t.type_name) for name, t in self.by_name.items()}

    def read(self, name, dtype=None):
        """One tensor, read from the file _CHUNK_BYTES of rows at a time and decoded straight
        into the result: every type to float32 (quantised ones dequantised), then as `dtype`
        asks; stored bytes that already are the answer (f32 as float32, f16 as float16, bf16 as
        bf16 bits) are copied as they are."""
        t, target = self.by_name[name], parse_target(dtype)
        exact = _exact_view(t.type_name, target)
        out = np.empty(t.shape, exact or result_dtype(FP32, target))
        rows = out.reshape(-1, t.shape[-1])                         # (R, cols)
        row_bytes = t.row_bytes
        step = max(1, _CHUNK_BYTES // row_bytes)
        buffer = np.empty(min(step, rows.shape[0]) * row_bytes, np.uint8)
        with open(self.path, "rb", buffering=0) as f:
            for i in range(0, rows.shape[0], step):
                n = min(step, rows.shape[0] - i)
                raw = buffer[: n * row_bytes]
                read_exactly(f, self.path, t.offset + i * row_bytes, raw)
                raw = raw.reshape(n, row_bytes)                     # (n, bytes per row)
                rows[i: i + n] = raw.view(exact) if exact else \
                    from_float32(self._float32(raw, t), target)
        return out

    def _float32(self, raw, t):
        """Rows of stored bytes (n, bytes per row) -> float32 values (n, cols)."""
        if t.type_name == "f32":
            return raw.view("<f4")
        if t.type_name == "f16":
            return raw.view("<f2").astype(np.float32)
        if t.type_name == "bf16":
            return bf16_to_float32(raw.view("<u2"))
        try:
            values = self.gguf.quants.dequantize(raw, self.gguf.GGMLQuantizationType(t.type_id))
        except NotImplementedError:                   # an older gguf without this dequantiser
            raise CheckpointError(f"{self.path}: the installed gguf package cannot dequantise "
                                  f"{t.type_name} (tensor {t.name}); upgrade it: "
                                  "pip install -U gguf") from None
        return values.astype(np.float32, copy=False)


def _exact_view(type_name, target):
    """The stored element type when the stored bytes already are what `target` asks for."""
    floating = target is not None and target is not BF16_BITS
    if type_name == "bf16" and target is BF16_BITS:
        return np.dtype("<u2")
    if type_name == "f16" and floating and target == np.float16:
        return np.dtype("<f2")
    if type_name == "f32" and (target is None or floating and target == np.float32):
        return np.dtype("<f4")
    return None


class GGUFModel(Renamed):
    """An RWKV7 GGUF as a TensorSource, plus `quantized(key)` for the stored blocks."""

    def quantized(self, key):
        """The stored form of the tensor under official `key`, without dequantising: its GGUF
        name, ggml type ("q8_0", "f16", ...), shape as stored and blocks (a lazy memory map),
        and whether the official tensor is its transpose. The fused lerps have no stored form
        of their own (they are rows of one (6, 1, 1, C) tensor): ValueError."""
        name, how = self.table[key]
        if isinstance(how, tuple):
            raise ValueError(f"{key} is row {how[1]} of {name}, not a tensor of its own")
        t = self.raw.by_name[name]
        rows = math.prod(t.shape[:-1])
        blocks = np.memmap(self.path, np.uint8, "r", offset=t.offset, shape=(rows, t.row_bytes))
        return QuantizedTensor(name, t.type_name, t.shape, blocks, how == "T")


def open_gguf(path):
    """An RWKV7 GGUF (ours, or llama.cpp's converter's) as a GGUFModel with official keys, and
    the vocabulary it carries as its tokenizer. Reads only the header (gguf_header.py: every
    count and offset checked against the file), then checks the metadata against the tensors'
    shapes (_sizes): the shapes are the truth, metadata that disagrees is an error."""
    header = read_gguf_header(path)
    arch, kind = header.string("general.architecture"), header.string("general.type")
    if arch != ARCH:
        what = f"GGUF architecture {arch!r}" if arch else "a GGUF without general.architecture"
        raise CheckpointError(f"{path}: {what}; tinyrwkv reads RWKV-7 ('{ARCH}') GGUFs only")
    if kind == "adapter":
        raise CheckpointError(f"{path} is a llama.cpp LoRA adapter, not a model: merge it into "
                              "its base model with `tinyrwkv merge-lora BASE ADAPTER.gguf OUT`")
    raw = GGUFTensors(header)
    size = _sizes(raw.infos(), header, path)
    ignored = {f"blk.0.time_mix_v{n}.weight" for n in "012"}       # llama.cpp's dummies
    return GGUFModel(path, "GGUF (llama.cpp rwkv7)", gguf_table(size.n_layer),
                     size.shapes(layer0_v=False), raw, ignored,
                     read_tokenizer(header, size.vocab_size))


def _sizes(infos, header, path):
    """The model's sizes from the GGUF's tensor shapes (R5), each metadata size checked against
    them (_check_metadata).

    The one exception is the head size N: llama.cpp's layout flattens r_k (H, N) to (C,), and no
    other tensor has H or N in its shape (k_k, ln_x, ... are all (C,)), so N comes from
    rwkv7.wkv.head_size and **cannot be cross-checked**: it must be a positive divisor of C, but
    a wrong one (head_size=16 on a model trained with heads of 32) loads as 4x16 heads and
    computes a different model. Only the file's converter can vouch for it; a head size other
    than the releases' 64 is loaded with a warning that says so."""
    L = layer_count(infos, "blk.", path)
    V, C = _matrix(infos, "token_embd.weight", path)
    D = lambda x, i: _matrix(infos, f"blk.{i}.time_mix_{x}1.weight", path)[0]   # (D, C)
    ranks = (D("w", 0), D("a", 0), D("v", 1) if L > 1 else None, D("g", 0))
    F = _matrix(infos, "blk.0.channel_mix_key.weight", path)[0]
    N = _head_size(header, C, path)
    _check_metadata(header, path, {"block_count": L, "embedding_length": C,
                                   "feed_forward_length": F,
                                   "attention.decay_lora_rank": ranks[0],
                                   "attention.iclr_lora_rank": ranks[1],
                                   "attention.value_residual_mix_lora_rank": ranks[2],
                                   "attention.gate_lora_rank": ranks[3]})
    return ModelSize(L, C, V, N, F, ranks)


def _matrix(infos, name, path):
    """The NumPy shape of a tensor that must be 2-D, or a CheckpointError naming it."""
    info = infos.get(name)
    if info is None or len(info.shape) != 2:
        problem = "no tensor " + name if info is None else f"{name} of shape {info.shape}, not 2-D"
        raise CheckpointError(f"{path} is an rwkv7 GGUF with {problem}, which gives the model's "
                              "sizes; the file is damaged or incomplete: re-convert it")
    return info.shape


# The head size of every released RWKV-7 (docs/architecture.md §8).
RELEASED_HEAD_SIZE = 64


def _head_size(header, C, path):
    """rwkv7.wkv.head_size: present, a positive integer dividing C (all that can be checked:
    _sizes)."""
    key = f"{ARCH}.wkv.head_size"
    N = header.integer(key)
    if N is None:
        problem = f"no {key}"
    elif N <= 0:
        problem = f"{key} = {N}"
    elif C % N:
        problem = f"{key} = {N}, which does not divide the width C = {C} into heads"
    else:
        if N != RELEASED_HEAD_SIZE:         # not silent: the one size nothing can confirm
            warnings.warn(f"{path}: head size {N} from the metadata ({key}); no tensor of "
                          f"llama.cpp's layout can confirm it, and every released RWKV-7 uses "
                          f"{RELEASED_HEAD_SIZE}. If this model was not trained with heads of "
                          f"{N}, its output is wrong: re-convert it from the original checkpoint",
                          stacklevel=2)
        return N
    raise CheckpointError(f"{path} is an rwkv7 GGUF with {problem}; the head size is read from "
                          "this metadata (llama.cpp's layout flattens r_k), so the file is "
                          "damaged or incomplete: re-convert it")


def _check_metadata(header, path, sizes):
    """Each rwkv7.<key> the file has must equal the size its tensors show (`sizes`: key ->
    size, None where the tensors do not show it: Dv of a one-layer model). block_count must be
    there (llama.cpp sizes its model by it); the others are checked where present."""
    key = f"{ARCH}.block_count"
    if not header.integer(key):
        raise CheckpointError(f"{path} is an rwkv7 GGUF without a positive {key} (it has "
                              f"{header.metadata.get(key)!r}); the file is damaged or "
                              "incomplete: re-convert it")
    wrong = []
    for name, size in sizes.items():
        value = header.integer(f"{ARCH}.{name}")
        if value is not None and size is not None and value != size:
            wrong.append(f"{ARCH}.{name} = {value} but the tensors say {size}")
    if wrong:
        raise CheckpointError(f"{path}: its GGUF metadata disagrees with its tensor shapes: "
                              f"{'; '.join(wrong)}. The shapes are the model, so the file is "
                              "damaged or was edited: re-convert it")


# ---- writing ----

def _always_f32(name, shape):
    """llama.cpp's converter keeps these F32 whatever the file type: 1-D tensors, the decay
    LoRA and the fused lerps."""
    return len(shape) == 1 or any(s in name for s in ("time_mix_w1", "time_mix_w2", "lerp_fused"))


def _write_plan(infos, n_layer):
    """[(GGUF name, written shape, official keys, how)] in writing order. Layer 0's v0/v1/v2
    are written as copies of a0/a1/a2, as llama.cpp's converter does (the module docstring)."""
    plan, fused = [], set()
    for key, (name, how) in gguf_table(n_layer, layer0_v=True).items():
        source = key.replace("att.v", "att.a") if key in LAYER0_UNUSED else key
        shape = infos[source].shape
        if isinstance(how, tuple):                       # the six lerps: one (6, 1, 1, C) tensor
            if name not in fused:
                fused.add(name)
                keys = tuple(key.rsplit("x_", 1)[0] + f"x_{c}" for c in LERPS)
                plan.append((name, (6, 1, 1, math.prod(shape)), keys, "stack"))
        elif how == "T":
            plan.append((name, tuple(reversed(shape)), (source,), "T"))
        elif len(shape) == 2 and not key.endswith("att.r_k"):
            plan.append((name, tuple(shape), (source,), "same"))           # matrices as stored
        else:
            plan.append((name, (math.prod(shape),), (source,), "flat"))    # vectors, r_k: (C,)
    return plan


def _build(source, keys, how, shape):
    """One GGUF tensor (float32, `shape`) from the official tensors `keys` of `source`."""
    arrays = [np.asarray(source.read(k, "float32"), np.float32) for k in keys]
    if how == "stack":
        return np.stack([a.reshape(1, 1, -1) for a in arrays])         # (6, 1, 1, C)
    if how == "T":
        return np.ascontiguousarray(arrays[0].T)
    return np.ascontiguousarray(arrays[0]).reshape(shape)


def _encode(array, qtype, gguf):
    """float32 -> the bytes of ggml type qtype (F32/F16 as float arrays, the rest as uint8)."""
    Q = gguf.GGMLQuantizationType
    if qtype == Q.F32:
        return array
    if qtype == Q.F16:
        return array.astype(np.float16)
    if qtype == Q.BF16:
        return to_bf16_bits(array).view(np.uint8).reshape(*array.shape[:-1], -1)
    if qtype == Q.Q8_0:                  # tinyrwkv's own copy of ggml's rule (formats/q8_0.py),
        return quantize_q8_0(array)      # the one the numba backend quantises on load with
    out = np.empty(gguf.quants.quant_shape_to_byte_shape(array.shape, qtype), np.uint8)
    rows, blocks = array.reshape(-1, array.shape[-1]), out.reshape(-1, out.shape[-1])
    step = max(1, _CHUNK_BYTES // (4 * rows.shape[1]))          # rows of float32 at a time
    for i in range(0, rows.shape[0], step):
        blocks[i: i + step] = gguf.quants.quantize(rows[i: i + step], qtype)
    return out


def write_gguf(path, weights, out_type="f32", tokenizer=None, name="tinyrwkv"):
    """Write official-keyed weights as a llama.cpp RWKV7 GGUF, a tensor at a time.

    weights: {official key: array} or a TensorSource (a conversion: streamed from the file).
    out_type: "f32", "f16", "bf16", "q8_0", "q5_0", "q4_1" or "q4_0" (gguf's quantisers) for the
        matrices; 1-D tensors, w1/w2 and the fused lerps stay F32, and a matrix whose rows are not
        whole blocks is written F16, as llama.cpp's converter does.
    tokenizer: a WorldTokenizer or HFTokenizer to embed (vocabulary metadata).
    """
    gguf = gguf_module()
    source = as_source(weights)
    infos = source.tensors()
    if any(k.endswith("ffn.s1") for k in infos):
        raise CheckpointError("DeepEmbed models have no GGUF mapping in llama.cpp's RWKV7 "
                              "architecture; write .safetensors instead")
    if out_type not in OUT_TYPES:
        raise ValueError(f"out_type must be one of {', '.join(OUT_TYPES)}, not {out_type!r}")
    size = sizes_from_shapes({k: t.shape for k, t in infos.items()})
    with atomic_path(path) as tmp:                       # the file appears whole, or not at all
        writer = gguf.GGUFWriter(str(tmp), ARCH)
        try:
            _write_to(writer, source, infos, size, out_type, tokenizer, name, gguf)
        finally:
            writer.close()                               # (Windows cannot delete an open file)


def _write_to(writer, source, infos, size, out_type, tokenizer, name, gguf):
    """write_gguf's content: metadata, tensor infos, then each tensor's data, one at a time."""
    Q = gguf.GGMLQuantizationType
    wanted = getattr(Q, out_type.upper())
    _add_metadata(writer, size, out_type, name)
    if tokenizer is not None:
        add_tokenizer(writer, tokenizer, size.vocab_size, gguf)
    plan = []
    for gname, shape, keys, how in _write_plan(infos, size.n_layer):
        qtype = Q.F32 if _always_f32(gname, shape) else wanted
        block = gguf.GGML_QUANT_SIZES[qtype][0]
        if shape[-1] % block:
            qtype = Q.F16                                # blocks need whole rows
        nbytes = math.prod(gguf.quants.quant_shape_to_byte_shape(shape, qtype)) \
            if qtype not in (Q.F32, Q.F16) else math.prod(shape) * (4 if qtype == Q.F32 else 2)
        writer.add_tensor_info(gname, shape, np.dtype(np.float32), nbytes, raw_dtype=qtype)
        plan.append((shape, keys, how, qtype))
    writer.write_header_to_file()                        # the streaming mode: header, metadata,
    writer.write_kv_data_to_file()                       # tensor infos, then each tensor's data
    writer.write_ti_data_to_file()
    for shape, keys, how, qtype in plan:
        writer.write_tensor_data(_encode(_build(source, keys, how, shape), qtype, gguf))


def _add_metadata(writer, size, out_type, name):
    """The hyper-parameters llama.cpp's converter writes for rwkv7 (docs/formats.md)."""
    Dw, Da, Dv, Dg = size.ranks
    writer.add_name(name)
    writer.add_context_length(1048576)                   # RWKV has no context limit
    writer.add_embedding_length(size.n_embd)
    writer.add_block_count(size.n_layer)
    writer.add_layer_norm_eps(1e-5)
    writer.add_wkv_head_size(size.head_size)
    writer.add_decay_lora_rank(Dw)
    writer.add_iclr_lora_rank(Da)
    writer.add_value_residual_mix_lora_rank(Dv or Da)    # a one-layer model has no Dv
    writer.add_gate_lora_rank(Dg)
    writer.add_feed_forward_length(size.dim_ffn)
    writer.add_head_count(0)                             # required by llama.cpp, unused
    writer.add_file_type(_FILE_TYPES[out_type])
