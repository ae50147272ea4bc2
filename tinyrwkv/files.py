"""Writing files so that nothing can destroy one: every file tinyrwkv writes goes through here.

    with atomic_open("m.safetensors") as f:     # a hidden temporary beside the target
        f.write(...)                            # the target appears whole at the end, or not at all
    with atomic_path("m.gguf") as tmp:          # for writers that take a path (gguf, torch.save)
        writer = GGUFWriter(str(tmp), ...)
    with atomic_folder("model_hf", {"config.json", "model.safetensors"}) as d:
        ...                                     # a whole folder, swapped in at the end
    refuse_overwriting("out.gguf", ["in.gguf"])  # OutputError: the output is the input

A file is written to `.NAME.<random>.tmp` in the target's folder (the same file system, so the
final rename is atomic), flushed and fsync'ed, then renamed onto NAME with os.replace (atomic on
POSIX and Windows), and the folder is fsync'ed where the system allows it (POSIX). On any exception,
KeyboardInterrupt included, the temporary is removed and the target is untouched. A kill (SIGKILL,
power loss) leaves the old file or the new one, whole; it may also leave the hidden temporary,
which can be deleted.

Folders (Hugging Face output, golden vectors) are written into a hidden sibling folder; at the end
an existing target is renamed aside (`.NAME.<random>.old`), the new folder renamed in, and the old
one deleted. A kill between those two renames (microseconds apart) leaves no NAME, the complete old
folder as `.NAME.<random>.old` and the complete new one as `.NAME.<random>.tmp`: rename either
back. A folder is only replaced when it holds nothing but the files the writer writes, so a model
written "into" a folder of other files is refused, never deleting them.

Standard library only, and nothing POSIX-only: it runs the same on Windows.
"""

from __future__ import annotations

import contextlib
import os
import secrets
import shutil
from pathlib import Path

__all__ = ["OutputError", "atomic_open", "atomic_path", "atomic_folder", "write_text",
           "write_bytes", "refuse_overwriting", "temporaries_of"]


class OutputError(ValueError):
    """An output that cannot be written safely: the message names the path, the problem and the
    fix."""


# ---------------------------------------------------------------------------------------------
# one file
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_open(target, mode="wb", encoding=None):
    """A file object on a new temporary beside `target`; on a clean exit it is synced and renamed
    onto `target`, on an exception removed. mode: "wb" or "w" (text; encoding default UTF-8)."""
    if mode not in ("wb", "w"):
        raise ValueError(f"atomic_open writes whole files: mode 'wb' or 'w', not {mode!r}")
    final = _file_target(target)
    tmp, fd = _create_temporary(final)
    try:
        text = {} if mode == "wb" else {"encoding": encoding or "utf-8"}
        with os.fdopen(fd, mode, **text) as f:
            fd = None                                   # the file object owns it now
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, final)
    except BaseException:
        if fd is not None:
            os.close(fd)
        _remove_quietly(tmp)
        raise
    _sync_folder(final.parent)


@contextlib.contextmanager
def atomic_path(target):
    """The path of a new, empty temporary beside `target`, for writers that open files by name
    (gguf.GGUFWriter, torch.save, tokenizers' save): on a clean exit what they wrote there is
    synced and renamed onto `target`; on an exception it is removed."""
    final = _file_target(target)
    tmp, fd = _create_temporary(final)
    os.close(fd)
    try:
        yield tmp
        _sync_file(tmp)
        os.replace(tmp, final)
    except BaseException:
        _remove_quietly(tmp)
        raise
    _sync_folder(final.parent)


def write_text(target, text, encoding="utf-8"):
    """Path.write_text, atomically (UTF-8 by default, whatever the platform's locale)."""
    with atomic_open(target, "w", encoding=encoding) as f:
        f.write(text)


def write_bytes(target, data):
    """Path.write_bytes, atomically."""
    with atomic_open(target, "wb") as f:
        f.write(data)


def temporaries_of(target):
    """The hidden temporaries (files or folders) a write to `target` would leave after a kill:
    for cleaning up, and for tests."""
    target = Path(target)
    return sorted(target.parent.glob(f".{target.name}.*.tmp")) + \
        sorted(target.parent.glob(f".{target.name}.*.old"))


def _file_target(target):
    """Where the bytes of `target` go: the file a symlink points to (the link stays a link), in a
    folder that exists; a folder is refused by name."""
    target = Path(target)
    final = Path(os.path.realpath(target)) if target.is_symlink() else target
    if final.is_dir():
        raise OutputError(f"{target} is a folder: give a file name (for example "
                          f"{Path(target) / 'out'})")
    if not final.parent.is_dir():
        raise OutputError(f"{target}: the folder {final.parent} does not exist; create it first "
                          "or give another path")
    if final.exists() and not final.is_file():
        # a device (/dev/full, /dev/null), a FIFO, a socket: renaming over it would replace the
        # node itself (as root, in /dev), and writing into it would not be a file
        raise OutputError(f"{target} is not a regular file (a device, FIFO or socket): give the "
                          "path of a file to write")
    return final


