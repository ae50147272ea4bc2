"""What a tensor container (.pth or .safetensors) holds and where, before any tensor data is read:
the "plan" the readers (formats/reading.py) follow; and, shared by every reader, finding the
file (resolve_model_path) and sniffing its format from its first bytes (sniff).
"""

from __future__ import annotations

import os
import stat
from dataclasses import dataclass
from pathlib import Path

from ..errors import SUPPORTED_FORMATS, CheckpointError, corrupt
from .numerics import DType


@dataclass
class Region:
    """Where one storage's bytes are: `offset` in the file (mapped), or a compressed zip member."""
    nbytes: int
    offset: int | None = None      # absolute file offset of the first byte (stored members)
    member: str | None = None      # zip member name (compressed members, read through zipfile)


@dataclass
class TensorPlan:
    """One tensor: a strided view of a storage, all counts in elements."""
    dtype: DType
    storage: str                   # key into the regions dict
    offset: int
    shape: tuple
    stride: tuple

    @property
    def nbytes(self):
        n = self.dtype.itemsize
        for d in self.shape:
            n *= d
        return n


@dataclass
class Plan:
    path: Path
    tensors: dict                  # name -> TensorPlan, in file order
    regions: dict                  # storage key -> Region
    big_endian: bool = False
    kind: str = "pth"              # the container: "pth" or "safetensors"
    inner_key: str | None = None   # .pth: the top dict's key the state dict was under ("model")


def is_count(x):
    return type(x) is int and x >= 0


def check_view(path, name, offset, shape, stride, numel):
    """A strided view (all in elements) must stay inside its storage of `numel` elements."""
    if len(shape) != len(stride):
        raise corrupt(path, f"tensor {name!r} has size {shape} but stride {stride}")
    if any(n == 0 for n in shape):
        last = offset - 1              # an empty tensor touches no element
    else:
        last = offset + sum((n - 1) * s for n, s in zip(shape, stride))
    if offset < 0 or last >= numel:
        raise corrupt(path, f"tensor {name!r} (offset {offset}, size {shape}, stride {stride}) "
                            f"reaches outside its storage of {numel} elements")


def is_contiguous(shape, stride):
    """True if a view with these (element) strides is C-contiguous, as NumPy decides it: axes of
    length 1 may have any stride."""
    expected = 1
    for n, s in zip(reversed(shape), reversed(stride)):
        if n != 1 and s != expected:
            return False
        expected *= n
    return True


# ---- finding and sniffing ----

def resolve_model_path(path):
    """The file (or folder) to open. Like the official package, accept a path given without its
    '.pth' (or '.safetensors', '.gguf'); a folder must be a Hugging Face / fla model folder.
    Anything else that exists (a FIFO, a device, a socket) is refused here, before it is opened:
    reading a FIFO would block forever, a device never ends (regular_file)."""
    path = Path(path).expanduser()
    kind = _kind(path)
    if kind == "file":
        return path
    if kind == "other":
        regular_file(path)                  # raises, naming what the path is
    for suffix in (".pth", ".safetensors", ".gguf"):
        candidate = path.with_name(path.name + suffix)
        if _kind(candidate) == "file":
            return candidate
    if kind == "dir":
        if any(path.glob("*.safetensors")):
            return path                     # a Hugging Face / fla model (or PEFT adapter) folder
        raise CheckpointError(_directory_message(path))
    raise CheckpointError(f"no checkpoint at {path}: the file does not exist")


def _kind(path):
    """"file", "dir", "other" (FIFO, device, socket) or None (absent) for `path`, by os.stat:
    the file type, never by opening it."""
    try:
        mode = os.stat(path).st_mode
    except (OSError, ValueError):           # absent, a broken link, a NUL in the name
        return None
    return "file" if stat.S_ISREG(mode) else "dir" if stat.S_ISDIR(mode) else "other"


def _directory_message(path):
    return (f"{path} is a directory; give the checkpoint file inside it (a .pth, .safetensors "
            "or .gguf file), or a Hugging Face model folder (config.json and .safetensors files)")


def regular_file(path):
    """The size of `path`, after checking (os.stat, not open) that it is a regular file: a FIFO
    would block the reader forever and a device (/dev/zero) never ends, so neither is opened.
    CheckpointError, naming the path and what it is, otherwise."""
    path = Path(path)
    try:
        info = os.stat(path)
    except FileNotFoundError:
        raise CheckpointError(f"no checkpoint at {path}: the file does not exist") from None
    except (OSError, ValueError) as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    if stat.S_ISDIR(info.st_mode):
        raise CheckpointError(_directory_message(path))
    if not stat.S_ISREG(info.st_mode):
        what = ("a FIFO (named pipe)" if stat.S_ISFIFO(info.st_mode) else
                "a device" if stat.S_ISCHR(info.st_mode) or stat.S_ISBLK(info.st_mode) else
                "a socket" if stat.S_ISSOCK(info.st_mode) else "not a regular file")
        raise CheckpointError(f"{path} is {what}, not a regular file: tinyrwkv reads model files "
                              "only (a pipe or device could block or never end); save the data to "
                              "a file and give that")
    return info.st_size


def read_head(path, n=512):
    """(first n bytes, file size) of a regular file (regular_file), or a CheckpointError saying
    why it cannot be opened."""
    path = Path(path)
    size = regular_file(path)
    try:
        with open(path, "rb") as f:
            head = f.read(n)
    except OSError as e:
        raise CheckpointError(f"cannot read {path}: {e}") from e
    return head, size


def sniff(path, head, size):
    """'pth', 'safetensors' or 'gguf' from the magic bytes; otherwise say what the file looks
    like, and what to do about it."""
    if size == 0:
        raise CheckpointError(f"{path} is empty (0 bytes): the download or copy failed; "
                              "download it again")
    if head.startswith((b"PK\x03\x04", b"PK\x05\x06")):       # a zip (or an empty zip)
        return "pth"
    if len(head) >= 9 and head[8:9] == b"{":
        return "safetensors"       # 8-byte length, then the JSON header's opening brace
    if head.startswith(b"GGUF"):
        return "gguf"
    if head[:1] == b"\x80" and head[1:2] in (b"\x02", b"\x03", b"\x04", b"\x05"):
        what = ("a bare pickle, not a zip: the legacy torch format (torch < 1.6, or "
                "_use_new_zipfile_serialization=False). Re-save it with a recent torch: "
                "torch.save(torch.load(old, weights_only=True), new)")
    elif head.startswith(b"\x93NUMPY"):
        what = "a NumPy .npy array, not a checkpoint"
    elif head.startswith(b"version https://git-lfs"):
        what = ("a Git LFS pointer, not the weights themselves: run `git lfs pull` "
                "(or download the file directly)")
    elif _looks_like_text(head):
        snippet = head[:60].decode("utf-8", "replace").split("\n")[0]
        hint = " (an HTML page: probably a failed download)" if b"<html" in head.lower() or \
            b"<!doctype" in head.lower() else ""
        what = f"a text file{hint}, beginning {snippet!r}"
    else:
        what = f"an unknown binary format (first bytes {head[:8].hex(' ')})"
    raise CheckpointError(f"{path} is not a checkpoint tinyrwkv can read: it looks like {what}. "
                          f"{SUPPORTED_FORMATS}")


def _looks_like_text(head):
    text = head.decode("utf-8", "replace")[:-1]    # the 512-byte cut may split the last character
    return all((c.isprintable() and c != "\ufffd") or c in "\r\n\t" for c in text)

