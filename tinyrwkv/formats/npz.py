""".npz files a user hands us (state files, traces of other implementations), read without
trusting them.

An .npz is NumPy's zip of .npy members: each member a small header (magic, version, then a Python
dict literal {'descr', 'fortran_order', 'shape'}) and the raw array bytes. `np.load` would do, but
it unpickles object arrays when asked, lets a member declare any size and decompresses it all,
and fails with whatever zipfile, zlib or the header parser raises. `NpzReader` instead

  * opens regular files only (a FIFO would block forever);
  * reads every member's header first (`header`), so a caller can check names, shapes and dtypes
    against what it expects (and bound the bytes declared) before a single data byte is read;
  * refuses object arrays (never unpickles), and .npy versions other than np.savez's;
  * reads exactly the bytes a header declares (`read`), start to end so zipfile checks the CRC;
  * turns every failure into one CheckpointError naming the file, the problem and `fix`.
"""

from __future__ import annotations

import math
import tokenize
import zipfile
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..errors import CheckpointError

# What a broken zip or .npy header makes zipfile, zlib and np.lib.format raise. (RuntimeError: an
# encrypted member; SyntaxError/tokenize.TokenError: a header that is not a Python literal.)
_BROKEN = (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
           ValueError, OSError, SyntaxError, tokenize.TokenError, MemoryError, OverflowError,
           TypeError)


@dataclass(frozen=True)
class NpyHeader:
    shape: tuple
    fortran_order: bool
    dtype: np.dtype
    offset: int                     # where the data starts inside the member

    @property
    def nbytes(self):
        return math.prod(self.shape) * self.dtype.itemsize


class NpzReader:
    """with NpzReader(path, what="trace", fix="write it again with ...") as npz:
           for name in npz.names: npz.header(name) ... npz.read(name)"""

    def __init__(self, path, what, fix):
        self.path, self.what, self.fix = Path(path), what, fix
        if not self.path.exists():
            raise CheckpointError(f"no {what} at {self.path}: the file does not exist; {fix}")
        if not self.path.is_file():            # a folder, a FIFO (would block), a device
            raise CheckpointError(f"{self.path} is not a regular file; {fix}")
        self.archive = self._checked(zipfile.ZipFile, self.path)
        self.members = self._checked(self._member_table)
        self.names = list(self.members)
        self._headers = {}

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self.archive.close()

    def error(self, problem):
        """A CheckpointError: this file, `problem`, the fix."""
        return CheckpointError(f"{self.path}: {problem}; {self.fix}")

    def _checked(self, fn, *args):
        try:
            return fn(*args)
        except CheckpointError:
            raise
        except _BROKEN as e:
            raise CheckpointError(f"{self.path} is not a readable {self.what} (truncated or "
                                  f"corrupt: {_one_line(e)}); {self.fix}") from None

    def _member_table(self):
        """{array name: ZipInfo}; every member must be a .npy, each name once."""
        table = {}
        for info in self.archive.infolist():
            if not info.filename.endswith(".npy"):
                raise self.error(f"member {info.filename[:80]!r} is not a .npy array")
            name = info.filename[:-4]
            if name in table:
                raise self.error(f"the array {name[:80]!r} is stored twice")
            table[name] = info
        return table

    def header(self, name):
        """The NpyHeader of array `name` (read once): shape, order, dtype; no data read."""
        if name not in self._headers:
            self._headers[name] = self._checked(self._read_header, name)
        return self._headers[name]

    def _read_header(self, name):
        info = self.members[name]
        with self.archive.open(info) as fp:
            version = np.lib.format.read_magic(fp)
            if version == (1, 0):           # headers of at most 10,000 bytes (NumPy's bound)
                shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
            elif version == (2, 0):
                shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
            else:
                raise self.error(f"{info.filename} is a .npy of version {version}, not 1.0 or "
                                 "2.0 as np.savez writes")
            offset = fp.tell()
        if dtype.hasobject:
            raise self.error(f"{name} holds Python objects, which tinyrwkv never unpickles")
        header = NpyHeader(tuple(shape), bool(fortran), dtype, offset)
        if info.file_size != offset + header.nbytes:
            raise self.error(f"{info.filename} holds {info.file_size - offset:,} bytes of data, "
                             f"its header declares {header.nbytes:,}")
        return header

    def declared_bytes(self):
        """Bytes of data every member declares (headers only): bound it before reading."""
        return sum(self.header(name).nbytes for name in self.names)

    def read(self, name):
        """Array `name`: exactly the bytes its header declares, as an own, writable,
        native-byte-order array (strings stay as they are)."""
        return self._checked(self._read_data, name)

    def _read_data(self, name):
        info, h = self.members[name], self.header(name)
        with self.archive.open(info) as fp:   # start to end, never seek: zipfile then checks
            fp.read(h.offset)                 # the member's CRC-32
            data = fp.read(h.nbytes)
            if len(data) != h.nbytes:
                raise self.error(f"{info.filename} is truncated ({len(data):,} of {h.nbytes:,} "
                                 "bytes)")
            fp.read(1)
        array = np.frombuffer(data, h.dtype).reshape(h.shape, order="F" if h.fortran_order else "C")
        if array.dtype.kind in "US":
            return array
        return np.array(array, dtype=h.dtype.newbyteorder("="), order="C")


def _one_line(error):
    return " ".join(str(error).split())[:200] or type(error).__name__
