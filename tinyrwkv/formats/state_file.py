"""tinyrwkv state files (.npz): `save_state` and `load_state` (docs/formats.md §7).

    path = save_state(state, "chat.npz")         # atomic; returns the path written
    state = load_state("chat.npz", model.config) # checked against the model before any data

A state file is an uncompressed .npz (NumPy's zip of .npy files) with exactly four members:
`format` (the string "tinyrwkv-state-v1"), `att_shift` (L, C), `wkv` (L, H, N, N) and
`ffn_shift` (L, C), real floating point.

Naming rule: a state file's name ends in ".npz". A name without it gets ".npz" appended (as
np.savez always did), and `save_state` returns the path it wrote so callers can say so; a folder
is refused by name, never turned into "folder.npz".

Reading never unpickles and never trusts the file's sizes: every member's .npy header (shape,
dtype) is read and checked first, against the model's state when a config is given, and only then
its data, exactly the bytes the header declares. The file's I/O lives here, not in model.py, which
imports NumPy only.
"""

from __future__ import annotations

import math
import zipfile
import zlib
from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..files import OutputError, atomic_open
from ..model import State

STATE_FORMAT = "tinyrwkv-state-v1"
ARRAYS = ("att_shift", "wkv", "ffn_shift")
SUFFIX = ".npz"
AGAIN = "save the state again (generate --save-state, or tinyrwkv.save_state)"

# Without a model config, the arrays a file declares may take at most this many times its size
# on disk: np.savez stores data uncompressed (1x); a deflated float state compresses about 1.1x;
# a zip bomb expands ~1000x. With a config the bound is exact: what the model's state needs.
MAX_EXPANSION = 8


# ---------------------------------------------------------------------------------------------
# writing
# ---------------------------------------------------------------------------------------------

def state_file_path(path):
    """The path a state given as `path` is written to: `path` itself when its name ends in .npz,
    else `path` + ".npz". A folder is refused (it used to become "folder.npz")."""
    path = Path(path)
    if path.is_dir():
        raise OutputError(f"{path} is a folder: give a state file name, such as "
                          f"{path / ('state' + SUFFIX)}")
    return path if path.name.lower().endswith(SUFFIX) else path.with_name(path.name + SUFFIX)


def save_state(state, path):
    """Write `state` (a State; a GPU state is copied to the host) as a state file, atomically
    (tinyrwkv/files.py: a kill leaves the old file or the new one). Returns the path written
    (state_file_path: ".npz" appended when missing)."""
    path = state_file_path(path)
    host = state.to_host()
    for name in ARRAYS:
        dtype = np.asarray(getattr(host, name)).dtype
        if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
            raise ValueError(f"cannot save the state to {path}: {name} is {dtype}, a state holds "
                             "real float16/32/64 numbers")
    with atomic_open(path) as f:
        np.savez(f, format=np.array(STATE_FORMAT),
                 **{name: np.asarray(getattr(host, name)) for name in ARRAYS})
    return path


# ---------------------------------------------------------------------------------------------
# reading
# ---------------------------------------------------------------------------------------------

def load_state(path, config=None):
    """The State saved in the state file at `path`. With `config` (a model's Config), every array
    must have the shape that model's state has, checked before any data is read. Errors are
    CheckpointError (a ValueError) with one line naming the file, the problem and the fix."""
    path = Path(path)
    if not path.exists():
        raise CheckpointError(f"no state file at {path}: give a .npz written by --save-state")
    if not path.is_file():                      # a folder, a FIFO (would block), a device
        raise CheckpointError(f"{path} is not a regular file: give a .npz written by --save-state")
    try:
        with zipfile.ZipFile(path) as archive:
            members = _members(path, archive)
            headers = {name: _header(path, archive, info) for name, info in members.items()}
            _check_format_tag(path, archive, members["format"], headers["format"])
            _check_arrays(path, headers, config)
            arrays = {name: _data(path, archive, members[name], headers[name]) for name in ARRAYS}
    except CheckpointError:
        raise
    except (zipfile.BadZipFile, zlib.error, EOFError, NotImplementedError, RuntimeError,
            ValueError, OSError) as e:          # RuntimeError: an encrypted member
        raise CheckpointError(f"{path} is not a readable state file (truncated or corrupt: "
                              f"{_oneline(e)}); {AGAIN}") from None
    return State(*(arrays[name] for name in ARRAYS))


def _members(path, archive):
    """{array name: ZipInfo} for exactly the four expected members."""
    infos = archive.infolist()
    names = [info.filename[:-4] if info.filename.endswith(".npy") else info.filename
             for info in infos]
    expected = {"format", *ARRAYS}
    if "format" not in names:
        raise CheckpointError(f"{path} is not a tinyrwkv state file (no '{STATE_FORMAT}' tag); "
                              f"{AGAIN}")
    missing = sorted(expected - set(names))
    extra = sorted(set(names) - expected)
    if missing or extra or len(names) != len(set(names)):
        what = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(extra[:5])}" if extra else "",
            "a name stored twice" if len(names) != len(set(names)) else "") if part)
        raise CheckpointError(f"{path}: a state file holds exactly format, att_shift, wkv and "
                              f"ffn_shift ({what}); {AGAIN}")
    return {name: info for name, info in zip(names, infos)}


