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

from pathlib import Path

import numpy as np

from ..errors import CheckpointError
from ..files import OutputError, atomic_open
from ..model import State
from .npz import NpzReader

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
    with NpzReader(path, "state file", AGAIN) as npz:        # formats/npz.py: checked reading
        _check_members(npz)
        _check_format_tag(npz)
        _check_arrays(npz, config)
        arrays = {name: npz.read(name) for name in ARRAYS}
    for name, array in arrays.items():
        if not np.isfinite(array).all():
            raise npz.error(f"{name} holds NaN or infinite values; save it again from a state "
                            "that is finite")
    return State(*(arrays[name] for name in ARRAYS))


def _check_members(npz):
    """Exactly the four expected arrays."""
    if "format" not in npz.names:
        raise CheckpointError(f"{npz.path} is not a tinyrwkv state file (no '{STATE_FORMAT}' "
                              f"tag); {AGAIN}")
    expected = {"format", *ARRAYS}
    missing, extra = sorted(expected - set(npz.names)), sorted(set(npz.names) - expected)
    if missing or extra:
        what = "; ".join(part for part in (
            f"missing {', '.join(missing)}" if missing else "",
            f"unexpected {', '.join(x[:40] for x in extra[:5])}" if extra else "") if part)
        raise npz.error(f"a state file holds exactly format, att_shift, wkv and ffn_shift ({what})")


def _check_format_tag(npz):
    h = npz.header("format")
    tag = None
    if h.shape == () and h.dtype.kind == "U" and h.dtype.itemsize <= 4 * 64:   # a short string
        tag = str(npz.read("format"))
    if tag != STATE_FORMAT:
        raise CheckpointError(f"{npz.path} is not a tinyrwkv state file (its format tag is not "
                              f"'{STATE_FORMAT}'); {AGAIN}")


def _check_arrays(npz, config):
    """dtypes real floating point; shapes those of `config`'s state, or, without a config,
    consistent with each other and not larger than the file can honestly hold."""
    path = npz.path
    for name in ARRAYS:
        _check_real(path, name, npz.header(name).dtype)
    shapes = {name: npz.header(name).shape for name in ARRAYS}
    if config is not None:
        need = state_shapes(config)
        for name in ARRAYS:
            if shapes[name] != need[name]:
                raise CheckpointError(
                    f"state file {path}: {name} has shape {shapes[name]}, this model needs "
                    f"{need[name]}; use a state saved from this model")
        return
    _check_consistent(path, shapes)
    declared = sum(npz.header(name).nbytes for name in ARRAYS)
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
    """Real float16/32/64 (object arrays never get here: NpzReader refuses them)."""
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