def _create_temporary(final, kind="tmp"):
    """A new hidden file beside `final`, created exclusively (never someone else's file): (path,
    open descriptor). The name is derived from the target so a leftover is easy to recognise."""
    flags = os.O_WRONLY | os.O_CREAT | os.O_EXCL | getattr(os, "O_BINARY", 0)   # O_BINARY: Windows
    for _ in range(16):
        tmp = _hidden_sibling(final, kind)
        try:
            return tmp, os.open(tmp, flags, 0o666)     # 0o666 less the umask, as open() does
        except FileExistsError:
            continue                                   # 32 random bits collided: draw again
    raise OutputError(f"{final}: cannot create a temporary file beside it; remove the "
                      f".{final.name}.*.tmp files there")


def _hidden_sibling(final, kind):
    return final.with_name(f".{final.name}.{secrets.token_hex(4)}.{kind}")


def _sync_file(path):
    """Push a file's data to the disk before it is renamed into place (else a power loss after
    the rename can leave an empty file under the final name)."""
    fd = os.open(path, os.O_RDWR | getattr(os, "O_BINARY", 0))   # Windows syncs writable handles
    try:
        os.fsync(fd)
    finally:
        os.close(fd)


def _sync_folder(folder):
    """Make a rename in `folder` durable. POSIX only: Windows cannot open a folder this way (and
    its file system journals renames); some file systems refuse too, which is harmless."""
    if os.name == "nt":
        return
    try:
        fd = os.open(folder, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def _remove_quietly(path):
    with contextlib.suppress(OSError):
        os.remove(path)


# ---------------------------------------------------------------------------------------------
# a whole folder
# ---------------------------------------------------------------------------------------------

@contextlib.contextmanager
def atomic_folder(target, replaceable):
    """A new hidden folder beside `target` to write into; on a clean exit it replaces `target`
    (module docstring: how, and what a kill leaves), on an exception it is removed.

    replaceable: the names the writer writes. An existing `target` that holds anything else is
    refused before anything is written, so no file the writer did not make is ever deleted.
    """
    final = Path(os.path.abspath(target))
    _check_replaceable_folder(target, final, set(replaceable))
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = _create_temporary_folder(final)
    try:
        yield tmp
        _sync_tree(tmp)
        _swap_in(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    _sync_folder(final.parent)


def _check_replaceable_folder(target, final, replaceable):
    if final.is_symlink() or (final.exists() and not final.is_dir()):
        what = "a symlink" if final.is_symlink() else "a file"
        raise OutputError(f"{target} is {what}, not a folder this command can replace: give a new "
                          "folder name, or remove it first")
    if final.is_dir():
        others = sorted(set(os.listdir(final)) - replaceable)
        if others:
            more = f" and {len(others) - 3} more" if len(others) > 3 else ""
            shown = ", ".join(others[:3]) + more
            raise OutputError(f"{target} is a folder that holds {shown}, which this command does "
                              "not write: the output would replace the whole folder; give a new "
                              "folder name, or empty it first")


def _sync_tree(folder):
    """Sync every file the writer put in `folder`, however it wrote them, then the folders."""
    for path in sorted(folder.rglob("*")):
        if path.is_file():
            _sync_file(path)
    for path in [*sorted(p for p in folder.rglob("*") if p.is_dir()), folder]:
        _sync_folder(path)


def _create_temporary_folder(final):
    for _ in range(16):
        tmp = _hidden_sibling(final, "tmp")
        try:
            tmp.mkdir()
            return tmp
        except FileExistsError:
            continue
    raise OutputError(f"{final}: cannot create a temporary folder beside it; remove the "
                      f".{final.name}.*.tmp folders there")


def _swap_in(new, final):
    """Rename `new` onto `final`; an existing `final` is first renamed aside, then deleted."""
    if not final.exists():
        os.replace(new, final)          # fails, touching nothing, if `final` appeared meanwhile
        return
    old = _hidden_sibling(final, "old")
    os.replace(final, old)
    try:
        os.replace(new, final)
    except BaseException:
        os.replace(old, final)          # put the old folder back before reporting the error
        raise
    shutil.rmtree(old, ignore_errors=True)


# ---------------------------------------------------------------------------------------------
# outputs that are inputs
# ---------------------------------------------------------------------------------------------

def refuse_overwriting(output, inputs):
    """Raise OutputError when writing `output` would write over one of `inputs` (paths; None is
    skipped): the same file by name, through a symlink or as a hard link, a folder that contains
    an input, or a path inside an input folder. Called before anything is written."""
    out = Path(os.path.realpath(output))
    for given in inputs:
        if given is None:
            continue
        source = Path(os.path.realpath(given))
        if _same_file(out, source):
            problem = f"is the input {given}" + ("" if out == source else
                                                   " (the same file under another name)")
        elif out in source.parents:
            problem = f"is a folder that contains the input {given}"
        elif source in out.parents:
            problem = f"is inside the input folder {given}"
        else:
            continue
        raise OutputError(f"{output} {problem}: writing it would destroy the input; give another "
                          "output path")


def _same_file(a, b):
    if a == b:
        return True
    try:
        return os.path.samefile(a, b)            # hard links, case-insensitive names
    except OSError:                              # one of them does not exist
        return False
