"""The errors a model file can cause. A module of its own so that the schema (tinyrwkv/schema.py)
and the readers (tinyrwkv/formats/) can both raise them without importing each other."""

SUPPORTED_FORMATS = ("tinyrwkv reads PyTorch zip checkpoints (.pth, as written by torch.save since "
                     "torch 1.6), .safetensors files (official or flash-linear-attention key "
                     "names), llama.cpp RWKV7 .gguf files and Hugging Face / fla model folders")
SUPPORTED_VERSIONS = "tinyrwkv supports RWKV-7 x070 and its DeepEmbed variant"


class CheckpointError(ValueError):
    """A checkpoint file that cannot be read: the message names the file, the problem and the fix."""


class UnsupportedCheckpoint(CheckpointError):
    """A readable checkpoint of a model version or layout tinyrwkv does not implement."""


def corrupt(path, what):
    """The error for a file whose structure is broken: truncated downloads, garbage bytes."""
    return CheckpointError(f"{path} is truncated or corrupt: {what}; re-download it (or re-save it)")
