"""`tinyrwkv.load`: from a checkpoint file to a ready model (and its tokenizer)."""

from __future__ import annotations

from pathlib import Path

from .checkpoint import CheckpointError, check_x070_keys, detect_version, read_checkpoint
from .model import RWKV7
from .tokenizer import TokenizerError, get_tokenizer


def resolve_model_path(path):
    """The file to open. Like the official package, accept a path given without its '.pth'."""
    path = Path(path).expanduser()
    if path.is_file():
        return path
    for suffix in (".pth", ".safetensors"):
        candidate = path.with_name(path.name + suffix)
        if candidate.is_file():
            return candidate
    if path.is_dir():
        raise CheckpointError(f"{path} is a directory; give the checkpoint file inside it "
                              "(a .pth or .safetensors file)")
    raise CheckpointError(f"no checkpoint at {path}: the file does not exist")


def load(path, dtype="float32", tokenizer=None, progress=None, wkv="auto"):
    """Load an RWKV-7 checkpoint (.pth or .safetensors, official key names) without torch.

    Args:
        path: the checkpoint file (the '.pth' may be left off, as with the official package)
        dtype: "float32" (default) or "float64" (the oracle mode)
        tokenizer: None to choose from the vocabulary size (65536 rows: World), "world", or a
            path to a tokenizer.json (e.g. the Pile models' 20B_tokenizer.json)
        progress: None (a progress bar for large files on a terminal), False, or a callable
            progress(done_bytes, total_bytes)
        wkv: "auto", "recurrent" or "chunked": how the sequence form runs the WKV operator
            (see RWKV7; the same function either way)
    Returns:
        an RWKV7 model with `.tokenizer` set (None if it could not be chosen: then
        `.tokenizer_error` says why, and generation raises it).
    """
    path = resolve_model_path(path)
    weights = read_checkpoint(path, dtype=dtype, progress=progress)
    detect_version(weights.keys())          # refuses RWKV-4/5/6, RC versions, fla/HF layouts
    check_x070_keys(weights)                # every key present with the right shape, no extras
    model = RWKV7(weights, dtype=dtype, name=path.name, wkv=wkv)
    model.path = path
    try:
        model.tokenizer = get_tokenizer(model.config.vocab_size, tokenizer, model_path=path)
        model.tokenizer_error = None
    except TokenizerError as e:
        if tokenizer is not None:           # asked for explicitly: a mismatch is an error now
            raise
        model.tokenizer, model.tokenizer_error = None, e
    return model