def _header(path, archive, info):
    """(shape, fortran_order, dtype, data offset) from a member's .npy header: its data unread."""
    with archive.open(info) as fp:
        version = np.lib.format.read_magic(fp)
        if version == (1, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_1_0(fp)
        elif version == (2, 0):
            shape, fortran, dtype = np.lib.format.read_array_header_2_0(fp)
        else:
            raise CheckpointError(f"{path}: {info.filename} is a .npy of version {version}, not "
                                  f"1.0 or 2.0 as np.savez writes; {AGAIN}")
        offset = fp.tell()
    return shape, fortran, dtype, offset


def _check_format_tag(path, archive, info, header):
    shape, _, dtype, _ = header
    tag = None
    if shape == () and dtype.kind == "U" and dtype.itemsize <= 4 * 64:   # a short string
        tag = str(_data(path, archive, info, header))
    if tag != STATE_FORMAT:
        raise CheckpointError(f"{path} is not a tinyrwkv state file (its format tag is not "
                              f"'{STATE_FORMAT}'); {AGAIN}")


def _check_arrays(path, headers, config):
    """dtypes real floating point; shapes those of `config`'s state, or, without a config,
    consistent with each other and not larger than the file can honestly hold."""
    for name in ARRAYS:
        _check_real(path, name, headers[name][2])
    shapes = {name: headers[name][0] for name in ARRAYS}
    if config is not None:
        need = state_shapes(config)
        for name in ARRAYS:
            if shapes[name] != need[name]:
                raise CheckpointError(
                    f"state file {path}: {name} has shape {shapes[name]}, this model needs "
                    f"{need[name]}; use a state saved from this model")
        return
    _check_consistent(path, shapes)
    declared = sum(math.prod(shapes[n]) * headers[n][2].itemsize for n in ARRAYS)
    on_disk = path.stat().st_size
    if declared > MAX_EXPANSION * on_disk:
        raise CheckpointError(f"{path} declares {declared:,} bytes of state in a {on_disk:,}-byte "
                              f"file (a compression bomb or a corrupt header); pass the model's "
                              f"config to load_state to check it against the model, or {AGAIN}")


def state_shapes(config):
    """{array name: shape} of the state of a model with `config` (State.zeros's shapes)."""
    L, C, H, N = config.n_layer, config.n_embd, config.n_head, config.head_size
    return {"att_shift": (L, C), "wkv": (L, H, N, N), "ffn_shift": (L, C)}


def _check_real(path, name, dtype):
    if dtype.hasobject:
        raise CheckpointError(f"{path}: {name} holds Python objects, which tinyrwkv never "
                              f"unpickles; {AGAIN}")
    if dtype.kind != "f" or dtype.itemsize not in (2, 4, 8):
        raise CheckpointError(f"{path}: {name} is {dtype}, a state holds real float16/32/64 "
                              f"numbers; {AGAIN}")


def _check_consistent(path, shapes):
    att, wkv, ffn = (shapes[n] for n in ARRAYS)
    ok = (len(att) == 2 and ffn == att and len(wkv) == 4 and wkv[0] == att[0]
          and wkv[2] == wkv[3] and wkv[1] * wkv[2] == att[1])
    if not ok:
        raise CheckpointError(f"{path}: att_shift {att}, wkv {wkv} and ffn_shift {ffn} are not "
                              f"the (L, C), (L, H, N, N), (L, C) of one model; {AGAIN}")


def _data(path, archive, info, header):
    """A member's array: exactly the bytes its header declares (already checked), read after the
    header, as a writable native-endian array."""
    shape, fortran, dtype, offset = header
    nbytes = math.prod(shape) * dtype.itemsize
    if info.file_size != offset + nbytes:
        raise CheckpointError(f"{path}: {info.filename} holds {info.file_size - offset:,} bytes "
                              f"of data, its header declares {nbytes:,}; {AGAIN}")
    with archive.open(info) as fp:           # read from the start to the end, never seek: the
        fp.read(offset)                      # CRC-32 is checked when a member is read through
        data = fp.read(nbytes)
        if len(data) != nbytes:
            raise CheckpointError(f"{path}: {info.filename} is truncated ({len(data):,} of "
                                  f"{nbytes:,} bytes); {AGAIN}")
        fp.read(1)
    array = np.frombuffer(data, dtype).reshape(shape, order="F" if fortran else "C")
    if array.dtype.kind == "U":
        return array
    array = np.array(array, dtype=dtype.newbyteorder("="), order="C")   # own, writable copy
    if not np.isfinite(array).all():
        raise CheckpointError(f"{path}: {info.filename[:-4]} holds NaN or infinite values; "
                              f"{AGAIN} from a state that is finite")
    return array


def _oneline(error):
    return " ".join(str(error).split()) or type(error).__name__
