"""Every model file tinyrwkv reads, through one entry point.

    source = open_model("model.pth")         # sniffs the format; reads headers only
    source.tensors()                         # {official key: TensorInfo(shape, dtype)}
    data = read_model("model.gguf")          # ModelData: tensors, tokenizer, description

`open_model` decides the format from the file's first bytes (never its name) and returns a
TensorSource (formats/source.py) with the **official key names and stored shapes**
(docs/architecture.md), whatever the layout on disk:

    .pth (torch zip)        formats/pth.py         official names, via our own pickle interpreter
    .safetensors            formats/safetensors.py official names, or fla's (-> formats/hf.py)
    .gguf                   formats/gguf.py        llama.cpp's rwkv7 layout, renamed and reshaped
    folder                  formats/hf.py          Hugging Face / fla: config.json + safetensors
    "path" without suffix   the official package's convention: path.pth (then .safetensors, .gguf)

`tinyrwkv.load`, and the `info`, `convert`, `merge-lora` and `trace` commands all read through
here, so they accept the same files and see the same tensors. Layouts: docs/formats.md.

Layout of this package: numerics.py (element types, bf16), progress.py, container.py (plans,
sniffing), pth.py (+ pickle_reader.py, our own restricted pickle interpreter), safetensors.py,
reading.py (containers -> arrays, threaded), source.py (the TensorSource interface), renamed.py
(other tools' names), hf.py, gguf.py (+ gguf_header.py, our bounded header parser, and
gguf_vocab.py), lora.py (LoRA and state-tuning files), state_file.py (tinyrwkv state .npz files)
and npz.py (checked .npz reading). Every writer here writes through tinyrwkv/files.py (atomic).

Hostile files: only regular files are opened (container.regular_file: a FIFO or a device is
refused from os.stat), every count and offset a header declares is checked against the file
before anything is allocated, layer numbers are bounded by the keys present
(schema.layer_count), and metadata that disagrees with the tensors' shapes is an error.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

from ..errors import CheckpointError, UnsupportedCheckpoint
from .container import read_head, resolve_model_path, sniff
from .gguf import open_gguf, write_gguf
from .hf import is_hf, open_fla, open_folder, write_hf
from .numerics import bf16_to_float32, to_bf16_bits
from .progress import ProgressBar
from .reading import Container, inspect_checkpoint, read_checkpoint
from .safetensors import save_safetensors, write_safetensors
from .source import InMemory, TensorInfo, TensorSource, as_source

__all__ = [
    "open_model", "read_model", "ModelData", "resolve_model_path", "TensorSource", "TensorInfo",
    "InMemory", "as_source", "read_checkpoint", "inspect_checkpoint", "save_safetensors",
    "write_safetensors", "write_gguf", "write_hf", "bf16_to_float32", "to_bf16_bits",
    "ProgressBar", "CheckpointError", "UnsupportedCheckpoint",
]


def open_model(path):
    """The model file at `path` as a TensorSource with official keys: format sniffed from the
    first bytes (module docstring), nothing but headers read. Raises CheckpointError naming the
    file, what it looks like and what to do, for anything else."""
    path = resolve_model_path(path)
    if path.is_dir():
        return open_folder(path)
    head, size = read_head(path)
    if sniff(path, head, size) == "gguf":
        return open_gguf(path)
    container = Container(path)
    if is_hf(container.tensors()):              # one safetensors file with fla's names
        return open_fla(path, [container])
    return container


@dataclass
class ModelData:
    """A model file read: its tensors under the official keys, the tokenizer it carries (GGUF,
    HF folder; else None) and a short description ("GGUF (llama.cpp rwkv7), stored f32, q8_0")."""
    path: Path
    tensors: dict
    tokenizer: object
    description: str


def read_model(path, dtype=None, progress=None):
    """Every tensor of the model file at `path`, with official keys (open_model, then read_all).
    dtype, progress: as read_checkpoint's (formats/reading.py)."""
    source = open_model(path)
    return ModelData(source.path, source.read_all(dtype, progress), source.tokenizer,
                     source.description)
